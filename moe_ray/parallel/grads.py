"""Gradient all-reduce and global-norm clipping for an expert-parallel model.

Each rank scales its loss by its share of the global batch, so gradients are SUM-reduced:
dense parameters over all ranks, routed-expert parameters over the replicas of those experts.
The global norm counts every expert once (summed over one EP group) and every dense parameter
once, so clipping matches a single process that sees the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_ray.model.experts import GroupedExperts
from moe_ray.parallel.groups import ParallelGroups


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense parameters, routed-expert parameters), each in a fixed order."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    dense, expert = [], []
    for p in model.parameters():
        (expert if id(p) in expert_ids else dense).append(p)
    return dense, expert


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


class ExpertParallelGradients:
    def __init__(self, model: nn.Module, groups: ParallelGroups):
        self.dense, self.expert = split_parameters(model)
        self.groups = groups

    def sync(self, model: nn.Module) -> None:
        _all_reduce_coalesced(_grads(self.dense), dist.group.WORLD)
        if self.groups.replicas is not None:
            _all_reduce_coalesced(_grads(self.expert), self.groups.replicas)

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        dense, expert = _grads(self.dense), _grads(self.expert)
        zero = torch.zeros((), device=(dense + expert)[0].device)
        dense_sq = sum((g.float().pow(2).sum() for g in dense), zero)
        expert_sq = sum((g.float().pow(2).sum() for g in expert), zero.clone())
        dist.all_reduce(expert_sq, group=self.groups.ep)
        total = (dense_sq + expert_sq).sqrt()
        if max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for g in dense + expert:
                g.mul_(coef.to(g.device, g.dtype))
        return total
