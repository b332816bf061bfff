"""The run report's eight sections, as HTML, from a `Run` (report_data.py).

A section whose records are missing says so ("No worker records were given", "Local run: no plan") rather
than leaving a gap. Nothing is hidden or counted as a failure it is not: images that `--bad-images skip`
left out are counted and named in the summary, and a class without test images shows "no test images"
(metrics' null), is left out of the weakest/strongest class and of the mean class accuracy, and is named.
Text from the run goes unescaped to report_html.py's builders, which escape it; the summary cards, the one
piece of markup written here, call `escape` themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from microfed.training import report_format as fmt
from microfed.training.report_data import (
    Micro,
    Run,
    confusion_total,
    flatten,
    rank_micros,
    score,
    skipped_record,
    split_info,
    step_order,
)
from microfed.training.report_html import Cell, escape, image, num, para, section, table
from microfed.training.report_plots import comparison_plot, confusion_plot, rounds_plot, split_plot

__all__ = ["build_sections"]


def build_sections(run: Run) -> list[str]:
    """The page's sections in report_html.SECTION_IDS order (draws the plots: call inside report_plots.plot_style)."""
    return [
        _summary_section(run),
        _split_section(run),
        _rounds_section(run),
        _comparison_section(run),
        _confusion_section(run),
        _plan_section(run),
        _timings_section(run),
        _config_section(run),
    ]


# -------------------------------------------------------------------------------------------------- summary


def _summary_section(run: Run) -> str:
    skipped = skipped_record(run)
    return section("summary", "Summary", _summary_cards(run, skipped), *_summary_notes(run, skipped))


def _summary_cards(run: Run, skipped: Mapping[str, Any] | None) -> str:
    """The headline figures, one card each; a total over 90 s has minutes below it."""
    m = run.metrics
    timings = m.get("timings") or {}
    total = timings.get("total")
    total_label = "Total time" if total is not None else "Time in steps"
    total = float(total if total is not None else sum(float(v) for v in timings.values()))
    epochs = run.config.get("local_epochs") or (len(run.workers[0]["rounds"][0]["epochs"]) if run.workers else None)
    cards = [
        ("Test accuracy", fmt.acc(m["accuracy"])),
        *([("Mean class accuracy", fmt.acc(m["macro_accuracy"]))] if m.get("macro_accuracy") is not None else []),
        ("Test loss", fmt.loss(m["loss"])),
        ("Test examples", fmt.integer(m.get("num_test_examples") or confusion_total(m))),
        ("Training examples", fmt.integer(sum(m.get("shard_sizes") or []))),
        ("Workers (shards)", fmt.integer(len(m.get("shard_sizes") or run.histograms))),
        (f"Rounds {fmt.TIMES} local epochs", f"{run.rounds} {fmt.TIMES} {epochs}" if epochs else str(run.rounds)),
        (total_label, f"{total:.1f} s"),
        *([("Skipped images", fmt.integer(int(skipped["total"])))] if skipped else []),
    ]
    subs = {total_label: fmt.clock(total)} if total >= 90 else {}
    grid = "".join(
        f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div>'
        + (f'<div class="k">{escape(subs[k])}</div>' if k in subs else "")
        + "</div>"
        for k, v in cards
    )
    return f'<div class="cards">{grid}</div>'


def _summary_notes(run: Run, skipped: Mapping[str, Any] | None) -> list[str]:
    """Skipped images, the weakest and strongest class, classes without test images, micro-models' test range."""
    m = run.metrics
    # classes without test images have no accuracy (null): not the weakest class, not in any average
    per_class = {c: float(a) for c, a in (m.get("per_class_accuracy") or {}).items() if a is not None}
    absent = [c for c, a in (m.get("per_class_accuracy") or {}).items() if a is None]
    notes = []
    if skipped:
        notes.append(para(_skipped_note(skipped), "warn"))
    if per_class:
        worst = min(per_class, key=lambda c: per_class[c])
        best = max(per_class, key=lambda c: per_class[c])
        notes.append(
            para(
                f"Weakest class: {worst} ({fmt.acc(per_class[worst])}); strongest: {best} ({fmt.acc(per_class[best])})."
            )
        )
    if absent:
        notes.append(
            para(
                f"No test images for {len(absent)} of {len(m.get('per_class_accuracy') or {})} classes: "
                f"{', '.join(absent)}. Their accuracy is not defined (shown as “{fmt.NO_TEST_IMAGES}”, null in "
                "metrics.json, not 0); the weakest and strongest class and the mean class accuracy leave them out.",
                "warn",
            )
        )
    if run.micro_test_known:
        tests = [m.test_accuracy for m in run.micros if m.test_accuracy is not None]
        notes.append(
            para(
                f"On the same test set the micro-models score {fmt.acc(min(tests))} to {fmt.acc(max(tests))}; "
                f"the global model {fmt.acc(m['accuracy'])}."
            )
        )
    return notes


