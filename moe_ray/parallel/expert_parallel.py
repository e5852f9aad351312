"""Make a model built with this rank's experts an expert-parallel shard."""

from __future__ import annotations

from moe_ray.model.transformer import MoETransformer
from moe_ray.parallel.dispatch import ExpertParallelDispatcher
from moe_ray.parallel.mesh import ParallelMesh
from moe_ray.parallel.placement import ExpertPlacement


def apply_expert_parallel(model: MoETransformer, placement: ExpertPlacement, rank: int, mesh: ParallelMesh) -> None:
    """Route every MoE layer's tokens by all-to-all to the ranks that own their experts. The model
    must hold exactly this rank's blocks (build it with `local_experts=placement.held_experts(rank)`):
    a worker never materialises the experts of the other ranks. The routers learn which node hosts
    each expert, for node-limited routing; with a non-contiguous placement, the layers sort their
    rows in the placement's expert order."""
    for i, layer in enumerate(model.moe_layers()):
        local, held = placement.local_experts(rank, i), layer.experts.expert_ids
        if held != local:
            raise ValueError(
                f"rank {rank} must hold experts {list(local)} in MoE layer {i}, the model holds {list(held)}: "
                "build it with local_experts=placement.held_experts(rank)"
            )
        layer.set_expert_order(placement.expert_order(i))
        layer.dispatcher = ExpertParallelDispatcher(mesh.ep, placement.block_sizes, placement.ep_rank(rank))
        layer.router.set_expert_nodes(placement.expert_nodes(rank, i))
