"""training/termination.py: a SIGTERM becomes the loop's error in a wait, never at the bytecode it landed on."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from microfed.training.termination import raised_at_waits


class Stopped(Exception):
    """The loop's error in these tests."""


def test_a_signal_outside_a_wait_is_raised_by_the_next_wait() -> None:
    with raised_at_waits(lambda signum: Stopped(signum)) as wait:
        os.kill(os.getpid(), signal.SIGTERM)
        done = sum(range(1000))  # the code the signal interrupted runs to its end
        assert done == 499500
        with pytest.raises(Stopped) as caught:
            wait(0.0)
    assert caught.value.args == (signal.SIGTERM,)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


def test_a_signal_during_a_wait_ends_it_at_once() -> None:
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    start = time.monotonic()
    with raised_at_waits(lambda signum: Stopped(signum)) as wait:
        timer.start()
        with pytest.raises(Stopped):
            wait(30.0)
    assert time.monotonic() - start < 10


def test_off_the_main_thread_the_plain_sleep_is_used() -> None:
    seen: list[object] = []

    def body() -> None:
        with raised_at_waits(lambda signum: Stopped(signum), sleep=seen.append) as wait:
            wait(1.5)
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [1.5, signal.SIG_DFL]


def test_the_signals_given_are_all_raised_at_waits_and_restored() -> None:
    with raised_at_waits(lambda signum: Stopped(signum), signals=(signal.SIGTERM, signal.SIGINT)) as wait:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(Stopped) as caught:
            wait(0.0)
    assert caught.value.args == (signal.SIGINT,)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_ignored_signal_stays_ignored() -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with raised_at_waits(lambda signum: Stopped(signum), signals=(signal.SIGINT,)) as wait:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            wait(0.0)  # nothing to raise: the signal was ignored
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
