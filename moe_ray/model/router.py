"""The DeepSeek-V3 router: fp32 affinities, bias-steered top-k selection, gates from the
affinities only, group- and node-limited routing (DESIGN 2.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_ray.config import MoEConfig


@dataclass
class RouterOutput:
    indices: torch.Tensor  # (tokens, top_k) global expert ids, int64
    gates: torch.Tensor  # (tokens, top_k) fp32 gate weights
    counts: torch.Tensor  # (n_routed_experts,) tokens routed to each expert in this batch
    scores: torch.Tensor  # (tokens, n_routed_experts) fp32 affinities s (for the balance losses)
    logits: torch.Tensor  # (tokens, n_routed_experts) fp32 router logits (for the z-loss)
    max_nodes: int | None = None  # most nodes any token reached (only with expert nodes set)


def limit_to_groups(
    choice: torch.Tensor, expert_group: torch.Tensor, n_groups: int, keep: int, per_group: int
) -> torch.Tensor:
    """Mask (-inf) every expert outside the `keep` best groups of each token.

    A group's score is the sum of its `per_group` highest values of `choice` (= s + b).
    `expert_group[e]` names the group of expert e; groups may differ in size (node groups do).
    -inf, not 0: with a negative bias a 0 could still beat the experts that were kept.
    """
    if keep >= n_groups:
        return choice
    member = expert_group.unsqueeze(0) == torch.arange(n_groups, device=choice.device).unsqueeze(1)
    # (tokens, groups, experts): each group sees only its own experts.
    per_group_scores = choice.unsqueeze(1).masked_fill(~member, float("-inf"))
    smallest_group = int(member.sum(dim=1).min())
    k = max(1, min(per_group, smallest_group))
    group_score = per_group_scores.topk(k, dim=-1).values.sum(dim=-1)
    best = group_score.topk(keep, dim=-1).indices  # (tokens, keep)
    kept_group = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
    kept_expert = kept_group.gather(1, expert_group.unsqueeze(0).expand(choice.shape[0], -1))
    return choice.masked_fill(~kept_expert, float("-inf"))


class Router(nn.Module):
    """Scores tokens against the experts and picks `top_k` of them per token.

    `expert_bias` is the auxiliary-loss-free balance bias b (DESIGN 3.1): a buffer, never a
    parameter, so it takes no gradient; it steers which experts are chosen, never the gates.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(self.n_experts, d_model))
        self.register_buffer("expert_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        group_size = self.n_experts // cfg.n_group
        self.register_buffer("expert_group", torch.arange(self.n_experts) // group_size, persistent=False)
        # Node of each expert for node-limited routing; set from the live placement by the runtime.
        self.register_buffer("expert_node", torch.zeros(self.n_experts, dtype=torch.long), persistent=False)
        self.n_nodes = 1
        nn.init.normal_(self.weight, std=0.02)

    def set_expert_nodes(self, expert_node: torch.Tensor) -> None:
        """Tell the router which node hosts each expert (DESIGN 5.3); enables node limiting."""
        expert_node = torch.as_tensor(expert_node, dtype=torch.long, device=self.expert_bias.device)
        if expert_node.shape != (self.n_experts,):
            raise ValueError(f"expert_node must have shape ({self.n_experts},), got {tuple(expert_node.shape)}")
        self.expert_node.copy_(expert_node)
        self.n_nodes = int(expert_node.max()) + 1

    def forward(self, x: torch.Tensor) -> RouterOutput:
        x = x.reshape(-1, x.shape[-1])
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.cfg.score_func == "sigmoid" else logits.softmax(dim=-1)
        indices = self.select(scores.detach())
        gates = scores.gather(1, indices)
        if self.cfg.score_func == "sigmoid":
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        gates = gates * self.cfg.routed_scaling_factor
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts)
        max_nodes = None
        if self.n_nodes > 1 and indices.numel():
            nodes = self.expert_node[indices].sort(dim=-1).values
            max_nodes = int(((nodes[:, 1:] != nodes[:, :-1]).sum(dim=-1) + 1).max())
        return RouterOutput(
            indices=indices, gates=gates, counts=counts, scores=scores, logits=logits, max_nodes=max_nodes
        )

    @torch.no_grad()
    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k expert ids per token, chosen by s + b within the allowed groups and nodes."""
        choice = scores + self.expert_bias
        cfg = self.cfg
        if cfg.n_group > 1:
            choice = limit_to_groups(choice, self.expert_group, cfg.n_group, cfg.topk_group, per_group=2)
        limit = cfg.max_nodes_per_token
        if limit is not None and self.n_nodes > limit:
            per_node = max(1, self.top_k // limit)
            choice = limit_to_groups(choice, self.expert_node, self.n_nodes, limit, per_group=per_node)
        return choice.topk(self.top_k, dim=-1, sorted=False).indices
