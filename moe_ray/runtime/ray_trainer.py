"""The Ray Train trainer of a run's worker groups: Ray Train's TorchTrainer with changes to what
its controller gets, through Ray Train's private controller arguments (where those move, the
plain TorchTrainer runs: every failure retried, the helpers below started):
- moe-ray's failure policy in place of Ray Train's (failures.UnmendableFailuresStop: a failure
  that no restart can mend stops the run instead of restarting it for ever);
- no Ray Data callback when the trainer has no datasets, which moe-ray never passes (the workers
  read their samples by position, DESIGN 12): Ray Train starts a DatasetManager actor (a
  process importing Ray Train and Ray Data) for every worker group all the same, and sends Ray
  Data's context to each worker;
- no placement-group cleaner on a Ray without a dashboard (the embedded one): that actor asks
  the State API, which lives in the dashboard, every second whether the controller is alive,
  so there it only warns that the API is unavailable, and never cleans up.
Together ~1-2 s of each worker group's start and end here (a 3-step run of 2 workers: 17.3 ->
16.3 s without the DatasetManager, then 14.4 -> 13.6 s without the cleaner, medians of 5 runs
each, alternated), every restart and rescale included.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer

from moe_ray.runtime.failures import UnmendableFailuresStop

try:
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
except ImportError:  # pragma: no cover
    DatasetsCallback = PlacementGroupCleanerCallback = None


def has_dashboard() -> bool:
    """Whether the Ray this process is connected to runs a dashboard (True when unknown)."""
    try:
        from ray._private.worker import get_dashboard_url

        return bool(get_dashboard_url())
    except Exception:
        return True


class RunTrainer(TorchTrainer):
    """TorchTrainer with moe-ray's failure policy, without the helpers it has no use for."""

    def _initialize_and_run_controller(self, **kwargs):
        if UnmendableFailuresStop is not None and "failure_policy" in kwargs:
            kwargs["failure_policy"] = UnmendableFailuresStop(kwargs["failure_policy"], self.run_config.name)
        unused: tuple[type, ...] = ()
        if DatasetsCallback is not None and not self.datasets:
            unused += (DatasetsCallback,)
        if PlacementGroupCleanerCallback is not None and not has_dashboard():
            unused += (PlacementGroupCleanerCallback,)
        if unused and "callbacks" in kwargs:
            kwargs["callbacks"] = [c for c in kwargs["callbacks"] if not isinstance(c, unused)]
        return super()._initialize_and_run_controller(**kwargs)
