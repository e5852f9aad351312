"""Which worker failures restart the worker group (DESIGN 5.4): a lost node or a crashed worker
does, up to `resources.max_failures` times. Two kinds do not, since a new group would meet them
again and, with -1, restart for ever:
- a problem that the workers find with the job or with their nodes before the first step
  (storage or data they cannot reach): a SetupError, final at once;
- the same error raised at the same point (setup, or step N) as in the attempt before: a restart
  replays the same steps from the same checkpoint on the same data, so a bug, a diverged loss or
  an out-of-memory there is met again. It is retried once (a one-off fault is not repeated).
  Errors of storage, the network or Ray are never taken for a repeat (OUTAGES).
"""

from __future__ import annotations

import logging
import re
import time

import torch
from ray.exceptions import RayError
from torch.distributed import DistError

from moe_ray.runtime.coordinator import get_coordinator
from moe_ray.storage.s3 import StorageError
from moe_ray.train.step import TrainingDiverged

# Errors of what lies outside the job (storage, the network, Ray, the process group's transport),
# which may be out of reach for a while: an outage fails every attempt at the same point too (a
# checkpoint's upload, a restore), and a run with max_failures -1 is meant to wait it out, so
# these are never taken for a repeat.
OUTAGES = (OSError, StorageError, RayError, DistError)


class SetupError(RuntimeError):
    """Raised by every worker of a group for a problem that another attempt would meet again."""


class OutOfMemory(RuntimeError):
    """A worker ran out of memory in a step: its GPU's, or its host's for one allocation."""


# Errors whose message is all a user needs: the driver prints it alone (the restart line, the
# run's error), and the workers do not log their tracebacks (one per rank and attempt).
WORDED = (SetupError, TrainingDiverged, OutOfMemory)


def worded_out_of_memory(err: BaseException, at: str | int, job: dict, where: str) -> Exception | None:
    """torch's out-of-memory error (CUDA's, or the CPU allocator's refusal) in words that name
    what sizes a worker's memory, else None. Before the first step (`at` "setup": the model, its
    optimizer state, the checkpoint) a SetupError, as another attempt would meet it again; in a
    step an OutOfMemory (retried once, like any error: a GPU shared for a while can free up).
    `job` is the job as the workers get it (a dict)."""
    text = str(err)
    if isinstance(err, torch.OutOfMemoryError):  # "CUDA out of memory. Tried to allocate ... is free. ..."
        sentences = text.split(". ")
        upto = next((i for i, part in enumerate(sentences) if " free" in part), 0)
        said = ". ".join(sentences[: upto + 1]).rstrip(".")
    elif isinstance(err, RuntimeError) and (
        size := re.search(r"can't allocate memory: you tried to allocate (\d+)", text)
    ):
        said = f"the host cannot allocate {int(size[1]) / 2**30:,.1f} GiB at once"
    else:
        return None
    workers = job["resources"]["workers"]
    more = f"resources.workers, {workers}" if isinstance(workers, int) else "resources.workers"
    if at == "setup":
        return SetupError(
            f"out of memory before the first step on {where}: {said}. The model's training state does not fit "
            f"a worker: use more workers ({more}: the routed experts are spread over them) and "
            "resources.dense_parallel: fsdp (the dense parts sharded over them); `moe-ray validate` shows the "
            "training state per worker"
        )
    train = job["train"]
    return OutOfMemory(
        f"out of memory at step {at} on {where}: {said}. A worker's memory grows with its share of "
        f"train.batch_size ({train['batch_size']}) x train.seq_len ({train['seq_len']}) tokens and with the "
        f"experts it holds: lower either, or use more workers ({more}: each takes a smaller share of the batch "
        "and fewer experts)"
    )


class WordedErrorTracebacks(logging.Filter):
    """Drops Ray Train's "Error in training function" traceback of a WORDED error (it logs every
    training function's error on its worker, which a cluster forwards to the driver)."""

    ENDINGS = tuple(f"{kind.__module__}.{kind.__qualname__}: " for kind in WORDED)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Error in training function"):
            return True
        lines = [line for line in text.splitlines() if line.strip()]
        return not (lines and lines[-1].startswith(self.ENDINGS))


