"""`moe-ray export`: a checkpoint (any worker count, local or S3) as a Hugging Face model folder
(local or S3)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_ray.hf import LayoutError
from moe_ray.hf.folder import upload_folder, write_folder
from moe_ray.hf.layout import require_exportable
from moe_ray.hf.tokenizer import byte_tokenizer_json, read_tokenizer_json, tokenizer_files
from moe_ray.inference import load_model, path_named_by
from moe_ray.storage.location import Location, refuse_occupied


@dataclass
class ExportResult:
    folder: str  # a local folder or an s3:// prefix
    checkpoint: str  # the one read: the one given, or a given run folder's newest
    step: int
    config: dict
    shards: int
    bytes: int


def export_checkpoint(
    checkpoint: str,
    out: str | Path,
    tokenizer: str | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 2**30,
    on_shard: Callable[[int, int], None] | None = None,
    on_upload: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write `checkpoint` in the glm4_moe layout to `out`: a new local folder, or an S3 prefix
    holding nothing (written locally first, then uploaded). `tokenizer`: the job's tokenizer.json,
    when it did not use byte tokens (moe-ray never opens a path a checkpoint names)."""
    out, dest = str(out), Location(str(out))
    refuse_occupied(out, LayoutError)  # before the checkpoint is read
    loaded = load_model(checkpoint, torch.device("cpu"))
    job = loaded.job
    require_exportable(job.model)  # before the tokenizer is read
    spec = path_named_by("tokenizer", job.data.tokenizer, tokenizer, "--tokenizer")
    text = byte_tokenizer_json() if spec == "bytes" else read_tokenizer_json(spec)
    provenance = {
        "exported_by": "moe-ray",
        "checkpoint": loaded.uri,
        "step": loaded.step,
        "job_name": job.name,
        "tokenizer": "bytes" if spec == "bytes" else "tokenizer.json",
    }
    # To S3: written to a local folder first, then uploaded.
    staging = tempfile.TemporaryDirectory(prefix="moe-ray-export-") if dest.is_s3 else contextlib.nullcontext()
    with staging as tmp:
        folder = Path(tmp) / "model" if tmp else Path(out)
        config = write_folder(
            loaded.model,
            folder,
            tokenizer_files(text, job.model.max_seq_len),
            provenance,
            dtype,
            max_shard_bytes,
            on_shard,
        )
        files = list(folder.glob("*.safetensors"))
        if dest.is_s3:
            upload_folder(folder, dest, on_upload)
        return ExportResult(out, loaded.uri, loaded.step, config, len(files), sum(f.stat().st_size for f in files))