def _skipped_note(skipped: Mapping[str, Any]) -> str:
    splits = ", ".join(
        f"{split} {fmt.integer(int(skipped[split]))}" for split in ("train", "test") if skipped.get(split)
    )
    unlisted = int(skipped.get("unlisted") or 0)
    if unlisted:
        splits += f"{', ' if splits else ''}{fmt.integer(unlisted)} not listed by name"
    # a reason names its file already ("cannot decode image train/a/1.png (...)"); else the file leads
    examples = "; ".join(
        str(e["reason"])
        if e.get("file") and e["file"] in str(e.get("reason"))
        else f"{e.get('file')}: {e.get('reason')}"
        for e in skipped.get("examples") or []
    )
    return (
        f"{fmt.integer(int(skipped['total']))} image file(s) could not be read and were left out (--bad-images skip)"
        + (f": {splits}" if splits else "")
        + "."
        + (f" First: {examples}." if examples else "")
        + " The split step's dataset.json lists them (skipped_files)."
    )


# ---------------------------------------------------------------------------------------------- split audit


def _split_table(hist: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    total = sum(sum(h) for h in hist)
    peak = max((v for h in hist for v in h), default=0) or 1
    rows: list[list[str | Cell]] = []
    for i, h in enumerate(hist):
        n_k = sum(h)
        present = sum(1 for v in h if v)
        cells = [num(fmt.integer(v), style=f"background:rgba(31,119,180,{0.08 + 0.5 * v / peak:.2f})") for v in h]
        rows.append(
            [str(i), num(fmt.integer(n_k)), num(f"{n_k / max(1, total):.4f}"), num(f"{present}/{len(h)}"), *cells]
        )
    class_totals = [sum(h[c] for h in hist) for c in range(len(classes))]
    rows.append(["all", num(fmt.integer(total)), num("1.0000"), num(""), *[num(fmt.integer(v)) for v in class_totals]])
    return table(["shard", "n_k", "weight n_k/n", "classes", *classes], rows)


def _split_section(run: Run) -> str:
    hist, classes = run.histograms, run.classes
    if not hist:
        return section("split-audit", "Split audit", para("The metrics hold no shard histograms.", "note"))
    total = sum(sum(h) for h in hist)
    info = split_info(run)
    intro = f"{fmt.integer(total)} training examples in {len(hist)} shards" + (f", {info}" if info else "") + "."
    missing = [
        f"shard {i}: {', '.join(c for c, v in zip(classes, h, strict=True) if not v)}" for i, h in enumerate(hist)
    ]
    gaps = [m for m, h in zip(missing, hist, strict=True) if not all(h)]
    parts = [
        para(intro),
        image(split_plot(hist, classes), "examples per shard and class"),
        _table_note("Weights n_k/n are the FedAvg weights. Cell shading grows with the count."),
        _split_table(hist, classes),
    ]
    if gaps:
        parts.append(para("Classes missing from a shard (its micro-model never sees them): " + "; ".join(gaps), "warn"))
    return section("split-audit", "Split audit: examples per shard and class", *parts)


def _table_note(text: str) -> str:
    return para(text, "note")


# -------------------------------------------------------------------------------------------------- rounds


def _rounds_table(run: Run) -> str:
    acc = dict(zip(run.global_rounds, run.accuracies, strict=True))
    loss = dict(zip(run.global_rounds, run.global_loss, strict=True))
    header = [
        "round",
        f"global {run.round_split} accuracy",
        f"global {run.round_split} loss",
        *[f"micro-model {m.rank} train loss" for m in run.micros],
    ]
    rows: list[list[str | Cell]] = []
    for r in range(1, run.rounds + 1):
        micro = [num(fmt.loss(m.round_loss[r - 1]) if r <= len(m.round_loss) else fmt.NONE) for m in run.micros]
        mark = " (kept)" if r == run.metrics.get("selected_round") else ""
        rows.append([f"{r}{mark}", num(fmt.acc(acc[r]) if r in acc else fmt.NONE), num(fmt.loss(loss.get(r))), *micro])
    return table(header, rows)


def _rounds_section(run: Run) -> str:
    notes = [
        "The global model of rounds 1 to R-1 is the in-job weighted average, evaluated on the test set by the "
        "workers; round R's is the aggregate step's model, evaluated by the evaluate step. Micro-model figures are "
        "training loss and accuracy on the worker's own shard (the last local epoch of each round in the table)."
    ]
    if len(run.global_rounds) < run.rounds:
        notes.append("The global model was not evaluated after every round (per-round evaluation was off).")
    if not run.workers:
        notes.append("No worker records were given: micro-model training accuracy is not shown.")
    return section(
        "rounds",
        "Accuracy and loss per round",
        image(rounds_plot(run), "accuracy and loss per round"),
        *[para(n, "note") for n in notes],
        _rounds_table(run),
    )


# -------------------------------------------------------------------------------- global vs micro-models


def _comparison_rows(run: Run, ranked: Sequence[Micro]) -> list[list[str | Cell]]:
    n = sum(m.n_k for m in run.micros) or sum(run.metrics.get("shard_sizes") or [])
    rows: list[list[str | Cell]] = [
        ["global model", num(fmt.integer(n)), num(fmt.acc(run.metrics["accuracy"])), num(fmt.NONE), num(fmt.NONE), ""]
    ]
    for i, m in enumerate(ranked):
        tag = "best" if i == 0 and len(ranked) > 1 else "worst" if i == len(ranked) - 1 and len(ranked) > 1 else ""
        rows.append(
            [
                f"micro-model {m.rank}",
                num(fmt.integer(m.n_k)),
                num(fmt.acc(m.test_accuracy) if m.test_accuracy is not None else "not evaluated"),
                num(fmt.acc(m.accuracy[-1]) if m.accuracy else fmt.NONE),
                num(fmt.loss(m.round_loss[-1]) if m.round_loss else fmt.NONE),
                tag,
            ]
        )
    return rows


def _comparison_section(run: Run) -> str:
    title = "Global model versus the best and worst micro-model"
    if not run.micros:
        return section("global-vs-micro", title, para("No micro-model records were given.", "note"))
    ranked = rank_micros(run)
    basis = score(run, ranked[0])[1]
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
        image(comparison_plot(run, ranked), "global model versus micro-models")
        if ranked[0].accuracy or run.micro_test_known
        else ""
    )
    return section(
        "global-vs-micro",
        title,
        para(f"Micro-models ranked by {basis}; best and worst are marked."),
        plot,
        para(note, "warn" if not run.micro_test_known else "note"),
        table(header, _comparison_rows(run, ranked)),
    )


