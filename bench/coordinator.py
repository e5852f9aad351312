"""The coordinator's price: step time with the coordinator round trip over the same step with
the bias computed on the workers (counts all-reduced), and the coordinator's part of one step at
DeepSeek-V3's shape (58 MoE layers x 256 experts) for 1,024 workers.

    python bench/coordinator.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, short_quickstart  # noqa: E402

from moe_ray.runtime.coordinator import Coordinator  # noqa: E402
from moe_ray.runtime.driver import connect, run_job  # noqa: E402

BENCH = "coordinator"


def step_times(job, mode: str, skip: int) -> float:
    result = run_job(job, run_name=f"bench-{mode}", bias_mode=mode)
    return statistics.median(m["step_time"] for m in result.progress.metrics[skip:])


def coordinator_step_ms(workers: int, layers: int, experts: int, repeat: int) -> float:
    """Median round trip of one step's exchange: rank 0 sends the group's summed counts and gets
    the next bias. The group's all-reduce of the counts comes before it and is not the
    coordinator's (one collective of layers x experts int64); however many workers there are,
    the coordinator sees this one call per step."""
    coord = Coordinator.remote(layers, experts, {"method": "loss_free"}, 10**6)
    gen = ray.get(coord.begin.remote(0, workers, None))
    rng = np.random.default_rng(0)
    # What the all-reduce hands rank 0: the sum of `workers` ranks' counts.
    summed = rng.integers(0, 100 * workers, size=(layers, experts))
    times = []
    for step in range(repeat):
        start = time.perf_counter()
        ray.get(coord.exchange.remote(gen, step, summed))
        times.append(time.perf_counter() - start)
    ray.kill(coord)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, skip = (30, 5) if args.quick else (80, 5)
    with tempfile.TemporaryDirectory() as storage:
        job = short_quickstart(storage, steps)
        connect(None, job)
        with_coordinator = step_times(job, "coordinator", skip)
        local = step_times(job, "allreduce", skip)
        ms = coordinator_step_ms(1024, 58, 256, 20 if args.quick else 60)
        ray.shutdown()
    emit(BENCH, "step_ms_coordinator", round(with_coordinator * 1e3, 1))
    emit(BENCH, "step_ms_local_bias", round(local * 1e3, 1))
    emit(BENCH, "coordinator_overhead", round(with_coordinator / local, 3), target="<= 1.01")
    emit(
        BENCH,
        "coordinator_ms_1024w",
        round(ms * 1e3, 2),
        target="<= 5",
        note="one exchange per step (rank 0, the group's summed counts in, bias out), 58 layers x 256 experts",
    )


if __name__ == "__main__":
    main()
