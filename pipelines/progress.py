"""What `microfed run` shows while kfp.local streams the steps' logs: progress bars, or every line, or nothing.

The steps and workers print plain marker lines (`[microfed] ...`, `[microfed worker] round r/R epoch e/E ...`);
a display turns them into something a person can follow. Everything is also in the run's kfp.log.

A line can quote data (a class name, a file name from an upload): displays drop kfp's colour codes and show
every other control character escaped (training/text.py), so no line can restyle or retitle the terminal.
"""

from __future__ import annotations

import re
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from microfed.training.text import printable

__all__ = ["Display", "LinesDisplay", "QuietDisplay", "RichDisplay", "make_display"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What a person should see of the stream when not verbose; the traceback above an error stays in kfp.log.
_SHOW = re.compile(r"\[microfed|Executing task|finished with status|^\s*[\w.]*(Error|Exception|Failed): ")
_TASK = re.compile(r"Executing task '([\w-]+)'")
_DONE = re.compile(r"Task '([\w-]+)' finished with status SUCCESS")
_TRAIN = re.compile(r"\[microfed\] train: (\d+) workers, (\d+) rounds x (\d+) local epochs")
_EPOCH = re.compile(r"\[microfed worker\] round (\d+)/(\d+) epoch (\d+)/(\d+): loss ([\d.]+) train acc ([\d.]+)")
_STEPS = 5  # split, train, aggregate, evaluate, export: what microfed_pipeline runs


class Display(Protocol):
    def line(self, text: str) -> None: ...

    def close(self) -> None: ...


class QuietDisplay:
    """--quiet / --json: nothing while it runs (errors still reach stderr at the end)."""

    def line(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class LinesDisplay:
    """--verbose: every line; otherwise the lines `_SHOW` selects, as plain text (for logs and pipes)."""

    def __init__(self, out: TextIO, verbose: bool) -> None:
        self.out, self.verbose = out, verbose

    def line(self, text: str) -> None:
        plain = _ANSI.sub("", text)
        if self.verbose or _SHOW.search(plain):
            self.out.write(printable(plain) + "\n")
            self.out.flush()

    def close(self) -> None:
        pass


class RichDisplay:
    """A bar over the pipeline's steps and one over the training epochs; the marker lines printed above them."""

    def __init__(self, out: TextIO, steps: int = _STEPS) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(file=out),
            transient=False,
        )
        self.steps = self.progress.add_task("starting", total=steps)
        self.training: TaskID | None = None
        self.progress.start()

    def line(self, text: str) -> None:
        plain = _ANSI.sub("", text).strip()
        if m := _TASK.search(plain):
            self.progress.update(self.steps, description=f"step {m.group(1)}")
        elif _DONE.search(plain):
            self.progress.advance(self.steps)
        elif m := _TRAIN.search(plain):
            total = int(m.group(2)) * int(m.group(3))
            self.training = self.progress.add_task(f"training on {m.group(1)} workers", total=total)
        elif (m := _EPOCH.search(plain)) and self.training is not None:
            r, rounds, loss, acc = m.group(1), m.group(2), m.group(5), m.group(6)
            self.progress.update(
                self.training, advance=1, description=f"round {r}/{rounds}, rank 0 loss {loss}, train acc {acc}"
            )
        elif plain.startswith("[microfed") or _SHOW.search(plain):
            self.progress.console.print(printable(plain), markup=False, highlight=False, emoji=False)

    def close(self) -> None:
        self.progress.stop()


def make_display(out: TextIO, *, verbose: bool, quiet: bool, steps: int = _STEPS) -> Display:
    if quiet:
        return QuietDisplay()
    if verbose or not out.isatty():
        return LinesDisplay(out, verbose)
    return RichDisplay(out, steps)
