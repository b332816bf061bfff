"""The run report: one self-contained HTML page with the split audit, the rounds, the confusion matrix, the
resource plan, the timings and the configuration of a run.

The Kubeflow UI shows it as the evaluate step's HTML artifact and `microfed run` writes it into the run folder.
Everything is inline (CSS in a <style> element, plots as PNG data URIs, no script), so the page reads the same
offline, inside the UI's sandboxed iframe, or mailed to a colleague. Every string that comes from the run is
HTML-escaped: class names are users' folder names.

Nothing is hidden or counted as a failure it is not: images that `--bad-images skip` left out are counted and
named on the first screen, and a class without test images shows "no test images" (metrics' null), is left out
of the weakest/strongest class and of the mean class accuracy, and is named.

Plots are drawn on matplotlib's Agg canvas without pyplot, so rendering a report leaves the caller's matplotlib
state (a notebook's backend, rcParams) as it was.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from microfed.training.io import atomic_write_bytes

__all__ = ["SECTION_IDS", "render_report", "write_report"]

SECTION_IDS = (
    "summary",
    "split-audit",
    "rounds",
    "global-vs-micro",
    "confusion-matrix",
    "resource-plan",
    "timings",
    "configuration",
)
"""The `id` of each section of the page, in order (links in the page's navigation point at them)."""

_DPI = 100  # small PNGs: a 10-class, 8-shard report is about 120 KB
_GLOBAL_COLOR = "#1f4e79"
_BEST_COLOR = "#2ca02c"
_WORST_COLOR = "#d62728"
_MICRO_COLOR = "#9fb6cd"
# Annotating every cell of a confusion matrix stays readable up to this many classes.
_ANNOTATE_CLASSES = 20
_LEGEND_CLASSES = 20
_LABEL_CHARS = 18
_NONE = "\u2013"  # en dash: no value
_NO_TEST_IMAGES = "no test images"  # a class's accuracy when the test set has none of its images (metrics: null)
_TIMES = "\u00d7"


# ---------------------------------------------------------------------------------------------- entry points


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
    dataset: the split step's dataset.json (split strategy, alpha, seed, image shape, normalisation).
    workers: the train step's worker records (job.json's `workers`): per-epoch loss and accuracy of every
        micro-model; without them the page uses metrics' per-round training loss only.
    plan: the resource plan of one replica; defaults to metrics' `resource_plan`.
    """
    run = _Run.build(metrics, config, dataset, workers, plan)
    with matplotlib.rc_context({"text.parse_math": False, "font.size": 9}), warnings.catch_warnings():
        # a class name in a script DejaVu Sans lacks draws as boxes; the tables still show it exactly
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        sections = [
            _summary_section(run),
            _split_section(run),
            _rounds_section(run),
            _comparison_section(run),
            _confusion_section(run),
            _plan_section(run),
            _timings_section(run),
            _config_section(run),
        ]
    return _page(run, sections)


def write_report(path: str | Path, html_text: str) -> None:
    """Write the page atomically (readers see the old file or the whole new one)."""
    atomic_write_bytes(path, html_text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------ run model


@dataclass(frozen=True)
class _Micro:
    """One micro-model's training history: loss (and accuracy, when known) at positions in round units."""

    rank: int
    n_k: int
    x: list[float]
    loss: list[float]
    accuracy: list[float]
    round_loss: list[float]
    """Loss of the last local epoch of each round (metrics' `train_loss`)."""
    test_accuracy: float | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class _Run:
    metrics: Mapping[str, Any]
    config: Mapping[str, Any]
    dataset: Mapping[str, Any]
    plan: Mapping[str, Any] | None
    classes: list[str]
    histograms: list[list[int]]
    rounds: int
    global_rounds: list[int]
    """Round number of each entry of metrics' `round_accuracy` (the last one is round `rounds`)."""
    global_loss: list[float | None]
    micros: list[_Micro] = field(default_factory=list)
    workers: Sequence[Mapping[str, Any]] = ()

    @classmethod
    def build(
        cls,
        metrics: Mapping[str, Any],
        config: Mapping[str, Any],
        dataset: Mapping[str, Any] | None,
        workers: Sequence[Mapping[str, Any]] | None,
        plan: Mapping[str, Any] | None,
    ) -> _Run:
        workers = list(workers or [])
        rounds = _num_rounds(metrics, config, workers)
        global_rounds, global_loss = _global_history(metrics, workers, rounds)
        return cls(
            metrics=metrics,
            config=config,
            dataset=dataset or {},
            plan=plan if plan is not None else metrics.get("resource_plan"),
            classes=[str(c) for c in metrics["class_names"]],
            histograms=[list(h) for h in metrics.get("shard_class_histograms") or []],
            rounds=rounds,
            global_rounds=global_rounds,
            global_loss=global_loss,
            micros=_micros(metrics, workers),
            workers=workers,
        )

    @property
    def accuracies(self) -> list[float]:
        return [float(a) for a in self.metrics.get("round_accuracy") or [self.metrics["accuracy"]]]

    @property
    def round_split(self) -> str:
        """What the per-round accuracies were measured on: "validation" or "test"."""
        return str(self.metrics.get("round_split") or "test")

    @property
    def micro_test_known(self) -> bool:
        return bool(self.micros) and all(m.test_accuracy is not None for m in self.micros)


