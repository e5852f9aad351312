"""Make a freshly built model one rank's part of the distributed model, from outside (torchtitan's
`parallelize` style): expert parallelism, then FSDP2 for the dense parts (or replicas of them)."""

from __future__ import annotations

import torch

from moe_ray.model.transformer import MoETransformer
from moe_ray.parallel.expert_parallel import apply_expert_parallel
from moe_ray.parallel.grads import GradientSync
from moe_ray.parallel.mesh import ParallelMesh
from moe_ray.parallel.placement import ExpertPlacement


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
        # Imported here: FSDP loads torch.distributed.tensor (~0.8 s of CPU per process here),
        # which a run without it never needs (dtensor.is_dtensor).
        from moe_ray.parallel.fsdp import apply_fsdp

        apply_fsdp(model, mesh, compute_dtype)
    return GradientSync(model, mesh, fsdp)
