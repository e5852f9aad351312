"""Make a model built with this rank's experts an expert-parallel shard."""

from __future__ import annotations

from moe_ray.model.transformer import MoETransformer
from moe_ray.parallel.dispatch import ExpertParallelDispatcher
from moe_ray.parallel.mesh import ParallelMesh
from moe_ray.parallel.placement import ExpertPlacement


def apply_expert_parallel(model: MoETransformer, placement: ExpertPlacement, rank: int, mesh: ParallelMesh) -> None:
    """Route every MoE layer's tokens by all-to-all to the ranks that own their experts. The model
    must hold exactly this rank's block (build it with `local_experts=placement.local_experts(rank)`):
    a worker never materialises the experts of the other ranks. The routers learn which node hosts
    each expert, for node-limited routing."""
    local = placement.local_experts(rank)
    for layer in model.moe_layers():
        held = range(layer.experts.first_expert, layer.experts.first_expert + layer.experts.n_experts)
        if held != local:
            raise ValueError(
                f"rank {rank} must hold experts {local.start}-{local.stop - 1}, the model holds "
                f"{held.start}-{held.stop - 1}: build it with local_experts=placement.local_experts(rank)"
            )
        layer.dispatcher = ExpertParallelDispatcher(mesh.ep, placement.block_sizes, placement.ep_rank(rank))
        layer.router.set_expert_nodes(placement.expert_nodes(rank))
