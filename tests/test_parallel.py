"""Expert parallelism over real gloo process groups: distributed vs single process.

Each case spawns `world` processes that form a gloo group (the collectives Ray Train's workers
use on CPU), run one forward/backward/sync/clip of the same model on their shares of one global
batch, and save what they computed; the test compares with one process on the whole batch.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from moe_ray.config import BalanceConfig, ModelConfig, MoEConfig, MTPConfig, TrainConfig
from moe_ray.parallel.mesh import build_mesh
from moe_ray.parallel.parallelize import parallelize
from moe_ray.parallel.placement import ExpertPlacement
from moe_ray.runtime.worker import batch_share
from moe_ray.storage.checkpoint import full_cpu
from moe_ray.train.step import clip_gradients
from moe_ray.train.trainer import build_model

BATCH, SEQ = 8, 12


def model_cfg():
    return ModelConfig(
        vocab_size=64,
        d_model=32,
        n_heads=2,
        n_layers=3,
        n_dense_layers=1,
        moe=MoEConfig(n_routed_experts=8, expert_hidden=16, top_k=2),
        mtp=MTPConfig(depth=1),
    )


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (BATCH, SEQ + 2), generator=g)


def force_bias(model, hot_experts):
    """A bias so large that every token picks `hot_experts` (all on one rank)."""
    bias = torch.zeros(len(model.moe_layers()), model.cfg.moe.n_routed_experts)
    bias[:, hot_experts] = 10.0
    model.set_expert_bias(bias)


def _worker(rank, world, port, ep_size, hot, fsdp, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        placement = ExpertPlacement(8, ep_size, tuple([0] * world))
        mesh = build_mesh(placement, "cpu")
        model = build_model(
            model_cfg(), BalanceConfig(seq_aux_alpha=1e-3), 0, torch.device("cpu"), placement.local_experts(rank)
        )
        if hot is not None:
            force_bias(model, hot)
        grads = parallelize(model, placement, rank, mesh, fsdp=fsdp)
        first, count = batch_share(BATCH, world, rank)
        out = model.compute_loss(batch()[first : first + count])
        (out.loss * count / BATCH).backward()
        grads.sync(model)
        norm = grads.clip(model, max_norm=0.05)
        loss = out.loss.detach() * count / BATCH
        dist.all_reduce(loss)
        sharded = sum(p.to_local().numel() for p in model.parameters() if hasattr(p, "to_local"))
        torch.save(
            {
                "loss": loss,
                "norm": norm,
                "counts": out.counts,
                "grads": {n: full_cpu(p.grad) for n, p in model.named_parameters()},
                "sharded_elements": sharded,
                "experts": list(placement.local_experts(rank)),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def reference(hot=None):
    model = build_model(model_cfg(), BalanceConfig(seq_aux_alpha=1e-3), seed=0, device=torch.device("cpu"))
    if hot is not None:
        force_bias(model, hot)
    out = model.compute_loss(batch())
    out.loss.backward()
    norm = clip_gradients(model, 0.05)
    return out, norm, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp", "replicated"])
@pytest.mark.parametrize(
    "world, ep_size, hot",
    [(2, 2, None), (2, 1, None), (4, 2, None), (2, 2, [0, 1, 2]), (3, 3, None)],
    ids=["ep2", "dp2", "ep2xdp2", "zero_token_rank", "ep3_uneven"],
)
def test_distributed_step_matches_single_process(tmp_path, world, ep_size, hot, fsdp):
    mp.start_processes(
        _worker, args=(world, free_port(), ep_size, hot, fsdp, str(tmp_path)), nprocs=world, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    out, norm, ref_grads = reference(hot)
    # The per-rank balance (sequence-wise) loss is a mean over sequences, so it averages exactly.
    for r in ranks:
        torch.testing.assert_close(r["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["norm"], norm, rtol=1e-5, atol=1e-6)
    total_counts = sum(r["counts"] for r in ranks)
    assert torch.equal(total_counts, out.counts)
    if hot is not None:
        assert total_counts[:, 3:].sum() == 0  # every token went to rank 0's experts
    for name, ref in ref_grads.items():
        for r in ranks:
            got = r["grads"][name]
            if ".experts." in name:
                ref_part = ref[r["experts"][0] : r["experts"][-1] + 1]
                torch.testing.assert_close(got, ref_part, rtol=1e-4, atol=1e-6, msg=name)
            else:
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=name)
    # FSDP really shards: the ranks' parameter shards add up to the model, none holds it whole.
    sharded = [r["sharded_elements"] for r in ranks]
    assert (min(sharded) > 0) == fsdp


def test_placement_blocks_and_nodes():
    p = ExpertPlacement.from_node_ids(16, 2, ["nodeB", "nodeB", "nodeA", "nodeA"])
    assert (p.world_size, p.dp_size, p.experts_per_rank) == (4, 2, 8)
    assert list(p.local_experts(1)) == list(range(8, 16)) and list(p.local_experts(2)) == list(range(8))
    assert p.replica_ranks(1) == [1, 3] and p.ep_group_ranks(3) == [2, 3]
    assert p.expert_nodes(0).tolist() == [0] * 16  # rank 0's EP group lives on one node
    q = ExpertPlacement.from_node_ids(8, 4, ["a", "b", "a", "b"])
    assert q.expert_nodes(0).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    uneven = ExpertPlacement(10, 4, (0, 0, 1, 1))
    assert uneven.block_sizes == [3, 3, 2, 2] and list(uneven.local_experts(3)) == [8, 9]
    assert uneven.expert_nodes(0).tolist() == [0] * 6 + [1] * 4
    with pytest.raises(ValueError, match="must divide"):
        ExpertPlacement(8, 3, (0, 0, 0, 0))


def _checkpoint_worker(rank, world, port, ep_size, phase, folder):
    """Phase "save": one AdamW step, then the checkpoint as the Ray workers write it. Phase "load":
    another seed, then the checkpoint. Both record every whole tensor they hold afterwards."""
    from moe_ray.storage import checkpoint as ckpt
    from moe_ray.train.optim import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    folder = os.fspath(folder)
    try:
        placement = ExpertPlacement(8, ep_size, tuple([0] * world))
        seed = 0 if phase == "save" else 123
        model = build_model(model_cfg(), BalanceConfig(), seed, torch.device("cpu"), placement.local_experts(rank))
        grads = parallelize(model, placement, rank, build_mesh(placement, "cpu"), fsdp=True)
        optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
        if phase == "save":
            first, count = batch_share(BATCH, world, rank)
            (model.compute_loss(batch()[first : first + count]).loss * count / BATCH).backward()
            grads.clip(model, 1.0)
            optimizer.step()
            experts = ckpt.expert_tensors(model, optimizer, keep=rank < ep_size)
            dense = ckpt.dense_tensors(model, optimizer, keep=rank == 0)
            from pathlib import Path

            if rank < ep_size:
                ckpt.write_experts(Path(folder), model, experts)
            if rank == 0:
                ckpt.write_dense(Path(folder), dense, {"step": 1})
            dist.barrier()
            if rank == 0:
                entries = [ckpt.file_entry(p) for p in sorted(Path(folder).iterdir())]
                ckpt.write_index(Path(folder), entries, 1)
        else:
            ckpt.load(folder, model, optimizer)
        # What this layout holds, whole: the same on every layout if the checkpoint is layout-free.
        held = ckpt.expert_tensors(model, optimizer) | ckpt.dense_tensors(model, optimizer)
        torch.save(held, os.path.join(folder, "..", f"{phase}-{world}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_checkpoint_loads_bit_exact_into_other_layouts(tmp_path):
    """Written by 4 workers (EP 2 x DP 2: experts FSDP-sharded over their replicas), read by 2
    workers (EP 1 x DP 2) and by one plain process: every weight and AdamW moment bit-exact."""
    from moe_ray.storage import checkpoint as ckpt
    from moe_ray.train.optim import build_optimizer

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for world, ep_size, phase in [(4, 2, "save"), (2, 1, "load")]:
        mp.start_processes(
            _checkpoint_worker,
            args=(world, free_port(), ep_size, phase, folder),
            nprocs=world,
            start_method="spawn",
        )
    saved = {}
    for rank in range(4):
        saved |= torch.load(tmp_path / f"save-4-rank{rank}.pt")
    assert any(".expert.7." in k and k.endswith("exp_avg") for k in saved)  # experts of both EP ranks
    for rank in range(2):
        loaded = torch.load(tmp_path / f"load-2-rank{rank}.pt")
        assert loaded.keys() == saved.keys()
        for k, v in loaded.items():
            assert torch.equal(v, saved[k]), k
    plain = build_model(model_cfg(), BalanceConfig(), 7, torch.device("cpu"))
    opt = build_optimizer(plain, TrainConfig())
    ckpt.load(folder, plain, opt)
    for k, v in (ckpt.expert_tensors(plain, opt) | ckpt.dense_tensors(plain, opt)).items():
        assert torch.equal(v, saved[k]), k
