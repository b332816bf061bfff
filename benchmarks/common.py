"""What every benchmark row shares: the side-by-side row record, best-of timing, the reference model."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from microfed.training.datasets import LoadedDataset, load_dataset
from microfed.training.models import ModelConfig
from microfed.training.shards import subsample

FMNIST = ModelConfig(name="cnn-fmnist", num_classes=10, in_channels=1, image_size=(28, 28))
BATCH = 128
# numbers one row measures and a later row uses (the cluster projection)
MEASURED: dict[str, float] = {}


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Best of `repeat` wall times of fn() (best, not mean: noise on a shared machine only adds time)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def row(
    name: str,
    ours: float,
    alternative: float,
    unit: str,
    goal: float,
    note: str,
    higher_is_better: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """One side-by-side row; the ratio is always "ours relative to the alternative, higher is better"."""
    ratio = ours / alternative if higher_is_better else alternative / ours
    return {
        "row": name,
        "ours": ours,
        "alternative": alternative,
        "unit": unit,
        "ratio": ratio,
        "goal": goal,
        "met": ratio >= goal,
        "note": note,
        **extra,
    }


def fashion_mnist(n_train: int = 0, n_test: int = 0) -> LoadedDataset:
    """Fashion-MNIST, or a class-balanced subset of n_train / n_test examples (0 = all), the same every time."""
    data = load_dataset("fashion-mnist")
    return LoadedDataset(
        name=data.name, train=subsample(data.train, n_train, seed=0), test=subsample(data.test, n_test, seed=0)
    )
