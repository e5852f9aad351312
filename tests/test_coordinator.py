"""The coordinator's state machine without Ray: every worker of a step must get the same bias
and the same scale decision, however the replies interleave with a `moe-ray scale` request."""

import asyncio

import numpy as np
import pytest
import torch

from moe_ray.balance import bias_update_speed, update_bias
from moe_ray.config import BalanceConfig
from moe_ray.runtime.coordinator import CoordinatorState, StaleGeneration

LAYERS, EXPERTS, STEPS = 2, 4, 10
BALANCE = {"bias_update_speed": 0.1}


def counts(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 20, size=(LAYERS, EXPERTS))


async def rank0_waits_for_rank1() -> tuple[CoordinatorState, int, asyncio.Task]:
    """A 2-worker group at step 0 whose rank 0 has sent its counts and waits for its bias."""
    state = CoordinatorState(LAYERS, EXPERTS, BALANCE, STEPS)
    gen = state.begin(0, 2, None)
    state.submit_counts(gen, 0, 0, counts(0))
    waiting = asyncio.create_task(state.get_bias(gen, 0))
    await asyncio.sleep(0)
    return state, gen, waiting


def test_a_scale_request_between_two_replies_reaches_both_workers_at_the_same_step():
    async def scenario():
        state, gen, first = await rank0_waits_for_rank1()
        state.submit_counts(gen, 0, 1, counts(1))
        second = await state.get_bias(gen, 0)  # rank 1's reply goes out at once
        state.desired_workers = 1  # `moe-ray scale` lands before rank 0's reply is sent
        first = await first
        assert first[0] == second[0] == 1
        np.testing.assert_array_equal(first[1], second[1])
        assert first[2] == second[2] is None  # step 0 was complete before the request
        # The next step carries the request to both ranks.
        for rank in (0, 1):
            state.submit_counts(gen, 1, rank, counts(rank))
        replies = [await state.get_bias(gen, 1) for _ in (0, 1)]
        assert [r[2] for r in replies] == [1, 1]

    asyncio.run(scenario())


def test_bias_follows_the_rule_on_the_summed_counts():
    async def scenario():
        state = CoordinatorState(LAYERS, EXPERTS, BALANCE, STEPS)
        gen = state.begin(0, 3, None)
        bias = torch.zeros(LAYERS, EXPERTS)
        cfg = BalanceConfig.model_validate(BALANCE)
        for step in range(4):
            parts = [counts(10 * step + r) for r in range(3)]
            for rank, part in enumerate(parts):
                state.submit_counts(gen, step, rank, part)
            version, got, _ = await state.get_bias(gen, step)
            bias = update_bias(bias, torch.from_numpy(sum(parts)), bias_update_speed(cfg, step, STEPS))
            assert version == step + 1
            np.testing.assert_array_equal(got, bias.numpy())

    asyncio.run(scenario())


def test_a_new_worker_group_releases_and_refuses_the_old_one():
    async def scenario():
        state, _, waiting = await rank0_waits_for_rank1()
        state.begin(0, 1, None)  # the group was torn down and a new one started
        with pytest.raises(StaleGeneration):
            await waiting

    asyncio.run(scenario())
