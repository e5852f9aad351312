"""MLflow tracking against a real `mlflow server` process (SQLite backend) on 127.0.0.1."""

import os
import signal
import time

import pytest
from conftest import REPLICATED, free_port, tiny_job
from faulty_proxy import FaultyProxy
from mlflow.tracking import MlflowClient

from moe_ray.runtime.driver import run_job
from moe_ray.runtime.worker import TIME_METRICS
from moe_ray.tracking import Tracker, flatten, quiet_mlflow
from moe_ray.train.step import STEP_PHASES

quiet_mlflow()


def only_run(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def tracked_run(local_ray, mlflow_stack, tmp_path_factory):
    # No tracking.uri: the server comes from MLflow's own variable, as cluster/ sets it on nodes.
    job = tiny_job(
        tmp_path_factory.mktemp("runs"),
        train__steps=6,
        train__eval_every=3,
        **REPLICATED,
        tracking={"experiment": "tracked", "log_every": 2, "heatmap_every": 3, "log_model": True},
    )
    assert job.tracking.uri is None
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_stack.mlflow_uri
    before = tracking_scratch()
    try:
        return job, run_job(job, run_name="tracked"), tracking_scratch() - before
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def tracking_scratch() -> set[str]:
    """The driver's scratch folders (heatmaps, summary, the queued artifacts' copies)."""
    import glob
    import tempfile

    return {p for kind in ("run", "tracking") for p in glob.glob(f"{tempfile.gettempdir()}/moe-ray-{kind}-*")}


def test_params_metrics_and_artifacts_reach_the_server(tracked_run, mlflow_stack):
    job, result, scratch_left = tracked_run
    assert scratch_left == set()  # each run left a folder in /tmp (~160 KB with its heatmap) before
    client, run = only_run(mlflow_stack.mlflow_uri, "tracked")
    assert run.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.params["model.moe.top_k"] == "2" and run.data.params["train.steps"] == "6"
    assert run.data.tags["moe_ray.run"] == "tracked" and run.data.tags["moe_ray.job"] == job.name
    assert run.data.tags["moe_ray.checkpoint"] == result.checkpoint
    # Every log_every=2 steps: steps 1, 3, 5 (0-based) of 6.
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 3, 5]
    assert [m.value for m in loss] == pytest.approx([result.progress.metrics[s]["loss"] for s in (1, 3, 5)])
    for key in (
        "lm_loss",
        "mtp_loss",
        "lr",
        "tokens_per_s",
        "step_time",
        "max_vio/layer_0",
        "max_vio/mean",
        "bias_min/layer_2",
        "bias_max/layer_0",
        "val_loss",
        "max_vio_global/mean",
        "rank_imbalance",
        *TIME_METRICS,
    ):
        assert client.get_metric_history(run.info.run_id, key), key
    # The time breakdown: the phases of a step (means over the workers) fit in a step, and the
    # all-to-all waits are a part of forward + backward.
    for m in result.progress.metrics:
        phases = [m[f"time/{p}"] for p in STEP_PHASES]
        assert min(phases) >= 0 and sum(phases) <= m["step_time"] * 1.2 + 0.01
        assert 0 < m["time/dispatch_wait"] <= m["time/forward"] + m["time/backward"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [3, 6]
    names = {
        a.path for folder in ("job", "heatmaps", "summary") for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert names == {"job/job.yaml", "heatmaps/expert_load.png", "summary/summary.json"}
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/index.json", "model/dense.safetensors", "model/state.json"} <= model_files
    local = client.download_artifacts(run.info.run_id, "heatmaps/expert_load.png")
    assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def files_holding(folder, secret: bytes) -> list[str]:
    from pathlib import Path

    found = []
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and secret in path.read_bytes():
                found.append(str(path))
        except OSError:
            pass
    return found


def test_metrics_kept_while_server_is_down_are_sent_when_it_answers(mlflow_stack):
    """Nothing listens at the tracker's address at first; then the module's server answers there
    (through a proxy started on that port: a second server would cost ~15 s of start-up)."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    tracker = Tracker(uri, "late", "late-run", flush_s=0.2, max_backoff_s=1.0)
    tracker.start({"a.b": "1"}, {"t": "x"})
    for step in range(5):
        tracker.log_metrics(step, {"loss": 10.0 - step})
    time.sleep(1.0)
    assert tracker.pending() > 0  # nothing could be sent: no server yet
    proxy = FaultyProxy(mlflow_stack.mlflow_uri, port=port).start()
    try:
        deadline = time.time() + 60
        while tracker.pending() and time.time() < deadline:
            time.sleep(0.5)
        assert tracker.close() is True
        client, run = only_run(mlflow_stack.mlflow_uri, "late")
        assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [10, 9, 8, 7, 6]
        assert run.data.params == {"a.b": "1"} and run.data.tags["t"] == "x"
    finally:
        proxy.stop()


# Before the test that kills the module's server.
def test_a_credential_from_the_environment_lands_in_no_file(local_ray, mlflow_stack, tmp_path, monkeypatch, capfd):
    """The tracking URI arrives through ${VAR} with a password in it. Nothing the run writes holds
    the password: checkpoints (state.json) and the uploaded model, the MLflow store and its
    artifacts (job.yaml, params, tags), the log lines, and Ray's session logs."""
    import uuid

    import ray
    import yaml

    from moe_ray.spec import load_job

    secret = f"pw-{uuid.uuid4().hex[:12]}"
    uri = mlflow_stack.mlflow_uri.replace("http://", f"http://moe:{secret}@")
    monkeypatch.setenv("MOE_RAY_TEST_MLFLOW", uri)
    spec = tiny_job(tmp_path / "runs", train__steps=4, checkpoint__every=2, **REPLICATED).model_dump(mode="json")
    spec["tracking"] = {"uri": "${MOE_RAY_TEST_MLFLOW}", "experiment": "masked", "log_model": True}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    job = load_job(path)
    assert job.tracking.uri == uri  # the run itself uses the real credential
    result = run_job(job, run_name="masked")
    assert result.final_step == 4
    _, run = only_run(mlflow_stack.mlflow_uri, "masked")
    assert run.data.params["tracking.uri"].startswith("http://moe:***@")
    logs = capfd.readouterr()
    assert secret not in logs.out + logs.err
    session = ray._private.worker._global_node.get_session_dir_path()
    leaks = [f for folder in (tmp_path, mlflow_stack.folder, session) for f in files_holding(folder, secret.encode())]
    assert leaks == [], leaks


def test_an_error_in_the_driver_closes_the_run_as_failed(local_ray, mlflow_stack, tmp_path):
    """Not a worker group's failure (a RunError) but the driver's own, here the caller's progress
    callback at its first call, before the workers start: the MLflow run stayed RUNNING for ever."""
    tracking = {"uri": mlflow_stack.mlflow_uri, "experiment": "oops"}
    job = tiny_job(tmp_path, train__steps=1, resources__workers=1, **REPLICATED, tracking=tracking)

    def broken(progress):
        raise ValueError("the callback broke")

    before = tracking_scratch()
    with pytest.raises(ValueError, match="the callback broke"):
        run_job(job, run_name="oops", on_progress=broken)
    _, run = only_run(mlflow_stack.mlflow_uri, "oops")
    assert run.info.status == "FAILED"
    assert run.data.tags["moe_ray.error"] == "in the driver: ValueError: the callback broke"
    assert tracking_scratch() - before == set()


def test_run_completes_when_the_server_dies_mid_run(local_ray, mlflow_stack, tracked_run, tmp_path):
    stack = mlflow_stack  # the module's server: the tests above have read what they need from it
    job = tiny_job(
        tmp_path / "runs",
        train__steps=30,
        **REPLICATED,
        tracking={"uri": stack.mlflow_uri, "experiment": "dies", "log_every": 1, "flush_timeout_s": 2},
    )
    seen = {}  # the last step done when the stop was asked, and at the first look once it was gone

    def kill_after_first_step(progress):
        if progress.metrics and not seen:
            server = stack.procs["mlflow"]  # killed: a graceful stop waits out open connections
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
            seen["at_stop"] = progress.metrics[-1]["step"]
        elif seen and "after_stop" not in seen:
            seen["after_stop"] = progress.metrics[-1]["step"]

    result = run_job(job, run_name="dies", on_progress=kill_after_first_step, poll_s=0.1)
    assert seen.get("after_stop", 29) < 29, seen  # steps were still to come when the server was gone
    assert result.final_step == 30 and result.val_loss is not None


def test_untracked_run_draws_nothing_and_leaves_no_scratch(tmp_path):
    from moe_ray.runtime.run_tracking import RunTracking

    asked = []

    class Coordinator:
        def __getattr__(self, name):
            asked.append(name)
            raise AttributeError(name)

    before = tracking_scratch()
    tracking = RunTracking(tiny_job(tmp_path, tracking={"enabled": False}), "off", None)
    assert tracking_scratch() - before  # made while the run goes on
    assert list(tracking.tmp.iterdir()) == []  # no job.yaml that nothing sends
    tracking.heatmap(Coordinator())
    assert asked == []  # a heatmap is drawn for MLflow only: ~1 s of the driver's CPU
    tracking.finish(None, Coordinator(), status="KILLED")
    assert tracking_scratch() - before == set()


def test_flatten_redacts_secret_looking_keys():
    flat = flatten({"a": {"b": 1, "api_token": "xyz"}, "password": "p"})
    assert flat == {"a.b": "1", "a.api_token": "***", "password": "***"}
    # Credentials inside a value (e.g. brought in by ${VAR}) are masked, the rest kept.
    flat = flatten({"uri": "http://bob:s3cret@mlflow:5000", "src": "s3://AKIAABCDEFGHIJKLMNOP@b/x"})
    assert flat == {"uri": "http://bob:***@mlflow:5000", "src": "s3://***@b/x"}


def test_secret_detection_is_by_whole_name_part():
    from moe_ray.secrets import looks_secret_key

    assert all(map(looks_secret_key, ["aws_secret_access_key", "password", "api_token", "token", "AWS_SESSION_TOKEN"]))
    assert not any(map(looks_secret_key, ["max_nodes_per_token", "tokenizer", "tokens_per_s", "keep"]))
