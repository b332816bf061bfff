"""`microfed run`: the pipeline through kfp.local on this machine, collected into a run folder.

What can be checked before the pipeline starts is checked first (`check_run`): the run folder and its name,
the usage cache's folder, and whether this machine can hold the worker processes. Once it runs, a failing step's
own error reaches the caller as one MicrofedError line (see `_step_error` and training/errors.py), and Ctrl-C
stops the steps and their workers (pipelines/step_processes.py) before `RunInterrupted` is raised. What it shows
meanwhile comes from the events the steps emit into the run folder's events.jsonl (pipelines/progress.py).

A run leaves its results in the run folder and nothing elsewhere but the cache folder (`cache_dir`): kfp.local's
workspace and the component files each step writes (`mktemp -d` in kfp's command for lightweight components),
and whatever the steps and workers put in the temp folder, go into one temporary folder that is removed when
the run ends, however it ends; matplotlib keeps its configuration and font cache in the cache folder, and ONNX
Runtime's telemetry, which writes under the home folder, is off (`step_environment`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from microfed.pipelines.progress import Display, follow_events, make_display
from microfed.pipelines.step_processes import StepProcesses
from microfed.training.errors import MicrofedError, read_error_records
from microfed.training.layout import (
    ERRORS_FILE,
    EVENTS_FILE,
    GLOBAL_MODEL_FILE,
    KFP_DIR,
    KFP_LOG_FILE,
    MODEL_CONFIG_FILE,
    ONNX_MODEL_FILE,
    PIPELINE_FILE,
    REPORT_FILE,
    SIDECAR_FILE,
    USAGE_CACHE_FILE,
    Metrics,
    RunArtifacts,
    read_dataset_manifest,
    read_job_record,
    read_metrics,
    write_metrics,
    write_run_artifacts,
)
from microfed.training.predict import ORT_TELEMETRY_ENV
from microfed.training.step_log import EVENTS_ENV
from microfed.training.text import is_printable

__all__ = ["RunInterrupted", "RunResult", "StepFailed", "cache_dir", "check_run", "run_local", "tool_environment"]

MIB = 1024**2
# The least memory one local worker process holds of its own: torch and the worker's modules imported, before
# any data or model (measured: 300 MiB private per process on Linux, torch 2.14 CPU; a cnn-small worker peaks at
# 710 MiB). More workers than the machine's memory holds at this rate cannot all start.
WORKER_PROCESS_MEMORY = 256 * MIB
# Most file systems limit one name (one path component) to 255 bytes.
MAX_NAME_BYTES = 255
# In the run folder: the events the steps and workers emit (training/step_log.py), which the display follows.

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Fallback when a step recorded no error (it died before its body ran): the last exception line of its log.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Failed)): (.+)$")
# A worker's own MicrofedError, as it prints it (training/worker.py) in the log tail a WorkerFailed carries.
_WORKER_ERROR = re.compile(r"\[microfed worker\] error: (.+)$")
# An exception line in a worker's log tail, after torch's `[rank0]: ` prefix, if any.
_TAIL_EXCEPTION = re.compile(r"(?<![\w.])(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Failed|Interrupt): .+$")
_FAILED_TASK = re.compile(r"Inner task failed: '([^']+)'")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: Metrics


class StepFailed(MicrofedError):
    """A step failed with something other than a MicrofedError or an OSError: a bug, not the user's input."""

    exit_code = 1


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, after its steps and workers have stopped; `run_dir` is left as it was."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir


# ------------------------------------------------------------------------------------------ where files go


def cache_dir() -> Path:
    """~/.cache/microfed: what a run keeps on this machine between runs, outside its run folder: named datasets
    torchvision downloads (training/named_datasets.py), and matplotlib's configuration and font cache
    (`matplotlib/`)."""
    return Path.home() / ".cache" / "microfed"


def tool_environment() -> dict[str, str]:
    """Variables that keep the libraries of a run from writing under the home folder (values the user set win).

    MPLCONFIGDIR: matplotlib creates ~/.config/matplotlib when it is imported and writes its font list to
    ~/.cache/matplotlib; with MPLCONFIGDIR set, both live there instead ("Configuration and cache directory
    locations" in matplotlib's docs, `matplotlib.get_configdir` / `get_cachedir`), and no matplotlibrc of the
    user's changes how the report draws. ORT_DISABLE_TELEMETRY: see predict.disable_onnxruntime_telemetry.
    """
    return {
        "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR") or str(cache_dir() / "matplotlib"),
        ORT_TELEMETRY_ENV: os.environ.get(ORT_TELEMETRY_ENV) or "1",
    }


