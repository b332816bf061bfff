"""Local launcher: the Training Operator's contract on one machine.

Starts WORLD_SIZE worker processes with exactly the variables a PyTorchJob injects (MASTER_ADDR, MASTER_PORT,
WORLD_SIZE, RANK) plus LOCAL_WORLD_SIZE so each takes its share of the cores, and waits. When one exits
non-zero the others are stopped, and then, like a PyTorchJob with the `ExitCode` restart policy:

- exit codes 1-127 are program errors (2: the worker's own MicrofedError, e.g. bad input or a diverged
  loss): the launch fails at once with the tail of that worker's log;
- a worker killed by a signal (SIGKILL from the OOM killer, say) or exiting with 128-255 (EXIT_PEER_LOST:
  its peer vanished in a collective) is a fault: the whole group is started again, up to `max_restarts`
  times, and the workers resume from their last round checkpoint.

Logs are appended across restarts, one file per rank, each attempt headed by a marker line.

Stalls. A worker whose step never returns (a forward pass, a read or a lock that hangs) fails nothing: its peers
wait for it in the next collective until the collective timeout, 30 minutes by default. So each worker keeps a
progress record in the folder PROGRESS_DIR_ENV names (training/worker_progress.py: what it is doing, whether it
is waiting for its peers in a collective, when it last made progress, and its stall and collective timeouts), and the
launcher reads them while the group runs. A worker that has made no progress of its own for its stall time is
named, with what it was doing (its round), in a warning line; when it has made none for the collective timeout,
or its peers give up waiting for it at that timeout, the launch fails with WorkerStalled, which names it again.
Not restarted: the group would resume the same round and wait another whole timeout for the same step.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microfed.training.errors import MicrofedError
from microfed.training.layout import progress_file, worker_log_file
from microfed.training.step_log import event
from microfed.training.termination import raised_at_waits

__all__ = [
    "DEFAULT_MAX_RESTARTS",
    "EXIT_PEER_LOST",
    "EXIT_USER_ERROR",
    "PROGRESS_DIR_ENV",
    "WorkerFailed",
    "WorkerStalled",
    "free_port",
    "format_duration",
    "is_restartable",
    "launch_local",
    "progress_file",
]

_LOG_TAIL_LINES = 40
# A worker's MicrofedError (bad input, divergence): restarting cannot help.
EXIT_USER_ERROR = 2
# A worker whose peer vanished in a collective. In the 128-255 range that the ExitCode policy retries, and
# outside the 129-192 that signals produce, so a log tells a lost peer from a killed worker.
EXIT_PEER_LOST = 200
# Restarts of the whole group before the launch fails: a fault that repeats is not a passing one.
DEFAULT_MAX_RESTARTS = 3
# Set for each worker: the folder where it keeps its progress record (progress_file) for the stall watch.
PROGRESS_DIR_ENV = "MICROFED_PROGRESS_DIR"


class WorkerFailed(MicrofedError):
    """A worker exited non-zero; `log_path` and `log_tail` hold what it printed."""

    def __init__(self, rank: int, returncode: int, log_path: Path, log_tail: str, restarts: int = 0) -> None:
        after = f" after {restarts} restart{'s' if restarts != 1 else ''} of the group" if restarts else ""
        super().__init__(
            f"worker {rank} {_describe(returncode)}{after}; the last lines of {log_path}:\n{log_tail}",
        )
        self.rank, self.returncode, self.log_path, self.log_tail = rank, returncode, log_path, log_tail
        self.restarts = restarts


class WorkerStalled(MicrofedError):
    """A worker made no progress of its own until the collective timeout; it was stopped with its group."""

    def __init__(
        self, rank: int, doing: str, idle_seconds: float, timeout_seconds: float, log_path: Path, peers_gave_up: bool
    ) -> None:
        ended = "its peers stopped waiting for it" if peers_gave_up else "the run stopped"
        super().__init__(
            f"worker {rank} made no progress for {format_duration(idle_seconds)} while {doing}; {ended} at the "
            f"collective timeout ({format_duration(timeout_seconds)})",
            hint=f"its log is {log_path}; a forward pass, read or lock that never returns stalls the whole group; "
            "if the worker is only slow, raise collective_timeout_minutes (--collective-timeout-minutes)",
        )
        self.rank, self.doing, self.idle_seconds, self.log_path = rank, doing, idle_seconds, log_path


def format_duration(seconds: float) -> str:
    """`6 s`, `10 min`, `12.5 min`: how the stall messages state times."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.3g} min"


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (exit code {returncode})"
    return f"exited with code {returncode}"


def is_restartable(returncode: int) -> bool:
    """Whether an exit means a fault worth restarting for (a signal, or 128-255), not a program error."""
    return returncode < 0 or returncode >= 128


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Proc:
    rank: int
    popen: subprocess.Popen[bytes]
    log_path: Path


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class _GroupFailed(Exception):
    def __init__(self, failure: WorkerFailed | WorkerStalled, restartable: bool) -> None:
        super().__init__(str(failure))
        self.failure, self.restartable = failure, restartable


