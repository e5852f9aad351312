"""moe-ray's model in Hugging Face's `Glm4MoeForCausalLM` layout (DESIGN 11): the config.json
that describes it and the correspondence between our tensors and theirs, in both directions.

glm4_moe is DeepSeek-V3's MoE (sigmoid routing with `e_score_correction_bias`, groups, shared
experts, dense first layers) with standard attention, which is what moe-ray trains. One table
(`links`) serves export and import alike, so the two directions cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from moe_ray.config import ModelConfig
from moe_ray.hf import LayoutError

ARCHITECTURE = "Glm4MoeForCausalLM"
MODEL_TYPE = "glm4_moe"


def export_problems(cfg: ModelConfig) -> list[str]:
    """What of `cfg` glm4_moe cannot express (empty when it can)."""
    moe, problems = cfg.moe, []
    if moe.score_func != "sigmoid":
        problems.append(
            f"model.moe.score_func={moe.score_func}: glm4_moe scores experts with sigmoid only "
            "(train with score_func: sigmoid to export)"
        )
    if moe.n_group > 1 and moe.n_routed_experts // moe.n_group < 2:
        problems.append(
            f"model.moe.n_group={moe.n_group}: groups of one expert; glm4_moe scores a group by its top-2 experts"
        )
    if cfg.mtp.depth and cfg.n_dense_layers == cfg.n_layers:
        problems.append(
            "model.mtp.depth > 0 on an all-dense model: glm4_moe's MTP layers are MoE layers "
            "(index >= first_k_dense_replace), moe-ray's would be dense"
        )
    return problems


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """config.json for `cfg`, every field explicit (defaults differ between transformers and
    vLLM: vLLM assumes partial_rotary_factor 0.5 when it is absent)."""
    require_exportable(cfg)
    return _fields(cfg, dtype)


def require_exportable(cfg: ModelConfig) -> None:
    """Raise LayoutError naming every field glm4_moe cannot express."""
    problems = export_problems(cfg)
    if problems:
        raise LayoutError("this model cannot be exported as glm4_moe:\n  " + "\n  ".join(problems))


def _fields(cfg: ModelConfig, dtype: str) -> dict:
    moe = cfg.moe
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.resolved_dense_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "tie_word_embeddings": False,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "partial_rotary_factor": 1.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_qk_norm": False,
        "moe_intermediate_size": moe.expert_hidden,
        "num_experts_per_tok": moe.top_k,
        "n_shared_experts": moe.n_shared_experts,
        "n_routed_experts": moe.n_routed_experts,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        "norm_topk_prob": True,
        "first_k_dense_replace": cfg.n_dense_layers,
        "num_nextn_predict_layers": cfg.mtp.depth,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": dtype,
    }


# Fields whose value decides the weights' meaning; anything else in a config.json (dtype,
# max_position_embeddings, token ids, ...) does not.
_SHAPE_FIELDS = {
    "vocab_size": "model.vocab_size",
    "hidden_size": "model.d_model",
    "intermediate_size": "model.dense_hidden",
    "num_hidden_layers": "model.n_layers",
    "num_attention_heads": "model.n_heads",
    "rms_norm_eps": "model.norm_eps",
    "moe_intermediate_size": "model.moe.expert_hidden",
    "num_experts_per_tok": "model.moe.top_k",
    "n_shared_experts": "model.moe.n_shared_experts",
    "n_routed_experts": "model.moe.n_routed_experts",
    "routed_scaling_factor": "model.moe.routed_scaling_factor",
    "n_group": "model.moe.n_group",
    "topk_group": "model.moe.topk_group",
    "first_k_dense_replace": "model.n_dense_layers",
    "num_nextn_predict_layers": "model.mtp.depth",
}
# Fields with one value moe-ray can express: (default when absent, what moe-ray's model does).
_FIXED_FIELDS = {
    "num_key_value_heads": (None, "one key/value head per query head"),
    "head_dim": (None, "head_dim = hidden_size / num_attention_heads"),
    "hidden_act": ("silu", "SwiGLU with silu"),
    "tie_word_embeddings": (False, "an output head separate from the embedding"),
    "attention_bias": (False, "no attention bias"),
    "use_qk_norm": (False, "no q/k norm"),
    "norm_topk_prob": (True, "gates normalised over the chosen experts"),
}


def _rope(hf: dict) -> tuple[str, float | None, float]:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    # transformers 5 keeps the fraction in rope_parameters, older configs at the top level;
    # glm4_moe's own default is 0.5 (transformers and vLLM both).
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    return kind, theta, factor


def import_problems(hf: dict, cfg: ModelConfig) -> list[str]:
    """Every way the Hugging Face config `hf` disagrees with the job's model `cfg`, or describes a
    model moe-ray cannot train; empty when the weights can be loaded as they are."""
    problems = []
    if hf.get("model_type") != MODEL_TYPE:
        problems.append(f"model_type={hf.get('model_type')!r}: moe-ray imports {MODEL_TYPE!r} models only")
        return problems
    problems += [f"the job's {p}" for p in export_problems(cfg)]
    expected = _fields(cfg, "float32")
    for field, where in _SHAPE_FIELDS.items():
        if field == "intermediate_size" and cfg.n_dense_layers == 0:
            continue  # no dense layer uses it
        theirs = hf.get(field)
        if theirs != expected[field]:
            problems.append(f"{field}={theirs} but the job has {where}={expected[field]}")
    for field, (default, meaning) in _FIXED_FIELDS.items():
        theirs = hf.get(field, default)
        if theirs is not None and theirs != expected[field]:
            problems.append(f"{field}={theirs}: moe-ray's model has {meaning} ({field}={expected[field]})")
    kind, theta, factor = _rope(hf)
    if kind != "default":
        problems.append(f"rope_type={kind}: moe-ray implements plain RoPE only")
    if factor != 1.0:
        problems.append(f"partial_rotary_factor={factor}: moe-ray rotates the whole head (1.0)")
    if theta is not None and float(theta) != cfg.rope_theta:
        problems.append(f"rope_theta={theta} but the job has model.rope_theta={cfg.rope_theta}")
    return problems


# --- tensors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One of our tensors and the Hugging Face tensor(s) it corresponds to.

    kind: "same" (one tensor, as is), "rows" (ours is theirs concatenated along dim 0),
    "swap" (theirs is ours with the two column halves swapped), "experts_w13"/"experts_w2"
    (our stacked (E, in, out) expert weights against their per-expert (out, in) Linear weights).
    """

    ours: str
    theirs: tuple[str, ...]
    kind: str = "same"

    @property
    def per_expert(self) -> int:
        """Their tensors per expert (gate and up, or down); 0 for the other kinds."""
        return {"experts_w13": 2, "experts_w2": 1}.get(self.kind, 0)


