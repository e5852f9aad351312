"""Which worker failures restart the worker group (DESIGN 5.4): a lost node or a crashed worker
does, up to `resources.max_failures` times; a problem that the workers find with the job or with
their nodes before the first step (storage or data they cannot reach) does not, since a new group
on the same nodes would meet it again: the run stops at once and says it, instead of restarting
its group max_failures times (for ever with -1).
"""

from __future__ import annotations


class SetupError(RuntimeError):
    """Raised by every worker of a group for a problem that another attempt would meet again."""


def setup_error(error: BaseException) -> SetupError | None:
    """The SetupError (of the lowest rank) in a worker group's failure (Ray Train's
    WorkerGroupError, which holds each rank's own exception), or None: no restart can mend it."""
    failures = getattr(error, "worker_failures", None) or {}
    return next((e for _, e in sorted(failures.items()) if isinstance(e, SetupError)), None)


try:  # Ray Train's failure policy is a private API: where it moves, every failure is retried
    from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy
except ImportError:  # pragma: no cover
    FailurePolicy = None

if FailurePolicy is not None:

    class SetupErrorsStop(FailurePolicy):
        """Ray Train's own policy, except that a SetupError raises at once."""

        def __init__(self, inner: FailurePolicy):
            super().__init__(inner.failure_config)
            self.inner = inner

        def make_decision(self, training_failed_error):
            if setup_error(training_failed_error) is not None:
                return FailureDecision.RAISE
            return self.inner.make_decision(training_failed_error)


def with_setup_errors_final(trainer_cls: type) -> type:
    """`trainer_cls` (a Ray Train trainer) whose controller stops on a SetupError."""
    if FailurePolicy is None or not hasattr(trainer_cls, "_initialize_and_run_controller"):
        return trainer_cls

    class Trainer(trainer_cls):
        def _initialize_and_run_controller(self, **kwargs):
            if "failure_policy" in kwargs:
                kwargs["failure_policy"] = SetupErrorsStop(kwargs["failure_policy"])
            return super()._initialize_and_run_controller(**kwargs)

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer
