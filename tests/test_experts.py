"""Grouped-GEMM experts against the per-expert loop, and the MoE layer against a per-token loop."""

import pytest
import torch

from moe_ray.config import BalanceConfig, ModelConfig, MoEConfig
from moe_ray.model.experts import GroupedExperts
from moe_ray.model.moe import MoELayer


def make_experts(n=8, d=16, h=12, seed=0):
    torch.manual_seed(seed)
    ex = GroupedExperts(d, h, tuple(range(n)))
    torch.nn.init.normal_(ex.w13, std=0.3)
    torch.nn.init.normal_(ex.w2, std=0.3)
    return ex


def assert_grouped_equals_loop(counts, dtype, d=16, h=12):
    """The grouped path and the loop on the same rows and gates: the same bits in the output and
    in every gradient (rows, gates, both weights); returns the grouped experts."""
    grouped = make_experts(n=len(counts), d=d, h=h).to(dtype)
    looped = make_experts(n=len(counts), d=d, h=h).to(dtype)
    looped.use_grouped_mm = False
    counts = torch.tensor(counts)
    x, gates = torch.randn(int(counts.sum()), d, dtype=dtype), torch.rand(int(counts.sum()), dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g1, g2 = gates.clone().requires_grad_(), gates.clone().requires_grad_()
    y1, y2 = grouped(x1, counts, g1), looped(x2, counts, g2)
    assert torch.equal(y1, y2)
    upstream = torch.randn_like(y1)
    (y1 * upstream).sum().backward()
    (y2 * upstream).sum().backward()
    for a, b in [(x1.grad, x2.grad), (g1.grad, g2.grad)]:
        assert torch.equal(a, b)
    assert torch.equal(grouped.w13.grad, looped.w13.grad) and torch.equal(grouped.w2.grad, looped.w2.grad)
    return grouped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "counts", [[5, 0, 7, 1, 0, 0, 9, 3], [0, 0, 0, 0, 0, 0, 0, 25], [0] * 8, [300, 200, 0, 1, 50, 400, 20, 3]]
)
def test_grouped_mm_equals_loop_in_output_and_gradients(counts, dtype):
    """On the CPU torch._grouped_mm does the loop's arithmetic per group: the same bits, the gate
    gradients included."""
    grouped = assert_grouped_equals_loop(counts, dtype)
    # Empty experts get exactly zero gradient.
    empty = torch.tensor(counts) == 0
    assert grouped.w13.grad[empty].abs().sum() == 0 and grouped.w2.grad[empty].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d, h", [(13, 8), (16, 7), (12, 6)])
def test_sizes_grouped_mm_refuses_take_the_loop(d, h, dtype):
    """torch._grouped_mm wants 16-byte aligned rows on the CPU too (it raises on sizes like these);
    such layers fall back to the loop and still train."""
    assert_grouped_equals_loop([3, 0, 4], dtype, d=d, h=h)


def test_loop_fallback_handles_float64_with_gradcheck():
    ex = make_experts(n=3, d=4, h=3).double()  # torch._grouped_mm has no float64: the loop
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g, a, b: _call(ex, x, counts, g, a, b), (x, gates, ex.w13, ex.w2))


def _call(ex, x, counts, gates, w13, w2):
    return ex(x, counts, gates)


def moe_reference(layer: MoELayer, x):
    """Per token: shared(x) + sum over its chosen experts of gate * SwiGLU_e(x)."""
    r = layer.router(x)
    out = layer.shared(x).clone()
    w13, w2 = layer.experts.w13, layer.experts.w2
    for t in range(x.shape[0]):
        for j in range(layer.top_k):
            e = int(r.indices[t, j])
            gate, up = (x[t] @ w13[e]).chunk(2)
            out[t] = out[t] + r.gates[t, j] * (torch.nn.functional.silu(gate) * up) @ w2[e]
    return out


def moe_cfg(**moe):
    base = dict(n_routed_experts=8, expert_hidden=12, top_k=3, n_shared_experts=1)
    base.update(moe)
    return ModelConfig(d_model=16, n_heads=2, moe=MoEConfig(**base))


