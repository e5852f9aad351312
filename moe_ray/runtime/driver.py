"""The driver (DESIGN 5.1): validates storage, connects to Ray, starts the coordinator and the
worker group (Ray Train `TorchTrainer`), streams progress, reports the outcome."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from moe_ray.hf.init_from import check_init_from
from moe_ray.runtime.cluster import ClusterAddressError, capacity_problem, enable_token_auth, hide_ray_noise, join
from moe_ray.runtime.coordinator import COORDINATOR_NAMESPACE, Coordinator, coordinator_name
from moe_ray.runtime.data_loading import run_dataset
from moe_ray.runtime.failures import root_cause
from moe_ray.runtime.prepare import at_most_every, progress_line
from moe_ray.runtime.ray_trainer import RunTrainer
from moe_ray.runtime.run_tracking import RunTracking
from moe_ray.runtime.worker import train_loop_per_worker
from moe_ray.secrets import redact
from moe_ray.spec import JobSpec, WorkerRange, check_run_name, default_run_name, job_record, with_absolute_paths
from moe_ray.storage import s3
from moe_ray.storage.catalog import list_checkpoints, run_location, run_name_problem
from moe_ray.storage.location import Location, make_writable_folder
from moe_ray.system import cache_dir

log = logging.getLogger("moe_ray.driver")

# Ray Train's own chatter (controller state, worker-group start lines) is not for our users.
_QUIET_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def _worker_logs() -> bool:
    """MOE_RAY_WORKER_LOGS=1: the workers' output on an embedded Ray, and Ray Train's INFO lines."""
    return os.environ.get("MOE_RAY_WORKER_LOGS", "0") == "1"


class RunError(Exception):
    """A run that cannot start or did not finish; the message says why and what to do."""


class RunNotFound(RunError):
    """No run of that name has a coordinator in the cluster (none runs, or it has not got one yet)."""


class RunInterrupted(RunError):
    """Ctrl-C (or `moe-ray stop`, which interrupts a job's driver): the workers are stopped, the
    MLflow run is marked KILLED, and the run continues from its newest complete checkpoint."""

    def __init__(self, run_name: str, steps_done: int | None, checkpoint_step: int | None):
        self.run_name, self.steps_done, self.checkpoint_step = run_name, steps_done, checkpoint_step
        held = f"its newest checkpoint is of step {checkpoint_step}" if checkpoint_step else "it has no checkpoint yet"
        when = "while preparing its data" if steps_done is None else f"after {steps_done} steps"
        super().__init__(f"interrupted: run {run_name} stopped {when}; {held}")

    @classmethod
    def of(cls, job: JobSpec, run_name: str, steps_done: int | None) -> RunInterrupted:
        complete = [c for c in list_checkpoints(run_location(job.checkpoint.storage, run_name)) if c.complete]
        return cls(run_name, steps_done, complete[-1].step if complete else None)


@dataclass
class Progress:
    """What the driver has seen of a run so far; handed to the progress callback."""

    run_name: str
    total_steps: int
    metrics: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # per step: MaxVio and bias range per layer
    max_vio: list[float] | None = None
    started: float = 0.0  # time.time() when run_job was called

    @property
    def last(self) -> dict | None:
        return self.metrics[-1] if self.metrics else None


@dataclass
class RunResult:
    run_name: str
    run_location: str
    checkpoint: str | None
    final_step: int
    train_loss: float | None
    val_loss: float | None
    max_vio_global: list[float] | None
    progress: Progress
    load_history: list[dict]
    bias_consistency: dict
    seconds: float
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None


def prepare_storage(job: JobSpec) -> Location:
    loc = Location(job.checkpoint.storage)
    if loc.is_s3:
        s3.check_writable(loc)
    else:
        try:
            make_writable_folder(loc.local_path)
        except OSError as err:
            raise s3.StorageError(f"cannot write to checkpoint.storage {loc}: {err}") from None
    return loc


def scale_limits(job: JobSpec) -> dict:
    """What `moe-ray scale` may ask of this run: at most one worker per sequence of a step, and
    without `ep_size` (pure expert parallelism) at most one per routed expert; with it, any
    multiple of `ep_size` (data-parallel replicas beyond the number of experts included). An
    elastic run is sized by Ray Train instead."""
    res = job.resources
    n_experts, batch = job.model.moe.n_routed_experts, job.train.batch_size
    return {
        "max": batch if res.ep_size else min(n_experts, batch),
        "ep_size": res.ep_size,
        "elastic": (res.min_workers, res.max_workers) if isinstance(res.workers, WorkerRange) else None,
    }


def resolve_run_name(job: JobSpec, resume: str | bool | None, run_name: str | None) -> str:
    """A fresh, unique name; or, with `resume`, the named run or the newest run of this job."""
    if not resume:
        if not run_name:
            return default_run_name(job)
        if problem := run_name_problem(job.checkpoint.storage, check_run_name(run_name), resume=False):
            raise RunError(problem)
        return run_name
    if isinstance(resume, str):
        if problem := run_name_problem(job.checkpoint.storage, check_run_name(resume, "--resume"), resume=True):
            raise RunError(problem)
        return resume
    root = Location(job.checkpoint.storage)
    if root.is_s3:
        names = {o["Key"][len(root.prefix) :].lstrip("/").split("/", 1)[0] for o in s3.list_objects(root)}
    else:
        names = {p.name for p in root.local_path.iterdir() if p.is_dir()} if root.local_path.is_dir() else set()
    runs = sorted(n for n in names if n.startswith(job.name + "-") and list_checkpoints(root.child(n)))
    if not runs:
        raise RunError(f"--resume: no run of job {job.name!r} with checkpoints under {root}")
    return runs[-1]  # names end in a timestamp, so the last sorts newest


def connect(address: str | None, job: JobSpec) -> bool:
    """Join the cluster at `address`, or start an embedded local Ray. True if we started it."""
    if ray.is_initialized():
        return False
    if address:
        try:
            join(address, ship_code=True, env_vars=_QUIET_ENV, logging_level=logging.WARNING, log_to_driver=True)
            if not _worker_logs():
                hide_ray_noise()
        except ClusterAddressError as err:
            raise RunError(str(err)) from None
        return False
    need = int(job.resources.max_workers * job.resources.cpus_per_worker + 0.999)
    enable_token_auth(local=True)
    # Ray starts 2 idle workers for the first driver; they have no runtime_env, so none of the
    # run's actors could use them.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # One node that is never drained: Ray Train's PreemptionWatcher (an actor per worker group,
    # ~1 s of each start) would have nothing to watch.
    no_watcher = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")}
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, need),
        include_dashboard=False,
        runtime_env={"env_vars": {**_QUIET_ENV, **no_watcher}},
        logging_level=logging.WARNING,
        log_to_driver=_worker_logs(),
    )
    return True


def _use_gpu(job: JobSpec) -> bool:
    if job.resources.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(job.resources.use_gpu)


def resources_per_worker(job: JobSpec) -> dict[str, float]:
    return {"CPU": job.resources.cpus_per_worker, **({"GPU": 1} if _use_gpu(job) else {})}


def run_job(
    job: JobSpec,
    *,
    address: str | None = None,
    resume: str | bool | None = None,
    run_name: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    poll_s: float = 0.5,
    bias_mode: str = "coordinator",
) -> RunResult:
    """Run a job to the end. `bias_mode="allreduce"` is a diagnostic (benchmarks only): workers
    compute the bias themselves instead of asking the coordinator."""
    start = time.time()
    job = with_absolute_paths(job)  # as meant here: Ray's workers and tasks run in other directories
    prepare_storage(job)
    if job.model.init_from:  # a folder that does not fit is refused before anything starts
        log.warning("init_from: %s", check_init_from(job))
    run_name = resolve_run_name(job, resume, run_name)
    started = connect(address, job)
    marker = run_marker(run_name)
    try:
        # Where this run's Ray is, for `moe-ray scale RUN` from another shell on this machine.
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(ray.get_runtime_context().gcs_address)
        with _sigterm_as_interrupt():
            return _run(job, run_name, on_progress, poll_s, start, bias_mode, address)
    finally:
        marker.unlink(missing_ok=True)
        if started:
            ray.shutdown()


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM taken as Ctrl-C: `moe-ray stop` (Ray's job stop) ends a job's driver with it, and
    with SIGKILL 3 s later; so the run is marked KILLED and says how to go on. (ray.init set a
    handler that exits at once, and on an embedded Ray first kills the coordinator.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_marker(run_name: str) -> Path:
    """A file naming the Ray cluster (GCS address) of a run started on this machine."""
    return cache_dir() / "runs" / f"{run_name}.address"


def _trainer(
    job: JobSpec, run_name: str, workers, per_worker: dict[str, float], data_uri: str, bias_mode: str
) -> RunTrainer:
    """A TorchTrainer for `workers` (a count, or (min, max) for Ray Train's elastic mode) of
    `per_worker` resources. Every trainer of a run has the same RunConfig(name, storage): it
    resumes the run's checkpoints."""
    res = job.resources
    storage_path, storage_fs = Location(job.checkpoint.storage).ray_storage()
    elastic = isinstance(workers, tuple)
    return RunTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            # What the workers write into checkpoints: the job with its credentials masked.
            "job_record": job_record(job),
            "run_name": run_name,
            "data": data_uri,
            "bias_mode": bias_mode,
            "ray_train_info_logs": _worker_logs(),
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu="GPU" in per_worker,
            resources_per_worker=per_worker,
            **({"elastic_resize_monitor_interval_s": res.elastic_resize_interval_s} if elastic else {}),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.keep),
            failure_config=FailureConfig(max_failures=res.max_failures),
            # Ray Train's own INFO lines (each report's whole metrics dict, every worker group
            # start) drown the progress lines wherever worker output reaches the driver.
            logging_config=LoggingConfig(log_level="INFO" if _worker_logs() else "WARNING"),
        ),
    )


