"""Recovery and rescaling on a real local Ray: a killed worker, `moe-ray rebalance`, `moe-ray
scale` 2 -> 1 -> 3, and a killed coordinator. Every run must end with the losses of the job
trained without interruption in one process, its samples, and one unbroken bias chain."""

import logging
import os
import signal
import time

import numpy as np
import pytest
import ray
import torch
from conftest import builtin_batch_digests, free_port, single_process_trainer, tiny_job

from moe_ray.balance import bias_update_speed, update_bias
from moe_ray.runtime.coordinator import get_coordinator
from moe_ray.runtime.driver import request_rebalance, request_scale, run_job

pytestmark = pytest.mark.slow

STEPS = 16


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return tiny_job(tmp_path_factory.mktemp("runs"), train__steps=STEPS, train__audit_data=True, checkpoint__every=3)


@pytest.fixture(scope="module")
def uninterrupted(job):
    """The job's losses trained without interruption, in one process: a run of any worker count
    matches them (test_runtime), and a reference run on Ray would cost ~15 s of start-up here."""
    trainer = single_process_trainer(job)
    return [r.loss for r in trainer.fit().history]


def assert_same_as_uninterrupted(result, uninterrupted, job):
    steps = [m["step"] for m in result.progress.metrics]
    assert steps == list(range(STEPS))
    np.testing.assert_allclose([m["loss"] for m in result.progress.metrics], uninterrupted, rtol=2e-5, atol=1e-6)
    assert [m["batch_digest"] for m in result.progress.metrics] == builtin_batch_digests(job, range(STEPS))
    assert result.bias_consistency["mismatches"] == []


def restarts(result):
    return [e for e in result.progress.events if e.get("event") == "restart"]


def test_killed_coordinator_then_killed_worker(local_ray, job, uninterrupted):
    """The coordinator dies: Ray restarts it, rank 0 re-seeds it and no worker restarts. Then a
    worker dies: the group restarts from its last checkpoint, served by the restarted coordinator.
    (One run for both: each Ray Train run costs ~30 s of start-up on a 2-core machine.)"""
    state = {}

    def kill(progress):
        last = progress.metrics[-1]["step"] if progress.metrics else -1
        if "coordinator" not in state and last >= 3:
            ray.kill(get_coordinator("killed"), no_restart=False)
            state["coordinator"] = last
        came_back = [e for e in progress.events if e.get("event") == "coordinator_restart"]
        if came_back and "worker" not in state and last >= came_back[0]["step"]:
            placement = [e for e in progress.events if e.get("event") == "placement"][-1]
            os.kill(placement["pids"][1], signal.SIGKILL)
            state["worker"] = last

    result = run_job(job, run_name="killed", on_progress=kill)
    assert "worker" in state and result.final_step == STEPS
    [came_back] = [e for e in result.progress.events if e.get("event") == "coordinator_restart"]
    [restart] = restarts(result)  # the worker kill's only: the coordinator's restarted no worker
    assert restart["cause"] == "worker failure" and restart["step"] % 3 == 0 and restart["step"] > 0
    assert "died" in restart["error"]  # what failed, as Ray Train saw it (Ray's words for a killed worker)
    assert restart["steps_lost"] >= state["worker"] + 1 - restart["step"]
    assert restart["recovery_s"] > 0
    assert came_back["step"] > state["coordinator"]
    assert_same_as_uninterrupted(result, uninterrupted, job)
    assert result.bias_consistency["checked"] >= 1  # checked again after the coordinator restart


