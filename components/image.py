"""The container image the components run in on a cluster (locally they run in this Python environment)."""

from __future__ import annotations

import os

__all__ = ["DEFAULT_IMAGE", "component_image"]

DEFAULT_IMAGE = "microfed:0.1.0"


def component_image() -> str:
    """`MICROFED_IMAGE` when set (read when the components module is imported, i.e. at compile time)."""
    return os.environ.get("MICROFED_IMAGE", DEFAULT_IMAGE)
