"""What a person sees while a run goes on: a progress bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moe_ray.runtime.prepare import at_most_every, progress_line

if TYPE_CHECKING:  # the driver loads Ray Train and torch: not for `moe-ray prepare`
    from moe_ray.runtime.driver import Progress as RunProgress

console = Console(stderr=True, soft_wrap=True)


def _fmt(m: dict, max_vio: list[float] | None) -> str:
    vio = f" maxvio {sum(max_vio) / len(max_vio):.3f}" if max_vio else ""
    return f"loss {m['loss']:.4f} lm {m['lm_loss']:.4f} lr {m['lr']:.2e} {m['tokens_per_s']:,.0f} tok/s{vio}"


def _breakdown(m: dict) -> str:
    """Where the step's time went (means over the workers), when the worker reported it."""
    if "time/forward" not in m:
        return ""
    ms = {k.split("/", 1)[1]: v * 1e3 for k, v in m.items() if k.startswith("time/")}
    return (
        f" | ms: forward {ms['forward']:.0f} + backward {ms['backward']:.0f} (all-to-all waits in them "
        f"{ms['dispatch_wait']:.0f}), grad reduce {ms['grad_reduce']:.0f}, optimizer {ms['optimizer']:.0f}, "
        f"coordinator {ms['coordinator_wait']:.0f}"
        + (f", checkpoint {ms['checkpoint']:.0f}" if ms["checkpoint"] else "")
    )


class ProgressReporter:
    """Callable handed to run_job; shows a bar on a TTY and a line every `log_every` steps otherwise."""

    def __init__(self, total_steps: int, log_every: int, interactive: bool | None = None):
        self.total = total_steps
        self.log_every = log_every
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        self.logged_step = -1
        self.events_seen = 0
        self.start = time.time()

    def __call__(self, p: RunProgress) -> None:
        for ev in p.events[self.events_seen :]:
            if not self.interactive and "step" in ev:  # the lines of the steps before it come first
                self._step_lines(p, before=ev["step"])
            self._event(ev)
        self.events_seen = len(p.events)
        m = p.last
        if m is None:
            return
        if self.interactive:
            if self.bar is None:
                self.bar = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[stats]}"),
                    console=console,
                    transient=False,
                )
                self.task = self.bar.add_task(p.run_name, total=self.total, stats="")
                self.bar.start()
            self.bar.update(self.task, completed=m["step"] + 1, stats=_fmt(m, p.max_vio))
            if m["step"] > self.logged_step and (m["step"] + 1) % self.log_every == 0 and _breakdown(m):
                self.bar.console.print(f"step {m['step'] + 1}{_breakdown(m)}", highlight=False)
                self.logged_step = m["step"]
        else:
            self._step_lines(p)

    def _step_lines(self, p: RunProgress, before: int | None = None) -> None:
        """A line for each step due (every log_every, the first and the last) not shown yet, of
        the steps before `before` (an event's step count) when given."""
        for entry in p.metrics:
            step = entry["step"]
            if before is not None and step >= before:
                break
            if step > self.logged_step and ((step + 1) % self.log_every == 0 or step == 0 or step + 1 == self.total):
                console.print(
                    f"step {step + 1}/{self.total} {_fmt(entry, p.max_vio)}{_breakdown(entry)}", highlight=False
                )
                self.logged_step = step

    def _event(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "placement":
            text = f"{'resumed at step ' + str(ev['step']) + ': ' if ev.get('resumed') else ''}{ev['detail']}"
        elif kind == "eval":
            text = (
                f"eval @ step {ev['step']}: val loss {ev['val_loss']:.4f}, "
                f"MaxVio_global {ev['max_vio_global_mean']:.3f}"
            )
        elif kind == "checkpoint":
            text = f"checkpoint @ step {ev['step']}"
        elif kind == "restart":
            text = (
                f"restarted ({ev['cause']}) at step {ev['step']} with {ev['world_size']} workers: "
                f"{ev['steps_lost']} step(s) lost, {ev['recovery_s']:.1f} s from the last step to the new group"
            ) + (f"\n  what failed: {ev['error']}" if ev.get("error") else "")
        elif kind == "scale_requested":
            text = f"scale requested: {ev['workers']} workers from the next step boundary"
        elif kind == "rebalance_requested":
            text = "rebalance requested: experts placed by load from the next step boundary"
        elif kind == "coordinator_restart":
            text = f"coordinator restarted at step {ev['step']}; re-seeded with the workers' bias"
        else:
            return
        (self.bar.console if self.bar else console).print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextlib.contextmanager
def follow_prepare(interactive: bool | None = None, every_s: float = 10.0) -> Iterator[Callable[[dict], None]]:
    """A progress callback for `prepare`: a live status line on a terminal, else a line every `every_s`."""
    interactive = sys.stderr.isatty() if interactive is None else interactive
    if interactive:
        with console.status("preparing ...") as status:
            yield lambda p: status.update(f"preparing: {progress_line(p)}")
        return
    yield at_most_every(every_s, lambda p: console.print(f"preparing: {progress_line(p)}", highlight=False))
