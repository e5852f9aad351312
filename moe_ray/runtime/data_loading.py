"""Turn a job's data section into train/val token streams (DESIGN 5.4).

The built-in corpus needs nothing; user data (a local path or s3:// URI, file or folder) is read
with Ray Data in a fixed order, tokenised, and split by document (every n-th document is
validation text). This runs once per run, in a Ray task in the cluster (not in the driver,
which may be a laptop), and its arrays reach every worker through the object store, so all
workers see the identical stream whatever their number.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray

from moe_ray.data import TokenSplits, builtin_corpus
from moe_ray.spec import DataConfig
from moe_ray.storage import s3
from moe_ray.storage.location import Location


class DataError(Exception):
    """Data that cannot be used; the message says what to fix."""


def _format(cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    src = cfg.source.rstrip("/").lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"), (".txt", "text")):
        if src.endswith(ext):
            return fmt
    raise DataError(f"cannot tell the format of {cfg.source!r}: set data.format to text, jsonl or parquet")


@contextlib.contextmanager
def quiet_ray_data() -> Iterator[None]:
    """No Ray Data progress bars or per-dataset INFO lines: a run or eval prints one line of its
    own about what it read instead of a screenful per dataset."""
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


def read_documents(cfg: DataConfig) -> list[str]:
    with quiet_ray_data():
        return _read_documents(cfg)


def _read_documents(cfg: DataConfig) -> list[str]:
    import ray.data

    fmt = _format(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same documents in the same order every time
    src = cfg.source
    if not src.startswith("s3://") and not Path(src).exists():
        raise DataError(f"data.source {src!r} does not exist")
    kwargs = {}
    if src.startswith("s3://"):
        kwargs["filesystem"] = Location(src).ray_storage()[1]
        src = src[5:]
    if fmt == "text":
        ds = ray.data.read_text(src, **kwargs)
        field = "text"
    elif fmt == "jsonl":
        ds = ray.data.read_json(src, **kwargs)  # pyarrow reads newline-delimited JSON
        field = cfg.text_field
    else:
        ds = ray.data.read_parquet(src, columns=[cfg.text_field], **kwargs)
        field = cfg.text_field
    docs, total = [], 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
        if field not in batch.column_names:
            raise DataError(f"{cfg.source}: no field {field!r} (has {batch.column_names}); set data.text_field")
        for text in batch.column(field).to_pylist():
            if text:
                docs.append(text)
                total += len(text)
        if total >= cfg.max_bytes:
            break
    if len(docs) < 2:
        raise DataError(f"{cfg.source}: found {len(docs)} non-empty document(s); need at least 2 (train + val)")
    return docs


def load_tokenizer(spec: str):
    """None for byte-level tokens, else a `tokenizers.Tokenizer` from a tokenizer.json."""
    if spec == "bytes":
        return None
    from tokenizers import Tokenizer

    if spec.startswith("s3://"):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            f.write(s3.read_bytes(Location(spec)))
            f.flush()
            return Tokenizer.from_file(f.name)
    if not Path(spec).is_file():
        raise DataError(f"data.tokenizer {spec!r} is not a file (give a tokenizer.json, or 'bytes')")
    return Tokenizer.from_file(spec)


def tokenize(docs: list[str], tokenizer) -> list[np.ndarray]:
    if tokenizer is None:
        return [np.frombuffer((d + "\n").encode("utf-8"), dtype=np.uint8) for d in docs]
    ids = tokenizer.encode_batch(docs)
    return [np.asarray(e.ids, dtype=np.int32) for e in ids]


def load_in_cluster(cfg: DataConfig, vocab_size: int):
    """(an object ref of the run's TokenSplits, their description). The built-in corpus is read
    here (it is small and cached); user data is read and tokenised by a Ray task, so the driver
    never holds it. A DataError is raised here, with its message, before anything starts."""
    if cfg.source == "builtin":
        splits = load_token_splits(cfg, vocab_size)
        return ray.put(splits), splits.description
    splits_ref, description_ref = _load_task.remote(cfg.model_dump(), vocab_size)
    try:
        return splits_ref, ray.get(description_ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, DataError):
            raise DataError(str(err.cause)) from None
        raise


# Retried if its node dies; the result is rebuilt from the same files if its copy is lost.
@ray.remote(num_cpus=1, num_returns=2, max_retries=3)
def _load_task(cfg: dict, vocab_size: int) -> tuple[TokenSplits, str]:
    splits = load_token_splits(DataConfig.model_validate(cfg), vocab_size)
    return splits, splits.description


def _tokenized_documents(cfg: DataConfig, vocab_size: int) -> tuple[list[np.ndarray], type]:
    """Every document of a user source as token ids, and the dtype that holds them."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer is not None and tokenizer.get_vocab_size() > vocab_size:
        raise DataError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size is {vocab_size}: "
            "raise model.vocab_size"
        )
    return tokenize(read_documents(cfg), tokenizer), (np.uint8 if tokenizer is None else np.int32)


def _builtin(cfg: DataConfig) -> TokenSplits:
    if cfg.tokenizer != "bytes":
        raise DataError("the built-in corpus uses byte tokens: set data.tokenizer to 'bytes'")
    return builtin_corpus(cfg.max_bytes)


def load_whole(cfg: DataConfig, vocab_size: int) -> tuple[np.ndarray, str]:
    """ALL of a source as one token stream (for `moe-ray eval --data`): every document, no
    split, no `max_bytes` cap; and a line saying what was read."""
    if cfg.source == "builtin":
        splits = _builtin(cfg)
        tokens = np.concatenate([splits.train, splits.val])
        return tokens, f"builtin: the whole built-in corpus, {len(tokens):,} tokens"
    pieces, dtype = _tokenized_documents(cfg.model_copy(update={"max_bytes": 2**62}), vocab_size)
    tokens = np.concatenate(pieces).astype(dtype)
    return tokens, f"{cfg.source}: all {len(pieces)} documents, {len(tokens):,} tokens"


def load_token_splits(cfg: DataConfig, vocab_size: int) -> TokenSplits:
    if cfg.source == "builtin":
        return _builtin(cfg)
    pieces, dtype = _tokenized_documents(cfg, vocab_size)
    nth = cfg.val_every_nth_doc
    val_ids = {i for i in range(len(pieces)) if i % nth == nth - 1} or {len(pieces) - 1}
    val = [p for i, p in enumerate(pieces) if i in val_ids]
    train = [p for i, p in enumerate(pieces) if i not in val_ids]
    return TokenSplits(
        train=np.concatenate(train).astype(dtype),
        val=np.concatenate(val).astype(dtype),
        description=f"{cfg.source}: {len(pieces)} documents, {sum(map(len, train)):,} train / "
        f"{sum(map(len, val)):,} val tokens",
    )
