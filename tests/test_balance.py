"""The loss-free bias rule, the balance losses and MaxVio (DESIGN 3)."""

import pytest
import torch

from moe_ray.balance import (
    aux_balance_loss,
    bias_update_speed,
    max_violation,
    next_bias,
    router_z_loss,
    sequence_balance_loss,
    update_bias,
)
from moe_ray.config import BalanceConfig, MoEConfig
from moe_ray.model.router import Router


def test_bias_rule_sign():
    bias = torch.zeros(4)
    counts = torch.tensor([10, 2, 4, 4])  # mean 5: expert 0 overloaded, 1-3 underloaded
    new = update_bias(bias, counts, gamma=0.001)
    torch.testing.assert_close(new, torch.tensor([-0.001, 0.001, 0.001, 0.001]))
    # Exactly-mean experts stay put; works on a (layers, experts) stack.
    stack = update_bias(torch.zeros(2, 3), torch.tensor([[3, 3, 3], [0, 3, 6]]), gamma=0.5)
    torch.testing.assert_close(stack, torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, -0.5]]))


def test_proportional_policy_against_a_loop():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 200, (3, 16), generator=g)
    counts[0, 5] = 10_000  # far overloaded: the step is clipped to -gamma
    bias = torch.randn(3, 16, generator=g)
    got = update_bias(bias, counts, gamma=0.01, policy="proportional")
    for layer in range(3):
        mean = counts[layer].double().mean().item()
        for e in range(16):
            error = max(-1.0, min(1.0, (mean - counts[layer, e].item()) / mean))
            assert got[layer, e].item() == pytest.approx(bias[layer, e].item() + 0.01 * error, abs=1e-6)
    assert got[0, 5].item() == pytest.approx(bias[0, 5].item() - 0.01)
    # next_bias: the job's policy at the scheduled gamma (0 once frozen).
    cfg = BalanceConfig(bias_update_speed=0.01, policy="proportional", bias_freeze_fraction=0.5)
    assert torch.equal(next_bias(cfg, bias, counts, 0, 10), got)
    assert torch.equal(next_bias(cfg, bias, counts, 5, 10), bias)
    with pytest.raises(ValueError, match="unknown balance.policy 'pid'"):
        update_bias(bias, counts, 0.01, policy="pid")


def test_proportional_settles_where_the_sign_rule_cycles():
    """A fixed batch (the router does not learn): the sign rule moves every bias by a full gamma
    every step, so the loads cycle around balance; the proportional step shrinks with the error."""
    torch.manual_seed(0)
    cfg = MoEConfig(n_routed_experts=16, expert_hidden=8, top_k=4)
    router = Router(32, cfg)
    torch.nn.init.normal_(router.weight, std=0.1)
    x = torch.randn(2048, 32)
    final = {}
    for policy in ("sign", "proportional"):
        router.expert_bias.zero_()
        vio = []
        for _ in range(600):
            out = router(x)
            vio.append(float(max_violation(out.counts)))
            router.expert_bias.copy_(update_bias(router.expert_bias, out.counts, gamma=0.01, policy=policy))
        final[policy] = sum(vio[-100:]) / 100
    assert final["proportional"] < 0.5 * final["sign"], final


def test_bias_schedule_freezes_at_the_end_and_only_for_loss_free():
    cfg = BalanceConfig(bias_update_speed=0.01, bias_freeze_fraction=0.1)
    assert bias_update_speed(cfg, 0, 100) == 0.01
    assert bias_update_speed(cfg, 89, 100) == 0.01
    assert bias_update_speed(cfg, 90, 100) == 0.0
    assert bias_update_speed(BalanceConfig(method="aux_loss"), 0, 100) == 0.0


def test_max_violation():
    assert float(max_violation(torch.tensor([5, 5, 5, 5]))) == 0.0
    assert float(max_violation(torch.tensor([10, 2, 4, 4]))) == pytest.approx(1.0)
    per_layer = max_violation(torch.tensor([[1, 1], [3, 1]]))
    torch.testing.assert_close(per_layer, torch.tensor([0.0, 0.5], dtype=torch.float64))


def test_loss_free_balancing_drives_maxvio_down_without_touching_gates():
    torch.manual_seed(0)
    cfg = MoEConfig(n_routed_experts=16, expert_hidden=8, top_k=4)
    router = Router(32, cfg)
    torch.nn.init.normal_(router.weight, std=0.1)
    x = torch.randn(2048, 32)
    x[:, 0] = 1.0
    with torch.no_grad():
        router.weight[:3, 0] += 1.5  # experts 0-2 attract most tokens: skewed on purpose
    weight_before = router.weight.detach().clone()
    first = max_violation(router(x).counts)
    assert first > 1.0
    for _ in range(400):
        out = router(x)
        router.expert_bias.copy_(update_bias(router.expert_bias, out.counts, gamma=0.002))
    out = router(x)
    assert max_violation(out.counts) < 0.2
    assert torch.equal(router.weight, weight_before)
    s = out.scores.gather(1, out.indices)
    torch.testing.assert_close(out.gates, s / s.sum(-1, keepdim=True))


def test_sequence_balance_loss_hand_computed():
    # One sequence, T=2 tokens, N_r=3 experts, K_r=1.
    scores = torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]])
    indices = torch.tensor([[[0], [2]]])
    # f = 3/(1*2) * [1, 0, 1] = [1.5, 0, 1.5]; s' = s (rows sum to 1); P = [0.35, 0.225, 0.425]
    expected = 0.1 * (1.5 * 0.35 + 0 * 0.225 + 1.5 * 0.425)
    got = sequence_balance_loss(scores, indices, top_k=1, alpha=0.1)
    assert float(got) == pytest.approx(expected)
    # Sigmoid-style scores are normalised per token first: doubling all scores changes nothing.
    assert float(sequence_balance_loss(scores * 2, indices, 1, 0.1)) == pytest.approx(expected)


def test_aux_loss_is_alpha_when_balanced_and_larger_when_skewed():
    n, k, t = 4, 1, 8
    uniform = torch.full((t, n), 1 / n)
    balanced = aux_balance_loss(uniform, torch.tensor([2, 2, 2, 2]), k, alpha=0.01)
    assert float(balanced) == pytest.approx(0.01)
    skew_scores = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(t, 1)
    skewed = aux_balance_loss(skew_scores, torch.tensor([8, 0, 0, 0]), k, alpha=0.01)
    assert float(skewed) == pytest.approx(0.01 * 4 * 0.7)


def test_z_loss():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = ((torch.log(torch.tensor(2.0))) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    assert float(router_z_loss(logits, 1.0)) == pytest.approx(float(expected))
