"""Prepared token datasets (DESIGN 12): flat token shards, and a manifest written last.

A dataset is a folder (local or s3://) holding, per split (train, val), shards `train-00000.bin`
... of little-endian token ids (uint8, uint16 or uint32: the smallest that holds the vocabulary),
a file of document start offsets (`train-docs.u64`), and `manifest.json`. The manifest is
written last: a folder without one is not a dataset, whatever else it holds.

Readers take tokens by position: a local shard with positioned reads (`os.pread`), an S3 one by
ranged GETs through a bounded block cache. Only the bytes that a window touches are read. Not a
memory map: with random windows over a large file the kernel maps far more than was asked for
into the reader's resident memory (measured: ~0.7 MB per 130-byte window), pread maps nothing.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_ray.storage import s3
from moe_ray.storage.location import Location, refuse_occupied, staging_sibling

MANIFEST = "manifest.json"
FORMAT = "moe-ray-tokens"
VERSION = 1
SPLITS = ("train", "val")
SHARD_TOKENS = 2**28  # tokens per shard file (512 MiB of uint16)


class DatasetError(Exception):
    """A prepared dataset that cannot be written or read; the message says what to fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    for dtype in ("<u1", "<u2", "<u4"):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DatasetError(f"a vocabulary of {vocab_size} tokens does not fit in 32 bits")


# --- writing ---------------------------------------------------------------------------------


def check_new_location(out: str) -> None:
    """Refuse a location that holds a dataset, or anything else: prepare never overwrites."""
    if read_manifest(out) is not None:
        raise DatasetError(f"{out} already holds a prepared dataset: give a new location (nothing was written)")
    refuse_occupied(out, DatasetError)