def their_names(link: Link, experts: tuple[int, ...] | None = None) -> tuple[str, ...]:
    """Their tensor names for `link`; for the expert kinds only those of `experts` (default all)."""
    per = link.per_expert
    if not per or experts is None:
        return link.theirs
    return tuple(n for e in experts for n in link.theirs[e * per : (e + 1) * per])


def _ffn_links(ours: str, theirs: str, moe: bool, n_experts: int) -> list[Link]:
    if not moe:
        return [
            Link(f"{ours}.w13.weight", (f"{theirs}.gate_proj.weight", f"{theirs}.up_proj.weight"), "rows"),
            Link(f"{ours}.w2.weight", (f"{theirs}.down_proj.weight",)),
        ]
    links = [
        Link(f"{ours}.router.weight", (f"{theirs}.gate.weight",)),
        Link(f"{ours}.router.expert_bias", (f"{theirs}.gate.e_score_correction_bias",)),
        Link(
            f"{ours}.experts.w13",
            tuple(f"{theirs}.experts.{e}.{w}_proj.weight" for e in range(n_experts) for w in ("gate", "up")),
            "experts_w13",
        ),
        Link(
            f"{ours}.experts.w2",
            tuple(f"{theirs}.experts.{e}.down_proj.weight" for e in range(n_experts)),
            "experts_w2",
        ),
    ]
    shared = f"{theirs}.shared_experts"
    return links + [
        Link(f"{ours}.shared.w13.weight", (f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight"), "rows"),
        Link(f"{ours}.shared.w2.weight", (f"{shared}.down_proj.weight",)),
    ]


def _block_links(ours: str, layer: int, moe: bool, cfg: ModelConfig) -> list[Link]:
    theirs = f"model.layers.{layer}"
    attn = f"{theirs}.self_attn"
    has_shared = cfg.moe.n_shared_experts > 0
    ffn = _ffn_links(f"{ours}.ffn", f"{theirs}.mlp", moe, cfg.moe.n_routed_experts)
    if moe and not has_shared:
        ffn = [link for link in ffn if ".shared." not in link.ours]
    return [
        Link(f"{ours}.attn_norm.weight", (f"{theirs}.input_layernorm.weight",)),
        Link(f"{ours}.attn.qkv.weight", tuple(f"{attn}.{p}_proj.weight" for p in "qkv"), "rows"),
        Link(f"{ours}.attn.out.weight", (f"{attn}.o_proj.weight",)),
        Link(f"{ours}.ffn_norm.weight", (f"{theirs}.post_attention_layernorm.weight",)),
        *ffn,
    ]


def links(cfg: ModelConfig) -> list[Link]:
    """The whole correspondence for a model of shape `cfg`."""
    has_moe = cfg.n_layers > cfg.n_dense_layers
    out = [
        Link("embed.weight", ("model.embed_tokens.weight",)),
        Link("norm.weight", ("model.norm.weight",)),
        Link("head.weight", ("lm_head.weight",)),
    ]
    for i in range(cfg.n_layers):
        out += _block_links(f"blocks.{i}", i, i >= cfg.n_dense_layers, cfg)
    for k in range(cfg.mtp.depth):
        layer = cfg.n_layers + k  # where vLLM's glm4_moe_mtp (and DeepSeek-V3's files) put MTP module k+1
        theirs = f"model.layers.{layer}"
        out += [
            Link(f"mtp.{k}.hidden_norm.weight", (f"{theirs}.hnorm.weight",)),
            Link(f"mtp.{k}.embed_norm.weight", (f"{theirs}.enorm.weight",)),
            # DeepSeek concatenates [enorm(embedding); hnorm(hidden)], moe-ray [hidden; embedding].
            Link(f"mtp.{k}.proj.weight", (f"{theirs}.eh_proj.weight",), "swap"),
            Link(f"mtp.{k}.out_norm.weight", (f"{theirs}.shared_head.norm.weight",)),
            *_block_links(f"mtp.{k}.block", layer, has_moe, cfg),
        ]
    return out


def extra_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors the layout has beyond the correspondence (never read back on import):
    - the trunk's embedding and output head repeated in each MTP layer, where vLLM's MTP loader
      reads them (the MTP modules share them; DeepSeek-V3's files repeat them too);
    - without shared experts, glm4_moe's zero-width shared MLP, so loading reports nothing missing."""
    for k in range(cfg.mtp.depth):
        layer = f"model.layers.{cfg.n_layers + k}"
        yield f"{layer}.embed_tokens.weight", state["embed.weight"]
        yield f"{layer}.shared_head.head.weight", state["head.weight"]
    if cfg.moe.n_shared_experts == 0:
        d = cfg.d_model
        moe_layers = list(range(cfg.n_dense_layers, cfg.n_layers))
        moe_layers += [cfg.n_layers + k for k in range(cfg.mtp.depth)] if moe_layers else []
        for layer in moe_layers:
            shared = f"model.layers.{layer}.mlp.shared_experts"
            yield f"{shared}.gate_proj.weight", torch.zeros(0, d)
            yield f"{shared}.up_proj.weight", torch.zeros(0, d)
            yield f"{shared}.down_proj.weight", torch.zeros(d, 0)


def to_hf(link: Link, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Their tensor(s) for our `tensor` (a whole one: every expert for the expert kinds)."""
    if link.kind == "same":
        yield link.theirs[0], tensor
    elif link.kind == "rows":
        yield from zip(link.theirs, tensor.chunk(len(link.theirs), dim=0), strict=True)
    elif link.kind == "swap":
        yield link.theirs[0], torch.cat(tensor.chunk(2, dim=1)[::-1], dim=1)
    elif link.kind == "experts_w13":
        names = iter(link.theirs)
        for w in tensor:  # (in, 2 * hidden): gate columns, then up columns
            for part in w.chunk(2, dim=1):
                yield next(names), part.T
    elif link.kind == "experts_w2":
        yield from zip(link.theirs, (w.T for w in tensor), strict=True)
    else:
        raise ValueError(f"unknown link kind {link.kind}")


def from_hf(link: Link, read: Callable[[str], torch.Tensor], experts: range | None = None) -> torch.Tensor:
    """Our tensor for `link` from their tensors (`read(name)`); for the expert kinds, only the
    experts in `experts` (a worker's shard; default all), stacked in that order."""
    if link.kind == "same":
        return read(link.theirs[0])
    if link.kind == "rows":
        return torch.cat([read(n) for n in link.theirs], dim=0)
    if link.kind == "swap":
        return torch.cat(read(link.theirs[0]).chunk(2, dim=1)[::-1], dim=1)
    names, per = their_names(link, experts), link.per_expert
    return torch.stack([torch.cat([read(n).T for n in names[i : i + per]], dim=1) for i in range(0, len(names), per)])
