"""Make a freshly built model one rank's part of the distributed model, from outside (torchtitan's
`parallelize` style): expert parallelism, then FSDP2 for the dense parts (or replicas of them)."""

from __future__ import annotations

import torch

from moe_ray.model.transformer import MoETransformer
from moe_ray.parallel.expert_parallel import apply_expert_parallel
from moe_ray.parallel.fsdp import apply_fsdp
from moe_ray.parallel.grads import GradientSync
from moe_ray.parallel.mesh import ParallelMesh
from moe_ray.parallel.placement import ExpertPlacement

# Below this much replicated dense training state per worker (fp32 weights, gradients and AdamW
# moments: 16 bytes a parameter), "auto" replicates: FSDP's gathers cost more than they save there
# (bench/gpu.py, bench/memory.py: 2.2x the step time of the quickstart on an H100, 1.4x on CPU).
AUTO_FSDP_BYTES = 2**30


def shards_dense(setting: str, dense_params: int) -> bool:
    """Whether the dense parts are FSDP-sharded: `resources.dense_parallel` resolved."""
    if setting == "auto":
        return 16 * dense_params >= AUTO_FSDP_BYTES
    return setting == "fsdp"


def parallelize(
    model: MoETransformer,
    placement: ExpertPlacement,
    rank: int,
    mesh: ParallelMesh,
    *,
    fsdp: bool,
    compute_dtype: torch.dtype | None = None,
) -> GradientSync:
    """Apply the layout in place; returns what reduces and clips the gradients of each step. Build
    the optimizer afterwards: FSDP replaces the parameters by their shards."""
    apply_expert_parallel(model, placement, rank, mesh)
    if fsdp:
        apply_fsdp(model, mesh, compute_dtype)
    return GradientSync(model, mesh, fsdp)
