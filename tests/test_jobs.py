"""Every job file in jobs/ validates, and the job-spec rules hold."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_ray.spec import JobSpecError, load_job

JOBS = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_job_file_validates(path):
    job = load_job(path)
    assert job.name == path.stem


def test_deepseek_v3_job_has_the_v3_shape():
    job = load_job(next(p for p in JOBS if p.stem == "deepseek-v3"))
    moe = job.model.moe
    assert (job.model.n_layers, job.model.n_dense_layers, job.model.d_model) == (61, 3, 7168)
    assert (moe.n_routed_experts, moe.expert_hidden, moe.top_k, moe.n_shared_experts) == (256, 2048, 8, 1)
    assert (moe.n_group, moe.topk_group, moe.max_nodes_per_token, moe.routed_scaling_factor) == (8, 4, 4, 2.5)


def test_the_balance_study_jobs_are_the_quickstart_differing_only_in_balancing():
    quick = load_job(next(p for p in JOBS if p.stem == "quickstart")).model_dump()
    study = {p.stem: load_job(p).model_dump() for p in JOBS if p.stem.startswith("balance-")}
    assert len(study) == 6
    # ... and exactly the study's variants, so that each runs on Ray as a job.
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from balance_study import VARIANTS

    assert set(VARIANTS.values()) == set(study)
    for job in study.values():
        assert {k for k in quick if quick[k] != job[k]} <= {"name", "balance", "tracking"}
        assert job["tracking"]["experiment"] == "balance-comparison"
    balances = [job["balance"] for job in study.values()]
    assert all(a != b for i, a in enumerate(balances) for b in balances[i + 1 :])
    assert {b["method"] for b in balances} == {"loss_free", "aux_loss", "none"}


def test_env_interpolation_and_overrides(tmp_path, monkeypatch):
    path = tmp_path / "j.yaml"
    path.write_text("name: j\ntrain:\n  steps: ${STEPS}\n  lr: ${LR:-0.5}\ncheckpoint:\n  storage: s3://${BUCKET}/x\n")
    monkeypatch.setenv("STEPS", "12")
    monkeypatch.setenv("BUCKET", "bkt")
    job = load_job(path, ["train.batch_size=4", "resources.workers=2"])
    assert (job.train.steps, job.train.lr, job.checkpoint.storage) == (12, 0.5, "s3://bkt/x")
    assert job.train.batch_size == 4
    monkeypatch.delenv("STEPS")
    with pytest.raises(JobSpecError, match="environment variable STEPS is not set"):
        load_job(path)


def test_secrets_in_job_files_are_refused(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text(
        "checkpoint:\n  storage: s3://b/x\n  aws_secret_access_key: abc\ndata:\n"
        "  source: s3://AKIAABCDEFGHIJKLMNOP@b/data\n"
    )
    with pytest.raises(JobSpecError) as err:
        load_job(path)
    paths = [p for p, _ in err.value.problems]
    assert "checkpoint.aws_secret_access_key" in paths and "data.source" in paths
    assert "abc" not in str(err.value) and "AKIAABCDEFGHIJKLMNOP" not in str(err.value)
    # A password in a URL is refused too, with where to put it instead.
    path.write_text("tracking:\n  uri: http://alice:hunter2@mlflow.internal:5000\n")
    with pytest.raises(JobSpecError, match="password in a URL.*MLFLOW_TRACKING_PASSWORD") as err:
        load_job(path)
    assert "hunter2" not in str(err.value)


def test_validate_masks_a_url_password_that_came_from_the_environment(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from moe_ray.cli import app

    monkeypatch.setenv("MLFLOW_URI", "http://bob:s3cret@mlflow:5000")
    path = tmp_path / "j.yaml"
    path.write_text("tracking:\n  uri: ${MLFLOW_URI}\n")
    out = CliRunner().invoke(app, ["validate", str(path)]).output
    assert "uri: http://bob:***@mlflow:5000" in out and "s3cret" not in out


@pytest.mark.parametrize(
    "override, path",
    [
        ("resources.ep_size=3", "resources.ep_size"),
        ("train.batch_size=1", "train.batch_size"),
        ("train.seq_len=100000", "train.seq_len"),
        ("model.moe.top_k=99", "model.moe"),
        ("model.n_heads=5", "model"),
        ("train.steps=-1", "train.steps"),
    ],
)
def test_cross_field_problems_named_by_path(override, path):
    with pytest.raises(JobSpecError) as err:
        load_job(next(p for p in JOBS if p.stem == "quickstart"), [override])
    assert path in [p for p, _ in err.value.problems], err.value.problems


@pytest.mark.parametrize(
    "override, problems",
    [
        ("resources.workers=0", [("resources.workers", "Input should be greater than 0 (got 0)")]),
        ("resources.workers={min: 0, max: 3}", [("resources.workers.min", "Input should be greater than 0 (got 0)")]),
        ("resources.workers={min: 2}", [("resources.workers.max", "Field required")]),
        (
            "resources.workers={min: 2, max: 3, mx: 4}",
            [("resources.workers.mx", "unknown key (check the spelling; see jobs/ for the allowed keys)")],
        ),
        (
            "resources.workers={min: 3, max: 2}",
            [("resources.workers", "resources.workers.min=3 exceeds resources.workers.max=2")],
        ),
        (
            "resources.use_gpu=maybe",
            [
                (
                    "resources.use_gpu",
                    "Input should be a valid boolean, unable to interpret input (got 'maybe'); "
                    "or Input should be 'auto' (got 'maybe')",
                )
            ],
        ),
    ],
)
def test_a_value_of_a_union_is_one_problem_at_the_path_the_file_spells(override, problems):
    """Not one problem per union member, under pydantic's tags (workers.constrained-int, ...)."""
    with pytest.raises(JobSpecError) as err:
        load_job(next(p for p in JOBS if p.stem == "quickstart"), [override])
    assert err.value.problems == problems


