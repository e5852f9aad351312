"""The expert worker: the Ray Train loop that every worker runs (DESIGN 5.1, 5.2, 10).

Each worker holds one block of routed experts and the dense parts (its FSDP shard of them, or a
full replica: `resources.dense_parallel`), trains on its share of every global batch, exchanges
tokens with the other workers by all-to-all, and routes with the bias the coordinator hands out.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import ray
import ray.train
import torch
import torch.distributed as dist

from moe_ray.data import batch_digest, batch_share, eval_windows, sample_windows, window_length
from moe_ray.hf import LayoutError
from moe_ray.hf.init_from import load_init_from
from moe_ray.parallel.dispatch import ExpertParallelDispatcher
from moe_ray.parallel.grads import split_parameters
from moe_ray.parallel.mesh import build_mesh
from moe_ray.parallel.parallelize import parallelize
from moe_ray.parallel.placement import ExpertPlacement
from moe_ray.runtime.bias_client import AllReduceBias, CoordinatorBias, CoordinatorRecords, all_reduce_sum
from moe_ray.runtime.coordinator import LOAD_HORIZON_STEPS, get_coordinator, rank_imbalance
from moe_ray.runtime.failures import FailurePoint, SetupError, WordedErrorTracebacks, worded_out_of_memory
from moe_ray.sizing import shards_dense
from moe_ray.spec import JobSpec
from moe_ray.storage import checkpoint as ckpt
from moe_ray.storage import s3
from moe_ray.storage.catalog import checkpoint_dir_name, list_checkpoints, run_location
from moe_ray.storage.checkpoint_index import write_index
from moe_ray.storage.location import Location
from moe_ray.storage.s3 import StorageError
from moe_ray.storage.token_shards import DatasetError, PreparedDataset, open_dataset
from moe_ray.system import tune_cpu_allocator
from moe_ray.train.evaluate import evaluate
from moe_ray.train.optim import build_optimizer
from moe_ray.train.step import STEP_PHASES, check_finite, compute_dtype, train_step
from moe_ray.train.trainer import build_model

log = logging.getLogger("moe_ray.worker")
T = TypeVar("T")
# The step's time breakdown, in seconds: the phases of train_step, the part of forward and
# backward blocked in all-to-alls, and saving the checkpoint before this step.
TIME_METRICS = tuple(f"time/{p}" for p in (*STEP_PHASES, "dispatch_wait", "checkpoint"))


def all_gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@dataclass
class WorkerContext:
    job: JobSpec
    run_name: str
    rank: int
    world_size: int
    device: torch.device
    placement: ExpertPlacement
    job_record: dict  # the job with its credentials masked, for state.json


def _candidate_checkpoints(job: JobSpec, run_name: str):
    """Ray Train's latest checkpoint first, then the run's older ones, newest first."""
    latest = ray.train.get_checkpoint()
    if latest is not None:
        yield latest
    run = run_location(job.checkpoint.storage, run_name)
    path, fs = run.ray_storage()
    for info in reversed(list_checkpoints(run)):
        if latest is None or not latest.path.rstrip("/").endswith(info.name):
            yield ray.train.Checkpoint(path=f"{path}/{info.name}", filesystem=fs)


def stop_unless_every_rank_can(problem: str | None, nodes: list[str], say: Callable[[str, str], str]) -> None:
    """Every rank raises SetupError if any found a problem: `say(the failed ranks' nodes, the
    first problem)`. `nodes` names each rank's node."""
    problems = all_gather(problem)
    failed = sorted({nodes[r] for r, p in enumerate(problems) if p})
    if failed:
        raise SetupError(say(", ".join(failed), next(p for p in problems if p)))


def check_storage(run: Location, rank: int, nodes: list[str]) -> None:
    """Every worker can write the run's storage: a local folder is the same for all of them, and
    S3 takes their writes. The driver checked it with its own environment; a cluster's nodes
    have theirs (credentials, endpoint), which moe-ray never fills from the driver's."""
    if not run.is_s3:
        check_storage_shared(run.local_path, rank, nodes)
        return
    try:
        s3.check_writable(run)
        problem = None
    except StorageError as err:
        problem = str(err)
    stop_unless_every_rank_can(
        problem,
        nodes,
        lambda failed, why: (
            f"the workers on {failed} cannot use checkpoint.storage: {why}. The nodes need S3 access of their own "
            "(an instance role, or AWS_* variables in their environment, exported before `ray start`): moe-ray "
            "does not send this machine's credentials"
        ),
    )


