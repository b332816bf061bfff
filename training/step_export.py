"""The export step: global model -> ONNX or TorchScript file, checked against eager PyTorch on test images.

A plain function over folders; the export component (components/steps.py) is one call into it. Folder arguments
may be local paths or gs:// URIs.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from microfed.training.layout import TEST_FILES
from microfed.training.step_log import log, step
from microfed.training.storage import is_gcs, staged_input, staged_output

__all__ = ["EXPORT_DEFAULTS", "export_step"]

# The export's settings and their defaults, for `microfed export` and this step; the export component repeats them
# as literals (KFP ships its source alone) and tests/test_config.py checks that they agree.
EXPORT_DEFAULTS: dict[str, Any] = {"export_format": "onnx", "parity_images": 64, "tolerance": 1e-4}


@step("export")
def export_step(
    model_dir: str | Path,
    shards_dir: str | Path | None,
    out_dir: str | Path,
    *,
    fmt: str = EXPORT_DEFAULTS["export_format"],
    parity_images: int = EXPORT_DEFAULTS["parity_images"],
    tolerance: float = EXPORT_DEFAULTS["tolerance"],
    model_code: str | None = None,
    allow_changed_model_code: bool = False,
    trust_recorded_code: bool = True,
) -> dict[str, Any]:
    """The global model as ONNX or TorchScript with its preprocessing, checked against eager PyTorch on
    `parity_images` test images of `shards_dir` (None: a fixed random batch, for a run whose shards are gone).

    The pipeline's export trusts the code its own run recorded (`trust_recorded_code`); `microfed export`, which
    may be handed any folder, does not, and loads a factory only from `model_code` (model_files.load_model)."""
    # a local output folder this export creates is removed again when it fails: no empty or partial folder stays
    created = not is_gcs(out_dir) and not Path(out_dir).exists()
    try:
        record = _export(
            model_dir,
            shards_dir,
            out_dir,
            fmt=fmt,
            parity_images=parity_images,
            tolerance=tolerance,
            model_code=model_code,
            allow_changed_model_code=allow_changed_model_code,
            trust_recorded_code=trust_recorded_code,
        )
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    parity = record["parity"]
    log(
        f"export: {record['file']} ({record['bytes'] / 1e6:.1f} MB); parity: max |logit difference| "
        f"{parity['max_abs_diff']:.1e} on {parity['images']} {'test' if shards_dir is not None else 'random'} "
        f"images (tolerance {tolerance:g})"
    )
    return record


def _export(
    model_dir: str | Path,
    shards_dir: str | Path | None,
    out_dir: str | Path,
    *,
    parity_images: int,
    **options: Any,
) -> dict[str, Any]:
    from microfed.training.export import export_model, parity_images_from_shards

    with contextlib.ExitStack() as stack:
        model_path = stack.enter_context(staged_input(model_dir))
        images = None
        if shards_dir is not None:
            shards = stack.enter_context(staged_input(shards_dir, only=[*TEST_FILES]))
            images = parity_images_from_shards(shards, parity_images)
        out = stack.enter_context(staged_output(out_dir))
        return export_model(model_path, out, parity_images=images, **options)
