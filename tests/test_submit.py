"""Submission to a real Ray head (`ray start --head`, token authentication on) through the Ray
Jobs API, with the runs tracked in a real MLflow server."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from conftest import REPLICATED, free_port, tiny_job, with_preemption_watcher
from mlflow.tracking import MlflowClient

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def cli(*args, timeout=300, check=True):
    proc = subprocess.run([str(BIN / "moe-ray"), *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


class Head(NamedTuple):
    dashboard: str  # http://127.0.0.1:PORT: the Jobs API (submit)
    gcs: str  # 127.0.0.1:PORT: what `run --address` joins


@pytest.fixture(scope="module")
def head():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    dash, gcs_port = free_port(), free_port()
    env = with_preemption_watcher(dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}"))
    env.pop("RAY_AUTH_MODE", None)  # token authentication: Ray's default
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live below it
    # --block keeps `ray start` in the foreground; an interrupt to it stops this head's processes
    # and no others (`ray stop` would stop every Ray of the user, a developer's own included).
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            # Its own: the head records its address there (ray_current_cluster), where a later
            # `--address auto` on this machine would find it after the test.
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            # Not the fixed default 52365, which another Ray on this machine may hold.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-port={dash}",
            "--num-cpus=3",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        cwd=temp_dir,  # as on a cluster: Ray's workers start where `ray start` ran, not where a user types
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: what stop_head may kill, and nothing else
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers (perhaps 401): up
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                stop_head(head)
                raise RuntimeError(f"the Ray head did not start (exit code {head.poll()})") from None
            time.sleep(0.5)
    yield Head(address, f"127.0.0.1:{gcs_port}")
    stop_head(head)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(head):
    return head.dashboard


def stop_head(head):
    """An interrupt stops the head's processes (seconds); when it does not (after jobs have run it
    waits out 120 s, and each second of waiting here costs every CI run a second), its process
    group is killed."""
    head.send_signal(signal.SIGINT)
    try:
        head.wait(timeout=1)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


def write_job(tmp_path, name, steps, mlflow_uri):
    job = tiny_job(
        tmp_path / "runs",
        name=name,
        train__steps=steps,
        train__batch_size=4,
        resources__workers=1,
        **REPLICATED,
        tracking={"uri": mlflow_uri, "experiment": "submitted", "log_every": 1},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    return path


def test_jobs_api_refuses_a_client_without_the_token(ray_head):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head}/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)


def test_run_address_sends_this_machines_token_and_names_a_refused_one(head, tmp_path):
    """Ray sends the token to an explicit address only in token mode, which `run --address`
    turns on when a token exists; a refused token is named in seconds, not after 20 s of retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    # With this machine's moe-ray shipped (py_modules, as `submit` does): the cluster runs it.
    probe = (
        "import sys, ray; from moe_ray.runtime.cluster import join; join(sys.argv[1], ship_code=True); "
        "where = ray.remote(lambda: __import__('moe_ray').__file__); "
        "print(ray.cluster_resources()['CPU'], ray.get(where.remote()))"
    )
    joined = subprocess.run(  # not in the checkout: Ray puts the driver's folder first on the workers' path
        [sys.executable, "-c", probe, head.gcs], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert joined.returncode == 0, joined.stdout + joined.stderr
    cpus, code = joined.stdout.split()[-2:]
    assert cpus == "3.0" and "/runtime_resources/py_modules_files/" in code, joined.stdout

    job = tmp_path / "token.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tmp_path / "runs", name="token").model_dump(mode="json")))
    for extra, says in (
        ({"RAY_AUTH_TOKEN": "0" * 32}, "this machine's token .* is not the cluster's"),
        ({"HOME": str(tmp_path)}, "this machine has no Ray token"),  # no ~/.ray/auth_token there
        ({"RAY_AUTH_MODE": "disabled"}, "RAY_AUTH_MODE=disabled here keeps this machine's token from being sent"),
    ):
        out = subprocess.run(
            [str(BIN / "moe-ray"), "run", str(job), "--address", head.gcs],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode != 0, out.stdout + out.stderr
        assert re.search(
            f"--address {head.gcs}: the Ray cluster at .* uses token authentication and {says}", out.stderr
        ), out.stderr
        assert "Traceback" not in out.stderr and "0" * 32 not in out.stdout + out.stderr


def test_prepare_and_run_on_a_cluster_read_relative_paths_where_they_were_typed(head, tmp_path):
    """Ray's tasks and workers run in the folder where `ray start` ran: relative paths are made
    absolute before they travel. Before, the user-data job said 'data.tokenizer ./tokenizer.json
    is not a file', prepare wrote its shards into the head's folder, and a relative source was a
    FileNotFoundError traceback."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = [f"w{i}" for i in range(40)]
    docs = [" ".join(words[(d + i) % 40] for i in range(60)) for d in range(120)]
    (tmp_path / "corpus.jsonl").write_text("".join(f'{{"text": "{d}"}}\n' for d in docs))
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    tok.save(str(tmp_path / "tok.json"))

    def moe_ray(*args):
        return subprocess.run(
            [str(BIN / "moe-ray"), *args, "--address", head.gcs],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    out = moe_ray("prepare", "corpus.jsonl", "prepared", "--tokenizer", "tok.json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "prepared" / "manifest.json").is_file()

    job = tiny_job("runs", name="rel", train__steps=2, train__batch_size=2, resources__workers=1, **REPLICATED)
    spec = job.model_dump(mode="json") | {"tracking": {"enabled": False}}
    spec["data"] |= {"source": "corpus.jsonl", "tokenizer": "./tok.json"}  # raw: prepared by the run
    (tmp_path / "rel.yaml").write_text(yaml.safe_dump(spec))
    out = moe_ray("run", "rel.yaml", "--run", "rel-1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "runs" / "rel-1" / "step-00000002").is_dir()


def test_a_cluster_without_s3_access_is_named_not_just_pyarrows_access_denied(head, tmp_path):
    """The driver reaches S3 with this machine's credentials; the cluster (here: a head started
    without them) does not get them. The run failed with a bare OSError from Ray Train's
    controller, or at its first checkpoint, or as a missing dataset."""
    from conftest import LocalStack

    stack = LocalStack(tmp_path / "s3", bucket="runs", mlflow=False).start()
    try:
        # max_failures -1 (restart for ever): the workers' finding stops the run at once.
        job = tiny_job("s3://runs/r", name="s3", train__steps=2, resources__workers=1, resources__max_failures=-1)
        spec = job.model_dump(mode="json") | {"tracking": {"enabled": False}}
        (tmp_path / "s3.yaml").write_text(yaml.safe_dump(spec))
        out = subprocess.run(
            [str(BIN / "moe-ray"), "run", str(tmp_path / "s3.yaml"), "--address", head.gcs],
            env={**os.environ, **stack.env()},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        stack.stop()
    assert out.returncode == 1, out.stdout + out.stderr
    # Named by the workers' check before their first step (or, where Ray Train's controller fails
    # first, after pyarrow's "AWS Error ACCESS_DENIED"), with the fix.
    said = " ".join(out.stderr.split())
    assert re.search(
        r"error: run s3-\S+ failed: .*(the workers on \S+ \(node \w+\) cannot use checkpoint\.storage: no AWS "
        r"credentials for s3://runs/r/|AWS Error ACCESS_DENIED).*nodes need S3 access of their own.*moe-ray does "
        r"not send this machine's credentials",
        said,
    ), out.stderr[-3000:]
    assert "testing" not in out.stdout + out.stderr  # the test credentials, never printed
    assert "restarted" not in out.stderr, out.stderr[-3000:]
    # Nor the workers' tracebacks of it, one per rank (Ray Train logs each, and a cluster forwards them).
    assert "Traceback" not in out.stderr and "Error in training function" not in out.stderr, out.stderr[-3000:]
    assert "PreemptionWatcher" not in out.stderr, out.stderr[-3000:]  # Ray's ERROR line on every run (RAY_NOISE)


def test_a_submission_id_the_cluster_does_not_know_is_one_line_not_a_traceback(ray_head):
    # Before this module's first submission: an empty list says so (it was a bare header).
    assert cli("list", "--address", ray_head).stdout.startswith(f"no moe-ray jobs at {ray_head}")
    for command in (["status"], ["logs"], ["logs", "--follow"], ["stop"]):
        out = cli(*command, "no-such-job", "--address", ray_head, check=False, timeout=120)
        assert out.returncode == 1, out.stdout + out.stderr
        assert out.stderr.startswith(f"error: no job no-such-job at {ray_head} (`moe-ray list"), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def wait_for(what, probe, timeout):
    """Poll `probe` (cheap: the Jobs API in this process, not a CLI start of ~3 s) until it returns
    something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while not (found := probe()):
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.5)
    return found


