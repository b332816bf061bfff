"""Classify image files with an exported ONNX model, using ONNX Runtime, numpy and Pillow only (no torch).

    python -m microfed.training.predict runs/RUN/export/model.onnx photo.png more/*.jpg

prints one `path<TAB>label<TAB>probability` line per image. The model file carries its class names and input
description (ONNX metadata `microfed`, written by `export.export_model`); a `model.json` sidecar beside it is
the fallback. Each image is decoded the way the training data was: converted to the model's channels (L or
RGB; alpha dropped, 16-bit scaled), resized bilinearly to the model's input size, passed as uint8 NCHW; the
normalisation is inside the graph.

This module must not import torch (a test blocks it): a device that only predicts installs onnxruntime,
numpy and Pillow. Nor does it read model_config.json or load a model factory: the ONNX graph is the whole
model, so predicting with a run folder someone sent runs none of the Python code it names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from microfed.training.errors import MicrofedError
from microfed.training.image_decode import DECODE_ERRORS, decode_chw, decode_reason
from microfed.training.layout import ONNX_MODEL_FILE, SIDECAR_FILE
from microfed.training.text import printable

__all__ = ["Prediction", "Predictor", "add_arguments", "disable_onnxruntime_telemetry", "main", "predict", "run"]

ONNX_METADATA_KEY = "microfed"  # export.ONNX_METADATA_KEY; not imported from there, which imports torch
_DESCRIPTION = "Classify image files with a model exported by `microfed export` (ONNX Runtime, no torch)."
# Images decoded and run per ONNX Runtime call: bounds memory for long file lists.
_BATCH = 32
# ONNX Runtime's own switch for its telemetry, read once when the runtime initializes.
ORT_TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"


def disable_onnxruntime_telemetry() -> None:
    """Turn ONNX Runtime's telemetry off for this process, unless the user set ORT_DISABLE_TELEMETRY; call it
    before `import onnxruntime`.

    ONNX Runtime's official Linux and macOS builds start Microsoft's 1DS telemetry when the runtime initializes:
    it keeps a persistent device id and an offline event store (`onnxruntime.db`) under
    ~/.cache/Microsoft/DeveloperTools/.onnxruntime, writes a session file (`.ses`) in the temp folder, and uploads
    events to Microsoft. Its Privacy.md (in the wheel, section "Disabling Telemetry"): "Set
    `ORT_DISABLE_TELEMETRY=1` before ONNX Runtime initializes. [...] this prevents the uploader, events, and
    persistent device identifier from being created for the process lifetime". The Python API's
    `disable_telemetry_events()` is not enough: it suppresses later events only, with the uploader and its files
    already in place (onnxruntime/core/platform/telemetry_1ds.cc, `OneDsTelemetry::Initialize`).
    """
    os.environ.setdefault(ORT_TELEMETRY_ENV, "1")


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """The model's answer for one image."""

    path: str
    """The image file, as given."""
    label: str
    """The most probable class name."""
    index: int
    """Its class index (position in the model's class names)."""
    probability: float
    """Its softmax probability, in (0, 1]."""
    top: tuple[tuple[str, float], ...]
    """The `top_k` most probable (class name, probability) pairs, most probable first."""


@dataclass(frozen=True, kw_only=True)
class _InputSpec:
    channels: int
    height: int
    width: int
    class_names: tuple[str, ...]


