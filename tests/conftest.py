"""Shared fixtures: small, learnable synthetic datasets (so tests do not depend on downloads)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microfed.training.datasets import ImageData, LoadedDataset

# ONNX Runtime's telemetry writes under $HOME and uploads events unless this is set before it starts (its
# Privacy.md); tests that import onnxruntime directly must not leave those files behind.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

CLASSES = ("circle", "square", "triangle")


def pattern_images(labels: np.ndarray, side: int = 16, seed: int = 0) -> np.ndarray:
    """Grayscale images where the class decides which horizontal band is bright: easy to learn, not trivial."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), side, side), dtype=np.uint8)
    band = side // 3
    for i, y in enumerate(labels):
        images[i, y * band : (y + 1) * band, :] += 150
    return images


def synthetic_dataset(n_train: int = 90, n_test: int = 30, side: int = 16) -> LoadedDataset:
    def part(n: int, seed: int) -> ImageData:
        labels = np.arange(n) % len(CLASSES)
        images = pattern_images(labels, side, seed)
        return ImageData(
            images=torch.from_numpy(images).unsqueeze(1),
            labels=torch.from_numpy(labels).long(),
            class_names=CLASSES,
        )

    return LoadedDataset(name="synthetic", train=part(n_train, 1), test=part(n_test, 2))


def write_zip(
    path: Path,
    per_class_train: int = 30,
    per_class_test: int = 10,
    side: int = 16,
    top: str = "shapes/",
    with_test: bool = True,
) -> Path:
    """A zip in the reference platform's upload layout: top folder, train/ and test/, one folder per class."""
    with zipfile.ZipFile(path, "w") as zf:
        splits = [("train", per_class_train, 1)] + ([("test", per_class_test, 2)] if with_test else [])
        for split, n, seed in splits:
            labels = np.repeat(np.arange(len(CLASSES)), n)
            for i, (img, y) in enumerate(zip(pattern_images(labels, side, seed), labels, strict=True)):
                buf = io.BytesIO()
                Image.fromarray(img, mode="L").save(buf, format="PNG")
                zf.writestr(f"{top}{split}/{CLASSES[y]}/{i:04d}.png", buf.getvalue())
        zf.writestr(f"__MACOSX/{top}train/._junk", b"\0\1")
    return path


@pytest.fixture
def shapes_zip(tmp_path: Path) -> Path:
    return write_zip(tmp_path / "shapes.zip")
