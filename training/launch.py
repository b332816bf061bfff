"""Local launcher: the Training Operator's contract on one machine.

Starts WORLD_SIZE worker processes with exactly the variables a PyTorchJob injects (MASTER_ADDR, MASTER_PORT,
WORLD_SIZE, RANK) plus LOCAL_WORLD_SIZE so each takes its share of the cores, and waits. When one exits
non-zero the others are stopped and the error carries the tail of that worker's log.
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

__all__ = ["WorkerFailed", "free_port", "launch_local"]

_LOG_TAIL_LINES = 40


class WorkerFailed(MicrofedError):
    """A worker exited non-zero; `log_path` and `log_tail` hold what it printed."""

    def __init__(self, rank: int, returncode: int, log_path: Path, log_tail: str) -> None:
        super().__init__(
            f"worker {rank} exited with code {returncode}; the last lines of {log_path}:\n{log_tail}",
        )
        self.rank, self.returncode, self.log_path, self.log_tail = rank, returncode, log_path, log_tail


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


def launch_local(
    world_size: int,
    worker_args: Sequence[str],
    *,
    log_dir: str | Path,
    module: str = "microfed.training.worker",
    echo_rank0: bool = True,
    poll_seconds: float = 0.2,
) -> list[Path]:
    """Run `python -m module worker_args` as WORLD_SIZE processes; return the log paths when all succeed."""
    if world_size < 1:
        raise MicrofedError(f"workers must be at least 1, got {world_size}")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs: list[_Proc] = []
    # A SIGTERM (the pod or the user stopping us) must still run the `finally` that stops the workers.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if _in_main_thread() else None
    try:
        for rank in range(world_size):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "WORLD_SIZE": str(world_size),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
                "PYTHONUNBUFFERED": "1",
            }
            log_path = log_dir / f"worker-{rank:05d}.log"
            with open(log_path, "wb") as log:
                popen = subprocess.Popen(
                    [sys.executable, "-m", module, *worker_args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            procs.append(_Proc(rank, popen, log_path))
        _wait(procs, echo_rank0, poll_seconds)
    finally:
        _stop(procs)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return [p.log_path for p in procs]


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _wait(procs: list[_Proc], echo_rank0: bool, poll_seconds: float) -> None:
    echoed = 0
    while True:
        time.sleep(poll_seconds)
        if echo_rank0:
            echoed = _echo_new(procs[0].log_path, echoed)
        codes = [p.popen.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            raise _first_failure(procs)
        if all(c == 0 for c in codes):
            return


def _first_failure(procs: list[_Proc], settle_seconds: float = 2.0) -> WorkerFailed:
    """The failure to report. When one worker fails its peers soon fail too, in collectives that lost a
    member; so give them a moment, then prefer a worker that reported its own error (exit code 2, a
    MicrofedError) over one that crashed, and the lowest rank among equals."""
    deadline = time.monotonic() + settle_seconds
    while time.monotonic() < deadline and any(p.popen.poll() is None for p in procs):
        time.sleep(0.05)
    failed = [p for p in procs if p.popen.poll() not in (None, 0)]
    first = min(failed, key=lambda p: (p.popen.returncode != 2, p.rank))
    return WorkerFailed(first.rank, int(first.popen.returncode), first.log_path, _tail(first.log_path))


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
