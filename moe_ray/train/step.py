"""One optimizer step, shared by the single-process trainer and the Ray expert workers.

Order (DESIGN 5.2): forward -> hand the per-layer expert counts to the bias source (without
waiting) -> backward -> gradient sync -> clip -> optimizer step -> install the bias for the
next step. The distributed runtime plugs in its own bias source, gradient sync and norm.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from moe_ray.balance import next_bias
from moe_ray.config import BalanceConfig, TrainConfig
from moe_ray.model.transformer import MoETransformer
from moe_ray.train.optim import lr_at, set_lr


class BiasSource(Protocol):
    def submit(self, step: int, counts: torch.Tensor) -> None:
        """Counts (n_moe_layers, n_experts) of this process's forward pass of `step`."""

    def next_bias(self, step: int) -> torch.Tensor:
        """The bias to route step + 1 with; called after the optimizer step of `step`."""


class LocalBias:
    """Single process: the local counts ARE the global counts, so apply rule 3.1 directly."""

    def __init__(self, bias: torch.Tensor, balance: BalanceConfig, total_steps: int):
        self.bias = bias.clone()
        self.balance = balance
        self.total_steps = total_steps

    def submit(self, step: int, counts: torch.Tensor) -> None:
        self.bias = next_bias(self.balance, self.bias, counts.to(self.bias.device), step, self.total_steps)

    def next_bias(self, step: int) -> torch.Tensor:
        return self.bias


@dataclass
class StepResult:
    step: int
    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    counts: torch.Tensor  # this process's (n_moe_layers, n_experts) counts
    max_nodes: int | None = None  # most nodes any token reached (node-aware routing only)
    # Host seconds of the step's phases (STEP_PHASES); on a GPU, where the host waited.
    times: dict[str, float] = field(default_factory=dict)


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm is not finite: its optimizer step has put NaN or Inf into
    the weights, and every later step would train on them."""


def check_finite(step: int, loss: float, grad_norm: float, cfg: TrainConfig) -> None:
    """Raise TrainingDiverged for a non-finite loss or gradient norm of `step` (0-based). The
    caller checks before it writes a checkpoint of the step, so the newest one is still sound."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    raise TrainingDiverged(
        f"training diverged at step {step + 1}: loss {loss:.6g}, gradient norm {grad_norm:.6g}. Lower train.lr "
        f"({cfg.lr:g}), lengthen train.warmup_steps ({cfg.warmup_steps}) or clip harder (train.grad_clip, "
        f"{cfg.grad_clip:g}); then go on from the run's newest checkpoint, which is of before this step "
        "(--resume with --set), or start anew"
    )


# The phases of a step, in order. forward and backward include the time blocked in the
# dispatcher's all-to-alls (reported apart as dispatch_wait by the runtime); grad_reduce is the
# gradient sync after backward (FSDP reduces during backward); coordinator_wait is the bias for
# the next step.
STEP_PHASES = ("forward", "backward", "grad_reduce", "optimizer", "coordinator_wait")


def compute_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on GPU when precision is auto or bf16, and on CPU when it is bf16; else None (fp32)."""
    if precision == "bf16" or (device.type == "cuda" and precision == "auto"):
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, precision: str):
    """Autocast to the compute dtype (master weights stay fp32), or nothing for fp32."""
    dtype = compute_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else torch.zeros(())


def train_step(
    model: MoETransformer,
    optimizer: torch.optim.Optimizer,
    window: torch.Tensor,
    step: int,
    cfg: TrainConfig,
    bias: BiasSource,
    *,
    loss_scale: float = 1.0,
    sync_gradients: Callable[[nn.Module], None] | None = None,
    clip: Callable[[nn.Module, float], torch.Tensor] = clip_gradients,
) -> StepResult:
    """`loss_scale` is 1 / world size in data-parallel runs, so gradients are SUM-reduced."""
    marks = [time.perf_counter()]
    model.train()
    lr = lr_at(step, cfg)
    set_lr(optimizer, lr)
    device = window.device
    with autocast_context(device, cfg.precision):
        out = model.compute_loss(window)
    marks.append(time.perf_counter())
    bias.submit(step, out.counts.detach())
    (out.loss * loss_scale).backward()
    marks.append(time.perf_counter())
    if sync_gradients is not None:
        sync_gradients(model)
    marks.append(time.perf_counter())
    grad_norm = clip(model, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    marks.append(time.perf_counter())
    model.set_expert_bias(bias.next_bias(step))
    marks.append(time.perf_counter())
    # One host read for all the step's numbers: scalars and this process's counts together.
    counts = out.counts.detach()
    max_nodes = out.max_nodes if out.max_nodes is not None else torch.zeros((), device=device)
    scalars = torch.stack([out.loss, out.lm_loss, out.mtp_loss, out.balance_loss, grad_norm, max_nodes]).double()
    host = torch.cat([scalars, counts.flatten().double()]).tolist()
    loss, lm_loss, mtp_loss, balance_loss, norm, nodes = host[:6]
    return StepResult(
        step=step,
        loss=loss,
        lm_loss=lm_loss,
        mtp_loss=mtp_loss,
        balance_loss=balance_loss,
        grad_norm=norm,
        lr=lr,
        tokens=window.shape[0] * (window.shape[1] - 1 - model.cfg.mtp.depth),
        seconds=time.perf_counter() - marks[0],
        counts=torch.tensor(host[6:], dtype=counts.dtype).view(counts.shape),
        max_nodes=None if out.max_nodes is None else int(nodes),
        times=dict(zip(STEP_PHASES, (b - a for a, b in zip(marks, marks[1:], strict=False)), strict=True)),
    )
