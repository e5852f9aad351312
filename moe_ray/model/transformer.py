"""The MoE language model: embedding, transformer blocks (first `n_dense_layers` dense, the
rest DeepSeekMoE), output head, and multi-token prediction modules (DESIGN 2.4, 2.5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_ray.config import BalanceConfig, ModelConfig
from moe_ray.model.attention import Attention
from moe_ray.model.experts import GroupedExperts, SwiGLU, init_per_expert
from moe_ray.model.moe import MoELayer, MoEStats


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, balance: BalanceConfig, moe: bool, local_experts: tuple[int, ...] | None = None
    ):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.rope_theta)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = MoELayer(cfg, balance, local_experts) if moe else SwiGLU(cfg.d_model, cfg.resolved_dense_hidden)

    def forward(self, x: torch.Tensor, kv_cache: dict | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.attn(self.attn_norm(x), kv_cache)
        if isinstance(self.ffn, MoELayer):
            y, stats = self.ffn(self.ffn_norm(x))
            return x + y, stats
        return x + self.ffn(self.ffn_norm(x)), None


class MTPModule(nn.Module):
    """Depth-k MTP: h'_i = W_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))], one block, and the
    shared output head predicts t_{i+k+1}."""

    def __init__(
        self, cfg: ModelConfig, balance: BalanceConfig, moe: bool, local_experts: tuple[int, ...] | None = None
    ):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.embed_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg, balance, moe, local_experts)
        self.out_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(
        self, h_prev: torch.Tensor, emb: torch.Tensor, kv_cache: dict | None = None
    ) -> tuple[torch.Tensor, MoEStats | None]:
        h = self.proj(torch.cat([self.hidden_norm(h_prev), self.embed_norm(emb)], dim=-1))
        # Under autocast the projection returns bf16; the residual stream stays in the trunk's dtype.
        return self.block(h.to(h_prev.dtype), kv_cache)


@dataclass
class ModelOutput:
    loss: torch.Tensor  # what backward() is called on: lm + mtp + balance
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor
    balance_loss: torch.Tensor
    counts: torch.Tensor  # (n_moe_layers, n_routed_experts) tokens per expert in this pass
    max_nodes: torch.Tensor | None = None  # 0-dim: most nodes any token reached in any layer (multi-node only)


class MoETransformer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        balance: BalanceConfig | None = None,
        local_experts: tuple[int, ...] | list[tuple[int, ...]] | None = None,
    ):
        """`local_experts`: build only these routed experts (by global id), as an expert-parallel
        worker does: one tuple for every MoE layer, or a list with one per MoE layer (trunk
        first, then MTP); their weights equal those of the full model's."""
        super().__init__()
        self.cfg = cfg
        balance = balance or BalanceConfig()
        has_moe = cfg.n_layers > cfg.n_dense_layers
        n_moe = cfg.n_layers - cfg.n_dense_layers + (cfg.mtp.depth if has_moe else 0)
        per_layer = iter(local_experts if isinstance(local_experts, list) else [local_experts] * n_moe)
        if isinstance(local_experts, list) and len(local_experts) != n_moe:
            raise ValueError(f"local_experts lists {len(local_experts)} MoE layers, the model has {n_moe}")
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, balance, moe, next(per_layer) if moe else None)
            for moe in (i >= cfg.n_dense_layers for i in range(cfg.n_layers))
        )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, balance, has_moe, next(per_layer) if has_moe else None) for _ in range(cfg.mtp.depth)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual-branch outputs start smaller so the residual stream does not grow with depth.
        out_std = std / (2 * (self.cfg.n_layers + self.cfg.mtp.depth)) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms keep their ones
            is_output = name.endswith(("attn.out.weight", "ffn.w2.weight", "shared.w2.weight", "experts.w2"))
            p_std = out_std if is_output else std
            if name.endswith(("experts.w13", "experts.w2")):
                init_per_expert(p, self.get_submodule(name.rsplit(".", 1)[0]).expert_ids, p_std)
            else:
                nn.init.normal_(p, std=p_std)

    # --- the stable API for balance state -------------------------------------------------
    def moe_layers(self) -> list[MoELayer]:
        """Every MoE layer in a fixed order: trunk blocks first, then the MTP modules."""
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def get_expert_bias(self) -> torch.Tensor:
        """(n_moe_layers, n_routed_experts) copy of every layer's balance bias b."""
        layers = self.moe_layers()
        if not layers:  # an all-dense model
            return torch.zeros(0, self.cfg.moe.n_routed_experts)
        return torch.stack([m.router.expert_bias.detach().clone() for m in layers])

    @torch.no_grad()
    def set_expert_bias(self, bias: torch.Tensor) -> None:
        layers = self.moe_layers()
        bias = torch.as_tensor(bias)
        if bias.shape != (len(layers), self.cfg.moe.n_routed_experts):
            raise ValueError(
                f"bias must have shape ({len(layers)}, {self.cfg.moe.n_routed_experts}), got {tuple(bias.shape)}"
            )
        for layer, b in zip(layers, bias, strict=True):
            layer.router.expert_bias.copy_(b)

    # --- forward ----------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, kv_caches: list[dict] | None = None) -> torch.Tensor:
        """Next-token logits (batch, T, vocab) of the trunk alone (MTP modules unused)."""
        return self.head(self.norm(self.hidden_states(tokens, kv_caches)))

    def hidden_states(self, tokens: torch.Tensor, kv_caches: list[dict] | None = None) -> torch.Tensor:
        """The trunk's last hidden states before the final norm: what MTP module 1 reads."""
        h = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            h, _ = block(h, None if kv_caches is None else kv_caches[i])
        return h

    def compute_loss(self, window: torch.Tensor) -> ModelOutput:
        """window: (batch, T + 1 + mtp_depth) tokens. The trunk reads the first T and predicts the
        next token at each position; MTP module k reads token i+k and predicts token i+k+1."""
        depth = len(self.mtp)
        seq_len = window.shape[1] - 1 - depth
        if seq_len < 1:
            raise ValueError(f"window of {window.shape[1]} tokens is too short for MTP depth {depth}")
        stats: list[MoEStats] = []
        h = self.embed(window[:, :seq_len])
        for block in self.blocks:
            h, s = block(h)
            stats.append(s)
        lm_loss = self._cross_entropy(self.norm(h), window[:, 1 : seq_len + 1])
        mtp_loss = torch.zeros((), device=window.device)
        for k, module in enumerate(self.mtp, start=1):
            h, s = module(h, self.embed(window[:, k : seq_len + k]))
            stats.append(s)
            mtp_loss = mtp_loss + self._cross_entropy(module.out_norm(h), window[:, k + 1 : seq_len + k + 1])
        if depth:
            mtp_loss = mtp_loss * (self.cfg.mtp.weight / depth)
        stats = [s for s in stats if s is not None]
        bal = [s.balance_loss for s in stats if s.balance_loss is not None]
        balance_loss = torch.stack(bal).sum() if bal else torch.zeros((), device=window.device)
        counts = (
            torch.stack([s.counts for s in stats])
            if stats
            else torch.zeros(0, self.cfg.moe.n_routed_experts, dtype=torch.long, device=window.device)
        )
        reached = [s.max_nodes for s in stats if s.max_nodes is not None]
        return ModelOutput(
            loss=lm_loss + mtp_loss + balance_loss,
            lm_loss=lm_loss,
            mtp_loss=mtp_loss,
            balance_loss=balance_loss,
            counts=counts,
            max_nodes=torch.stack(reached).max() if reached else None,
        )

    def _cross_entropy(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    # --- sizes ------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """total, active per token, and the expert/router parts (routed experts count top_k/N)."""
        moe = self.cfg.moe
        total = sum(p.numel() for p in self.parameters())
        routed = sum(p.numel() for m in self.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
        shared = sum(p.numel() for m in self.moe_layers() if m.shared is not None for p in m.shared.parameters())
        router = sum(m.router.weight.numel() for m in self.moe_layers())
        active_routed = routed * moe.top_k // moe.n_routed_experts
        return {
            "total": total,
            "active": total - routed + active_routed,
            "routed_experts": routed,
            "active_routed_experts": active_routed,
            "shared_experts": shared,
            "router": router,
        }
