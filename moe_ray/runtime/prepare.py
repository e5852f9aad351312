"""`moe-ray prepare`: raw text (text/JSONL/Parquet, local or s3://) to a prepared token dataset
(DESIGN 12), with Ray Data.

Ray Data reads the files in a fixed order and tokenises batches in parallel (`map_batches`);
one Ray task writes the shards in document order (every n-th document to the validation split,
an end-of-text token after each), so the same input gives byte-identical shards. That task runs
in the cluster and streams its progress back: the corpus never passes through the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import ray

from moe_ray.data import BYTE_VOCAB, DataError, builtin_corpus, eos_id
from moe_ray.hf.tokenizer import TOKENIZER  # the tokenizer's copy inside a dataset, as in an HF folder
from moe_ray.spec import DataConfig, absolute_path, data_with_absolute_paths
from moe_ray.storage import s3
from moe_ray.storage.location import Location
from moe_ray.storage.token_shards import (
    SHARD_TOKENS,
    DatasetError,
    DatasetWriter,
    check_new_location,
    token_dtype,
)
from moe_ray.storage.tokenizer_file import load_tokenizer, tokenizer_bytes, tokenizer_vocab

PROGRESS_EVERY_S = 0.5
TOKENIZE_BATCH = 4096  # documents per map_batches call (Ray Data's default was 3.8x slower here)


def text_format(cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    src = cfg.source.rstrip("/").lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"), (".txt", "text")):
        if src.endswith(ext):
            return fmt
    raise DataError(f"cannot tell the format of {cfg.source!r}: set data.format (--format) to text, jsonl or parquet")


@contextlib.contextmanager
def quiet_ray_data() -> Iterator[None]:
    """No Ray Data progress bars or per-dataset INFO lines: moe-ray prints its own summary."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = ctx.enable_progress_bars, logger.level
    ctx.enable_progress_bars = False
    logger.setLevel(logging.ERROR)  # also its "progress bars disabled" notice
    try:
        yield
    finally:
        ctx.enable_progress_bars, level = saved
        logger.setLevel(level)


def text_rate(text_bytes: int, seconds: float) -> str:
    """MB/s of text, with a figure that is not 0.0 for a small corpus."""
    rate = text_bytes / 1e6 / max(seconds, 1e-9)
    return f"{rate:.1f} MB/s" if rate >= 1 else f"{rate:.2g} MB/s"


def progress_line(p: dict) -> str:
    """One line about a prepare's progress (a progress item of `prepare`'s on_progress)."""
    return (
        f"{p['documents']:,} documents, {p['text_bytes'] / 1e6:,.1f} MB of text, {p['tokens']:,} tokens "
        f"({text_rate(p['text_bytes'], p['seconds'])})"
    )


def at_most_every(seconds: float, report: Callable[[dict], None]) -> Callable[[dict], None]:
    """`report`, passed on at most once per `seconds` (for log lines, where a live line cannot be)."""
    last = [time.monotonic()]

    def throttled(p: dict) -> None:
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            report(p)

    return throttled


