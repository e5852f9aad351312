"""The coordinator (DESIGN 5.1, 5.2, 10): one Ray actor per run, the single source of truth for
the balance bias b, its schedule and the load history.

One call per step, whatever the worker count: the workers sum their per-layer expert counts over
the process group (one all-reduce), rank 0 sends the sum in a call whose answer is the bias of the
next step, and rank 0 broadcasts that answer to every rank. So every rank routes with the same
bytes by construction; rank 0 also reports the digest of the bias it routed with, which must be
the coordinator's own.

Workers of one worker-group start share a `generation`; a call from an older generation (a
worker group that was torn down) is refused.

The coordinator lives outside the worker group, so it survives worker restarts. It is itself
restartable (Ray restarts the actor and retries the call in flight): a fresh coordinator knows
no generation, answers the first exchange with NeedsSeed, and rank 0 re-seeds it with the bias
the group routed with before exchanging again.

Memory stays bounded over any number of steps: the step metrics and per-step balance figures the
driver reads are kept for the last `RECENT_STEPS` steps (readers keep absolute positions), and the
full per-step counts and biases are a reservoir of at most `HISTORY_POINTS` steps that thins
itself to every 2nd, 4th, ... step as the run grows. `epoch` changes when the actor restarts.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import ray
import torch

from moe_ray.balance import max_violation, next_bias
from moe_ray.config import BalanceConfig
from moe_ray.parallel.placement import ExpertPlacement, balanced_orders
from moe_ray.runtime.cluster import capacity_problem

RECENT_STEPS = 10_000  # step metrics and balance figures kept for the driver to read
HISTORY_POINTS = 512  # full per-step load records kept (heatmaps, the study, tests)
LOAD_HORIZON_STEPS = 50  # the recent load a balanced placement packs: an average over ~this many steps


def _copy_in(array, dtype) -> torch.Tensor:
    """A tensor of its own from an array that arrived by Ray (read-only: torch.as_tensor warns)."""
    return torch.tensor(np.asarray(array, dtype=dtype))


def bias_digest(bias) -> str:
    """A short fingerprint of a bias tensor's exact bytes: equal digests, identical biases."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(np.asarray(bias, dtype=np.float32)).tobytes()).hexdigest()[:16]


class StaleGeneration(Exception):
    """The caller belongs to a worker group the coordinator no longer serves."""


class NeedsSeed(Exception):
    """A restarted coordinator that has not yet been given the bias: call `reseed` first."""


class BiasMismatch(Exception):
    """The workers routed with another bias than the coordinator's: the run cannot go on, since
    its balance state is no longer one thing. Every later call of the run gets this too."""


class RecentLog:
    """An append-only log that keeps its newest `keep` entries; readers address entries by their
    absolute position, so dropping old ones never shifts what a reader sees next."""

    def __init__(self, keep: int = RECENT_STEPS):
        self.keep, self.dropped, self.items = keep, 0, []

    def append(self, item) -> None:
        self.items.append(item)
        if len(self.items) > 2 * self.keep:  # trim in bulk: amortised O(1) per append
            cut = len(self.items) - self.keep
            del self.items[:cut]
            self.dropped += cut

    def since(self, position: int) -> list:
        return self.items[max(0, position - self.dropped) :]

    def __len__(self) -> int:
        return self.dropped + len(self.items)


class ThinningHistory:
    """Per-step records at most `points` at a time: when full, every other record goes and only
    steps on the doubled stride are taken from then on, so the records span the whole run evenly."""

    def __init__(self, points: int = HISTORY_POINTS):
        self.points, self.stride, self.records = points, 1, []

    def add(self, record: dict) -> None:
        if record["step"] % self.stride:
            return
        self.records.append(record)
        if len(self.records) > self.points:
            self.stride *= 2
            self.records = [r for r in self.records if r["step"] % self.stride == 0]

    def latest_per_step(self) -> list[dict]:
        """Each step once (the latest run of a step after a restart), in step order."""
        latest = {r["step"]: r for r in self.records}
        return [latest[s] for s in sorted(latest)]


