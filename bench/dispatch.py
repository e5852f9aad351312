"""Expert-parallel step time: 2 workers (EP=2) over one process, same model and global batch;
all-to-all bytes per step; and `moe-ray run` launch to the first completed step.

    python bench/dispatch.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, short_quickstart  # noqa: E402

from moe_ray.data import builtin_corpus  # noqa: E402
from moe_ray.runtime.driver import run_job  # noqa: E402
from moe_ray.system import tune_cpu_allocator  # noqa: E402
from moe_ray.train.trainer import Trainer  # noqa: E402

BENCH = "dispatch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps = 30 if args.quick else 80
    skip = 5  # warm-up steps left out of the medians
    with tempfile.TemporaryDirectory() as storage:
        job = short_quickstart(storage, steps)
        result = run_job(job, run_name="bench-ep2")
        metrics = result.progress.metrics
        ep2 = statistics.median(m["step_time"] for m in metrics[skip:])
        launch = metrics[0]["time"] - result.progress.started
        a2a = statistics.median(m["a2a_bytes"] for m in metrics[skip:])

        tune_cpu_allocator()
        torch.set_num_threads(job.resources.workers)  # the same cores the two workers had
        trainer = Trainer(job.model, job.balance, job.train, builtin_corpus(job.data.max_bytes), torch.device("cpu"))
        times = [trainer.run_step().seconds for _ in range(steps)]
        single = statistics.median(times[skip:])
    emit(BENCH, "ep2_step_ms", round(ep2 * 1e3, 1), workers=2)
    emit(BENCH, "single_step_ms", round(single * 1e3, 1), threads=job.resources.workers)
    emit(BENCH, "ep2_over_single", round(ep2 / single, 3), target="<= 1.15")
    emit(BENCH, "a2a_bytes_per_step", int(a2a), note="activations sent to other ranks, fwd+bwd, all ranks")
    emit(BENCH, "launch_to_first_step_s", round(launch, 1), target="<= 10")
    if torch.cuda.is_available():
        emit(BENCH, "tokens_per_s", round(job.train.batch_size * job.train.seq_len / ep2), backend="nccl")


if __name__ == "__main__":
    main()
