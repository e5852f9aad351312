"""How the workers get each step's bias (DESIGN 5.2, 10): the BiasSource of the Ray workers.

One coordinator call per step for the whole worker group: the per-layer expert counts are summed
over the process group by one all-reduce right after the forward pass, rank 0 sends the sum to
the coordinator without waiting, and after the optimizer step rank 0 takes the reply (the next
bias and any `moe-ray scale` request) and broadcasts it to every rank. All ranks route with the
same bytes by construction, however many workers there are.

Rank 0 also sends its step metrics and events to the coordinator, for the driver to read
(`CoordinatorRecords`); after a coordinator restart it sends the newest of them again.
"""

from __future__ import annotations

from collections import deque

import ray
import torch
import torch.distributed as dist

from moe_ray.balance import next_bias
from moe_ray.runtime.coordinator import BiasMismatch, NeedsSeed, StaleGeneration, bias_digest

# The coordinator answers at once (it waits for no other worker), so a reply this late means it is
# unreachable: fail, and let Ray Train restart the group from its last checkpoint.
COORDINATOR_REPLY_TIMEOUT_S = 600.0
# Sent again to a restarted coordinator: far more steps than pass between two driver polls.
RESENT_RECORDS = 1000


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum over all ranks; moved to the device for NCCL, which cannot reduce CPU tensors."""
    moved = t.to(device)
    dist.all_reduce(moved)
    return moved.cpu()


class CoordinatorRecords:
    """Rank 0's step metrics and events, on their way to the driver through the coordinator.

    A coordinator that restarts has lost the entries the driver had not read yet, so the newest
    `RESENT_RECORDS` are kept here and sent again when it is re-seeded; the driver keeps each step
    and each event once, so an entry it had read already changes nothing."""

    def __init__(self, coordinator, keep: int = RESENT_RECORDS):
        self.coordinator = coordinator
        self.recent: deque[dict] = deque(maxlen=keep)
        self.last = None  # the previous send: the next one runs after it

    def send(self, entry: dict, wait: bool = False) -> None:
        self.recent.append(entry)
        # The coordinator is an async actor, which may start calls in any order (they did swap
        # under load): each call waits on the previous one's result, which Ray resolves first.
        self.last = self.coordinator.record.remote(entry, after=self.last)
        if wait:
            ray.get(self.last)

    def resend(self) -> None:
        self.last = self.coordinator.record.remote(*self.recent)
        ray.get(self.last, timeout=COORDINATOR_REPLY_TIMEOUT_S)


class CoordinatorBias:
    """BiasSource over the coordinator actor: one all-reduce, one actor call (rank 0), one broadcast.
    `records` (rank 0's) are sent again when the coordinator turns out to have restarted."""

    def __init__(
        self,
        coordinator,
        generation: int,
        rank: int,
        world_size: int,
        model,
        device: torch.device,
        records: CoordinatorRecords | None = None,
    ):
        self.coordinator, self.generation, self.rank, self.model = coordinator, generation, rank, model
        self.records = records
        self.world_size, self.device = world_size, device
        self.shape = tuple(model.get_expert_bias().shape)  # (MoE layers, experts)
        self.pending = None
        self.counts = None
        self.desired_workers = None  # set when `moe-ray scale` asks for another worker count

    def submit(self, step: int, counts: torch.Tensor) -> None:
        total = all_reduce_sum(counts.to(torch.int64), self.device)
        if self.rank == 0:
            self.counts = total.numpy()
            digest = bias_digest(self.model.get_expert_bias().cpu())  # the bias this step routed with
            self.pending = self.coordinator.exchange.remote(self.generation, step, self.counts, digest)

    def next_bias(self, step: int) -> torch.Tensor:
        # [version, desired workers (0: no change), bias...] in float64: exact for fp32 and ints.
        message = torch.zeros(2 + self.shape[0] * self.shape[1], dtype=torch.float64, device=self.device)
        if self.rank == 0:
            try:
                version, bias, desired = self._reply(step)
            except BaseException:
                message[0] = -1  # tell the other ranks, so they fail now instead of waiting
                dist.broadcast(message, src=0)
                raise
            message[0], message[1] = version, desired or 0
            message[2:] = torch.tensor(bias, dtype=message.dtype, device=message.device).flatten()
        dist.broadcast(message, src=0)
        version, desired = (int(v) for v in message[:2].tolist())
        if version < 0:
            raise RuntimeError(f"rank 0 got no bias for step {step + 1} from the coordinator (see rank 0's error)")
        if version != step + 1:
            raise RuntimeError(f"coordinator returned bias version {version} for step {step + 1}")
        self.desired_workers = desired or None
        return message[2:].to(torch.float32).view(self.shape).cpu()

    def _reply(self, step: int):
        try:
            return ray.get(self.pending, timeout=COORDINATOR_REPLY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"no bias for step {step + 1} after {COORDINATOR_REPLY_TIMEOUT_S:.0f} s: the coordinator did not answer"
            ) from None
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, StaleGeneration):
                raise RuntimeError(f"the coordinator moved on to a new worker group: {err.cause}") from None
            if isinstance(err.cause, BiasMismatch):
                raise RuntimeError(str(err.cause)) from None
            if not isinstance(err.cause, NeedsSeed):
                raise
        # The coordinator restarted: seed it with the bias this step routed with, give it back the
        # records the driver may not have read, then send the counts again, under the same time
        # limit as any reply.
        bias_now = self.model.get_expert_bias().cpu().numpy()
        ray.get(
            self.coordinator.reseed.remote(self.generation, step, self.world_size, bias_now),
            timeout=COORDINATOR_REPLY_TIMEOUT_S,
        )
        if self.records is not None:
            self.records.resend()
        self.pending = self.coordinator.exchange.remote(self.generation, step, self.counts, bias_digest(bias_now))
        return self._reply(step)


class AllReduceBias:
    """Diagnostic alternative to the coordinator (used by bench/coordinator.py to price the
    round trip): all-reduce the counts and apply the bias rule on every rank."""

    def __init__(self, model, balance, total_steps: int, device):
        self.bias, self.balance, self.total, self.device = model.get_expert_bias().cpu(), balance, total_steps, device
        self.counts = None
        self.desired_workers = None

    def submit(self, step: int, counts: torch.Tensor) -> None:
        self.counts = all_reduce_sum(counts.to(torch.int64), self.device)

    def next_bias(self, step: int) -> torch.Tensor:
        self.bias = next_bias(self.balance, self.bias, self.counts, step, self.total)
        return self.bias
