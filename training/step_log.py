"""What a step says while it runs: human lines and structured events.

`log`: a `[microfed] ...` line on stdout, for people (the Kubeflow UI's log view, kfp.log, `microfed run --verbose`).
`event`: one JSON object per line appended to the file EVENTS_ENV names, which `microfed run` sets for the steps
and their workers (pipelines/local_run.py) and follows to draw its progress (pipelines/progress.py); without the
variable (a cluster run) it writes nothing. The display reads events only, never the human lines, so a line can
be reworded freely; an event's kind and fields are its contract.

Every line is written by one os.write on a file opened with O_APPEND: the lines of concurrent processes (a step
and its workers) are appended whole, never interleaved.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator

__all__ = ["EVENTS_ENV", "event", "log", "step"]

EVENTS_ENV = "MICROFED_EVENTS"


def log(message: str) -> None:
    """Print one progress line of a step, flushed at once: the line is read while the step runs."""
    print(f"[microfed] {message}", flush=True)


def event(kind: str, **fields: object) -> None:
    """Append `{"event": kind, "time": <unix seconds>, "pid": <process id>, **fields}` as one line to the file
    EVENTS_ENV names; nothing without it. Values that JSON lacks are written as their str(). Progress is not worth
    failing a step over: a file that cannot be written is skipped."""
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    reserved = {"event", "time", "pid"} & fields.keys()
    if reserved:
        raise ValueError(f"event fields {sorted(reserved)} are reserved")
    record = {"event": kind, "time": round(time.time(), 3), "pid": os.getpid(), **fields}
    data = (json.dumps(record, default=str) + "\n").encode("utf-8")
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Mark a step's body (a `with` block or a decorated function) with events: `step_start`, then `step_end`
    with `status` ("ok", "failed" or "interrupted") and `seconds`. A failure's own message is in the `error`
    event training.errors.reported_errors emits."""
    event("step_start", step=name)
    started = time.perf_counter()
    status = "failed"
    try:
        yield
        status = "ok"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        event("step_end", step=name, status=status, seconds=round(time.perf_counter() - started, 3))
