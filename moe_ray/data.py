"""Training data: the built-in corpus, byte-level tokens, and deterministic sampling (DESIGN 5.4).

The samples of step t are a pure function of (seed, t, global sample index): a worker that owns
sample indices [a, b) of a step draws exactly what any other world size would have drawn for
them, so a restart at step t with any number of workers sees the same data.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moe_ray.system import cache_dir

if TYPE_CHECKING:  # loaded where tensors are made: `moe-ray prepare` and its tasks need no torch
    import torch

BYTE_VOCAB = 256
BYTE_EOS = 10  # byte-level documents end with a newline
VAL_EVERY_NTH_FILE = 20  # every 20th file of the sorted list is validation text
# Names of the end-of-text token in common tokenizers, the first one found separates documents.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "<|im_end|>", "[SEP]")


class DataError(Exception):
    """Data that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class TokenSplits:
    """In-memory splits; a prepared dataset (`storage.token_shards`) has the same .train/.val."""

    train: np.ndarray  # 1-D token ids
    val: np.ndarray
    description: str


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library `.py` files, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@lru_cache(maxsize=2)
def builtin_corpus(max_bytes: int | None = None) -> TokenSplits:
    """The built-in corpus as byte tokens: no download, so the quickstart works offline.

    Reading ~2,000 files takes seconds, so the result is kept in the cache folder, keyed by the
    interpreter's version and standard-library path (its text never changes) and `max_bytes`.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    version = ".".join(map(str, sys.version_info[:3]))
    key = hashlib.sha256(f"{stdlib}|{version}|{max_bytes}|{VAL_EVERY_NTH_FILE}".encode()).hexdigest()[:16]
    path = cache_dir() / "corpus" / f"stdlib-{version}-{key}.npz"
    try:
        with np.load(path) as f:
            return TokenSplits(f["train"], f["val"], str(f["description"]))
    except (OSError, ValueError, KeyError):
        pass  # absent or unreadable: build it again
    splits = read_builtin_corpus(max_bytes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, train=splits.train, val=splits.val, description=splits.description)
        tmp.replace(path)  # atomic: a reader sees the old file or the whole new one
    except OSError:
        pass  # a read-only home: no cache, same corpus
    return splits


def read_builtin_corpus(max_bytes: int | None) -> TokenSplits:
    """Read the corpus from the standard library's files. Whole files go to one split (every
    VAL_EVERY_NTH_FILE-th file to validation) so that no validation text is also seen in training."""
    train, val = bytearray(), bytearray()
    files = stdlib_files()
    for i, path in enumerate(files):
        if max_bytes is not None and len(train) + len(val) >= max_bytes:
            break
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (val if i % VAL_EVERY_NTH_FILE == VAL_EVERY_NTH_FILE - 1 else train).extend(data)
    if len(files) >= VAL_EVERY_NTH_FILE and (not train or not val) and max_bytes is not None:
        # The first validation file is the VAL_EVERY_NTH_FILE-th: max_bytes stopped before it.
        needed = 1 + sum(p.stat().st_size for p in files[: VAL_EVERY_NTH_FILE - 1])
        raise DataError(
            f"data.max_bytes {max_bytes:,} is too small for the built-in corpus to have a validation split "
            f"(every {VAL_EVERY_NTH_FILE}th file): give at least {needed:,}, or leave it unset"
        )
    if not train or not val:
        raise DataError(f"no standard library sources found under {sysconfig.get_paths()['stdlib']}")
    version = ".".join(map(str, sys.version_info[:3]))
    return TokenSplits(
        train=np.frombuffer(bytes(train), dtype=np.uint8),
        val=np.frombuffer(bytes(val), dtype=np.uint8),
        description=f"python {version} stdlib: {len(train):,} train / {len(val):,} val bytes",
    )


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-mixed, platform-independent hash of uint64 values."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def sample_offsets(n_tokens: int, window: int, seed: int, step: int, sample_ids: np.ndarray) -> np.ndarray:
    """Start offsets of the windows for (seed, step, sample id); independent of who asks."""
    span = n_tokens - window + 1
    if span < 1:
        raise ValueError(f"the token stream ({n_tokens} tokens) is shorter than one window ({window})")
    with np.errstate(over="ignore"):
        key = _mix64(np.full_like(sample_ids, seed, dtype=np.uint64)) ^ _mix64(
            np.uint64(step) * np.uint64(0x9E3779B97F4A7C15) + sample_ids.astype(np.uint64)
        )
    return (_mix64(key) % np.uint64(span)).astype(np.int64)


def window_length(seq_len: int, mtp_depth: int) -> int:
    """Tokens per training window: seq_len inputs, the next token as the last one's target, and
    one more per multi-token prediction depth for its targets."""
    return seq_len + 1 + mtp_depth


def batch_share(batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first global sample index, count) of `rank`'s share of a global batch."""
    base, extra = divmod(batch_size, world_size)
    count = base + (1 if rank < extra else 0)
    first = rank * base + min(rank, extra)
    return first, count


def sample_windows(tokens: np.ndarray, window: int, seed: int, step: int, first: int, count: int) -> torch.Tensor:
    """Windows of `window` tokens for global sample ids first .. first + count - 1 of `step`."""
    ids = np.arange(first, first + count, dtype=np.uint64)
    return read_windows(tokens, sample_offsets(len(tokens), window, seed, step, ids), window)


def read_windows(tokens, starts: np.ndarray, window: int) -> torch.Tensor:
    """Rows of `window` tokens from each start, of an array or of a prepared split (which reads
    only those positions, fetching from S3 in parallel)."""
    if hasattr(tokens, "windows"):
        rows = tokens.windows(starts, window)
    else:
        rows = np.stack([tokens[s : s + window] for s in starts]) if len(starts) else np.zeros((0, window))
    import torch

    return torch.from_numpy(rows.astype(np.int64))


def batch_digest(windows: torch.Tensor) -> list[str]:
    """One short hash per sample (row): the global batch's digest is the list in sample order."""
    import hashlib

    return [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:12] for row in windows.cpu()]


def eval_windows(tokens: np.ndarray, window: int, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    """A fixed validation set: evenly spaced windows over the validation tokens."""
    total = batch_size * n_batches
    span = len(tokens) - window + 1
    if span < 1:
        raise ValueError(f"the validation text ({len(tokens)} tokens) is shorter than one window ({window})")
    starts = np.linspace(0, span - 1, total).astype(np.int64)
    return list(read_windows(tokens, starts, window).split(batch_size))


def tiling_windows(tokens: np.ndarray, seq_len: int, extra: int, batch_size: int) -> list[torch.Tensor]:
    """Windows of seq_len + extra tokens every seq_len tokens: each token after the first is
    predicted exactly once (the MTP modules read `extra` tokens more). A tail shorter than a
    window is left out."""
    window = seq_len + extra
    if len(tokens) < window:
        raise ValueError(
            f"the text ({len(tokens)} tokens) is shorter than one window of the model ({window} tokens: its "
            f"sequence length and its prediction targets): give at least {window} tokens of text"
        )
    starts = np.arange(0, len(tokens) - window + 1, seq_len)
    return list(read_windows(tokens, starts, window).split(batch_size))


def decode_bytes(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def encode_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def eos_id(tokenizer) -> int:
    """The token that ends each document."""
    if tokenizer is None:
        return BYTE_EOS
    for name in EOS_NAMES:
        token = tokenizer.token_to_id(name)
        if token is not None:
            return token
    raise DataError(
        f"the tokenizer has no end-of-text token (looked for {', '.join(EOS_NAMES)}): "
        "add one of them to it as a special token"
    )
