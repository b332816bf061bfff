"""The checks and choices RunConfig's fields are built from (training/config.py): the allowed names, the number
ranges and their messages, and `param`, which attaches a field's default, help and range.

No torch here: the CLI reads this module before it imports anything heavy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import field
from typing import Any

from microfed.training.dataset_limits import MAX_IMAGE_PIXELS
from microfed.training.errors import MicrofedError

__all__ = [
    "AUGMENTATIONS",
    "BAD_IMAGES",
    "FLOAT32_MAX",
    "LAUNCHERS",
    "MAX_EXACT_INT",
    "MAX_NUMBERED",
    "MIN_IMAGE_SIDE",
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "SPLIT",
    "RUN",
    "SPLITS",
    "SUBMIT",
    "TRAIN",
    "SYNC_OPTIMIZER",
    "check_choice",
    "check_image_size",
    "check_ranges",
    "param",
    "parse_ratios",
    "require_float",
    "require_int",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
AUGMENTATIONS = ("none", "flip", "crop", "crop-flip")
PRECISIONS = ("auto", "fp32", "bf16")
SYNC_OPTIMIZER = ("local", "average", "reset")
SPLITS = ("stratified", "iid", "dirichlet")
LAUNCHERS = ("auto", "trainjob", "pytorchjob", "local")
BAD_IMAGES = ("fail", "skip")
# Smallest side (pixels) an image may have; the two 2x2 poolings of the CNNs (training/models.py) need at least 4,
# and anything below 8 is almost certainly a mix-up of height and channels.
MIN_IMAGE_SIDE = 8
# The learning rate, weight decay, mu and the server learning rate become float32 scalars of torch operations: a
# larger value is inf there.
FLOAT32_MAX = 3.4028234663852886e38
# KFP carries parameters as JSON / protobuf numbers (doubles): a larger integer changes on its way to a step.
MAX_EXACT_INT = 2**53 - 1
# Shard, worker-log, micro-model and round-checkpoint files are numbered with five digits.
MAX_NUMBERED = 99_999
_KFP_EXACT = "larger integers change on their way through KFP, which carries numbers as doubles"


def require_float(
    name: str,
    value: object,
    *,
    low: float,
    high: float,
    low_ok: bool = True,
    high_ok: bool = True,
    flag: str = "",
    pipeline: bool = False,
    why: str = "",
) -> None:
    """Refuse a value that is not a finite number in the range: one line naming `name` (the field), and in the
    hint `why`, the worker's `flag` and, with `pipeline`, the pipeline parameter of the same name.

    A run started from the Kubeflow UI reaches the configuration without the CLI's checks, and a nan passes every
    `value < 0` test: each configuration checks its own numbers with this."""
    try:
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (low <= value if low_ok else low < value)
            and (value <= high if high_ok else value < high)
        )
    except OverflowError:  # an int beyond any float
        ok = False
    if not ok:
        lower = f"at least {low:g}" if low_ok else f"greater than {low:g}"
        upper = f"at most {high:g}" if high_ok else f"less than {high:g}"
        hint = "; ".join(h for h in (why, _where(name, flag, pipeline)) if h)
        raise MicrofedError(f"{name} must be a finite number {lower} and {upper}, got {value!r}", hint=hint)


def require_int(
    name: str, value: object, *, low: int, high: int, flag: str = "", pipeline: bool = False, why: str = ""
) -> None:
    """Refuse a value that is not an integer (a bool is not one) from `low` to `high`, as `require_float` does."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        hint = "; ".join(h for h in (why, _where(name, flag, pipeline)) if h)
        raise MicrofedError(f"{name} must be an integer from {low:,} to {high:,}, got {value!r}", hint=hint)


def _where(name: str, flag: str, pipeline: bool) -> str:
    """Where the value is set: the pipeline parameter (the Kubeflow UI) and the flag (`microfed`, the worker)."""
    if pipeline:
        return f"set the pipeline parameter {name}" + (f" ({flag})" if flag else "")
    return f"set {flag}" if flag else ""


# Where a parameter goes besides the pipeline: the components that take it, the CLI commands, the worker's flags.
SPLIT, TRAIN = "split_dataset", "train"
RUN, SUBMIT = "run", "submit"


def param(
    default: Any,
    help: str,
    *,
    steps: tuple[str, ...],
    cli: tuple[str, ...] = (RUN, SUBMIT),
    worker: bool = False,
    ints: tuple[int, int, str] | None = None,
    floats: tuple[float, bool, float, bool] | None = None,
) -> Any:
    """A config field: its default, its one-line help (CLI and worker --help), the components that take it
    (`steps`), the `microfed` commands that have it as an option (`cli`), whether it is a worker flag, and its
    range: `ints` (least, most, why) or `floats` (least, least allowed, most, most allowed; always finite)."""
    meta = {"help": help, "steps": steps, "cli": cli, "worker": worker, "ints": ints, "floats": floats}
    return field(default=default, metadata=meta)


def check_image_size(size: object) -> None:
    """0 keeps the images' size; else the side of the square images: as large as one image may be when decoded."""
    most = math.isqrt(MAX_IMAGE_PIXELS)
    if not isinstance(size, int) or isinstance(size, bool) or not (size == 0 or MIN_IMAGE_SIDE <= size <= most):
        raise MicrofedError(
            f"image_size must be 0 (keep the images' size) or from {MIN_IMAGE_SIDE} to {most}, got {size!r}",
            hint=f"the models need at least {MIN_IMAGE_SIDE} pixels a side; one image may have at most "
            f"{MAX_IMAGE_PIXELS:,} pixels (--image-size)",
        )


def check_choice(name: str, value: str, allowed: Iterable[str]) -> None:
    """Refuse a value that is not one of `allowed`, naming the field and its flag."""
    allowed = tuple(allowed)
    if value not in allowed:
        flag = "--" + name.replace("_", "-")
        raise MicrofedError(f"unknown {name} {value!r}", hint=f"use one of {', '.join(allowed)} ({flag})")


def parse_ratios(text: str) -> tuple[float, ...] | None:
    """`"1,2,1"` → (1.0, 2.0, 1.0); an empty string means equal shard sizes (None)."""
    if not text.strip():
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise MicrofedError(
            f"split_ratios {text!r} is not a comma-separated list of numbers", hint="e.g. --split-ratios 1,2,1"
        ) from None


def check_ranges(section: object, *, names: Iterable[str] | None = None) -> None:
    """Refuse a field of `section` outside its range (`param(ints=...)`, `param(floats=...)`), naming the field,
    the pipeline parameter and the worker's or the CLI's flag."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        if names is not None and f.name not in names:
            continue
        value, flag = getattr(section, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, str) and "\0" in value:
            raise MicrofedError(f"{f.name} {value!r} holds a NUL character", hint=f"check the value of {flag}")
        if f.metadata.get("ints"):
            low, high, why = f.metadata["ints"]
            require_int(f.name, value, low=low, high=high, flag=flag, pipeline=True, why=why)
        elif f.metadata.get("floats"):
            low_f, low_ok, high_f, high_ok = f.metadata["floats"]
            require_float(
                f.name, value, low=low_f, low_ok=low_ok, high=high_f, high_ok=high_ok, flag=flag, pipeline=True
            )
