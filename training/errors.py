"""The one exception type users see: what is wrong and what to do about it; and how a step hands it on."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from microfed.training.step_log import event

__all__ = ["ERROR_FILE_ENV", "MicrofedError", "read_error_records", "reported_errors"]

# Set by `microfed run` for the pipeline steps it starts (pipelines/local_run.py): the file a failing step
# appends its error to, so the runner shows the step's own message instead of digging it out of the log.
ERROR_FILE_ENV = "MICROFED_ERROR_FILE"


class MicrofedError(ValueError):
    """Bad input or an unrecoverable condition, with a message that names the file, field or flag.

    `hint` says what to do; the CLI prints message and hint on one line each, without a traceback, and exits
    with `exit_code` (2: a usage error, as argparse's own).
    """

    exit_code: int = 2

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message if not hint else f"{message} ({hint})")
        self.message = message
        self.hint = hint


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Run a pipeline step's body; when it raises, record the error for `microfed run`, then re-raise it.

    kfp.local runs each step in a subprocess whose only channel back is its log, where a traceback can span
    many lines and a message several (a failed worker's carries its log tail). With ERROR_FILE_ENV set, the
    error is appended there as one JSON line (type, message, hint, whether it is a MicrofedError or an
    OSError, i.e. about the user's input or machine, rather than a bug), and the same as an `error` event
    (training/step_log.py). Without them (a cluster, a test) this only re-raises: the step still fails with its
    traceback in the log, as before.
    """
    try:
        yield
    except Exception as exc:
        # The step is failing already: a record that cannot be made or written must not replace its error.
        with contextlib.suppress(Exception):
            _record(exc)
        raise


def _record(exc: Exception) -> None:
    record = {
        "type": type(exc).__name__,
        "message": exc.message if isinstance(exc, MicrofedError) else str(exc),
        "hint": exc.hint if isinstance(exc, MicrofedError) else "",
        "user": isinstance(exc, MicrofedError | OSError),
    }
    event("error", **record)  # for the progress display (training/step_log.py); this file is for the run's error
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_error_records(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    """The records `reported_errors` appended to `path`, oldest first (none when the file is missing)."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records
