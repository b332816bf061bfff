"""The run report's figures, gathered from the run's records: metrics.json, dataset.json, the worker records of
job.json, the configuration and the resource plan.

`Run.build` reads them once into one frozen value; the plots (report_plots.py) and the sections
(report_sections.py) only read a `Run`. Records are optional beyond metrics.json: without worker records the
micro-models' history is metrics' per-round training loss, without per-round losses the global model's loss is
known for the last round only. Nothing here draws or writes HTML.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "STEP_ORDER",
    "Micro",
    "Run",
    "confusion_total",
    "flatten",
    "headline",
    "rank_micros",
    "score",
    "skipped_record",
    "split_info",
    "step_order",
]

STEP_ORDER = ("split", "train", "aggregate", "evaluate", "orchestration")
"""The order of the timings table; other steps follow, by name."""


@dataclass(frozen=True)
class Micro:
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
class Run:
    """Everything the report shows, read from the run's records once."""

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
    micros: list[Micro] = field(default_factory=list)
    workers: Sequence[Mapping[str, Any]] = ()

    @classmethod
    def build(
        cls,
        metrics: Mapping[str, Any],
        config: Mapping[str, Any],
        dataset: Mapping[str, Any] | None,
        workers: Sequence[Mapping[str, Any]] | None,
        plan: Mapping[str, Any] | None,
    ) -> Run:
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


def _micros(metrics: Mapping[str, Any], workers: Sequence[Mapping[str, Any]]) -> list[Micro]:
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
            Micro(
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


# ------------------------------------------------------------------------------------- derived figures


def split_info(run: Run) -> str:
    """The split with its alpha (Dirichlet) and seed, e.g. "dirichlet split (alpha 0.5, seed 0)"."""
    split = run.dataset.get("split") or {}
    kind = split.get("split") or run.config.get("split")
    if not kind:
        return ""
    seed = split.get("seed", run.config.get("seed"))
    extra = []
    if kind == "dirichlet":
        alpha = split.get("alpha", run.config.get("alpha"))
        if alpha is not None:
            extra.append(f"alpha {alpha}")
    if seed is not None:
        extra.append(f"seed {seed}")
    return f"{kind} split" + (f" ({', '.join(extra)})" if extra else "")


def headline(run: Run) -> str:
    """Dataset · model · split: the page's subtitle and title."""
    name = run.dataset.get("dataset") or run.config.get("dataset") or "dataset"
    model = run.config.get("model")
    strategy = split_info(run)
    return " · ".join(str(p) for p in (name, model, strategy) if p)


def skipped_record(run: Run) -> Mapping[str, Any] | None:
    """metrics' `skipped_images` when any were skipped (else the bare count of the split's manifest); None if none."""
    record = run.metrics.get("skipped_images")
    if not isinstance(record, Mapping):
        count = int(run.dataset.get("num_skipped_files") or 0)
        record = {"total": count, "examples": []}
    return record if int(record.get("total") or 0) > 0 else None


def confusion_total(m: Mapping[str, Any]) -> int:
    return sum(sum(row) for row in m.get("confusion_matrix") or [])


def score(run: Run, m: Micro) -> tuple[float, str]:
    """What micro-models are ranked by (higher is better) and what the number is called."""
    if m.test_accuracy is not None and run.micro_test_known:
        return m.test_accuracy, "test accuracy"
    if m.accuracy:
        return m.accuracy[-1], "training accuracy (own shard, last epoch)"
    return -m.round_loss[-1] if m.round_loss else -math.inf, "training loss (own shard, last epoch)"


def rank_micros(run: Run) -> list[Micro]:
    """The micro-models, best first by `score`."""
    # ranked on the values as shown (4 decimals); ties go to the lower last-epoch training loss
    return sorted(
        run.micros,
        key=lambda m: (round(score(run, m)[0], 4), -(m.round_loss[-1] if m.round_loss else 0.0)),
        reverse=True,
    )


def flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as dotted keys ("estimate.shard_bytes"), in the mapping's order."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.extend(flatten(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def step_order(step: str) -> tuple[int, str]:
    """Sort key of the timings table: the pipeline's steps in order, then any other step by name."""
    return (STEP_ORDER.index(step) if step in STEP_ORDER else len(STEP_ORDER), step)
