"""The coordinator's price: step time with the coordinator round trip over the same step with
the bias computed on the workers (counts all-reduced), and the coordinator's latency for 64
simulated workers x 8 layers x 256 experts.

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


def latency_64_workers(repeat: int) -> tuple[float, float]:
    """(last worker's round trip, all 64 submitted serially from this one process).

    The first is the coordinator's latency on a step's critical path: the other 63 workers'
    counts are already in when the last one sends its counts and asks for the bias, so the
    answer needs the summing of 64 x 8 x 256 counts, the bias rule and one actor round trip.
    The second includes this process submitting 64 actor calls one after another, which 64
    real workers do in parallel."""
    workers, layers, experts = 64, 8, 256
    coord = Coordinator.remote(layers, experts, {"method": "loss_free"}, 10**6)
    gen = ray.get(coord.begin.remote(0, workers, None))
    rng = np.random.default_rng(0)
    counts = [rng.integers(0, 100, size=(layers, experts)) for _ in range(workers)]
    last, serial = [], []
    for step in range(repeat):
        start = time.perf_counter()
        futures = []
        for rank in range(workers - 1):
            futures.append(coord.exchange.remote(gen, step, rank, counts[rank]))
        ray.get(coord.ping.remote())  # the 63 are in
        t_last = time.perf_counter()
        ray.get(coord.exchange.remote(gen, step, workers - 1, counts[-1]))
        last.append(time.perf_counter() - t_last)
        ray.get(futures)
        serial.append(time.perf_counter() - start)
    ray.kill(coord)
    return statistics.median(last[2:]), statistics.median(serial[2:])


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
        ms, serial = latency_64_workers(10 if args.quick else 30)
        ray.shutdown()
    emit(BENCH, "step_ms_coordinator", round(with_coordinator * 1e3, 1))
    emit(BENCH, "step_ms_local_bias", round(local * 1e3, 1))
    emit(BENCH, "coordinator_overhead", round(with_coordinator / local, 3), target="<= 1.01")
    emit(
        BENCH,
        "coordinator_ms_64w",
        round(ms * 1e3, 2),
        target="<= 5",
        note="last of 64 workers: one exchange call (counts in, bias out), 8 layers x 256 experts",
    )
    emit(BENCH, "serial_submit_ms_64w", round(serial * 1e3, 1), note="all 64 workers simulated from one process")


if __name__ == "__main__":
    main()
