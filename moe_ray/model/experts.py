"""Expert FFNs: the dense SwiGLU (shared experts, dense layers) and the stacked routed experts
computed with grouped GEMMs over tokens sorted by expert (DESIGN 2.1, 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """One SwiGLU FFN. `N_s` shared experts are this with hidden `N_s * h_e`: one matmul, no loop.
    Gate and up projections are fused into one weight so the input is read once."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        hasattr(torch, "_grouped_mm")
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and w.dtype == x.dtype
        # Rows of both operands (and so of the output and the gradients) must be 16-byte aligned,
        # on the CPU too: a bf16 hidden size of 12 is refused there.
        and (x.shape[-1] * x.element_size()) % 16 == 0
        and (w.shape[-1] * w.element_size()) % 16 == 0
    )


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, use_grouped_mm: bool) -> torch.Tensor:
    """Rows of `x` are sorted by group; group g is rows [offsets[g-1], offsets[g]) times w[g].

    Uses `torch._grouped_mm` where it accepts the dtype/device, else a loop over non-empty groups.
    """
    if x.shape[0] == 0:
        # Still an autograd node over x and w: a rank with no tokens must take part in the
        # backward pass (and its collectives) like every other rank.
        return x @ w[0]
    if use_grouped_mm and _grouped_mm_supported(x, w):
        return _ContiguousGrad.apply(torch._grouped_mm(x.contiguous(), w, offs=offsets.to(torch.int32)))
    return _looped_matmul(x, w, offsets)


def _looped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    # split/unbind/cat rather than slicing and indexing: their backward passes are one cat or
    # stack, where per-group slices would each materialise a full-size zero gradient.
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    parts = [xs @ wg for xs, wg, n in zip(x.split(sizes), w.unbind(0), sizes, strict=True) if n]
    return torch.cat(parts)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense: the grouped-GEMM backward
    refuses the stride-0 (broadcast) gradients that e.g. `out.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _WeightedSwiGLU(torch.autograd.Function):
    """silu(gate) * up * w for h = [gate | up] and one weight w per row. Fused by hand: this
    memory-bound step makes as few passes over the rows as it can, and the backward writes
    one (rows, 2H) gradient instead of concatenating two halves."""

    @staticmethod
    def forward(ctx, h, w):
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate).mul_(up)
        ctx.save_for_backward(h, w, act)
        return act * w.unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad):
        h, w, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        half = gate.shape[-1]
        grad_w = torch.linalg.vecdot(grad, act) if ctx.needs_input_grad[1] else None
        grad_act = grad * w.unsqueeze(-1)
        grad_h = torch.empty_like(h)
        torch.mul(grad_act, F.silu(gate), out=grad_h[:, half:])
        torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=grad_h[:, :half])
        return grad_h, grad_w


def weighted_swiglu(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _WeightedSwiGLU.apply(h, w.to(h.dtype))


@torch.no_grad()
def init_per_expert(weight: torch.Tensor, expert_ids: tuple[int, ...], std: float) -> None:
    """Normal(0, std) init of stacked expert weights, each expert's slice from its own generator
    keyed by its GLOBAL id. A shard holding any set of experts gets exactly the slices that a model
    holding all experts gets, and draws the same one number from the global RNG, so the init of
    every other parameter does not depend on which experts a process holds."""
    seed = int(torch.randint(0, 2**62, (), device="cpu"))
    if weight.is_meta:
        return
    for i, expert in enumerate(expert_ids):
        g = torch.Generator().manual_seed(seed + expert)
        weight[i].copy_(torch.randn(weight.shape[1:], generator=g).mul_(std))


class GroupedExperts(nn.Module):
    """A shard of the routed experts of one layer, as stacked weights.

    Holds the experts with global ids `expert_ids`, stacked in that order (any set: a load-aware
    placement is not contiguous). Input rows must be sorted by local expert;
    `tokens_per_expert[e]` rows belong to local expert e, global id `expert_ids[e]`. Dropless: every
    row is computed, an expert with zero rows simply contributes nothing.

    `row_weights` (the gates) scale each row's hidden activation before the down projection:
    the same as scaling the output (w2 is linear) at half the width.
    """

    def __init__(self, d_model: int, hidden: int, expert_ids: tuple[int, ...]):
        super().__init__()
        self.expert_ids = tuple(expert_ids)
        self.n_experts = len(self.expert_ids)
        self.local_index = {e: i for i, e in enumerate(self.expert_ids)}  # global id -> slice
        self.hidden = hidden
        self.use_grouped_mm = True
        self.w13 = nn.Parameter(torch.empty(self.n_experts, d_model, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(self.n_experts, hidden, d_model))
        init_per_expert(self.w13, self.expert_ids, 0.02)
        init_per_expert(self.w2, self.expert_ids, 0.02)

    def forward(
        self, x: torch.Tensor, tokens_per_expert: torch.Tensor, row_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Computes in the dtype of `x`: the MoE layer hands in rows already in the autocast dtype,
        since `torch._grouped_mm` is not autocast-aware (fp32 weights would keep it in fp32)."""
        offsets = torch.cumsum(tokens_per_expert, dim=0)
        w13, w2 = self.w13.to(x.dtype), self.w2.to(x.dtype)
        h = grouped_matmul(x, w13, offsets, self.use_grouped_mm)
        if row_weights is None:
            row_weights = h.new_ones(h.shape[0])
        return grouped_matmul(weighted_swiglu(h, row_weights), w2, offsets, self.use_grouped_mm)
