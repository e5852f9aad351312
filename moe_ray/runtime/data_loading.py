"""Which prepared dataset a run reads, and the token streams that eval scores (DESIGN 12).

A job's data.source is a prepared dataset (used as is, once its tokenizer and vocabulary are
checked against the job) or raw text / the built-in corpus, prepared into the run's cache on
first use: `<checkpoint.storage>/<run>/data/<key>`, where a resume finds it again. Workers open
the dataset themselves and read their own windows by position; no tokens go through Ray's
object store.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from moe_ray.data import DataError, window_length
from moe_ray.runtime.prepare import check_source, prepare, quiet_ray_data, text_format
from moe_ray.spec import DataConfig, JobSpec, data_with_absolute_paths
from moe_ray.storage import s3
from moe_ray.storage.catalog import run_location
from moe_ray.storage.token_shards import DatasetError, PreparedDataset, open_dataset, read_manifest
from moe_ray.storage.tokenizer_file import tokenizer_bytes

__all__ = ["DataError", "check_data", "check_prepared", "check_windows", "eval_tokens", "quiet_ray_data", "run_dataset"]


def check_prepared(manifest: dict, cfg: DataConfig, vocab_size: int) -> None:
    """A prepared dataset fits the job: the same tokenizer, a vocabulary the model holds."""
    uri = cfg.source
    if manifest["vocab_size"] > vocab_size:
        raise DataError(
            f"the dataset {uri} has a vocabulary of {manifest['vocab_size']} tokens but model.vocab_size is "
            f"{vocab_size}: raise model.vocab_size"
        )
    theirs = manifest["tokenizer"]
    ours = None if cfg.tokenizer == "bytes" else hashlib.sha256(tokenizer_bytes(cfg.tokenizer)).hexdigest()
    if ours != theirs["sha256"]:
        fix = "'bytes'" if theirs["file"] is None else f"{uri.rstrip('/')}/{theirs['file']}"
        raise DataError(
            f"the dataset {uri} was tokenised with {theirs['spec']!r}, not with data.tokenizer "
            f"{cfg.tokenizer!r}: set data.tokenizer to {fix}"
        )


def check_windows(manifest: dict, job: JobSpec) -> None:
    """Each split holds one training window at least; found here, before any worker starts
    (in the workers it failed every restart of the group, then the run, as a bare ValueError)."""
    window = window_length(job.train.seq_len, job.model.mtp.depth)
    sizes = f"{window:,} tokens (train.seq_len {job.train.seq_len} + 1 + model.mtp.depth {job.model.mtp.depth})"
    fixes = {
        "train": "give more text, or lower train.seq_len",
        "val": f"give more text, lower data.val_every_nth_doc ({job.data.val_every_nth_doc}: every "
        "n-th document is validation text), or lower train.seq_len",
    }
    for split, name in (("train", "train"), ("val", "validation")):
        tokens = manifest["splits"][split]["tokens"]
        if tokens < window:
            raise DataError(
                f"data.source {job.data.source}: its {name} split holds {tokens:,} tokens, fewer than one "
                f"training window of {sizes}: {fixes[split]}"
            )


def _cache_key(cfg: DataConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def _prepared_source(cfg: DataConfig, vocab_size: int) -> dict | None:
    """The manifest when data.source is a prepared dataset (checked against the job), else None."""
    if cfg.source == "builtin":
        return None
    try:
        manifest = read_manifest(cfg.source)
    except DatasetError as err:
        raise DataError(str(err)) from None
    if manifest is not None:
        check_prepared(manifest, cfg, vocab_size)
    return manifest


def check_data(job: JobSpec) -> str:
    """For `moe-ray validate`: a line saying what the run will read. The data is checked against
    the job (DataError, or StorageError for S3 it cannot read); S3 data on a machine with no AWS
    credentials, and a local source that is not here, are left to the run, which checks them
    where it starts, with that machine's files and credentials."""
    cfg = job.data
    if cfg.source == "builtin":
        return "the built-in corpus, prepared into the run's folder on first use"
    if (cfg.source.startswith("s3://") or cfg.tokenizer.startswith("s3://")) and not s3.has_credentials():
        return f"{cfg.source} on S3, not checked here (no AWS credentials on this machine): checked when the run starts"
    if not cfg.source.startswith("s3://") and not Path(cfg.source).exists():
        return f"{cfg.source} is not on this machine: checked when the run starts"
    manifest = _prepared_source(cfg, job.model.vocab_size)
    if manifest is not None:
        check_windows(manifest, job)
        split = manifest["splits"]
        return f"prepared dataset, {split['train']['tokens']:,} train / {split['val']['tokens']:,} val tokens"
    check_source(cfg, job.model.vocab_size)
    return f"raw {text_format(cfg)} text, prepared into the run's folder on first use"


def run_dataset(job: JobSpec, run_name: str, on_progress=None) -> tuple[str, str]:
    """(the URI of the dataset the run reads, a line saying what it holds)."""
    cfg = data_with_absolute_paths(job.data)  # the workers and the prepare task run in other folders
    if _prepared_source(cfg, job.model.vocab_size) is not None:
        uri = cfg.source
    else:
        uri = str(run_location(job.checkpoint.storage, run_name).child("data", _cache_key(cfg)))
        if read_manifest(uri) is None:  # first use (a resume finds it)
            prepare(cfg, uri, vocab_limit=job.model.vocab_size, on_progress=on_progress, clear_partial=True)
    data = open_dataset(uri)
    check_windows(data.manifest, job)
    return uri, data.description


def eval_tokens(cfg: DataConfig, vocab_size: int, whole: bool) -> tuple[np.ndarray, str]:
    """Tokens to score: the validation split of cfg's data, or (whole) ALL of it, every document
    once with no cap; and a line saying what was read. Raw text is prepared into a temporary
    folder first, exactly as a run would read it."""
    if _prepared_source(cfg, vocab_size) is not None:
        return _eval_tokens(open_dataset(cfg.source), whole)
    if whole:
        # Everything in training order: with no n-th document, only the last one is "validation".
        cfg = cfg.model_copy(update={"val_every_nth_doc": 2**62, "max_bytes": None})
    with tempfile.TemporaryDirectory(prefix="moe-ray-eval-") as tmp:
        prepare(cfg, f"{tmp}/data", vocab_limit=vocab_size, min_documents=1 if whole else 2)
        return _eval_tokens(open_dataset(f"{tmp}/data"), whole)


def _eval_tokens(data: PreparedDataset, whole: bool) -> tuple[np.ndarray, str]:
    splits = data.manifest["splits"]
    if not whole:
        return data.val[:], f"{data.manifest['source']}: the validation split, {len(data.val):,} tokens"
    tokens = np.concatenate([data.train[:], data.val[:]])
    if data.manifest["text_format"] == "builtin":
        return tokens, f"builtin: the whole built-in corpus, {len(tokens):,} tokens"
    docs = splits["train"]["documents"] + splits["val"]["documents"]
    return tokens, f"{data.manifest['source']}: all {docs} documents, {len(tokens):,} tokens"
