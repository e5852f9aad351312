"""Expert parallelism over real gloo process groups: distributed vs single process.

Each case runs on `world` processes that form a gloo group (the collectives Ray Train's workers
use on CPU): one forward/backward/sync/clip of the same model on their shares of one global
batch, saving what they computed; the test compares with one process on the whole batch. The
module spawns its processes once and runs every case in them (`gloo_cases`).
"""

import pytest
import torch
import torch.distributed as dist
from gloo_cases import require, run_cases

from moe_ray.config import BalanceConfig, ModelConfig, MoEConfig, MTPConfig, TrainConfig
from moe_ray.data import batch_share
from moe_ray.parallel.mesh import build_mesh
from moe_ray.parallel.parallelize import parallelize
from moe_ray.parallel.placement import ExpertPlacement
from moe_ray.storage.checkpoint import full_cpu
from moe_ray.train.step import clip_gradients
from moe_ray.train.trainer import build_model

BATCH, SEQ = 8, 12
SCRAMBLED = (7, 0, 5, 2, 1, 6, 3, 4)  # a non-contiguous expert order (a load-aware placement)
# One order per MoE layer (2 trunk layers + 1 MTP layer), each different.
SCRAMBLED_LAYERS = (SCRAMBLED, (3, 2, 1, 0, 7, 6, 5, 4), tuple(range(8)))


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


def _worker(rank, world, out_dir, ep_size, hot, fsdp, order):
    placement = ExpertPlacement(8, ep_size, tuple([0] * world), order)
    mesh = build_mesh(placement, "cpu")
    model = build_model(
        model_cfg(), BalanceConfig(seq_aux_alpha=1e-3), 0, torch.device("cpu"), placement.held_experts(rank)
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
            "experts": {
                f"{n}.{w}": list(m.expert_ids)
                for n, m in model.named_modules()
                if n.endswith(".experts")
                for w in ("w13", "w2")
            },
        },
        out_dir / f"rank{rank}.pt",
    )


def reference(hot=None):
    model = build_model(model_cfg(), BalanceConfig(seq_aux_alpha=1e-3), seed=0, device=torch.device("cpu"))
    if hot is not None:
        force_bias(model, hot)
    out = model.compute_loss(batch())
    out.loss.backward()
    norm = clip_gradients(model, 0.05)
    return out, norm, {n: p.grad for n, p in model.named_parameters()}


