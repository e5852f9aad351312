"""The Ray runtime on a real local Ray: expert workers vs the single-process trainer, the
coordinator's bias, checkpoints that reshard, and resumption."""

import numpy as np
import pytest
import torch
from conftest import copy_checkpoint_as_new_run, single_process_trainer, tiny_job

from moe_ray.balance import next_bias
from moe_ray.parallel.placement import ExpertPlacement
from moe_ray.runtime.driver import run_job
from moe_ray.storage import checkpoint as ckpt
from moe_ray.storage.catalog import list_checkpoints, run_location
from moe_ray.train.optim import build_optimizer
from moe_ray.train.trainer import build_model

STEPS = 6


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def job(storage):
    # The proportional policy: the sign rule runs in test_elastic's runs.
    return tiny_job(storage, train__steps=STEPS, checkpoint__every=3, balance__policy="proportional")


@pytest.fixture(scope="module")
def ep2_run(local_ray, job):
    """2 workers (EP=2), 6 steps, checkpoints at steps 3 and 6."""
    return run_job(job, run_name="ep2")


@pytest.fixture(scope="module")
def single(job):
    trainer = single_process_trainer(job)
    summary = trainer.fit()
    return trainer, summary


def test_ep2_matches_single_process_losses_and_parameters(ep2_run, single, storage):
    trainer, summary = single
    dist_losses = [m["loss"] for m in ep2_run.progress.metrics]
    assert len(dist_losses) == STEPS
    np.testing.assert_allclose(dist_losses, [r.loss for r in summary.history], rtol=2e-5, atol=1e-6)
    # Parameters: the final checkpoint (written by 2 workers) loaded into one full model.
    model = build_model(trainer.model_cfg, trainer.balance, 0, torch.device("cpu"))
    ckpt.load(storage / "ep2" / f"step-{STEPS:08d}", model, None)
    # Adam divides by sqrt(v): for near-zero gradients fp32 reduction-order noise moves a weight
    # by up to ~1e-5 here, while a real fault (a missing all-reduce) moves it by ~lr = 1e-2.
    for (name, p), (_, q) in zip(model.named_parameters(), trainer.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(model.get_expert_bias(), trainer.model.get_expert_bias())
    assert ep2_run.val_loss == pytest.approx(summary.val.loss, rel=1e-4)


def test_a_run_starts_no_helper_actor_it_has_no_use_for(ep2_run):
    """Ray Train starts a DatasetManager actor for every worker group, datasets or not (moe-ray
    passes none: its workers read samples by position), and a placement-group cleaner that asks
    the dashboard's State API, which a Ray without a dashboard (as here) does not have. A run's
    trainer leaves both out (test_submit: the cleaner is kept on a head with a dashboard)."""
    from ray._private.state import actors  # the GCS's actor table: no dashboard needed

    started = [a["ActorClassName"] for a in actors().values()]
    assert started.count("RayTrainWorker") >= 2 and "TrainController" in started, started
    assert "SynchronizationActor" in started, started  # a helper it needs: kept
    assert not [n for n in started if "DatasetManager" in n or "PlacementGroupCleaner" in n], started


def test_bias_identical_on_all_ranks_and_follows_the_policy(ep2_run, job):
    # Every worker reported the digest of the bias it routed with, at every step.
    assert ep2_run.bias_consistency == {"checked": STEPS, "mismatches": []}
    bias = torch.zeros(job.model.n_moe_layers, job.model.moe.n_routed_experts)
    assert [h["step"] for h in ep2_run.load_history] == list(range(STEPS))
    moved = False
    for h in ep2_run.load_history:
        bias = next_bias(job.balance, bias, torch.tensor(h["counts"]), h["step"], STEPS)
        assert np.array_equal(h["bias"], bias.numpy()), h["step"]
        moved |= bool(bias.abs().sum() > 0)
        # Counts are global: every (token, slot) of the global batch, per layer.
        assert (h["counts"].sum(axis=1) == job.train.batch_size * job.train.seq_len * 2).all()
    assert moved


def shard_for(job, world, rank):
    placement = ExpertPlacement(job.model.moe.n_routed_experts, world, tuple([0] * world))
    # Another seed: every weight must come from disk.
    model = build_model(job.model, job.balance, 123, torch.device("cpu"), placement.local_experts(rank))
    opt = build_optimizer(model, job.train)
    ckpt.load(job_storage(job) / "ep2" / "step-00000003", model, opt)
    return model, opt


def job_storage(job):
    from pathlib import Path

    return Path(job.checkpoint.storage)


def expert_tensors(model, opt) -> dict:
    """{(layer, global expert, name): tensor} for weights and Adam state."""
    out = {}
    for layer, moe in enumerate(model.moe_layers()):
        ex = moe.experts
        for name in ("w13", "w2"):
            p = getattr(ex, name)
            for i, e in enumerate(ex.expert_ids):
                out[(layer, e, name)] = p.detach()[i]
                for s in ckpt.ADAM_STATE:
                    out[(layer, e, f"{name}.{s}")] = opt.state[p][s][i]
    return out


@pytest.mark.parametrize("world", [1, 4])
def test_checkpoint_of_two_workers_reshards_bit_exact(ep2_run, job, world):
    reference = expert_tensors(*shard_for(job, 2, 0)) | expert_tensors(*shard_for(job, 2, 1))
    resharded = {}
    for rank in range(world):
        resharded |= expert_tensors(*shard_for(job, world, rank))
    assert resharded.keys() == reference.keys()
    n_layers, n_experts = job.model.n_moe_layers, job.model.moe.n_routed_experts
    assert len(reference) == n_layers * n_experts * 6
    for key, t in reference.items():
        assert torch.equal(resharded[key], t), key


@pytest.mark.parametrize("workers", [1])
def test_resume_with_another_worker_count_continues_the_same_run(ep2_run, job, storage, workers):
    """Resume the step-3 checkpoint with 1 worker: the step-3 loss equals the uninterrupted
    2-worker run's, and so do the later ones. (Loading into 4 workers is checked bit-exact
    above; a live 1 -> 3 rescale is in test_elastic.)"""
    new_run = copy_checkpoint_as_new_run(storage, "ep2", "step-00000003", f"resume-{workers}")
    resumed_job = job.model_copy(update={"resources": job.resources.model_copy(update={"workers": workers})})
    result = run_job(resumed_job, resume=new_run)
    placement = [e for e in result.progress.events if e.get("event") == "placement"]
    assert placement and placement[0]["resumed"] and placement[0]["step"] == 3
    assert f"over {workers} workers" in placement[0]["detail"]
    uninterrupted = [m["loss"] for m in ep2_run.progress.metrics[3:]]
    np.testing.assert_allclose([m["loss"] for m in result.progress.metrics], uninterrupted, rtol=2e-5, atol=1e-6)
    assert [m["step"] for m in result.progress.metrics] == [3, 4, 5]


def test_checkpoints_listed_with_steps_and_sizes(ep2_run, storage):
    ckpts = list_checkpoints(run_location(str(storage), "ep2"))
    assert [(c.step, c.complete) for c in ckpts] == [(3, True), (6, True)]
    assert all(c.size > 10_000 for c in ckpts)


def test_a_run_name_in_use_is_refused_and_resume_run_continues_that_run(ep2_run, job, tmp_path):
    """`--run NAME` of a run with checkpoints would quietly continue it: refused, before Ray is
    asked. `--resume --run NAME` continues NAME (not this job's newest run), and a run with no
    steps left says so instead of failing on its empty summary."""
    import yaml
    from typer.testing import CliRunner

    from moe_ray.cli import app
    from moe_ray.runtime.driver import RunError, resolve_run_name

    with pytest.raises(RunError, match="already holds that run's checkpoints: continue it with --resume --run ep2"):
        resolve_run_name(job, None, "ep2")
    assert resolve_run_name(job, None, "a-new-run") == "a-new-run"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    out = CliRunner().invoke(app, ["run", str(job_file), "--resume", "--run", "ep2"])
    assert out.exit_code == 0, out.output
    assert f"run ep2 had already trained all train.steps={STEPS}" in " ".join(out.output.split())


def test_tampered_checkpoint_is_refused(ep2_run, storage, tmp_path):
    import shutil

    folder = tmp_path / "step-00000006"
    shutil.copytree(storage / "ep2" / "step-00000006", folder)
    ckpt.verify(folder)  # intact: fine
    dense = folder / ckpt.DENSE
    data = bytearray(dense.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    dense.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.verify(folder)
    (folder / ckpt.INDEX).unlink()
    with pytest.raises(ckpt.CheckpointError, match="never completed"):
        ckpt.verify(folder)


def test_checkpoint_damaged_for_one_rank_only_makes_every_rank_fall_back(ep2_run, job, storage):
    """Rank 1's expert file of the newest checkpoint is altered (same size): rank 0 could load
    that checkpoint, rank 1 cannot. All ranks must resume from step 3 together and re-run
    steps 3-5 exactly as the uninterrupted run did."""
    copy_checkpoint_as_new_run(storage, "ep2", "step-00000003", "damaged")
    copy_checkpoint_as_new_run(storage, "ep2", "step-00000006", "damaged")
    victim = storage / "damaged" / "step-00000006" / "experts-00004-00007.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = run_job(job, resume="damaged")
    placement = [e for e in result.progress.events if e.get("event") == "placement"]
    assert [p["step"] for p in placement] == [3], placement  # one start, at the older checkpoint
    uninterrupted = [m["loss"] for m in ep2_run.progress.metrics[3:]]
    np.testing.assert_allclose([m["loss"] for m in result.progress.metrics], uninterrupted, rtol=2e-5, atol=1e-6)


def test_an_all_dense_model_trains_and_checkpoints_on_two_workers(local_ray, storage):
    """The dense peer of bench/e2e.py: no MoE layer, so no experts file and no expert load."""
    from moe_ray.inference import load_model

    job = tiny_job(storage, model__n_dense_layers=3, train__steps=2)
    result = run_job(job, run_name="all-dense")
    assert result.final_step == 2 and result.val_loss is not None
    files = sorted(p.name for p in (storage / "all-dense" / "step-00000002").iterdir())
    assert not any(f.startswith("experts-") for f in files) and ckpt.DENSE in files
    loaded = load_model(result.checkpoint, torch.device("cpu"))
    assert loaded.step == 2 and not loaded.model.moe_layers()


def _storage_check_case(rank, world, out, shared):
    from moe_ray.runtime.failures import SetupError
    from moe_ray.runtime.worker import check_storage_shared

    # What each rank's node sees at the run folder's path: one folder, or a disk of its own.
    folder = out / ("shared" if shared else f"node{rank}") / "run"
    try:
        check_storage_shared(folder, rank, ["10.0.0.1 (node a)", "10.0.0.2 (node b)"], wait_s=0.5)
        (out / f"rank{rank}.txt").write_text("ok")
    except SetupError as err:
        (out / f"rank{rank}.txt").write_text(str(err))


def _data_check_case(rank, world, out, dataset, missing_on_rank_1):
    from moe_ray.hf.init_from import load_init_from
    from moe_ray.model.transformer import MoETransformer
    from moe_ray.runtime.failures import SetupError
    from moe_ray.runtime.worker import open_run_data, read_on_every_rank

    nodes = ["10.0.0.1 (node a)", "10.0.0.2 (node b)"]
    # What each rank's node has at the path: the dataset, or (rank 1) no such folder.
    uri = str(out / "not-here" if missing_on_rank_1 and rank == 1 else dataset)
    try:
        data = read_on_every_rank("the run's data", lambda: open_run_data(uri), nodes)
        (out / f"rank{rank}.txt").write_text(f"ok {len(data.train)}")
    except SetupError as err:
        (out / f"rank{rank}.txt").write_text(str(err))
    if missing_on_rank_1:  # model.init_from, on no node
        try:
            model = MoETransformer(tiny_job(out).model)
            read_on_every_rank("model.init_from", lambda: load_init_from(model, str(out / "hf")), nodes)
        except SetupError as err:
            (out / f"init_from{rank}.txt").write_text(str(err))


def test_data_that_a_node_cannot_read_stops_every_rank_naming_the_node(tmp_path):
    """It was a DatasetError on one rank ("not a prepared dataset: run moe-ray prepare first", of
    data the driver had just found), and the group restarted max_failures times (for ever with
    -1); a SetupError stops the run at once (test_failure_policy_stops_on_a_setup_error)."""
    import numpy as np
    from gloo_cases import require, run_cases

    from moe_ray.storage.token_shards import DatasetWriter

    dataset = tmp_path / "dataset"
    with DatasetWriter(str(dataset), np.dtype(np.uint8)) as writer:
        writer.splits["train"].add(np.arange(100, dtype=np.uint8))
        writer.splits["val"].add(np.arange(50, dtype=np.uint8))
        writer.finish({"source": "test"})
    run_cases(
        [("both", 2, _data_check_case, (dataset, False)), ("one", 2, _data_check_case, (dataset, True))], tmp_path
    )
    both = require(tmp_path, "both")
    assert [(both / f"rank{r}.txt").read_text() for r in range(2)] == ["ok 100", "ok 100"]
    one = require(tmp_path, "one")
    for r in range(2):  # every rank stops, with the same words
        assert (one / f"rank{r}.txt").read_text() == (
            f"the workers on 10.0.0.2 (node b) cannot read the run's data: there is no folder {one / 'not-here'}. "
            "Each node reads it itself: give a folder that every node mounts at the same path, or an s3:// URI "
            "that the nodes can read"
        )
        assert (
            (one / f"init_from{r}.txt")
            .read_text()
            .startswith(
                f"the workers on 10.0.0.1 (node a), 10.0.0.2 (node b) cannot read model.init_from: {one / 'hf'} is not "
                "a folder. Each node reads it itself"
            )
        )


def test_failure_policy_stops_on_a_setup_error_and_on_the_same_error_at_the_same_point_twice():
    """Ray Train's own policy decides (tested against it, not a stand-in), except that a worker's
    SetupError raises at once, and so does an error that the attempt before raised at the same
    point. A death (no point recorded) and an error met at another step are retried as before."""
    import pickle

    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from moe_ray.runtime.failures import FailurePoint, SetupError, UnmendableFailuresStop, repeated_at, setup_error

    RETRY, RAISE = FailureDecision.RETRY, FailureDecision.RAISE

    def raised_at(at, error):
        with pytest.raises(type(error)), FailurePoint() as point:
            point.at = at
            raise error
        return pickle.loads(pickle.dumps(error))  # as it reaches the controller from a worker

    def group(**ranks):
        return WorkerGroupError("failed", {int(r[4:]): e for r, e in ranks.items()})

    policy = UnmendableFailuresStop(DefaultFailurePolicy(FailureConfig(max_failures=-1)))
    died = group(rank1=RuntimeError("connection reset"))  # raised nowhere moe-ray records: a death
    assert [policy.make_decision(died) for _ in range(3)] == [RETRY] * 3
    found = SetupError("storage the nodes cannot use")
    setup = group(rank1=found, rank0=SetupError("the same, rank 0"), rank2=RuntimeError("collateral"))
    assert policy.make_decision(setup) == RAISE
    assert str(setup_error(setup)) == "the same, rank 0" and setup_error(died) is None

    policy = UnmendableFailuresStop(DefaultFailurePolicy(FailureConfig(max_failures=-1)))
    oom = lambda at, free: raised_at(at, MemoryError(f"out of memory: {free} MiB free at 0x7f{free}"))  # noqa: E731
    assert policy.make_decision(group(rank0=oom(7, 12))) == RETRY
    assert policy.make_decision(group(rank0=oom(9, 12))) == RETRY  # another step: it got further
    assert policy.make_decision(group(rank0=raised_at(9, ValueError("a bug")))) == RETRY  # another error
    assert policy.make_decision(group(rank0=oom(9, 30))) == RETRY
    assert policy.make_decision(died) == RETRY  # a death between two equal failures: not in a row
    last = group(rank0=oom(9, 31), rank1=raised_at(9, RuntimeError("collateral: peer gone")))
    assert repeated_at(last) is None and policy.make_decision(last) == RETRY
    again = group(rank1=oom(9, 14))  # the same error at the same step (numbers aside), on another rank
    assert policy.make_decision(again) == RAISE and repeated_at(again) == 9
    assert policy.make_decision(group(rank0=oom("setup", 1))) == RETRY
    assert policy.make_decision(group(rank0=oom("setup", 1))) == RAISE
    # Storage, the network or Ray out of reach at the same point (a checkpoint's upload) is an
    # outage that a run with max_failures -1 is meant to wait out.
    outage = lambda: group(rank0=raised_at(6, OSError("When uploading part: AWS Error NETWORK_CONNECTION")))  # noqa: E731
    assert [policy.make_decision(outage()) for _ in range(3)] == [RETRY] * 3


def test_out_of_memory_names_what_sizes_a_worker():
    """torch's own errors (the CPU allocator's refusal, raised here; CUDA's, with its words), said
    with the job's keys that size a worker's memory; any other error is left alone."""
    from moe_ray.runtime.failures import OutOfMemory, SetupError, worded_out_of_memory

    job = tiny_job("/tmp/unused", train__batch_size=64, train__seq_len=48).model_dump(mode="json")
    with pytest.raises(RuntimeError) as refused:
        torch.empty(2**50, dtype=torch.uint8)
    setup = worded_out_of_memory(refused.value, "setup", job, "10.0.0.1 (rank 1)")
    assert isinstance(setup, SetupError) and str(setup).startswith(
        "out of memory before the first step on 10.0.0.1 (rank 1): the host cannot allocate 1,048,576.0 GiB at "
        "once. The model's training state does not fit a worker: use more workers (resources.workers, 2: "
    )
    cuda = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.50 GiB "
        "is free. Including non-PyTorch memory, this process has 77.68 GiB memory in use. Of the allocated memory "
        "75.1 GiB is allocated by PyTorch. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
    )
    step = worded_out_of_memory(cuda, 12, job | {"resources": {"workers": {"min": 2, "max": 4}}}, "10.0.0.2 (rank 0)")
    assert isinstance(step, OutOfMemory) and str(step) == (
        "out of memory at step 12 on 10.0.0.2 (rank 0): CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
        "total capacity of 79.19 GiB of which 1.50 GiB is free. A worker's memory grows with its share of "
        "train.batch_size (64) x train.seq_len (48) tokens and with the experts it holds: lower either, or use more "
        "workers (resources.workers: each takes a smaller share of the batch and fewer experts)"
    )
    assert worded_out_of_memory(RuntimeError("a bug"), 3, job, "here") is None


def test_a_model_too_big_for_its_workers_stops_at_once_in_words(local_ray, tmp_path):
    """Its weights alone (a 2**35-token vocabulary: 4 TiB) cannot be allocated: the run stops
    before the first step with what to change, not restarted (max_failures -1) and without a
    traceback of torch's allocator."""
    from moe_ray.runtime.driver import RunError

    job = tiny_job(tmp_path, model__vocab_size=2**35, resources__workers=1, resources__max_failures=-1)
    seen = {}
    with pytest.raises(RunError) as err:
        run_job(job, run_name="too-big", on_progress=lambda p: seen.update(events=list(p.events)))
    said = str(err.value)
    assert (
        said.startswith("run too-big failed: out of memory before the first step on ")
        and "(rank 0): the host cannot allocate 4,096.0 GiB at once. The model's training state" in said
    ), said
    # Not retried: a retried failure is recorded as an event (the restart line says why).
    assert "Traceback" not in said and [e["event"] for e in seen["events"]] == []


def test_only_the_tracebacks_of_worded_errors_are_dropped_from_the_workers_logs():
    """Ray Train logs every training function's error with its traceback; a cluster forwards the
    lines to the driver (test_submit shows the worded ones gone there)."""
    import logging
    import traceback

    from moe_ray.runtime.failures import WordedErrorTracebacks
    from moe_ray.train.step import TrainingDiverged, check_finite

    def logged(error_raiser) -> bool:
        try:
            error_raiser()
        except Exception:
            text = f"Error in training function:\n{traceback.format_exc()}\n"
        record = logging.LogRecord("ray.train.v2._internal.util", logging.ERROR, __file__, 1, text, None, None)
        return WordedErrorTracebacks().filter(record)

    def diverged():
        check_finite(3, float("nan"), 1.0, tiny_job("/tmp/unused").train)

    def bug():
        raise KeyError("a bug: keeps its traceback")

    def out_of_memory():
        from moe_ray.runtime.failures import OutOfMemory

        raise OutOfMemory("out of memory at step 3 on here: ...")

    with pytest.raises(TrainingDiverged):
        diverged()
    assert not logged(diverged) and not logged(out_of_memory) and logged(bug)
    other = logging.LogRecord("x", logging.ERROR, __file__, 1, "another line", None, None)
    assert WordedErrorTracebacks().filter(other)


def test_local_storage_that_the_nodes_do_not_share_is_refused_by_every_rank(tmp_path):
    """Ray Train's own check passes there (each node writes its marker and finds it), and each
    node would keep its own part of every checkpoint."""
    from gloo_cases import require, run_cases

    run_cases([("shared", 2, _storage_check_case, (True,)), ("apart", 2, _storage_check_case, (False,))], tmp_path)
    shared = require(tmp_path, "shared")
    assert [(shared / f"rank{r}.txt").read_text() for r in range(2)] == ["ok", "ok"]
    assert list((shared / "shared" / "run").iterdir()) == []  # the probe is gone
    apart = require(tmp_path, "apart")
    for r in range(2):  # every rank stops, naming the storage path (the same on real nodes)
        assert (apart / f"rank{r}.txt").read_text() == (
            f"checkpoint.storage {apart / f'node{r}'} is not shared by the workers' nodes: on 10.0.0.2 (node b) "
            "it is another folder than on 10.0.0.1 (node a) (rank 0's), so each node would keep its own part of "
            "every checkpoint; give an s3:// URI, or a folder that every node mounts at the same path"
        )