def test_submit_follow_logs_stop_list(ray_head, mlflow_stack, tmp_path):
    from moe_ray.submit import client as jobs_client

    jobs = jobs_client(ray_head)  # polls only; every answer asserted comes from the CLI
    # A job that finishes.
    submitted = cli("submit", str(write_job(tmp_path, "small", 3, mlflow_stack.mlflow_uri)), "--address", ray_head)
    out = submitted.stdout
    sub_id = re.search(r"submitted (\S+)", out)[1]
    assert " INFO " not in submitted.stderr, submitted.stderr  # Ray's lines about each package it uploads
    assert re.search(r"MLflow run: http://127\.0\.0\.1:\d+/#/experiments/\d+/runs/\w+", out)
    followed = cli("logs", sub_id, "--follow", "--address", ray_head, timeout=400)
    assert "done: run small-" in followed.stdout and ", 3 steps" in followed.stdout, followed.stdout[-3000:]
    assert f"[{sub_id}: SUCCEEDED]" in followed.stderr, followed.stderr
    assert "SUCCEEDED" in cli("status", sub_id, "--address", ray_head).stdout
    # Its MLflow run: created at submission, filled by the driver on the cluster.
    tracking = MlflowClient(mlflow_stack.mlflow_uri)
    exp = tracking.get_experiment_by_name("submitted")
    runs = tracking.search_runs([exp.experiment_id], filter_string=f"tags.`ray.submission_id` = '{sub_id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in tracking.get_metric_history(runs[0].info.run_id, "loss")] == [0, 1, 2]

    # The same run name again: refused on the cluster before any training (it would have
    # continued that run quietly).
    small_run = re.search(r"\(run (\S+)\)", out)[1]
    job_file = str(write_job(tmp_path, "small", 3, mlflow_stack.mlflow_uri))
    again = cli("submit", job_file, "--run", small_run, "--address", ray_head).stdout
    again_id = re.search(r"submitted (\S+)", again)[1]
    wait_for("end of the refused job", lambda: jobs.get_job_status(again_id).is_terminal(), 120)
    refused = cli("logs", again_id, "--address", ray_head).stdout  # without --follow: the log so far
    assert f"already holds that run's checkpoints: continue it with --resume --run {small_run}" in " ".join(
        refused.split()
    ), refused[-3000:]
    # Its status: Ray's one line and moe-ray's error, not Ray's whole message (the log's tail).
    status = cli("status", again_id, "--address", ray_head).stdout.splitlines()
    assert status[0] == f"{again_id}: FAILED (Job entrypoint command failed with exit code 1)", status
    assert status[1].startswith("  error: ") and "already holds that run's checkpoints" in status[1], status
    assert status[3] == f"  its log: moe-ray logs {again_id} --address {ray_head}" and len(status) == 4, status
    # With --resume it goes on from step 3 in the same MLflow run, a long run now (one job less to
    # start than a resumed run of its own): scaled by submission id, then stopped while it runs.
    resumed = cli(
        "submit", job_file, "--resume", "--run", small_run, "--set", "train.steps=100000", "--address", ray_head
    ).stdout
    assert f"/runs/{runs[0].info.run_id}" in resumed  # the same MLflow run's link
    long_id = re.search(r"submitted (\S+)", resumed)[1]
    resumed_with_1 = r"resumed at step 3: .*1 workers"
    wait_for("resume with 1 worker", lambda: re.search(resumed_with_1, jobs.get_job_logs(long_id)), 120)
    assert "RUNNING" in cli("status", long_id, "--address", ray_head).stdout
    # `moe-ray scale` by submission id: the run goes on from a step boundary with 2 workers.
    assert f"scale request for {long_id} sent" in cli("scale", long_id, "--workers", "2", "--address", ray_head).stdout
    restart = r"restarted \(scale\) at step \d+ with 2 workers: 0 step"
    logs = wait_for("restart with 2 workers", lambda: re.search(restart, jobs.get_job_logs(long_id)), 180).string
    assert "scale requested: 2 workers" in logs
    assert "stop requested" in cli("stop", long_id, "--address", ray_head).stdout
    wait_for("stop", lambda: jobs.get_job_status(long_id).is_terminal(), 120)
    logs = cli("logs", long_id, "--address", ray_head).stdout
    # Ray Train's INFO lines (each report's whole metrics dict, the worker group's start) do not
    # drown the progress lines in the job's log.
    assert "Reporting training result" not in logs and "training worker group" not in logs, logs[-3000:]
    assert "PreemptionWatcher" not in logs, logs[-3000:]  # nor Ray's ERROR line about its own actor
    # Ray stops a job's driver with SIGTERM (SIGKILL 3 s later), taken as Ctrl-C: the MLflow run
    # is KILLED, not RUNNING for ever, and the log says how to go on.
    stopped = " ".join(logs.split())
    assert re.search(
        rf"interrupted: run {small_run} stopped after \d+ steps; its newest checkpoint is of step \d+: "
        rf"continue it with moe-ray submit JOB --resume --run {small_run}",
        stopped,
    ), stopped[-2000:]
    # MLflow params cannot change: the first ones stay, a tag says what the resume changed (a
    # changed param used to fail every batch, and the resumed steps' metrics never arrived).
    run = tracking.get_run(runs[0].info.run_id)
    assert run.info.status == "KILLED"
    assert [m.step for m in tracking.get_metric_history(run.info.run_id, "loss")][:4] == [0, 1, 2, 3]
    assert run.data.params["train.steps"] == "3"
    assert run.data.tags["moe_ray.params_changed_on_resume"] == "train.steps: 3 -> 100000"

    # Ray Train's placement-group cleaner (it asks the dashboard's State API whether a controller
    # died without removing its workers' placement group): kept where a dashboard answers it.
    from ray.util.state import list_actors

    cleaners = list_actors(address=ray_head, filters=[("class_name", "=", "PlacementGroupCleaner")])
    assert cleaners, "no PlacementGroupCleaner on a head with a dashboard"

    listing = cli("list", "--address", ray_head).stdout
    assert re.search(rf"{re.escape(sub_id)}\s+SUCCEEDED\s+small-", listing)
    assert re.search(rf"{re.escape(again_id)}\s+FAILED\s+small-", listing)
    assert re.search(rf"{re.escape(long_id)}\s+STOPPED\s+small-", listing)
