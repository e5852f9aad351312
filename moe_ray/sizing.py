"""How big a job is: parameters, and the training state each worker holds (DESIGN 5.3).

Counted on the meta device, so a DeepSeek-V3-sized model is sized without allocating it. Each
worker holds the dense parts (attention, embeddings, dense FFNs, shared experts, routers: a
data-parallel replica) plus its block of routed experts, each parameter with its gradient and
two AdamW moments, all fp32 (bf16 autocast keeps fp32 master weights). Activations come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_ray.model.router import routing_limits_problem
from moe_ray.model.transformer import MoETransformer
from moe_ray.parallel.placement import ExpertPlacement
from moe_ray.spec import JobSpec

BYTES_PER_TRAINED_PARAM = 16  # fp32 weight + gradient + AdamW m and v
GPU_MEMORY_GIB = 80  # the common large accelerator (H100 80 GB); the warning threshold


@dataclass
class JobSize:
    total_params: int
    active_params: int  # per token: dense parts + top_k of the routed experts
    workers: int  # the smallest worker count the job runs with: where a worker holds the most
    experts_per_worker: int  # the largest block a worker holds at that count
    worker_params: int
    gpu: bool

    @property
    def worker_state_gib(self) -> float:
        return self.worker_params * BYTES_PER_TRAINED_PARAM / 2**30

    def lines(self) -> list[str]:
        state = self.worker_params * BYTES_PER_TRAINED_PARAM
        out = [
            f"parameters: {_count(self.total_params)} total, {_count(self.active_params)} active per token",
            f"per worker at {self.workers} worker(s): {_count(self.worker_params)} parameters "
            f"({self.experts_per_worker} routed experts per layer); {_bytes(state)} of weights, "
            "gradients and AdamW state, before activations",
        ]
        if self.gpu and self.worker_state_gib > GPU_MEMORY_GIB:
            out.append(
                f"warning: {self.worker_state_gib:.0f} GiB per worker does not fit an {GPU_MEMORY_GIB} GB GPU. "
                "moe-ray shards only the routed experts; the dense parts are replicated on every worker "
                "(no tensor or pipeline parallelism), so shrink d_model, n_layers or vocab_size"
            )
        return out


def _count(n: int) -> str:
    for unit, size in (("billion", 1e9), ("million", 1e6), ("thousand", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 2**10:.3g} KiB"


def job_size(job: JobSpec) -> JobSize:
    """Sizes at the job's smallest worker count (where each worker holds the most experts)."""
    with torch.device("meta"):
        counts = MoETransformer(job.model, job.balance).parameter_counts()
    workers = job.resources.min_workers
    n_experts = job.model.moe.n_routed_experts
    per_layer_expert = counts["routed_experts"] // max(1, job.model.n_moe_layers * n_experts)
    block = -(-n_experts // job.ep_size_for(workers)) if job.model.n_moe_layers else 0
    dense = counts["total"] - counts["routed_experts"]
    return JobSize(
        total_params=counts["total"],
        active_params=counts["active"],
        workers=workers,
        experts_per_worker=block,
        worker_params=dense + block * per_layer_expert * job.model.n_moe_layers,
        gpu=job.resources.use_gpu is not False,
    )


def routing_limits_warning(job: JobSpec) -> str | None:
    """Node-limited routing depends on which node hosts each worker, which Ray decides at start:
    the workers refuse a placement that breaks the limits before the first step. Here, the layout
    of one worker per node (each expert-parallel rank on its own node) at the job's smallest and
    largest worker counts gives an early warning."""
    moe = job.model.moe
    if moe.max_nodes_per_token is None or not job.model.n_moe_layers:
        return None
    groups = torch.arange(moe.n_routed_experts) // (moe.n_routed_experts // moe.n_group)
    for workers in sorted({job.resources.min_workers, job.resources.max_workers}):
        ep = job.ep_size_for(workers)
        placement = ExpertPlacement(moe.n_routed_experts, ep, tuple(range(workers)))
        problem = routing_limits_problem(
            groups, placement.expert_nodes(0), moe.top_k, moe.topk_group, moe.max_nodes_per_token
        )
        if problem:
            return (
                f"warning: with {workers} workers on one node each, {problem}. Workers refuse such a "
                "placement before the first step"
            )
    return None
