"""Shared-expert overlap (DESIGN 14) over real gloo groups: the shared experts run while the
dispatch all-to-all is in flight, forward and backward, and the numbers are the same as without."""

import pytest
import torch
import torch.distributed as dist
from gloo_cases import require, run_cases
from test_parallel import batch, model_cfg

from moe_ray.config import BalanceConfig
from moe_ray.data import batch_share
from moe_ray.parallel import dispatch
from moe_ray.parallel.mesh import build_mesh
from moe_ray.parallel.parallelize import parallelize
from moe_ray.parallel.placement import ExpertPlacement
from moe_ray.storage.checkpoint import full_cpu
from moe_ray.train.trainer import build_model


class Mark(torch.autograd.Function):
    """Identity that notes in `log` when its backward runs."""

    @staticmethod
    def forward(ctx, x, log, name):
        ctx.log, ctx.name = log, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(ctx.name)
        return grad, None, None


def _order_worker(rank, world, out_dir):
    log = []
    real = dist.all_to_all_single

    def logged(*args, **kwargs):  # the real collective, noted when it starts asynchronously
        if kwargs.get("async_op"):
            log.append("all-to-all started")
        return real(*args, **kwargs)

    dist.all_to_all_single = logged
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    send = recv = [3, 3]
    y, shared = dispatch.all_to_all_overlapped(
        Mark.apply(x, log, "rows' gradient out"),
        send,
        recv,
        None,
        dispatch.WaitClock(),
        lambda: Mark.apply(x @ w, log, "shared backward"),
    )
    loss = (Mark.apply(y, log, "backward in") * 2).sum() + shared.sum()
    forward = list(log)
    log.clear()
    loss.backward()
    dist.all_to_all_single = real
    # The same all-to-all without overlap gives the same gradient.
    x2 = x.detach().clone().requires_grad_(True)
    y2 = dispatch.all_to_all(x2, send, recv, None, dispatch.WaitClock())
    ((y2 * 2).sum() + (x2 @ w.detach()).sum()).backward()
    torch.save({"forward": forward, "backward": log, "same": torch.equal(x.grad, x2.grad)}, f"{out_dir}/{rank}.pt")


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    """The module's cases, run once in one pair of spawned processes."""
    cases = [("order", 2, _order_worker, ())]
    cases += [(f"step-{kind}", 2, _step_worker, (kind == "fsdp",)) for kind in ("replicated", "fsdp")]
    return run_cases(cases, tmp_path_factory.mktemp("gloo"))


def test_shared_backward_runs_while_the_reverse_all_to_all_is_in_flight(gloo):
    out_dir = require(gloo, "order")
    for rank in range(2):
        got = torch.load(out_dir / f"{rank}.pt")
        assert got["forward"] == ["all-to-all started"]
        assert got["backward"] == ["backward in", "all-to-all started", "shared backward", "rows' gradient out"]
        assert got["same"]


def _step_worker(rank, world, out_dir, fsdp):
    placement = ExpertPlacement(8, 2, (0, 0))
    mesh = build_mesh(placement, "cpu")
    result = {}
    for overlap in (True, False):
        model = build_model(model_cfg(), BalanceConfig(), 0, torch.device("cpu"), placement.local_experts(rank))
        grads = parallelize(model, placement, rank, mesh, fsdp=fsdp)
        for layer in model.moe_layers():
            layer.dispatcher.overlap = overlap
        first, count = batch_share(8, 2, rank)
        out = model.compute_loss(batch()[first : first + count])
        (out.loss * count / 8).backward()
        grads.sync(model)
        waited = sum(layer.dispatcher.clock.seconds for layer in model.moe_layers())
        result[overlap] = {
            "loss": out.loss.detach(),
            "grads": {n: full_cpu(p.grad) for n, p in model.named_parameters()},
            "waited": waited,
        }
    torch.save(result, f"{out_dir}/{rank}.pt")


def test_overlap_gives_the_same_numbers_as_without(gloo):
    for fsdp in (False, True):
        name = "step-fsdp" if fsdp else "step-replicated"
        out_dir = require(gloo, name)
        for rank in range(2):
            got = torch.load(out_dir / f"{rank}.pt")
            on, off = got[True], got[False]
            assert torch.equal(on["loss"], off["loss"])
            assert on["grads"].keys() == off["grads"].keys()
            for name in on["grads"]:
                assert torch.equal(on["grads"][name], off["grads"][name]), (fsdp, name)
            assert on["waited"] > 0 and off["waited"] > 0  # the all-to-alls' waits are timed
