"""The coordinator's state machine without Ray: one report per step (the group's summed counts,
from rank 0), the bias rule applied once, the scale decision fixed in that one reply, and memory
that stays bounded however long the run."""

import numpy as np
import pytest
import torch

from moe_ray.balance import bias_update_speed, update_bias
from moe_ray.config import BalanceConfig
from moe_ray.runtime.coordinator import (
    HISTORY_POINTS,
    RECENT_STEPS,
    BiasMismatch,
    CoordinatorState,
    NeedsSeed,
    RecentLog,
    StaleGeneration,
    bias_digest,
)

LAYERS, EXPERTS, STEPS = 2, 4, 10
BALANCE = {"bias_update_speed": 0.1}


def counts(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 20, size=(LAYERS, EXPERTS))


def test_bias_follows_the_rule_on_the_summed_counts():
    state = CoordinatorState(LAYERS, EXPERTS, BALANCE, STEPS)
    gen = state.begin(0, 3, None)
    bias = torch.zeros(LAYERS, EXPERTS)
    cfg = BalanceConfig.model_validate(BALANCE)
    for step in range(4):
        total = sum(counts(10 * step + r) for r in range(3))  # what the all-reduce hands rank 0
        version, got, scale = state.exchange(gen, step, total, bias_digest(bias))
        bias = update_bias(bias, torch.from_numpy(total), bias_update_speed(cfg, step, STEPS))
        assert (version, scale) == (step + 1, None)
        np.testing.assert_array_equal(got, bias.numpy())
    assert (state.bias_checks, state.bias_mismatches) == (4, [])
    assert [h["step"] for h in state.history.latest_per_step()] == [0, 1, 2, 3]


def test_a_scale_request_arrives_in_the_next_reply_and_a_retry_gets_the_same_reply():
    state = CoordinatorState(LAYERS, EXPERTS, BALANCE, STEPS)
    gen = state.begin(0, 2, None)
    first = state.exchange(gen, 0, counts(0))
    state.desired_workers = 1  # `moe-ray scale` lands between two steps
    second = state.exchange(gen, 1, counts(1))
    assert (first[2], second[2]) == (None, 1)
    again = state.exchange(gen, 1, counts(1))  # the same call, retried: the rule is not applied twice
    assert again[0] == second[0] and np.array_equal(again[1], second[1]) and again[2] == 1
    assert len(state.history.latest_per_step()) == 2
    with pytest.raises(RuntimeError, match="counts of step 5 arrived"):
        state.exchange(gen, 5, counts(5))  # a step was skipped: refuse rather than misapply


def test_a_wrong_bias_digest_stops_the_run():
    state = CoordinatorState(LAYERS, EXPERTS, BALANCE, STEPS)
    gen = state.begin(0, 2, None)
    state.exchange(gen, 0, counts(0), bias_digest(torch.zeros(LAYERS, EXPERTS)))
    with pytest.raises(BiasMismatch, match="routed step 1 with a bias .* other than the coordinator's"):
        state.exchange(gen, 1, counts(1), bias_digest(np.ones((LAYERS, EXPERTS))))
    assert state.bias_mismatches and state.bias_mismatches[0]["step"] == 1
    # Nothing goes on: not this group, and not a group restarted from a checkpoint by Ray Train.
    with pytest.raises(BiasMismatch, match="--resume"):
        state.exchange(gen, 1, counts(1))
    with pytest.raises(BiasMismatch):
        state.begin(1, 2, None)


def test_a_new_worker_group_refuses_the_old_one_and_a_restart_asks_for_a_seed():
    state = CoordinatorState(LAYERS, EXPERTS, BALANCE, STEPS)
    old = state.begin(0, 2, None)
    state.begin(0, 1, None)  # the group was torn down and a new one started
    with pytest.raises(StaleGeneration):
        state.exchange(old, 0, counts(0))
    fresh = CoordinatorState(LAYERS, EXPERTS, BALANCE, STEPS)  # the actor restarted
    with pytest.raises(NeedsSeed):
        fresh.exchange(3, 7, counts(0))
    seed = np.full((LAYERS, EXPERTS), 0.25, dtype=np.float32)
    fresh.reseed(3, 7, 2, seed)
    version, bias, _ = fresh.exchange(3, 7, counts(0), bias_digest(seed))
    assert version == 8 and fresh.bias_mismatches == []
    expected = update_bias(torch.from_numpy(seed), torch.from_numpy(counts(0)), 0.1)
    np.testing.assert_array_equal(bias, expected.numpy())


