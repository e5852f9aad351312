"""How big a job is: parameters, and the training state each worker holds (DESIGN 5.3, 10).

Counted on the meta device, so a DeepSeek-V3-sized model is sized without allocating it. Each
parameter costs its fp32 weight, gradient and two AdamW moments (bf16 autocast keeps fp32 master
weights). A worker holds its block of routed experts (sharded over their replicas too with FSDP)
and the dense parts: a full replica, or 1/W of them with FSDP (`resources.dense_parallel`).
Activations come on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from moe_ray.model.router import routing_limits_problem
from moe_ray.model.transformer import MoETransformer
from moe_ray.parallel.placement import ExpertPlacement
from moe_ray.spec import JobSpec

BYTES_PER_TRAINED_PARAM = 16  # fp32 weight + gradient + AdamW m and v
GPU_MEMORY_GIB = 80  # the common large accelerator (H100 80 GB); the warning threshold
SCALE_TABLE = (64, 256, 1024)  # worker counts shown for a job that does not fit at its own

# Below this much replicated dense training state per worker (BYTES_PER_TRAINED_PARAM a
# parameter), "auto" replicates: FSDP's gathers cost more than they save there
# (bench/gpu.py, bench/memory.py: 2.2x the step time of the quickstart on an H100, 1.4x on CPU).
AUTO_FSDP_BYTES = 2**30


def shards_dense(setting: str, dense_params: int) -> bool:
    """Whether the dense parts are FSDP-sharded: `resources.dense_parallel` resolved."""
    if setting == "auto":
        return BYTES_PER_TRAINED_PARAM * dense_params >= AUTO_FSDP_BYTES
    return setting == "fsdp"


@dataclass
class JobSize:
    total_params: int
    active_params: int  # per token: dense parts + top_k of the routed experts
    dense_params: int
    expert_params_per_layer: int  # one routed expert of one layer
    n_experts: int
    n_moe_layers: int
    workers: int  # the smallest worker count the job runs with: where a worker holds the most
    ep_size: int | None  # resources.ep_size (None: every worker)
    fsdp: bool
    gpu: bool

    def experts_per_worker(self, workers: int) -> int:
        """The largest block of routed experts per layer a worker holds."""
        return -(-self.n_experts // self._ep(workers)) if self.n_moe_layers else 0

    @property
    def worker_params(self) -> int:
        """Parameters a worker builds at the smallest worker count (before any FSDP sharding)."""
        return self.dense_params + self._expert_params(self.workers)

    def _ep(self, workers: int) -> int:
        return min(self.ep_size or workers, self.n_experts)

    def _expert_params(self, workers: int) -> int:
        return self.experts_per_worker(workers) * self.expert_params_per_layer * self.n_moe_layers

    def state_bytes(self, workers: int) -> int:
        """One worker's weights, gradients and AdamW state at `workers` workers."""
        if not self.fsdp:
            return BYTES_PER_TRAINED_PARAM * (self.dense_params + self._expert_params(workers))
        replicas = max(1, workers // self._ep(workers))
        held = math.ceil(self.dense_params / workers) + math.ceil(self._expert_params(workers) / replicas)
        return BYTES_PER_TRAINED_PARAM * held

    def lines(self) -> list[str]:
        layout = "dense parts FSDP-sharded over the workers" if self.fsdp else "dense parts replicated"
        state = self.state_bytes(self.workers)
        out = [
            f"parameters: {_count(self.total_params)} total, {_count(self.active_params)} active per token",
            f"per worker at {self.workers} worker(s): {_count(self.worker_params)} parameters "
            f"({self.experts_per_worker(self.workers)} routed experts per layer; {layout}); {_bytes(state)} of "
            "weights, gradients and AdamW state, before activations",
        ]
        limit = GPU_MEMORY_GIB * 2**30
        if self.gpu and state > limit:
            for w in SCALE_TABLE:
                need = self.state_bytes(w)
                ep = self._ep(w)
                fit = "fits" if need <= limit else "does not fit"
                out.append(f"  at {w} workers (EP {ep} x DP {w // ep}): {_bytes(need)} per worker, {fit} an 80 GB GPU")
            advice = (
                "raise resources.workers (see above)"
                if self.fsdp
                else "set resources.dense_parallel: fsdp, or shrink d_model, n_layers or vocab_size"
            )
            out.append(
                f"warning: {state / 2**30:.0f} GiB per worker does not fit an {GPU_MEMORY_GIB} GB GPU at "
                f"{self.workers} workers: {advice}"
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


class _SkipRandomInit(TorchFunctionMode):
    """Leaves meta tensors unfilled: counting needs only their shapes, and a random fill on the
    meta device imports torch._dynamo (~1 s of a `moe-ray validate`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        name = getattr(func, "__name__", "")
        initialises = getattr(func, "__module__", None) == "torch.nn.init" or name in ("normal_", "uniform_")
        if initialises and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return func(*args, **kwargs)


def job_size(job: JobSpec) -> JobSize:
    """Sizes at the job's smallest worker count (where each worker holds the most experts)."""
    with torch.device("meta"), _SkipRandomInit():
        counts = MoETransformer(job.model, job.balance).parameter_counts()
    n_experts, layers = job.model.moe.n_routed_experts, job.model.n_moe_layers
    dense = counts["total"] - counts["routed_experts"]
    return JobSize(
        total_params=counts["total"],
        active_params=counts["active"],
        dense_params=dense,
        expert_params_per_layer=counts["routed_experts"] // max(1, layers * n_experts),
        n_experts=n_experts,
        n_moe_layers=layers,
        workers=job.resources.min_workers,
        ep_size=job.resources.ep_size,
        fsdp=shards_dense(job.resources.dense_parallel, dense),
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
