"""The step processes of `microfed run`: kfp.local's subprocess step runner, replaced (`StepProcesses`), and how
they are stopped after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from types import TracebackType

from microfed.training.errors import ERROR_FILE_ENV

__all__ = ["StepProcesses"]

# After Ctrl-C: how long a step may take to stop its workers (training/launch.py gives them 5 s, then kills).
_STEP_STOP_SECONDS = 15.0


class StepProcesses:
    """Starts kfp.local's step processes in place of kfp 2.16's `subprocess_task_handler.run_local_subprocess`
    (kubeflow/pipelines sdk-2.16.1, sdk/python/kfp/local/subprocess_task_handler.py): the same command, its
    output and errors merged and printed line by line, the same return code. It adds what `microfed run` needs:

    - ERROR_FILE_ENV in the step's environment: a failing step records its own error there
      (`training.errors.reported_errors`), which local_run's `_step_error` turns into the run's one-line error;
    - the rest of that environment from `env` (`step_environment`: the run's temporary folder as TMPDIR, where
      kfp's command writes the step's component file, and the run's events file, which the display follows),
      by default this process's;
    - output that is not UTF-8 shown with replacement characters, where kfp's strict decoding would end the
      run with a UnicodeDecodeError;
    - the process kept, so that after Ctrl-C `stop` can wait for the step to stop its workers, or stop it.

    kfp.local runs a pipeline without control flow (ours) one step at a time, in this thread.
    """

    def __init__(self, error_file: Path, env: dict[str, str] | None = None) -> None:
        self.error_file = error_file
        self.env = env
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> StepProcesses:
        from kfp.local import subprocess_task_handler

        self._module = subprocess_task_handler
        self._original = subprocess_task_handler.run_local_subprocess
        subprocess_task_handler.run_local_subprocess = self.run
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._module.run_local_subprocess = self._original
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            self.stop()

    def run(self, full_command: list[str]) -> int:
        env = {**(os.environ if self.env is None else self.env), ERROR_FILE_ENV: str(self.error_file)}
        with subprocess.Popen(
            full_command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=env,
        ) as process:
            self.process = process
            assert process.stdout is not None
            for line in process.stdout:
                print(line, end="")
            print("\n")  # kfp's separation of one step's output from the next line
        return process.wait()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def stop(self) -> None:
        """After Ctrl-C: let the running step stop its workers, then make sure all of it has exited.

        A Ctrl-C at a terminal reaches every process of the foreground group: kfp's `sh -c` around the step, the
        step, and its workers; the step then stops its workers itself (training/launch.py) and exits. Any other
        SIGINT (sent to this process alone) is passed on to those processes the same way. What still runs after
        _STEP_STOP_SECONDS gets SIGTERM (on which the launcher stops its workers too), then SIGKILL.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            if not _terminal_interrupted_our_group():
                _signal_tree(process, signal.SIGINT)
            try:
                process.wait(_STEP_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                _signal_tree(process, signal.SIGTERM)
                process.wait(5)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):  # a second Ctrl-C, or a step that ignores SIGTERM
            _signal_tree(process, signal.SIGKILL)
            process.wait()


def _terminal_interrupted_our_group() -> bool:
    """Whether this process belongs to its terminal's foreground group, which a Ctrl-C there signals whole."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError, AttributeError):
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
    return False


def _signal_tree(process: subprocess.Popen[str], signum: int) -> None:
    """Send `signum` to every process below `process` (Linux /proc; elsewhere none), then to `process`."""
    for pid in [*_descendants(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the command name, in parentheses, may hold spaces: the fields after its closing parenthesis
            fields = stat.read_text().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
