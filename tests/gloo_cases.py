"""Many gloo cases in one set of spawned processes.

A spawned process imports torch and the package (~4 s of CPU on a 2-core machine), more than a
small case takes, so a test module spawns its processes once and runs every case in turn, each on
a fresh process group of its own size (ranks beyond a case's size skip it). A case that raises
leaves its traceback for its test to report; the others still run (a rank left waiting in a
collective gives up after `CASE_TIMEOUT`).
"""

import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASE_TIMEOUT = timedelta(seconds=120)


def run_cases(cases: list[tuple], folder: Path) -> dict[str, str]:
    """`cases`: (name, world size, fn, args), run in order; fn(rank, world, *args) runs inside an
    initialised gloo group. Returns each failed case's tracebacks, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    processes = max(world for _, world, _, _ in cases)
    mp.start_processes(_run_all, args=(cases, str(folder)), nprocs=processes, start_method="spawn")
    errors: dict[str, str] = {}
    for name, *_ in cases:
        for error in sorted(folder.glob(f"{name}.rank*.error")):
            errors[name] = errors.get(name, "") + f"--- {error.name}\n{error.read_text()}"
    return errors


def require(results: tuple[Path, dict[str, str]], *names: str) -> Path:
    """The cases' folder; the test fails with the tracebacks of those of `names` that raised."""
    folder, errors = results
    failed = [errors[n] for n in names if n in errors]
    if failed:
        import pytest

        pytest.fail("a gloo case raised:\n" + "\n".join(failed), pytrace=False)
    return folder


def _run_all(rank: int, cases: list[tuple], folder: str) -> None:
    torch.set_num_threads(1)
    for name, world, fn, args in cases:
        if rank >= world:
            continue
        try:
            # A file rendezvous per case: no ports to pick, and a fresh one every time.
            dist.init_process_group(
                "gloo", init_method=f"file://{folder}/{name}.store", rank=rank, world_size=world, timeout=CASE_TIMEOUT
            )
            fn(rank, world, *args)
        except Exception:
            Path(folder, f"{name}.rank{rank}.error").write_text(traceback.format_exc())
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