def _restart_event(progress: Progress, placement: dict, last_before: dict | None) -> dict:
    """A worker group started again: why, how many steps were lost, how long it took."""
    earlier = progress.events[:-1]  # the last event is `placement` itself
    why = next((e for e in reversed(earlier) if e.get("event") in ("scaling", "failure", "placement")), {})
    last_step = last_before["step"] + 1 if last_before else 0
    cause = "worker failure"
    if why.get("event") == "scaling":  # `moe-ray scale`, or `rebalance`: the same count again
        cause = "rebalance" if why.get("from") == why.get("to") else "scale"
    return {
        "event": "restart",
        "cause": cause,
        "step": placement["step"],
        "world_size": placement.get("world_size"),
        "steps_lost": max(0, last_step - placement["step"]),
        "recovery_s": placement["time"] - (last_before["time"] if last_before else placement["time"]),
        # What failed, as Ray Train's failure policy saw it (failures.UnmendableFailuresStop).
        **({"error": why["error"]} if why.get("event") == "failure" else {}),
    }


def _merge(mine: list[dict], new: list[dict]) -> None:
    """Append step entries; a step seen again (re-run after a restart) replaces the old ones."""
    for entry in new:
        while mine and mine[-1]["step"] >= entry["step"]:
            mine.pop()
        mine.append(entry)