def check_storage_shared(run_folder: Path, rank: int, nodes: list[str], wait_s: float = 5.0) -> None:
    """A local `checkpoint.storage` must be one folder for every worker: each writes its own part
    of every checkpoint there, and a node with a folder of its own would keep parts that no
    restore finds (Ray Train's own check passes, each node checking a marker it wrote itself).
    Rank 0 writes a file and every rank looks for it."""
    if len(set(nodes)) < 2:
        return  # one node: one disk
    marker = None
    if rank == 0:
        run_folder.mkdir(parents=True, exist_ok=True)
        marker = run_folder / f".moe-ray-shared-{uuid.uuid4().hex}"
        marker.write_bytes(b"")
    marker = run_folder / broadcast(marker.name if marker else None)  # sent once it is written
    deadline = time.monotonic() + wait_s  # a shared filesystem may show a new file late
    while not (seen := marker.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:  # it gathers what every rank saw: once it returns or raises, all have looked
        stop_unless_every_rank_can(
            None if seen else "another folder",
            nodes,
            lambda failed, _: (
                f"checkpoint.storage {run_folder.parent} is not shared by the workers' nodes: on {failed} it is "
                f"another folder than on {nodes[0]} (rank 0's), so each node would keep its own part of every "
                "checkpoint; give an s3:// URI, or a folder that every node mounts at the same path"
            ),
        )
    finally:
        if rank == 0:
            marker.unlink(missing_ok=True)


def read_on_every_rank(what: str, read: Callable[[], T], nodes: list[str]) -> T:
    """`read()` (of the run's data, or model.init_from) on every rank, each with its own node's
    files and credentials, which a cluster's nodes do not share with the driver that found them;
    if it fails anywhere, every rank raises SetupError naming the nodes."""
    result, problem = None, None
    try:
        result = read()
    except (DatasetError, LayoutError, StorageError, OSError) as err:
        problem = str(err)
    stop_unless_every_rank_can(
        problem,
        nodes,
        lambda failed, why: (
            f"the workers on {failed} cannot read {what}: {why}. Each node reads it itself: give a folder that "
            "every node mounts at the same path, or an s3:// URI that the nodes can read"
        ),
    )
    return result


def open_run_data(uri: str) -> PreparedDataset:
    if not Location(uri).is_s3 and not Path(uri).is_dir():
        raise DatasetError(f"there is no folder {uri}")  # not "not a prepared dataset": the driver saw it
    return open_dataset(uri)


def restore(ctx: WorkerContext, model, optimizer) -> int:
    """Load the newest checkpoint that EVERY rank can load into model and optimizer; the next step
    (0 for a fresh run). Ranks read different files (their own experts), so one rank may find a
    checkpoint damaged that another loads: the ranks decide on each candidate together, and all
    fall back to the same older one."""
    initial = None
    for candidate in _candidate_checkpoints(ctx.job, ctx.run_name):
        if initial is None:  # a checkpoint that fails half-way must not leave half-loaded weights
            initial = {k: v.clone() for k, v in model.state_dict().items()}
        problem, step = None, None
        try:
            # Only this rank's experts' files are downloaded from remote storage.
            with ckpt.fetch(candidate.path, candidate.filesystem, model) as (folder, sizes):
                step = ckpt.load(folder, model, optimizer, sizes).step
                rng = ckpt.load_rng(folder)
        except (ckpt.CheckpointError, OSError) as err:
            problem = str(err)
        outcomes = all_gather((problem, step))
        failed = [(rank, p) for rank, (p, _) in enumerate(outcomes) if p is not None]
        if not failed and len({s for _, s in outcomes}) == 1:
            torch.set_rng_state(rng)
            return step
        why = "; ".join(f"rank {rank}: {p}" for rank, p in failed) or f"steps differ: {outcomes}"
        log.warning("skipping checkpoint %s (every rank skips it): %s", candidate.path, why)
        model.load_state_dict(initial)
        optimizer.state.clear()
    return 0


def save_checkpoint(ctx: WorkerContext, model, optimizer, next_step: int, metrics: dict, summary: dict) -> None:
    """Every rank writes its shard; rank 0 adds the dense state and the index; one report."""
    # The first EP group holds every expert once; an all-dense model has none to write.
    writes_experts = ctx.rank < ctx.placement.ep_size and bool(model.moe_layers())
    # Every rank takes part in gathering FSDP shards; only the writers keep what is gathered.
    experts = ckpt.expert_tensors(model, optimizer, keep=writes_experts)
    dense = ckpt.dense_tensors(model, optimizer, keep=ctx.rank == 0)
    with tempfile.TemporaryDirectory(prefix="moe-ray-ckpt-") as tmp:
        folder = Path(tmp)
        files = []
        if writes_experts:
            files.append(ckpt.write_experts(folder, model, experts))
        if ctx.rank == 0:
            state = {
                "step": next_step,
                "samples_seen": next_step * ctx.job.train.batch_size,
                "seed": ctx.job.train.seed,
                "world_size": ctx.world_size,
                "ep_size": ctx.placement.ep_size,
                "run_name": ctx.run_name,
                "job": ctx.job_record,  # credentials masked
                "summary": summary,
            }
            files += ckpt.write_dense(folder, dense, state)
        entries = [e for rank_entries in all_gather([ckpt.file_entry(f) for f in files]) for e in rank_entries]
        if ctx.rank == 0:
            write_index(folder, entries, next_step)
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if any(folder.iterdir()) else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(next_step))


