"""What the driver sends to MLflow while a run goes on (DESIGN 5.5): params, tags, rank 0's
step metrics and the coordinator's balance metrics every `tracking.log_every` steps, expert-load
heatmaps, the resolved job, the final summary and the checkpoint location."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import ray

from moe_ray.plots import load_heatmap
from moe_ray.runtime.worker import TIME_METRICS
from moe_ray.secrets import redact
from moe_ray.spec import JobSpec, dump_job, job_record, mask
from moe_ray.storage import checkpoint as ckpt
from moe_ray.tracking import Tracker, flatten, git_commit, local_store_uri, quiet_mlflow

STEP_KEYS = (
    "loss",
    "lm_loss",
    "mtp_loss",
    "balance_loss",
    "lr",
    "tokens_per_s",
    "step_time",
    "grad_norm",
    "rank_imbalance",
)


class RunTracking:
    def __init__(self, job: JobSpec, run_name: str, address: str | None):
        cfg = job.tracking
        quiet_mlflow()
        self.job, self.cfg = job, cfg
        # MLflow's own variable before the local store: the cluster files set it on every node.
        self.uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri()
        self.tracker = Tracker(self.uri, cfg.experiment, run_name, enabled=cfg.enabled)
        self.seen = {"metrics": 0, "history": 0, "events": 0}
        self.last_heatmap = -1
        self.restarts = 0
        self.tmp = Path(tempfile.mkdtemp(prefix="moe-ray-run-"))
        tags = {
            "moe_ray.job": job.name,
            "moe_ray.run": run_name,
            "moe_ray.checkpoint_storage": mask(job.checkpoint.storage, job),
            "ray.address": address or "embedded-local",
        }
        if os.environ.get("MOE_RAY_SUBMISSION_ID"):
            tags["ray.submission_id"] = os.environ["MOE_RAY_SUBMISSION_ID"]
        if commit := git_commit():
            tags["git.commit"] = commit
        self.tracker.start(flatten(job_record(job)), tags)
        if cfg.enabled:  # written for MLflow only
            spec = self.tmp / "job.yaml"
            spec.write_text(dump_job(job))
            self.tracker.log_artifact(spec, "job")

    def hint(self) -> str:
        if not self.cfg.enabled:
            return "MLflow: off (tracking.enabled: false)"
        if self.job.tracking.uri:
            return f"MLflow: {redact(self.uri)} (experiment {self.cfg.experiment})"
        return f"MLflow: local store; open the UI with: mlflow ui --backend-store-uri {self.uri}"

    def _due(self, step: int) -> bool:
        return (step + 1) % self.cfg.log_every == 0 or step + 1 == self.job.train.steps

    def update(self, progress, coordinator) -> None:
        for m in progress.metrics[self.seen["metrics"] :]:
            if self._due(m["step"]):
                self.tracker.log_metrics(m["step"], {k: m[k] for k in STEP_KEYS + TIME_METRICS if k in m})
        self.seen["metrics"] = len(progress.metrics)
        for h in progress.history[self.seen["history"] :]:
            if self._due(h["step"]):
                vals = {f"max_vio/layer_{i}": v for i, v in enumerate(h["max_vio"])}
                vals |= {f"bias_min/layer_{i}": v for i, v in enumerate(h["bias_min"])}
                vals |= {f"bias_max/layer_{i}": v for i, v in enumerate(h["bias_max"])}
                vals["max_vio/mean"] = float(np.mean(h["max_vio"])) if h["max_vio"] else 0.0
                self.tracker.log_metrics(h["step"], vals)
        self.seen["history"] = len(progress.history)
        for ev in progress.events[self.seen["events"] :]:
            if ev.get("event") == "restart":
                self.restarts += 1
                self.tracker.log_metrics(
                    ev["step"],
                    {
                        "restarts": self.restarts,
                        "restart/recovery_s": ev["recovery_s"],
                        "restart/steps_lost": ev["steps_lost"],
                        "workers": ev["world_size"] or 0,
                    },
                )
                error = f": {ev['error'][:1000]}" if ev.get("error") else ""
                self.tracker.set_tags({"moe_ray.last_restart": f"{ev['cause']} at step {ev['step']}{error}"})
            elif ev.get("event") == "coordinator_restart":
                self.tracker.set_tags({"moe_ray.coordinator_restart": f"at step {ev['step']}"})
            if ev.get("event") == "eval":
                vals = {"val_loss": ev["val_loss"], "max_vio_global/mean": ev["max_vio_global_mean"]}
                vals |= {f"max_vio_global/layer_{i}": v for i, v in enumerate(ev["max_vio_global"])}
                self.tracker.log_metrics(ev["step"], vals)
        self.seen["events"] = len(progress.events)
        last = progress.history[-1]["step"] if progress.history else -1
        if last - self.last_heatmap >= self.cfg.heatmap_every:
            self.heatmap(coordinator)

    def heatmap(self, coordinator) -> None:
        if not self.cfg.enabled:  # drawn for MLflow only (~1 s of the driver's CPU the first time)
            return
        try:
            history = ray.get(coordinator.load_history.remote(max_points=400), timeout=30)
        except Exception:
            return
        if not history or not self.job.model.n_moe_layers:  # an all-dense model has no expert load
            return
        path = load_heatmap(
            [h["step"] for h in history],
            np.stack([h["counts"] for h in history]),
            self.tmp / "expert_load.png",
            title=f"expert load: {self.tracker.run_name}",
        )
        self.tracker.log_artifact(path, "heatmaps")
        self.last_heatmap = history[-1]["step"]

    def _log_model(self, checkpoint: str) -> None:
        """The final checkpoint as artifacts: enough to `moe-ray eval` / `generate` it from MLflow."""
        try:
            with ckpt.local_checkpoint(checkpoint) as folder:
                for path in sorted(folder.iterdir()):
                    if path.is_file():
                        self.tracker.log_artifact(path, "model")
        except Exception as err:  # the model upload never fails a finished run
            self.tracker.set_tags({"moe_ray.model_upload_error": str(err)[:200]})

    def finish(self, result, coordinator, status: str = "FINISHED", error: str | None = None) -> None:
        """Close the run with `status`: with the summary of a finished `result`, or with the
        one-line `error` of a FAILED run as its tag `moe_ray.error` (else only in the driver's log)."""
        try:
            self._finish(result, coordinator, status, error)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)  # what it held is queued as copies, or sent

    def _finish(self, result, coordinator, status: str, error: str | None) -> None:
        if error is not None:
            self.tracker.set_tags({"moe_ray.error": redact(error)[:5000]})
        if result is not None:
            self.heatmap(coordinator)
            summary = {
                k: getattr(result, k)
                for k in (
                    "run_name",
                    "run_location",
                    "checkpoint",
                    "final_step",
                    "train_loss",
                    "val_loss",
                    "max_vio_global",
                    "seconds",
                )
            }
            path = self.tmp / "summary.json"
            path.write_text(json.dumps(summary, indent=2))
            self.tracker.log_artifact(path, "summary")
            self.tracker.set_tags({"moe_ray.checkpoint": result.checkpoint or ""})
            if self.cfg.log_model and result.checkpoint:
                self._log_model(result.checkpoint)
        self.tracker.close(status, timeout_s=self.cfg.flush_timeout_s)