class _StallWatch:
    """Reads the group's progress records (see the module docstring) at each poll: warns once about a worker that
    has made no progress for its stall time, says so when it moves again, and fails the group (_GroupFailed,
    not restartable) once one has made none for the collective timeout. A record counts only while its process
    runs and wrote it (a restarted group's workers have new process ids)."""

    def __init__(self, folder: Path, procs: list[_Proc]) -> None:
        self.folder, self.procs = folder, procs
        self.warned: set[int] = set()

    def _records(self) -> list[tuple[_Proc, dict[str, Any]]]:
        found = []
        for p in self.procs:
            if p.popen.poll() is not None:
                continue
            with contextlib.suppress(OSError, ValueError):
                record = json.loads((self.folder / progress_file(p.rank)).read_text(encoding="utf-8"))
                if isinstance(record, dict) and record.get("pid") == p.popen.pid:
                    found.append((p, record))
        return found

    def _idle(self) -> list[_Idle]:
        """The running workers that have made no progress of their own for their stall time, lowest rank first."""
        now = time.time()
        idle = []
        for p, record in self._records():
            try:
                i = _Idle(p, str(record["doing"]), now - float(record["time"]), float(record["timeout_seconds"]))
                stalled = not record["waiting"] and i.seconds >= float(record["stall_seconds"])
            except (KeyError, TypeError, ValueError):
                continue
            if stalled:
                idle.append(i)
            elif p.rank in self.warned:
                self.warned.discard(p.rank)
                print(f"[microfed] worker {p.rank} is making progress again ({i.doing})", flush=True)
                event("worker_progressing", rank=p.rank, doing=i.doing)
        return idle

    def check(self) -> None:
        for i in self._idle():
            if i.seconds >= i.timeout:
                raise _GroupFailed(i.error(peers_gave_up=False), restartable=False)
            if i.proc.rank not in self.warned:
                self.warned.add(i.proc.rank)
                print(
                    f"[microfed] warning: worker {i.proc.rank} has made no progress for {format_duration(i.seconds)} "
                    f"while {i.doing}; the run fails if it makes none for {format_duration(i.timeout)} (the "
                    f"collective timeout); its log is {i.proc.log_path}",
                    flush=True,
                )
                event(
                    "worker_stalled",
                    rank=i.proc.rank,
                    doing=i.doing,
                    idle_seconds=round(i.seconds, 1),
                    timeout_seconds=i.timeout,
                    log=str(i.proc.log_path),
                )

    def stalled(self) -> WorkerStalled | None:
        """The lowest-ranked running worker that has made no progress for its stall time, as the error of a group
        whose other workers gave up waiting for it."""
        idle = self._idle()
        return idle[0].error(peers_gave_up=True) if idle else None


@dataclass(frozen=True)
class _Idle:
    proc: _Proc
    doing: str
    seconds: float
    timeout: float

    def error(self, peers_gave_up: bool) -> WorkerStalled:
        return WorkerStalled(self.proc.rank, self.doing, self.seconds, self.timeout, self.proc.log_path, peers_gave_up)


