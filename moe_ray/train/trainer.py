"""The single-process trainer: the reference the Ray runtime is checked against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moe_ray.balance import max_violation
from moe_ray.config import BalanceConfig, ModelConfig, TrainConfig
from moe_ray.data import TokenSplits, eval_windows, sample_windows, window_length
from moe_ray.model.transformer import MoETransformer
from moe_ray.train.evaluate import EvalResult, evaluate
from moe_ray.train.optim import build_optimizer
from moe_ray.train.step import LocalBias, StepResult, check_finite, train_step


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(
    model_cfg: ModelConfig,
    balance: BalanceConfig,
    seed: int,
    device: torch.device,
    local_experts: tuple[int, ...] | list[tuple[int, ...]] | None = None,
) -> MoETransformer:
    """Seeded construction: the same seed gives the same weights on every process, and an
    expert-parallel shard (`local_experts`) the same weights as those experts of the full model."""
    torch.manual_seed(seed)
    return MoETransformer(model_cfg, balance, local_experts).to(device)


@dataclass
class TrainSummary:
    steps: int
    final_loss: float
    val: EvalResult | None
    history: list[StepResult] = field(default_factory=list)
    evals: list[tuple[int, EvalResult]] = field(default_factory=list)

    @property
    def max_vio_batch(self) -> list[float]:
        """Mean-over-layers MaxVio_batch of every step."""
        return [float(max_violation(r.counts).mean()) for r in self.history]


class Trainer:
    def __init__(
        self,
        model_cfg: ModelConfig,
        balance: BalanceConfig,
        train: TrainConfig,
        data: TokenSplits,
        device: torch.device | None = None,
    ):
        self.model_cfg, self.balance, self.train_cfg, self.data = model_cfg, balance, train, data
        self.device = device or default_device()
        self.model = build_model(model_cfg, balance, train.seed, self.device)
        self.optimizer = build_optimizer(self.model, train)
        self.bias = LocalBias(self.model.get_expert_bias(), balance, train.steps)
        self.window = window_length(train.seq_len, model_cfg.mtp.depth)
        self.val_windows = [
            w.to(self.device) for w in eval_windows(data.val, self.window, train.batch_size, train.eval_batches)
        ]
        self.step = 0

    def batch(self, step: int) -> torch.Tensor:
        cfg = self.train_cfg
        return sample_windows(self.data.train, self.window, cfg.seed, step, 0, cfg.batch_size).to(self.device)

    def run_step(self) -> StepResult:
        result = train_step(self.model, self.optimizer, self.batch(self.step), self.step, self.train_cfg, self.bias)
        check_finite(self.step, result.loss, result.grad_norm, self.train_cfg)
        self.step += 1
        return result

    def evaluate(self) -> EvalResult:
        return evaluate(self.model, self.val_windows, self.train_cfg.precision)

    def fit(
        self,
        on_step: Callable[[StepResult], None] | None = None,
        on_eval: Callable[[int, EvalResult], None] | None = None,
    ) -> TrainSummary:
        cfg = self.train_cfg
        summary = TrainSummary(steps=cfg.steps, final_loss=float("nan"), val=None)
        while self.step < cfg.steps:
            result = self.run_step()
            summary.history.append(result)
            if on_step:
                on_step(result)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                ev = self.evaluate()
                summary.evals.append((self.step, ev))
                if on_eval:
                    on_eval(self.step, ev)
        summary.val = self.evaluate()
        summary.evals.append((self.step, summary.val))
        if on_eval:
            on_eval(self.step, summary.val)
        summary.final_loss = summary.history[-1].loss if summary.history else float("nan")
        return summary
