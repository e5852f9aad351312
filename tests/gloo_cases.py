"""Many gloo cases in one set of processes.

A spawned process imports torch and the package (~4 s of CPU on a 2-core machine), more than a
small case takes. So the processes come from one forkserver per test session that has imported
them already (`processes()`), and a test module starts its processes once and runs every case in
turn, each on a fresh process group of its own size (ranks beyond a case's size skip it), writing
what it computed into a folder of its own. A case that raises leaves its traceback for its test to
report; the others still run (a rank left waiting in a collective gives up after `CASE_TIMEOUT`).
"""

import multiprocessing
import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASE_TIMEOUT = timedelta(seconds=120)
# What the cases' processes import, once, in the forkserver (a fresh process: no Ray threads to
# fork). The test modules themselves are imported in each process (Python 3.11's forkserver does
# not see the tests folder), cheaply once these are loaded.
PRELOAD = ["torch", "torch.distributed", "pytest", "boto3", "moe_ray.runtime.driver", "moe_ray.train.trainer"]


def processes() -> multiprocessing.context.BaseContext:
    """The multiprocessing context whose processes start with PRELOAD imported. Such a process
    has the environment the forkserver started with: pass it what changed since (`_run_all`)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # no effect once the forkserver runs
    return context


def run_cases(cases: list[tuple], folder: Path) -> Path:
    """`cases`: (name, world size, fn, args), run in order; fn(rank, world, out_dir, *args) runs
    inside an initialised gloo group, out_dir being `folder / name`. Returns `folder`."""
    for name, *_ in cases:
        (folder / name).mkdir(parents=True)
    world = max(world for _, world, _, _ in cases)
    method = processes().get_start_method()
    mp.start_processes(_run_all, args=(cases, folder, dict(os.environ)), nprocs=world, start_method=method)
    return folder


def require(folder: Path, name: str) -> Path:
    """Case `name`'s output folder; the test fails with the case's tracebacks if it raised."""
    errors = sorted((folder / name).glob("rank*.error"))
    if errors:
        import pytest

        text = "".join(f"--- {e.name}\n{e.read_text()}" for e in errors)
        pytest.fail(f"gloo case {name} raised:\n{text}", pytrace=False)
    return folder / name


def _run_all(rank: int, cases: list[tuple], folder: Path, environ: dict) -> None:
    os.environ.clear()
    os.environ.update(environ)  # this test's, not the forkserver's (test_s3's endpoint, say)
    torch.set_num_threads(1)
    for name, world, fn, args in cases:
        if rank >= world:
            continue
        try:
            # A file rendezvous per case: no ports to pick, and a fresh one every time.
            dist.init_process_group(
                "gloo", init_method=f"file://{folder}/{name}.store", rank=rank, world_size=world, timeout=CASE_TIMEOUT
            )
            fn(rank, world, folder / name, *args)
        except Exception:
            (folder / name / f"rank{rank}.error").write_text(traceback.format_exc())
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