def raised_by_a_rank(error: BaseException, kinds: type | tuple[type, ...]) -> BaseException | None:
    """The exception of one of `kinds` (of the lowest rank) in a worker group's failure (Ray
    Train's WorkerGroupError holds each rank's own exception), or None."""
    return next((e for _, e in _failures(error) if isinstance(e, kinds)), None)


def setup_error(error: BaseException) -> SetupError | None:
    """The SetupError in a worker group's failure, or None: no restart can mend it."""
    return raised_by_a_rank(error, SetupError)


class FailurePoint:
    """Where a worker is: "setup", then the step it runs (set `.at`). An exception leaving the
    `with` block records it (pickled with the exception, so the failure policy can read it)."""

    def __init__(self):
        self.at: str | int = "setup"

    def __enter__(self) -> FailurePoint:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, Exception):
            try:
                error.moe_ray_failed_at = self.at
            except Exception:  # one that takes no attributes: unmarked, so retried as a death is
                pass


def repeated_at(error: BaseException) -> str | int | None:
    """Where a failure the policy did not retry (the same as the attempt before's) happened."""
    return next((e.moe_ray_failed_at for _, e in _failures(error) if getattr(e, "moe_ray_repeated", False)), None)


def root_cause(err: BaseException) -> str:
    """What failed, in one line: the innermost error without Ray's wrapping; moe-ray's own words
    alone (a SetupError, a diverged step), without Ray's traceback; and why it was not retried
    when it was the same as the attempt before's."""
    seen = err
    while True:
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is None or nxt is seen:
            break
        seen = nxt
    if (ours := raised_by_a_rank(seen, WORDED)) is not None:
        cause = str(ours)
    else:
        text = str(seen).strip().splitlines()
        cause = text[-1] if text else type(seen).__name__
    if (at := repeated_at(seen)) is not None:
        where = "in setup" if at == "setup" else f"at step {at}"
        cause += (
            f" (raised {where} in two attempts in a row, so not restarted again: a restart replays the same "
            "steps from the same checkpoint)"
        )
    return cause


def _failures(error: BaseException) -> list[tuple[int, BaseException]]:
    return sorted((getattr(error, "worker_failures", None) or {}).items())


def _signature(e: BaseException) -> tuple | None:
    """(type, message with its numbers masked, where) of a rank's exception; None when moe-ray
    did not record where it was raised (a worker that died, a node that was lost) or it is an
    outage's: a restart may well mend those."""
    if (at := getattr(e, "moe_ray_failed_at", None)) is None or isinstance(e, OUTAGES):
        return None
    return type(e).__qualname__, re.sub(r"0x[0-9a-fA-F]+|\d+", "#", str(e)), at


def _signatures(error: BaseException) -> set[tuple]:
    """The signatures of a group's failure; empty when one of its ranks has none."""
    found = {_signature(e) for _, e in _failures(error)}
    return set() if None in found else found


try:  # Ray Train's failure policy is a private API: where it moves, every failure is retried
    from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy
except ImportError:  # pragma: no cover
    FailurePolicy = UnmendableFailuresStop = None

if FailurePolicy is not None:

    class UnmendableFailuresStop(FailurePolicy):
        """Ray Train's own policy, except that a SetupError, or an error of the attempt before
        raised again at the same point, raises at once. Each failure it retries is recorded with
        the run's coordinator, for the driver's line about the restart."""

        def __init__(self, inner: FailurePolicy, run_name: str | None = None):
            super().__init__(inner.failure_config)
            self.inner, self.run_name = inner, run_name
            self.before: set[tuple] = set()

        def make_decision(self, training_failed_error):
            if setup_error(training_failed_error) is not None:
                return FailureDecision.RAISE
            now = _signatures(training_failed_error)
            again, self.before = now & self.before, now
            if again:  # the attempt before failed the same way at the same point
                for _, e in _failures(training_failed_error):
                    e.moe_ray_repeated = _signature(e) in again
                return FailureDecision.RAISE
            decision = self.inner.make_decision(training_failed_error)
            if decision == FailureDecision.RETRY and self.run_name:
                _record_failure(self.run_name, root_cause(training_failed_error))
            return decision

    def _record_failure(run_name: str, cause: str) -> None:
        try:  # sent, not awaited: a coordinator that is gone costs the line, not the restart
            get_coordinator(run_name).record.remote({"event": "failure", "error": cause, "time": time.time()})
        except Exception:
            pass
