"""Forward + backward time of one DeepSeekMoE layer against a dense SwiGLU with the same ACTIVE
parameter count, and against the per-expert loop; achieved FLOP/s against a plain matmul.

On this machine's CPU in fp32; where there is a GPU, also on it in bf16 autocast at a
DeepSeek-V2-Lite-sized layer (the grouped GEMM kernel against one dense GEMM), as `*_gpu`.

    python bench/moe_layer.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, matmul_flops_per_s, time_it  # noqa: E402

from moe_ray.config import BalanceConfig, ModelConfig, MoEConfig  # noqa: E402
from moe_ray.model.experts import SwiGLU  # noqa: E402
from moe_ray.model.moe import MoELayer  # noqa: E402
from moe_ray.system import tune_cpu_allocator  # noqa: E402

BENCH = "moe_layer"
# (d_model, expert_hidden, routed experts, top_k, shared experts, tokens)
CPU_LAYER = (256, 128, 64, 6, 1, 4096)
GPU_LAYER = (2048, 1408, 64, 6, 2, 16384)  # DeepSeek-V2-Lite's MoE layer


def _linear_gemms(weight: torch.Tensor, rows: int):
    """The three products of a bias-free Linear's forward and backward over `rows` inputs."""
    weight = weight.detach()
    out_f, in_f = weight.shape
    x, grad = torch.randn(rows, in_f), torch.randn(rows, out_f)
    return lambda: (x @ weight.t(), grad @ weight, grad.t() @ x)


def swiglu_gemms(w13: torch.Tensor, w2: torch.Tensor, rows: int):
    first, second = _linear_gemms(w13, rows), _linear_gemms(w2, rows)
    return lambda: (first(), second())


def moe_gemms(moe: MoELayer, tokens: int, counts: torch.Tensor):
    """Router, shared experts and the routed experts' grouped GEMMs (forward, input and weight
    gradients, as torch._grouped_mm's backward computes them) for this routing's counts."""
    router = _linear_gemms(moe.router.weight, tokens)
    shared = swiglu_gemms(moe.shared.w13.weight, moe.shared.w2.weight, tokens)
    w13, w2 = moe.experts.w13.detach(), moe.experts.w2.detach()
    offs = counts.cumsum(0).to(torch.int32)
    rows = int(counts.sum())
    x, h = torch.randn(rows, w13.shape[1]), torch.randn(rows, w13.shape[2])
    a, y = torch.randn(rows, w2.shape[1]), torch.randn(rows, w2.shape[2])

    def routed():
        gmm = torch._grouped_mm
        gmm(x, w13, offs=offs), gmm(a, w2, offs=offs)
        gmm(y, w2.transpose(1, 2), offs=offs), gmm(a.t(), y, offs=offs)
        gmm(h, w13.transpose(1, 2), offs=offs), gmm(x.t(), h, offs=offs)

    return lambda: (router(), shared(), routed())


def measure(device: str, layer: tuple[int, ...], repeat: int) -> dict:
    """Median forward + backward seconds of the MoE layer, its per-expert loop and the dense
    SwiGLU of equal active parameters, timed interleaved (noise hits all three alike)."""
    d, hidden, experts, top_k, shared, tokens = layer
    cfg = ModelConfig(
        d_model=d,
        n_heads=4,
        moe=MoEConfig(n_routed_experts=experts, expert_hidden=hidden, top_k=top_k, n_shared_experts=shared),
    )
    torch.manual_seed(0)
    moe = MoELayer(cfg, BalanceConfig(method="none")).to(device)
    # Active parameters per token: router + shared + top_k routed experts.
    active = experts * d + (shared + top_k) * 3 * d * hidden
    dense = SwiGLU(d, round(active / (3 * d))).to(device)
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def fwd_bwd(module, moe_out: bool):
        def run():
            with autocast:
                out = module(x)
                y = out[0] if moe_out else out
            y.float().sum().backward()
            x.grad = None
            module.zero_grad(set_to_none=True)

        return run

    def looped():
        moe.experts.use_grouped_mm = False
        fwd_bwd(moe, True)()
        moe.experts.use_grouped_mm = True

    runs = {"moe": fwd_bwd(moe, True), "loop": looped, "dense": fwd_bwd(dense, False)}
    if device == "cpu":
        # What bounds the ratio: each layer's matrix products alone, as its forward and backward
        # issue them (same shapes, same kernels), with nothing else in between.
        with torch.no_grad():
            counts = moe.router(x).counts
        runs["moe_gemms"] = moe_gemms(moe, tokens, counts)
        runs["dense_gemms"] = swiglu_gemms(dense.w13.weight, dense.w2.weight, tokens)
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, fn in runs.items():
            times[name].append(time_it(fn, 1, warmup=0))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        **medians,
        "active": active,
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "flops": 3 * 2 * tokens * active,  # forward 2 FLOPs per MAC, backward twice that
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    tune_cpu_allocator()
    repeat = 7 if args.quick else 21
    cpu = measure("cpu", CPU_LAYER, repeat)
    ref = matmul_flops_per_s(2048, repeat=5)
    emit(BENCH, "active_params", cpu["active"], dense_params=cpu["dense_params"])
    emit(BENCH, "moe_fwd_bwd_ms", round(cpu["moe"] * 1e3, 2), tokens=cpu["tokens"])
    emit(BENCH, "dense_fwd_bwd_ms", round(cpu["dense"] * 1e3, 2))
    emit(BENCH, "loop_fwd_bwd_ms", round(cpu["loop"] * 1e3, 2))
    emit(BENCH, "moe_over_dense", round(cpu["moe"] / cpu["dense"], 3), target="<= 1.0", repeats=repeat)
    emit(BENCH, "moe_over_loop", round(cpu["moe"] / cpu["loop"], 3))
    # The bound: the MoE layer's GEMMs alone against the whole dense layer (all that a perfect
    # fusion of everything else could reach), and what the rest of each layer costs.
    emit(
        BENCH,
        "moe_gemms_over_dense",
        round(cpu["moe_gemms"] / cpu["dense"], 3),
        moe_gemms_ms=round(cpu["moe_gemms"] * 1e3, 2),
        dense_gemms_ms=round(cpu["dense_gemms"] * 1e3, 2),
        moe_rest_ms=round((cpu["moe"] - cpu["moe_gemms"]) * 1e3, 2),
        dense_rest_ms=round((cpu["dense"] - cpu["dense_gemms"]) * 1e3, 2),
    )
    emit(BENCH, "moe_gflops", round(cpu["flops"] / cpu["moe"] / 1e9, 1), matmul_gflops=round(ref / 1e9, 1))
    emit(BENCH, "flops_fraction_of_matmul", round(cpu["flops"] / cpu["moe"] / ref, 3), target=">= 0.5")
    if torch.cuda.is_available():
        gpu = measure("cuda", GPU_LAYER, repeat)
        emit(
            BENCH,
            "moe_over_dense_gpu",
            round(gpu["moe"] / gpu["dense"], 3),
            moe_ms=round(gpu["moe"] * 1e3, 2),
            dense_ms=round(gpu["dense"] * 1e3, 2),
            layer=dict(
                zip(("d_model", "expert_hidden", "experts", "top_k", "shared", "tokens"), GPU_LAYER, strict=True)
            ),
            gpu=torch.cuda.get_device_name(0),
        )
        emit(BENCH, "moe_over_loop_gpu", round(gpu["moe"] / gpu["loop"], 3))
        emit(BENCH, "moe_tflops_gpu", round(gpu["flops"] / gpu["moe"] / 1e12, 1))


if __name__ == "__main__":
    main()