def _num_rounds(metrics: Mapping[str, Any], config: Mapping[str, Any], workers: Sequence[Mapping[str, Any]]) -> int:
    known = len(metrics.get("round_accuracy") or [1])
    if metrics.get("train_loss"):
        return max(known, len(metrics["train_loss"][0]))
    if workers:
        return max(known, len(workers[0]["rounds"]))
    return max(known, int(config.get("rounds") or 0))


def _global_history(
    metrics: Mapping[str, Any], workers: Sequence[Mapping[str, Any]], rounds: int
) -> tuple[list[int], list[float | None]]:
    """Round numbers and losses of the global model's evaluations (on the validation split, or on the test set
    when none was held out: rounds 1..R-1 in the job, R at the end)."""
    n = len(metrics.get("round_accuracy") or [1])
    numbers, losses = metrics.get("round_numbers"), metrics.get("round_loss")
    if numbers and losses and len(numbers) == len(losses) == n:
        return [int(r) for r in numbers], [None if v is None else float(v) for v in losses]
    evaluated = [r for r in (workers[0]["rounds"][:-1] if workers else []) if "test_accuracy" in r]
    if workers and len(evaluated) + 1 == n:
        return [int(r["round"]) for r in evaluated] + [rounds], [r.get("test_loss") for r in evaluated] + [
            float(metrics["loss"])
        ]
    # no worker records: the evaluations are the last n rounds (all of them unless per-round evaluation was off)
    return list(range(rounds - n + 1, rounds + 1)), [None] * (n - 1) + [float(metrics["loss"])]


def _micros(metrics: Mapping[str, Any], workers: Sequence[Mapping[str, Any]]) -> list[_Micro]:
    round_loss = [[float(v) for v in losses] for losses in metrics.get("train_loss") or []]
    sizes = list(metrics.get("shard_sizes") or [])
    tests = list(metrics.get("micro_model_accuracy") or [])
    out = []
    for k in range(max(len(round_loss), len(workers))):
        x, loss, acc = _epoch_history(workers[k]) if k < len(workers) else ([], [], [])
        per_round = round_loss[k] if k < len(round_loss) else [loss[i - 1] for i in _round_ends(x)]
        if not x:  # metrics only: one point per round
            x, loss = [float(r) for r in range(1, len(per_round) + 1)], per_round
        out.append(
            _Micro(
                rank=int(workers[k]["rank"]) if k < len(workers) else k,
                n_k=int(workers[k]["n_k"]) if k < len(workers) else int(sizes[k]) if k < len(sizes) else 0,
                x=x,
                loss=loss,
                accuracy=acc,
                round_loss=per_round,
                test_accuracy=float(tests[k]) if k < len(tests) else None,
                seconds=float(workers[k]["seconds"]) if k < len(workers) and "seconds" in workers[k] else None,
            )
        )
    return out


def _epoch_history(worker: Mapping[str, Any]) -> tuple[list[float], list[float], list[float]]:
    """Per local epoch: position (round r's epoch e of E at r - 1 + e / E), loss, accuracy."""
    x, loss, acc = [], [], []
    for rd in worker["rounds"]:
        epochs = rd["epochs"]
        for e, ep in enumerate(epochs, start=1):
            x.append(int(rd["round"]) - 1 + e / len(epochs))
            loss.append(float(ep["loss"]))
            acc.append(float(ep["accuracy"]))
    return x, loss, acc


