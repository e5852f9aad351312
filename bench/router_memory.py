"""Peak memory of the router's expert selection at DeepSeek-V3's shape: 16k tokens, 256 experts in
8 groups keeping 4, top-8, 4 nodes per token. Before: group scores from a tokens x groups x experts
tensor; now: a reshape for equal contiguous groups, one column gather per group for uneven node
groups (issue 16). Peak bytes allocated during `Router.select` (profiler timeline on CPU,
max_memory_allocated on GPU), with the bytes of the scores themselves for scale.

    python bench/router_memory.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from moe_ray.config import MoEConfig  # noqa: E402
from moe_ray.model.router import Router  # noqa: E402

BENCH = "router_memory"


def old_limit_to_groups(choice, expert_group, n_groups, keep, per_group):
    """The group scoring issue 16 replaced (commit 0080825), kept here as the baseline."""
    member = expert_group.unsqueeze(0) == torch.arange(n_groups, device=choice.device).unsqueeze(1)
    per_group_scores = choice.unsqueeze(1).masked_fill(~member, float("-inf"))
    k = max(1, min(per_group, int(member.sum(dim=1).min())))
    group_score = per_group_scores.topk(k, dim=-1).values.sum(dim=-1)
    best = group_score.topk(keep, dim=-1).indices
    kept_group = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
    kept_expert = kept_group.gather(1, expert_group.unsqueeze(0).expand(choice.shape[0], -1))
    return choice.masked_fill(~kept_expert, float("-inf"))


def old_select(router: Router, scores: torch.Tensor) -> torch.Tensor:
    cfg = router.cfg
    choice = old_limit_to_groups(scores + router.expert_bias, router.expert_group, cfg.n_group, cfg.topk_group, 2)
    if router.node_limited:
        per = max(1, router.top_k // cfg.max_nodes_per_token)
        choice = old_limit_to_groups(choice, router.expert_node, router.n_nodes, cfg.max_nodes_per_token, per)
    return choice.topk(router.top_k, dim=-1, sorted=False).indices


def peak_bytes(fn, device: torch.device) -> int:
    """Most bytes allocated at once while `fn` runs, above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    current = peak = 0
    for _, action, _, size in p._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4k tokens instead of 16k")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    tokens = 4096 if args.quick else 16384
    cfg = MoEConfig(n_routed_experts=256, expert_hidden=8, top_k=8, n_group=8, topk_group=4, max_nodes_per_token=4)
    scores = torch.rand(tokens, 256, device=device)
    layouts = {
        # 64 workers on 8 nodes: each node holds one group (equal contiguous node groups)
        "even_nodes": torch.arange(256) // 32,
        # an uneven placement: 12 nodes, blocks of 21 or 22 experts (the general path)
        "uneven_nodes": torch.arange(256) * 12 // 256,
    }
    for name, expert_node in layouts.items():
        router = Router(16, cfg).to(device)
        router.expert_bias.copy_(torch.randn(256) * 0.01)
        router.set_expert_nodes(expert_node)
        new = peak_bytes(lambda r=router: r.select(scores), device)
        old = peak_bytes(lambda r=router: old_select(r, scores), device)
        extra = {"tokens": tokens, "layout": name, "device": device.type, "scores_bytes": scores.numel() * 4}
        emit(BENCH, f"select_peak_bytes_{name}", new, **extra)
        emit(BENCH, f"select_peak_bytes_before_{name}", old, **extra)
        emit(BENCH, f"select_peak_ratio_{name}", round(new / old, 3), **extra)


if __name__ == "__main__":
    main()
