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
        # CUDA kernels need 16-byte aligned rows.
        and (x.device.type == "cpu" or (x.shape[-1] * x.element_size()) % 16 == 0)
    )


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, use_grouped_mm: bool) -> torch.Tensor:
    """Rows of `x` are sorted by group; group g is rows [offsets[g-1], offsets[g]) times w[g].

    Uses `torch._grouped_mm` where it accepts the dtype/device, else a loop over non-empty groups.
    """
    if use_grouped_mm and _grouped_mm_supported(x, w):
        # The kernel refuses stride-0 (broadcast) inputs, which autograd can hand it.
        return torch._grouped_mm(x.contiguous(), w, offs=offsets.to(torch.int32))
    return _looped_matmul(x, w, offsets)


def _looped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[g]
        start = end
    return out


class GroupedExperts(nn.Module):
    """A shard of the routed experts of one layer, as stacked weights.

    Holds experts with global ids [first_expert, first_expert + n_experts). Input rows must be
    sorted by expert; `tokens_per_expert[e]` rows belong to local expert e. Dropless: every
    row is computed, an expert with zero rows simply contributes nothing.
    """

    def __init__(self, d_model: int, hidden: int, n_experts: int, first_expert: int = 0):
        super().__init__()
        self.n_experts = n_experts
        self.first_expert = first_expert
        self.hidden = hidden
        self.use_grouped_mm = True
        self.w13 = nn.Parameter(torch.empty(n_experts, d_model, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d_model))

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offsets = torch.cumsum(tokens_per_expert, dim=0)
        h = grouped_matmul(x, self.w13, offsets, self.use_grouped_mm)
        gate, up = h.chunk(2, dim=-1)
        return grouped_matmul(F.silu(gate) * up, self.w2, offsets, self.use_grouped_mm)