def test_memory_stays_bounded_over_many_steps():
    steps = 2 * RECENT_STEPS + 5_000  # past the recent logs' first trim, and many history thinnings
    state = CoordinatorState(LAYERS, EXPERTS, BALANCE, steps)
    gen = state.begin(0, 1024, None)
    one = counts(0)
    for step in range(steps):
        state.exchange(gen, step, one)
        state.metrics.append({"step": step})
    records = state.history.latest_per_step()
    assert len(records) <= HISTORY_POINTS
    kept = [r["step"] for r in records]
    assert kept[0] == 0 and kept[-1] > steps - 2 * steps / HISTORY_POINTS  # spans the whole run
    assert len(set(np.diff(kept))) == 1  # evenly
    assert len(state.balance_log.items) <= 2 * state.balance_log.keep and len(state.balance_log) == steps
    assert len(state.metrics.items) <= 2 * state.metrics.keep and state.metrics.dropped > 0
    assert state.replies.keys() == {steps - 1} and len(state.recent) <= 4


def test_recent_log_positions_survive_trimming():
    log = RecentLog(keep=3)
    for i in range(10):
        log.append(i)
    assert len(log) == 10 and log.items == [4, 5, 6, 7, 8, 9]  # trimmed to 3 at the 7th, then grew
    assert log.since(8) == [8, 9]
    assert log.since(0) == log.items  # a reader that fell behind gets what is left
    assert log.since(10) == []


def test_placement_plan_packs_the_recent_load_when_asked():
    from moe_ray.runtime.coordinator import LOAD_HORIZON_STEPS

    state = CoordinatorState(LAYERS, EXPERTS, BALANCE, STEPS)
    assert state.plan_placement(EXPERTS, 2, [0, 0], False) == {"orders": None}  # no load yet
    gen = state.begin(0, 2, None)
    skewed = np.array([[90, 80, 10, 20], [5, 50, 60, 5]])  # contiguous blocks: {0,1} heavy in layer 0
    state.exchange(gen, 0, skewed)
    state.exchange(gen, 1, skewed * 3)
    torch.testing.assert_close(state.recent_load, torch.tensor(skewed * 2.0, dtype=torch.float64))  # the mean so far
    for step in range(2, LOAD_HORIZON_STEPS + 1):
        state.exchange(gen, step, skewed * 2)
    state.exchange(gen, LOAD_HORIZON_STEPS + 1, skewed * 102)  # then a moving average over the horizon
    torch.testing.assert_close(state.recent_load, torch.tensor(skewed * 4.0, dtype=torch.float64))
    plan = state.plan_placement(EXPERTS, 2, [0, 0], False)  # the job's placement: contiguous
    assert plan["orders"] is None and plan["expected_imbalance"]["contiguous"] > 1.3
    state.rebalance_requested = True  # `moe-ray rebalance`: once
    plan = state.plan_placement(EXPERTS, 2, [0, 0], False)
    assert plan["orders"] == [[0, 2, 1, 3], [2, 3, 0, 1]]  # heaviest apart in each layer
    assert plan["expected_imbalance"]["planned"] < 1.1 < plan["expected_imbalance"]["contiguous"]
    assert not state.rebalance_requested
    assert state.plan_placement(EXPERTS, 2, [0, 0], False)["orders"] is None
    always = CoordinatorState(LAYERS, EXPERTS, BALANCE | {"placement": "balanced"}, STEPS)
    always.exchange(always.begin(0, 2, None), 0, skewed)
    assert always.plan_placement(EXPERTS, 2, [0, 0], False)["orders"] == [[0, 2, 1, 3], [2, 3, 0, 1]]
    # A rebalance that a restart after a failure carried out does not stop the new group again.
    state.rebalance_requested, state.desired_workers = True, 2
    assert state.plan_placement(EXPERTS, 2, [0, 0], False)["orders"] is not None
    assert state.desired_workers is None
    # Node-limited routing on two nodes of one rank each: nothing can move between nodes.
    assert always.plan_placement(EXPERTS, 2, [0, 1], True)["orders"] == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_read_only_arrays_from_ray_are_copied_in_without_a_warning(recwarn):
    """Ray hands actors numpy arrays that are read-only views of its object store."""
    state = CoordinatorState(LAYERS, EXPERTS, BALANCE, STEPS)
    bias = np.full((LAYERS, EXPERTS), 0.5, dtype=np.float64)
    frozen = counts(0)
    for array in (bias, frozen):
        array.setflags(write=False)
    gen = state.begin(0, 2, bias)
    state.reseed(gen, 0, 2, bias)
    state.exchange(gen, 0, frozen, bias_digest(torch.full((LAYERS, EXPERTS), 0.5)))
    assert [str(w.message) for w in recwarn] == []
    bias.setflags(write=True)
    bias[:] = 9.0  # the caller's array changing later does not reach the coordinator's bias
    assert state.recent[0].dtype == torch.float32 and bool((state.recent[0] == 0.5).all())