# name: (world, ep_size, hot experts, expert order)
LAYOUTS = {
    "ep2": (2, 2, None, None),
    "dp2": (2, 1, None, None),
    "ep2xdp2": (4, 2, None, None),
    "zero_token_rank": (2, 2, [0, 1, 2], None),
    "ep3_uneven": (3, 3, None, None),
    "ep2xdp2_scrambled": (4, 2, [7, 0, 5], SCRAMBLED_LAYERS),
}
STEP_CASES = {
    f"{name}-{'fsdp' if fsdp else 'replicated'}": (*layout, fsdp)
    for name, layout in LAYOUTS.items()
    for fsdp in (True, False)
}
# Written by 4 workers, then read by 2 and by 4 (in this order: the loads read the save).
CHECKPOINT_CASES = [(4, 2, "save", SCRAMBLED_LAYERS), (2, 1, "load", None), (4, 4, "load", None)]


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    """Every case of this module, run once in one set of 4 spawned processes."""
    folder = tmp_path_factory.mktemp("gloo")
    (folder / "ckpt").mkdir()
    cases = [
        (name, world, _worker, (ep_size, hot, fsdp, order))
        for name, (world, ep_size, hot, order, fsdp) in STEP_CASES.items()
    ]
    cases += [
        (f"checkpoint-{phase}-{world}", world, _checkpoint_worker, (ep_size, phase, folder / "ckpt", order))
        for world, ep_size, phase, order in CHECKPOINT_CASES
    ]
    return run_cases(cases, folder)


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_distributed_step_matches_single_process(gloo, case):
    world, ep_size, hot, order, fsdp = STEP_CASES[case]
    out_dir = require(gloo, case)
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
    out, norm, ref_grads = reference(hot)
    # The per-rank balance (sequence-wise) loss is a mean over sequences, so it averages exactly.
    for r in ranks:
        torch.testing.assert_close(r["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["norm"], norm, rtol=1e-5, atol=1e-6)
    total_counts = sum(r["counts"] for r in ranks)
    assert torch.equal(total_counts, out.counts)
    if hot is not None:
        # every token went to EP rank 0's experts (non-contiguous ones under SCRAMBLED)
        assert total_counts[:, [e for e in range(8) if e not in hot]].sum() == 0
    for name, ref in ref_grads.items():
        for r in ranks:
            got = r["grads"][name]
            if ".experts." in name:
                ref_part = ref[r["experts"][name]]
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
    # A non-contiguous order: blocks are runs of the order; nodes follow each expert's owner.
    s = ExpertPlacement.from_node_ids(8, 4, ["a", "a", "b", "b"], SCRAMBLED_LAYERS)
    assert [s.local_experts(r) for r in range(4)] == [(7, 0), (5, 2), (1, 6), (3, 4)]
    assert s.local_experts(1, layer=1) == (1, 0) and s.held_experts(1) == [(5, 2), (1, 0), (2, 3)]
    assert s.owner() == [0, 2, 1, 3, 3, 1, 2, 0]
    assert s.expert_nodes(0).tolist() == [0, 1, 0, 1, 1, 0, 1, 0]
    assert s.rank_loads(torch.arange(8.0)).tolist() == [7.0, 7.0, 7.0, 7.0]
    assert s.rank_loads(torch.arange(8.0).expand(3, 8))[2].tolist() == [1.0, 5.0, 9.0, 13.0]
    with pytest.raises(ValueError, match="each of the 8 experts once"):
        ExpertPlacement(8, 2, (0, 0), ((0, 1, 2, 3, 4, 5, 6, 6),))


def test_balanced_order_evens_rank_loads():
    from moe_ray.parallel.placement import balanced_orders

    g = torch.Generator().manual_seed(0)
    load = torch.rand(3, 12, generator=g).pow(4) * 1000  # skewed, per layer
    contiguous = ExpertPlacement(12, 3, (0, 0, 0))
    orders = balanced_orders(load, contiguous.block_sizes)
    balanced = ExpertPlacement(12, 3, (0, 0, 0), orders)
    assert len(orders) == 3 and all(len(balanced.local_experts(r, 2)) == 4 for r in range(3))

    def imbalance(p):  # per layer
        per_rank = p.rank_loads(load)
        return (per_rank.max(dim=1).values / per_rank.mean(dim=1)).tolist()

    for layer in range(3):
        assert imbalance(balanced)[layer] < imbalance(contiguous)[layer]
        # Against every placement of 4 experts per rank: greedy is within 10% of the best.
        assert imbalance(balanced)[layer] <= 1.10 * min_imbalance(load[layer], 3, 4)
    # Node-limited routing: experts stay on the node of their contiguous placement.
    two_nodes = balanced_orders(load, contiguous.block_sizes, [0, 0, 1])
    assert all(set(o[:8]) == set(range(8)) and set(o[8:]) == set(range(8, 12)) for o in two_nodes)


def min_imbalance(load, ranks, per_rank):
    """The best max/mean over every split of the experts into equal blocks (a small brute force)."""
    import itertools

    best = float("inf")
    experts = list(range(len(load)))

    def split(left, totals):
        nonlocal best
        if not left:
            best = min(best, max(totals) / (sum(totals) / ranks))
            return
        # the lowest remaining expert opens the next block: each partition counted once
        first, rest = left[0], left[1:]
        for others in itertools.combinations(rest, per_rank - 1):
            block = (first, *others)
            split([e for e in rest if e not in others], totals + [float(load[list(block)].sum())])

    split(experts, [])
    return best


def _checkpoint_worker(rank, world, out_dir, ep_size, phase, folder, order=None):
    """Phase "save": one AdamW step, then the checkpoint as the Ray workers write it. Phase "load":
    another seed, then the checkpoint. Both record every whole tensor they hold afterwards."""
    from moe_ray.storage import checkpoint as ckpt
    from moe_ray.storage.checkpoint_index import write_index
    from moe_ray.train.optim import build_optimizer

    placement = ExpertPlacement(8, ep_size, tuple([0] * world), order)
    seed = 0 if phase == "save" else 123
    model = build_model(model_cfg(), BalanceConfig(), seed, torch.device("cpu"), placement.held_experts(rank))
    grads = parallelize(model, placement, rank, build_mesh(placement, "cpu"), fsdp=True)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
    if phase == "save":
        first, count = batch_share(BATCH, world, rank)
        (model.compute_loss(batch()[first : first + count]).loss * count / BATCH).backward()
        grads.clip(model, 1.0)
        optimizer.step()
        experts = ckpt.expert_tensors(model, optimizer, keep=rank < ep_size)
        dense = ckpt.dense_tensors(model, optimizer, keep=rank == 0)
        if rank < ep_size:
            ckpt.write_experts(folder, model, experts)
        if rank == 0:
            ckpt.write_dense(folder, dense, {"step": 1})
        dist.barrier()
        if rank == 0:
            entries = [ckpt.file_entry(p) for p in sorted(folder.iterdir())]
            write_index(folder, entries, 1)
    else:
        ckpt.load(folder, model, optimizer)
    # What this layout holds, whole: the same on every layout if the checkpoint is layout-free.
    held = ckpt.expert_tensors(model, optimizer) | ckpt.dense_tensors(model, optimizer)
    torch.save(held, out_dir / f"rank{rank}.pt")


def test_fsdp_checkpoint_loads_bit_exact_into_other_layouts(gloo):
    """Written by 4 workers (EP 2 x DP 2: experts FSDP-sharded over their replicas, a
    non-contiguous placement), read by 2 workers (EP 1 x DP 2), by 4 workers (EP 4, contiguous)
    and by one plain process: every weight and AdamW moment bit-exact."""
    from moe_ray.storage import checkpoint as ckpt
    from moe_ray.train.optim import build_optimizer

    save, load2, load4 = (require(gloo, f"checkpoint-{phase}-{world}") for world, _, phase, _ in CHECKPOINT_CASES)
    folder = gloo / "ckpt"
    saved = {}
    for rank in range(4):
        saved |= torch.load(save / f"rank{rank}.pt")
    assert any(".expert.7." in k and k.endswith("exp_avg") for k in saved)  # experts of both EP ranks
    assert len(list(folder.glob("experts-*.safetensors"))) == 2  # one file per EP rank, names unique
    for rank in range(2):
        loaded = torch.load(load2 / f"rank{rank}.pt")
        assert loaded.keys() == saved.keys()
        for k, v in loaded.items():
            assert torch.equal(v, saved[k]), k
    for rank in range(4):  # EP 4: each rank holds 2 experts, and only those
        loaded = torch.load(load4 / f"rank{rank}.pt")
        for k, v in loaded.items():
            assert torch.equal(v, saved[k]), k
    plain = build_model(model_cfg(), BalanceConfig(), 7, torch.device("cpu"))
    opt = build_optimizer(plain, TrainConfig())
    ckpt.load(folder, plain, opt)
    for k, v in (ckpt.expert_tensors(plain, opt) | ckpt.dense_tensors(plain, opt)).items():
        assert torch.equal(v, saved[k]), k
