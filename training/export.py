"""Export the global model for use outside this training code: ONNX (for ONNX Runtime) or TorchScript.

The exported graph takes what a decoder gives: uint8 images (N, C, H, W), any N. Normalisation happens inside
the graph ((x / 255 - mean) / std, as `train.Preprocess` computes it), so a caller only has to decode, convert
to the model's channels and resize. Beside the model file, `model.json` (the *sidecar*) records class names,
input size and channels, the normalisation, and for each exported format its file, opset and the *parity
check*: the exported model's logits against eager PyTorch on the same images, which must agree within a
tolerance (max absolute difference) or the export fails and nothing is written. The ONNX file also carries
class names and input description in its metadata (key `microfed`), so it works without the sidecar.

ONNX uses torch's TorchScript-based exporter (`dynamo=False`): it needs no extra packages, exports a model in
a fraction of the time the torch.export-based exporter takes, and its graphs match eager PyTorch to ~1e-6
on the models here. It is deprecated upstream; torch is capped below 2.15 in pyproject.toml, where it exists.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from microfed.training.errors import MicrofedError
from microfed.training.io import atomic_write_bytes, read_json, sha256_bytes, sha256_file, write_json
from microfed.training.layout import GLOBAL_MODEL_FILE, ONNX_MODEL_FILE, SIDECAR_FILE, TORCHSCRIPT_MODEL_FILE
from microfed.training.model_files import ModelCard, load_model
from microfed.training.predict import disable_onnxruntime_telemetry
from microfed.training.shards import load_test_set
from microfed.training.step_export import EXPORT_DEFAULTS

__all__ = [
    "EXPORT_FILES",
    "EXPORT_FORMATS",
    "ONNX_OPSET",
    "SIDECAR_FILE",
    "export_model",
    "parity_images_from_shards",
]

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
EXPORT_FILES: dict[str, str] = {"onnx": ONNX_MODEL_FILE, "torchscript": TORCHSCRIPT_MODEL_FILE}
SIDECAR_FORMAT = "microfed.export/v1"
# ONNX metadata_props key holding the model section of the sidecar (class names, input, preprocessing).
ONNX_METADATA_KEY = "microfed"
# Opset 17 is read by every ONNX Runtime since 1.14 (early 2023) and has every operator these models use.
ONNX_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# Parity batch when the caller gives no test images: random pixels, fixed seed, so reruns compare alike.
_RANDOM_PARITY_IMAGES = 32
_RANDOM_PARITY_SEED = 0


class _WithPreprocessing(nn.Module):
    """uint8 (N, C, H, W) -> logits: the normalisation of `train.Preprocess`, then the network."""

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, net: nn.Module, card: ModelCard) -> None:
        super().__init__()
        self.net = net
        channels = card.architecture.in_channels
        self.register_buffer("mean", torch.tensor(card.mean, dtype=torch.float32).view(1, channels, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(card.std, dtype=torch.float32).view(1, channels, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 255.0
        out: torch.Tensor = self.net((x - self.mean) * self.inv_std)
        return out


def export_model(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    fmt: str = EXPORT_DEFAULTS["export_format"],
    parity_images: torch.Tensor | None = None,
    tolerance: float = EXPORT_DEFAULTS["tolerance"],
    model_code: str | None = None,
    allow_changed_model_code: bool = False,
    trust_recorded_code: bool = False,
) -> dict[str, Any]:
    """Export the model in `model_dir` (model.safetensors + model_config.json) to `out_dir` as `fmt`.

    Writes `model.onnx` or `model.torchscript.pt` and the sidecar `model.json` (an existing sidecar for the
    same weights keeps its entries for other formats). `parity_images`: uint8 (N, C, H, W) images to compare
    the exported model with eager PyTorch on (e.g. `parity_images_from_shards`); None uses a fixed random
    batch. Raises MicrofedError, writing nothing, when the max absolute logit difference exceeds `tolerance`.

    A model built by a user factory exports only when the caller names its code (`model_code`) or trusts the
    folder's record (`trust_recorded_code`, the pipeline's own export step): see `model_files.load_model`.

    Returns this format's sidecar entry (file, sha256, bytes, opset, parity) plus `path` and `sidecar`.
    """
    if fmt not in EXPORT_FORMATS:
        raise MicrofedError(f"unknown export format {fmt!r} (--format)", hint=f"use one of {', '.join(EXPORT_FORMATS)}")
    if not (tolerance >= 0 and np.isfinite(tolerance)):
        raise MicrofedError(f"parity tolerance must be a finite number >= 0, got {tolerance}")
    model_dir, out = Path(model_dir), Path(out_dir)
    net, card = load_model(
        model_dir,
        model_code=model_code,
        allow_changed_model_code=allow_changed_model_code,
        trust_recorded_code=trust_recorded_code,
    )
    # Whatever the training used (channels_last, bf16 autocast), the export is plain fp32 NCHW in eval mode.
    net = net.float().to(memory_format=torch.contiguous_format)
    wrapped = _WithPreprocessing(net, card).eval()
    images = _parity_batch(parity_images, card)
    model_info = _model_info(card)
    with torch.no_grad(), torch.autocast("cpu", enabled=False), _quiet_deprecations():
        reference = wrapped(images).numpy()
        if not np.isfinite(reference).all():
            raise MicrofedError(
                f"{model_dir}: the model's logits are not finite (NaN or inf) on the parity images",
                hint="the weights diverged during training; train again with a lower --lr",
            )
        data, logits = _export_and_run(fmt, wrapped, images, model_info)
    parity = _parity(reference, logits, tolerance, _runtime_name(fmt))
    parity["data"] = "random uint8 images (seed 0)" if parity_images is None else "given images"
    if not parity["passed"]:
        diff = parity["max_abs_diff"]
        shown = "is not finite" if diff is None else f"{diff:.3g} >"
        raise MicrofedError(
            f"{fmt} export of {model_dir} disagrees with eager PyTorch: max |logit difference| {shown} "
            f"tolerance {tolerance:g} on {parity['images']} images; nothing written",
            hint="the other --format may export this architecture faithfully; report the model's architecture",
        )
    entry: dict[str, Any] = {
        "file": EXPORT_FILES[fmt],
        "sha256": sha256_bytes(data),
        "bytes": len(data),
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        "exporter": _exporter_name(fmt),
        "parity": parity,
    }
    # Model file first, sidecar last: a sidecar entry always describes a complete file.
    path = out / EXPORT_FILES[fmt]
    atomic_write_bytes(path, data)
    sidecar = _merged_sidecar(out / SIDECAR_FILE, model_info, sha256_file(model_dir / GLOBAL_MODEL_FILE), fmt, entry)
    write_json(out / SIDECAR_FILE, sidecar)
    return {**entry, "format": fmt, "path": str(path), "sidecar": str(out / SIDECAR_FILE)}


def parity_images_from_shards(shards_dir: str | Path, limit: int = EXPORT_DEFAULTS["parity_images"]) -> torch.Tensor:
    """The first `limit` test images of a shards folder (checksum verified), uint8 (N, C, H, W)."""
    if limit < 1:
        raise MicrofedError(f"parity image count must be at least 1, got {limit}")
    return load_test_set(shards_dir).images[:limit]


def _model_info(card: ModelCard) -> dict[str, Any]:
    """The format-independent part of the sidecar; also embedded in the ONNX file's metadata."""
    arch = card.architecture
    height, width = arch.image_size
    return {
        "class_names": list(card.class_names),
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NCHW",
            "channels": arch.in_channels,
            "height": height,
            "width": width,
            "color_mode": "L" if arch.in_channels == 1 else "RGB",
            "resize": "bilinear",
        },
        "output": {"name": OUTPUT_NAME, "kind": "logits", "num_classes": arch.num_classes},
        "preprocessing": {"in_graph": True, "scale": 1 / 255, "mean": list(card.mean), "std": list(card.std)},
        "architecture": arch.to_dict(),
    }


