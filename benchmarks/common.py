"""What every benchmark row shares: the run's settings, interleaved repeats, the row record and its verdict.

Method (issue 17): every timed row runs each leg at least MIN_REPEATS times, interleaved (A B A B A B), so that
load on a shared machine falls on both legs alike. The ratio is taken per interleaved pair (r_i from repeat i;
always "ours relative to the alternative, higher is better"), and the row reports the median and the spread
(min-max) of each leg and of r. Verdict: "met" if min r >= goal, "missed" if max r < goal, otherwise
"within noise"; a timed row with fewer repeats (--quick --repeats 1, a smoke run) is "not repeated".
Reference numbers (measured elsewhere, e.g. the GKE reference) never enter `ours`/`alternative`: they go in a
row's `reference` field, with their source.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from microfed.training.datasets import LoadedDataset, load_dataset
from microfed.training.models import ModelConfig
from microfed.training.shards import subsample
from microfed.training.strategies import Strategy
from microfed.training.train import OptimConfig

FMNIST = ModelConfig(name="cnn-fmnist", num_classes=10, in_channels=1, image_size=(28, 28))
BATCH = 128
# What every benchmark's federated side trains with, fixed here rather than taken from the pipeline's defaults
# (which follow the measurements: issue 17 made them a global batch of 128 and an average every 4 steps): batch 128
# on each worker and the weights averaged at round ends only, FedAvg as Flower runs it, so that the rows compare
# the same algorithm and stay comparable with earlier results. time_to_accuracy.py measures the other settings.
BENCH_OPTIM = OptimConfig(batch_size=BATCH)
ROUND_END = {"batch_size": BATCH, "sync_every_steps": 0}
"""The same as pipeline arguments (`microfed run`, kfp.local)."""


def round_end(name: str = "fedavg", **settings: Any) -> Strategy:
    """Strategy `name` with the weights averaged at round ends only (ddp ignores the setting)."""
    return Strategy(name=name, sync_every_steps=0, **settings)


MIN_REPEATS = 3
VERDICTS = ("met", "missed", "within noise", "not repeated")
# numbers one row measures and a later row uses (the cluster projection)
MEASURED: dict[str, float] = {}


class SettingsError(ValueError):
    """A combination of bench.py's flags that cannot run; the message names the flag."""


@dataclass(frozen=True)
class Settings:
    """bench.py's flags as every row sees them."""

    quick: bool = False
    repeats: int = MIN_REPEATS
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise SettingsError(f"--device {self.device!r}: use cpu or cuda")
        if self.repeats < 1:
            raise SettingsError(f"--repeats {self.repeats}: at least {MIN_REPEATS}")
        if self.repeats < MIN_REPEATS and not (self.repeats == 1 and self.quick):
            raise SettingsError(
                f"--repeats {self.repeats}: a timed row needs at least {MIN_REPEATS} interleaved repeats "
                "(--repeats 1 is allowed only with --quick, for a smoke run)"
            )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SettingsError(
                f"--device cuda: no CUDA device is visible to torch {torch.__version__} "
                f"(CUDA build: {torch.version.cuda or 'no'}); run without --device cuda (the default is cpu)"
            )

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall time covers it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], Any], device: torch.device | None = None) -> float:
    """Wall seconds of one call of fn() (with the GPU's queue drained before and after on `device`)."""
    if device is not None:
        sync(device)
    start = time.perf_counter()
    fn()
    if device is not None:
        sync(device)
    return time.perf_counter() - start


def interleave(legs: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call every leg once per repeat, in order (A B A B ...): each leg's samples, one per repeat."""
    samples: dict[str, list[float]] = {name: [] for name in legs}
    for _ in range(repeats):
        for name, leg in legs.items():
            samples[name].append(float(leg()))
    return samples


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of `values`."""
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def pair_ratios(ours: Sequence[float], alternative: Sequence[float], higher_is_better: bool = True) -> list[float]:
    """r_i of each interleaved pair, as "ours relative to the alternative, higher is better"."""
    if len(ours) != len(alternative) or not ours:
        raise ValueError(f"pairs need as many samples on each side: {len(ours)} vs {len(alternative)}")
    return [o / a if higher_is_better else a / o for o, a in zip(ours, alternative, strict=True)]


def verdict(ratios: Sequence[float], goal: float, repeated: bool = True) -> str:
    """met: even the worst pair reaches the goal; missed: even the best pair falls short; else within noise."""
    if not repeated:
        return "not repeated"
    if min(ratios) >= goal:
        return "met"
    if max(ratios) < goal:
        return "missed"
    return "within noise"


def reference(value: float, unit: str, source: str) -> dict[str, Any]:
    """A number measured elsewhere (not in this run), with where it comes from."""
    return {"value": value, "unit": unit, "source": source}


def row(
    name: str,
    ours: float | Sequence[float],
    alternative: float | Sequence[float],
    unit: str,
    goal: float,
    note: str,
    higher_is_better: bool = True,
    *,
    reference: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One side-by-side row from each leg's samples (one per interleaved repeat, in the same order).

    A timing passes lists; its verdict is "not repeated" below MIN_REPEATS samples. A number that is not a
    timing (an accuracy) may pass single values: its verdict is the same rule on its one ratio. `ours` and
    `alternative` are medians; every sample stays in `samples`.
    """
    timing = not isinstance(ours, int | float)
    o = [float(v) for v in ours] if not isinstance(ours, int | float) else [float(ours)]
    a = [float(v) for v in alternative] if not isinstance(alternative, int | float) else [float(alternative)]
    ratios = pair_ratios(o, a, higher_is_better)
    so, sa, sr = spread(o), spread(a), spread(ratios)
    record: dict[str, Any] = {
        "row": name,
        "ours": so["median"],
        "alternative": sa["median"],
        "unit": unit,
        "ratio": sr["median"],
        "ours_spread": [so["min"], so["max"]],
        "alternative_spread": [sa["min"], sa["max"]],
        "ratio_spread": [sr["min"], sr["max"]],
        "samples": {"ours": o, "alternative": a, "ratio": ratios},
        "repeats": len(o),
        "higher_is_better": higher_is_better,
        "goal": goal,
        "verdict": verdict(ratios, goal, repeated=not timing or len(o) >= MIN_REPEATS),
        "note": note,
        **extra,
    }
    if reference is not None:
        record["reference"] = reference
    return record


def machine(device: str = "cpu") -> dict[str, Any]:
    """Where a results file was measured: commit, CPU, cores, torch, Python (and the GPU with --device cuda)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    info = {
        "commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["collective_backend"] = os.environ.get("MICROFED_BACKEND", "nccl")
    return info


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary name, so that a reader never sees half a results file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def fashion_mnist(n_train: int = 0, n_test: int = 0) -> LoadedDataset:
    """Fashion-MNIST, or a class-balanced subset of n_train / n_test examples (0 = all), the same every time."""
    data = load_dataset("fashion-mnist")
    return LoadedDataset(
        name=data.name, train=subsample(data.train, n_train, seed=0), test=subsample(data.test, n_test, seed=0)
    )
