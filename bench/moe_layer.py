"""Forward + backward time of one DeepSeekMoE layer against a dense SwiGLU with the same ACTIVE
parameter count, and against the per-expert loop; achieved FLOP/s against a plain matmul.

    python bench/moe_layer.py [--quick]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    tune_cpu_allocator()
    repeat = 7 if args.quick else 21
    d, hidden, experts, top_k = 256, 128, 64, 6
    cfg = ModelConfig(
        d_model=d,
        n_heads=4,
        moe=MoEConfig(n_routed_experts=experts, expert_hidden=hidden, top_k=top_k, n_shared_experts=1),
    )
    torch.manual_seed(0)
    moe = MoELayer(cfg, BalanceConfig(method="none"))
    # Active parameters per token: router + shared + top_k routed experts.
    active = experts * d + (1 + top_k) * 3 * d * hidden
    dense = SwiGLU(d, round(active / (3 * d)))
    dense_params = sum(p.numel() for p in dense.parameters())
    x = torch.randn(args.tokens, d, requires_grad=True)

    def fwd_bwd(module, moe_out: bool):
        def run():
            out = module(x)
            y = out[0] if moe_out else out
            y.sum().backward()
            x.grad = None
            module.zero_grad(set_to_none=True)

        return run

    def looped():
        moe.experts.use_grouped_mm = False
        fwd_bwd(moe, True)()
        moe.experts.use_grouped_mm = True

    # Interleaved: each round times all three once, so machine noise hits them alike; medians.
    runs = {"moe": fwd_bwd(moe, True), "loop": looped, "dense": fwd_bwd(dense, False)}
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, fn in runs.items():
            times[name].append(time_it(fn, 1, warmup=0))
    t_moe, t_loop, t_dense = (statistics.median(times[n]) for n in ("moe", "loop", "dense"))
    flops = 3 * 2 * args.tokens * active  # forward 2 FLOPs per MAC, backward twice that
    ref = matmul_flops_per_s(2048, repeat=5)
    emit(BENCH, "active_params", active, dense_params=dense_params)
    emit(BENCH, "moe_fwd_bwd_ms", round(t_moe * 1e3, 2), tokens=args.tokens)
    emit(BENCH, "dense_fwd_bwd_ms", round(t_dense * 1e3, 2))
    emit(BENCH, "loop_fwd_bwd_ms", round(t_loop * 1e3, 2))
    emit(BENCH, "moe_over_dense", round(t_moe / t_dense, 3), target="<= 1.0", repeats=repeat)
    emit(BENCH, "moe_over_loop", round(t_moe / t_loop, 3))
    emit(BENCH, "moe_gflops", round(flops / t_moe / 1e9, 1), matmul_gflops=round(ref / 1e9, 1))
    emit(BENCH, "flops_fraction_of_matmul", round(flops / t_moe / ref, 3), target=">= 0.5")


if __name__ == "__main__":
    main()
