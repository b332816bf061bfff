"""The run report's plots: split audit, rounds, global versus micro-models, confusion matrix; each returned as a
PNG data URI for the page to embed.

Plots are drawn on matplotlib's Agg canvas without pyplot, and `plot_style` sets rcParams only inside a
`with`, so rendering a report leaves the caller's matplotlib state (a notebook's backend, rcParams) as it was.
Class names reach matplotlib as plain text: math text is off, so `$x^2$` is drawn as typed.

Only the report imports this module, and only the evaluate step and `microfed run` import the report, after the
CLI has set MPLCONFIGDIR: keep it that way (no import of this module at another module's top level).
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from microfed.training import report_format as fmt
from microfed.training.report_data import Micro, Run

__all__ = ["comparison_plot", "confusion_plot", "plot_style", "rounds_plot", "split_plot"]

_DPI = 100  # small PNGs: a 10-class, 8-shard report is about 120 KB
_GLOBAL_COLOR = "#1f4e79"
_BEST_COLOR = "#2ca02c"
_WORST_COLOR = "#d62728"
_MICRO_COLOR = "#9fb6cd"
# Annotating every cell of a confusion matrix stays readable up to this many classes.
_ANNOTATE_CLASSES = 20
_LEGEND_CLASSES = 20


@contextmanager
def plot_style() -> Iterator[None]:
    """The report's rcParams and warning filter, for as long as the `with` lasts."""
    with matplotlib.rc_context({"text.parse_math": False, "font.size": 9}), warnings.catch_warnings():
        # a class name in a script DejaVu Sans lacks draws as boxes; the tables still show it exactly
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        yield


def _png(fig: Figure) -> str:
    """The figure as a data: URI (PNG, no timestamps or software tags, so equal inputs give equal pages)."""
    FigureCanvasAgg(fig)
    rgba = io.BytesIO()
    fig.savefig(rgba, format="png", dpi=_DPI, metadata={"Software": None})
    # A 256-colour palette keeps anti-aliased lines smooth and makes the PNG about a third of the RGBA one.
    with Image.open(rgba) as im:
        palette = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _class_colors(n: int) -> list[Any]:
    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


# ---------------------------------------------------------------------------------------------- split audit


def split_plot(hist: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    """Stacked bars per shard: examples by class (left) and each shard's class mix (right)."""
    k, n = len(hist), len(classes)
    fig, (ax_n, ax_share) = _figure(min(14.0, 6.5 + 0.5 * k), 3.4, ncols=2)
    colors = _class_colors(n)
    xs = list(range(k))
    sizes = [sum(h) for h in hist]
    for ax, scale in ((ax_n, [1.0] * k), (ax_share, [1 / max(1, s) for s in sizes])):
        bottom = [0.0] * k
        for c in range(n):
            heights = [hist[i][c] * scale[i] for i in xs]
            ax.bar(xs, heights, bottom=bottom, color=colors[c], width=0.8, label=fmt.short(classes[c]), linewidth=0)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_xticks(xs if k <= 24 else xs[:: math.ceil(k / 24)])
        ax.set_xlabel("shard (worker rank)")
        ax.spines[["top", "right"]].set_visible(False)
    ax_n.set_ylabel("training examples")
    ax_n.set_title("examples per shard, by class")
    ax_share.set_ylabel("share of the shard")
    ax_share.set_ylim(0, 1)
    ax_share.set_title("class mix of each shard")
    if k <= 16:
        for i, s in enumerate(sizes):
            ax_n.annotate(
                f"{s:,}", (i, s), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points"
            )
        ax_n.margins(y=0.1)
    if n <= _LEGEND_CLASSES:
        fig.legend(*ax_n.get_legend_handles_labels(), loc="outside right center", fontsize=8, frameon=False)
    return _png(fig)


# --------------------------------------------------------------------------------------------------- rounds


def rounds_plot(run: Run) -> str:
    """Accuracy and loss per round: the global model's evaluations over the micro-models' training curves."""
    fig, (ax_acc, ax_loss) = _figure(11.0, 3.6, ncols=2)
    many = len(run.micros) > 8
    for m in run.micros:
        color = _MICRO_COLOR if many else None
        label = None if many else f"micro-model {m.rank} (train)"
        if m.accuracy:
            ax_acc.plot(m.x, m.accuracy, lw=1, alpha=0.8, color=color, label=label)
        ax_loss.plot(m.x, m.loss, lw=1, alpha=0.8, color=color, label=label)
    if many:  # one legend entry for the bundle of micro-model lines
        ax_loss.plot([], [], color=_MICRO_COLOR, label=f"micro-models 0..{len(run.micros) - 1} (train)")
    label = f"global model ({run.round_split})"
    ax_acc.plot(run.global_rounds, run.accuracies, "o-", color=_GLOBAL_COLOR, lw=2.2, label=label)
    known = [(r, v) for r, v in zip(run.global_rounds, run.global_loss, strict=True) if v is not None]
    ax_loss.plot([r for r, _ in known], [v for _, v in known], "o-", color=_GLOBAL_COLOR, lw=2.2, label=label)
    selected = run.metrics.get("selected_round")
    if selected in run.global_rounds:
        ax_acc.plot([selected], [run.accuracies[run.global_rounds.index(selected)]], "*", ms=14, color=_GLOBAL_COLOR)
    _round_axes(run, ax_acc, ax_loss)
    _legend_below(fig, ax_loss)
    return _png(fig)


def _round_axes(run: Run, ax_acc: Axes, ax_loss: Axes) -> None:
    for ax, name in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.set_xlabel("round (micro-model lines: one point per local epoch)" if run.workers else "round")
        ax.set_ylabel(name)
        ax.set_xticks(
            range(1, run.rounds + 1) if run.rounds <= 20 else range(1, run.rounds + 1, math.ceil(run.rounds / 20))
        )
        ax.set_xlim(0 if run.workers else 0.8, run.rounds + 0.2)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    ax_acc.set_title("accuracy per round")
    ax_loss.set_title("loss per round")


def _legend_below(fig: Figure, ax_loss: Axes) -> None:
    """The loss panel's legend below the panels (so no entry hides a curve), the global model first."""
    handles, labels = ax_loss.get_legend_handles_labels()
    ncol = min(5, len(handles))
    reading = [len(handles) - 1, *range(len(handles) - 1)]  # the global model (drawn last) first
    order = [reading[i] for i in _row_major(len(handles), ncol)]
    fig.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="outside lower center",
        ncol=ncol,
        fontsize=8,
        frameon=False,
    )


