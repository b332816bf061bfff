"""`microfed run`: the pipeline through kfp.local on this machine, collected into a run folder."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from microfed.pipelines.progress import Display, make_display
from microfed.training.errors import MicrofedError
from microfed.training.io import read_json, write_json
from microfed.training.model_files import MODEL_CONFIG_FILE, MODEL_FILE
from microfed.training.report import render_report, write_report

__all__ = ["RunResult", "run_local"]

# The last line of a failing step's traceback that names one of our errors: what the user should read.
# A worker's own error line, when present, comes after WorkerFailed's (it is in the log tail) and wins.
_ERROR_LINE = re.compile(
    r"^(?:microfed\.training\.\w+\.)?(MicrofedError|WorkerFailed|\[microfed worker\] error): (.*)$"
)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


class _Tee(io.TextIOBase):
    """Write everything to the run's log file, pass each line to the display, and remember the last error
    line of our own exception types."""

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
            m = _ERROR_LINE.match(line.strip())
            if m:
                self.error = m.group(2)
        return len(s)

    def flush(self) -> None:
        self.log.flush()


@contextlib.contextmanager
def _capture(log_path: Path, display: Display) -> Iterator[_Tee]:
    with open(log_path, "w") as log:
        tee = _Tee(display, log)
        try:
            with contextlib.redirect_stdout(tee):
                yield tee
        finally:
            display.close()


def run_local(
    arguments: dict[str, Any],
    runs_dir: str | Path = "runs",
    name: str | None = None,
    verbose: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Compile the pipeline, run it with kfp.local (workers as local processes), collect the run folder."""
    from kfp import local

    from microfed.pipelines.pipeline import compile_pipeline, microfed_pipeline

    run_dir = Path(runs_dir) / (name or time.strftime("%Y%m%d-%H%M%S"))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise MicrofedError(f"run folder {run_dir} already exists and is not empty", hint="choose another --name")
    run_dir.mkdir(parents=True, exist_ok=True)
    compile_pipeline(run_dir / "pipeline.yaml")
    # No venv per step: the steps run in this Python environment, which has microfed installed.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(run_dir / "kfp"), raise_on_error=True)
    start = time.perf_counter()
    tasks = yaml.safe_load((run_dir / "pipeline.yaml").read_text())["root"]["dag"]["tasks"]
    display = make_display(sys.stdout, verbose=verbose, quiet=quiet, steps=len(tasks))
    with _capture(run_dir / "kfp.log", display) as tee, warnings.catch_warnings():
        # kfp warns that a non-"python" image may not run in a subprocess; locally this environment is the image.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            # Locally the train step starts the workers as processes; compiled YAML defaults to PyTorchJob.
            # The measured-usage cache outlives a run: beside the run folders, unless the caller chose one.
            cache = arguments.get("usage_cache") or str(Path(runs_dir).resolve() / "usage-cache.json")
            task = microfed_pipeline(**{**arguments, "launcher": "local", "usage_cache": cache})
        except RuntimeError as e:
            raise MicrofedError(tee.error or str(e), hint=f"the full log is {run_dir / 'kfp.log'}") from None
    total = time.perf_counter() - start
    model_dir = Path(task.outputs["global_model"].path)
    report_dir = Path(task.outputs["report"].path)
    for f in (MODEL_FILE, MODEL_CONFIG_FILE):
        shutil.copy2(model_dir / f, run_dir / f)
    # the ONNX model and its sidecar (class names, input size), for `microfed predict` without torch
    exported = Path(task.outputs["exported"].path)
    for f in ("model.onnx", "model.json"):
        shutil.copy2(exported / f, run_dir / f)
    metrics: dict[str, Any] = read_json(report_dir / "metrics.json")
    steps = sum(metrics["timings"].values())
    metrics["timings"] = {**metrics["timings"], "orchestration": max(0.0, total - steps), "total": total}
    metrics["config"] = {**arguments, "launcher": "local"}
    write_json(run_dir / "metrics.json", metrics)
    # the evaluate step's report, again with what only the whole run knows: total time, the CLI's arguments
    job, dataset = read_json(report_dir / "job.json"), read_json(report_dir / "dataset.json")
    html = render_report(metrics, config=metrics["config"], dataset=dataset, workers=job["workers"])
    write_report(run_dir / "report.html", html)
    return RunResult(run_dir=run_dir, metrics=metrics)
