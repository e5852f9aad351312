"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_ray.config import TrainConfig
from moe_ray.parallel.dtensor import is_dtensor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Norm gains and other vectors are not decayed; embeddings and weights are, and the
            # routers' weights unless `router_weight_decay` is off (decay shrinks the router's
            # scores, which makes a fixed bias step coarser as training goes on).
            router = name.endswith("router.weight")
            (decay if p.dim() >= 2 and (cfg.router_weight_decay or not router) else no_decay).append(p)
    # The fused kernel: one pass over each parameter and its moments (4x faster than the
    # per-tensor loop on the CPU), elementwise, so any sharding of a parameter gets the same bits.
    # One kernel call per group takes either sharded (DTensor, FSDP) or plain (expert) tensors,
    # not both: hence a group of each kind.
    groups = [
        {"params": [p for p in params if is_dtensor(p) == sharded], "weight_decay": wd}
        for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0))
        for sharded in (False, True)
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