class _Cursor:
    """Where the driver is in the coordinator's append-only lists (reset if the actor restarted)."""

    def __init__(self):
        self.epoch, self.metrics, self.events, self.history = None, 0, 0, 0


def _poll(coordinator, progress: Progress, cursor: _Cursor) -> dict | None:
    try:
        update = ray.get(coordinator.progress.remote(cursor.metrics, cursor.events, cursor.history), timeout=30)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        return None
    if update["epoch"] != cursor.epoch:
        if cursor.epoch is not None:
            # The coordinator restarted: it starts its lists anew. Read them from the start.
            cursor.__init__()
            cursor.epoch = update["epoch"]
            return _poll(coordinator, progress, cursor)
        cursor.epoch = update["epoch"]
    positions = update["positions"]
    cursor.metrics, cursor.events, cursor.history = positions["metrics"], positions["events"], positions["history"]
    before = progress.last
    for ev in update["events"]:
        if ev in progress.events:  # sent again by rank 0 to a restarted coordinator
            continue
        progress.events.append(ev)
        if ev.get("event") == "placement" and any(e.get("event") == "placement" for e in progress.events[:-1]):
            progress.events.append(_restart_event(progress, ev, before))
    _merge(progress.metrics, update["metrics"])
    _merge(progress.history, update["history"])
    progress.max_vio = update["max_vio"] or progress.max_vio
    return update


