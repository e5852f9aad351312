"""`moe-ray export`: a checkpoint (any worker count, local or S3) as a Hugging Face model folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_ray.hf.folder import write_folder
from moe_ray.hf.layout import require_exportable
from moe_ray.hf.tokenizer import byte_tokenizer_json, read_tokenizer_json, tokenizer_files
from moe_ray.inference import load_model, path_named_by


@dataclass
class ExportResult:
    folder: Path
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
) -> ExportResult:
    """Write `checkpoint` to the new folder `out` in the glm4_moe layout. `tokenizer`: the job's
    tokenizer.json, when it did not use byte tokens (moe-ray never opens a path a checkpoint names)."""
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
    config = write_folder(
        loaded.model,
        Path(out),
        tokenizer_files(text, job.model.max_seq_len),
        provenance,
        dtype,
        max_shard_bytes,
        on_shard,
    )
    files = list(Path(out).glob("*.safetensors"))
    return ExportResult(Path(out), loaded.uri, loaded.step, config, len(files), sum(f.stat().st_size for f in files))