def step_environment(temp: Path, events: Path | None = None) -> dict[str, str]:
    """The environment of a step process: this one's, `tool_environment`, and TMPDIR: `temp`, a folder of the
    run's temporary folder, so that kfp's component files (`program_path=$(mktemp -d)`,
    kfp/dsl/component_factory.py) and the temp files of the step and its workers are removed with it. With
    `events`, EVENTS_ENV names it: the file the step and its workers (which inherit it, training/launch.py)
    append their events to."""
    env = {**os.environ, **tool_environment(), "TMPDIR": str(temp)}
    if events is not None:
        env[EVENTS_ENV] = str(events)
    return env


# ------------------------------------------------------------------------------------------- pre-flight


def check_run(arguments: dict[str, Any], runs_dir: str | Path = "runs", name: str | None = None) -> Path:
    """Everything about a local run that can be checked before it starts; returns the run folder it would write.

    The run folder: `runs_dir` a folder or creatable inside one you can write to, `name` a single folder name,
    and no non-empty folder of that name there yet. The usage cache (`usage_cache`, when a local path): inside
    a folder. The workers (`workers`): no more processes than this machine's memory holds.
    """
    run_dir = check_run_folder(runs_dir, name)
    cache = str(arguments.get("usage_cache") or "")
    if cache and cache != "off" and not cache.startswith("gs://"):
        folder = Path(cache) if not cache.lower().endswith(".json") else Path(cache).parent
        _check_folder(folder, "--usage-cache", cache)
    if isinstance(arguments.get("workers"), int):  # else the pipeline's default (or the pipeline's own error)
        check_workers_fit(arguments["workers"])
    return run_dir


def check_run_folder(runs_dir: str | Path, name: str | None) -> Path:
    """`runs_dir / name` (a timestamp when `name` is None), refused when it cannot be created or is in use."""
    text = str(runs_dir)
    if not text.strip():
        raise MicrofedError("--runs-dir is empty", hint="name the folder that holds the run folders (default: runs)")
    if not is_printable(text):
        raise MicrofedError(
            f"--runs-dir {text!r} holds control or invisible characters",
            hint="choose a folder name made of visible characters and spaces",
        )
    if name is not None:
        check_run_name(name)
    run_dir = Path(runs_dir) / (name or time.strftime("%Y%m%d-%H%M%S"))
    _check_folder(Path(runs_dir), "--runs-dir", text)
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise MicrofedError(f"run folder {run_dir} exists and is a file", hint="choose another --name")
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise MicrofedError(f"run folder {run_dir} already exists and is not empty", hint="choose another --name")
    except OSError as e:
        raise MicrofedError(f"run folder {run_dir}: {e.strerror or e}", hint="choose another --name") from None
    return run_dir


def check_run_name(name: str) -> None:
    """`name` must be one folder name: the run folder is created inside --runs-dir, never elsewhere."""
    separators = {"/", os.sep, *([os.altsep] if os.altsep else [])}
    bad = (
        name in ("", ".", "..")
        or any(s in name for s in separators)
        or not is_printable(name)
        or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES
    )
    if bad:
        raise MicrofedError(
            f"--name {name!r} is not a single folder name",
            hint=f"use a name such as exp-1: no '/', not '.' or '..', no control characters, "
            f"at most {MAX_NAME_BYTES} bytes (the run folder is created inside --runs-dir)",
        )