def _row_major(n: int, ncol: int) -> list[int]:
    """Matplotlib fills legend columns first; this order makes entries read left to right, row by row."""
    rows = math.ceil(n / ncol)
    return [r * ncol + c for c in range(ncol) for r in range(rows) if r * ncol + c < n]


# -------------------------------------------------------------------------------- global vs micro-models


def comparison_plot(run: Run, ranked: Sequence[Micro]) -> str:
    """Horizontal bars: the global model's test accuracy, then the micro-models best first (best and worst
    coloured)."""
    test = run.micro_test_known
    values = [(m.test_accuracy if test else m.accuracy[-1]) or 0.0 for m in ranked]
    labels = ["global model (test)"] + [f"micro-model {m.rank} ({'test' if test else 'train'})" for m in ranked]
    colors = [_GLOBAL_COLOR] + [_MICRO_COLOR] * len(ranked)
    colors[1], colors[-1] = _BEST_COLOR, _WORST_COLOR  # ranked best first
    if len(ranked) == 1:
        colors[1] = _MICRO_COLOR
    shown = [float(run.metrics["accuracy"]), *values]
    fig, (ax,) = _figure(7.5, 0.9 + 0.32 * len(shown))
    ys = list(range(len(shown)))[::-1]
    ax.barh(ys, shown, color=colors, height=0.7)
    for y, v in zip(ys, shown, strict=True):
        ax.annotate(fmt.acc(v), (v, y), va="center", fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.set_yticks(ys, labels, fontsize=8)
    low = min(shown)
    ax.set_xlim(max(0.0, low - (1 - low) * 0.6 - 0.02), 1.0)
    ax.set_xlabel("accuracy")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


# ------------------------------------------------------------------------------------------ confusion matrix


def confusion_plot(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    """Heat map of the row shares (true class), with counts in the cells up to `_ANNOTATE_CLASSES` classes."""
    n = len(classes)
    side = min(11.0, max(4.2, 0.36 * n + 1.9))
    fig, (ax,) = _figure(side + 1.3, side)
    rates = [[v / max(1, sum(row)) for v in row] for row in matrix]
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [fmt.short(c) for c in classes]
    ticks = list(range(n)) if n <= 40 else list(range(0, n, math.ceil(n / 40)))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= _ANNOTATE_CLASSES:
        size = 7.5 if n <= 10 else 6
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    color = "white" if rates[i][j] > 0.5 else "#222222"
                    ax.text(j, i, f"{v:,}", ha="center", va="center", fontsize=size, color=color)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class (row)")
    return _png(fig)
