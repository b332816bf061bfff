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
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from microfed.training.errors import MicrofedError

__all__ = [
    "DEFAULT_MAX_RESTARTS",
    "EXIT_PEER_LOST",
    "EXIT_USER_ERROR",
    "WorkerFailed",
    "free_port",
    "is_restartable",
    "launch_local",
]

_LOG_TAIL_LINES = 40
# A worker's MicrofedError (bad input, divergence): restarting cannot help.
EXIT_USER_ERROR = 2
# A worker whose peer vanished in a collective. In the 128-255 range that the ExitCode policy retries, and
# outside the 129-192 that signals produce, so a log tells a lost peer from a killed worker.
EXIT_PEER_LOST = 200
# Restarts of the whole group before the launch fails: a fault that repeats is not a passing one.
DEFAULT_MAX_RESTARTS = 3


class WorkerFailed(MicrofedError):
    """A worker exited non-zero; `log_path` and `log_tail` hold what it printed."""

    def __init__(self, rank: int, returncode: int, log_path: Path, log_tail: str, restarts: int = 0) -> None:
        after = f" after {restarts} restart{'s' if restarts != 1 else ''} of the group" if restarts else ""
        super().__init__(
            f"worker {rank} {_describe(returncode)}{after}; the last lines of {log_path}:\n{log_tail}",
        )
        self.rank, self.returncode, self.log_path, self.log_tail = rank, returncode, log_path, log_tail
        self.restarts = restarts


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
    def __init__(self, failure: WorkerFailed, restartable: bool) -> None:
        super().__init__(str(failure))
        self.failure, self.restartable = failure, restartable


def launch_local(
    world_size: int,
    worker_args: Sequence[str],
    *,
    log_dir: str | Path,
    module: str = "microfed.training.worker",
    echo_rank0: bool = True,
    poll_seconds: float = 0.2,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
) -> list[Path]:
    """Run `python -m module worker_args` as WORLD_SIZE processes; return the log paths when all succeed.

    A group that fails with a fault (see the module docstring) is started again, at most `max_restarts` times.
    """
    if world_size < 1:
        raise MicrofedError(f"workers must be at least 1, got {world_size}")
    if max_restarts < 0:
        raise MicrofedError(f"max_restarts must be >= 0, got {max_restarts}")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"worker-{rank:05d}.log" for rank in range(world_size)]
    echoed = 0
    # A SIGTERM (the pod or the user stopping us) must still run the `finally` that stops the workers.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if _in_main_thread() else None
    try:
        for attempt in range(max_restarts + 1):
            procs: list[_Proc] = []
            try:
                procs = _start(world_size, worker_args, module, logs, attempt)
                echoed = _wait(procs, echo_rank0, poll_seconds, echoed)
                return logs
            except _GroupFailed as failed:
                if not failed.restartable or attempt == max_restarts:
                    f = failed.failure
                    raise WorkerFailed(f.rank, f.returncode, f.log_path, f.log_tail, restarts=attempt) from None
                print(
                    f"[microfed] worker {failed.failure.rank} {_describe(failed.failure.returncode)}: restarting "
                    f"all {world_size} workers (restart {attempt + 1} of at most {max_restarts})",
                    flush=True,
                )
            finally:
                _stop(procs)
        raise AssertionError("unreachable: the last attempt returns or raises")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _start(world_size: int, worker_args: Sequence[str], module: str, logs: list[Path], attempt: int) -> list[_Proc]:
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


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _wait(procs: list[_Proc], echo_rank0: bool, poll_seconds: float, echoed: int) -> int:
    """Wait until all exit 0 (returns how much of rank 0's log was echoed) or one fails (_GroupFailed)."""
    while True:
        time.sleep(poll_seconds)
        if echo_rank0:
            echoed = _echo_new(procs[0].log_path, echoed)
        codes = [p.popen.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            raise _first_failure(procs)
        if all(c == 0 for c in codes):
            if echo_rank0:
                echoed = _echo_new(procs[0].log_path, echoed)
            return echoed


def _first_failure(procs: list[_Proc], settle_seconds: float = 2.0) -> _GroupFailed:
    """The failure to report, and whether it is a fault to restart for.

    When one worker fails its peers soon fail too, in collectives that lost a member; so give them a moment,
    then blame a worker that reported its own error (exit code 2, a MicrofedError) first, then other program
    errors, then kills, and a worker that only lost its peer last; the lowest rank among equals. The group is
    restarted only when every failure is a fault (signal or 128-255): one program error makes it final.
    """
    deadline = time.monotonic() + settle_seconds
    while time.monotonic() < deadline and any(p.popen.poll() is None for p in procs):
        time.sleep(0.05)
    failed = [p for p in procs if p.popen.poll() not in (None, 0)]

    def blame(p: _Proc) -> tuple[int, int]:
        code = int(p.popen.returncode)
        order = 0 if code == EXIT_USER_ERROR else 1 if not is_restartable(code) else 3 if code == EXIT_PEER_LOST else 2
        return order, p.rank

    first = min(failed, key=blame)
    restartable = all(is_restartable(int(p.popen.returncode)) for p in failed)
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