def launch_local(
    workers: int,
    worker_args: Sequence[str],
    *,
    log_dir: str | Path,
    module: str = "microfed.training.worker",
    echo_rank0: bool = True,
    poll_seconds: float = 0.2,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
) -> list[Path]:
    """Run `python -m module worker_args` as `workers` processes (WORLD_SIZE); return the log paths when all
    succeed.

    A group that fails with a fault (see the module docstring) is started again, at most `max_restarts` times.
    """
    if workers < 1:
        raise MicrofedError(f"workers must be at least 1, got {workers}")
    if max_restarts < 0:
        raise MicrofedError(f"max_restarts must be >= 0, got {max_restarts}")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / worker_log_file(rank) for rank in range(workers)]
    echoed = 0
    # A SIGTERM (the pod or the user stopping us) or a Ctrl-C must still run the `finally` that stops the workers:
    # SystemExit(128 + signal) or KeyboardInterrupt, raised in a wait of the loop, where no lock is half taken
    # (training/termination.py; Python's own KeyboardInterrupt could come inside Popen.poll and leave its wait lock
    # taken, and the stop would then wait on it forever).
    with (
        raised_at_waits(_stopped, signals=(signal.SIGTERM, signal.SIGINT)) as wait,
        tempfile.TemporaryDirectory(prefix="microfed-progress-") as progress,
    ):
        for attempt in range(max_restarts + 1):
            procs: list[_Proc] = []
            try:
                procs = _start(workers, worker_args, module, logs, attempt, Path(progress))
                echoed = _wait(procs, _StallWatch(Path(progress), procs), echo_rank0, poll_seconds, echoed, wait)
                return logs
            except _GroupFailed as failed:
                f = failed.failure
                if isinstance(f, WorkerStalled):
                    raise f from None
                if not failed.restartable or attempt == max_restarts:
                    raise WorkerFailed(f.rank, f.returncode, f.log_path, f.log_tail, restarts=attempt) from None
                print(
                    f"[microfed] worker {f.rank} {_describe(f.returncode)}: restarting all {workers} workers "
                    f"(restart {attempt + 1} of at most {max_restarts})",
                    flush=True,
                )
                event(
                    "group_restart",
                    rank=f.rank,
                    returncode=f.returncode,
                    restart=attempt + 1,
                    max_restarts=max_restarts,
                    workers=workers,
                )
            finally:
                _stop(procs)
    raise AssertionError("unreachable: the last attempt returns or raises")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _start(
    world_size: int, worker_args: Sequence[str], module: str, logs: list[Path], attempt: int, progress: Path
) -> list[_Proc]:
    """Start the group; a fresh port per attempt, since the last one may linger in TIME_WAIT."""
    port = free_port()
    procs: list[_Proc] = []
    try:
        for rank, log_path in enumerate(logs):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "WORLD_SIZE": str(world_size),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
                "PYTHONUNBUFFERED": "1",
                PROGRESS_DIR_ENV: str(progress),
                # as torchrun does: each worker's OpenMP pool sized to its share of the cores, not all of them
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, usable_cores() // world_size)),
            }
            with open(log_path, "ab" if attempt else "wb") as log:
                if attempt:
                    log.write(f"[microfed launcher] restart {attempt}: worker group started again\n".encode())
                    log.flush()
                popen = subprocess.Popen(
                    [sys.executable, "-m", module, *worker_args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            procs.append(_Proc(rank, popen, log_path))
    except BaseException:
        _stop(procs)
        raise
    return procs


def _stopped(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


def _wait(
    procs: list[_Proc],
    watch: _StallWatch,
    echo_rank0: bool,
    poll_seconds: float,
    echoed: int,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Wait until all exit 0 (returns how much of rank 0's log was echoed) or one fails or stalls (_GroupFailed)."""
    while True:
        sleep(poll_seconds)
        if echo_rank0:
            echoed = _echo_new(procs[0].log_path, echoed)
        codes = [p.popen.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            raise _first_failure(procs, watch, sleep=sleep)
        if all(c == 0 for c in codes):
            if echo_rank0:
                echoed = _echo_new(procs[0].log_path, echoed)
            return echoed
        watch.check()


def _first_failure(
    procs: list[_Proc],
    watch: _StallWatch | None = None,
    settle_seconds: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> _GroupFailed:
    """The failure to report, and whether it is a fault to restart for.

    When one worker fails its peers soon fail too, in collectives that lost a member; so give them a moment,
    then blame a worker that reported its own error (exit code 2, a MicrofedError) first, then other program
    errors, then kills, and a worker that only lost its peer last; the lowest rank among equals. The group is
    restarted only when every failure is a fault (signal or 128-255): one program error makes it final. When
    every failure is a fault and a worker that still runs has made no progress for its stall time, the others
    gave up waiting for it: that worker is the failure (WorkerStalled), and final.
    """
    deadline = time.monotonic() + settle_seconds
    while time.monotonic() < deadline and any(p.popen.poll() is None for p in procs):
        sleep(0.05)
    failed = [p for p in procs if p.popen.poll() not in (None, 0)]

    def blame(p: _Proc) -> tuple[int, int]:
        code = int(p.popen.returncode)
        order = 0 if code == EXIT_USER_ERROR else 1 if not is_restartable(code) else 3 if code == EXIT_PEER_LOST else 2
        return order, p.rank

    first = min(failed, key=blame)
    restartable = all(is_restartable(int(p.popen.returncode)) for p in failed)
    stalled = watch.stalled() if restartable and watch is not None else None
    if stalled is not None:
        return _GroupFailed(stalled, restartable=False)
    failure = WorkerFailed(first.rank, int(first.popen.returncode), first.log_path, _tail(first.log_path))
    return _GroupFailed(failure, restartable)


def _echo_new(path: Path, offset: int) -> int:
    """Print what rank 0 wrote since `offset` (whole lines only); return the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return offset
    end = chunk.rfind(b"\n") + 1
    if end:
        sys.stdout.write(chunk[:end].decode(errors="replace"))
        sys.stdout.flush()
    return offset + end


def _stop(procs: list[_Proc], grace_seconds: float = 5.0) -> None:
    """Terminate whatever still runs (after a failure or an interrupt), then kill what ignores it."""
    alive = [p for p in procs if p.popen.poll() is None]
    for p in alive:
        p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for p in alive:
        try:
            p.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()
