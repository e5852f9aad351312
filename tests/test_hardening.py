"""Bad input is refused before it does harm (issue: hardening): empty job files, run names that
would reach a shell, checkpoints whose state.json was altered, paths a checkpoint names."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import tiny_job, write_checkpoint
from typer.testing import CliRunner

from moe_ray.cli import app
from moe_ray.spec import dump_job
from moe_ray.storage import checkpoint as ckpt


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a list\n- of things\n", "just a string\n"])
def test_empty_or_non_mapping_job_file_is_refused(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 2, out.output
    assert re.search(r"the job file is empty|must be a YAML mapping", out.output), out.output


def test_an_address_where_something_else_listens_is_named_after_rays_gcs_timeout(tmp_path):
    """A dashboard's port given without http:// (or any other server): Ray's GCS client waits
    out its connect timeout (40 s by default; 11 s here), then the address is named; ray.init
    waited on it for more than 5 minutes."""
    import os
    import socket
    import subprocess
    import sys

    path = tmp_path / "job.yaml"
    path.write_text(dump_job(tiny_job(tmp_path / "runs")))
    with socket.create_server(("0.0.0.0", 0)) as server:  # Ray dials this node's IP for 127.0.0.1
        address = f"127.0.0.1:{server.getsockname()[1]}"
        out = subprocess.run(
            [str(Path(sys.executable).parent / "moe-ray"), "run", str(path), "--address", address],
            env={**os.environ, "RAY_py_gcs_connect_timeout_s": "1"},  # read once per process
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(
        rf"--address {address}: something listens at \S+, but no Ray cluster answered there in 1\d s: give the "
        r"head's GCS port",
        out.stderr,
    ), out.stderr


def test_an_address_no_ray_cluster_answers_is_refused_at_once(tmp_path, monkeypatch):
    """ray.init retried a closed port for minutes without a word, and met a dashboard URL (what
    `submit` takes) with a traceback."""
    from conftest import free_port

    from moe_ray.runtime.cluster import ClusterAddressError, check_cluster_address

    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(ClusterAddressError, match=f"--address {closed}: no Ray cluster answers: check the address"):
        check_cluster_address(closed)
    with pytest.raises(ClusterAddressError, match="is a Ray dashboard .* moe-ray submit JOB --address http://h:8265"):
        check_cluster_address("http://h:8265")
    with pytest.raises(ClusterAddressError, match="not a Ray cluster address"):
        check_cluster_address("nonsense")
    monkeypatch.setenv("RAY_ADDRESS", closed)  # what 'auto' reads first
    with pytest.raises(ClusterAddressError, match="--address auto: no Ray cluster answers at .*RAY_ADDRESS"):
        check_cluster_address("auto")
    monkeypatch.setenv("RAY_ADDRESS", "http://h:8265")  # as set for `moe-ray submit`
    with pytest.raises(ClusterAddressError, match="RAY_ADDRESS http://h:8265 is a Ray dashboard"):
        check_cluster_address("auto")
    monkeypatch.delenv("RAY_ADDRESS")
    path = tmp_path / "job.yaml"
    path.write_text(dump_job(tiny_job(tmp_path / "runs")))
    out = CliRunner().invoke(app, ["run", str(path), "--address", closed])
    assert out.exit_code == 1 and f"--address {closed}: no Ray cluster answers" in out.output, out.output
    out = CliRunner().invoke(app, ["prepare", "builtin", str(tmp_path / "data"), "--address", "http://h:8265"])
    assert out.exit_code == 1 and "is a Ray dashboard" in out.output, out.output


def test_submit_refuses_relative_paths_the_cluster_would_not_find_or_would_lose(tmp_path):
    from conftest import free_port

    nowhere = f"http://127.0.0.1:{free_port()}"
    quickstart = str(Path(__file__).resolve().parent.parent / "jobs" / "quickstart.yaml")

    def submit(*sets):
        return CliRunner().invoke(
            app, ["submit", quickstart, "--address", nowhere, *[a for s in sets for a in ("--set", s)]]
        )

    out = submit("data.source=./corpus.jsonl", "tracking.uri=sqlite:///mlflow.db")
    assert out.exit_code == 2 and "cannot run on a cluster as it is (3 problem(s)" in out.output, out.output
    assert "checkpoint.storage './runs' is a relative path" in out.output
    assert "data.source './corpus.jsonl' is a relative path" in out.output
    assert "tracking.uri sqlite:///mlflow.db is a relative SQLite file" in out.output
    storage = "checkpoint.storage=s3://b/runs"
    for sets in ([storage, f"tracking.uri={nowhere}"], [storage, f"data.source={tmp_path}/corpus.jsonl"]):
        out = submit(*sets)
        assert out.exit_code == 1 and "cannot reach the Ray Jobs API" in out.output, out.output  # passed the check
        # With no tracking.uri the cluster's MLFLOW_TRACKING_URI decides, which this machine cannot see.
        assert ("warning: no tracking.uri" in out.output) == ("tracking.uri" not in " ".join(sets))


BAD_NAME = "x; touch /tmp/pwned #"


def test_rebalance_of_an_unknown_local_run_is_refused():
    import ray

    out = CliRunner().invoke(app, ["rebalance", "no-such-run-here"])
    assert out.exit_code == 1 and "no run 'no-such-run-here' is running on this machine" in out.output
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "jobs/quickstart.yaml", "--run", BAD_NAME],
        ["submit", "jobs/quickstart.yaml", "--run", BAD_NAME, "--address", "http://127.0.0.1:9"],
        ["scale", BAD_NAME, "--workers", "2", "--address", "http://127.0.0.1:9"],
        ["rebalance", BAD_NAME, "--address", "http://127.0.0.1:9"],
        ["checkpoints", "../" + "etc"],
    ],
    ids=["run", "submit", "scale", "rebalance", "checkpoints"],
)
def test_run_names_with_shell_syntax_are_refused_before_any_cluster(argv):
    import ray

    out = CliRunner().invoke(app, argv)
    assert out.exit_code == 2, out.output  # 1 would mean it went on and failed to reach the cluster
    assert "is not a valid run name" in out.output
    assert not ray.is_initialized()


def test_a_run_folder_given_for_a_run_name_gets_the_command_that_lists_it():
    out = CliRunner().invoke(app, ["checkpoints", "s3://bucket/runs/quick-1/"])
    assert out.exit_code == 2 and "moe-ray checkpoints quick-1 --storage s3://bucket/runs" in out.output, out.output
    out = CliRunner().invoke(app, ["checkpoints", BAD_NAME])  # no command suggested from a name that breaks the rule
    assert out.exit_code == 2 and "moe-ray checkpoints" not in out.output and "is not a valid run name" in out.output


def test_a_run_name_that_holds_nothing_gets_the_runs_that_are_there(tmp_path):
    """A mistyped name said only "no checkpoints under STORAGE/NAME"."""
    out = CliRunner().invoke(app, ["checkpoints", "quick-2", "--storage", str(tmp_path)])
    assert out.exit_code == 1 and f"({tmp_path} holds no runs)" in out.output, out.output
    for name in ("quick-1", "long-3"):
        (tmp_path / name / "step-00000010").mkdir(parents=True)
    out = CliRunner().invoke(app, ["checkpoints", "quick-2", "--storage", str(tmp_path)])
    assert (
        out.exit_code == 1
        and f"no checkpoints under {tmp_path / 'quick-2'} (runs in {tmp_path}: long-3, quick-1)" in (out.output)
    ), out.output


def test_cluster_command_lines_quote_their_arguments():
    from moe_ray.submit import control_entrypoint, run_entrypoint

    # Quoted even if a name got past the rule: each argument stays one argument.
    assert shlex.split(run_entrypoint(BAD_NAME))[-1] == BAD_NAME
    assert shlex.split(control_entrypoint("scale", BAD_NAME, "--workers", "3"))[4] == BAD_NAME


def test_altered_state_json_is_refused_before_the_model_is_built(tmp_path):
    from moe_ray.inference import load_model

    folder = write_checkpoint(tmp_path / "step-1", tiny_job(tmp_path))
    assert load_model(str(folder), torch.device("cpu")).step == 1
    state = json.loads((folder / ckpt.STATE).read_text())
    state["job"]["model"]["n_heads"] = 5  # a model no one trained (and not even a valid one)
    (folder / ckpt.STATE).write_text(json.dumps(state, indent=2, sort_keys=True))  # same size: the hash must tell
    with pytest.raises(ckpt.CheckpointError, match="state.json does not match its sha256"):
        load_model(str(folder), torch.device("cpu"))
    out = CliRunner().invoke(app, ["generate", str(folder), "--prompt", "x", "--max-new-tokens", "2"])
    assert out.exit_code == 1 and "does not match its sha256" in out.output


def test_paths_named_inside_a_checkpoint_are_not_opened_unless_given(tmp_path):
    victim = tmp_path / "not-for-you.json"
    victim.write_text("{}")
    job = tiny_job(tmp_path, data__tokenizer=str(victim), data__source=str(tmp_path / "corpus"))
    folder = write_checkpoint(tmp_path / "step-1", job)
    gen = CliRunner().invoke(app, ["generate", str(folder), "--prompt", "x", "--max-new-tokens", "2"])
    assert gen.exit_code == 1 and f"--tokenizer {victim}" in gen.output, gen.output
    ev = CliRunner().invoke(app, ["eval", str(folder), "--tokenizer", "bytes"])
    assert ev.exit_code == 1 and "does not open paths named inside a checkpoint" in ev.output
    assert "--data" in ev.output
    # Given explicitly, it is used (here: byte tokens).
    ok = CliRunner().invoke(
        app, ["generate", str(folder), "--prompt", "x", "--max-new-tokens", "2", "--tokenizer", "bytes"]
    )
    assert ok.exit_code == 0, ok.output


def test_the_job_file_sent_to_a_cluster_keeps_credentials_as_references(tmp_path, monkeypatch):
    from moe_ray.spec import dump_job, dump_job_for_cluster, job_record, load_job

    monkeypatch.setenv("TRACKING", "http://bob:hunter2secret@mlflow.internal:5000")
    monkeypatch.setenv("TEAM_API_TOKEN", "tok-0123456789")
    monkeypatch.setenv("WORKERS", "3")
    path = tmp_path / "job.yaml"
    path.write_text(
        "tracking:\n  uri: ${TRACKING}\n  experiment: team-${TEAM_API_TOKEN}\nresources:\n  workers: ${WORKERS}\n"
    )
    job = load_job(path)
    for text in (dump_job(job), str(job_record(job))):
        assert "hunter2secret" not in text and "tok-0123456789" not in text
    sent = dump_job_for_cluster(job)
    assert "hunter2secret" not in sent and "tok-0123456789" not in sent
    assert "${TRACKING}" in sent and "team-${TEAM_API_TOKEN}" in sent
    assert "workers: 3" in sent  # not a credential: resolved as usual
    # On the cluster, with the same environment, the file is the same job.
    (tmp_path / "sent.yaml").write_text(sent)
    assert load_job(tmp_path / "sent.yaml").model_dump() == job.model_dump()


def test_help_shows_flags_as_flags():
    # A flag followed by a type reads as an option that takes a value (typer 0.29 printed "<bool>").
    out = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "120"})
    assert out.exit_code == 0, out.output
    for flag in ("--resume", "--help"):
        line = next(line for line in out.output.splitlines() if flag in line)
        assert "bool" not in line.lower(), line


def test_the_commands_that_only_ask_the_cluster_load_no_torch(tmp_path):
    # `moe-ray status/logs/stop/list/scale/rebalance` of a submitted job answer in about a second:
    # importing torch (through the checkpoint format, or the driver) made each take ~3 s more.
    # `moe-ray prepare` needs none either (it made the command, and each of Ray Data's worker
    # processes that tokenise, ~1.5 s slower).
    from conftest import cli_then_loaded, free_port

    nowhere = f"http://127.0.0.1:{free_port()}"
    commands = [
        ["status", "moe-ray-r-1", "--address", nowhere],
        ["list", "--address", nowhere],
        ["scale", "moe-ray-r-1", "--workers", "2", "--address", nowhere],
        ["rebalance", "moe-ray-r-1", "--address", nowhere],
        ["prepare", str(tmp_path / "text.txt"), str(tmp_path / "out"), "--address", nowhere.removeprefix("http://")],
    ]
    (tmp_path / "text.txt").write_text("a document\n")
    out = cli_then_loaded(commands, exit_code=1, packages=("torch", "mlflow", "pandas"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count(f"cannot reach the Ray Jobs API at {nowhere}") == len(commands) - 1, out.stderr
    assert f"--address {nowhere.removeprefix('http://')}: no Ray cluster answers" in out.stderr, out.stderr