class CoordinatorState:
    """Plain-Python core of the coordinator, usable (and tested) without Ray."""

    def __init__(self, n_layers: int, n_experts: int, balance: dict, total_steps: int):
        self.balance = BalanceConfig.model_validate(balance)
        self.total_steps = total_steps
        self.bias = torch.zeros(n_layers, n_experts, dtype=torch.float32)
        self.bias_version = 0  # the step this bias is for
        self.recent: dict[int, torch.Tensor] = {0: self.bias}  # version -> bias, the last few
        self.replies: dict[int, tuple] = {}  # step -> its reply, for a call that is retried
        self.epoch = uuid.uuid4().hex  # new after an actor restart
        self.generation = 0
        self.world_size = 0
        self.history = ThinningHistory()  # summed counts and bias of each step
        self.balance_log = RecentLog()  # per step: MaxVio and bias range per layer (small)
        self.metrics = RecentLog()  # rank 0's step metrics
        self.events: list[dict] = []  # starts, restarts, evaluations, checkpoints (a few per run)
        self.desired_workers: int | None = None
        self.recent_load: torch.Tensor | None = None  # (layers, experts) moving average of global counts
        self.load_steps = 0
        self.rebalance_requested = False
        self.bias_checks = 0
        self.bias_mismatches: list[dict] = []
        self.fatal: str | None = None  # set by a bias mismatch: the run stops

    def _refuse_if_fatal(self) -> None:
        if self.fatal:
            raise BiasMismatch(self.fatal)

    def begin(self, step: int, world_size: int, bias: np.ndarray | None) -> int:
        """A worker group (re)starts at `step`; `bias` is the bias its checkpoint holds."""
        self._refuse_if_fatal()
        self.generation += 1
        self.world_size = world_size
        if bias is not None:
            self.bias = _copy_in(bias, np.float32)
        self.bias_version = step
        self.recent = {step: self.bias}
        self.replies.clear()
        self.events.append(
            {
                "event": "start",
                "step": step,
                "world_size": world_size,
                "time": time.time(),
                "generation": self.generation,
            }
        )
        return self.generation

    def reseed(self, generation: int, step: int, world_size: int, bias: np.ndarray) -> str:
        """After an actor restart: adopt the workers' generation and the bias they routed `step`
        with (rank 0 sends it; every rank holds the same, by broadcast)."""
        bias = _copy_in(bias, np.float32)
        if self.generation != generation:
            self.generation, self.world_size = generation, world_size
            self.bias, self.bias_version, self.recent = bias, step, {step: bias}
            self.replies.clear()
            self.events.append({"event": "coordinator_restart", "step": step, "time": time.time()})
        elif step in self.recent and bias_digest(self.recent[step]) != bias_digest(bias):
            self.bias_mismatches.append({"step": step, "reseed": True})
            self.fatal = f"after a coordinator restart the workers' bias for step {step} differs from the coordinator's"
            raise BiasMismatch(self.fatal)
        return bias_digest(self.recent.get(step, bias))

    def exchange(
        self, generation: int, step: int, counts: np.ndarray, digest: str | None = None
    ) -> tuple[int, np.ndarray, int | None]:
        """The group's summed counts of `step` in; out: the bias for step + 1 and the worker count
        `moe-ray scale` asks for (None: no change), fixed in this one reply for every rank."""
        self._refuse_if_fatal()
        if self.generation == 0 and generation > 0:
            raise NeedsSeed("the coordinator restarted and has no bias yet")
        if generation != self.generation:
            raise StaleGeneration(f"generation {generation} is over (now {self.generation})")
        if step in self.replies:  # the same call again (retried after a lost reply)
            return self.replies[step]
        if step != self.bias_version:
            raise RuntimeError(f"counts of step {step} arrived, the coordinator's bias is for step {self.bias_version}")
        if digest is not None:
            self.bias_checks += 1
            expected = bias_digest(self.bias)
            if digest != expected:
                self.bias_mismatches.append({"step": step, "seen": digest, "expected": expected})
                self.fatal = (
                    f"the workers routed step {step} with a bias (digest {digest}) other than the coordinator's "
                    f"({expected}): the balance state is inconsistent, so the run stops. Resume it from its last "
                    "checkpoint (moe-ray run JOB --resume), which restores one bias for every worker"
                )
                self.events.append({"event": "bias_mismatch", "step": step, "time": time.time()})
                raise BiasMismatch(self.fatal)
        total = _copy_in(counts, np.int64)
        self.load_steps += 1
        if self.recent_load is None:
            self.recent_load = total.to(torch.float64)
        else:  # the plain mean of the steps so far until there are LOAD_HORIZON_STEPS, then a moving average
            self.recent_load.lerp_(total.to(torch.float64), 1.0 / min(self.load_steps, LOAD_HORIZON_STEPS))
        self.bias = next_bias(self.balance, self.bias, total, step, self.total_steps)
        self.bias_version = step + 1
        self.recent[step + 1] = self.bias
        self.recent.pop(step - 3, None)
        vio = max_violation(total)
        figures = {
            "step": step,
            "max_vio": vio.tolist(),
            "bias_min": self.bias.min(dim=-1).values.tolist(),
            "bias_max": self.bias.max(dim=-1).values.tolist(),
        }
        self.balance_log.append(figures)
        # the bias in the record is the one for step + 1
        self.history.add(figures | {"counts": total.numpy(), "bias": self.bias.numpy().copy()})
        reply = (step + 1, self.bias.numpy().copy(), self.desired_workers)
        self.replies = {step: reply}
        return reply

    def plan_placement(self, n_experts: int, ep_size: int, node_of_rank: list[int], node_limited: bool) -> dict:
        """The expert placement of a worker group that is starting: contiguous blocks, or (when the
        job asks for `balanced`, or `moe-ray rebalance` did) per-layer orders packed from the recent
        load. Returns the orders (None: contiguous) and the per-rank load imbalance (max/mean,
        mean over layers) the recent load would give with contiguous blocks and with this plan."""
        contiguous = ExpertPlacement(n_experts, ep_size, tuple(node_of_rank))
        wanted = self.balance.placement == "balanced" or self.rebalance_requested
        load = self.recent_load
        orders = None
        if wanted and load is not None:
            nodes = list(node_of_rank[:ep_size]) if node_limited else None
            orders = balanced_orders(load, contiguous.block_sizes, nodes)
        if self.rebalance_requested and self.desired_workers == len(node_of_rank):
            # Done by this start (a group that Ray Train restarted after a failure, before the
            # old one could stop for it): the new group must not stop again for it.
            self.desired_workers = None
        self.rebalance_requested = False
        plan = {"orders": [list(o) for o in orders] if orders else None}
        if load is not None:
            chosen = ExpertPlacement(n_experts, ep_size, tuple(node_of_rank), orders)
            plan["expected_imbalance"] = {
                "contiguous": rank_imbalance(contiguous.rank_loads(load)),
                "planned": rank_imbalance(chosen.rank_loads(load)),
            }
        return plan