def _parity_batch(images: torch.Tensor | None, card: ModelCard) -> torch.Tensor:
    arch = card.architecture
    shape = (arch.in_channels, *arch.image_size)
    if images is None:
        generator = torch.Generator().manual_seed(_RANDOM_PARITY_SEED)
        return torch.randint(0, 256, (_RANDOM_PARITY_IMAGES, *shape), dtype=torch.uint8, generator=generator)
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != shape or len(images) == 0:
        raise MicrofedError(
            f"parity images must be uint8 (N, {', '.join(map(str, shape))}) with N >= 1, "
            f"got {images.dtype} {tuple(images.shape)}",
            hint="pass test images of the dataset the model was trained on (parity_images_from_shards)",
        )
    return images.detach().to("cpu").contiguous()


def _export_and_run(
    fmt: str, model: nn.Module, images: torch.Tensor, model_info: dict[str, Any]
) -> tuple[bytes, np.ndarray]:
    """The exported file's bytes, and the logits that file gives on `images` in its own runtime."""
    # Traced with a batch of two (the first image twice when there is only one): a batch of one lets the tracer
    # treat the batch dimension as the constant 1.
    if fmt == "onnx":
        data = _export_onnx(model, images[[0, -1]], model_info)
        return data, _run_onnx(data, images)
    data = _export_torchscript(model, images[[0, -1]])
    return data, _run_torchscript(data, images)


