"""The quickstart job end to end through the CLI, as `make run` runs it."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import with_preemption_watcher

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_job_end_to_end(tmp_path):
    cli = Path(sys.executable).parent / "moe-ray"
    proc = subprocess.run(
        # A third of the steps (test time): the same job, CLI, log lines, evaluations and checkpoint.
        [
            str(cli),
            "run",
            str(ROOT / "jobs" / "quickstart.yaml"),
            "--set",
            f"checkpoint.storage={tmp_path}",
            "--set",
            "train.steps=100",
            "--set",
            "train.eval_every=40",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=with_preemption_watcher(os.environ),  # as a user runs it (the embedded Ray leaves it out itself)
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "PreemptionWatcher" not in out  # nor Ray's ERROR line about it (ray#53727; test_submit: hidden on a cluster)
    assert "Creating initial MLflow database" not in out  # a new local store is made quietly
    assert "Token authentication is enabled" not in out  # Ray's warning that it chose token mode
    # Periodic log lines (not a terminal) with step, loss, tokens/s and MaxVio.
    assert re.search(r"step 25/100 loss [\d.]+ .* tok/s maxvio [\d.]+", out), out[-3000:]
    m = re.search(r"train loss ([\d.]+), val loss ([\d.]+), MaxVio_global ([\d.]+)", out)
    assert m, out[-3000:]
    val_loss = float(m[2])
    assert val_loss < 2.5  # ln(256) = 5.55 for a model that learned nothing
    evals = [float(v) for v in re.findall(r"eval @ step \d+: val loss ([\d.]+)", out)]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert step_order(proc.stderr) == sorted(step_order(proc.stderr))
    ckpt_line = re.search(r"checkpoint: (\S+)", out)[1]
    assert Path(ckpt_line, "index.json").is_file()
    assert "step-00000100" in ckpt_line


def step_order(shown: str) -> list[tuple[int, int]]:
    """(steps done, 0 for a step line or 1 for an event) of each progress line, as shown."""
    lines = re.finditer(r"^(?:step (\d+)/\d+ |(?:eval|checkpoint) @ step (\d+))", shown, re.M)
    return [(int(m[1] or m[2]), 0 if m[1] else 1) for m in lines]


def test_progress_lines_come_in_step_order(capsys):
    """The driver reads a step's metrics and its events (evaluation, checkpoint) in one poll: the
    events were printed first ("eval @ step 100" above "step 100/300 ...")."""
    from moe_ray.console import ProgressReporter
    from moe_ray.runtime.driver import Progress

    metric = {"loss": 2.0, "lm_loss": 1.5, "lr": 1e-3, "tokens_per_s": 1000.0}
    progress = Progress(run_name="r", total_steps=300, metrics=[{"step": i, **metric} for i in range(100)])
    progress.events = [
        {"event": "eval", "step": 100, "val_loss": 1.9, "max_vio_global_mean": 0.4},
        {"event": "checkpoint", "step": 100},
    ]
    ProgressReporter(300, 25, interactive=False)(progress)
    shown = step_order(capsys.readouterr().err)
    assert shown == [(1, 0), (25, 0), (50, 0), (75, 0), (100, 0), (100, 1), (100, 1)], shown


def test_invalid_job_is_refused_with_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel:\n  d_model: 100\n  n_heads: 3\ntrain:\n  stepz: 3\n")
    cli = Path(sys.executable).parent / "moe-ray"
    proc = subprocess.run([str(cli), "run", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "model: " in proc.stderr and "n_heads=3 must divide" in proc.stderr
    assert "train.stepz: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_scale_of_an_unknown_local_run_is_refused():
    cli = Path(sys.executable).parent / "moe-ray"
    proc = subprocess.run(
        [str(cli), "scale", "no-such-run-here", "--workers", "2"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "no run 'no-such-run-here' is running on this machine" in proc.stderr


def quickstart(tmp_path, *settings, timeout=300):
    """`moe-ray run` of the quickstart job with `settings`, its checkpoints under tmp_path."""
    cli = Path(sys.executable).parent / "moe-ray"
    sets = [a for s in (f"checkpoint.storage={tmp_path}", *settings) for a in ("--set", s)]
    return subprocess.run(
        [str(cli), "run", str(ROOT / "jobs" / "quickstart.yaml"), *sets],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for GPUs this machine must not have")
def test_a_job_the_cluster_cannot_hold_is_refused_before_its_data(tmp_path):
    """Ray Train would wait for the missing GPUs without end, retrying every minute."""
    proc = quickstart(tmp_path, "resources.use_gpu=true")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "resources.workers: 2 workers need 2 GPU (1 each) and this machine's Ray has 0 in all: run the job "
        "on a cluster with GPU nodes (--address), or set resources.use_gpu: auto" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("manifest.json"))  # no data prepared


@pytest.mark.slow
def test_ctrl_c_stops_the_run_marks_it_killed_and_says_how_to_continue(tmp_path):
    """On an elastic job (one run for both: a TypeError sizing the embedded Ray failed those)."""
    from mlflow.tracking import MlflowClient

    cli = Path(sys.executable).parent / "moe-ray"
    sets = ["--set", f"checkpoint.storage={tmp_path}", "--set", "checkpoint.every=10", "--set", "train.log_every=5"]
    sets += ["--set", "resources.workers={min: 1, max: 2}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the local store in cwd
    job = str(ROOT / "jobs" / "quickstart.yaml")
    proc = subprocess.Popen(
        [str(cli), "run", job, *sets, "--run", "stopped"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
        # A shell's background job (CI's, perhaps) ignores SIGINT, and its children inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "checkpoint @ step 10" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out[-3000:]
    assert re.search(
        r"interrupted: run stopped stopped after \d+ steps; its newest checkpoint is of step 10: continue "
        rf"it with moe-ray run {job} --set checkpoint.storage={tmp_path} .* --resume --run stopped",
        out,
    ), out[-3000:]
    assert re.search(r"32 experts over [12] workers", out) and "'resources.workers={min: 1, max: 2}'" in out
    assert "Traceback" not in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow_runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in mlflow_runs] == [("stopped", "KILLED")]


def interrupt_once(args, cwd, started, timeout=180, meanwhile=None) -> tuple[int, str]:
    """Run `moe-ray ARGS`, send it SIGINT (Ctrl-C) as soon as `started()` holds (and `meanwhile()`
    has run, if given), and return its exit code and output."""
    import time

    log = cwd / "interrupted.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moe-ray"), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # see the Ctrl-C test above
        )
        deadline = time.monotonic() + timeout
        while not started() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"it ended before it was interrupted:\n{log.read_text()[-3000:]}"
        if meanwhile:
            meanwhile()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    return proc.returncode, log.read_text()


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """100 MB of JSONL: several seconds of tokenising, to be interrupted in."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    line = '{"text": "def f(x):\\n    return x * 2  # ' + "abc " * 200 + '"}\n'
    path.write_text(line * 120_000)
    return path


