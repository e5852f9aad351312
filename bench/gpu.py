"""Training speed on one GPU: tokens/s, model FLOPs utilisation (MFU) and peak memory of the
quickstart-shaped model and of a ~1B-active DeepSeekMoE model, through the product's own
`train_step` with bf16 autocast, the expert-parallel dispatcher on an NCCL process group (one
rank: the all-to-alls, FSDP's gathers and the gradient reductions run, with nothing to send), and
the gradient sync and clipping the Ray workers use; dense parts FSDP-sharded and replicated.

MFU = model FLOPs per second / the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM). Model
FLOPs per token = 6 x active non-embedding parameters + 12 x layers x d_model x seq_len
(attention scores, PaLM's convention). Also reported: a bf16 8192^3 matmul's achieved FLOP/s.

    python bench/gpu.py [--quick]      (prints nothing and exits 0 without CUDA)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, free_port, short_quickstart  # noqa: E402

from moe_ray.config import BalanceConfig, ModelConfig, MoEConfig, MTPConfig, TrainConfig  # noqa: E402
from moe_ray.data import window_length  # noqa: E402
from moe_ray.parallel.mesh import build_mesh  # noqa: E402
from moe_ray.parallel.parallelize import parallelize  # noqa: E402
from moe_ray.parallel.placement import ExpertPlacement  # noqa: E402
from moe_ray.train.optim import build_optimizer  # noqa: E402
from moe_ray.train.step import LocalBias, train_step  # noqa: E402
from moe_ray.train.trainer import build_model  # noqa: E402

BENCH = "gpu"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

QUICKSTART = short_quickstart(tempfile.gettempdir(), 1)  # jobs/quickstart.yaml
MODELS = {
    # (model, sequences per step, sequence length)
    "quickstart": (QUICKSTART.model, QUICKSTART.train.batch_size, QUICKSTART.train.seq_len),
    # ~0.9B active of ~3.2B: DeepSeekMoE shape (2 shared + 6 of 32 routed, 1 dense layer, MTP 1)
    "moe_1b_active": (
        ModelConfig(
            vocab_size=32000,
            d_model=2048,
            n_heads=16,
            n_layers=12,
            n_dense_layers=1,
            max_seq_len=2048,
            moe=MoEConfig(n_routed_experts=32, expert_hidden=1024, top_k=6, n_shared_experts=2),
            mtp=MTPConfig(depth=1),
        ),
        4,
        2048,
    ),
}


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def matmul_tflops(n: int = 8192, repeat: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeat / (time.perf_counter() - start) / 1e12


def flops_per_token(model, cfg: ModelConfig, seq_len: int) -> float:
    active = model.parameter_counts()["active"] - model.embed.weight.numel()
    layers = cfg.n_layers + cfg.mtp.depth
    return 6 * active + 12 * layers * cfg.d_model * seq_len


def run_model(name: str, dense: str, steps: int, warmup: int) -> None:
    cfg, batch, seq_len = MODELS[name]
    placement = ExpertPlacement(cfg.moe.n_routed_experts, 1, (0,))
    torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, BalanceConfig(), 0, torch.device("cuda"), placement.local_experts(0))
    mesh = build_mesh(placement, "cuda")
    grads = parallelize(model, placement, 0, mesh, fsdp=dense == "fsdp", compute_dtype=torch.bfloat16)
    train = TrainConfig(steps=steps + warmup, batch_size=batch, seq_len=seq_len, warmup_steps=0, precision="bf16")
    optimizer = build_optimizer(model, train)
    bias = LocalBias(model.get_expert_bias(), BalanceConfig(), train.steps)
    window = torch.randint(0, cfg.vocab_size, (batch, window_length(seq_len, cfg.mtp.depth)), device="cuda")
    times, losses = [], []
    for step in range(train.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        res = train_step(model, optimizer, window, step, train, bias, sync_gradients=grads.sync, clip=grads.clip)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(res.loss)
    times.sort()
    step_s = times[len(times) // 2]
    tokens = batch * seq_len
    fpt = flops_per_token(model, cfg, seq_len)
    counts = model.parameter_counts()
    extra = {
        "model": name,
        "dense": dense,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "tokens_per_step": tokens,
        "gpu": torch.cuda.get_device_name(0),
    }
    key = f"{name}_{dense}"
    emit(BENCH, f"tokens_per_s_{key}", round(tokens / step_s), **extra)
    emit(BENCH, f"step_ms_{key}", round(step_s * 1e3, 2), **extra)
    achieved = fpt * tokens / step_s
    emit(BENCH, f"model_tflops_{key}", round(achieved / 1e12, 1), **extra)
    peak = peak_flops()
    if peak:
        emit(BENCH, f"mfu_{key}", round(achieved / peak, 4), **extra)
    emit(BENCH, f"peak_memory_gib_{key}", round(torch.cuda.max_memory_allocated() / 2**30, 2), **extra)
    emit(BENCH, f"loss_first_last_{key}", [round(losses[0], 3), round(losses[-1], 3)], **extra)
    del model, optimizer, grads
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--dense", default="fsdp,replicate", help="dense layouts to measure")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here, nothing measured", file=sys.stderr)
        return
    port = free_port()
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=torch.device("cuda:0")
    )
    emit(BENCH, "matmul_bf16_tflops", round(matmul_tflops(), 1), gpu=torch.cuda.get_device_name(0))
    steps, warmup = (10, 3) if args.quick else (30, 5)
    for name in args.models.split(","):
        for dense in args.dense.split(","):
            run_model(name, dense, steps, warmup)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
