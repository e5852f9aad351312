"""Shared-expert overlap (DESIGN 14): the quickstart model on 2 gloo ranks (EP=2), training steps
with the shared experts computed while the dispatch all-to-all is in flight against the same
steps without, in alternating blocks (same processes, same noise); and how much of a step the
ranks spend blocked in all-to-alls either way.

    python bench/overlap.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, free_port, short_quickstart  # noqa: E402

BENCH = "overlap"


def _worker(rank, world, port, blocks, steps, out):
    from moe_ray.data import batch_share, builtin_corpus, sample_windows, window_length
    from moe_ray.parallel.mesh import build_mesh
    from moe_ray.parallel.parallelize import parallelize
    from moe_ray.parallel.placement import ExpertPlacement
    from moe_ray.system import tune_cpu_allocator
    from moe_ray.train.optim import build_optimizer
    from moe_ray.train.step import LocalBias, train_step
    from moe_ray.train.trainer import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tune_cpu_allocator()
    torch.set_num_threads(1)
    job = short_quickstart(tempfile.gettempdir(), blocks * steps * 2)
    placement = ExpertPlacement(job.model.moe.n_routed_experts, world, tuple([0] * world))
    model = build_model(job.model, job.balance, 0, torch.device("cpu"), placement.local_experts(rank))
    grads = parallelize(model, placement, rank, build_mesh(placement, "cpu"), fsdp=False)
    optimizer = build_optimizer(model, job.train)
    bias = LocalBias(model.get_expert_bias(), job.balance, job.train.steps)
    data = builtin_corpus(job.data.max_bytes)
    first, count = batch_share(job.train.batch_size, world, rank)
    window = window_length(job.train.seq_len, job.model.mtp.depth)
    times = {True: [], False: []}
    waits = {True: [], False: []}
    step = 0
    for block in range(blocks + 1):  # block 0 is the warm-up
        for overlap in (True, False):
            for layer in model.moe_layers():
                layer.dispatcher.overlap = overlap
                layer.dispatcher.clock.seconds = 0.0
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                batch = sample_windows(data.train, window, 0, step, first, count)
                train_step(
                    model,
                    optimizer,
                    batch,
                    step,
                    job.train,
                    bias,
                    loss_scale=count / job.train.batch_size,
                    sync_gradients=grads.sync,
                    clip=grads.clip,
                )
                step += 1
            if block:
                times[overlap].append((time.perf_counter() - start) / steps)
                waits[overlap].append(sum(layer.dispatcher.clock.seconds for layer in model.moe_layers()) / steps)
    torch.save({"times": times, "waits": waits}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    blocks, steps = (5, 4) if args.quick else (11, 6)
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(2, free_port(), blocks, steps, out), nprocs=2, start_method="spawn")
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    step = {o: statistics.median(max(r["times"][o][b] for r in ranks) for b in range(blocks)) for o in (True, False)}
    wait = {o: statistics.median(statistics.mean(r["waits"][o]) for r in ranks) for o in (True, False)}
    emit(
        BENCH,
        "overlap_step_time_ratio",
        round(step[True] / step[False], 3),
        step_ms_overlap=round(step[True] * 1e3, 1),
        step_ms_no_overlap=round(step[False] * 1e3, 1),
        a2a_wait_ms_overlap=round(wait[True] * 1e3, 1),
        a2a_wait_ms_no_overlap=round(wait[False] * 1e3, 1),
        blocks=blocks,
    )


if __name__ == "__main__":
    main()
