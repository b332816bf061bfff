"""A worker's progress record, for the local launcher's stall watch (PROGRESS_DIR_ENV; training/launch.py).

Under microfed's local launcher each rank keeps a record of what it is doing, whether it is waiting for its peers
in a collective, and when it last made progress (a training step, or the start of a step of its own), rewritten
atomically, at most every few seconds while it trains. `progress()` is this process's record: the entrypoint
installs one with `use`; a worker run directly (tests) keeps the default, which writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from microfed.training.launch import PROGRESS_DIR_ENV, progress_file
from microfed.training.worker_config import WorkerConfig, collective_timeout, stall_timeout

__all__ = ["Progress", "progress", "use"]


class Progress:
    """This rank's progress record for the local launcher's stall watch (PROGRESS_DIR_ENV; training/launch.py).

    `doing` says what the rank does, with its round; `waiting` marks a collective, where a rank waits for its
    peers and is not the one to blame. The record is rewritten (atomically: a new file renamed over the old) when
    that changes, and on `tick` at most every `every` seconds. Without the variable (a PyTorchJob replica,
    torchrun) nothing is written; a record that cannot be written is given up, never the training.
    """

    def __init__(self, folder: str | None, rank: int, stall: float, timeout: float) -> None:
        self.path = Path(folder) / progress_file(rank) if folder else None
        self.fixed = {"pid": os.getpid(), "rank": rank, "stall_seconds": stall, "timeout_seconds": timeout}
        self.every = min(5.0, stall / 10)
        self.doing, self.waiting, self.written = "starting", False, 0.0

    @classmethod
    def from_environ(cls, cfg: WorkerConfig, rank: int) -> Progress:
        folder = os.environ.get(PROGRESS_DIR_ENV) or None
        return cls(folder, rank, stall_timeout(cfg).total_seconds(), collective_timeout(cfg).total_seconds())

    def set(self, doing: str, *, waiting: bool = False) -> None:
        self.doing, self.waiting = doing, waiting
        self._write()

    def tick(self) -> None:
        if self.path is not None and time.monotonic() - self.written >= self.every:
            self._write()

    @contextlib.contextmanager
    def waiting_for(self, what: str) -> Iterator[None]:
        """Mark a collective; after it the rank is back at what it did before, with a fresh time (a failed one
        ends the process: the record stays as it was)."""
        before, was_waiting = self.doing, self.waiting
        self.set(what, waiting=True)
        yield
        self.set(before, waiting=was_waiting)

    def _write(self) -> None:
        if self.path is None:
            return
        record = {**self.fixed, "doing": self.doing, "waiting": self.waiting, "time": time.time()}
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        try:
            temporary.write_text(json.dumps(record), encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError:
            self.path = None
        self.written = time.monotonic()


_current = Progress(None, 0, 1.0, 1.0)


def progress() -> Progress:
    """This process's progress record."""
    return _current


def use(record: Progress) -> None:
    """Make `record` this process's progress record (the entrypoint's, from the environment)."""
    global _current
    _current = record
