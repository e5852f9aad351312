"""Multi-token prediction offsets (DESIGN 2.5): module k reads token i+k, predicts token i+k+1."""

import torch
import torch.nn.functional as F

from moe_ray.config import BalanceConfig, ModelConfig, MoEConfig, MTPConfig
from moe_ray.model.transformer import MoETransformer


def tiny(depth):
    cfg = ModelConfig(
        vocab_size=32,
        d_model=32,
        n_heads=2,
        n_layers=2,
        n_dense_layers=1,
        moe=MoEConfig(n_routed_experts=4, expert_hidden=16, top_k=2),
        mtp=MTPConfig(depth=depth, weight=0.5),
    )
    torch.manual_seed(0)
    model = MoETransformer(cfg, BalanceConfig(method="none"))
    with torch.no_grad():  # larger weights so every offset matters clearly
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.3)
    return model.eval()


def mtp_loss_with_offsets(model, window, emb_shift, target_shift):
    """Reference: per-position cross-entropy, module k fed Emb(t[i + k + emb_shift]) and scored
    on t[i + k + 1 + target_shift]."""
    depth = len(model.mtp)
    T = window.shape[1] - 1 - depth
    h = model.embed(window[:, :T])
    for block in model.blocks:
        h, _ = block(h)
    total = 0.0
    for k, module in enumerate(model.mtp, start=1):
        e = k + emb_shift
        emb = model.embed(window[:, e : e + T])
        h, _ = module(h, emb)
        logits = model.head(module.out_norm(h))
        losses = []
        for i in range(T):
            target = window[:, i + k + 1 + target_shift]
            losses.append(F.cross_entropy(logits[:, i], target))
        total = total + torch.stack(losses).mean()
    return total * model.cfg.mtp.weight / depth


@torch.no_grad()
def test_mtp_offsets_match_reference_and_wrong_offsets_differ():
    model = tiny(depth=2)
    torch.manual_seed(1)
    T = 12
    window = torch.randint(0, 32, (3, T + 1 + 2))
    got = model.compute_loss(window).mtp_loss
    ref = mtp_loss_with_offsets(model, window, 0, 0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for emb_shift, target_shift in [(-1, 0), (0, -1), (-1, -1)]:
        wrong = mtp_loss_with_offsets(model, window, emb_shift, target_shift)
        assert abs(float(wrong) - float(got)) > 1e-3, (emb_shift, target_shift)


def test_mtp_loss_depends_on_the_token_two_ahead():
    """With depth 1 the last window token is a target of MTP only: changing it moves the MTP
    loss and leaves the trunk's next-token loss exactly as it was."""
    model = tiny(depth=1)
    window = torch.randint(0, 32, (2, 10))
    changed = window.clone()
    changed[:, -1] = (changed[:, -1] + 7) % 32
    a, b = model.compute_loss(window), model.compute_loss(changed)
    assert torch.equal(a.lm_loss, b.lm_loss)
    assert not torch.equal(a.mtp_loss, b.mtp_loss)


def test_mtp_shares_embedding_and_head():
    model = tiny(depth=1)
    names = [n for n, _ in model.named_parameters()]
    assert not any(
        n.startswith("mtp.") and ("embed" in n.split(".")[-2] or n.endswith("head.weight"))
        for n in names
        if "norm" not in n
    )
    window = torch.randint(0, 32, (2, 10))
    model.train()
    out = model.compute_loss(window)
    out.mtp_loss.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.embed.weight.grad.abs().sum() > 0
