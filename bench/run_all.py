"""Run every benchmark, collect their JSON lines into bench/results/latest.json and a Markdown
table (bench/results/latest.md).

    python bench/run_all.py [--full] [--only moe_layer e2e ...]

With --only, just those benchmarks run, and only their rows in latest.json are replaced.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save_results  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHES = [
    "moe_layer.py",
    "dispatch.py",
    "coordinator.py",
    "recovery.py",
    "router_memory.py",
    "memory.py",
    "decode.py",
    "data.py",
    "overlap.py",
    "e2e.py",
    "gpu.py",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="long settings (default: quick)")
    parser.add_argument("--only", nargs="+", metavar="BENCH", help="run just these (names without .py)")
    args = parser.parse_args()
    names = BENCHES
    if args.only:
        known = [n.removesuffix(".py") for n in BENCHES]
        unknown = sorted(set(args.only) - set(known))
        if unknown:
            parser.error(f"no benchmark named {', '.join(unknown)}; there are {', '.join(known)}")
        names = [n for n in BENCHES if n.removesuffix(".py") in args.only]
    rows, failed = [], []
    for name in names:
        cmd = [sys.executable, str(HERE / name)] + ([] if args.full else ["--quick"])
        print(f"# {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                rows.append(json.loads(line))
        if proc.returncode:
            failed.append(name)
            print(proc.stderr[-3000:], file=sys.stderr)
    meta = {"date": time.strftime("%Y-%m-%d"), "mode": "full" if args.full else "quick", **machine()}
    save_results(rows, meta)  # the balance study's rows (make study) stay
    print((HERE / "results" / "latest.md").read_text(), file=sys.stderr)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