@pytest.mark.slow
def test_ctrl_c_while_preparing_stops_the_task_and_leaves_no_half_written_data(tmp_path, big_corpus):
    """The task was left to die with Ray: it left a hidden half-written folder, and nothing was said."""
    staged = lambda folder, name: list(folder.glob(f".{name}.partial-*"))  # noqa: E731

    code, out = interrupt_once(["prepare", str(big_corpus), "out"], tmp_path, lambda: staged(tmp_path, "out"))
    assert code == 130 and "interrupted: nothing was written to out" in out, out[-3000:]
    assert not staged(tmp_path, "out") and not (tmp_path / "out").exists()

    # A run preparing its raw text on first use: said, and the same clean-up.
    data = tmp_path / "runs" / "early" / "data"
    job = str(ROOT / "jobs" / "quickstart.yaml")
    sets = ["--set", f"checkpoint.storage={tmp_path / 'runs'}", "--set", f"data.source={big_corpus}"]
    # `moe-ray scale` meanwhile: the run is there, but has no coordinator yet ("no running run").
    scaled = []
    scale = [str(Path(sys.executable).parent / "moe-ray"), "scale", "early", "--workers", "1"]
    code, out = interrupt_once(
        ["run", job, *sets, "--run", "early"],
        tmp_path,
        lambda: staged(data, "*"),
        meanwhile=lambda: scaled.append(subprocess.run(scale, capture_output=True, text=True, timeout=120)),
    )
    assert scaled[0].returncode == 1 and scaled[0].stderr.startswith(
        "error: run 'early' has not started training yet (it is preparing its data): it takes scale requests once "
        "its workers start; try again when it logs its first step"
    ), scaled[0].stderr
    assert code == 130, out[-3000:]
    assert (
        f"interrupted: run early stopped while preparing its data; it has no checkpoint yet: start it again "
        f"with moe-ray run {job} {' '.join(sets)}" in out
    ), out[-3000:]
    assert "Traceback" not in out and list(data.iterdir()) == []
