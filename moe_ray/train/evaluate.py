"""The evaluation loop: validation loss and the expert counts accumulated over the set."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_ray.balance import max_violation
from moe_ray.model.transformer import MoETransformer
from moe_ray.train.step import autocast_context


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy of the trunk (nats per token)
    counts: torch.Tensor  # (n_moe_layers, n_experts) accumulated over the whole set

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def max_vio_global(self) -> torch.Tensor:
        """MaxVio_global per MoE layer (DESIGN 3.4)."""
        return max_violation(self.counts)


@torch.no_grad()
def evaluate(model: MoETransformer, windows: list[torch.Tensor], precision: str = "auto") -> EvalResult:
    was_training = model.training
    model.eval()
    total, rows, counts = 0.0, 0, None
    for window in windows:
        with autocast_context(window.device, precision):
            out = model.compute_loss(window)
        # Weighted by rows (all of one length): a smaller last batch counts for what it holds.
        total += out.lm_loss.item() * window.shape[0]
        rows += window.shape[0]
        counts = out.counts.cpu() if counts is None else counts + out.counts.cpu()
    model.train(was_training)
    return EvalResult(loss=total / max(1, rows), counts=counts)
