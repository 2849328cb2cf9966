"""Progress output: a live bar in a terminal, plain log lines otherwise (CI, files, pipes)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def step_line(step: int, total: int, entry: dict, eta: float) -> str:
    return (
        f"step {step}/{total} | loss {entry['loss']:.4f} | lr {entry['lr']:.2e} | "
        f"{entry['tokens_per_s']:,.0f} tok/s | eta {format_seconds(eta)}"
    )


class Progress:
    """`start(total, first)`, `update(step, entry)`, `log(text)`, `close()`.

    In a terminal (or with `live=True`) a rich progress bar shows step, loss, lr, tokens/s and
    ETA; otherwise a plain line every `log_every` steps."""

    def __init__(self, log_every: int = 10, live: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.log_every = log_every
        self._bar = None

    def start(self, total: int, first: int) -> None:
        self.total, self.first = total, first
        self.started = time.perf_counter()
        if self.live:
            self._bar = RichProgress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=first, info="")

    def eta(self, step: int) -> float:
        done = step - self.first
        if done <= 0:
            return 0.0
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def update(self, step: int, entry: dict) -> None:
        if self._bar is not None:
            info = (
                f"loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
                f"{entry['tokens_per_s']:,.0f} tok/s"
            )
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.log_every == 0 or step == self.total:
            print(step_line(step, self.total, entry, self.eta(step)), file=self.stream, flush=True)

    def log(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
