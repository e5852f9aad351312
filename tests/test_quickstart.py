"""The quickstart job end to end through the CLI, as `make run` runs it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
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
    ckpt_line = re.search(r"checkpoint: (\S+)", out)[1]
    assert Path(ckpt_line, "index.json").is_file()
    assert "step-00000100" in ckpt_line


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


@pytest.mark.slow
def test_an_elastic_job_runs_on_the_embedded_ray(tmp_path):
    proc = quickstart(tmp_path, "resources.workers={min: 1, max: 2}", "train.steps=2", "train.eval_every=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]  # a TypeError sizing the embedded Ray, before
    assert re.search(r"32 experts over [12] workers", out) and "done: run" in out, out[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for GPUs this machine must not have")
def test_a_job_the_cluster_cannot_hold_is_refused_before_its_data(tmp_path):
    """Ray Train would wait for the missing GPUs without end, retrying every minute."""
    proc = quickstart(tmp_path, "resources.use_gpu=true")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "resources.workers: 2 workers need 2 GPU (1 each) and the cluster has 0 in all: add GPU nodes, "
        "or set resources.use_gpu: auto" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("manifest.json"))  # no data prepared
