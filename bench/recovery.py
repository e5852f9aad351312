"""Recovery from a killed worker: seconds from the kill to the next completed step, and steps
lost (steps done since the last checkpoint, which are run again).

    python bench/recovery.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, short_quickstart  # noqa: E402

from moe_ray.runtime.driver import run_job  # noqa: E402

BENCH = "recovery"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.parse_args()
    with tempfile.TemporaryDirectory() as storage:
        job = short_quickstart(storage, 60, checkpoint_every=20)
        state: dict = {}

        def kill_after_step_30(progress):
            if not state and progress.metrics and progress.metrics[-1]["step"] >= 30:
                placement = [e for e in progress.events if e.get("event") == "placement"][-1]
                os.kill(placement["pids"][1], signal.SIGKILL)
                state.update(time=time.time(), last_step=progress.metrics[-1]["step"])

        result = run_job(job, run_name="bench-recovery", on_progress=kill_after_step_30)
    restart = next(e for e in result.progress.events if e.get("event") == "restart")
    next_step = next(m for m in result.progress.metrics if m["step"] == restart["step"])
    emit(
        BENCH,
        "recovery_to_next_step_s",
        round(next_step["time"] - state["time"], 1),
        note="SIGKILL of one of 2 workers to the first completed step of the new group",
    )
    emit(BENCH, "steps_lost", restart["steps_lost"], checkpoint_every=job.checkpoint.every)
    emit(BENCH, "final_step", result.final_step, expected=job.train.steps)


if __name__ == "__main__":
    main()
