"""Config models: the model shape, the balance policy and the training loop.

Every model rejects unknown keys, so a typo in a job file is an error, not a silently ignored
setting. Cross-field checks refuse impossible sizes with a message that says what to change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Segmentation(Strict):
    """Fine-grained expert segmentation (DESIGN 2.3): each of `experts` standard experts of
    hidden size `hidden` becomes `factor` experts of hidden `hidden / factor`; top-k and the
    shared experts scale by `factor` too, so parameters and FLOPs stay the same."""

    experts: PositiveInt
    hidden: PositiveInt
    top_k: PositiveInt
    shared: int = Field(1, ge=0)
    factor: PositiveInt = 1

    @model_validator(mode="after")
    def _check(self) -> Segmentation:
        if self.hidden % self.factor:
            raise ValueError(
                f"segmentation.hidden={self.hidden} is not divisible by segmentation.factor={self.factor}; "
                "pick a factor that divides the base expert's hidden size"
            )
        if self.top_k > self.experts:
            raise ValueError(f"segmentation.top_k={self.top_k} exceeds segmentation.experts={self.experts}")
        return self


class MoEConfig(Strict):
    """Routed + shared experts and the router (DESIGN 2.1-2.3, 2.6).

    State the experts either directly (`n_routed_experts`, `expert_hidden`, `top_k`,
    `n_shared_experts`) or through `segmentation`; the direct fields are then filled in."""

    n_routed_experts: PositiveInt | None = None
    expert_hidden: PositiveInt | None = None
    top_k: PositiveInt | None = None
    n_shared_experts: int | None = Field(None, ge=0)
    segmentation: Segmentation | None = None
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    routed_scaling_factor: PositiveFloat = 1.0
    n_group: PositiveInt = 1
    topk_group: PositiveInt = 1
    # Node-limited routing (DESIGN 2.2.6): each token reaches experts on at most this many nodes.
    max_nodes_per_token: PositiveInt | None = None

    @model_validator(mode="after")
    def _resolve(self) -> MoEConfig:
        direct = {
            "n_routed_experts": self.n_routed_experts,
            "expert_hidden": self.expert_hidden,
            "top_k": self.top_k,
        }
        seg = self.segmentation
        if seg is not None:
            derived = {
                "n_routed_experts": seg.experts * seg.factor,
                "expert_hidden": seg.hidden // seg.factor,
                "top_k": seg.top_k * seg.factor,
                "n_shared_experts": seg.shared * seg.factor,
            }
            # A resolved config (dumped and loaded again) carries both forms; they must agree.
            clash = [k for k, v in derived.items() if getattr(self, k) not in (None, v)]
            if clash:
                raise ValueError(
                    f"give either moe.segmentation or moe.{'/'.join(clash)}, not both: segmentation derives them"
                )
            # Through __dict__ so validate_assignment does not re-enter this validator.
            self.__dict__.update(derived)
        else:
            missing = [k for k, v in direct.items() if v is None]
            if missing:
                raise ValueError(f"moe needs {', '.join('moe.' + m for m in missing)} (or a moe.segmentation block)")
            if self.n_shared_experts is None:
                self.__dict__["n_shared_experts"] = 1
        n, k = self.n_routed_experts, self.top_k
        if k > n:
            raise ValueError(f"moe.top_k={k} exceeds moe.n_routed_experts={n}; lower top_k or add experts")
        if n % self.n_group:
            raise ValueError(f"moe.n_group={self.n_group} must divide moe.n_routed_experts={n}")
        if self.topk_group > self.n_group:
            raise ValueError(f"moe.topk_group={self.topk_group} exceeds moe.n_group={self.n_group}")
        if self.n_group > 1 and (n // self.n_group) * self.topk_group < k:
            raise ValueError(
                f"group-limited routing keeps {self.topk_group} groups of {n // self.n_group} experts, "
                f"fewer than top_k={k}; raise moe.topk_group"
            )
        m = self.max_nodes_per_token
        if m is not None and m > k:
            raise ValueError(
                f"moe.max_nodes_per_token={m} exceeds top_k={k}: a token cannot use more nodes than experts"
            )
        return self


class MTPConfig(Strict):
    """Multi-token prediction (DESIGN 2.5)."""

    depth: int = Field(0, ge=0, le=8)
    weight: float = Field(0.3, ge=0.0)  # lambda in L_MTP = (lambda / D) * sum_k CE_k


class ModelConfig(Strict):
    vocab_size: PositiveInt = 256
    d_model: PositiveInt = 256
    n_heads: PositiveInt = 4
    n_layers: PositiveInt = 4
    n_dense_layers: int = Field(1, ge=0)
    # Hidden size of the dense FFN in the first layers; default: the MoE layer's active width.
    dense_hidden: PositiveInt | None = None
    max_seq_len: PositiveInt = 256
    rope_theta: PositiveFloat = 10000.0
    norm_eps: PositiveFloat = 1e-6
    init_std: PositiveFloat = 0.02
    moe: MoEConfig = Field(default_factory=lambda: MoEConfig(n_routed_experts=16, expert_hidden=128, top_k=4))
    mtp: MTPConfig = Field(default_factory=MTPConfig)
    # A Hugging Face glm4_moe folder (path or s3://) whose weights and balance bias a fresh run
    # starts from (DESIGN 11); checked against this section before any worker starts.
    init_from: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("model.d_model / model.n_heads must be even for rotary embeddings")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"model.n_dense_layers={self.n_dense_layers} exceeds model.n_layers={self.n_layers}")
        return self

    @property
    def n_moe_layers(self) -> int:
        """MoE layers of the trunk plus one per MTP module (each MTP block is an MoE block, as in V3)."""
        trunk = self.n_layers - self.n_dense_layers
        return trunk + (self.mtp.depth if trunk > 0 else 0)

    @property
    def active_ffn_hidden(self) -> int:
        moe = self.moe
        return (moe.n_shared_experts + moe.top_k) * moe.expert_hidden

    @property
    def resolved_dense_hidden(self) -> int:
        return self.dense_hidden or self.active_ffn_hidden


class BalanceConfig(Strict):
    """How expert load is balanced (DESIGN 3)."""

    # loss_free: per-expert bias updated from global counts; aux_loss: classic Switch/GShard loss.
    method: Literal["loss_free", "aux_loss", "none"] = "loss_free"
    bias_update_speed: float = Field(0.001, ge=0.0)  # gamma
    # The coordinator's bias controller (DESIGN 13): sign is the paper's rule; proportional
    # scales each expert's step by its relative load error (clipped to 1).
    policy: Literal["sign", "proportional"] = "sign"
    # Expert placement at each (re)start of the worker group (DESIGN 13): contiguous blocks, or
    # balanced: packed from the coordinator's recent load so every rank gets about as many
    # tokens. `moe-ray rebalance RUN` applies a balanced placement once, whatever this says.
    placement: Literal["contiguous", "balanced"] = "contiguous"
    # gamma is 0 for this final fraction of training (V3: the last ~3% of tokens).
    bias_freeze_fraction: float = Field(0.03, ge=0.0, le=1.0)
    aux_loss_alpha: float = Field(0.001, ge=0.0)
    seq_aux_alpha: float = Field(0.0, ge=0.0)  # complementary sequence-wise loss (V3: 1e-4)
    z_loss_alpha: float = Field(0.0, ge=0.0)


class TrainConfig(Strict):
    steps: PositiveInt = 200
    batch_size: PositiveInt = 16  # global sequences per optimizer step
    seq_len: PositiveInt = 128
    lr: PositiveFloat = 3e-3
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    router_weight_decay: bool = True  # weight decay on the routers' weights too
    beta1: float = Field(0.9, gt=0.0, lt=1.0)
    beta2: float = Field(0.95, gt=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    eval_every: int = Field(50, ge=0)  # 0: only at the end
    eval_batches: PositiveInt = 8
    log_every: PositiveInt = 10
    seed: int = 0
    # auto: bf16 autocast on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Record a digest of every step's global batch (one small gather per step): proves that
    # restarts and rescaling neither repeat nor skip samples.
    audit_data: bool = False
