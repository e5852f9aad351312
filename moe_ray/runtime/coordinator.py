"""The coordinator (DESIGN 5.1, 5.2): one async Ray actor per run, the single source of truth
for the balance bias b.

Every worker sends its per-layer expert counts right after its forward pass in a call whose
answer is the bias of the next step; it only waits for that answer after its optimizer step.
When the last worker's counts of a step arrive, the coordinator sums them and applies the bias
rule (DESIGN 3.1) once, so every worker routes the next step with exactly the same bias.
An async actor is required: a bias request waits for the other workers' counts without
blocking them.

Workers of one worker-group start share a `generation`; counts from an older generation (a
worker group that was torn down) are ignored.

The coordinator lives outside the worker group, so it survives worker restarts. It is itself
restartable (Ray restarts the actor and retries the calls in flight): a fresh coordinator
knows no generation, answers the first exchange with NeedsSeed, and the workers re-seed it
with the bias they all routed with (checked by digest) before exchanging again.

Lists the driver reads (metrics, events, load history) only grow; the driver drops repeated
steps after a restart. `epoch` changes when the actor itself restarts.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import ray
import torch

from moe_ray.balance import bias_update_speed, max_violation, update_bias
from moe_ray.config import BalanceConfig


def bias_digest(bias) -> str:
    """A short fingerprint of a bias tensor's exact bytes: equal digests, identical biases."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(np.asarray(bias, dtype=np.float32)).tobytes()).hexdigest()[:16]


class StaleGeneration(Exception):
    """The caller belongs to a worker group the coordinator no longer serves."""


class NeedsSeed(Exception):
    """A restarted coordinator that has not yet been given the bias: call `reseed` first."""


