"""The process groups of an EP x DP layout, created identically on every rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from moe_ray.parallel.placement import ExpertPlacement


@dataclass
class ParallelGroups:
    ep: object  # this rank's expert-parallel group (all-to-all)
    replicas: object | None  # ranks holding the same experts (expert-gradient all-reduce); None if dp == 1


def build_groups(placement: ExpertPlacement, rank: int) -> ParallelGroups:
    """Every rank must call this, in the same order: dist.new_group is collective."""
    world = dist.group.WORLD
    ep_group, replica_group = world, None
    if placement.ep_size < placement.world_size:
        for first in range(0, placement.world_size, placement.ep_size):
            g = dist.new_group(list(range(first, first + placement.ep_size)))
            if rank in range(first, first + placement.ep_size):
                ep_group = g
        for ep_rank in range(placement.ep_size):
            ranks = placement.replica_ranks(ep_rank)
            g = dist.new_group(ranks)
            if rank in ranks:
                replica_group = g
    return ParallelGroups(ep=ep_group, replicas=replica_group)