def _run(
    job: JobSpec, run_name: str, on_progress, poll_s: float, start: float, bias_mode: str, address: str | None
) -> RunResult:
    res = job.resources
    workers = (res.min_workers, res.max_workers) if isinstance(res.workers, WorkerRange) else res.workers
    per_worker = resources_per_worker(job)
    local = address is None  # this machine's Ray: no node can be added to it
    if why := capacity_problem(res.min_workers, per_worker, fewer="lower resources.workers", local=local):
        raise RunError(f"resources.workers: {why}")
    # Raw data on the run's first use: a log line about its preparation every 10 s.
    progress = at_most_every(10.0, lambda p: log.warning("data: preparing, %s", progress_line(p)))
    try:
        data_uri, description = run_dataset(job, run_name, on_progress=progress)
    except KeyboardInterrupt:  # the preparing task was stopped, and removed what it had staged
        raise RunInterrupted.of(job, run_name, None) from None
    log.warning("data: %s", redact(description))
    scale_rule = {**scale_limits(job), "per_worker": per_worker, "local": local}
    # On the driver's node (soft): the node that must live for the run anyway, not a worker
    # node that may be lost (it would survive that too, by restarting and re-seeding).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    coordinator = Coordinator.options(
        name=coordinator_name(run_name), namespace=COORDINATOR_NAMESPACE, scheduling_strategy=here
    ).remote(
        job.model.n_moe_layers, job.model.moe.n_routed_experts, job.balance.model_dump(), job.train.steps, scale_rule
    )
    tracking = RunTracking(job, run_name, address)
    log.warning(tracking.hint())
    progress = Progress(run_name=run_name, total_steps=job.train.steps, started=start)
    cursor = _Cursor()
    try:
        while True:
            with _ray_train_settings(workers):
                outcome = _fit_and_follow(
                    _trainer(job, run_name, workers, per_worker, data_uri, bias_mode),
                    _StartWatch(progress, workers, per_worker),
                    coordinator,
                    progress,
                    cursor,
                    tracking,
                    on_progress,
                    poll_s,
                )
            if "error" in outcome:
                cause = root_cause(outcome["error"])
                if address and "AWS Error ACCESS_DENIED" in cause:  # pyarrow's S3, in Ray Train on the cluster
                    cause += (
                        f" (Ray Train, on the cluster, writing checkpoint.storage {job.checkpoint.storage}: the "
                        "cluster's nodes need S3 access of their own, an instance role or AWS_* variables in their "
                        "environment (exported before `ray start`); moe-ray does not send this machine's credentials)"
                    )
                tracking.finish(None, coordinator, status="FAILED", error=cause)
                raise RunError(f"run {run_name} failed: {cause}") from outcome["error"]
            done = progress.last["step"] + 1 if progress.last else 0
            desired = ray.get(coordinator.desired_workers.remote())
            if desired is None or done >= job.train.steps:
                break
            # `moe-ray scale`: the workers stopped at a step boundary with a checkpoint; a new worker
            # group of the asked size resumes it (same run name and storage, same coordinator).
            workers = desired
            ray.get(coordinator.scale_done.remote())
        result = outcome["result"]
        history = ray.get(coordinator.load_history.remote())
        consistency = ray.get(coordinator.bias_consistency.remote())
        summary = next((e for e in reversed(progress.events) if e.get("event") == "eval"), {})
        last = progress.last or {}
        run_result = RunResult(
            run_name=run_name,
            run_location=str(run_location(job.checkpoint.storage, run_name)),
            checkpoint=result.checkpoint.path if result.checkpoint else None,
            final_step=last.get("step", -1) + 1,
            train_loss=last.get("loss"),
            val_loss=summary.get("val_loss"),
            max_vio_global=summary.get("max_vio_global"),
            progress=progress,
            load_history=history,
            bias_consistency=consistency,
            seconds=time.time() - start,
            mlflow_uri=redact(tracking.uri),
        )
    except KeyboardInterrupt:  # the workers stop with this process's Ray; the run continues by --resume
        tracking.finish(None, coordinator, status="KILLED")
        raise RunInterrupted.of(job, run_name, progress.last["step"] + 1 if progress.last else 0) from None
    except RunError:
        raise  # closed as FAILED above, with its cause
    except BaseException as err:  # the driver's own (the coordinator gone, a callback's): not RUNNING for ever
        cause = f"in the driver: {type(err).__name__}: {root_cause(err)}"
        tracking.finish(None, coordinator, status="FAILED", error=cause)
        raise
    # finish() sends the summary and closes the MLflow run (it creates the run if it had not yet).
    tracking.finish(run_result, coordinator)
    run_result.mlflow_run_id = tracking.tracker.run_id
    return run_result


