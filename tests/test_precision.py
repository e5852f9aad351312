"""The bf16 path (DESIGN 10): the router stays fp32 inside autocast, routed experts compute and
travel in the autocast dtype, parameters and their gradients stay fp32. CPU autocast checks run
everywhere; the `gpu` tests need CUDA (NCCL, host-sync counts) and are skipped without it."""

import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import free_port

from moe_ray.config import BalanceConfig, ModelConfig, MoEConfig
from moe_ray.model.moe import MoELayer
from moe_ray.model.router import Router

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def wide_router(seed=0):
    """V3-like score spread: 64 experts, many tokens near each other's scores."""
    torch.manual_seed(seed)
    router = Router(256, MoEConfig(n_routed_experts=64, expert_hidden=8, top_k=6, n_group=8, topk_group=4))
    router.expert_bias.copy_(torch.randn(64) * 1e-3)
    return router


def test_router_is_identical_inside_bf16_autocast():
    """Under autocast a bf16 router matmul picks other experts for a share of the tokens."""
    router = wide_router()
    x = torch.randn(512, 256)
    plain = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = router(x)
    assert auto.logits.dtype == auto.scores.dtype == auto.gates.dtype == torch.float32
    assert torch.equal(auto.indices, plain.indices)
    assert torch.equal(auto.gates, plain.gates)
    # The check can fail: the same matmul in bf16 does change the choice of experts.
    bf16_choice = router.select(torch.sigmoid(x.bfloat16() @ router.weight.detach().bfloat16().T).float())
    assert not torch.equal(bf16_choice.sort(-1).values, plain.indices.sort(-1).values)


class RecordingDispatcher:
    def __init__(self):
        self.dtypes = []

    def __call__(self, rows, gates, counts, experts, overlap=None):
        self.dtypes.append(rows.dtype)
        return experts(rows, counts, gates), (overlap() if overlap is not None else None)


def moe_layer(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=64, moe=MoEConfig(n_routed_experts=8, expert_hidden=32, top_k=2))
    layer = MoELayer(cfg, BalanceConfig(method="none"))
    layer.dispatcher = RecordingDispatcher()
    return layer


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
def test_routed_experts_compute_in_the_autocast_dtype(device):
    layer = moe_layer().to(device)
    x = torch.randn(4, 32, 64, device=device)
    ref, _ = layer(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, _ = layer(x)
    assert layer.dispatcher.dtypes == [torch.float32, torch.bfloat16]  # what the all-to-all would carry
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.02)
    out.float().square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


# --- on a GPU ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank NCCL group: the expert-parallel dispatch runs its real collectives."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    port = free_port()
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=torch.device("cuda:0")
    )
    yield dist.group.WORLD
    dist.destroy_process_group()


def expert_parallel_model(fsdp: bool):
    """The quickstart job's model on one GPU, as a worker lays it out (a one-rank mesh)."""
    from moe_ray.parallel.mesh import build_mesh
    from moe_ray.parallel.parallelize import parallelize
    from moe_ray.parallel.placement import ExpertPlacement
    from moe_ray.spec import load_job
    from moe_ray.train.trainer import build_model

    cfg = load_job(Path(__file__).resolve().parent.parent / "jobs" / "quickstart.yaml").model
    placement = ExpertPlacement(cfg.moe.n_routed_experts, 1, (0,))
    m = build_model(cfg, BalanceConfig(seq_aux_alpha=1e-3), 0, torch.device("cuda"), placement.local_experts(0))
    grads = parallelize(m, placement, 0, build_mesh(placement, "cuda"), fsdp=fsdp, compute_dtype=torch.bfloat16)
    return m, grads


