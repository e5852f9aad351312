"""Expert placement (DESIGN 5.3): which rank computes which global expert, and on which node.

Ranks are laid out as `dp_size` expert-parallel (EP) groups of `ep_size` consecutive ranks.
Within each EP group, EP rank i holds a block of experts; blocks differ in size by at most one
when `ep_size` does not divide the number of experts (so any worker count up to the number of
experts works: elastic runs and `moe-ray scale` need that). The same blocks are replicated in
every EP group.

`orders` (DESIGN 13) lists, per MoE layer, the global expert ids block after block: None gives
contiguous blocks in every layer (the default); a load-aware order (`balanced_order`) packs each
layer's experts so that every rank expects about the same number of tokens in that layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    n_experts: int
    ep_size: int
    node_of_rank: tuple[int, ...]  # node index (0 .. n_nodes - 1) of every rank, from the live worker set
    # Per MoE layer: global ids block after block; None: 0, 1, 2, ... in every layer.
    orders: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        for order in self.orders or ():
            if sorted(order) != list(range(self.n_experts)):
                raise ValueError(f"an expert order must list each of the {self.n_experts} experts once, got {order}")
        if self.world_size % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide the world size {self.world_size}")
        if self.ep_size > self.n_experts:
            raise ValueError(f"ep_size={self.ep_size} exceeds the number of experts {self.n_experts}")

    @classmethod
    def from_node_ids(cls, n_experts: int, ep_size: int, node_ids: list[str], orders=None) -> ExpertPlacement:
        """`node_ids[r]` is the Ray node id of rank r; nodes are numbered by first appearance."""
        index: dict[str, int] = {}
        nodes = tuple(index.setdefault(n, len(index)) for n in node_ids)
        orders = tuple(tuple(int(e) for e in o) for o in orders) if orders is not None else None
        return cls(n_experts=n_experts, ep_size=ep_size, node_of_rank=nodes, orders=orders)

    def expert_order(self, layer: int = 0) -> tuple[int, ...]:
        """MoE layer `layer`'s global ids, block after block."""
        return self.orders[layer] if self.orders is not None else tuple(range(self.n_experts))

    @property
    def contiguous(self) -> bool:
        return self.orders is None or all(o == tuple(range(self.n_experts)) for o in self.orders)

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

    def local_experts(self, rank: int, layer: int = 0) -> tuple[int, ...]:
        """The global ids `rank` holds in MoE layer `layer`, in the order its rows arrive."""
        sizes = self.block_sizes
        i = self.ep_rank(rank)
        first = sum(sizes[:i])
        return self.expert_order(layer)[first : first + sizes[i]]

    def held_experts(self, rank: int) -> tuple[int, ...] | list[tuple[int, ...]]:
        """What `build_model(local_experts=...)` takes: one set for every layer, or one per layer."""
        if self.orders is None:
            return self.local_experts(rank)
        return [self.local_experts(rank, layer) for layer in range(len(self.orders))]

    def owner(self, layer: int = 0) -> list[int]:
        """(n_experts,) the EP rank that holds each global expert id in MoE layer `layer`."""
        owner = [0] * self.n_experts
        for i in range(self.ep_size):
            for e in self.local_experts(i, layer):
                owner[e] = i
        return owner

    def expert_nodes(self, rank: int, layer: int = 0) -> torch.Tensor:
        """(n_experts,) node index of each global expert as `rank` reaches it (within its EP
        group) in MoE layer `layer`; the node groups of node-limited routing."""
        group = self.ep_group_ranks(rank)
        nodes = torch.tensor([self.node_of_rank[group[i]] for i in self.owner(layer)])
        # Renumber 0 .. k-1 so the router sees dense node ids.
        return torch.unique(nodes, return_inverse=True)[1]

    def rank_loads(self, counts: torch.Tensor) -> torch.Tensor:
        """Rows each EP rank receives: per-expert counts (n_experts,) for one layer or
        (layers, n_experts) for every MoE layer -> (ep_size,) or (layers, ep_size)."""
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.dim() == 1:
            return self.rank_loads(counts.unsqueeze(0))[0]
        out = torch.zeros(counts.shape[0], self.ep_size, dtype=torch.float64)
        for layer in range(counts.shape[0]):
            owner = torch.tensor(self.owner(layer if self.orders is not None else 0))
            out[layer].index_add_(0, owner, counts[layer])
        return out

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
            + ("" if self.contiguous else ", load-balanced placement")
        )


def balanced_orders(
    load: torch.Tensor, block_sizes: list[int], node_of_ep_rank: list[int] | None = None
) -> tuple[tuple[int, ...], ...]:
    """Per MoE layer, an expert order (block after block, `block_sizes` experts per EP rank) that
    evens the per-rank load of that layer: greedy, heaviest expert first, to the least-loaded rank
    with room left (every rank keeps its number of experts, so memory and GEMM shapes stay).

    `load`: (layers, n_experts) expected tokens per expert. With `node_of_ep_rank` (node-limited
    routing), experts only move between ranks of the node that holds them in the contiguous
    placement, so the node groups the router has learned stay the same."""
    load = torch.as_tensor(load, dtype=torch.float64)
    ep = len(block_sizes)
    nodes = node_of_ep_rank if node_of_ep_rank is not None else [0] * ep
    starts = [sum(block_sizes[:i]) for i in range(ep)]
    # Node of each expert in the contiguous placement: the node groups to keep.
    home = [nodes[i] for i in range(ep) for _ in range(block_sizes[i])]
    orders = []
    for layer_load in load.reshape(-1, load.shape[-1]):
        blocks: list[list[int]] = [[] for _ in range(ep)]
        totals = [0.0] * ep
        # Heaviest first; ties by id, so the result is a pure function of the load.
        for e in sorted(range(layer_load.shape[0]), key=lambda e: (-float(layer_load[e]), e)):
            room = [i for i in range(ep) if len(blocks[i]) < block_sizes[i] and nodes[i] == home[e]]
            i = min(room, key=lambda i: (totals[i], starts[i]))
            blocks[i].append(e)
            totals[i] += float(layer_load[e])
        orders.append(tuple(e for block in blocks for e in sorted(block)))
    return tuple(orders)
