"""Config validation and fine-grained segmentation (DESIGN 2.3)."""

import pytest
from pydantic import ValidationError

from moe_ray.config import ModelConfig, MoEConfig, Segmentation
from moe_ray.model.transformer import MoETransformer


def seg_model(m):
    moe = MoEConfig(segmentation=Segmentation(experts=8, hidden=128, top_k=2, shared=1, factor=m))
    return ModelConfig(d_model=64, n_heads=4, n_layers=3, n_dense_layers=1, dense_hidden=256, moe=moe)


def test_segmentation_keeps_total_and_active_expert_parameters():
    counts = {m: MoETransformer(seg_model(m)).parameter_counts() for m in (1, 2, 4)}
    cfg4 = seg_model(4).moe
    assert (cfg4.n_routed_experts, cfg4.expert_hidden, cfg4.top_k, cfg4.n_shared_experts) == (32, 32, 8, 4)
    for m in (2, 4):
        for key in ("routed_experts", "active_routed_experts", "shared_experts"):
            assert counts[m][key] == counts[1][key], key
        # Only the router grows (one row per expert); everything else is identical.
        router_growth = counts[m]["router"] - counts[1]["router"]
        assert router_growth == 2 * 64 * (8 * m - 8)
        assert counts[m]["total"] - counts[1]["total"] == router_growth
        assert counts[m]["active"] - counts[1]["active"] == router_growth


def test_resolved_segmentation_round_trips():
    cfg = seg_model(4)
    again = ModelConfig.model_validate(cfg.model_dump())
    assert again == cfg and again.moe.n_routed_experts == 32


def test_unknown_keys_rejected():
    with pytest.raises(ValidationError, match="extra"):
        ModelConfig(d_modle=64)
    with pytest.raises(ValidationError, match="extra"):
        MoEConfig(n_routed_experts=8, expert_hidden=8, top_k=2, topk=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_routed_experts=4, expert_hidden=8, top_k=5), "top_k=5 exceeds"),
        (dict(n_routed_experts=10, expert_hidden=8, top_k=2, n_group=4), "must divide"),
        (dict(n_routed_experts=8, expert_hidden=8, top_k=2, n_group=4, topk_group=5), "topk_group=5 exceeds"),
        (dict(n_routed_experts=16, expert_hidden=8, top_k=8, n_group=4, topk_group=1), "raise moe.topk_group"),
        (dict(n_routed_experts=8, expert_hidden=8, top_k=2, max_nodes_per_token=3), "max_nodes_per_token"),
        (dict(expert_hidden=8, top_k=2), "moe.n_routed_experts"),
        (dict(n_routed_experts=16, segmentation=dict(experts=4, hidden=64, top_k=1, factor=2)), "not both"),
        (dict(segmentation=dict(experts=4, hidden=30, top_k=1, factor=4)), "not divisible"),
        (dict(n_routed_experts=0, expert_hidden=8, top_k=2), "greater than 0"),
    ],
)
def test_impossible_moe_sizes_refused(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        MoEConfig(**kwargs)


def test_impossible_model_sizes_refused():
    with pytest.raises(ValidationError, match="must divide"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ValidationError, match="n_dense_layers"):
        ModelConfig(n_layers=2, n_dense_layers=3)