class SplitWriter:
    """Appends documents to one split's shards, hashing as it writes; holds no tokens itself."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int, publish: Callable[[str], None]):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.publish = publish
        self.tokens = self.documents = 0
        self.shards: list[dict] = []
        self.doc_starts_file = f"{split}-docs.u64"
        self._starts = open(folder / self.doc_starts_file, "wb")  # noqa: SIM115 (closed in close())
        self._shard = self._hash = None
        self._in_shard = 0

    def add(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        self._starts.write(np.array([self.tokens], dtype="<u8").tobytes())
        self.documents += 1
        pos = 0
        while pos < len(ids):
            if self._shard is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self.shards.append({"file": name})
                self._shard, self._hash, self._in_shard = open(self.folder / name, "wb"), hashlib.sha256(), 0  # noqa: SIM115
            take = min(len(ids) - pos, self.shard_tokens - self._in_shard)
            chunk = ids[pos : pos + take].tobytes()
            self._shard.write(chunk)
            self._hash.update(chunk)
            self._in_shard += take
            self.tokens += take
            pos += take
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._shard.close()
        self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())
        self.publish(self.shards[-1]["file"])
        self._shard = None

    def close(self) -> dict:
        if self._shard is not None:
            self._close_shard()
        self._starts.close()
        self.publish(self.doc_starts_file)
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "shards": self.shards,
            "doc_starts": self.doc_starts_file,
        }


class DatasetWriter:
    """Writes a new dataset to `out` (a local folder or s3:// prefix).

    Files are staged in a temporary folder: a local dataset is renamed into place when complete,
    an S3 one uploads each finished shard (so a large corpus needs no local copy) and the
    manifest last. On an error nothing that looks like a dataset is left (`abort`). A location
    that already holds a complete dataset, or other files, is refused unless `clear_partial`
    (the run cache: leftovers of an interrupted attempt, which never have a manifest).
    """

    def __init__(self, out: str, dtype: np.dtype, shard_tokens: int = SHARD_TOKENS, clear_partial: bool = False):
        self.loc, self.dtype = Location(out), dtype
        if not clear_partial:
            check_new_location(out)
        elif read_manifest(out) is not None:
            raise DatasetError(f"{out} already holds a prepared dataset: give a new location (nothing was written)")
        if self.loc.is_s3:
            if s3.list_objects(self.loc):
                s3.delete_prefix(self.loc)
            self.staging = Path(tempfile.mkdtemp(prefix="moe-ray-prepare-"))
        else:
            path = self.loc.local_path
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if clear_partial:  # and the staging folders of attempts that were killed
                for left in path.parent.glob(f".{path.name}.partial-*"):
                    shutil.rmtree(left, ignore_errors=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.staging = staging_sibling(path)
        self.splits = {s: SplitWriter(self.staging, s, dtype, shard_tokens, self._publish) for s in SPLITS}

    def _publish(self, name: str) -> None:
        if self.loc.is_s3:  # upload now and free the local disk
            s3.upload_file(self.staging / name, self.loc.child(name))
            (self.staging / name).unlink()

    def add_file(self, name: str, data: bytes) -> None:
        (self.staging / name).write_bytes(data)
        self._publish(name)

    def finish(self, fields: dict) -> dict:
        """Close the splits and write the manifest (last). Returns the manifest."""
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **fields,
            "dtype": self.dtype.name,
            "splits": {name: w.close() for name, w in self.splits.items()},
        }
        text = json.dumps(manifest, indent=2)
        if self.loc.is_s3:
            s3.write_bytes(self.loc.child(MANIFEST), text.encode())
            shutil.rmtree(self.staging, ignore_errors=True)
        else:
            (self.staging / MANIFEST).write_text(text)
            path = self.loc.local_path
            if path.exists():
                path.rmdir()  # an empty folder made meanwhile
            os.replace(self.staging, path)
        return manifest

    def abort(self) -> None:
        for w in self.splits.values():
            for f in (w._shard, w._starts):
                if f is not None:
                    f.close()
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.loc.is_s3:
            s3.delete_prefix(self.loc)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# --- reading ---------------------------------------------------------------------------------


def read_manifest(uri: str) -> dict | None:
    """The manifest at `uri`, or None when there is none (not a dataset, or not complete)."""
    loc = Location(uri)
    if loc.is_s3:
        text = s3.read_if_exists(loc.child(MANIFEST))
        if text is None:
            return None
    else:
        path = loc.local_path / MANIFEST
        if not path.is_file():
            return None
        text = path.read_bytes()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{uri}/{MANIFEST} is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DatasetError(f"{uri}/{MANIFEST} is not a {FORMAT} v{VERSION} manifest: prepare it again")
    return manifest


class BlockCache:
    """Ranged reads from S3 in aligned blocks, the most recently used kept up to `max_bytes`.
    Thread-safe; `prefetch` fetches the missing blocks of many ranges in parallel."""

    def __init__(self, block_bytes: int = 64 * 2**10, max_bytes: int = 64 * 2**20, threads: int = 8):
        self.block_bytes, self.max_blocks = block_bytes, max(1, max_bytes // block_bytes)
        self.blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.lock = threading.Lock()
        self.fetched_bytes = self.fetches = 0
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="moe-ray-tokens")

    def _fetch(self, loc: Location, index: int) -> bytes:
        start = index * self.block_bytes
        body = s3.read_range(loc, start, start + self.block_bytes)
        with self.lock:
            self.fetched_bytes += len(body)
            self.fetches += 1
            self.blocks[(loc.uri, index)] = body
            while len(self.blocks) > self.max_blocks:
                self.blocks.popitem(last=False)
        return body

    def _block(self, loc: Location, index: int) -> bytes:
        with self.lock:
            body = self.blocks.get((loc.uri, index))
            if body is not None:
                self.blocks.move_to_end((loc.uri, index))
                return body
        return self._fetch(loc, index)

    def _indices(self, start: int, stop: int) -> range:
        return range(start // self.block_bytes, (stop - 1) // self.block_bytes + 1)

    def read(self, loc: Location, start: int, stop: int) -> bytes:
        if stop <= start:
            return b""
        data = b"".join(self._block(loc, i) for i in self._indices(start, stop))
        offset = start - (start // self.block_bytes) * self.block_bytes
        return data[offset : offset + stop - start]

    def prefetch(self, ranges: Iterable[tuple[Location, int, int]]) -> None:
        wanted = {(loc.uri, i): loc for loc, a, b in ranges if b > a for i in self._indices(a, b)}
        with self.lock:
            missing = [(loc, key[1]) for key, loc in wanted.items() if key not in self.blocks]
        list(self.pool.map(lambda item: self._fetch(*item), missing))


class TokenShards:
    """One split as a sequence of tokens: `len()`, `[a:b]` and `windows(starts, length)`,
    reading only what is asked for, across shard boundaries."""

    def __init__(self, loc: Location, split: dict, dtype: np.dtype, cache: BlockCache | None):
        self.files = [loc.child(s["file"]) for s in split["shards"]]
        self.bounds = np.cumsum([0] + [s["tokens"] for s in split["shards"]]).tolist()
        self.dtype, self.cache = dtype, cache
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self.bounds[-1]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("token shards are read by contiguous slices")
        start, stop, _ = key.indices(len(self))
        return self._read(start, max(start, stop))

    def _pieces(self, start: int, stop: int) -> Iterable[tuple[int, int, int]]:
        """(shard, first, last) token ranges within shards that cover [start, stop)."""
        i = bisect.bisect_right(self.bounds, start) - 1
        while start < stop:
            end = min(stop, self.bounds[i + 1])
            yield i, start - self.bounds[i], end - self.bounds[i]
            start, i = end, i + 1

    def _read(self, start: int, stop: int) -> np.ndarray:
        parts = [self._shard_slice(*p) for p in self._pieces(start, stop)]
        if not parts:
            return np.zeros(0, dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _shard_slice(self, i: int, a: int, b: int) -> np.ndarray:
        size = self.dtype.itemsize
        if self.cache is not None:
            data = self.cache.read(self.files[i], a * size, b * size)
        else:
            if i not in self._fds:
                self._fds[i] = os.open(self.files[i].local_path, os.O_RDONLY)
            data = os.pread(self._fds[i], (b - a) * size, a * size)  # within the file: all of it
        return np.frombuffer(data, dtype=self.dtype)

    def __del__(self) -> None:
        for fd in self._fds.values():
            os.close(fd)

    def windows(self, starts: Iterable[int], length: int) -> np.ndarray:
        """Rows of `length` tokens from each start; S3 blocks are fetched in parallel first."""
        starts = [int(s) for s in starts]
        if self.cache is not None:
            size = self.dtype.itemsize
            self.cache.prefetch(
                (self.files[i], a * size, b * size) for s in starts for i, a, b in self._pieces(s, s + length)
            )
        if not starts:
            return np.zeros((0, length), dtype=self.dtype)
        return np.stack([self._read(s, s + length) for s in starts])


@dataclass
class PreparedDataset:
    uri: str
    manifest: dict
    train: TokenShards
    val: TokenShards

    @property
    def description(self) -> str:
        m, splits = self.manifest, self.manifest["splits"]
        docs = splits["train"]["documents"] + splits["val"]["documents"]
        return (
            f"{m['source']}: {docs} documents, {splits['train']['tokens']:,} train / "
            f"{splits['val']['tokens']:,} val tokens"
        )


def open_dataset(uri: str, cache: BlockCache | None = None) -> PreparedDataset:
    """A prepared dataset for reading by position (S3: through `cache`, a new one by default).
    Each shard's size is checked against the manifest (its checksum would mean reading it all)."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise DatasetError(f"{uri} is not a prepared dataset (no {MANIFEST}): run `moe-ray prepare` first")
    loc = Location(uri)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    if loc.is_s3:
        sizes = {o["Key"].rsplit("/", 1)[-1]: o["Size"] for o in s3.list_objects(loc)}
        cache = cache or BlockCache()
    else:
        sizes = {p.name: p.stat().st_size for p in loc.local_path.iterdir()}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if sizes.get(shard["file"]) != shard["tokens"] * dtype.itemsize:
                raise DatasetError(
                    f"{uri}: shard {shard['file']} is missing or has the wrong size: prepare the dataset again"
                )
    splits = {name: TokenShards(loc, manifest["splits"][name], dtype, cache) for name in SPLITS}
    return PreparedDataset(uri, manifest, splits["train"], splits["val"])