def _export_onnx(model: nn.Module, example: torch.Tensor, model_info: dict[str, Any]) -> bytes:
    import onnx

    with tempfile.TemporaryDirectory(prefix="microfed-export-") as tmp:
        path = Path(tmp) / ONNX_MODEL_FILE
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
        proto = onnx.load(str(path))
    proto.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps(model_info, sort_keys=True))
    proto.producer_name = "microfed"
    onnx.checker.check_model(proto, full_check=True)
    data: bytes = proto.SerializeToString()
    return data


def _run_onnx(data: bytes, images: torch.Tensor) -> np.ndarray:
    disable_onnxruntime_telemetry()  # before the import: ONNX Runtime reads it when it initializes
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    batch = images.numpy()
    logits: np.ndarray = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    # A second, batch-1 run proves the batch axis is really dynamic (a traced constant would fail here).
    single: np.ndarray = session.run([OUTPUT_NAME], {INPUT_NAME: batch[:1]})[0]
    return np.concatenate([logits, single])


def _export_torchscript(model: nn.Module, example: torch.Tensor) -> bytes:
    # check_trace would rerun the model on the example; the parity check below compares on more images,
    # through the saved file.
    traced = torch.jit.trace(model, (example,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _run_torchscript(data: bytes, images: torch.Tensor) -> np.ndarray:
    loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return np.concatenate([loaded(images).numpy(), loaded(images[:1]).numpy()])


def _parity(reference: np.ndarray, exported: np.ndarray, tolerance: float, runtime: str) -> dict[str, Any]:
    # `exported` holds the whole batch, then the first image alone again (see _run_onnx).
    expected = np.concatenate([reference, reference[:1]])
    if exported.shape != expected.shape:
        diff = float("inf")
    else:
        diff = float(np.max(np.abs(exported.astype(np.float64) - expected.astype(np.float64))))
    passed = bool(np.isfinite(diff) and diff <= tolerance)
    return {
        "max_abs_diff": diff if np.isfinite(diff) else None,
        "images": len(reference),
        "tolerance": tolerance,
        "passed": passed,
        "reference": "eager PyTorch, fp32, CPU",
        "runtime": runtime,
    }


def _exporter_name(fmt: str) -> str:
    how = "torch.onnx.export(dynamo=False)" if fmt == "onnx" else "torch.jit.trace"
    return f"torch {torch.__version__} {how}"


def _runtime_name(fmt: str) -> str:
    if fmt == "onnx":
        disable_onnxruntime_telemetry()
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"
    return f"torch {torch.__version__} torch.jit.load, CPU"


def _merged_sidecar(
    path: Path, model_info: dict[str, Any], source_sha256: str, fmt: str, entry: dict[str, Any]
) -> dict[str, Any]:
    """The sidecar with `fmt`'s entry; entries for other formats survive only if they export the same weights."""
    exports: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(MicrofedError, AttributeError, TypeError):
            old = read_json(path)
            if old.get("format") == SIDECAR_FORMAT and old.get("source", {}).get("sha256") == source_sha256:
                exports = {k: v for k, v in old.get("exports", {}).items() if k in EXPORT_FORMATS}
    exports[fmt] = entry
    return {
        "format": SIDECAR_FORMAT,
        **model_info,
        "source": {"file": GLOBAL_MODEL_FILE, "sha256": source_sha256},
        "exports": dict(sorted(exports.items())),
    }


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    # torch 2.14 warns on every use of the TorchScript-based ONNX exporter and of torch.jit; both are the
    # chosen tools here (see the module docstring), so the warnings would only be noise in a step's log.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        yield
