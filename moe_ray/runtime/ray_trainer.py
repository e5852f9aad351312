"""The Ray Train trainer of a run's worker groups: Ray Train's TorchTrainer with two changes to
what its controller gets, both through Ray Train's private controller arguments (where those
move, the plain TorchTrainer runs: every failure retried, the unused actor started):
- moe-ray's failure policy in place of Ray Train's (failures.UnmendableFailuresStop: a failure
  that no restart can mend stops the run instead of restarting it for ever);
- no Ray Data callback when the trainer has no datasets, which moe-ray never passes (the workers
  read their samples by position, DESIGN 12): Ray Train starts a DatasetManager actor (a
  process importing Ray Train and Ray Data) for every worker group all the same, and sends Ray
  Data's context to each worker. ~1 s of each worker group's start here (a 3-step run: 17.3 ->
  16.3 s, median of 5 alternated), every restart and rescale included.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer

from moe_ray.runtime.failures import UnmendableFailuresStop

try:
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
except ImportError:  # pragma: no cover
    DatasetsCallback = None


class RunTrainer(TorchTrainer):
    """TorchTrainer with moe-ray's failure policy, and without Ray Data when it has no datasets."""

    def _initialize_and_run_controller(self, **kwargs):
        if UnmendableFailuresStop is not None and "failure_policy" in kwargs:
            kwargs["failure_policy"] = UnmendableFailuresStop(kwargs["failure_policy"], self.run_config.name)
        if DatasetsCallback is not None and not self.datasets and "callbacks" in kwargs:
            kwargs["callbacks"] = [c for c in kwargs["callbacks"] if not isinstance(c, DatasetsCallback)]
        return super()._initialize_and_run_controller(**kwargs)