def _round_ends(x: Sequence[float]) -> list[int]:
    """1-based indices of the points that end a round (integer positions)."""
    return [i for i, v in enumerate(x, start=1) if math.isclose(v, round(v))]


# ---------------------------------------------------------------------------------------------- formatting


def _acc(v: float) -> str:
    return f"{v:.4f}"


def _loss(v: float | None) -> str:
    return _NONE if v is None else f"{v:.4f}"


def _int(v: int) -> str:
    return f"{int(v):,}"


def _seconds(v: float) -> str:
    """Seconds as measured (two decimals under 10 s: the aggregate step takes hundredths), plus minutes."""
    text = f"{v:.2f} s" if v < 10 else f"{v:.1f} s"
    return f"{text} ({_clock(v)})" if v >= 90 else text


def _clock(v: float) -> str:
    minutes, secs = divmod(round(v), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _bytes(v: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(v) >= size:
            return f"{_int(v)} ({v / size:.1f} {unit})"
    return _int(v)


def _value(v: Any) -> str:
    """A configuration value as people write it: strings bare, everything else as JSON."""
    if isinstance(v, str):
        return v or "(empty)"
    return json.dumps(v, sort_keys=True)


def _short(name: str, limit: int = _LABEL_CHARS) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


# ----------------------------------------------------------------------------------------------- HTML pieces


@dataclass(frozen=True)
class _Cell:
    text: str
    num: bool = False
    style: str = ""
    """Inline style we compute (never user text)."""


def _num(text: str, style: str = "") -> _Cell:
    return _Cell(text, num=True, style=style)


def _table(header: Sequence[str], rows: Sequence[Sequence[str | _Cell]], caption: str = "") -> str:
    def cell(c: str | _Cell, tag: str) -> str:
        c = c if isinstance(c, _Cell) else _Cell(c)
        attrs = (' class="num"' if c.num else "") + (f' style="{c.style}"' if c.style else "")
        return f"<{tag}{attrs}>{_e(c.text)}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(c, "td") for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _section(sid: str, title: str, *parts: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{"".join(parts)}</section>'


def _p(text: str, cls: str = "") -> str:
    attrs = f' class="{cls}"' if cls else ""
    return f"<p{attrs}>{_e(text)}</p>"


def _img(uri: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{_e(alt)}"></figure>'


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


# -------------------------------------------------------------------------------------------------- summary


def _headline(run: _Run) -> str:
    name = run.dataset.get("dataset") or run.config.get("dataset") or "dataset"
    model = run.config.get("model")
    strategy = _split_info(run)
    return " · ".join(str(p) for p in (name, model, strategy) if p)


def _summary_section(run: _Run) -> str:
    m = run.metrics
    timings = m.get("timings") or {}
    total = timings.get("total")
    total_label = "Total time" if total is not None else "Time in steps"
    total = float(total if total is not None else sum(float(v) for v in timings.values()))
    epochs = run.config.get("local_epochs") or (len(run.workers[0]["rounds"][0]["epochs"]) if run.workers else None)
    skipped = _skipped(run)
    cards = [
        ("Test accuracy", _acc(m["accuracy"])),
        *([("Mean class accuracy", _acc(m["macro_accuracy"]))] if m.get("macro_accuracy") is not None else []),
        ("Test loss", _loss(m["loss"])),
        ("Test examples", _int(m.get("num_test_examples") or _confusion_total(m))),
        ("Training examples", _int(sum(m.get("shard_sizes") or []))),
        ("Workers (shards)", _int(len(m.get("shard_sizes") or run.histograms))),
        (f"Rounds {_TIMES} local epochs", f"{run.rounds} {_TIMES} {epochs}" if epochs else str(run.rounds)),
        (total_label, f"{total:.1f} s"),
        *([("Skipped images", _int(int(skipped["total"])))] if skipped else []),
    ]
    subs = {total_label: _clock(total)} if total >= 90 else {}
    grid = "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div>'
        + (f'<div class="k">{_e(subs[k])}</div>' if k in subs else "")
        + "</div>"
        for k, v in cards
    )
    # classes without test images have no accuracy (null): not the weakest class, not in any average
    per_class = {c: float(a) for c, a in (m.get("per_class_accuracy") or {}).items() if a is not None}
    absent = [c for c, a in (m.get("per_class_accuracy") or {}).items() if a is None]
    notes = []
    if skipped:
        notes.append(_p(_skipped_note(skipped), "warn"))
    if per_class:
        worst = min(per_class, key=lambda c: per_class[c])
        best = max(per_class, key=lambda c: per_class[c])
        notes.append(
            _p(f"Weakest class: {worst} ({_acc(per_class[worst])}); strongest: {best} ({_acc(per_class[best])}).")
        )
    if absent:
        notes.append(
            _p(
                f"No test images for {len(absent)} of {len(m.get('per_class_accuracy') or {})} classes: "
                f"{', '.join(absent)}. Their accuracy is not defined (shown as “{_NO_TEST_IMAGES}”, null in "
                "metrics.json, not 0); the weakest and strongest class and the mean class accuracy leave them out.",
                "warn",
            )
        )
    if run.micro_test_known:
        tests = [m.test_accuracy for m in run.micros if m.test_accuracy is not None]
        notes.append(
            _p(
                f"On the same test set the micro-models score {_acc(min(tests))} to {_acc(max(tests))}; "
                f"the global model {_acc(m['accuracy'])}."
            )
        )
    return _section("summary", "Summary", f'<div class="cards">{grid}</div>', *notes)


def _skipped(run: _Run) -> Mapping[str, Any] | None:
    """metrics' `skipped_images` when any were skipped (else the bare count of the split's manifest); None if none."""
    record = run.metrics.get("skipped_images")
    if not isinstance(record, Mapping):
        count = int(run.dataset.get("num_skipped_files") or 0)
        record = {"total": count, "examples": []}
    return record if int(record.get("total") or 0) > 0 else None


def _skipped_note(skipped: Mapping[str, Any]) -> str:
    splits = ", ".join(f"{split} {_int(int(skipped[split]))}" for split in ("train", "test") if skipped.get(split))
    unlisted = int(skipped.get("unlisted") or 0)
    if unlisted:
        splits += f"{', ' if splits else ''}{_int(unlisted)} not listed by name"
    # a reason names its file already ("cannot decode image train/a/1.png (...)"); else the file leads
    examples = "; ".join(
        str(e["reason"])
        if e.get("file") and e["file"] in str(e.get("reason"))
        else f"{e.get('file')}: {e.get('reason')}"
        for e in skipped.get("examples") or []
    )
    return (
        f"{_int(int(skipped['total']))} image file(s) could not be read and were left out (--bad-images skip)"
        + (f": {splits}" if splits else "")
        + "."
        + (f" First: {examples}." if examples else "")
        + " The split step's dataset.json lists them (skipped_files)."
    )


def _confusion_total(m: Mapping[str, Any]) -> int:
    return sum(sum(row) for row in m.get("confusion_matrix") or [])


# ---------------------------------------------------------------------------------------------- split audit


def _split_info(run: _Run) -> str:
    split = run.dataset.get("split") or {}
    strategy = split.get("strategy") or run.config.get("split") or run.config.get("strategy")
    if not strategy:
        return ""
    seed = split.get("seed", run.config.get("seed"))
    extra = []
    if strategy == "dirichlet":
        alpha = split.get("alpha", run.config.get("alpha"))
        if alpha is not None:
            extra.append(f"alpha {alpha}")
    if seed is not None:
        extra.append(f"seed {seed}")
    return f"{strategy} split" + (f" ({', '.join(extra)})" if extra else "")


def _split_plot(hist: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    k, n = len(hist), len(classes)
    fig, (ax_n, ax_share) = _figure(min(14.0, 6.5 + 0.5 * k), 3.4, ncols=2)
    colors = _class_colors(n)
    xs = list(range(k))
    sizes = [sum(h) for h in hist]
    for ax, scale in ((ax_n, [1.0] * k), (ax_share, [1 / max(1, s) for s in sizes])):
        bottom = [0.0] * k
        for c in range(n):
            heights = [hist[i][c] * scale[i] for i in xs]
            ax.bar(xs, heights, bottom=bottom, color=colors[c], width=0.8, label=_short(classes[c]), linewidth=0)
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


def _split_table(hist: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    total = sum(sum(h) for h in hist)
    peak = max((v for h in hist for v in h), default=0) or 1
    rows: list[list[str | _Cell]] = []
    for i, h in enumerate(hist):
        n_k = sum(h)
        present = sum(1 for v in h if v)
        cells = [_num(_int(v), style=f"background:rgba(31,119,180,{0.08 + 0.5 * v / peak:.2f})") for v in h]
        rows.append([str(i), _num(_int(n_k)), _num(f"{n_k / max(1, total):.4f}"), _num(f"{present}/{len(h)}"), *cells])
    class_totals = [sum(h[c] for h in hist) for c in range(len(classes))]
    rows.append(["all", _num(_int(total)), _num("1.0000"), _num(""), *[_num(_int(v)) for v in class_totals]])
    return _table(["shard", "n_k", "weight n_k/n", "classes", *classes], rows)


def _split_section(run: _Run) -> str:
    hist, classes = run.histograms, run.classes
    if not hist:
        return _section("split-audit", "Split audit", _p("The metrics hold no shard histograms.", "note"))
    total = sum(sum(h) for h in hist)
    info = _split_info(run)
    intro = f"{_int(total)} training examples in {len(hist)} shards" + (f", {info}" if info else "") + "."
    missing = [
        f"shard {i}: {', '.join(c for c, v in zip(classes, h, strict=True) if not v)}" for i, h in enumerate(hist)
    ]
    gaps = [m for m, h in zip(missing, hist, strict=True) if not all(h)]
    parts = [
        _p(intro),
        _img(_split_plot(hist, classes), "examples per shard and class"),
        _table_note("Weights n_k/n are the FedAvg weights. Cell shading grows with the count."),
        _split_table(hist, classes),
    ]
    if gaps:
        parts.append(_p("Classes missing from a shard (its micro-model never sees them): " + "; ".join(gaps), "warn"))
    return _section("split-audit", "Split audit: examples per shard and class", *parts)


def _table_note(text: str) -> str:
    return _p(text, "note")


# -------------------------------------------------------------------------------------------------- rounds


def _rounds_plot(run: _Run) -> str:
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
    handles, labels = ax_loss.get_legend_handles_labels()
    ncol = min(5, len(handles))
    reading = [len(handles) - 1, *range(len(handles) - 1)]  # the global model (drawn last) first
    order = [reading[i] for i in _row_major(len(handles), ncol)]
    # below the panels, so no entry hides a curve
    fig.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="outside lower center",
        ncol=ncol,
        fontsize=8,
        frameon=False,
    )
    return _png(fig)


def _row_major(n: int, ncol: int) -> list[int]:
    """Matplotlib fills legend columns first; this order makes entries read left to right, row by row."""
    rows = math.ceil(n / ncol)
    return [r * ncol + c for c in range(ncol) for r in range(rows) if r * ncol + c < n]


def _rounds_table(run: _Run) -> str:
    acc = dict(zip(run.global_rounds, run.accuracies, strict=True))
    loss = dict(zip(run.global_rounds, run.global_loss, strict=True))
    header = [
        "round",
        f"global {run.round_split} accuracy",
        f"global {run.round_split} loss",
        *[f"micro-model {m.rank} train loss" for m in run.micros],
    ]
    rows: list[list[str | _Cell]] = []
    for r in range(1, run.rounds + 1):
        micro = [_num(_loss(m.round_loss[r - 1]) if r <= len(m.round_loss) else _NONE) for m in run.micros]
        mark = " (kept)" if r == run.metrics.get("selected_round") else ""
        rows.append([f"{r}{mark}", _num(_acc(acc[r]) if r in acc else _NONE), _num(_loss(loss.get(r))), *micro])
    return _table(header, rows)


def _rounds_section(run: _Run) -> str:
    notes = [
        "The global model of rounds 1 to R-1 is the in-job weighted average, evaluated on the test set by the "
        "workers; round R's is the aggregate step's model, evaluated by the evaluate step. Micro-model figures are "
        "training loss and accuracy on the worker's own shard (the last local epoch of each round in the table)."
    ]
    if len(run.global_rounds) < run.rounds:
        notes.append("The global model was not evaluated after every round (per-round evaluation was off).")
    if not run.workers:
        notes.append("No worker records were given: micro-model training accuracy is not shown.")
    return _section(
        "rounds",
        "Accuracy and loss per round",
        _img(_rounds_plot(run), "accuracy and loss per round"),
        *[_p(n, "note") for n in notes],
        _rounds_table(run),
    )


# -------------------------------------------------------------------------------- global vs micro-models


def _score(run: _Run, m: _Micro) -> tuple[float, str]:
    """What micro-models are ranked by (higher is better) and what the number is called."""
    if m.test_accuracy is not None and run.micro_test_known:
        return m.test_accuracy, "test accuracy"
    if m.accuracy:
        return m.accuracy[-1], "training accuracy (own shard, last epoch)"
    return -m.round_loss[-1] if m.round_loss else -math.inf, "training loss (own shard, last epoch)"


def _comparison_plot(run: _Run, ranked: Sequence[_Micro]) -> str:
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
        ax.annotate(_acc(v), (v, y), va="center", fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.set_yticks(ys, labels, fontsize=8)
    low = min(shown)
    ax.set_xlim(max(0.0, low - (1 - low) * 0.6 - 0.02), 1.0)
    ax.set_xlabel("accuracy")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _comparison_rows(run: _Run, ranked: Sequence[_Micro]) -> list[list[str | _Cell]]:
    n = sum(m.n_k for m in run.micros) or sum(run.metrics.get("shard_sizes") or [])
    rows: list[list[str | _Cell]] = [
        ["global model", _num(_int(n)), _num(_acc(run.metrics["accuracy"])), _num(_NONE), _num(_NONE), ""]
    ]
    for i, m in enumerate(ranked):
        tag = "best" if i == 0 and len(ranked) > 1 else "worst" if i == len(ranked) - 1 and len(ranked) > 1 else ""
        rows.append(
            [
                f"micro-model {m.rank}",
                _num(_int(m.n_k)),
                _num(_acc(m.test_accuracy) if m.test_accuracy is not None else "not evaluated"),
                _num(_acc(m.accuracy[-1]) if m.accuracy else _NONE),
                _num(_loss(m.round_loss[-1]) if m.round_loss else _NONE),
                tag,
            ]
        )
    return rows


def _comparison_section(run: _Run) -> str:
    title = "Global model versus the best and worst micro-model"
    if not run.micros:
        return _section("global-vs-micro", title, _p("No micro-model records were given.", "note"))
    # ranked on the values as shown (4 decimals); ties go to the lower last-epoch training loss
    ranked = sorted(
        run.micros,
        key=lambda m: (round(_score(run, m)[0], 4), -(m.round_loss[-1] if m.round_loss else 0.0)),
        reverse=True,
    )
    basis = _score(run, ranked[0])[1]
    if run.micro_test_known:
        note = "Every micro-model was evaluated on the same test set as the global model."
    else:
        note = (
            "The micro-models were not evaluated on the test set, so this is not a like-for-like comparison: "
            "the global model's figure is its test accuracy; each micro-model's is its accuracy and loss on its own "
            "shard in its last local epoch (round R, before the final average). Training figures on a worker's own "
            "shard overstate how that micro-model does on the test set, by a wide margin when the split is "
            "label-skewed (Dirichlet) and a shard holds few classes."
        )
    header = ["model", "examples", "test accuracy", "train accuracy (last epoch)", "train loss (last epoch)", ""]
    plot = (
        _img(_comparison_plot(run, ranked), "global model versus micro-models")
        if ranked[0].accuracy or run.micro_test_known
        else ""
    )
    return _section(
        "global-vs-micro",
        title,
        _p(f"Micro-models ranked by {basis}; best and worst are marked."),
        plot,
        _p(note, "warn" if not run.micro_test_known else "note"),
        _table(header, _comparison_rows(run, ranked)),
    )


# ------------------------------------------------------------------------------------------ confusion matrix


def _confusion_plot(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    n = len(classes)
    side = min(11.0, max(4.2, 0.36 * n + 1.9))
    fig, (ax,) = _figure(side + 1.3, side)
    rates = [[v / max(1, sum(row)) for v in row] for row in matrix]
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [_short(c) for c in classes]
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


def _confusion_rows(run: _Run) -> list[list[str | _Cell]]:
    matrix = run.metrics["confusion_matrix"]
    per_class = run.metrics.get("per_class_accuracy") or {}
    rows: list[list[str | _Cell]] = []
    for i, (name, row) in enumerate(zip(run.classes, matrix, strict=True)):
        off = [(v, j) for j, v in enumerate(row) if j != i and v]
        top = f"{run.classes[max(off)[1]]} ({_int(max(off)[0])})" if off else _NONE
        acc = per_class.get(name)
        shown = _acc(acc) if acc is not None else _NO_TEST_IMAGES if not sum(row) else _NONE
        rows.append([name, _num(_int(sum(row))), _num(_int(row[i])), _num(shown), top])
    return rows


def _confusion_section(run: _Run) -> str:
    matrix = run.metrics.get("confusion_matrix")
    if not matrix:
        return _section("confusion-matrix", "Confusion matrix", _p("The metrics hold no confusion matrix.", "note"))
    header = ["class", "test examples", "correct", "accuracy", "most often predicted instead"]
    return _section(
        "confusion-matrix",
        "Confusion matrix (global model, test set)",
        _p("Rows are true classes, columns predicted classes; cells show counts, colour the share of the row."),
        _img(_confusion_plot(matrix, run.classes), "confusion matrix heat map"),
        _table(header, _confusion_rows(run)),
    )


# -------------------------------------------------------------------------------------- plan, timings, config


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.extend(_flatten(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _plan_value(key: str, v: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(v, int) and not isinstance(v, bool) and ("memory" in leaf or leaf.endswith("bytes")):
        return _bytes(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return _int(v)
    return _value(v)


def _plan_section(run: _Run) -> str:
    title = "Resource plan (one replica)"
    usage = _usage_part(run.metrics.get("resource_usage"))
    if not run.plan:
        return _section(
            "resource-plan",
            title,
            _p("Local run: no plan. The workers ran as processes on this machine, without requests or limits.", "note")
            + usage,
        )
    rows: list[list[str | _Cell]] = [[k, _plan_value(k, v)] for k, v in _flatten(run.plan)]
    return _section("resource-plan", title, _table(["field", "value"], rows) + usage)


def _usage_part(usage: Any) -> str:
    """Measured peaks per replica against the plan's requests (the train step's `usage` record)."""
    if not isinstance(usage, Mapping) or not usage.get("replicas"):
        return ""
    req = usage["requested"]
    rows: list[list[str | _Cell]] = []
    for r in usage["replicas"]:
        u = r.get("utilisation") or {}
        demand = r.get("cpu_cores_demand")
        rows.append(
            [
                f"worker {r['rank']}",
                _num(_bytes(int(r["memory_peak_bytes"])) if r.get("memory_peak_bytes") else _NONE),
                _num(f"{100 * u['memory']:.0f} %" if u.get("memory") is not None else _NONE),
                _num(f"{demand:.2f}" if demand is not None else _NONE),
                _num(f"{100 * u['cpu_demand']:.0f} %" if u.get("cpu_demand") is not None else _NONE),
            ]
        )
    goal = float(usage.get("goal") or 0.75)
    verdict = "meets" if usage.get("meets_goal") else "misses"
    note = (
        f"Measured against {usage['plan']} (requests from the {usage.get('requests_from', 'estimate')}): "
        f"{req['cpu_request']} cores and {_bytes(int(req['memory_request']))} requested per replica; the run {verdict} "
        f"the goal of using at least {goal:.0%} of each request. The next run of this model and input shape plans "
        "from these measurements."
    )
    header = ["replica", "peak memory", "of request", "CPU cores wanted", "of request"]
    return _p(note, "note") + _table(header, rows)


_STEP_ORDER = ("split", "train", "aggregate", "evaluate", "orchestration")


def _timings_section(run: _Run) -> str:
    timings = {k: float(v) for k, v in (run.metrics.get("timings") or {}).items()}
    total = timings.pop("total", None)
    steps = sorted(timings, key=lambda k: (_STEP_ORDER.index(k) if k in _STEP_ORDER else len(_STEP_ORDER), k))
    whole = total if total is not None else sum(timings.values())
    rows: list[list[str | _Cell]] = [
        [k, _num(_seconds(timings[k])), _num(f"{100 * timings[k] / whole:.1f} %" if whole else _NONE)] for k in steps
    ]
    rows.append(["total" if total is not None else "sum of the steps", _num(_seconds(whole)), _num("100.0 %")])
    parts = [_table(["step", "time", "share"], rows)]
    if run.workers:
        wrows: list[list[str | _Cell]] = [
            [
                f"worker {w['rank']}",
                str(w.get("device", "")),
                _num(str(w.get("threads", ""))),
                _num(_seconds(float(w["seconds"])) if "seconds" in w else _NONE),
            ]
            for w in run.workers
        ]
        parts += [_p("Train step, per worker:", "note"), _table(["worker", "device", "threads", "time"], wrows)]
    return _section("timings", "Timings", *parts)


def _dataset_rows(run: _Run) -> list[list[str | _Cell]]:
    d = run.dataset

    def stats(v: Sequence[float] | None) -> str | None:
        return None if v is None else ", ".join(f"{x:.4f}" for x in v)

    def count(v: int | None) -> str | None:
        return None if v is None else _int(v)

    shape = d.get("image_shape")
    keys = [
        ("dataset", d.get("dataset")),
        ("image shape (C, H, W)", f" {_TIMES} ".join(str(x) for x in shape) if shape else None),
        ("classes", str(len(run.classes))),
        ("normalisation mean (per channel)", stats(d.get("mean"))),
        ("normalisation std (per channel)", stats(d.get("std"))),
        ("training examples", count(d.get("num_train_examples"))),
        ("test examples", count(d.get("num_test_examples"))),
        ("image files skipped as unreadable", count(d.get("num_skipped_files"))),
    ]
    return [[k, str(v)] for k, v in keys if v is not None]


def _config_section(run: _Run) -> str:
    parts = []
    if run.config:
        parts.append(_table(["parameter", "value"], [[k, _value(v)] for k, v in sorted(_flatten(run.config))]))
    else:
        parts.append(_p("No configuration was recorded for this run.", "note"))
    if run.dataset:
        parts += [_p("Dataset, as the split step decoded it:", "note"), _table(["field", "value"], _dataset_rows(run))]
    return _section("configuration", "Configuration", *parts)


# ------------------------------------------------------------------------------------------------------ page

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       color: #1d2530; background: #f6f8fa; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 24px 40px; }
header h1 { font-size: 22px; margin: 8px 0 2px; }
header .sub { color: #57606a; margin: 0 0 8px; }
nav { display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 13px; margin-bottom: 8px; }
nav a { color: #0b5cad; text-decoration: none; }
section { background: #fff; border: 1px solid #d8dee4; border-radius: 8px; padding: 12px 18px 16px;
          margin: 14px 0; }
h2 { font-size: 17px; margin: 2px 0 10px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.card { border: 1px solid #d8dee4; border-radius: 6px; padding: 8px 10px; background: #fbfcfd; }
.card .k { color: #57606a; font-size: 12px; }
.card .v { font-size: 19px; font-weight: 600; font-variant-numeric: tabular-nums; }
figure { margin: 8px 0; }
img { max-width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d8dee4; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f6; font-weight: 600; }
td.num, th.num { text-align: right; white-space: nowrap; }
tbody tr:nth-child(even) td:not([style]) { background: #f9fafb; }
p { margin: 6px 0; }
.note { color: #57606a; font-size: 13px; }
.warn { color: #7a4a00; background: #fff8e5; border-left: 3px solid #d4a72c; padding: 6px 10px; font-size: 13px; }
footer { color: #8c959f; font-size: 12px; text-align: center; }
"""

# No network, no script: the page can only show what it carries.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_NAV = {
    "summary": "Summary",
    "split-audit": "Split audit",
    "rounds": "Rounds",
    "global-vs-micro": "Global vs micro-models",
    "confusion-matrix": "Confusion matrix",
    "resource-plan": "Resource plan",
    "timings": "Timings",
    "configuration": "Configuration",
}


def _page(run: _Run, sections: Sequence[str]) -> str:
    headline = _headline(run)
    nav = "".join(f'<a href="#{sid}">{_e(_NAV[sid])}</a>' for sid in SECTION_IDS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>microfed report: {_e(headline)}</title><style>{_CSS}</style></head>\n<body><main>"
        f'<header><h1>microfed run report</h1><p class="sub">{_e(headline)}</p><nav>{nav}</nav></header>\n'
        + "\n".join(sections)
        + "\n<footer>microfed: federated-style training on Kubeflow Pipelines</footer></main></body></html>\n"
    )