@pytest.mark.parametrize("grouped", [True, False])
def test_moe_layer_equals_per_token_reference(grouped):
    torch.manual_seed(0)
    layer = MoELayer(moe_cfg(), BalanceConfig(method="none"))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer.experts.use_grouped_mm = grouped
    x = torch.randn(40, 16, requires_grad=True)
    y, stats = layer(x)
    xr = x.detach().clone().requires_grad_()
    ref = moe_reference(layer, xr)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert int(stats.counts.sum()) == 40 * 3  # dropless: every (token, slot) is computed
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, layer.experts.w13, layer.router.weight])
    grads_ref = torch.autograd.grad((ref * g).sum(), [xr, layer.experts.w13, layer.router.weight])
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_moe_layer_with_most_experts_empty():
    torch.manual_seed(0)
    layer = MoELayer(moe_cfg(), BalanceConfig(method="none"))
    layer.router.expert_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 5.0, 5.0, 5.0]))  # only experts 5-7 get tokens
    x = torch.randn(2, 5, 16)
    y, stats = layer(x)
    assert stats.counts[:5].sum() == 0 and stats.counts[5:].tolist() == [10, 10, 10]
    y.sum().backward()
    assert torch.isfinite(layer.experts.w13.grad).all()
    assert layer.experts.w13.grad[:5].abs().sum() == 0


def test_weighted_swiglu_and_permutation_gradients():
    from moe_ray.model.experts import weighted_swiglu
    from moe_ray.model.permutation import combine_rows, gather_rows, inverse_permutation

    h = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(weighted_swiglu, (h, w))
    gate, up = h.detach().chunk(2, dim=-1)
    torch.testing.assert_close(weighted_swiglu(h, w), torch.nn.functional.silu(gate) * up * w.detach()[:, None])

    top_k = 3
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(5 * top_k)
    inv = inverse_permutation(order)
    assert torch.equal(order[inv], torch.arange(15))
    assert torch.autograd.gradcheck(lambda x: gather_rows(x, order, inv, top_k), (x,))
    rows = torch.randn(15, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: combine_rows(r, order, inv, top_k), (rows,))
    # combine(gather(x)) sums each token's top_k copies: top_k * x.
    torch.testing.assert_close(combine_rows(gather_rows(x, order, inv, top_k), order, inv, top_k), top_k * x)


def test_per_token_sum_has_the_bits_of_the_plain_gather_and_sum():
    from moe_ray.model.permutation import inverse_permutation, sum_rows_per_token

    top_k, tokens = 6, 300
    order = torch.argsort(torch.randint(0, 64, (tokens * top_k,)), stable=True)
    inv = inverse_permutation(order)
    rows = torch.randn(tokens * top_k, 32)
    plain = rows.index_select(0, inv).view(tokens, top_k, 32).sum(dim=1)
    assert torch.equal(sum_rows_per_token(rows, inv, top_k), plain)
    # bf16 rows are summed in fp32 and rounded once, as the plain sum does.
    low = rows.bfloat16()
    fast = sum_rows_per_token(low, inv, top_k)
    assert fast.dtype == torch.bfloat16
    assert torch.equal(fast, low.float().index_select(0, inv).view(tokens, top_k, 32).sum(dim=1).bfloat16())


def test_a_shard_built_with_its_experts_only_equals_the_full_models_slice(tmp_path):
    from conftest import tiny_job

    from moe_ray.model.transformer import MoETransformer
    from moe_ray.train.trainer import build_model

    cfg = tiny_job(tmp_path).model  # 3 layers (2 MoE + 1 MTP MoE block), 8 experts
    cpu = torch.device("cpu")
    full = build_model(cfg, BalanceConfig(), 7, cpu)
    shard = build_model(cfg, BalanceConfig(), 7, cpu, local_experts=(3, 4, 5))
    full_params = dict(full.named_parameters())
    for name, p in shard.named_parameters():
        if name.endswith(("experts.w13", "experts.w2")):
            assert p.shape[0] == 3
            assert torch.equal(p, full_params[name][3:6]), name
        else:
            assert torch.equal(p, full_params[name]), name
    assert [m.experts.expert_ids for m in shard.moe_layers()] == [(3, 4, 5)] * 3
    # Any set of experts, in any order: each slice is its global id's.
    scattered = build_model(cfg, BalanceConfig(), 7, cpu, local_experts=(6, 1))
    assert torch.equal(scattered.moe_layers()[0].experts.w13, full.moe_layers()[0].experts.w13[[6, 1]])
    # Experts differ from each other and between layers (no seed reuse).
    w = full.moe_layers()[0].experts.w13
    assert not torch.equal(w[0], w[1])
    assert not torch.equal(w, full.moe_layers()[1].experts.w13)
    # The meta device builds the full shape without memory (parameter counts of a huge model).
    with torch.device("meta"):
        huge = MoETransformer(cfg.model_copy(update={"d_model": 4096, "n_heads": 32}))
    assert huge.parameter_counts()["total"] > full.parameter_counts()["total"]