class Predictor:
    """An ONNX Runtime session over an exported model, loaded once and reused for any number of images."""

    def __init__(self, model_path: str | Path, *, threads: int = 0) -> None:
        """`model_path`: the .onnx file, or a folder holding model.onnx. `threads`: intra-op threads (0: all)."""
        disable_onnxruntime_telemetry()
        import onnxruntime as ort  # imported here so `--help` and errors about arguments stay instant

        self.path = _resolve_model(Path(model_path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise MicrofedError(
                f"{self.path}: not an ONNX model ONNX Runtime can load ({str(exc).strip().splitlines()[0]})",
                hint="export it with `microfed export RUN_DIR --format onnx`",
            ) from None
        self.spec = _input_spec(self.path, self.session)
        self.input_name = self.session.get_inputs()[0].name

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for uint8 images (N, C, H, W) of the model's channels and size."""
        spec = self.spec
        if images.dtype != np.uint8 or images.shape[1:] != (spec.channels, spec.height, spec.width):
            raise MicrofedError(
                f"images must be uint8 (N, {spec.channels}, {spec.height}, {spec.width}), "
                f"got {images.dtype} {images.shape}"
            )
        out: np.ndarray = self.session.run(None, {self.input_name: np.ascontiguousarray(images)})[0]
        return out

    def predict(self, images: Sequence[str | Path], *, top_k: int = 1) -> list[Prediction]:
        """Decode, resize and classify each image file; errors name the file that cannot be read."""
        if top_k < 1:
            raise MicrofedError(f"top-k must be at least 1, got {top_k}")
        results: list[Prediction] = []
        for start in range(0, len(images), _BATCH):
            chunk = list(images[start : start + _BATCH])
            batch = np.stack([_load_image(path, self.spec) for path in chunk])
            probabilities = _softmax(self.logits(batch))
            results += [self._prediction(str(path), p, top_k) for path, p in zip(chunk, probabilities, strict=True)]
        return results

    def _prediction(self, path: str, probabilities: np.ndarray, top_k: int) -> Prediction:
        # Stable sort: equal probabilities keep class order, so results are reproducible.
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        names = self.spec.class_names
        top = tuple((names[i], float(probabilities[i])) for i in order)
        best = int(order[0])
        return Prediction(path=path, label=names[best], index=best, probability=top[0][1], top=top)


def predict(model_path: str | Path, images: Sequence[str | Path], *, top_k: int = 1) -> list[Prediction]:
    """Classify image files with the exported ONNX model at `model_path` (file, or folder with model.onnx)."""
    if not images:
        raise MicrofedError("no images to classify", hint="give one or more image files after the model")
    return Predictor(model_path).predict(images, top_k=top_k)


def _load_image(path: str | Path, spec: _InputSpec) -> np.ndarray:
    """One image file as uint8 (C, H, W) in the model's channels and size, decoded as the training data was
    (image_decode.py, shared with the split step)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return decode_chw(image, spec.channels, (spec.height, spec.width))
    except FileNotFoundError:
        raise MicrofedError(f"{path}: image file not found") from None
    except DECODE_ERRORS as exc:
        raise MicrofedError(
            f"{path}: cannot decode image ({decode_reason(exc)})", hint="give PNG, JPEG, BMP, GIF or WebP files"
        ) from None


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return result


def _resolve_model(path: Path) -> Path:
    if path.is_dir():
        path = path / ONNX_MODEL_FILE  # what a model folder is searched for
    if not path.is_file():
        raise MicrofedError(f"{path}: model file not found", hint="give the model.onnx that `microfed export` wrote")
    if path.suffix == ".pt":
        raise MicrofedError(
            f"{path}: predict runs ONNX models, not TorchScript",
            hint="export with `microfed export RUN_DIR --format onnx` and pass model.onnx",
        )
    return path


def _input_spec(path: Path, session: Any) -> _InputSpec:
    """Class names from the model's metadata (or the sidecar), geometry from the graph, checked against each other."""
    info = _model_info(path, session)
    graph_input = session.get_inputs()[0]
    shape = list(graph_input.shape)
    try:
        spec = _InputSpec(
            channels=int(info["input"]["channels"]),
            height=int(info["input"]["height"]),
            width=int(info["input"]["width"]),
            class_names=tuple(str(name) for name in info["class_names"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MicrofedError(f"{path}: model description is missing field {exc}") from None
    if graph_input.type != "tensor(uint8)" or len(shape) != 4 or shape[1:] != [spec.channels, spec.height, spec.width]:
        raise MicrofedError(
            f"{path}: graph input {graph_input.type} {shape} does not match the model description "
            f"(uint8 [batch, {spec.channels}, {spec.height}, {spec.width}])",
            hint="export the model again with `microfed export`",
        )
    classes = session.get_outputs()[0].shape[-1]
    if isinstance(classes, int) and classes != len(spec.class_names):
        raise MicrofedError(f"{path}: the model has {classes} outputs but {len(spec.class_names)} class names")
    return spec


def _model_info(path: Path, session: Any) -> dict[str, Any]:
    embedded = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    sidecar = path.parent / SIDECAR_FILE
    try:
        if embedded is not None:
            info: dict[str, Any] = json.loads(embedded)
            return info
        if sidecar.is_file():
            info = json.loads(sidecar.read_text())
            return info
    except json.JSONDecodeError as exc:
        raise MicrofedError(f"{path}: model description is not valid JSON ({exc})") from None
    raise MicrofedError(
        f"{path}: no class names: neither '{ONNX_METADATA_KEY}' metadata in the model nor {sidecar}",
        hint="export the model with `microfed export`, which writes both",
    )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add predict's arguments to `parser` (its own, or a `microfed predict` subparser)."""
    parser.add_argument("model", help="model.onnx written by `microfed export` (or the folder holding it)")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, GIF, WebP)")
    parser.add_argument("--top-k", type=int, default=1, help="also print the next most probable classes")
    return parser


def run(args: argparse.Namespace) -> int:
    """Print `path<TAB>label<TAB>probability` per image (more label/probability pairs with --top-k).

    Paths and class names are printed escaped (training/text.py): a class name comes from whoever trained the
    model, and one holding a tab, a newline or a terminal escape would otherwise forge columns and lines.
    """
    for p in predict(args.model, args.images, top_k=args.top_k):
        print("\t".join([printable(p.path), *(f"{printable(label)}\t{prob:.4f}" for label, prob in p.top)]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="microfed predict", description=_DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("microfed predict: interrupted", file=sys.stderr)
        return 130
    except MicrofedError as e:
        print(f"microfed predict: error: {printable(e.message)}", file=sys.stderr)
        if e.hint:
            print(f"microfed predict: hint: {printable(e.hint)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
