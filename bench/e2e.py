"""End to end against a dense model (DESIGN 14): the quickstart MoE model and a dense model of
equal active parameters (every layer a SwiGLU of (top_k + shared) x expert_hidden) trained
through the same Ray trainer, same workers, data, steps and tokens, in one run.

    python bench/e2e.py [--quick] [--steps N]

moe_over_dense_tokens_per_s   the MoE run's step time over the dense run's (median step, after
                              warm-up): how much longer the same tokens take (target <= 1.2)
val_loss_moe, val_loss_dense  validation loss of each at the end (same validation windows)
step_breakdown_moe / _dense   median step time (ms) and its breakdown (forward, backward, ...)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, short_quickstart  # noqa: E402

BENCH = "e2e"


def dense_twin(job):
    """The same job with every layer dense: a SwiGLU of the MoE layer's active hidden size."""
    cfg = job.model
    dense = cfg.model_copy(update={"n_dense_layers": cfg.n_layers, "dense_hidden": cfg.active_ffn_hidden})
    return job.model_copy(update={"model": dense})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (60 if args.quick else 300)
    import ray

    from moe_ray.runtime.driver import run_job
    from moe_ray.runtime.worker import TIME_METRICS
    from moe_ray.sizing import job_size

    with tempfile.TemporaryDirectory(prefix="moe-ray-bench-e2e-") as tmp:
        moe = short_quickstart(tmp, steps)
        moe = moe.model_copy(update={"train": moe.train.model_copy(update={"eval_batches": 8})})
        jobs = {"moe": moe, "dense": dense_twin(moe)}
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            results = {name: run_job(job, run_name=f"e2e-{name}") for name, job in jobs.items()}
        finally:
            ray.shutdown()
    warm = max(3, steps // 10)
    step_s = {name: statistics.median(m["step_time"] for m in r.progress.metrics[warm:]) for name, r in results.items()}
    active = {name: job_size(job).active_params for name, job in jobs.items()}
    breakdown = {
        name: {
            key.split("/", 1)[1] + "_ms": round(statistics.median(m[key] for m in r.progress.metrics[warm:]) * 1e3, 1)
            for key in TIME_METRICS
        }
        for name, r in results.items()
    }
    emit(
        BENCH,
        "moe_over_dense_tokens_per_s",
        round(step_s["moe"] / step_s["dense"], 3),
        target="<= 1.2",
        step_ms_moe=round(step_s["moe"] * 1e3, 1),
        step_ms_dense=round(step_s["dense"] * 1e3, 1),
        active_params_moe=active["moe"],
        active_params_dense=active["dense"],
        steps=steps,
        tokens=steps * moe.train.batch_size * moe.train.seq_len,
    )
    emit(BENCH, "val_loss_moe", round(results["moe"].val_loss, 4))
    emit(BENCH, "val_loss_dense", round(results["dense"].val_loss, 4))
    for name, times in breakdown.items():  # where each step's time went (medians, ms)
        emit(BENCH, f"step_breakdown_{name}", round(step_s[name] * 1e3, 1), **times)


if __name__ == "__main__":
    main()
