"""How the run report writes its numbers and labels: accuracy and loss to four decimals, counts with thousands
separators, seconds with minutes beside them, bytes with their binary unit.

The tables and the plots share these, so a figure reads the same in both. Nothing here escapes HTML: the page
(report_html.py) escapes whatever text these return.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "LABEL_CHARS",
    "NONE",
    "NO_TEST_IMAGES",
    "TIMES",
    "acc",
    "clock",
    "integer",
    "loss",
    "nbytes",
    "seconds",
    "short",
    "value",
]

LABEL_CHARS = 18
NONE = "\u2013"  # en dash: no value
NO_TEST_IMAGES = "no test images"  # a class's accuracy when the test set has none of its images (metrics: null)
TIMES = "\u00d7"


def acc(v: float) -> str:
    return f"{v:.4f}"


def loss(v: float | None) -> str:
    return NONE if v is None else f"{v:.4f}"


def integer(v: int) -> str:
    return f"{int(v):,}"


def seconds(v: float) -> str:
    """Seconds as measured (two decimals under 10 s: the aggregate step takes hundredths), plus minutes."""
    text = f"{v:.2f} s" if v < 10 else f"{v:.1f} s"
    return f"{text} ({clock(v)})" if v >= 90 else text


def clock(v: float) -> str:
    minutes, secs = divmod(round(v), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def nbytes(v: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(v) >= size:
            return f"{integer(v)} ({v / size:.1f} {unit})"
    return integer(v)


def value(v: Any) -> str:
    """A configuration value as people write it: strings bare, everything else as JSON."""
    if isinstance(v, str):
        return v or "(empty)"
    return json.dumps(v, sort_keys=True)


def short(name: str, limit: int = LABEL_CHARS) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
