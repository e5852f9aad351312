"""Turn a full model into this rank's expert-parallel shard."""

from __future__ import annotations

import torch

from moe_ray.model.experts import GroupedExperts
from moe_ray.model.transformer import MoETransformer
from moe_ray.parallel.dispatch import ExpertParallelDispatcher
from moe_ray.parallel.groups import ParallelGroups
from moe_ray.parallel.placement import ExpertPlacement


@torch.no_grad()
def apply_expert_parallel(model: MoETransformer, placement: ExpertPlacement, rank: int, groups: ParallelGroups) -> None:
    """Keep only this rank's block of routed experts (copied from the full, seeded model so the
    initial weights equal a single process's) and route tokens by all-to-all. The routers learn
    which node hosts each expert, for node-limited routing."""
    local = placement.local_experts(rank)
    for layer in model.moe_layers():
        full = layer.experts
        shard = GroupedExperts(full.w13.shape[1], full.hidden, len(local), first_expert=local.start)
        shard.to(full.w13.device)
        shard.w13.copy_(full.w13[local.start : local.stop])
        shard.w2.copy_(full.w2[local.start : local.stop])
        shard.use_grouped_mm = full.use_grouped_mm
        layer.experts = shard
        layer.dispatcher = ExpertParallelDispatcher(groups.ep, placement.block_sizes, placement.ep_rank(rank))
        layer.router.set_expert_nodes(placement.expert_nodes(rank))
