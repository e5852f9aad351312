"""FSDP2 for the dense parts, applied from outside on the mesh (DESIGN 10, torchtitan's layout).

Dense modules are sharded over every rank; routed experts, already split by expert parallelism,
are sharded over their replicas when there are any (and left alone when every expert exists once).
Parameters, gradients and AdamW state of a rank are then its shards only.

Precision: the Linear-heavy units (attention, dense FFN, shared experts, routed experts) gather
their weights in the compute dtype (bf16 on GPU: half the all-gather bytes); norms, routers,
embeddings and the output head gather in fp32, so the router computes in fp32 and the residual
stream stays fp32, exactly as in the replicated mode under autocast. Master weights, optimizer
state and gradient reduction are fp32. Gradients are SUM-reduced (each rank's loss is scaled by
its batch share), with sum-only collectives: gloo has no pre-multiplied sum.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from moe_ray.model.moe import MoELayer
from moe_ray.model.transformer import MoETransformer
from moe_ray.parallel.grads import expert_parameters
from moe_ray.parallel.mesh import ParallelMesh


def apply_fsdp(model: MoETransformer, mesh: ParallelMesh, compute_dtype: torch.dtype | None = None) -> None:
    """Shard `model` in place. `compute_dtype`: the dtype the Linear-heavy units gather in (None:
    their own, fp32)."""
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    compute = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # With one replica per expert there is nothing to shard them over: keep them out of the
    # dense units (they differ between ranks, FSDP over all ranks would mix them up).
    ignored = set(expert_parameters(model)) if mesh.edp.size() == 1 else set()

    def shard(module: nn.Module, policy: MixedPrecisionPolicy, on=mesh.dense) -> None:
        own = {p for p in module.parameters()} & ignored
        fully_shard(module, mesh=on, mp_policy=policy, ignored_params=own or None)

    blocks = list(model.blocks) + [m.block for m in model.mtp]
    for block in blocks:
        shard(block.attn, compute)
        if isinstance(block.ffn, MoELayer):
            # The router stays in its block's fp32 unit: a unit of its own would return a
            # RouterOutput, in which FSDP finds no tensor to hook its backward gather on.
            layer = block.ffn
            if layer.shared is not None:
                shard(layer.shared, compute)
            if not ignored:
                shard(layer.experts, compute, on=mesh.edp)
        else:
            shard(block.ffn, compute)
        shard(block, fp32)  # its norms and router
    # Embeddings, final norm, head, and the MTP modules' projections and norms: compute_loss uses
    # an MTP module's output norm outside that module's forward, so they live in the root unit.
    shard(model, fp32)
    register_fsdp_forward_method(model, "compute_loss")  # training and evaluation enter here
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