def test_rebalance_then_scale_two_to_one_to_three(local_ray, job, uninterrupted):
    """`moe-ray rebalance` mid-run, then `moe-ray scale` 2 -> 1 -> 3 (one run for the three
    restarts: each run costs ~15 s of start-up here). Each time the group stops at a step boundary
    and a new one goes on from there; the rebalanced one with experts packed from the
    coordinator's recent load (a different order per layer). The run's losses, samples and bias
    are those of the uninterrupted run."""
    from moe_ray.parallel.placement import ExpertPlacement, balanced_orders
    from moe_ray.runtime.coordinator import LOAD_HORIZON_STEPS

    asked = []

    def driver(progress):
        last = progress.metrics[-1]["step"] if progress.metrics else -1
        groups = len([e for e in progress.events if e.get("event") == "placement"])
        if not asked and last >= 4:
            asked.append(request_rebalance("moved"))
        elif len(asked) == 1 and groups == 2:
            asked.append(request_scale("moved", 1))
        elif len(asked) == 2 and groups == 3:
            asked.append(request_scale("moved", 3))

    result = run_job(job, run_name="moved", on_progress=driver, poll_s=0.1)
    assert len(asked) == 3 and asked[0] == {"world_size": 2}
    moves = restarts(result)
    assert [(r["cause"], r["world_size"], r["steps_lost"]) for r in moves] == [
        ("rebalance", 2, 0),
        ("scale", 1, 0),
        ("scale", 3, 0),
    ]
    placements = [e for e in result.progress.events if e.get("event") == "placement"]
    assert [p["world_size"] for p in placements] == [2, 2, 1, 3]
    assert "3 workers" in placements[-1]["detail"]
    # The rebalanced placement is the coordinator's packing of its moving average of the global counts.
    first, second = placements[:2]
    assert first["orders"] is None and "load-balanced placement" in second["detail"]
    load = None
    for i, h in enumerate(result.load_history[: moves[0]["step"]]):
        counts = torch.tensor(h["counts"], dtype=torch.float64)
        load = counts if load is None else load.lerp_(counts, 1 / min(i + 1, LOAD_HORIZON_STEPS))
    contiguous = ExpertPlacement(job.model.moe.n_routed_experts, 2, (0, 0))
    expected = balanced_orders(load, contiguous.block_sizes)
    assert [tuple(o) for o in second["orders"]] == list(expected)
    assert any(o != tuple(range(8)) for o in expected)
    assert_same_as_uninterrupted(result, uninterrupted, job)
    # One bias chain across the restarts: the rule applied to each step's summed counts.
    bias = torch.zeros(job.model.n_moe_layers, job.model.moe.n_routed_experts)
    assert [h["step"] for h in result.load_history] == list(range(STEPS))
    for h in result.load_history:
        bias = update_bias(bias, torch.tensor(h["counts"]), bias_update_speed(job.balance, h["step"], STEPS))
        assert np.array_equal(h["bias"], bias.numpy())
    assert result.bias_consistency["checked"] == STEPS
    # Every step of 2 or 3 workers measured how evenly the ranks were loaded.
    one_worker = range(moves[1]["step"], moves[2]["step"])
    measured = [m["step"] for m in result.progress.metrics if "rank_imbalance" in m]
    assert measured == [s for s in range(STEPS) if s not in one_worker] and len(one_worker) > 0
    assert all(m["rank_imbalance"] >= 1.0 for m in result.progress.metrics if "rank_imbalance" in m)


