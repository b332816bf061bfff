"""The export step: global model -> ONNX or TorchScript file, checked against eager PyTorch on test images.

A plain function over folders; the export component (components/steps.py) is one call into it. Folder arguments
may be local paths or gs:// URIs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from microfed.training.step_log import log
from microfed.training.storage import staged_input, staged_output

__all__ = ["export_step"]


def export_step(
    model_dir: str | Path,
    shards_dir: str | Path,
    out_dir: str | Path,
    *,
    fmt: str = "onnx",
    parity_images: int = 64,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """The global model as ONNX or TorchScript with its preprocessing, checked against eager PyTorch on test images."""
    from microfed.training.export import export_model, parity_images_from_shards

    with (
        staged_input(model_dir) as model_path,
        staged_input(shards_dir, only=["test.safetensors", "test.json"]) as shards,
        staged_output(out_dir) as out,
    ):
        images = parity_images_from_shards(shards, parity_images)
        record = export_model(
            model_path, out, fmt=fmt, parity_images=images, tolerance=tolerance, trust_recorded_code=True
        )
    log(
        f"export: {record['file']} ({record['bytes'] / 1e6:.1f} MB), max |logit difference| "
        f"{record['parity']['max_abs_diff']:.1e} on {record['parity']['images']} test images"
    )
    return record
