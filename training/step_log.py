"""The steps' progress lines: `[microfed] ...` on stdout, which `microfed run` follows (pipelines/progress.py)."""

from __future__ import annotations

__all__ = ["log"]


def log(message: str) -> None:
    """Print one progress line of a step, flushed at once: the line is read while the step runs."""
    print(f"[microfed] {message}", flush=True)
