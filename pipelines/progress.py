"""What `microfed run` shows while kfp.local runs the steps: progress bars, one line per event, every log line, or
nothing.

The steps and their workers emit structured events (training/step_log.py `event`: one JSON object per line in the
run's events.jsonl); `follow_events` reads them while the pipeline runs and hands each to the display, which draws
its bars and lines from their fields alone. The human log lines are never parsed: rewording one changes nothing
here. `--verbose` shows those log lines, every one, as they come (everything is also in the run's kfp.log).

Events, by kind (besides `event`, `time` and `pid`, which every one has):

- `step_start`: `step`; `step_end`: `step`, `status` ("ok", "failed", "interrupted"), `seconds`;
- `train_plan`: `workers`, `rounds`, `local_epochs`, `model`;
- `epoch` (every worker, each local epoch): `rank`, `round`, `rounds`, `epoch`, `epochs`, `loss`, `accuracy`,
  `examples`, `seconds`;
- `validation` (rank 0, each in-job round with a validation split): `round`, `rounds`, `accuracy`, `loss`;
- `stopped_early` (rank 0): `round`, `rounds`, `best_round`, `patience`;
- `worker_stalled`: `rank`, `doing`, `idle_seconds`, `timeout_seconds`, `log`; `worker_progressing`: `rank`,
  `doing`; `group_restart`: `rank`, `returncode`, `restart`, `max_restarts`, `workers`;
- `error` (a step's body raised): `type`, `message`, `hint`, `user`.

A field can quote data (a class name, a file name from an upload, a model factory's path): displays show every
control character escaped (training/text.py), so no event or line can restyle or retitle the terminal.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, TextIO

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

__all__ = ["Display", "LinesDisplay", "QuietDisplay", "RichDisplay", "describe", "follow_events", "make_display"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEPS = 5  # split, train, aggregate, evaluate, export: what microfed_pipeline runs

Event = dict[str, Any]


class Display(Protocol):
    def line(self, text: str) -> None:
        """A line of the steps' log, as kfp.local prints it (from the thread that runs the pipeline)."""

    def event(self, record: Event) -> None:
        """An event the steps emitted (from `follow_events`' thread)."""

    def close(self) -> None: ...


class QuietDisplay:
    """--quiet / --json: nothing while it runs (errors still reach stderr at the end)."""

    def line(self, text: str) -> None:
        pass

    def event(self, record: Event) -> None:
        pass

    def close(self) -> None:
        pass