def test_a_diverged_run_is_retried_once_then_stopped_saying_what_to_change(local_ray, tmp_path, capsys):
    """A learning rate of 1e4 puts NaN into the weights within a few steps. The run used to go on
    with a loss of nan for ever, checkpointing NaN weights; now every rank raises at the first
    non-finite loss or gradient norm, before that step's checkpoint, and since a restart replays
    the same steps from the same checkpoint, the group is restarted once (a one-off fault would
    not come back), not max_failures times (for ever with -1)."""
    import math
    import re

    from mlflow.tracking import MlflowClient

    from moe_ray.console import ProgressReporter
    from moe_ray.runtime.driver import RunError
    from moe_ray.storage.catalog import list_checkpoints, run_location

    job = tiny_job(
        tmp_path,
        train__lr=1e4,
        train__warmup_steps=0,
        train__steps=12,
        checkpoint__every=2,
        resources__max_failures=-1,
    )
    seen, show = {}, ProgressReporter(job.train.steps, 1, interactive=False)  # what `moe-ray run` prints

    def follow(progress):
        seen["progress"] = progress
        show(progress)

    with pytest.raises(RunError) as err:
        run_job(job, run_name="diverged", on_progress=follow)
    said = str(err.value)
    at = int(re.search(r"^run diverged failed: training diverged at step (\d+): loss ", said)[1])
    assert "Lower train.lr (10000)" in said and "Traceback" not in said and "moe_ray." not in said, said
    assert said.endswith(
        f"(raised at step {at} in two attempts in a row, so not restarted again: a restart "
        "replays the same steps from the same checkpoint)"
    ), said
    progress = seen["progress"]
    [restart] = [e for e in progress.events if e.get("event") == "restart"]
    # The line about the restart says why (it said only "worker failure").
    assert restart["cause"] == "worker failure" and restart["error"].startswith(f"training diverged at step {at}: ")
    shown = capsys.readouterr().err
    assert re.search(
        rf"restarted \(worker failure\) at step \d+ with 2 workers: .*\n"
        rf"  what failed: training diverged at step {at}: ",
        shown,
    ), shown
    assert [m["step"] for m in progress.metrics] == list(range(at - 1))  # the diverged step: not reported
    assert all(math.isfinite(m["loss"]) for m in progress.metrics)
    written = [c.step for c in list_checkpoints(run_location(job.checkpoint.storage, "diverged"))]
    assert written and max(written) < at  # none of the NaN weights
    # MLflow says why the run FAILED, not only that it did.
    client = MlflowClient(job.tracking.uri)
    [run] = client.search_runs([client.get_experiment_by_name(job.tracking.experiment).experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["moe_ray.error"] == said.removeprefix("run diverged failed: ")


def test_scale_refuses_impossible_worker_counts(local_ray):
    from moe_ray.runtime.coordinator import COORDINATOR_NAMESPACE, Coordinator, coordinator_name
    from moe_ray.runtime.driver import RunError

    rule = {"max": 8, "ep_size": None}
    coord = Coordinator.options(name=coordinator_name("refused"), namespace=COORDINATOR_NAMESPACE).remote(
        2, 8, {}, 10, rule
    )
    for n in (0, 9):
        with pytest.raises(RunError, match="allows 1 to 8"):
            request_scale("refused", n)
    assert request_scale("refused", 3)["workers"] == 3
    with pytest.raises(RunError, match="no running run named"):
        request_scale("no-such-run", 2)
    with pytest.raises(RunError, match="no expert loads yet"):
        request_rebalance("refused")
    ray.kill(coord)
    # An elastic run is sized by Ray Train, not by moe-ray scale.
    coord = Coordinator.options(name=coordinator_name("elastic"), namespace=COORDINATOR_NAMESPACE).remote(
        2, 8, {}, 10, rule | {"elastic": (2, 4)}
    )
    with pytest.raises(RunError, match=r"this run is elastic \(resources.workers 2 to 4\)"):
        request_scale("elastic", 3)
    ray.kill(coord)


@ray.remote
class SilentCoordinator:
    """A coordinator that takes the counts and never answers."""

    async def exchange(self, *args):
        import asyncio

        await asyncio.sleep(3600)


class ZeroBiasModel:
    def get_expert_bias(self):
        return torch.zeros(2, 8)


def _rank1(port: int, outcome) -> None:
    """Rank 1 of a 2-rank gloo group: it never talks to the coordinator, only to rank 0."""
    import torch.distributed as dist

    from moe_ray.runtime.bias_client import CoordinatorBias

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    rank1 = CoordinatorBias(None, 1, 1, 2, ZeroBiasModel(), torch.device("cpu"))
    rank1.submit(0, torch.ones(2, 8, dtype=torch.int64))
    try:
        rank1.next_bias(0)
        outcome.put("got a bias")
    except RuntimeError as err:
        outcome.put(str(err))
    dist.destroy_process_group()


def test_when_the_coordinator_never_answers_every_rank_fails_instead_of_waiting(local_ray, monkeypatch):
    import torch.distributed as dist
    from gloo_cases import processes

    from moe_ray.runtime import bias_client

    monkeypatch.setattr(bias_client, "COORDINATOR_REPLY_TIMEOUT_S", 1.0)
    port = free_port()
    ctx = processes()
    outcome = ctx.Queue()
    other = ctx.Process(target=_rank1, args=(port, outcome))
    other.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    coord = SilentCoordinator.remote()
    try:
        rank0 = bias_client.CoordinatorBias(coord, 1, 0, 2, ZeroBiasModel(), torch.device("cpu"))
        rank0.submit(0, torch.ones(2, 8, dtype=torch.int64))
        np.testing.assert_array_equal(rank0.counts, np.full((2, 8), 2))  # summed over both ranks
        with pytest.raises(RuntimeError, match="no bias for step 1 after 1 s: the coordinator did not answer"):
            rank0.next_bias(0)
        assert "rank 0 got no bias for step 1" in outcome.get(timeout=60)
        other.join(timeout=60)
    finally:
        ray.kill(coord)
        dist.destroy_process_group()
        if other.is_alive():
            other.kill()


@ray.remote
class RestartedSilentCoordinator:
    """A coordinator that restarted (asks for a seed), takes the seed, then never answers."""

    async def exchange(self, *args):
        import asyncio

        from moe_ray.runtime.coordinator import NeedsSeed

        if not hasattr(self, "seeded"):
            raise NeedsSeed("restarted")
        await asyncio.sleep(3600)

    async def reseed(self, *args):
        self.seeded = True
        return "digest"


def test_the_retry_after_a_coordinator_restart_has_the_same_time_limit(local_ray, monkeypatch):
    import torch.distributed as dist

    from moe_ray.runtime import bias_client

    monkeypatch.setattr(bias_client, "COORDINATOR_REPLY_TIMEOUT_S", 1.0)
    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    coord = RestartedSilentCoordinator.remote()
    try:
        rank0 = bias_client.CoordinatorBias(coord, 1, 0, 1, ZeroBiasModel(), torch.device("cpu"))
        rank0.submit(0, torch.ones(2, 8, dtype=torch.int64))
        with pytest.raises(RuntimeError, match="no bias for step 1 after 1 s"):
            rank0.next_bias(0)
    finally:
        ray.kill(coord)
        dist.destroy_process_group()


def test_what_the_driver_had_not_read_survives_a_coordinator_restart(local_ray):
    """Rank 0's records of the steps just before a coordinator crash reach the driver anyway: the
    restarted coordinator gets them again, and the driver keeps each step and event once."""
    import torch.distributed as dist

    from moe_ray.runtime.bias_client import CoordinatorBias, CoordinatorRecords
    from moe_ray.runtime.coordinator import COORDINATOR_NAMESPACE, Coordinator, coordinator_name
    from moe_ray.runtime.driver import Progress, _Cursor, _poll

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    coord = Coordinator.options(name=coordinator_name("lost-records"), namespace=COORDINATOR_NAMESPACE).remote(
        2, 8, {}, 10
    )
    model = ZeroBiasModel()
    try:
        generation = ray.get(coord.begin.remote(0, 1, np.zeros((2, 8), dtype=np.float32)))
        records = CoordinatorRecords(coord)
        records.send({"event": "placement", "step": 0, "time": 1.0}, wait=True)
        rank0 = CoordinatorBias(coord, generation, 0, 1, model, torch.device("cpu"), records)
        progress, cursor = Progress(run_name="lost-records", total_steps=10), _Cursor()
        for step in range(6):
            rank0.submit(step, torch.ones(2, 8, dtype=torch.int64))
            rank0.next_bias(step)  # after step 4's exchange: a new coordinator, which asks for a seed
            # An async actor runs calls in no set order: step 3's record is in before the poll.
            records.send({"step": step, "loss": 10.0 - step}, wait=step == 3)
            if step == 3:
                _poll(coord, progress, cursor)  # the driver reads up to step 3 ...
            if step == 4:  # ... step 4 is recorded, and the coordinator dies before the next poll
                records.send({"event": "checkpoint", "step": 5, "time": 2.0}, wait=True)
                old_pid = ray.get(coord.pid.remote())
                ray.kill(coord, no_restart=False)
                while ray.get(coord.pid.remote()) == old_pid:  # ray.kill returns before the actor is gone
                    time.sleep(0.1)
        assert [m["step"] for m in progress.metrics] == [0, 1, 2, 3]
        _poll(coord, progress, cursor)
        assert [(m["step"], m["loss"]) for m in progress.metrics] == [(s, 10.0 - s) for s in range(6)]
        kinds = [(e["event"], e["step"]) for e in progress.events]
        assert kinds.count(("placement", 0)) == 1 and kinds.count(("checkpoint", 5)) == 1
        assert ("coordinator_restart", 5) in kinds
    finally:
        ray.kill(coord)
        dist.destroy_process_group()


def test_scale_accepts_data_parallel_replicas_beyond_the_experts_with_ep_size(local_ray, tmp_path):
    from moe_ray.runtime.coordinator import COORDINATOR_NAMESPACE, Coordinator, coordinator_name
    from moe_ray.runtime.driver import RunError, scale_limits

    # 8 experts, EP groups of 2, 32 sequences a step: 12 workers are 6 replicas of each block.
    job = tiny_job(tmp_path, resources__workers=4, resources__ep_size=2, train__batch_size=32)
    coord = Coordinator.options(name=coordinator_name("dp-scale"), namespace=COORDINATOR_NAMESPACE).remote(
        2, 8, {}, 10, scale_limits(job)
    )
    try:
        assert request_scale("dp-scale", 12)["workers"] == 12
        with pytest.raises(RunError, match="ep_size=2 must divide it"):
            request_scale("dp-scale", 13)
        with pytest.raises(RunError, match="allows 1 to 32"):
            request_scale("dp-scale", 34)
    finally:
        ray.kill(coord)
    # Without ep_size every worker holds distinct experts: no more workers than experts.
    assert scale_limits(tiny_job(tmp_path))["max"] == 8


def test_scale_beyond_what_the_cluster_holds_is_refused(local_ray, tmp_path):
    """Ray Train would wait for the missing resources without end; this Ray has 4 CPUs."""
    from moe_ray.runtime.coordinator import COORDINATOR_NAMESPACE, Coordinator, coordinator_name
    from moe_ray.runtime.driver import RunError, scale_limits

    rule = {**scale_limits(tiny_job(tmp_path)), "per_worker": {"CPU": 1.5}}  # as a run on a cluster has it
    coord = Coordinator.options(name=coordinator_name("too-big"), namespace=COORDINATOR_NAMESPACE).remote(
        2, 8, {}, 10, rule
    )
    try:
        ray.get(coord.begin.remote(0, 1, None))
        with pytest.raises(
            RunError,
            match=r"cannot scale to 3 workers: 3 workers need 4\.5 CPU \(1\.5 each\) and "
            r"the cluster has 4 in all, so at most 2 fit: add nodes, or scale to fewer",
        ):
            request_scale("too-big", 3)
        assert request_scale("too-big", 2)["workers"] == 2
    finally:
        ray.kill(coord)
    # A run on this machine's own Ray (no --address, as here): no node can join it.
    with pytest.raises(
        RunError,
        match=r"resources.workers: 5 workers need 5 CPU .* this machine's Ray has 4 in all, so at most 4 fit: "
        r"run the job on a Ray cluster \(--address\), or lower resources.workers",
    ):
        run_job(tiny_job(tmp_path, resources__workers=5), run_name="too-big")
    assert not (tmp_path / "too-big").exists()  # refused before its data was prepared


def test_a_group_waiting_for_resources_says_why_and_starts_when_they_are_free(local_ray, tmp_path, monkeypatch, caplog):
    """Another holder has 3 of this Ray's 4 CPUs: the run's 2 workers wait (quietly: no Ray Train
    traceback each minute), the driver says why, and the run starts once they are freed."""
    from moe_ray.runtime import driver

    monkeypatch.setattr(driver._StartWatch, "FIRST_S", 1.0)
    hold = ray.util.placement_group([{"CPU": 3}])
    ray.get(hold.ready())
    notices, held, settings = [], [hold], set()

    def free_after_the_notice(progress):
        settings.add(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"))
        notices.extend(r.getMessage() for r in caplog.records if "waiting for resources" in r.getMessage())
        caplog.clear()
        if notices and held:
            ray.util.remove_placement_group(held.pop())

    try:
        with caplog.at_level(logging.WARNING, logger="moe_ray.driver"):
            result = run_job(tiny_job(tmp_path, train__steps=2), run_name="waits", on_progress=free_after_the_notice)
    finally:
        for group in held:
            ray.util.remove_placement_group(group)
    assert notices and result.final_step == 2
    assert notices[0].startswith("waiting for resources: 2 workers need 2 CPU (1 of the cluster's 4 are free)")
    # Ray Train's controller took both from the environment; they are set for the run only.
    assert settings == {str(driver.HEALTH_CHECK_INTERVAL_S)}  # Ray's 2 s saw each group's end ~2.5 s late
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" not in os.environ
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ


@ray.remote
def _send_records(coord, n: int) -> None:
    from moe_ray.runtime.bias_client import CoordinatorRecords

    records = CoordinatorRecords(coord)
    for step in range(n):
        records.send({"step": step, "pad": "x" * 1000 * (step % 7)}, wait=step == n - 1)


@ray.remote
def _poll_often(coord, n: int) -> None:
    for _ in range(n):
        ray.get(coord.progress.remote(0, 0, 0))


def test_records_reach_the_coordinator_in_the_order_rank_0_sent_them(local_ray):
    """The driver's merge reads a lower step as a restart's rewind, so a swapped pair would drop a
    step. Unchained, an async actor started these calls out of order (over 100 swaps in 5000)."""
    from moe_ray.runtime.coordinator import COORDINATOR_NAMESPACE, Coordinator, coordinator_name

    coord = Coordinator.options(name=coordinator_name("ordered"), namespace=COORDINATOR_NAMESPACE).remote(2, 8, {}, 10)
    try:
        pollers = [_poll_often.remote(coord, 200) for _ in range(2)]  # other callers keep the actor busy
        ray.get(_send_records.remote(coord, 1000))
        ray.get(pollers)
        steps = [m["step"] for m in ray.get(coord.progress.remote(0, 0, 0))["metrics"]]
        assert steps == list(range(1000))
    finally:
        ray.kill(coord)