class _StartWatch:
    """Says why a worker group has not started when Ray Train waits for its resources: other
    runs or jobs hold them. Ray Train itself only logs a traceback each time its startup times
    out, and for a fixed-size group that timeout is raised (see _ray_train_settings)."""

    FIRST_S, EVERY_S = 30.0, 300.0

    def __init__(self, progress: Progress, workers, per_worker: dict[str, float]):
        self.workers = workers[0] if isinstance(workers, tuple) else workers
        self.per_worker = per_worker
        self.placed = self._placements(progress)
        self.next_s = time.time() + self.FIRST_S

    @staticmethod
    def _placements(progress: Progress) -> int:
        return sum(e.get("event") == "placement" for e in progress.events)

    def check(self, progress: Progress) -> None:
        if time.time() < self.next_s or self._placements(progress) > self.placed:
            return
        self.next_s = time.time() + self.FIRST_S
        bundles = {i: self.per_worker for i in range(self.workers)}
        pending = [g for g in ray.util.placement_group_table().values() if g["state"] == "PENDING"]
        if not any({int(i): b for i, b in g["bundles"].items()} == bundles for g in pending):
            return  # placed: the group is loading its state, not waiting
        free, total = ray.available_resources(), ray.cluster_resources()
        short = ", ".join(
            f"{each * self.workers:g} {name} ({free.get(name, 0):g} of the cluster's {total.get(name, 0):g} are free)"
            for name, each in self.per_worker.items()
            if each * self.workers > free.get(name, 0)
        )
        if short:  # else they are being freed (a group that just stopped): look again soon
            self.next_s = time.time() + self.EVERY_S
            log.warning(
                "waiting for resources: %d workers need %s; other runs or jobs hold the rest (ray status shows "
                "them), and the run goes on when they are free",
                self.workers,
                short,
            )


# Ray Train's controller looks at its workers every 2 s by default: a worker group's start and
# end, a worker's failure and a `moe-ray scale` stop were each seen up to 2 s late (a 3-step run
# took ~4 s longer). Each look is one small call per worker.
HEALTH_CHECK_INTERVAL_S = 0.5


@contextmanager
def _ray_train_settings(workers):
    """Ray Train reads these from this process's environment when fit() starts its controller; a
    value the user set wins. The health-check interval: HEALTH_CHECK_INTERVAL_S. The worker group's
    startup timeout: an hour, not 60 s, for a fixed-size group, which waits for its resources
    with each timeout logging a traceback, while _StartWatch says why it waits; an elastic group
    keeps 60 s, after which Ray Train sizes it again from what is free."""
    settings = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(HEALTH_CHECK_INTERVAL_S)}
    if not isinstance(workers, tuple):
        settings["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "3600"
    ours = {name: value for name, value in settings.items() if name not in os.environ}
    os.environ.update(ours)
    try:
        yield
    finally:
        for name in ours:
            os.environ.pop(name, None)


def _fit_and_follow(trainer, watch: _StartWatch, coordinator, progress, cursor, tracking, on_progress, poll_s) -> dict:
    """trainer.fit() in a thread; meanwhile stream progress to the callback and to MLflow."""
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # surfaced in the driver thread
            outcome["error"] = err

    # The callback's first look comes before the workers start (one that fails there starts
    # none); without a poll, which would wait for a new coordinator's process to start.
    if on_progress:
        on_progress(progress)
    thread = threading.Thread(target=fit, name="moe-ray-fit", daemon=True)
    thread.start()
    while True:
        alive = thread.is_alive()
        _poll(coordinator, progress, cursor)
        tracking.update(progress, coordinator)
        if on_progress:
            on_progress(progress)
        watch.check(progress)
        if not alive:
            return outcome
        thread.join(timeout=poll_s)


def request_scale(run_name: str, workers: int) -> dict:
    """Ask a running run (in the Ray cluster this process is connected to) for `workers` workers."""
    return _ask_coordinator(run_name, "request_scale", workers)


def request_rebalance(run_name: str) -> dict:
    """Ask a running run to place its experts by their recent load, from its next step boundary."""
    return _ask_coordinator(run_name, "request_rebalance")


def _ask_coordinator(run_name: str, method: str, *args) -> dict:
    from moe_ray.runtime.coordinator import get_coordinator

    try:
        coordinator = get_coordinator(run_name)
    except ValueError:
        raise RunNotFound(f"no running run named {run_name!r} in this Ray cluster") from None
    try:
        return ray.get(getattr(coordinator, method).remote(*args))
    except ray.exceptions.RayTaskError as err:
        raise RunError(root_cause(err)) from None
