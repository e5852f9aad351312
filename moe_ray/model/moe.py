"""The DeepSeekMoE layer: router, shared experts, routed experts and the token dispatcher.

h = u + shared(u) + sum_i g_i * routed_i(u)   (the residual is added by the block; DESIGN 2.1)

Tokens are permuted so that each expert's rows are contiguous (stable sort by the experts'
order: global id, unless a load-aware expert placement set another order so that every rank's
experts are one run of rows), handed to a dispatcher that gets them to their experts and back,
then scaled by the gates and scattered back to their tokens. The default dispatcher runs every
expert in this process; the expert-parallel one (moe_ray.parallel.dispatch) sends rows to the
ranks that own their experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from moe_ray.balance import balance_loss
from moe_ray.config import BalanceConfig, ModelConfig
from moe_ray.model.experts import GroupedExperts, SwiGLU
from moe_ray.model.permutation import combine_rows, gather_rows, inverse_permutation
from moe_ray.model.router import Router


class TokenDispatcher(Protocol):
    def __call__(
        self,
        rows: torch.Tensor,
        gates: torch.Tensor,
        counts: torch.Tensor,
        experts: GroupedExperts,
        overlap: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """rows: (R, d) sorted by expert in the layer's expert order, gates: (R,) their gate
        weights, counts: (n_routed_experts,) rows per expert in that order. Returns the
        gate-weighted expert outputs for the same rows, in the same order, and `overlap()`: work
        that needs none of the routed rows (the shared experts), which a dispatcher that
        communicates computes while the rows are in flight."""
        ...


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes matmuls in here, or x's own dtype outside autocast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class LocalDispatcher:
    """Every routed expert lives in this process."""

    def __call__(self, rows, gates, counts, experts, overlap=None):
        return experts(rows, counts, gates), (overlap() if overlap is not None else None)


@dataclass
class MoEStats:
    counts: torch.Tensor  # (n_routed_experts,) tokens per expert in this forward pass
    balance_loss: torch.Tensor | None
    max_nodes: torch.Tensor | None = None  # 0-dim: most nodes any token's experts sat on (multi-node only)


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, balance: BalanceConfig, local_experts: tuple[int, ...] | None = None):
        """`local_experts`: the global ids of the routed experts this process holds (default all)."""
        super().__init__()
        moe = cfg.moe
        local = tuple(range(moe.n_routed_experts) if local_experts is None else local_experts)
        self.balance = balance
        self.top_k = moe.top_k
        self.n_experts = moe.n_routed_experts
        self.router = Router(cfg.d_model, moe)
        self.shared = SwiGLU(cfg.d_model, moe.n_shared_experts * moe.expert_hidden) if moe.n_shared_experts else None
        self.experts = GroupedExperts(cfg.d_model, moe.expert_hidden, local)
        self.dispatcher: TokenDispatcher = LocalDispatcher()
        # The order rows are sorted in: slot -> global id, and back (None: global id order).
        self.expert_order: torch.Tensor | None = None
        self.slot_of_expert: torch.Tensor | None = None

    def set_expert_order(self, order: tuple[int, ...]) -> None:
        """Sort rows by `order` (a permutation of the global ids) rather than by id: what a
        non-contiguous expert placement needs so that each rank's experts are one run of rows."""
        if sorted(order) != list(range(self.n_experts)):
            raise ValueError(f"an expert order must list each of the {self.n_experts} experts once, got {order}")
        if list(order) == list(range(self.n_experts)):
            self.expert_order = self.slot_of_expert = None
            return
        device = self.router.weight.device
        self.expert_order = torch.tensor(order, device=device)
        self.slot_of_expert = torch.empty_like(self.expert_order)
        self.slot_of_expert[self.expert_order] = torch.arange(self.n_experts, device=device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r = self.router(flat)  # fp32 inside, whatever the autocast
        slots = r.indices.flatten() if self.slot_of_expert is None else self.slot_of_expert[r.indices.flatten()]
        order = torch.argsort(slots, stable=True)
        inverse = inverse_permutation(order)
        # Routed rows travel and compute in the autocast dtype (bf16 on GPU): half the bytes in
        # the all-to-all, and grouped GEMMs at bf16 speed.
        rows = gather_rows(flat.to(compute_dtype(flat)), order, inverse, self.top_k)
        shared = (lambda: self.shared(flat)) if self.shared is not None else None
        counts = r.counts if self.expert_order is None else r.counts[self.expert_order]
        rows, shared_out = self.dispatcher(rows, r.gates.flatten()[order], counts, self.experts, shared)
        out = combine_rows(rows, order, inverse, self.top_k)
        if shared_out is not None:
            out = out + shared_out
        loss = None
        if self.training:
            batch_shape = (shape[0], shape[1]) if len(shape) == 3 else (1, flat.shape[0])
            loss = balance_loss(self.balance, r.scores, r.logits, r.indices, r.counts, self.top_k, batch_shape)
        return out.view(shape).to(x.dtype), MoEStats(counts=r.counts, balance_loss=loss, max_nodes=r.max_nodes)