class CoordinatorState:
    """Plain-Python core of the coordinator, usable (and tested) without Ray."""

    def __init__(self, n_layers: int, n_experts: int, balance: dict, total_steps: int):
        self.balance = BalanceConfig.model_validate(balance)
        self.total_steps = total_steps
        self.bias = torch.zeros(n_layers, n_experts, dtype=torch.float32)
        self.bias_version = 0  # the step this bias is for
        self.recent: dict[int, torch.Tensor] = {0: self.bias}  # version -> bias, the last few
        self.epoch = uuid.uuid4().hex  # new after an actor restart
        self.generation = 0
        self.world_size = 0
        self.pending: dict[int, dict[int, np.ndarray]] = {}
        self.done: dict[int, asyncio.Event] = {}
        self.load_history: list[dict] = []  # per step: summed counts, MaxVio per layer, bias range
        self.metrics: list[dict] = []  # rank 0's step metrics
        self.events: list[dict] = []  # starts, restarts, evaluations, checkpoints
        self.desired_workers: int | None = None
        # The worker count asked for when each step's counts were complete: fixed then, so every
        # worker of that step gets the same answer however late its reply is sent.
        self.scale_for: dict[int, int | None] = {}
        # Every worker reports the digest of the bias it routed with; all must equal ours.
        self.digests: dict[int, set[str]] = {}
        self.bias_checks = 0
        self.bias_mismatches: list[dict] = []

    def begin(self, step: int, world_size: int, bias: np.ndarray | None) -> int:
        """A worker group (re)starts at `step`; `bias` is the bias its checkpoint holds."""
        self.generation += 1
        self.world_size = world_size
        if bias is not None:
            self.bias = torch.as_tensor(np.asarray(bias), dtype=torch.float32).clone()
        self.bias_version = step
        self.recent = {step: self.bias}
        self.scale_for.clear()
        self.pending.clear()
        self.digests.clear()
        for ev in self.done.values():
            ev.set()  # release any waiter of the old generation; it will see the new generation
        self.done.clear()
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
        with. Every worker calls it; the first one seeds, the others must agree."""
        bias = torch.as_tensor(np.asarray(bias), dtype=torch.float32).clone()
        if self.generation != generation:
            self.generation, self.world_size = generation, world_size
            self.bias, self.bias_version, self.recent = bias, step, {step: bias}
            self.events.append({"event": "coordinator_restart", "step": step, "time": time.time()})
        elif step in self.recent and bias_digest(self.recent[step]) != bias_digest(bias):
            self.bias_mismatches.append({"step": step, "reseed": True})
        return bias_digest(self.recent.get(step, bias))

    def deduped_history(self) -> list[dict]:
        """The load history with each step once (the latest run of a step after a restart)."""
        latest = {h["step"]: h for h in self.load_history}
        return [latest[s] for s in sorted(latest)]

    def _event(self, step: int) -> asyncio.Event:
        return self.done.setdefault(step, asyncio.Event())

    def submit_counts(
        self, generation: int, step: int, rank: int, counts: np.ndarray, digest: str | None = None
    ) -> None:
        if self.generation == 0 and generation > 0:
            raise NeedsSeed("the coordinator restarted and has no bias yet")
        if generation != self.generation:
            return  # a worker of a torn-down group
        got = self.pending.setdefault(step, {})
        got[rank] = np.asarray(counts, dtype=np.int64)
        if digest is not None:
            self.digests.setdefault(step, set()).add(digest)
        if len(got) == self.world_size:
            seen = self.digests.pop(step, set())
            if seen:
                self.bias_checks += 1
                expected = bias_digest(self.recent[step]) if step in self.recent else None
                if seen != {expected}:
                    self.bias_mismatches.append({"step": step, "seen": sorted(seen), "expected": expected})
            total = torch.from_numpy(sum(got.values()))
            gamma = bias_update_speed(self.balance, step, self.total_steps)
            self.bias = update_bias(self.bias, total, gamma)
            self.bias_version = step + 1
            self.recent[step + 1] = self.bias
            self.recent.pop(step - 3, None)
            self.scale_for[step + 1] = self.desired_workers
            self.scale_for.pop(step - 3, None)
            vio = max_violation(total)
            self.load_history.append(
                {
                    "step": step,
                    "counts": total.numpy(),
                    "max_vio": vio.tolist(),
                    "bias": self.bias.numpy().copy(),  # the bias for step + 1
                    "bias_min": self.bias.min(dim=-1).values.tolist(),
                    "bias_max": self.bias.max(dim=-1).values.tolist(),
                }
            )
            del self.pending[step]
            self._event(step).set()

    async def get_bias(self, generation: int, step: int) -> tuple[int, np.ndarray, int | None]:
        """The bias for step + 1, once every worker's counts of `step` are in, and the worker count
        `moe-ray scale` had asked for at that moment (None: no change)."""
        if generation != self.generation:
            raise StaleGeneration(f"generation {generation} is over (now {self.generation})")
        if self.bias_version <= step:
            await self._event(step).wait()
            if generation != self.generation:
                raise StaleGeneration(f"generation {generation} ended while waiting")
        self.done.pop(step, None)
        return step + 1, self.recent[step + 1].numpy().copy(), self.scale_for.get(step + 1)


COORDINATOR_NAMESPACE = "moe-ray"


# Restartable: Ray brings it back after a crash and retries the calls that were in flight.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Coordinator:
    """Ray actor around CoordinatorState. Async: a `get_bias` waits without blocking the others."""

    def __init__(self, n_layers: int, n_experts: int, balance: dict, total_steps: int, scale_rule: dict | None = None):
        self.state = CoordinatorState(n_layers, n_experts, balance, total_steps)
        # What `moe-ray scale` may ask for: at most `max` workers, a multiple of `ep_size` if set;
        # nothing for an elastic run (`elastic`: its (min, max)).
        self.scale_rule = scale_rule or {"max": n_experts, "ep_size": None}

    async def begin(self, step: int, world_size: int, bias: np.ndarray | None) -> int:
        return self.state.begin(step, world_size, bias)

    async def exchange(
        self, generation: int, step: int, rank: int, counts: np.ndarray, digest: str | None = None
    ) -> tuple[int, np.ndarray, int | None]:
        """A worker's counts of `step` in; out, once every worker's counts are in: the bias for
        step + 1 and the worker count asked for by `moe-ray scale` (None: no change). One call
        per worker and step: the reply is the only wait."""
        self.state.submit_counts(generation, step, rank, counts, digest)
        return await self.state.get_bias(generation, step)

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
        self.state.desired_workers = workers
        self.state.events.append({"event": "scale_requested", "workers": workers, "time": time.time()})
        return {"world_size": self.state.world_size, "workers": workers}

    async def scale_done(self) -> None:
        self.state.desired_workers = None

    async def desired_workers(self) -> int | None:
        return self.state.desired_workers

    async def pid(self) -> int:
        import os

        return os.getpid()

    async def current_bias(self) -> tuple[int, np.ndarray]:
        return self.state.bias_version, self.state.bias.numpy().copy()

    async def record(self, entry: dict) -> None:
        """Rank 0's metrics of a step, or an event (eval, checkpoint) when it has an 'event' key."""
        (self.state.events if "event" in entry else self.state.metrics).append(entry)

    async def progress(self, metrics_from: int, events_from: int, history_from: int = 0) -> dict:
        s = self.state
        light = ("step", "max_vio", "bias_min", "bias_max")
        return {
            "epoch": s.epoch,
            "desired_workers": s.desired_workers,
            "metrics": s.metrics[metrics_from:],
            "events": s.events[events_from:],
            "history": [{k: h[k] for k in light} for h in s.load_history[history_from:]],
            "bias_version": s.bias_version,
            "max_vio": s.load_history[-1]["max_vio"] if s.load_history else None,
        }

    async def load_history(self, max_points: int | None = None) -> list[dict]:
        """The per-step load history; with `max_points`, every k-th step so at most that many."""
        h = self.state.deduped_history()
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
