"""MLflow tracking (DESIGN 5.5): one MLflow run per job, written from a background thread.

Training must never wait for, or fail because of, the tracking server: every call here only
queues work. A background thread creates the run, sends metrics in batches, and uploads
artifacts; when the server is unreachable it warns once, keeps everything queued, and retries
with backoff until the server answers again or the run is closed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from moe_ray.secrets import looks_secret_key, redact

log = logging.getLogger("moe_ray.tracking")

MAX_QUEUED_METRICS = 1_000_000


def local_store_uri(folder: Path | None = None) -> str:
    """The embedded default: an SQLite store in the working folder."""
    return f"sqlite:///{(folder or Path.cwd()).resolve() / 'mlflow.db'}"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; values whose key looks secret are redacted, and
    credentials inside other values (a URL's password, an AWS key id) are masked."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif looks_secret_key(str(key)):
            out[name] = "***"
        else:
            out[name] = redact(str(value))[:6000]
    return out


def git_commit(folder: Path | None = None) -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder or Path.cwd(), capture_output=True, text=True, timeout=5
        )
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


CHANGED_PARAMS_TAG = "moe_ray.params_changed_on_resume"


def mlflow_run_of(client, experiment_id: str, run_name: str):
    """The MLflow run of the moe-ray run `run_name` (found by its tag; a resumed run continues
    it), or None."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`moe_ray.run` = '{run_name}'", max_results=1)
    return found[0] if found else None


class Tracker:
    """An MLflow run fed from a queue. `enabled=False` makes every call a no-op."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        *,
        enabled: bool = True,
        flush_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.enabled = enabled
        self.flush_s, self.max_backoff_s = flush_s, max_backoff_s
        self.run_id: str | None = None
        self._metrics: deque = deque(maxlen=MAX_QUEUED_METRICS)
        self._params: dict[str, str] = {}
        self._logged_params: dict[str, str] = {}  # what the MLflow run holds (a resumed run's, at first)
        self._tags: dict[str, str] = {}
        self._artifacts: dict[str, Path] = {}  # artifact path -> local copy (latest wins)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._tmp = Path(tempfile.mkdtemp(prefix="moe-ray-tracking-"))
        self._outage_since: float | None = None
        self.dropped = 0
        self._thread: threading.Thread | None = None
        self._status = "FINISHED"
        self._give_up_at: float | None = None

    # --- queueing (called from the driver; never blocks on the network) -----------------
    def start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._params.update(params)
            self._tags.update(tags)
        self._thread = threading.Thread(target=self._loop, name="moe-ray-mlflow", daemon=True)
        self._thread.start()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        ts = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                if len(self._metrics) == self._metrics.maxlen:
                    self.dropped += 1
                self._metrics.append((key, float(value), ts, int(step)))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            with self._lock:
                self._tags.update({k: str(v) for k, v in tags.items()})

    def log_artifact(self, local: Path, artifact_path: str) -> None:
        """Queue a copy of `local` to be uploaded as `artifact_path/<name>` (a newer copy replaces it)."""
        if not self.enabled:
            return
        dst = self._tmp / artifact_path.replace("/", "__") / Path(local).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dst)
        with self._lock:
            self._artifacts[f"{artifact_path}/{Path(local).name}"] = dst
        self._wake.set()

    def close(self, status: str = "FINISHED", timeout_s: float = 30.0) -> bool:
        """Send what is queued (waiting at most `timeout_s`), end the run. True if all was sent."""
        try:
            if not self.enabled or self._thread is None:
                return True
            self._status = status
            self._give_up_at = time.time() + timeout_s
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout_s)
            sent = not self._thread.is_alive() and self.pending() == 0
            if not sent:
                log.warning(
                    "MLflow: %d metric values not sent to %s (server unreachable)", self.pending(), redact(self.uri)
                )
            return sent
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def pending(self) -> int:
        with self._lock:
            return len(self._metrics) + len(self._artifacts) + (1 if self.run_id is None else 0)

    # --- the background thread ------------------------------------------------------------
    def _loop(self) -> None:
        backoff = self.flush_s
        while True:
            stopping = self._stop.is_set()
            try:
                self._flush()
                if self._outage_since is not None:
                    log.warning(
                        "MLflow at %s reachable again after %.0f s; queued data sent",
                        redact(self.uri),
                        time.time() - self._outage_since,
                    )
                    self._outage_since = None
                backoff = self.flush_s
                if stopping:
                    self._finish()
                    return
            except Exception as err:  # any failure of the server or the network
                if self._outage_since is None:
                    self._outage_since = time.time()
                    log.warning(
                        "MLflow at %s unreachable (%s); training goes on, metrics are kept and sent when it answers",
                        redact(self.uri),
                        redact(_short(err)),
                    )
                backoff = min(self.max_backoff_s, backoff * 2)
                if stopping:
                    if time.time() >= (self._give_up_at or 0):
                        return  # close() has given up on the server; the warning says what was lost
                    backoff = min(backoff, 2.0)
            self._wake.wait(backoff)
            self._wake.clear()

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def _flush(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self._client()
        if self.run_id is None:
            self.run_id = self._create_run(client)
        with self._lock:
            params, self._params = self._params, {}
            tags, self._tags = self._tags, {}
        # MLflow params cannot change, and one changed param fails the whole batch. A resume that
        # changes the job (more train.steps, to train on) keeps the first values as params and
        # says what changed in a tag.
        changed = {k: v for k, v in params.items() if self._logged_params.get(k, v) != v}
        params = {k: v for k, v in params.items() if k not in self._logged_params}
        if changed:
            tags[CHANGED_PARAMS_TAG] = "; ".join(
                f"{k}: {self._logged_params[k]} -> {v}" for k, v in sorted(changed.items())
            )[:5000]
        try:
            items = list(params.items())
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
            self._logged_params.update(params)
            if tags:
                client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception:
            with self._lock:
                self._params = params | self._params
                self._tags = tags | self._tags
            raise
        while True:
            with self._lock:
                batch = [self._metrics.popleft() for _ in range(min(1000, len(self._metrics)))]
            if not batch:
                break
            try:
                client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in batch])
            except Exception:
                with self._lock:
                    self._metrics.extendleft(reversed(batch))
                raise
        with self._lock:
            artifacts = dict(self._artifacts)
        for name, local in artifacts.items():
            client.log_artifact(self.run_id, str(local), artifact_path=str(Path(name).parent))
            with self._lock:
                if self._artifacts.get(name) == local:
                    del self._artifacts[name]

    def _create_run(self, client) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
        found = mlflow_run_of(client, exp_id, self.run_name)
        if found:
            client.update_run(found.info.run_id, status="RUNNING")
            self._logged_params = dict(found.data.params)
            return found.info.run_id
        run = client.create_run(exp_id, run_name=self.run_name, tags={"moe_ray.run": self.run_name})
        return run.info.run_id

    def _finish(self) -> None:
        if self.run_id is not None:
            self._client().set_terminated(self.run_id, status=self._status)


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def quiet_mlflow() -> None:
    """MLflow's own HTTP retries would stall the sender for minutes; ours are enough. And MLflow
    prints "View run at: <tracking URI>" with any password in it: moe-ray prints its own, masked.
    A new SQLite store's "Creating initial MLflow database tables" lines say nothing to a user."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