def test_a_section_error_and_a_cross_section_error_are_reported_together():
    quickstart = next(p for p in JOBS if p.stem == "quickstart")
    overrides = ["model.n_heads=5", "resources.workers=3", "resources.ep_size=2", "train.seq_len=100000"]
    with pytest.raises(JobSpecError) as err:
        load_job(quickstart, overrides)
    paths = [p for p, _ in err.value.problems]
    # model is invalid, so the checks that need it are skipped; the resources/train ones still run.
    assert paths == ["model", "resources.ep_size"], err.value.problems
    # With the model fixed, the check between train and model runs too.
    with pytest.raises(JobSpecError) as err:
        load_job(quickstart, overrides[1:])
    assert [p for p, _ in err.value.problems] == ["resources.ep_size", "train.seq_len"]


@pytest.mark.parametrize("workers,ep_size", [(2, None), (3, None), (4, 2)])
def test_size_per_worker_equals_the_parameters_a_worker_builds(workers, ep_size, tmp_path):
    import torch
    from conftest import tiny_job

    from moe_ray.parallel.placement import ExpertPlacement
    from moe_ray.sizing import job_size
    from moe_ray.train.trainer import build_model

    job = tiny_job(tmp_path, resources__workers=workers, resources__ep_size=ep_size, resources__dense_parallel="auto")
    size = job_size(job)
    placement = ExpertPlacement(job.model.moe.n_routed_experts, job.ep_size_for(workers), tuple([0] * workers))
    built = [
        sum(p.numel() for p in build_model(job.model, job.balance, 0, torch.device("cpu"), local).parameters())
        for local in map(placement.local_experts, range(workers))
    ]
    assert size.worker_params == max(built)  # the rank with the largest block
    assert not size.fsdp and size.state_bytes(workers) == 16 * max(built)  # "auto" replicates a model this small
    full = build_model(job.model, job.balance, 0, torch.device("cpu"))
    assert size.total_params == sum(p.numel() for p in full.parameters())


