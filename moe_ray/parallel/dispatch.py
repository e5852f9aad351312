"""Expert-parallel token dispatch (DESIGN 5.2): rows go to the ranks that own their experts by
`all_to_all_single` (the only all-to-all gloo supports) and come back the same way.

Both all-to-alls are autograd functions whose backward is the reverse all-to-all, so every rank
takes part in the same collectives forward and backward, including a rank that sends or
receives no rows at all. The dispatch is started asynchronously and the shared experts are
computed while it is in flight, in the backward pass as well (DESIGN 14).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from moe_ray.model.experts import GroupedExperts
from moe_ray.model.permutation import inverse_permutation, permute_rows

T = TypeVar("T")


class WaitClock:
    """Seconds this rank spent blocked in the dispatcher's all-to-alls (forward and backward),
    for the step's time breakdown. Host time: on a GPU it is when the host waited."""

    def __init__(self):
        self.seconds = 0.0

    def run(self, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds += time.perf_counter() - start


class AllToAll(torch.autograd.Function):
    """x split by `send` row counts -> rows received from every rank, `recv` counts each."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group, clock: WaitClock):
        ctx.send, ctx.recv, ctx.group, ctx.clock = send, recv, group, clock
        out = x.new_empty((sum(recv), *x.shape[1:]))
        clock.run(lambda: dist.all_to_all_single(out, x.contiguous(), recv, send, group=group))
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        ctx.clock.run(lambda: dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group))
        return back, None, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group, clock: WaitClock) -> torch.Tensor:
    return AllToAll.apply(x, send, recv, group, clock)


class _InFlight:
    """An all-to-all started by _Start and waited for by _Finish (or, backward, the reverse)."""

    def __init__(self, clock: WaitClock):
        self.clock, self.work, self.back = clock, None, None

    def wait(self) -> None:
        self.clock.run(self.work.wait)
        self.work = None


class _Start(torch.autograd.Function):
    """Starts the all-to-all and returns its output buffer, to be filled by the time _Finish
    has waited; backward waits for the reverse all-to-all that _Finish's backward started."""

    @staticmethod
    def forward(ctx, x, send, recv, group, flight: _InFlight):
        ctx.flight = flight
        out = x.new_empty((sum(recv), *x.shape[1:]))
        flight.work = dist.all_to_all_single(out, x.contiguous(), recv, send, group=group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, grad):
        ctx.flight.wait()  # `grad` is _Finish's pass-through; the rows' gradient came back meanwhile
        back, ctx.flight.back = ctx.flight.back, None
        return back, None, None, None, None


class _Finish(torch.autograd.Function):
    """Waits for the all-to-all; backward starts the reverse one (the gradient of _Start's input)."""

    @staticmethod
    def forward(ctx, y, send, recv, group, flight: _InFlight):
        ctx.send, ctx.recv, ctx.group, ctx.flight = send, recv, group, flight
        flight.wait()
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        flight = ctx.flight
        flight.back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        flight.work = dist.all_to_all_single(
            flight.back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group, async_op=True
        )
        return grad, None, None, None, None  # collected by _Start's backward, which returns `back`


def all_to_all_overlapped(
    x: torch.Tensor, send: list[int], recv: list[int], group, clock: WaitClock, during: Callable[[], T]
) -> tuple[torch.Tensor, T]:
    """(all_to_all(x), during()), with `during` computed while the rows are in flight, forward
    AND backward: its autograd nodes are created between _Start's and _Finish's, and the engine
    runs ready nodes newest first, so the backward goes _Finish (starts the reverse all-to-all)
    -> `during`'s backward -> _Start (waits). Megatron-Core's shared-expert overlap."""
    flight = _InFlight(clock)
    y = _Start.apply(x, send, recv, group, flight)
    result = during()
    return _Finish.apply(y, send, recv, group, flight), result


class ExpertParallelDispatcher:
    """Implements the TokenDispatcher protocol of moe_ray.model.moe across an EP group."""

    def __init__(self, group, block_sizes: list[int], ep_rank: int, overlap: bool = True):
        self.group = group
        self.overlap = overlap  # compute the shared experts while the dispatch is in flight
        self.block_sizes = block_sizes  # experts held by each EP rank: consecutive in the layer's expert order
        self.n_local = block_sizes[ep_rank]
        self.bytes_moved = 0  # activation bytes this rank sent to OTHER ranks, forward + backward
        self.rows_in = 0  # rows this rank's experts computed (its load: stragglers wait at the all-to-all)
        self.clock = WaitClock()  # time blocked in all-to-alls, read and reset by the worker each step
        self._block_ends: torch.Tensor | None = None  # last expert of each block, on the device

    def block_ends(self, device: torch.device) -> torch.Tensor:
        # Made once: a host-to-device copy of a Python list makes the host wait for the GPU.
        if self._block_ends is None or self._block_ends.device != device:
            self._block_ends = torch.tensor(self.block_sizes).cumsum(0).sub_(1).to(device)
        return self._block_ends

    def __call__(
        self,
        rows: torch.Tensor,
        gates: torch.Tensor,
        counts: torch.Tensor,
        experts: GroupedExperts,
        overlap: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ep, n_local = len(self.block_sizes), self.n_local
        # My rows per expert, split by owner; exchanged so that counts_from[r, e] says how many
        # rows EP rank r sends me for my local expert e.
        counts_from = torch.empty(ep * n_local, dtype=counts.dtype, device=counts.device)
        self.clock.run(
            lambda: dist.all_to_all_single(
                counts_from, counts.contiguous(), [n_local] * ep, self.block_sizes, group=self.group
            )
        )
        counts_from = counts_from.view(ep, n_local)
        # Rows to and from each rank, brought to the host together: the dispatch's one sync.
        send_to = torch.diff(counts.cumsum(0)[self.block_ends(counts.device)], prepend=counts.new_zeros(1))
        sizes = torch.cat([send_to, counts_from.sum(dim=1)]).tolist()
        send, recv = sizes[:ep], sizes[ep:]
        # Gates ride along as one more column: one collective instead of two, both ways.
        payload = torch.cat([rows, gates.unsqueeze(1).to(rows.dtype)], dim=1)
        if overlap is not None and self.overlap:
            received, shared = all_to_all_overlapped(payload, send, recv, self.group, self.clock, overlap)
        else:
            received = all_to_all(payload, send, recv, self.group, self.clock)
            shared = overlap() if overlap is not None else None
        received, received_gates = received.split([rows.shape[1], 1], dim=1)
        received_gates = received_gates.squeeze(1)
        # Received rows are ordered (source rank, local expert); experts need them by expert.
        expert_of_row = (
            torch.arange(n_local, device=rows.device)
            .repeat(ep)
            .repeat_interleave(counts_from.flatten(), output_size=sum(recv))
        )
        perm = torch.argsort(expert_of_row, stable=True)
        inverse = inverse_permutation(perm)
        out = experts(
            permute_rows(received, perm, inverse), counts_from.sum(dim=0), permute_rows(received_gates, perm, inverse)
        )
        me = dist.get_rank(self.group)
        row_bytes = (rows.shape[1] + 1) * rows.element_size()
        # dispatch + combine forward, and the same again backward
        self.bytes_moved += 2 * row_bytes * ((sum(send) - send[me]) + (sum(recv) - recv[me]))
        self.rows_in += sum(recv)
        return all_to_all(permute_rows(out, inverse, perm), recv, send, self.group, self.clock), shared
