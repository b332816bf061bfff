"""The run report: one self-contained HTML page with the split audit, the rounds, the confusion matrix, the
resource plan, the timings and the configuration of a run.

The Kubeflow UI shows it as the evaluate step's HTML artifact and `microfed run` writes it into the run folder.
Everything is inline (CSS in a <style> element, plots as PNG data URIs, no script), so the page reads the same
offline, inside the UI's sandboxed iframe, or mailed to a colleague. Every string that comes from the run is
HTML-escaped: class names are users' folder names.

The page is built in four steps, one module each:

- report_data.py gathers the figures from the run's records into a `Run`;
- report_plots.py draws the plots (matplotlib's Agg canvas, no pyplot: the caller's matplotlib state is left
  as it was);
- report_sections.py writes the eight sections from the `Run` and the plots;
- report_html.py holds the HTML building blocks, the escaping and the page around the sections.

This module imports matplotlib (through the plots): import it inside the function that renders, after the CLI
has set MPLCONFIGDIR, as the evaluate step and `microfed run` do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from microfed.training.io import atomic_write_bytes
from microfed.training.report_data import Run, headline
from microfed.training.report_html import SECTION_IDS, page
from microfed.training.report_plots import plot_style
from microfed.training.report_sections import build_sections

__all__ = ["SECTION_IDS", "render_report", "write_report"]


def render_report(
    metrics: Mapping[str, Any],
    *,
    config: Mapping[str, Any],
    dataset: Mapping[str, Any] | None = None,
    workers: Sequence[Mapping[str, Any]] | None = None,
    plan: Mapping[str, Any] | None = None,
) -> str:
    """The report as one HTML page.

    metrics: what `evaluate_step` returns (metrics.json). An optional `micro_model_accuracy` list (test
        accuracy of each micro-model, by rank) makes the global-versus-micro-model comparison a test-set one.
    config: the run's parameters (pipeline arguments); shown as a table.
    dataset: the split step's dataset manifest (the split, its alpha and seed, image shape, normalisation).
    workers: the train step's worker records (job.json's `workers`): per-epoch loss and accuracy of every
        micro-model; without them the page uses metrics' per-round training loss only.
    plan: the resource plan of one replica; defaults to metrics' `resource_plan`.
    """
    run = Run.build(metrics, config, dataset, workers, plan)
    with plot_style():
        sections = build_sections(run)
    return page(headline(run), sections)


def write_report(path: str | Path, html_text: str) -> None:
    """Write the page atomically (readers see the old file or the whole new one)."""
    atomic_write_bytes(path, html_text.encode("utf-8"))
