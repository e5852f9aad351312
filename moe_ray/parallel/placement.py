"""Expert placement (DESIGN 5.3): which rank computes which global expert, and on which node.

Ranks are laid out as `dp_size` expert-parallel (EP) groups of `ep_size` consecutive ranks.
Within each EP group, EP rank i holds a contiguous block of experts; blocks differ in size by at
most one when `ep_size` does not divide the number of experts (so any worker count up to the
number of experts works: elastic runs and `moe-ray scale` need that). The same blocks are
replicated in every EP group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    n_experts: int
    ep_size: int
    node_of_rank: tuple[int, ...]  # node index (0 .. n_nodes - 1) of every rank, from the live worker set

    def __post_init__(self):
        if self.world_size % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide the world size {self.world_size}")
        if self.ep_size > self.n_experts:
            raise ValueError(f"ep_size={self.ep_size} exceeds the number of experts {self.n_experts}")

    @classmethod
    def from_node_ids(cls, n_experts: int, ep_size: int, node_ids: list[str]) -> ExpertPlacement:
        """`node_ids[r]` is the Ray node id of rank r; nodes are numbered by first appearance."""
        index: dict[str, int] = {}
        nodes = tuple(index.setdefault(n, len(index)) for n in node_ids)
        return cls(n_experts=n_experts, ep_size=ep_size, node_of_rank=nodes)

    @property
    def world_size(self) -> int:
        return len(self.node_of_rank)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def block_sizes(self) -> list[int]:
        """Experts held by each EP rank (the first n_experts % ep_size hold one more)."""
        base, extra = divmod(self.n_experts, self.ep_size)
        return [base + (1 if i < extra else 0) for i in range(self.ep_size)]

    @property
    def experts_per_rank(self) -> int:
        """The largest block (all blocks when ep_size divides the number of experts)."""
        return self.block_sizes[0]

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep_size

    def ep_group_ranks(self, rank: int) -> list[int]:
        """The ranks of `rank`'s expert-parallel group (together they hold every expert once)."""
        first = rank - self.ep_rank(rank)
        return list(range(first, first + self.ep_size))

    def replica_ranks(self, rank: int) -> list[int]:
        """The ranks holding the same experts as `rank` (one per EP group)."""
        return list(range(self.ep_rank(rank), self.world_size, self.ep_size))

    def local_experts(self, rank: int) -> range:
        sizes = self.block_sizes
        i = self.ep_rank(rank)
        first = sum(sizes[:i])
        return range(first, first + sizes[i])

    def expert_nodes(self, rank: int) -> torch.Tensor:
        """(n_experts,) node index of each expert as `rank` reaches it (within its EP group);
        the node groups of node-limited routing."""
        group = self.ep_group_ranks(rank)
        per_rank = torch.tensor([self.node_of_rank[r] for r in group])
        nodes = per_rank.repeat_interleave(torch.tensor(self.block_sizes))
        # Renumber 0 .. k-1 so the router sees dense node ids.
        return torch.unique(nodes, return_inverse=True)[1]

    def describe(self) -> str:
        n_nodes = len(set(self.node_of_rank))
        return (
            f"{self.n_experts} experts over {self.world_size} workers on {n_nodes} node(s): "
            f"EP {self.ep_size} x DP {self.dp_size}, "
            + (
                f"{self.experts_per_rank} experts per worker"
                if len(set(self.block_sizes)) == 1
                else f"{min(self.block_sizes)}-{self.experts_per_rank} experts per worker"
            )
        )
