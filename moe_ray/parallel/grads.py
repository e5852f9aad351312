"""Gradient reduction and global-norm clipping for an expert-parallel model, dense parts
replicated or FSDP-sharded.

Each rank scales its loss by its share of the global batch, so gradients are SUM-reduced: dense
parameters over all ranks, routed-expert parameters over the replicas of those experts. With FSDP
the reduction happens inside the backward pass (reduce-scatter, overlapped with compute); in the
replicated mode `sync` all-reduces after it. The global norm counts every element once, so
clipping matches a single process that sees the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_ray.model.experts import GroupedExperts
from moe_ray.parallel.dtensor import is_dtensor
from moe_ray.parallel.mesh import ParallelMesh


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense parameters, routed-expert parameters), each in a fixed order."""
    expert_ids = {id(p) for p in expert_parameters(model)}
    dense, expert = [], []
    for p in model.parameters():
        (expert if id(p) in expert_ids else dense).append(p)
    return dense, expert


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()]


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:  # an unused parameter still takes part, as zeros
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _all_reduce_coalesced(grads: list[torch.Tensor], group) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The elements of `t` this rank holds: its shard of a DTensor (no copy), or `t` itself."""
    return t.to_local() if is_dtensor(t) else t


class GradientSync:
    def __init__(self, model: nn.Module, mesh: ParallelMesh, fsdp: bool):
        self.dense, self.expert = split_parameters(model)
        self.mesh, self.fsdp = mesh, fsdp

    def sync(self, model: nn.Module) -> None:
        """Replicated dense parts: all-reduce now. FSDP: already reduced during backward."""
        if self.fsdp:
            return
        _all_reduce_coalesced(_grads(self.dense), dist.group.WORLD)
        if self.mesh.replicas is not None:
            _all_reduce_coalesced(_grads(self.expert), self.mesh.replicas)

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global gradient norm (and clipping to `max_norm` when > 0). Each rank sums the squares of
        the elements it holds, divided by how many ranks hold a copy of them, and one all-reduce
        adds the ranks up: every element counts once."""
        world, replicas = dist.get_world_size(), self.mesh.edp.size()
        held = [(_local(g), 1 if is_dtensor(g) else world) for g in _grads(self.dense)]
        held += [(_local(g), 1 if is_dtensor(g) else replicas) for g in _grads(self.expert)]
        total = torch.zeros((), device=held[0][0].device, dtype=torch.float32)
        for g, copies in held:
            total += g.float().pow(2).sum() / copies
        dist.all_reduce(total)
        total = total.sqrt()
        if max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for g, _ in held:
                g.mul_(coef.to(g.dtype))
        return total