def check_workers_fit(workers: int) -> None:
    """Refuse more local worker processes than this machine's memory can hold (WORKER_PROCESS_MEMORY each)."""
    memory = _physical_memory()
    if memory is None:
        return
    most = max(1, memory // WORKER_PROCESS_MEMORY)
    if workers > most:
        raise MicrofedError(
            f"--workers {workers}: this machine's {memory / 1024**3:.1f} GiB of memory holds at most {most} "
            f"worker processes ({WORKER_PROCESS_MEMORY // MIB} MiB each before any data)",
            hint=f"use at most {most} workers here, or run on a cluster (microfed submit)",
        )


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system that reports it
        return None


def _check_folder(folder: Path, flag: str, given: str) -> None:
    """`folder` exists as a folder we can write in, or can be created: its nearest existing ancestor is one."""
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
        if not existing.is_dir():
            where = f"{flag} {given!r}" + ("" if existing == Path(given) else f": {existing}")
            raise MicrofedError(
                f"{where} is a file, not a folder", hint=f"pass a folder for {flag} (created when missing)"
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            raise MicrofedError(f"{flag} {given!r}: cannot write in {existing}", hint="pass a folder you can write to")
    except OSError as e:
        raise MicrofedError(f"{flag} {given!r}: {e.strerror or e}", hint=f"pass another folder for {flag}") from None


# ------------------------------------------------------------------------------------------------ the run


def run_local(
    arguments: dict[str, Any],
    runs_dir: str | Path = "runs",
    name: str | None = None,
    verbose: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Compile the pipeline, run it with kfp.local (workers as local processes), collect the run folder.

    Raises MicrofedError (a step's own error, one line; or a pre-flight check's), StepFailed (a step failed
    otherwise), or RunInterrupted (Ctrl-C; the steps and their workers have stopped).
    """
    run_dir = check_run(arguments, runs_dir, name)
    try:
        return _execute(arguments, run_dir, Path(runs_dir), verbose=verbose, quiet=quiet)
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir) from None


def _execute(arguments: dict[str, Any], run_dir: Path, runs_dir: Path, *, verbose: bool, quiet: bool) -> RunResult:
    from kfp import local

    from microfed.pipelines.pipeline import compile_pipeline, microfed_pipeline
    from microfed.training.report import render_report, write_report  # matplotlib: after the CLI set MPLCONFIGDIR

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MicrofedError(f"cannot create the run folder {run_dir}: {e.strerror or e}") from None
    compile_pipeline(run_dir / PIPELINE_FILE)
    start = time.perf_counter()
    tasks = yaml.safe_load((run_dir / PIPELINE_FILE).read_text())["root"]["dag"]["tasks"]
    display = make_display(sys.stdout, verbose=verbose, quiet=quiet, steps=len(tasks))
    events = run_dir / EVENTS_FILE
    # Removed on the way out after StepProcesses has stopped the steps (a `with` exits in reverse order), even if
    # a worker left a file it cannot delete behind.
    with (
        tempfile.TemporaryDirectory(prefix="microfed-run-", ignore_cleanup_errors=True) as tmp,
        StepProcesses(Path(tmp) / ERRORS_FILE, step_environment(_folder(Path(tmp) / "tmp"), events)) as steps,
        _capture(run_dir / KFP_LOG_FILE, display, events) as tee,
        warnings.catch_warnings(),
    ):
        # No venv per step: the steps run in this Python environment, which has microfed installed. kfp.local
        # deletes its workspace after the pipeline (pipeline_orchestrator.run_local_pipeline); without
        # workspace_root it would be a mkdtemp() of its own, left behind if the run stops before the pipeline starts.
        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(run_dir / KFP_DIR),
            workspace_root=str(Path(tmp) / "kfp-workspace"),
            raise_on_error=True,
        )
        # kfp warns that a non-"python" image may not run in a subprocess; locally this environment is the image.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            # Locally the train step starts the workers as processes; compiled YAML defaults to PyTorchJob.
            # The measured-usage cache outlives a run: beside the run folders, unless the caller chose one.
            cache = arguments.get("usage_cache") or str(runs_dir.resolve() / USAGE_CACHE_FILE)
            task = microfed_pipeline(**{**arguments, "launcher": "local", "usage_cache": cache})
        except RuntimeError as e:
            raise _step_error(str(e), steps, tee.error, run_dir / KFP_LOG_FILE) from None
    total = time.perf_counter() - start
    # where each step's output is in kfp.local's pipeline root (`microfed export` finds the test images there)
    artifacts = _artifacts(task.outputs, run_dir)
    write_run_artifacts(run_dir, artifacts)
    model_dir, report_dir = run_dir / artifacts["global_model"], run_dir / artifacts["report"]
    for f in (GLOBAL_MODEL_FILE, MODEL_CONFIG_FILE):
        shutil.copy2(model_dir / f, run_dir / f)
    # the ONNX model and its sidecar (class names, input size), for `microfed predict` without torch
    for f in (ONNX_MODEL_FILE, SIDECAR_FILE):
        shutil.copy2(run_dir / artifacts["exported"] / f, run_dir / f)
    metrics = read_metrics(report_dir)
    steps_seconds = sum(metrics["timings"].values())
    metrics["timings"] = {**metrics["timings"], "orchestration": max(0.0, total - steps_seconds), "total": total}
    metrics["config"] = {**arguments, "launcher": "local"}
    write_metrics(run_dir, metrics)
    # the evaluate step's report, again with what only the whole run knows: total time, the CLI's arguments
    job, dataset = read_job_record(report_dir), read_dataset_manifest(report_dir)
    html = render_report(metrics, config=metrics["config"], dataset=dataset, workers=job["workers"])
    write_report(run_dir / REPORT_FILE, html)
    return RunResult(run_dir=run_dir, metrics=metrics)


def _artifacts(outputs: Any, run_dir: Path) -> RunArtifacts:
    """The local paths of the pipeline's outputs, relative to the run folder (which may move)."""

    def where(name: str) -> str:
        return os.path.relpath(Path(outputs[name].path).resolve(), run_dir.resolve())

    return {
        "shards": where("shards"),
        "micro_models": where("micro_models"),
        "global_model": where("global_model"),
        "report": where("report"),
        "exported": where("exported"),
    }


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


# --------------------------------------------------------------------------------------- a step's failure


def _step_error(kfp_message: str, steps: StepProcesses, log_error: str | None, log: Path) -> MicrofedError:
    """The run's error when kfp.local reports a failed step: the step's own error, as one line."""
    plain = _ANSI.sub("", kfp_message)
    task = m.group(1) if (m := _FAILED_TASK.search(plain)) else None
    records = read_error_records(steps.error_file)
    if task is None and not records:  # kfp.local itself failed, not a step
        return StepFailed(f"kfp.local failed: {plain}", hint=f"the full log is {log}")
    if records:
        record = records[-1]
        message = _one_line(str(record.get("message") or ""))
        own_hint = str(record.get("hint") or "")
        if record.get("user"):
            hint = f"{own_hint}; the full log is {log}" if own_hint else f"the full log is {log}"
            return MicrofedError(message, hint=hint)
        what = f"{record.get('type')}: {message}"
    else:  # the step recorded nothing: it was killed, or failed before its body ran
        what = log_error or _describe_exit(steps.returncode)
    return StepFailed(
        f"step {task or 'unknown'!r} failed with {what}",
        hint=f"not an input error microfed knows of, so likely a bug; the full log is {log}",
    )


def _one_line(message: str) -> str:
    """A step's error message as one line. A multi-line one is a failed worker's (its first line, then its log
    tail): the worker's own error when the tail holds one, else the first line and the tail's last exception
    line (where a traceback names the exception), else its last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    if len(lines) == 1:
        return lines[0]
    own = [m.group(1) for line in lines[1:] if (m := _WORKER_ERROR.search(line))]
    if own:
        return own[-1]
    raised = [m.group(0) for line in lines[1:] if (m := _TAIL_EXCEPTION.search(line))]
    return f"{lines[0]} … {raised[-1] if raised else lines[-1]}"


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"its process killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"its process killed by signal {-code}"
    return f"exit code {code}"


# -------------------------------------------------------------------------------------------- the log


class _Tee(io.TextIOBase):
    """Write everything to the run's log file, pass each line to the display, and remember the last exception
    line (the fallback for a step that could not record its error)."""

    def __init__(self, display: Display, log: TextIO) -> None:
        self.display, self.log = display, log
        self.error: str | None = None
        self._partial = ""

    def write(self, s: str) -> int:
        self.log.write(s)
        lines = (self._partial + s).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.display.line(line)
            m = _EXCEPTION_LINE.match(_ANSI.sub("", line).strip())
            if m:
                self.error = f"{m.group(1)}: {m.group(2)}"
        return len(s)

    def flush(self) -> None:
        self.log.flush()


@contextlib.contextmanager
def _capture(log_path: Path, display: Display, events: Path) -> Iterator[_Tee]:
    """kfp.local's output to the run's log (and, for --verbose, the display); the steps' events to the display."""
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        tee = _Tee(display, log)
        try:
            with follow_events(events, display), contextlib.redirect_stdout(tee):
                yield tee
        finally:
            display.close()
