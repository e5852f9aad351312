"""The DeepSeek-V3 router: fp32 affinities, bias-steered top-k selection, gates from the
affinities only, group- and node-limited routing (DESIGN 2.2)."""

from __future__ import annotations

import itertools
import math
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
    # Most nodes any token reached, as a 0-dim tensor (only with node limiting on): read it when
    # a metric needs it, so routing itself never waits for the host.
    max_nodes: torch.Tensor | None = None


def group_members(expert_group: torch.Tensor) -> list[torch.Tensor] | None:
    """The expert ids of each group, or None when the groups are equal and contiguous (then
    `group_top_sum` needs no index at all)."""
    n, n_groups = expert_group.numel(), int(expert_group.max()) + 1
    if n % n_groups == 0 and torch.equal(expert_group.cpu(), torch.arange(n) // (n // n_groups)):
        return None
    return [(expert_group == g).nonzero().squeeze(1) for g in range(n_groups)]


def group_top_sum(choice: torch.Tensor, members: list[torch.Tensor] | None, n_groups: int, k: int) -> torch.Tensor:
    """(tokens, n_groups): each group's sum of its `k` highest values of `choice`.

    Equal contiguous groups (`members` None) are a reshape, no copy, as Hugging Face's router
    does. Other groups (the node groups of an uneven or non-contiguous placement) take one column
    gather per group, so memory stays tokens x experts, never tokens x groups x experts.
    """
    tokens, n = choice.shape
    if members is None:
        size = n // n_groups
        return choice.view(tokens, n_groups, size).topk(min(k, size), dim=-1).values.sum(dim=-1)
    return torch.stack(
        [choice.index_select(1, m).topk(min(k, m.numel()), dim=-1).values.sum(dim=-1) for m in members], dim=1
    )


def keep_best_groups(group_score: torch.Tensor, keep: int, expert_group: torch.Tensor) -> torch.Tensor:
    """(tokens, experts) bool: the experts of each token's `keep` best-scoring groups."""
    best = group_score.topk(keep, dim=-1).indices
    kept_group = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
    return kept_group.index_select(1, expert_group)


def routing_limits_problem(
    expert_group: torch.Tensor, expert_node: torch.Tensor, top_k: int, topk_group: int, max_nodes: int
) -> str | None:
    """Why some token could be left fewer than `top_k` experts under both limits, or None.

    Worst case of the rule in `Router.select`: any `max_nodes` nodes can win, and among the
    groups they reach, the `topk_group` with the fewest experts on those nodes can win. A quick
    bound settles the usual layouts (nodes that hold whole groups, or groups that span whole
    nodes); otherwise every set of nodes is checked.
    """
    n_nodes, n_groups = int(expert_node.max()) + 1, int(expert_group.max()) + 1
    if n_nodes <= max_nodes:
        return None
    node, group = expert_node.cpu(), expert_group.cpu()
    cells = torch.zeros(n_nodes, n_groups, dtype=torch.long)  # experts of each group on each node
    cells.index_put_((node, group), torch.ones_like(node), accumulate=True)
    # A kept group holds at least the smallest non-empty cell; with fewer than topk_group groups
    # reached, the token may use all of its nodes' experts.
    bound = min(topk_group * int(cells[cells > 0].min()), max_nodes * int(cells.sum(dim=1).min()))
    if bound >= top_k:
        return None
    if math.comb(n_nodes, max_nodes) > MAX_NODE_SETS:
        return (
            f"cannot verify that every token keeps top_k={top_k} experts over {n_nodes} nodes "
            f"({math.comb(n_nodes, max_nodes)} node sets): raise moe.topk_group or moe.max_nodes_per_token"
        )
    combos = torch.tensor(list(itertools.combinations(range(n_nodes), max_nodes)))
    for chunk in combos.split(4096):
        reach = cells[chunk].sum(dim=1)  # (sets, groups)
        unreached = reach == 0
        none = len(node) + 1  # more than any group can hold: sorts unreached groups last
        smallest = reach.masked_fill(unreached, none).sort(dim=1).values[:, :topk_group]
        worst = smallest.masked_fill(smallest == none, 0).sum(dim=1)
        bad = int(worst.argmin())
        if int(worst[bad]) < top_k:
            return (
                f"on this placement a token whose best nodes are {chunk[bad].tolist()} can be left "
                f"{int(worst[bad])} experts in its kept groups, fewer than top_k={top_k}: raise "
                "moe.topk_group or moe.max_nodes_per_token, or use a worker count whose nodes hold whole groups"
            )
    return None


MAX_NODE_SETS = 200_000


class Router(nn.Module):
    """Scores tokens against the experts and picks `top_k` of them per token.

    `expert_bias` is the auxiliary-loss-free balance bias b (DESIGN 3.1): a buffer, never a
    parameter, so it takes no gradient; it steers which experts are chosen, never the gates.

    Routing limits (DESIGN 2.2.5, 2.2.6), with c = s + b:
    1. node limit (when the experts sit on more than `max_nodes_per_token` nodes): a node's score
       is the sum of its top `top_k / max_nodes_per_token` values of c; keep the best
       `max_nodes_per_token` nodes;
    2. group limit (`n_group` > 1): a group's score is the sum of its top-2 values of c over all
       its experts; among the groups that have an expert on a kept node, keep the best
       `topk_group`;
    3. the `top_k` best c over the experts on a kept node AND in a kept group.
    Excluded experts are masked with -inf (with a negative bias, 0 could win). Every token gets
    exactly `top_k` experts within both limits: `set_expert_nodes` refuses a placement on which
    step 3 could find fewer. Without a node limit this is DESIGN's (and Hugging Face's) rule.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(self.n_experts, d_model))
        self.register_buffer("expert_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        # repeat_interleave, not `arange // size`: a division on the meta device imports torch._dynamo.
        groups = torch.arange(cfg.n_group).repeat_interleave(self.n_experts // cfg.n_group)
        self.register_buffer("expert_group", groups, persistent=False)
        # Node of each expert for node-limited routing; set from the live placement by the runtime.
        self.register_buffer("expert_node", torch.zeros(self.n_experts, dtype=torch.long), persistent=False)
        self.n_nodes = 1
        self.node_members: list[torch.Tensor] | None = None
        nn.init.normal_(self.weight, std=0.02)

    @property
    def node_limited(self) -> bool:
        return self.cfg.max_nodes_per_token is not None and self.n_nodes > self.cfg.max_nodes_per_token

    def set_expert_nodes(self, expert_node: torch.Tensor) -> None:
        """Tell the router which node hosts each expert (DESIGN 5.3); enables node limiting.
        Raises ValueError when the placement could leave a token fewer than top_k experts."""
        expert_node = torch.as_tensor(expert_node, dtype=torch.long, device=self.expert_bias.device)
        if expert_node.shape != (self.n_experts,):
            raise ValueError(f"expert_node must have shape ({self.n_experts},), got {tuple(expert_node.shape)}")
        cfg = self.cfg
        if cfg.max_nodes_per_token is not None:
            problem = routing_limits_problem(
                self.expert_group, expert_node, self.top_k, cfg.topk_group, cfg.max_nodes_per_token
            )
            if problem:
                groups = f" with moe.n_group={cfg.n_group}, moe.topk_group={cfg.topk_group}" if cfg.n_group > 1 else ""
                raise ValueError(f"moe.max_nodes_per_token={cfg.max_nodes_per_token}{groups}: {problem}")
        self.expert_node.copy_(expert_node)
        self.n_nodes = int(expert_node.max()) + 1
        self.node_members = group_members(expert_node)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        x = x.reshape(-1, x.shape[-1])
        # fp32 even inside autocast: the bias step (gamma ~1e-3) is below bf16's spacing near 0.5,
        # and bf16 logits flip the choice of experts for a good share of tokens.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
            scores = logits.sigmoid() if self.cfg.score_func == "sigmoid" else logits.softmax(dim=-1)
            indices = self.select(scores.detach())
            gates = scores.gather(1, indices)
            if self.cfg.score_func == "sigmoid":
                gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
            gates = gates * self.cfg.routed_scaling_factor
        # index_add_, not bincount: bincount on a GPU waits for the host to size its output.
        counts = indices.new_zeros(self.n_experts).index_add_(0, indices.flatten(), torch.ones_like(indices.flatten()))
        max_nodes = None
        if self.n_nodes > 1 and indices.numel():
            nodes = self.expert_node[indices].sort(dim=-1).values
            max_nodes = ((nodes[:, 1:] != nodes[:, :-1]).sum(dim=-1) + 1).max()
        return RouterOutput(
            indices=indices, gates=gates, counts=counts, scores=scores, logits=logits, max_nodes=max_nodes
        )

    @torch.no_grad()
    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k expert ids per token, chosen by s + b within the allowed nodes and groups."""
        choice = scores + self.expert_bias
        cfg = self.cfg
        allowed = None
        if self.node_limited:
            per_node = max(1, self.top_k // cfg.max_nodes_per_token)
            node_score = group_top_sum(choice, self.node_members, self.n_nodes, per_node)
            allowed = keep_best_groups(node_score, cfg.max_nodes_per_token, self.expert_node)
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
            group_score = group_top_sum(choice, None, cfg.n_group, 2)
            if allowed is not None:  # only groups with an expert on a kept node compete
                reached = allowed.view(-1, cfg.n_group, self.n_experts // cfg.n_group).any(dim=-1)
                group_score = group_score.masked_fill(~reached, float("-inf"))
            in_group = keep_best_groups(group_score, cfg.topk_group, self.expert_group)
            allowed = in_group if allowed is None else allowed & in_group
        if allowed is not None:
            choice = choice.masked_fill(~allowed, float("-inf"))
        return choice.topk(self.top_k, dim=-1, sorted=False).indices