@pytest.mark.gpu
@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_dispatch_syncs_with_the_host_once_per_moe_layer(nccl_group, fsdp):
    model, _ = expert_parallel_model(fsdp)
    window = torch.randint(0, 256, (4, 130), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.compute_loss(window)  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    sites = []  # the Python line that made the host wait, for each sync

    def record(message, *args, **kwargs):
        if "synchroniz" in str(message):
            sites.append(next(f for f in reversed(traceback.extract_stack()[:-1]) if "warnings" not in f.filename))

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(), torch.autocast("cuda", dtype=torch.bfloat16):
            warnings.simplefilter("always")
            warnings.showwarning = record
            model.compute_loss(window)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    where = [f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in sites]
    assert len(sites) == len(model.moe_layers()), where
    assert all("dispatch.py" in w and "tolist" in w for w in where), where


@pytest.mark.gpu
@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_bf16_training_step_on_gpu_with_nccl(nccl_group, fsdp):
    """bf16 autocast on GPU against the same step in fp32: close losses, fp32 master weights and
    gradients, routed GEMMs in bf16, and the loss falls over a few steps."""
    from moe_ray.config import TrainConfig
    from moe_ray.train.optim import build_optimizer
    from moe_ray.train.step import LocalBias, train_step

    torch.manual_seed(1)
    window = torch.randint(0, 256, (8, 130), device="cuda")  # seq 128, + next token, + MTP
    losses = {}
    for precision in ("fp32", "bf16"):
        model, grads = expert_parallel_model(fsdp)
        cfg = TrainConfig(steps=8, batch_size=8, seq_len=128, warmup_steps=0, lr=3e-3, precision=precision)
        optimizer = build_optimizer(model, cfg)
        bias = LocalBias(model.get_expert_bias(), model.moe_layers()[0].balance, cfg.steps)
        recorded = []
        layer = model.moe_layers()[0]
        layer.experts.register_forward_pre_hook(lambda m, args, seen=recorded: seen.append(args[0].dtype))
        losses[precision] = [
            train_step(model, optimizer, window, s, cfg, bias, sync_gradients=grads.sync, clip=grads.clip).loss
            for s in range(cfg.steps)
        ]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert recorded[0] == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert abs(losses["bf16"][0] - losses["fp32"][0]) < 0.02 * losses["fp32"][0]
    assert losses["bf16"][-1] < losses["bf16"][0] - 0.5, losses["bf16"]


@pytest.mark.gpu
@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_overlap_on_nccl_gives_the_same_numbers_as_without(nccl_group, fsdp):
    """Shared-expert overlap on NCCL (the all-to-all runs asynchronously on NCCL's stream and is
    waited for on the compute stream, forward and backward): the bf16 loss and every gradient
    equal the same pass without overlap, bit for bit."""
    from moe_ray.storage.checkpoint import full_cpu

    torch.manual_seed(2)
    window = torch.randint(0, 256, (8, 130), device="cuda")
    result = {}
    for overlap in (True, False):
        model, grads = expert_parallel_model(fsdp)
        for layer in model.moe_layers():
            layer.dispatcher.overlap = overlap
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.compute_loss(window)
        out.loss.backward()
        grads.sync(model)
        result[overlap] = (out.loss.detach(), {n: full_cpu(p.grad) for n, p in model.named_parameters()})
    (loss_on, grads_on), (loss_off, grads_off) = result[True], result[False]
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_on:
        assert torch.equal(grads_on[name], grads_off[name]), name


@pytest.mark.gpu
@cuda
def test_grouped_gemm_bf16_on_gpu_matches_the_loop():
    from moe_ray.model.experts import grouped_matmul

    torch.manual_seed(0)
    x = torch.randn(1000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.tensor([0, 100, 100, 400, 450, 700, 900, 1000], device="cuda")  # an empty expert too
    fast = grouped_matmul(x, w, offsets, use_grouped_mm=True)
    loop = grouped_matmul(x, w, offsets, use_grouped_mm=False)
    torch.testing.assert_close(fast, loop, rtol=2e-2, atol=2e-2)
    (g_fast,) = torch.autograd.grad(fast.float().square().sum(), w)
    (g_loop,) = torch.autograd.grad(loop.float().square().sum(), w)
    torch.testing.assert_close(g_fast.float(), g_loop.float(), rtol=3e-2, atol=0.5)


def test_mtp_block_keeps_the_residual_stream_in_fp32_under_autocast():
    """The MTP projection is a Linear, so autocast returns bf16; the block after it must still
    add its residuals in the trunk's fp32."""
    from moe_ray.config import MTPConfig
    from moe_ray.model.transformer import MoETransformer

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_heads=2, n_layers=2, moe=MoEConfig(n_routed_experts=8, expert_hidden=16, top_k=2))
    model = MoETransformer(cfg.model_copy(update={"mtp": MTPConfig(depth=1)}))
    seen = []
    model.mtp[0].block.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.compute_loss(torch.randint(0, 256, (2, 18)))
    assert seen == [torch.float32]


def test_the_gpu_checks_need_neither_ray_nor_mlflow_nor_boto3():
    """What the README promises for a GPU node without `.venv`: this file's tests and the GPU
    benchmarks import with Ray, MLflow, boto3 and moto unavailable."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    blocked = "import sys; sys.modules.update(dict.fromkeys(['ray', 'mlflow', 'boto3', 'moto']))"
    script = (
        f"{blocked}; sys.path[:0] = ['tests', 'bench']; import pytest; "
        "rc = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/test_precision.py']); "
        "import moe_layer, gpu; sys.exit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test_overlap_on_nccl_gives_the_same_numbers_as_without" in proc.stdout