def distributed_eval(ctx: WorkerContext, model, windows: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Validation loss and counts over the whole set, each rank evaluating its share of every batch."""
    first, count = batch_share(windows[0].shape[0], ctx.world_size, ctx.rank)
    result = evaluate(model, [w[first : first + count] for w in windows], ctx.job.train.precision)
    loss = all_reduce_sum(torch.tensor([result.loss * count / windows[0].shape[0]], dtype=torch.float64), ctx.device)
    return float(loss), all_reduce_sum(result.counts.to(torch.int64), ctx.device)


def quiet_ray_train_reports() -> None:
    """Ray Train logs each report's whole metrics dict at INFO under a logger named by its file's
    path, which RunConfig's LoggingConfig (it filters `ray.train.*`) does not reach; and the
    traceback of every error of the training function, which for moe-ray's worded errors only
    buries their message (the driver prints it)."""
    try:
        from ray.train.v2._internal import util
        from ray.train.v2._internal.execution import context
    except ImportError:  # private modules: when they move, their lines show
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    errors = logging.getLogger(util.__name__)
    if not any(isinstance(f, WordedErrorTracebacks) for f in errors.filters):
        errors.addFilter(WordedErrorTracebacks())


def train_loop_per_worker(config: dict) -> None:
    # Where it fails, on its exception: the failure policy tells a repeated failure by it.
    with FailurePoint() as point:
        try:
            _train(config, point)
        except RuntimeError as err:  # out of memory: said with what sizes a worker, not torch's traceback
            where = f"{ray.util.get_node_ip_address()} (rank {ray.train.get_context().get_world_rank()})"
            if (worded := worded_out_of_memory(err, point.at, config["job"], where)) is None:
                raise
            raise worded from err


def _train(config: dict, point: FailurePoint) -> None:
    if not config.get("ray_train_info_logs"):
        quiet_ray_train_reports()
    job = JobSpec.model_validate(config["job"])
    run_name = config["run_name"]
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        tune_cpu_allocator()
        torch.set_num_threads(max(1, int(job.resources.cpus_per_worker)))
    nodes = all_gather((ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()))
    node_ids = [node for node, _ in nodes]
    # Before the data, which a run on raw text keeps in the run's folder, and long before the
    # first checkpoint, where a storage problem used to show first.
    names = [f"{ip} (node {n[:8]})" for n, ip in nodes]
    check_storage(run_location(job.checkpoint.storage, run_name), rank, names)
    # Read by position: only this worker's windows.
    data = read_on_every_rank("the run's data", lambda: open_run_data(config["data"]), names)
    coordinator = get_coordinator(run_name)
    records = CoordinatorRecords(coordinator)  # rank 0 sends its metrics and events through it

    pids = all_gather(os.getpid())
    placement, expected = plan_placement(job, world, rank, node_ids, coordinator)
    mesh = build_mesh(placement, device.type)
    ctx = WorkerContext(job, run_name, rank, world, device, placement, config["job_record"])

    model = build_model(job.model, job.balance, job.train.seed, device, placement.held_experts(rank))
    dense_params = sum(p.numel() for p in split_parameters(model)[0])
    fsdp = shards_dense(job.resources.dense_parallel, dense_params)
    grads = parallelize(
        model, placement, rank, mesh, fsdp=fsdp, compute_dtype=compute_dtype(device, job.train.precision)
    )
    optimizer = build_optimizer(model, job.train)
    start_step = restore(ctx, model, optimizer)
    if start_step == 0 and job.model.init_from:  # a fresh run starts from the Hugging Face weights
        read_on_every_rank("model.init_from", lambda: load_init_from(model, job.model.init_from), names)
    generation = None
    if rank == 0:
        # The bias the model now holds (the checkpoint's, or the initial one of a fresh start):
        # a group restarted from scratch must not inherit a bias from its failed predecessor.
        bias = model.get_expert_bias().cpu().numpy()
        generation = ray.get(coordinator.begin.remote(start_step, world, bias))
        records.send(
            {
                "event": "placement",
                "step": start_step,
                "detail": placement.describe()
                + (f"; dense parts sharded over {world} (FSDP)" if fsdp else "; dense parts replicated")
                + (
                    f"; per-rank load max/mean {expected['contiguous']:.2f} in contiguous blocks, "
                    f"{expected['planned']:.2f} placed by load (last {LOAD_HORIZON_STEPS} steps)"
                    if expected and not placement.contiguous
                    else ""
                ),
                "orders": [list(placement.expert_order(i)) for i in range(len(placement.orders))]
                if placement.orders
                else None,
                "resumed": start_step > 0,
                "world_size": world,
                "pids": pids,
                "time": time.time(),
            },
            wait=True,
        )
    generation = broadcast(generation)
    # The coordinator's bias is the truth from here on (it equals the checkpoint's on a restore).
    model.set_expert_bias(torch.tensor(ray.get(coordinator.current_bias.remote())[1]))

    cfg = job.train
    window = window_length(cfg.seq_len, job.model.mtp.depth)
    first, count = batch_share(cfg.batch_size, world, rank)
    val = [w.to(device) for w in eval_windows(data.val, window, cfg.batch_size, cfg.eval_batches)]
    if config.get("bias_mode") == "allreduce":
        bias_source = AllReduceBias(model, job.balance, cfg.steps, device)
    else:
        bias_source = CoordinatorBias(coordinator, generation, rank, world, model, device, records)
    every = job.checkpoint.every
    multi_node = len(set(placement.node_of_rank)) > 1
    summary: dict = {}
    checkpoint_s = 0.0  # saving the last checkpoint, reported with the next step's times
    for step in range(start_step, cfg.steps):
        point.at = step + 1  # as the progress lines count
        for d in ep_dispatchers(model):  # count this step's all-to-alls only (not an evaluation's)
            d.bytes_moved, d.rows_in, d.clock.seconds = 0, 0, 0.0
        batch = sample_windows(data.train, window, cfg.seed, step, first, count).to(device)
        res = train_step(
            model,
            optimizer,
            batch,
            step,
            cfg,
            bias_source,
            loss_scale=count / cfg.batch_size,
            sync_gradients=grads.sync,
            clip=grads.clip,
        )
        metrics = step_metrics(res, step, count / cfg.batch_size, model, checkpoint_s, device)
        check_finite(step, metrics["loss"], metrics["grad_norm"], cfg)  # every rank: the global numbers
        metrics["tokens_per_s"] = cfg.batch_size * cfg.seq_len / res.seconds
        if not multi_node:
            metrics.pop("max_nodes_per_token")
        checkpoint_s = 0.0
        if cfg.audit_data:  # per-sample hashes in global sample order, whatever the world size
            metrics["batch_digest"] = [h for part in all_gather(batch_digest(batch)) for h in part]
        if rank == 0:
            records.send(metrics)
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            val_loss, val_counts = distributed_eval(ctx, model, val)
            if rank == 0:
                records.send(_eval_event(done, val_loss, val_counts))
        if done == cfg.steps:
            val_loss, val_counts = distributed_eval(ctx, model, val)
            summary = _eval_event(done, val_loss, val_counts) | {"train_loss": metrics["loss"]}
            if rank == 0:
                records.send(summary)
            save_checkpoint(ctx, model, optimizer, done, metrics | {"val_loss": val_loss}, summary)
            break
        # `moe-ray scale` or `rebalance` (the same count, a new placement): the coordinator fixed
        # the answer when this step's counts were complete, so every rank got the same one and
        # all stop here, after this step, with a checkpoint that the new worker group resumes from.
        scale_to = bias_source.desired_workers
        if (every and done % every == 0) or scale_to:
            saving = time.perf_counter()
            save_checkpoint(ctx, model, optimizer, done, metrics, summary)
            checkpoint_s = time.perf_counter() - saving
            if rank == 0:
                records.send({"event": "checkpoint", "step": done, "time": time.time()})
        if scale_to:
            if rank == 0:
                event = {"event": "scaling", "step": done, "from": world, "to": scale_to, "time": time.time()}
                records.send(event, wait=True)
            break


def plan_placement(
    job: JobSpec, world: int, rank: int, node_ids: list[str], coordinator
) -> tuple[ExpertPlacement, dict | None]:
    """This worker group's expert placement, as the coordinator plans it from its load history
    (contiguous blocks unless the job or `moe-ray rebalance` asks for a balanced one), and the
    per-rank imbalance the recent load predicts; rank 0 asks, every rank gets the same answer."""
    n_experts, ep_size = job.model.moe.n_routed_experts, job.ep_size_for(world)
    contiguous = ExpertPlacement.from_node_ids(n_experts, ep_size, node_ids)
    plan = None
    if rank == 0:
        node_limited = job.model.moe.max_nodes_per_token is not None
        plan = ray.get(
            coordinator.plan_placement.remote(n_experts, ep_size, list(contiguous.node_of_rank), node_limited)
        )
    plan = broadcast(plan)
    expected = plan.get("expected_imbalance")
    if not plan["orders"]:
        return contiguous, expected
    return ExpertPlacement.from_node_ids(n_experts, ep_size, node_ids, plan["orders"]), expected


def ep_dispatchers(model) -> list[ExpertParallelDispatcher]:
    """The MoE layers' expert-parallel dispatchers: they count the bytes they move and their waits."""
    return [layer.dispatcher for layer in model.moe_layers() if isinstance(layer.dispatcher, ExpertParallelDispatcher)]


def step_metrics(res, step: int, share: float, model, checkpoint_s: float, device: torch.device) -> dict:
    """The step's metrics over all ranks from ONE small all-gather: losses weighted by each
    rank's batch share and summed, all-to-all bytes summed, the most nodes any token reached,
    the time breakdown averaged over the ranks, and how unevenly the expert-parallel ranks were
    loaded (rows received per layer: max/mean over ranks, mean over layers)."""
    dispatchers = ep_dispatchers(model)
    moved = sum(d.bytes_moved for d in dispatchers)
    waited = sum(d.clock.seconds for d in dispatchers)
    times = [res.times[p] for p in STEP_PHASES] + [waited, checkpoint_s]
    rows_in = [d.rows_in for d in dispatchers]
    mine = torch.tensor(
        [
            res.loss * share,
            res.lm_loss * share,
            res.mtp_loss * share,
            res.balance_loss * share,
            moved,
            res.max_nodes or 0,
            *times,
            *rows_in,
        ],
        dtype=torch.float64,
        device=device,
    )
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    ranks = torch.stack(gathered).cpu()
    total, mean = ranks.sum(0).tolist(), ranks.mean(0).tolist()
    phases = (*STEP_PHASES, "dispatch_wait", "checkpoint")
    rows = ranks[:, 6 + len(phases) :]  # (ranks, layers); replicas of an EP rank see the same shape of load
    extra = {"rank_imbalance": rank_imbalance(rows.T)} if rows.numel() and dist.get_world_size() > 1 else {}
    return {
        "step": step,
        "loss": total[0],
        "lm_loss": total[1],
        "mtp_loss": total[2],
        "balance_loss": total[3],
        "a2a_bytes": int(total[4]),
        "max_nodes_per_token": int(ranks[:, 5].max()),
        "lr": res.lr,
        "grad_norm": res.grad_norm,
        "step_time": res.seconds,
        "time": time.time(),
        **{f"time/{name}": value for name, value in zip(phases, mean[6 : 6 + len(phases)], strict=True)},
        **extra,
    }


def _eval_event(step: int, loss: float, counts: torch.Tensor) -> dict:
    from moe_ray.balance import max_violation

    vio = max_violation(counts)
    return {
        "event": "eval",
        "step": step,
        "val_loss": loss,
        "max_vio_global": vio.tolist(),
        "max_vio_global_mean": float(vio.mean()) if vio.numel() else 0.0,
        "time": time.time(),  # an evaluation run again after a restart is a new event
    }