# ------------------------------------------------------------------------------------------ confusion matrix


def _confusion_rows(run: Run) -> list[list[str | Cell]]:
    matrix = run.metrics["confusion_matrix"]
    per_class = run.metrics.get("per_class_accuracy") or {}
    rows: list[list[str | Cell]] = []
    for i, (name, row) in enumerate(zip(run.classes, matrix, strict=True)):
        off = [(v, j) for j, v in enumerate(row) if j != i and v]
        top = f"{run.classes[max(off)[1]]} ({fmt.integer(max(off)[0])})" if off else fmt.NONE
        acc = per_class.get(name)
        shown = fmt.acc(acc) if acc is not None else fmt.NO_TEST_IMAGES if not sum(row) else fmt.NONE
        rows.append([name, num(fmt.integer(sum(row))), num(fmt.integer(row[i])), num(shown), top])
    return rows


def _confusion_section(run: Run) -> str:
    matrix = run.metrics.get("confusion_matrix")
    if not matrix:
        return section("confusion-matrix", "Confusion matrix", para("The metrics hold no confusion matrix.", "note"))
    header = ["class", "test examples", "correct", "accuracy", "most often predicted instead"]
    return section(
        "confusion-matrix",
        "Confusion matrix (global model, test set)",
        para("Rows are true classes, columns predicted classes; cells show counts, colour the share of the row."),
        image(confusion_plot(matrix, run.classes), "confusion matrix heat map"),
        table(header, _confusion_rows(run)),
    )


# -------------------------------------------------------------------------------------- plan, timings, config