def test_validate_sizes_the_v3_job_and_warns_that_it_does_not_fit():
    from typer.testing import CliRunner

    from moe_ray.cli import app

    out = CliRunner().invoke(app, ["validate", str(next(p for p in JOBS if p.stem == "deepseek-v3"))]).output
    assert re.search(r"# parameters: 6[6-9]\d billion total, \d+(\.\d+)? billion active per token", out)
    assert re.search(r"# warning: \d+ GiB per worker does not fit an 80 GB GPU at 64 workers", out)
    # Sized as it will run, dense parts FSDP-sharded: where it fits, at 64, 256 and 1024 workers.
    assert "dense parts FSDP-sharded over the workers" in out
    table = r"#   at (\d+) workers \(EP \d+ x DP \d+\): [\d.]+ GiB per worker, (fits|does not fit)"
    fits = dict(re.findall(table, out))
    assert fits == {"64": "does not fit", "256": "fits", "1024": "fits"}, out
    quick = CliRunner().invoke(app, ["validate", str(next(p for p in JOBS if p.stem == "quickstart"))]).output
    assert "# per worker at 2 worker(s)" in quick and "warning" not in quick


def test_sizing_on_the_meta_device_does_not_load_the_compiler():
    """A random fill or a division on the meta device imports torch._dynamo: ~1 s of every
    `moe-ray validate`. Sizing the V3 job (group-limited routing) does neither."""
    code = (
        "import sys; from moe_ray.sizing import job_size; from moe_ray.spec import load_job; "
        f"size = job_size(load_job({str(next(p for p in JOBS if p.stem == 'deepseek-v3'))!r})); "
        "print(size.total_params, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    total, dynamo = out.stdout.split()
    assert int(total) > 6e11 and dynamo == "False", out.stderr


def test_validate_warns_when_node_and_group_limits_can_leave_a_token_short(tmp_path):
    """12 experts in groups of 2, top-4, 2 groups and 2 nodes per token: 4 workers on 4 nodes hold
    3 experts each, straddling the groups, so a token can keep only 2 experts."""
    from typer.testing import CliRunner

    from moe_ray.cli import app

    moe = "n_routed_experts: 12, expert_hidden: 8, top_k: 4, n_group: 6, topk_group: 2"
    path = tmp_path / "j.yaml"
    path.write_text(f"model:\n  moe: {{{moe}, max_nodes_per_token: 2}}\nresources:\n  workers: 4\n")
    out = CliRunner().invoke(app, ["validate", str(path)]).output
    assert re.search(r"# warning: with 4 workers on one node each, .*fewer than top_k=4", out), out
    assert "moe.topk_group or moe.max_nodes_per_token" in out
    ok = CliRunner().invoke(app, ["validate", str(path), "--set", "resources.workers=2"]).output
    assert "warning" not in ok, ok


@pytest.mark.parametrize(
    "args, option",
    [
        (["generate", "CKPT", "--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["generate", "CKPT", "--prompt", "x", "--top-k", "-2"], "--top-k"),
        (["generate", "CKPT", "--prompt", "x", "--max-new-tokens", "-3"], "--max-new-tokens"),
        (["generate", "CKPT", "--prompt", "x", "--speculative", "--draft-tokens", "0"], "--draft-tokens"),
        (["eval", "CKPT", "--batches", "0"], "--batches"),
        (["export", "CKPT", "OUT", "--max-shard-mb", "0"], "--max-shard-mb"),
        (["checkpoints", "RUN", "--prune", "0"], "--prune"),
        (["scale", "RUN", "--workers", "0"], "--workers"),
        (["prepare", "builtin", "OUT", "--shard-tokens", "0"], "--shard-tokens"),
    ],
)
def test_the_commands_refuse_a_number_out_of_range_before_doing_anything(args, option, tmp_path, monkeypatch):
    """0 or a negative count used to mean the default (a falsy value), or one tensor per shard."""
    from typer.testing import CliRunner

    from moe_ray.cli import app

    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and f"Invalid value for '{option}'" in out.output, out.output
    assert not list(tmp_path.iterdir())  # nothing written
