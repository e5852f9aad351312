"""Shared helpers for the benchmarks: timing, matmul reference speed and JSON-line output."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "infra" / "local"))
from stack import free_port  # noqa: E402,F401  (one definition, shared with the tests)


def emit(bench: str, metric: str, value, **extra) -> dict:
    """One result as a JSON line on stdout: {"bench": ..., "metric": ..., "value": ...}."""
    row = {"bench": bench, "metric": metric, "value": value, **extra}
    print(json.dumps(row), flush=True)
    return row


RESULTS = Path(__file__).resolve().parent / "results"


def save_results(rows: list[dict], meta: dict) -> None:
    """Put `rows` into bench/results/latest.json (and its Markdown table), replacing the earlier
    rows of the same benchmarks and keeping the others': `make bench` and `make study` each
    refresh their own figures."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "latest.json"
    replaced = {r["bench"] for r in rows}
    kept = []
    if path.is_file():
        kept = [r for r in json.loads(path.read_text()).get("results", []) if r.get("bench") not in replaced]
    # Each row keeps the date and settings of the run that made it: the file mixes runs.
    results = kept + [{**r, "run": f"{meta['date']} {meta['mode']}"} for r in rows]
    path.write_text(json.dumps({"machine": meta, "results": results}, indent=2))
    lines = [
        f"Last written {meta['date']} on {meta['cores']} cores, GPU: {meta['gpu']}, torch {meta['torch']}.",
        "",
        "| bench | metric | value | target | run |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['bench']} | {r['metric']} | {r['value']} | {r.get('target', '')} | {r.get('run', '')} |" for r in results
    ]
    (RESULTS / "latest.md").write_text("\n".join(lines) + "\n")


def time_it(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median wall time of `fn` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def matmul_flops_per_s(n: int = 2048, repeat: int = 5, device: str = "cpu") -> float:
    """FLOP/s of an n x n fp32 matmul on this machine: the yardstick for achieved FLOP/s."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    seconds = time_it(lambda: a @ b, repeat)
    return 2 * n**3 / seconds


def machine() -> dict:
    import os

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def short_quickstart(storage: str, steps: int, checkpoint_every: int = 0, extra: list[str] | None = None):
    """The quickstart job cut to `steps` steps, no evaluation, checkpoints and MLflow into
    `storage`; `extra`: more dotted overrides."""
    from pathlib import Path

    from moe_ray.spec import load_job

    overrides = [
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.eval_batches=1",
        f"checkpoint.every={checkpoint_every}",
        f"checkpoint.storage={storage}",
        # Beside the checkpoints: a bench never writes into the checkout's MLflow store, and a
        # second run of it never meets the first one's MLflow run (same run name).
        f"tracking.uri=sqlite:///{Path(storage).resolve() / 'mlflow.db'}",
    ]
    return load_job(Path(__file__).resolve().parent.parent / "jobs" / "quickstart.yaml", overrides + (extra or []))
