"""Router against a plain per-token reference (DESIGN 2.2)."""

import itertools

import pytest
import torch

from moe_ray.config import MoEConfig
from moe_ray.model.router import Router, group_members, group_top_sum


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


# --- group and node limits together (DESIGN 2.2.5 + 2.2.6, the rule in Router's docstring) ---


def brute_force_route(choice: list[float], expert_group, expert_node, top_k, topk_group, max_nodes):
    """The rule by enumeration of subsets, sharing no code with the router: the node set with the
    best summed node score, then the group set (among reached groups) with the best summed group
    score, then the top_k subset of the remaining experts with the best summed choice."""
    n = len(choice)
    nodes = sorted(set(expert_node))
    allowed = set(range(n))
    if max_nodes is not None and len(nodes) > max_nodes:
        per = max(1, top_k // max_nodes)

        def node_score(nd):
            return sum(sorted((choice[e] for e in range(n) if expert_node[e] == nd), reverse=True)[:per])

        best = max(itertools.combinations(nodes, max_nodes), key=lambda s: sum(node_score(nd) for nd in s))
        allowed = {e for e in allowed if expert_node[e] in best}
    groups = sorted(set(expert_group))
    if len(groups) > 1 and topk_group < len(groups):

        def group_score(g):
            return sum(sorted((choice[e] for e in range(n) if expert_group[e] == g), reverse=True)[:2])

        reached = sorted({expert_group[e] for e in allowed})
        keep = min(topk_group, len(reached))
        best = max(itertools.combinations(reached, keep), key=lambda s: sum(group_score(g) for g in s))
        allowed = {e for e in allowed if expert_group[e] in best}
    assert len(allowed) >= top_k, "the layout must be one the router accepts"
    return sorted(max(itertools.combinations(sorted(allowed), top_k), key=lambda s: sum(choice[e] for e in s)))


def check_limits(indices, expert_group, expert_node, top_k, topk_group, max_nodes):
    for row in indices.tolist():
        assert len(set(row)) == top_k, f"{row}: not {top_k} distinct experts"
        assert len({expert_group[e] for e in row}) <= topk_group, f"{row}: breaks the group limit"
        assert len({expert_node[e] for e in row}) <= max_nodes, f"{row}: breaks the node limit"


def test_group_and_node_limits_together_the_reported_case():
    """16 experts in 8 groups keeping 2, top-4, experts 0-7 on node 0 and 8-15 on node 1, one node
    per token: the old router let 155 of 256 tokens break a limit."""
    cfg = MoEConfig(n_routed_experts=16, expert_hidden=8, top_k=4, n_group=8, topk_group=2, max_nodes_per_token=1)
    router = make_router(cfg, bias_scale=0.5)
    expert_node = [0] * 8 + [1] * 8
    router.set_expert_nodes(torch.tensor(expert_node))
    out = router(torch.randn(256, 32))
    check_limits(out.indices, (torch.arange(16) // 2).tolist(), expert_node, 4, 2, 1)
    assert torch.isfinite(out.gates).all()


LAYOUTS = [
    # (n_experts, n_group, topk_group, top_k, max_nodes, expert -> node)
    (16, 8, 2, 4, 1, [0] * 8 + [1] * 8),
    (16, 4, 2, 4, 2, [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4),  # nodes hold whole groups
    (16, 2, 1, 4, 2, [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4),  # groups span several nodes
    (16, 4, 3, 4, 2, [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 0, 1, 2, 3]),  # uneven, not contiguous
    (12, 3, 2, 3, 2, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3]),  # nodes straddle groups
    (8, 4, 3, 3, 2, [2, 0, 1, 1, 0, 2, 2, 0]),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"layout{i}" for i in range(len(LAYOUTS))])
@pytest.mark.parametrize("seed", [0, 1])
def test_group_and_node_limits_match_brute_force(layout, seed):
    n, n_group, topk_group, top_k, max_nodes, expert_node = layout
    cfg = MoEConfig(
        n_routed_experts=n,
        expert_hidden=8,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        max_nodes_per_token=max_nodes,
    )
    router = make_router(cfg, seed=seed, bias_scale=0.0)
    # Negative and mixed biases: s + b < 0 for some experts, so a 0 mask would let them win.
    router.expert_bias.copy_(torch.randn(n) * 0.6 - 0.5)
    router.set_expert_nodes(torch.tensor(expert_node))
    x = torch.randn(96, 32)
    out = router(x)
    expert_group = (torch.arange(n) // (n // n_group)).tolist()
    check_limits(out.indices, expert_group, expert_node, top_k, topk_group, max_nodes)
    choice = (out.scores + router.expert_bias).tolist()
    for t, row in enumerate(out.indices.sort(dim=-1).values.tolist()):
        assert row == brute_force_route(choice[t], expert_group, expert_node, top_k, topk_group, max_nodes), t


def test_placement_that_breaks_the_limits_is_refused_and_would_break_them():
    """Nodes of 3 experts straddle groups of 2: a token whose best nodes are 0 and 2 and whose
    best groups are the two half-groups on them keeps only 2 experts, fewer than top_k=4."""
    cfg = MoEConfig(n_routed_experts=16, expert_hidden=8, top_k=4, n_group=8, topk_group=2, max_nodes_per_token=2)
    expert_node = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4])
    router = make_router(cfg)
    with pytest.raises(ValueError, match="moe.topk_group or moe.max_nodes_per_token") as err:
        router.set_expert_nodes(expert_node)
    assert "fewer than top_k=4" in str(err.value)
    assert router.n_nodes == 1, "a refused placement must leave the router as it was"
    # Without the check, this token really leaves the limits: nodes 0 and 2 win (experts 0-2,
    # 6-8), groups 1 (experts 2, 3) and 4 (experts 8, 9) win, and only experts 2 and 8 remain.
    router.expert_node.copy_(expert_node)
    router.n_nodes, router.node_members = 5, group_members(expert_node)
    scores = torch.full((1, 16), 0.1)
    scores[0, [0, 1, 2, 6, 7, 8]] = torch.tensor([0.5, 0.5, 0.6, 0.5, 0.5, 0.6])
    scores[0, [3, 9]] = 0.99  # lifts groups 1 and 4 without lifting nodes 1 and 3 enough
    router.expert_bias.zero_()
    picked = router.select(scores)
    assert {2, 8} <= set(picked[0].tolist())
    with pytest.raises(AssertionError, match="breaks the"):
        check_limits(picked, (torch.arange(16) // 2).tolist(), expert_node.tolist(), 4, 2, 2)


def test_group_scores_by_reshape_equal_the_general_path():
    choice = torch.randn(64, 24)
    contiguous = torch.arange(24) // 6
    assert group_members(contiguous) is None
    general = [(contiguous == g).nonzero().squeeze(1) for g in range(4)]
    torch.testing.assert_close(group_top_sum(choice, None, 4, 2), group_top_sum(choice, general, 4, 2))


def test_refusal_covers_node_limit_alone():
    """Three nodes of 2, 2 and 12 experts, one node per token, top-4: the small nodes cannot serve."""
    cfg = MoEConfig(n_routed_experts=16, expert_hidden=8, top_k=4, max_nodes_per_token=1)
    router = make_router(cfg)
    with pytest.raises(ValueError, match="fewer than top_k=4"):
        router.set_expert_nodes(torch.tensor([0, 0, 1, 1] + [2] * 12))
