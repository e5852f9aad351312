"""Ablations at equal active parameters and tokens (DESIGN 2): with vs without shared experts,
segmentation m=1 vs m=4, MTP on vs off (the main next-token loss), and MoE vs a dense model
with the same active parameters. Prints the validation loss of each side as JSON lines.

    python bench/ablations.py [--quick | --tiny] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from moe_ray.data import builtin_corpus  # noqa: E402
from moe_ray.model.transformer import MoETransformer  # noqa: E402
from moe_ray.spec import load_job  # noqa: E402
from moe_ray.system import tune_cpu_allocator  # noqa: E402
from moe_ray.train.trainer import Trainer  # noqa: E402

BENCH = "ablations"
ROOT = Path(__file__).resolve().parent.parent

# Each pair: (name, overrides A, overrides B). Active parameters match within each pair.
SEG = "model.moe.segmentation"
PAIRS = [
    (
        "shared_experts",
        ["model.moe.n_shared_experts=1", "model.moe.top_k=4"],
        ["model.moe.n_shared_experts=0", "model.moe.top_k=5"],
    ),
    (
        "segmentation",
        [
            f"{SEG}={{experts: 8, hidden: 256, top_k: 1, shared: 1, factor: 1}}",
            "model.moe.n_routed_experts=null",
            "model.moe.expert_hidden=null",
            "model.moe.top_k=null",
            "model.moe.n_shared_experts=null",
        ],
        [
            f"{SEG}={{experts: 8, hidden: 256, top_k: 1, shared: 1, factor: 4}}",
            "model.moe.n_routed_experts=null",
            "model.moe.expert_hidden=null",
            "model.moe.top_k=null",
            "model.moe.n_shared_experts=null",
        ],
    ),
    ("mtp", ["model.mtp.depth=1"], ["model.mtp.depth=0"]),
    ("moe_vs_dense", [], ["model.n_dense_layers=4"]),
]


def base(args) -> list[str]:
    if args.tiny:
        return [
            "train.steps=4",
            "train.batch_size=4",
            "train.seq_len=32",
            "train.eval_every=0",
            "train.eval_batches=1",
            "data.max_bytes=1000000",
        ]
    steps = args.steps or (100 if args.quick else 400)
    return [f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    tune_cpu_allocator()
    data = None
    for name, a, b in PAIRS:
        for side, overrides in (("a", a), ("b", b)):
            job = load_job(ROOT / "jobs" / "quickstart.yaml", base(args) + overrides)
            data = data or builtin_corpus(job.data.max_bytes)
            active = MoETransformer(job.model).parameter_counts()["active"]
            summary = Trainer(job.model, job.balance, job.train, data, torch.device("cpu")).fit()
            emit(
                BENCH,
                f"{name}.{side}.val_loss",
                round(summary.val.loss, 4),
                overrides=overrides,
                active_params=active,
                steps=job.train.steps,
            )


if __name__ == "__main__":
    main()