def rank_imbalance(rank_loads: torch.Tensor) -> float:
    """max/mean of the per-rank loads (layers, ranks), averaged over layers: 1.0 is even."""
    loads = torch.as_tensor(rank_loads, dtype=torch.float64)
    return float((loads.max(dim=-1).values / loads.mean(dim=-1).clamp_min(1e-12)).mean())


COORDINATOR_NAMESPACE = "moe-ray"


# Restartable: Ray brings it back after a crash and retries the calls that were in flight.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Coordinator:
    """Ray actor around CoordinatorState (async, so the driver's polls never queue behind a step)."""

    def __init__(self, n_layers: int, n_experts: int, balance: dict, total_steps: int, scale_rule: dict | None = None):
        self.state = CoordinatorState(n_layers, n_experts, balance, total_steps)
        # What `moe-ray scale` may ask for: at most `max` workers, a multiple of `ep_size` if set;
        # nothing for an elastic run (`elastic`: its (min, max)).
        self.scale_rule = scale_rule or {"max": n_experts, "ep_size": None}

    async def begin(self, step: int, world_size: int, bias: np.ndarray | None) -> int:
        return self.state.begin(step, world_size, bias)

    async def exchange(
        self, generation: int, step: int, counts: np.ndarray, digest: str | None = None
    ) -> tuple[int, np.ndarray, int | None]:
        """The worker group's summed counts of `step` in (from rank 0); out: the bias for step + 1
        and the worker count asked for by `moe-ray scale` (None: no change)."""
        return self.state.exchange(generation, step, counts, digest)

    async def reseed(self, generation: int, step: int, world_size: int, bias: np.ndarray) -> str:
        return self.state.reseed(generation, step, world_size, bias)

    async def request_scale(self, workers: int) -> dict:
        """Ask the run to continue with `workers` workers from its next step boundary."""
        rule = self.scale_rule
        if rule.get("elastic"):
            low, high = rule["elastic"]
            raise ValueError(
                f"this run is elastic (resources.workers {low} to {high}): Ray Train grows and shrinks it "
                "with the cluster; moe-ray scale changes runs with a fixed worker count"
            )
        if not 1 <= workers <= rule["max"]:
            raise ValueError(
                f"cannot scale to {workers} workers: this job allows 1 to {rule['max']} "
                "(no more workers than routed experts, nor than sequences per step)"
            )
        if rule["ep_size"] and workers % rule["ep_size"]:
            raise ValueError(f"cannot scale to {workers} workers: resources.ep_size={rule['ep_size']} must divide it")
        if workers > self.state.world_size and (
            why := capacity_problem(workers, rule.get("per_worker", {}), "scale to fewer", rule.get("local", False))
        ):
            raise ValueError(f"cannot scale to {workers} workers: {why}")
        if workers == self.state.world_size:
            return {"world_size": self.state.world_size, "workers": workers, "unchanged": True}
        self.state.desired_workers = workers
        self.state.events.append({"event": "scale_requested", "workers": workers, "time": time.time()})
        return {"world_size": self.state.world_size, "workers": workers}

    async def request_rebalance(self) -> dict:
        """Restart the worker group at its next step boundary with a placement packed from the
        recent load (`moe-ray rebalance`): same worker count, a checkpoint in between."""
        s = self.state
        if s.recent_load is None:
            raise ValueError("the run has no expert loads yet: rebalance once it has taken some steps")
        if self.scale_rule.get("elastic"):
            raise ValueError(
                "this run is elastic: its worker group restarts whenever the cluster changes; set "
                "balance.placement: balanced in the job to place experts by load at every restart"
            )
        s.rebalance_requested = True
        if s.desired_workers is None:  # a pending `scale` restarts the group anyway, and rebalances it
            s.desired_workers = s.world_size
        s.events.append({"event": "rebalance_requested", "time": time.time()})
        return {"world_size": s.world_size}

    async def plan_placement(self, n_experts: int, ep_size: int, node_of_rank: list[int], node_limited: bool) -> dict:
        return self.state.plan_placement(n_experts, ep_size, node_of_rank, node_limited)

    async def scale_done(self) -> None:
        self.state.desired_workers = None

    async def desired_workers(self) -> int | None:
        return self.state.desired_workers

    async def pid(self) -> int:
        import os

        return os.getpid()

    async def current_bias(self) -> tuple[int, np.ndarray]:
        return self.state.bias_version, self.state.bias.numpy().copy()

    async def record(self, *entries: dict, after=None) -> None:
        """Rank 0's metrics of a step, or an event (eval, checkpoint) when it has an 'event' key;
        several at once when rank 0 sends its newest again after a restart of this actor.
        `after` is the previous record call, which Ray has run before this one starts."""
        for entry in entries:
            (self.state.events if "event" in entry else self.state.metrics).append(entry)

    async def progress(self, metrics_from: int, events_from: int, history_from: int = 0) -> dict:
        """What the driver has not read yet: positions count every entry ever recorded."""
        s = self.state
        latest = s.balance_log.items[-1:] if s.balance_log.items else None
        return {
            "epoch": s.epoch,
            "desired_workers": s.desired_workers,
            "metrics": s.metrics.since(metrics_from),
            "events": s.events[events_from:],
            "history": s.balance_log.since(history_from),
            "positions": {"metrics": len(s.metrics), "events": len(s.events), "history": len(s.balance_log)},
            "bias_version": s.bias_version,
            "max_vio": latest[0]["max_vio"] if latest else None,
        }

    async def load_history(self, max_points: int | None = None) -> list[dict]:
        """The per-step load records (every step of a short run; evenly thinned over a long one);
        with `max_points`, every k-th record so at most that many."""
        h = self.state.history.latest_per_step()
        if max_points and len(h) > max_points:
            stride = -(-len(h) // max_points)
            h = h[::stride]
        return h

    async def bias_consistency(self) -> dict:
        """How many steps had every worker's bias checked, and any step where they differed."""
        return {"checked": self.state.bias_checks, "mismatches": self.state.bias_mismatches}

    async def ping(self) -> bool:
        return True


def coordinator_name(run_name: str) -> str:
    return f"moe-ray-coordinator:{run_name}"


def get_coordinator(run_name: str):
    """The live coordinator of a run, from any process connected to the run's Ray cluster."""
    return ray.get_actor(coordinator_name(run_name), namespace=COORDINATOR_NAMESPACE)
