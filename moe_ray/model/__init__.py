"""The DeepSeekMoE model in plain torch. Knows nothing of Ray."""

from moe_ray.model.experts import GroupedExperts, SwiGLU
from moe_ray.model.moe import LocalDispatcher, MoELayer, MoEStats
from moe_ray.model.router import Router, RouterOutput
from moe_ray.model.transformer import ModelOutput, MoETransformer

__all__ = [
    "GroupedExperts",
    "LocalDispatcher",
    "MoELayer",
    "MoEStats",
    "MoETransformer",
    "ModelOutput",
    "Router",
    "RouterOutput",
    "SwiGLU",
]