def _plan_value(key: str, v: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(v, int) and not isinstance(v, bool) and ("memory" in leaf or leaf.endswith("bytes")):
        return fmt.nbytes(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return fmt.integer(v)
    return fmt.value(v)


def _plan_section(run: Run) -> str:
    title = "Resource plan (one replica)"
    usage = _usage_part(run.metrics.get("resource_usage"))
    if not run.plan:
        return section(
            "resource-plan",
            title,
            para(
                "Local run: no plan. The workers ran as processes on this machine, without requests or limits.", "note"
            )
            + usage,
        )
    rows: list[list[str | Cell]] = [[k, _plan_value(k, v)] for k, v in flatten(run.plan)]
    return section("resource-plan", title, table(["field", "value"], rows) + usage)


def _usage_part(usage: Any) -> str:
    """Measured peaks per replica against the plan's requests (the train step's `usage` record)."""
    if not isinstance(usage, Mapping) or not usage.get("replicas"):
        return ""
    req = usage["requested"]
    rows: list[list[str | Cell]] = []
    for r in usage["replicas"]:
        u = r.get("utilisation") or {}
        demand = r.get("cpu_cores_demand")
        rows.append(
            [
                f"worker {r['rank']}",
                num(fmt.nbytes(int(r["memory_peak_bytes"])) if r.get("memory_peak_bytes") else fmt.NONE),
                num(f"{100 * u['memory']:.0f} %" if u.get("memory") is not None else fmt.NONE),
                num(f"{demand:.2f}" if demand is not None else fmt.NONE),
                num(f"{100 * u['cpu_demand']:.0f} %" if u.get("cpu_demand") is not None else fmt.NONE),
            ]
        )
    goal = float(usage.get("goal") or 0.75)
    verdict = "meets" if usage.get("meets_goal") else "misses"
    note = (
        f"Measured against {usage['plan']} (requests from the {usage.get('requests_from', 'estimate')}): "
        f"{req['cpu_request']} cores and {fmt.nbytes(int(req['memory_request']))} requested per replica; "
        f"the run {verdict} the goal of using at least {goal:.0%} of each request. The next run of this model and "
        "input shape plans from these measurements."
    )
    header = ["replica", "peak memory", "of request", "CPU cores wanted", "of request"]
    return para(note, "note") + table(header, rows)


def _timings_section(run: Run) -> str:
    timings = {k: float(v) for k, v in (run.metrics.get("timings") or {}).items()}
    total = timings.pop("total", None)
    steps = sorted(timings, key=step_order)
    whole = total if total is not None else sum(timings.values())
    rows: list[list[str | Cell]] = [
        [k, num(fmt.seconds(timings[k])), num(f"{100 * timings[k] / whole:.1f} %" if whole else fmt.NONE)]
        for k in steps
    ]
    rows.append(["total" if total is not None else "sum of the steps", num(fmt.seconds(whole)), num("100.0 %")])
    parts = [table(["step", "time", "share"], rows)]
    if run.workers:
        wrows: list[list[str | Cell]] = [
            [
                f"worker {w['rank']}",
                str(w.get("device", "")),
                num(str(w.get("threads", ""))),
                num(fmt.seconds(float(w["seconds"])) if "seconds" in w else fmt.NONE),
            ]
            for w in run.workers
        ]
        parts += [para("Train step, per worker:", "note"), table(["worker", "device", "threads", "time"], wrows)]
    return section("timings", "Timings", *parts)


def _dataset_rows(run: Run) -> list[list[str | Cell]]:
    d = run.dataset

    def stats(v: Sequence[float] | None) -> str | None:
        return None if v is None else ", ".join(f"{x:.4f}" for x in v)

    def count(v: int | None) -> str | None:
        return None if v is None else fmt.integer(v)

    shape = d.get("image_shape")
    keys = [
        ("dataset", d.get("dataset")),
        ("image shape (C, H, W)", f" {fmt.TIMES} ".join(str(x) for x in shape) if shape else None),
        ("classes", str(len(run.classes))),
        ("normalisation mean (per channel)", stats(d.get("mean"))),
        ("normalisation std (per channel)", stats(d.get("std"))),
        ("training examples", count(d.get("num_train_examples"))),
        ("test examples", count(d.get("num_test_examples"))),
        ("image files skipped as unreadable", count(d.get("num_skipped_files"))),
    ]
    return [[k, str(v)] for k, v in keys if v is not None]


def _config_section(run: Run) -> str:
    parts = []
    if run.config:
        parts.append(table(["parameter", "value"], [[k, fmt.value(v)] for k, v in sorted(flatten(run.config))]))
    else:
        parts.append(para("No configuration was recorded for this run.", "note"))
    if run.dataset:
        parts += [para("Dataset, as the split step decoded it:", "note"), table(["field", "value"], _dataset_rows(run))]
    return section("configuration", "Configuration", *parts)
