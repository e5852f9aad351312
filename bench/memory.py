"""Per-worker training state of the dense parts, FSDP against replicated, measured from the live
tensors (parameters, gradients, AdamW moments: the elements each rank holds) after one step on
gloo workers; and the step time of both layouts on this machine.

    python bench/memory.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, free_port  # noqa: E402

from moe_ray.config import BalanceConfig, TrainConfig  # noqa: E402
from moe_ray.parallel.grads import split_parameters  # noqa: E402
from moe_ray.parallel.mesh import build_mesh  # noqa: E402
from moe_ray.parallel.parallelize import parallelize  # noqa: E402
from moe_ray.parallel.placement import ExpertPlacement  # noqa: E402
from moe_ray.train.optim import build_optimizer  # noqa: E402
from moe_ray.train.step import LocalBias, train_step  # noqa: E402
from moe_ray.train.trainer import build_model  # noqa: E402

BENCH = "memory"


def local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _worker(rank, world, port, fsdp, steps, out):
    from common import short_quickstart

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    job = short_quickstart(tempfile.gettempdir(), steps)
    placement = ExpertPlacement(job.model.moe.n_routed_experts, world, tuple([0] * world))
    model = build_model(job.model, BalanceConfig(), 0, torch.device("cpu"), placement.local_experts(rank))
    grads = parallelize(model, placement, rank, build_mesh(placement, "cpu"), fsdp=fsdp)
    train = TrainConfig(steps=steps, batch_size=16, seq_len=128, warmup_steps=0)
    optimizer = build_optimizer(model, train)
    bias = LocalBias(model.get_expert_bias(), BalanceConfig(), steps)
    g = torch.Generator().manual_seed(0)
    count = train.batch_size // world
    times = []
    for step in range(steps):
        window = torch.randint(0, 256, (count, train.seq_len + 2), generator=g)
        dist.barrier()
        start = time.perf_counter()
        share = count / train.batch_size
        sync = {"sync_gradients": grads.sync, "clip": grads.clip}
        train_step(model, optimizer, window, step, train, bias, loss_scale=share, **sync)
        times.append(time.perf_counter() - start)
    window = torch.randint(0, 256, (count, train.seq_len + 2), generator=g)
    (model.compute_loss(window).loss * count / 16).backward()  # gradients present, as mid-step
    dense, _ = split_parameters(model)
    held = sum(local_bytes(p) + local_bytes(p.grad) for p in dense)
    held += sum(local_bytes(v) for p in dense for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))
    torch.save({"bytes": held, "step_s": sorted(times[1:])[len(times[1:]) // 2]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def measure(world: int, fsdp: bool, steps: int) -> tuple[int, float]:
    """(most dense bytes any rank holds, median step seconds)."""
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        mp.start_processes(_worker, args=(world, port, fsdp, steps, out), nprocs=world, start_method="spawn")
        ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(world)]
    return max(r["bytes"] for r in ranks), max(r["step_s"] for r in ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args()
    steps = 4 if args.quick else 12
    one, _ = measure(1, False, 2)
    four, _ = measure(4, True, 2)
    note = "quickstart model, dense weights + grads + AdamW state held by one worker"
    emit(BENCH, "dense_state_bytes_1_worker", one, note=note)
    emit(BENCH, "dense_state_bytes_per_worker_fsdp_4", four, note=note)
    emit(BENCH, "dense_state_bytes_per_worker_ratio", round(four / one, 3), target="<= 0.3", note="4 workers over 1")
    _, fsdp_s = measure(2, True, steps)
    _, replicate_s = measure(2, False, steps)
    emit(BENCH, "step_ms_2w_fsdp", round(fsdp_s * 1e3, 1), note="quickstart, 2 gloo workers")
    emit(BENCH, "step_ms_2w_replicate", round(replicate_s * 1e3, 1), note="quickstart, 2 gloo workers")
    emit(BENCH, "fsdp_over_replicate_step_time", round(fsdp_s / replicate_s, 3))


if __name__ == "__main__":
    main()
