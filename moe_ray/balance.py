"""Load balancing (DESIGN 3): the loss-free bias rule, the balance losses and MaxVio.

Everything here is a pure function of tensors, so the single-process trainer, the Ray
coordinator and the benchmarks share one implementation.
"""

from __future__ import annotations

import torch

from moe_ray.config import BalanceConfig


def bias_update_speed(cfg: BalanceConfig, step: int, total_steps: int) -> float:
    """gamma for `step` (0-based): constant, then 0 for the final `bias_freeze_fraction` of training."""
    if cfg.method != "loss_free":
        return 0.0
    freeze_at = total_steps * (1.0 - cfg.bias_freeze_fraction)
    return cfg.bias_update_speed if step < freeze_at else 0.0


def update_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float, policy: str = "sign") -> torch.Tensor:
    """One step of the bias controller over the last dimension (DESIGN 3.1, 13).

    `counts` are the GLOBAL counts of one step (all micro-batches, all replicas); works on one
    layer (experts,) or a stack (layers, experts).
      sign:          b_i <- b_i + gamma * sign(c_mean - c_i)             (the paper's rule)
      proportional:  b_i <- b_i + gamma * clip((c_mean - c_i) / c_mean, -1, 1)
    The proportional step shrinks with the load error, so near balance the bias moves by the
    sampling noise of the counts times gamma instead of a full gamma every step (the sign rule's
    limit cycle), while a far-off expert still moves by up to gamma."""
    counts = counts.to(torch.float64)
    mean = counts.mean(dim=-1, keepdim=True)
    if policy == "sign":
        step = torch.sign(mean - counts)
    elif policy == "proportional":
        step = ((mean - counts) / mean.clamp_min(1e-12)).clamp(-1.0, 1.0)
    else:
        raise ValueError(f"unknown balance.policy {policy!r}: use sign or proportional")
    return bias + (gamma * step).to(bias.dtype)


def next_bias(
    cfg: BalanceConfig, bias: torch.Tensor, counts: torch.Tensor, step: int, total_steps: int
) -> torch.Tensor:
    """The bias for step + 1 from the global counts of `step`: the job's policy at the scheduled gamma."""
    return update_bias(bias, counts, bias_update_speed(cfg, step, total_steps), cfg.policy)


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i c_i - mean c) / mean c over the last dimension (DESIGN 3.4)."""
    counts = counts.to(torch.float64)
    mean = counts.mean(dim=-1)
    return (counts.max(dim=-1).values - mean) / mean.clamp_min(1e-12)


def normalized_scores(scores: torch.Tensor) -> torch.Tensor:
    """s' = s / sum_j s_j (sigmoid scores do not sum to one; softmax scores already do)."""
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)


def selection_mask(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """One-hot of the selected experts: (..., top_k) ids -> (..., n_experts) of 0/1 floats."""
    mask = torch.zeros(*indices.shape[:-1], n_experts, device=indices.device)
    return mask.scatter_(-1, indices, 1.0)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, top_k: int, alpha: float) -> torch.Tensor:
    """Complementary sequence-wise balance loss (DESIGN 3.2), averaged over sequences.

    scores: (batch, T, N_r) affinities; indices: (batch, T, K_r) selected experts.
    f_i = N_r / (K_r T) * sum_t 1[i selected for t];  P_i = mean_t s'_{i,t};  L = alpha sum_i f_i P_i.
    """
    n_experts, seq_len = scores.shape[-1], scores.shape[-2]
    f = selection_mask(indices, n_experts).sum(dim=-2) * (n_experts / (top_k * seq_len))
    p = normalized_scores(scores).mean(dim=-2)
    return alpha * (f * p).sum(dim=-1).mean()


def aux_balance_loss(scores: torch.Tensor, counts: torch.Tensor, top_k: int, alpha: float) -> torch.Tensor:
    """Classic Switch/GShard auxiliary loss over the batch: alpha * N_r * sum_i f_i P_i, with f_i
    the fraction of routed slots given to expert i and P_i its mean normalised score."""
    scores = scores.reshape(-1, scores.shape[-1])
    n_experts, tokens = scores.shape[-1], scores.shape[0]
    f = counts.to(scores.dtype) / (tokens * top_k)
    p = normalized_scores(scores).mean(dim=0)
    return alpha * n_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean(logsumexp(logits)^2): keeps router logits small (ST-MoE)."""
    return alpha * torch.logsumexp(logits.float(), dim=-1).square().mean()


def balance_loss(
    cfg: BalanceConfig,
    scores: torch.Tensor,
    logits: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    top_k: int,
    batch_shape: tuple[int, int],
) -> torch.Tensor | None:
    """Sum of the balance losses that `cfg` switches on for one MoE layer, or None."""
    terms = []
    if cfg.method == "aux_loss" and cfg.aux_loss_alpha > 0:
        terms.append(aux_balance_loss(scores, counts, top_k, cfg.aux_loss_alpha))
    if cfg.seq_aux_alpha > 0:
        b, t = batch_shape
        terms.append(sequence_balance_loss(scores.view(b, t, -1), indices.view(b, t, -1), top_k, cfg.seq_aux_alpha))
    if cfg.z_loss_alpha > 0:
        terms.append(router_z_loss(logits, cfg.z_loss_alpha))
    return sum(terms) if terms else None