class LinesDisplay:
    """Plain text, for logs and pipes: one line per event (`describe`: rank 0's epochs, not every worker's); with
    `verbose`, every log line instead."""

    def __init__(self, out: TextIO, verbose: bool) -> None:
        self.out, self.verbose = out, verbose

    def line(self, text: str) -> None:
        if self.verbose:
            self._write(_ANSI.sub("", text))

    def event(self, record: Event) -> None:
        if not self.verbose:
            for text in describe(record):
                self._write(text)

    def _write(self, text: str) -> None:
        self.out.write(printable(text) + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


class RichDisplay:
    """A bar over the pipeline's steps and one over the training epochs (rank 0's); what else an event says
    (validation accuracy, a stalled worker, an error) printed above them."""

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
        self.epochs: set[tuple[object, object]] = set()  # (round, epoch) done: a restarted group repeats some
        self.progress.start()

    def line(self, text: str) -> None:
        pass

    def event(self, record: Event) -> None:
        with contextlib.suppress(KeyError, TypeError, ValueError):  # a malformed event draws nothing
            if not self._draw(record):
                for text in describe(record):
                    self.progress.console.print(printable(text), markup=False, highlight=False, emoji=False)

    def _draw(self, e: Event) -> bool:
        """Move the bars for `e`; whether that says all there is to say about it."""
        kind = e.get("event")
        if kind == "step_start":
            self.progress.update(self.steps, description=f"step {printable(e['step'])}")
        elif kind == "step_end" and e["status"] == "ok":
            self.progress.advance(self.steps)
        elif kind == "train_plan":
            total = int(e["rounds"]) * int(e["local_epochs"])
            self.training = self.progress.add_task(f"training on {int(e['workers'])} workers", total=total)
            self.epochs.clear()
        elif kind == "epoch" and self.training is not None:
            if e["rank"] == 0:
                self.epochs.add((e["round"], e["epoch"]))
                self.progress.update(
                    self.training,
                    completed=len(self.epochs),
                    description=f"round {e['round']}/{e['rounds']}, rank 0 loss {float(e['loss']):.4f}, "
                    f"train acc {float(e['accuracy']):.4f}",
                )
        elif kind == "stopped_early" and self.training is not None:
            self.progress.update(self.training, total=len(self.epochs))
            return False
        else:
            return kind == "epoch"
        return True

    def close(self) -> None:
        self.progress.stop()


def make_display(out: TextIO, *, verbose: bool, quiet: bool, steps: int = _STEPS) -> Display:
    if quiet:
        return QuietDisplay()
    if verbose or not out.isatty():
        return LinesDisplay(out, verbose)
    return RichDisplay(out, steps)


# ---------------------------------------------------------------------------------------- one line per event

# How many of a multi-line error's last lines are shown under its first (a failed worker's log tail).
_ERROR_TAIL_LINES = 5


def describe(e: Event) -> list[str]:
    """The plain text an event shows as, not yet escaped: one line; an error with a multi-line message (a failed
    worker's carries its log tail), its first line and its last few, indented. Nothing for an event not shown:
    another rank's epoch, a kind this display does not know, a malformed event."""
    try:
        line = _describe(e)
    except (KeyError, TypeError, ValueError):
        return []
    if line is None:
        return []
    if e.get("event") != "error":
        return [line]
    tail = [text for text in str(e["message"]).splitlines()[1:] if text.strip()]
    return [line, *(f"    {text.strip()}" for text in tail[-_ERROR_TAIL_LINES:])]


def _describe(e: Event) -> str | None:
    kind = e.get("event")
    if kind == "step_start":
        return f"step {e['step']}: started"
    if kind == "step_end":
        verb = {"ok": "done in", "failed": "failed after", "interrupted": "interrupted after"}[e["status"]]
        return f"step {e['step']}: {verb} {_duration(e['seconds'])}"
    if kind == "train_plan":
        return (
            f"training {e['model']} on {int(e['workers'])} workers: "
            f"{int(e['rounds'])} rounds x {int(e['local_epochs'])} local epochs"
        )
    if kind == "epoch":
        if e["rank"] != 0:
            return None
        return (
            f"round {e['round']}/{e['rounds']} epoch {e['epoch']}/{e['epochs']}: rank 0 loss {float(e['loss']):.4f}, "
            f"train acc {float(e['accuracy']):.4f}"
        )
    if kind == "validation":
        return f"round {e['round']}/{e['rounds']}: validation accuracy {float(e['accuracy']):.4f}"
    if kind == "stopped_early":
        return (
            f"stopped early after round {e['round']}/{e['rounds']}: no better validation accuracy for "
            f"{e['patience']} rounds (best: round {e['best_round']})"
        )
    return _describe_trouble(e)


def _describe_trouble(e: Event) -> str | None:
    kind = e.get("event")
    if kind == "worker_stalled":
        return (
            f"warning: worker {e['rank']} has made no progress for {_duration(e['idle_seconds'])} while "
            f"{e['doing']}; the run fails after {_duration(e['timeout_seconds'])} without any; its log is {e['log']}"
        )
    if kind == "worker_progressing":
        return f"worker {e['rank']} is making progress again ({e['doing']})"
    if kind == "group_restart":
        return (
            f"worker {e['rank']} {_exit(int(e['returncode']))}: restarting all {e['workers']} workers "
            f"(restart {e['restart']} of at most {e['max_restarts']})"
        )
    if kind == "error":
        first = str(e["message"]).strip().split("\n", 1)[0].strip() or "(no message)"
        return f"error: {first}" if e.get("user") else f"error: {e['type']}: {first}"
    return None


def _duration(seconds: Any) -> str:
    s = float(seconds)
    return f"{s:.1f} s" if s < 90 else f"{s / 60:.3g} min"


def _exit(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


# ---------------------------------------------------------------------------------------- following the file


class _Follower:
    """Reads the complete lines appended to `path` since the last read and hands their events to `display`."""

    def __init__(self, path: Path, display: Display) -> None:
        self.path, self.display = path, display
        self.offset = 0
        self.lock = threading.Lock()

    def read(self) -> None:
        with self.lock:  # the thread's reads and the last one never overlap
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    data = f.read()
            except OSError:  # FileNotFoundError: no step has emitted yet
                return
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
            self.offset += len(complete)
            for raw in complete.splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(raw)
                    if isinstance(record, dict):
                        self.display.event(record)


@contextlib.contextmanager
def follow_events(path: Path, display: Display, poll_seconds: float = 0.1) -> Iterator[None]:
    """While the block runs, pass the events appended to `path` to `display`, from a thread; on the way out, the
    last ones too, so that a failed step's `error` event is shown before the run's error."""
    follower = _Follower(path, display)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(poll_seconds):
            follower.read()

    thread = threading.Thread(target=loop, name="microfed-events", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        follower.read()
