"""SIGTERM (or SIGINT), raised where it is safe: in a wait of the main thread's loop, never at an arbitrary bytecode.

A handler that raises wherever the signal lands can leave a lock taken for good: logging's module lock between its
`acquire` and its `try`, `subprocess.Popen`'s wait lock in `poll()`, a connection pool's. The cleanup that the
exception was meant to run (stop the workers, delete the job) then waits on that lock forever. So the handler only
notes the signal, and raises the loop's error at once only when the main thread is inside the sleep this module
hands out; otherwise the next such sleep raises it, before sleeping.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

__all__ = ["raised_at_waits"]


@contextlib.contextmanager
def raised_at_waits(
    error: Callable[[int], BaseException],
    sleep: Callable[[float], None] = time.sleep,
    signals: Sequence[signal.Signals] = (signal.SIGTERM,),
) -> Iterator[Callable[[float], None]]:
    """While inside, each of `signals` (SIGTERM by default) raises `error(signum)` from the yielded sleep (during or
    before its next call). A signal that is ignored stays ignored. Handlers can only be set from the main thread:
    elsewhere `sleep` itself is yielded and nothing changes. The previous handlers are back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield sleep
        return
    received: list[int] = []
    waiting = False

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if waiting:  # the main thread is in the sleep below: nothing of anyone's is half done
            raise error(signum)

    def wait(seconds: float) -> None:
        nonlocal waiting
        if received:
            raise error(received[0])
        waiting = True
        try:
            sleep(seconds)
        finally:
            waiting = False
        if received:
            raise error(received[0])

    # an ignored signal stays ignored, as Python leaves an ignored SIGINT at startup (a process started in the
    # background by a non-interactive shell ignores SIGINT; Ctrl-C is not meant to reach it)
    previous = {s: signal.signal(s, handler) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield wait
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)
