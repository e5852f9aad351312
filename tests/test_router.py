"""Router against a plain per-token reference (DESIGN 2.2)."""

import pytest
import torch

from moe_ray.config import MoEConfig
from moe_ray.model.router import Router


def reference_route(x, weight, bias, cfg: MoEConfig, expert_node=None):
    """Loops over tokens; written from DESIGN 2.2 without sharing code with the router."""
    n, k = cfg.n_routed_experts, cfg.top_k
    all_idx, all_gates = [], []
    for t in range(x.shape[0]):
        logits = [float(x[t].double() @ weight[e].double()) for e in range(n)]
        if cfg.score_func == "sigmoid":
            s = [1.0 / (1.0 + torch.exp(torch.tensor(-v, dtype=torch.float64)).item()) for v in logits]
        else:
            z = torch.tensor(logits, dtype=torch.float64).softmax(0)
            s = z.tolist()
        choice = [s[e] + float(bias[e]) for e in range(n)]
        allowed = set(range(n))
        if cfg.n_group > 1:
            size = n // cfg.n_group
            group_scores = []
            for g in range(cfg.n_group):
                vals = sorted(choice[g * size : (g + 1) * size], reverse=True)
                group_scores.append((sum(vals[:2]), g))
            kept = {g for _, g in sorted(group_scores, reverse=True)[: cfg.topk_group]}
            allowed = {e for e in allowed if e // size in kept}
        if expert_node is not None and cfg.max_nodes_per_token is not None:
            nodes = sorted(set(expert_node))
            per = max(1, k // cfg.max_nodes_per_token)
            node_scores = []
            for nd in nodes:
                vals = sorted(
                    [choice[e] if e in allowed else float("-inf") for e in range(n) if expert_node[e] == nd],
                    reverse=True,
                )
                node_scores.append((sum(vals[:per]), nd))
            kept = {nd for _, nd in sorted(node_scores, reverse=True)[: cfg.max_nodes_per_token]}
            allowed = {e for e in allowed if expert_node[e] in kept}
        chosen = sorted(allowed, key=lambda e: choice[e], reverse=True)[:k]
        g = [s[e] for e in chosen]
        if cfg.score_func == "sigmoid":
            total = sum(g)
            g = [v / total for v in g]
        g = [v * cfg.routed_scaling_factor for v in g]
        order = sorted(range(k), key=lambda i: chosen[i])
        all_idx.append([chosen[i] for i in order])
        all_gates.append([g[i] for i in order])
    return torch.tensor(all_idx), torch.tensor(all_gates, dtype=torch.float64)


def sorted_output(out):
    idx, order = out.indices.sort(dim=-1)
    return idx, out.gates.gather(1, order).double()


def make_router(cfg, d=32, seed=0, bias_scale=0.05):
    torch.manual_seed(seed)
    r = Router(d, cfg)
    torch.nn.init.normal_(r.weight, std=0.5)
    r.expert_bias.copy_(torch.randn(cfg.n_routed_experts) * bias_scale)
    return r


@pytest.mark.parametrize(
    "cfg",
    [
        MoEConfig(n_routed_experts=16, expert_hidden=8, top_k=4),
        MoEConfig(n_routed_experts=16, expert_hidden=8, top_k=4, routed_scaling_factor=2.5),
        MoEConfig(n_routed_experts=32, expert_hidden=8, top_k=6, n_group=8, topk_group=3),
        MoEConfig(n_routed_experts=16, expert_hidden=8, top_k=3, score_func="softmax"),
    ],
    ids=["sigmoid", "scaled", "group_limited", "softmax"],
)
def test_router_matches_reference(cfg):
    router = make_router(cfg)
    x = torch.randn(64, 32)
    out = router(x)
    ref_idx, ref_gates = reference_route(x, router.weight.detach(), router.expert_bias, cfg)
    idx, gates = sorted_output(out)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(gates, ref_gates, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.counts, torch.bincount(ref_idx.flatten(), minlength=cfg.n_routed_experts))


def test_group_limited_uses_minus_inf_mask():
    """A strongly negative bias must not let an expert from a dropped group win (0-mask bug)."""
    cfg = MoEConfig(n_routed_experts=8, expert_hidden=8, top_k=2, n_group=4, topk_group=1)
    router = make_router(cfg)
    router.expert_bias.fill_(-5.0)  # every s + b < 0, so a 0 mask would beat all kept experts
    x = torch.randn(32, 32)
    out = router(x)
    groups = out.indices // 2
    assert (groups[:, 0] == groups[:, 1]).all(), "both experts must come from the one kept group"
    ref_idx, _ = reference_route(x, router.weight.detach(), router.expert_bias, cfg)
    assert torch.equal(sorted_output(out)[0], ref_idx)


def test_node_limited_routing_matches_reference_and_limits_nodes():
    cfg = MoEConfig(n_routed_experts=16, expert_hidden=8, top_k=4, max_nodes_per_token=2)
    router = make_router(cfg)
    # Uneven, non-contiguous placement over 4 nodes.
    expert_node = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 0, 1, 3, 2]
    router.set_expert_nodes(torch.tensor(expert_node))
    x = torch.randn(128, 32)
    out = router(x)
    nodes_per_token = [len({expert_node[e] for e in row.tolist()}) for row in out.indices]
    assert max(nodes_per_token) <= 2
    # Without the limit, tokens do spread over more nodes: the limit is doing something.
    free = Router(32, MoEConfig(n_routed_experts=16, expert_hidden=8, top_k=4))
    free.load_state_dict(router.state_dict())
    spread = [len({expert_node[e] for e in row.tolist()}) for row in free(x).indices]
    assert max(spread) > 2
    ref_idx, ref_gates = reference_route(x, router.weight.detach(), router.expert_bias, cfg, expert_node)
    idx, gates = sorted_output(out)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(gates, ref_gates, rtol=1e-5, atol=1e-6)


def test_bias_changes_choice_not_gate_values():
    cfg = MoEConfig(n_routed_experts=16, expert_hidden=8, top_k=4)
    router = make_router(cfg, bias_scale=0.0)
    x = torch.randn(256, 32)
    before = router(x)
    router.expert_bias[3] = 10.0  # force expert 3 into every token's top-k
    after = router(x)
    assert (after.indices == 3).any(dim=-1).all()
    assert not torch.equal(before.indices.sort(-1).values, after.indices.sort(-1).values)
    # Gates come from s only: s of the chosen experts normalised over the chosen.
    s = after.scores.gather(1, after.indices)
    torch.testing.assert_close(after.gates, s / s.sum(-1, keepdim=True))
    # Tokens whose selection did not change keep exactly the same gates.
    same = (before.indices.sort(-1).values == after.indices.sort(-1).values).all(-1)
    b_idx, b_g = sorted_output(before)
    a_idx, a_g = sorted_output(after)
    if same.any():
        torch.testing.assert_close(b_g[same], a_g[same])
    # The bias never receives gradient.
    after.gates.sum().backward()
    assert router.weight.grad is not None and not router.expert_bias.requires_grad


def test_router_scores_are_fp32_under_bf16_input():
    cfg = MoEConfig(n_routed_experts=8, expert_hidden=8, top_k=2)
    router = make_router(cfg)
    out = router(torch.randn(4, 32).bfloat16())
    assert out.scores.dtype == torch.float32 and out.gates.dtype == torch.float32