def check_source(cfg: DataConfig, vocab_limit: int | None = None) -> None:
    """What can be known before reading: the source exists, its format, the tokenizer loads,
    has an end-of-text token and fits the model's vocabulary."""
    missing = (
        not s3.holds_anything(Location(cfg.source)) if cfg.source.startswith("s3://") else not Path(cfg.source).exists()
    )
    if missing:
        raise DataError(f"data.source {cfg.source!r} does not exist")
    text_format(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    eos_id(tokenizer)
    vocab = tokenizer_vocab(tokenizer)
    if vocab_limit is not None and vocab > vocab_limit:
        raise DataError(
            f"the tokenizer has {vocab} tokens but model.vocab_size is {vocab_limit}: raise model.vocab_size"
        )


def prepare(
    cfg: DataConfig,
    out: str,
    *,
    vocab_limit: int | None = None,
    on_progress: Callable[[dict], None] | None = None,
    shard_tokens: int = SHARD_TOKENS,
    clear_partial: bool = False,
    min_documents: int = 2,
) -> dict:
    """Prepare `cfg.source` (tokenised with `cfg.tokenizer`) into a dataset at `out`; returns its
    manifest. Bad input raises DataError before or while reading, and leaves no dataset.
    `min_documents`: 2 for training (a train and a validation split); 1 where every token is
    scored (eval's --data), which puts a single document in the validation split."""
    # As meant here: Ray's tasks run in another directory (on a cluster, where `ray start` ran).
    cfg, out = data_with_absolute_paths(cfg), absolute_path(out)
    if cfg.source == "builtin":
        return _prepare_builtin(cfg, out, shard_tokens, clear_partial)
    check_source(cfg, vocab_limit)
    try:
        if not clear_partial:
            check_new_location(out)
        if not ray.is_initialized():  # a quiet embedded Ray (the CLI's prepare and eval)
            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        stream = _prepare_task.options(num_returns="streaming").remote(
            cfg.model_dump(), out, shard_tokens, min_documents
        )
        try:
            for ref in stream:
                item = ray.get(ref)
                if "manifest" in item:
                    return item["manifest"]
                if on_progress:
                    on_progress(item)
        except KeyboardInterrupt:
            _cancel(stream)
            raise
    except (DatasetError, ray.exceptions.RayTaskError) as err:
        _raise_data_error(err)
        raise
    raise RuntimeError("the prepare task ended without a manifest")


def _cancel(stream, wait_s: float = 30.0) -> None:
    """Ctrl-C: stop the task as Ray stops a task on Ctrl-C (a KeyboardInterrupt inside it), so its
    writer removes what it staged; a killed task would leave a hidden half-written folder.
    Not recursive: cancelling the task's children as well crashed its worker (a Ray 2.60 check
    fails when the cancel meets Ray Data's stats actor being created) half the time, before the
    writer could clean up; the KeyboardInterrupt stops Ray Data's pipeline itself."""
    ray.cancel(stream, recursive=False)
    with contextlib.suppress(Exception):
        ray.get(stream.completed(), timeout=wait_s)


def _raise_data_error(err: BaseException) -> None:
    """Raise a plain DataError with the message of the first DataError or DatasetError in a chain
    of Ray's wrappers (Ray's copies print a traceback as their text: args[0] is the message, to
    which Ray Data appends lines about its retries: our messages are one line)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (DataError, DatasetError)):
            raise DataError(str(err.args[0] if err.args else err).split("\n")[0]) from None
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__


def _fields(cfg: DataConfig, vocab: int, eos: int, text_bytes: int, tok: bytes | None) -> dict:
    """The manifest's fields besides the splits; `tok`: the tokenizer.json (None: bytes)."""
    return {
        "source": cfg.source,
        "text_format": "builtin" if cfg.source == "builtin" else text_format(cfg),
        "text_field": cfg.text_field,
        "val_every_nth_doc": cfg.val_every_nth_doc,
        "max_bytes": cfg.max_bytes,
        "text_bytes": text_bytes,
        "tokenizer": {
            "spec": cfg.tokenizer,
            "file": None if tok is None else TOKENIZER,
            "sha256": None if tok is None else hashlib.sha256(tok).hexdigest(),
        },
        "vocab_size": vocab,
        "eos_id": eos,
    }


def _prepare_builtin(cfg: DataConfig, out: str, shard_tokens: int, clear_partial: bool) -> dict:
    """The built-in corpus, already split by file (see data.builtin_corpus), as one document per split."""
    if cfg.tokenizer != "bytes":
        raise DataError("the built-in corpus uses byte tokens: set data.tokenizer to 'bytes'")
    splits = builtin_corpus(cfg.max_bytes)
    try:
        writer = DatasetWriter(out, token_dtype(BYTE_VOCAB), shard_tokens, clear_partial)
    except DatasetError as err:
        raise DataError(str(err)) from None
    with writer:
        writer.splits["train"].add(splits.train)
        writer.splits["val"].add(splits.val)
        fields = _fields(cfg, BYTE_VOCAB, eos_id(None), len(splits.train) + len(splits.val), None)
        return writer.finish({**fields, "description": splits.description})


@lru_cache(maxsize=2)
def _tokenizer(spec: str):
    return load_tokenizer(spec)  # once per Ray Data worker process, not per batch


def _tokenize_batch(batch, field: str, tokenizer: str):
    """A batch of rows -> one row per non-empty document: its token ids (EOS appended, as the
    bytes of the dataset's dtype) and its text's UTF-8 size."""
    import pyarrow as pa

    if field not in batch.column_names:
        path = batch.column("path")[0].as_py() if "path" in batch.column_names and len(batch) else "?"
        columns = [c for c in batch.column_names if c != "path"]
        raise DataError(f"{path}: no field {field!r} (has {columns}); set data.text_field (--text-field)")
    tok = _tokenizer(tokenizer)
    eos = eos_id(tok)
    dtype = token_dtype(tokenizer_vocab(tok))
    texts = [t for t in batch.column(field).to_pylist() if t]
    if tok is None:
        encoded = [t.encode("utf-8") for t in texts]
        ids = [np.frombuffer(e + bytes([eos]), dtype=np.uint8).astype(dtype).tobytes() for e in encoded]
        sizes = [len(e) for e in encoded]
    else:
        ids = [np.asarray(e.ids + [eos], dtype=dtype).tobytes() for e in tok.encode_batch(texts)]
        sizes = [len(t.encode("utf-8")) for t in texts]
    return pa.table({"ids": pa.array(ids, pa.binary()), "text_bytes": pa.array(sizes, pa.int64())})


def _read_text(cfg: DataConfig):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same documents in the same order every time
    ctx.raise_original_map_exception = True  # our DataError, not a UserCodeException around it
    fmt, src, kwargs = text_format(cfg), cfg.source, {"include_paths": True}
    one_file = s3.exists(Location(src)) if src.startswith("s3://") else Path(src).is_file()
    if one_file:  # read as the format says, whatever its name; in a folder, the files named so
        kwargs["file_extensions"] = None
    if src.startswith("s3://"):
        kwargs["filesystem"] = Location(src).ray_storage()[1]
        src = src[5:]
    try:
        if fmt == "text":
            return ray.data.read_text(src, **kwargs), "text"
        if fmt == "jsonl":
            return ray.data.read_json(src, **kwargs), cfg.text_field  # pyarrow reads newline-delimited JSON
        return ray.data.read_parquet(src, columns=[cfg.text_field], **kwargs), cfg.text_field
    except ValueError as err:
        if "No input files found" not in str(err):
            raise
        names = "*.json or *.jsonl" if fmt == "jsonl" else "*.parquet"  # text: any name
        raise DataError(
            f"data.source {cfg.source!r}: no {fmt} files in the folder (in a folder, those named {names} are "
            "read): rename them to match"
        ) from None


# Retried if its node dies: a retry clears what the failed attempt wrote and starts over. No CPU
# reserved: it drives the pipeline, as a Ray Data driver does, and leaves the cores to the read
# and tokenise tasks (holding one made `prepare` 1.8x slower on 2 cores).
@ray.remote(num_cpus=0, max_retries=2)
def _prepare_task(cfg_dict: dict, out: str, shard_tokens: int, min_documents: int):
    try:
        yield from _prepare_stream(DataConfig.model_validate(cfg_dict), out, shard_tokens, min_documents)
    except Exception as err:
        _raise_data_error(err)  # with its own message, however deep Ray Data wrapped it
        raise


def _prepare_stream(cfg: DataConfig, out: str, shard_tokens: int, min_documents: int):
    tokenizer = _tokenizer(cfg.tokenizer)
    tokenizer_json = None if tokenizer is None else tokenizer_bytes(cfg.tokenizer)  # copied into the dataset
    vocab = tokenizer_vocab(tokenizer)
    nth = cfg.val_every_nth_doc
    start = last_report = time.monotonic()
    docs = text_bytes = 0

    def progress() -> dict:
        tokens = train.tokens + val.tokens
        return {"documents": docs, "text_bytes": text_bytes, "tokens": tokens, "seconds": time.monotonic() - start}

    with quiet_ray_data():
        ds, field = _read_text(cfg)
        ds = ds.map_batches(
            _tokenize_batch,
            fn_kwargs={"field": field, "tokenizer": cfg.tokenizer},
            batch_format="pyarrow",
            batch_size=TOKENIZE_BATCH,
        )
        with DatasetWriter(out, token_dtype(vocab), shard_tokens, clear_partial=True) as writer:
            train, val = writer.splits["train"], writer.splits["val"]
            held = None  # the latest train document: validation text if no document reaches the n-th
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for ids, size in zip(
                    batch.column("ids").to_pylist(), batch.column("text_bytes").to_pylist(), strict=True
                ):
                    doc = np.frombuffer(ids, dtype=writer.dtype)
                    if docs % nth == nth - 1:
                        val.add(doc)
                    else:
                        if held is not None:
                            train.add(held)
                        held = doc
                    docs += 1
                    text_bytes += size
                if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                    last_report = time.monotonic()
                    yield progress()
                if cfg.max_bytes is not None and text_bytes >= cfg.max_bytes:
                    break
            if docs < min_documents:
                need = "at least 2 (train + val)" if min_documents == 2 else f"at least {min_documents}"
                raise DataError(f"{cfg.source}: found {docs} non-empty document(s); need {need}")
            if held is None:
                raise DataError("val_every_nth_doc=1 puts every document in the validation split: raise it")
            (val if val.documents == 0 else train).add(held)
            if tokenizer_json is not None:
                writer.add_file(TOKENIZER, tokenizer_json)
            manifest = writer.finish(_fields(cfg, vocab, eos_id(tokenizer), text_bytes, tokenizer_json))
    yield progress()
    yield {"manifest": manifest}
