"""The load-balance study (DESIGN 3): the same model, data, seed and steps balanced by
(a) the loss-free bias, (b) the classic auxiliary loss (alpha 0.001 and 0.01), (c) nothing,
(d) the loss-free bias plus the sequence-wise loss (alpha 1e-4).

For each: validation loss, MaxVio_global (over the validation set) and MaxVio_batch over
training, as JSON lines; plots in --out: MaxVio_batch over steps, validation loss curves, and
per-layer expert-load heatmaps of every variant.

    python bench/balance_study.py [--quick | --tiny] [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from moe_ray.config import BalanceConfig  # noqa: E402
from moe_ray.data import builtin_corpus  # noqa: E402
from moe_ray.plots import load_heatmap  # noqa: E402
from moe_ray.spec import load_job  # noqa: E402
from moe_ray.system import tune_cpu_allocator  # noqa: E402
from moe_ray.train.trainer import Trainer  # noqa: E402

BENCH = "balance_study"
ROOT = Path(__file__).resolve().parent.parent
# Variant -> the job file whose `balance` section it uses: the same settings run on Ray as jobs.
VARIANTS = {
    "loss_free": "balance-loss-free",
    "aux_0.001": "balance-aux-loss-0.001",
    "aux_0.01": "balance-aux-loss",
    "none": "balance-none",
    "loss_free+seq_1e-4": "balance-loss-free-seq",
}


def variant_balance(job_name: str) -> BalanceConfig:
    return load_job(ROOT / "jobs" / f"{job_name}.yaml").balance


def settings(args) -> list[str]:
    if args.tiny:
        return [
            "train.steps=6",
            "train.batch_size=4",
            "train.seq_len=32",
            "train.eval_every=3",
            "train.eval_batches=1",
            "model.d_model=32",
            "model.n_heads=2",
            "model.n_layers=2",
            "model.moe.n_routed_experts=8",
            "model.moe.expert_hidden=16",
            "model.moe.top_k=2",
            "data.max_bytes=1000000",
        ]
    steps = args.steps or (100 if args.quick else 400)
    return [f"train.steps={steps}", f"train.eval_every={max(1, steps // 4)}", "train.eval_batches=8"]


def run_variant(job, balance: BalanceConfig, data) -> dict:
    trainer = Trainer(job.model, balance, job.train, data, torch.device("cpu"))
    summary = trainer.fit()
    return {
        "val_loss": summary.val.loss,
        "max_vio_global": summary.val.max_vio_global.tolist(),
        "max_vio_batch": summary.max_vio_batch,
        "val_curve": [(step, ev.loss) for step, ev in summary.evals],
        "counts": np.stack([r.counts.numpy() for r in summary.history]),
    }


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, r in results.items():
        ax.plot(r["max_vio_batch"], label=name, lw=1)
    ax.set(xlabel="step", ylabel="MaxVio_batch (mean over layers)", yscale="log", title="load balance during training")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "max_vio_batch.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, r in results.items():
        steps, losses = zip(*r["val_curve"], strict=True)
        ax.plot(steps, losses, marker="o", label=name)
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)", title="validation loss")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "val_loss.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    for name, r in results.items():
        steps = list(range(len(r["counts"])))
        paths.append(load_heatmap(steps, r["counts"], out / f"heatmap_{name}.png", title=f"expert load: {name}"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 steps")
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny model (tests)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "balance_study")
    args = parser.parse_args()
    tune_cpu_allocator()
    job = load_job(ROOT / "jobs" / "quickstart.yaml", settings(args))
    data = builtin_corpus(job.data.max_bytes)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, job_name in VARIANTS.items():
        r = results[name] = run_variant(job, variant_balance(job_name), data)
        vio = r["max_vio_global"]
        emit(BENCH, "val_loss", round(r["val_loss"], 4), variant=name, steps=job.train.steps)
        emit(BENCH, "max_vio_global", round(float(np.mean(vio)), 4), variant=name, per_layer=[round(v, 3) for v in vio])
        tail = r["max_vio_batch"][-max(1, len(r["max_vio_batch"]) // 10) :]
        emit(BENCH, "max_vio_batch_last10pct", round(float(np.mean(tail)), 4), variant=name)
    paths = plot(results, args.out)
    summary = {n: {k: v for k, v in r.items() if k != "counts"} for n, r in results.items()}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    emit(
        BENCH, "plots", [str(p.relative_to(args.out.parent)) if args.out.parent in p.parents else str(p) for p in paths]
    )


if __name__ == "__main__":
    main()
