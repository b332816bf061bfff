"""The evaluate step: global model + shards + micro-models -> the metrics (METRICS_FILE) and the run's HTML report.

A plain function over folders; the evaluate component (components/steps.py) is one call into it. Folder arguments
may be local paths or gs:// URIs: inputs are staged in (only the files the step reads), the output is written
locally and uploaded when the step succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from microfed.training.evaluation import evaluate
from microfed.training.io import read_json, read_safetensors
from microfed.training.layout import (
    AGGREGATE_FILE,
    DATASET_FILE,
    REPORT_FILE,
    TEST_FILES,
    Metrics,
    read_dataset_manifest,
    read_job_record,
    write_dataset_manifest,
    write_job_record,
    write_metrics,
)
from microfed.training.model_files import load_model
from microfed.training.shards import load_test_set
from microfed.training.step_log import log, step
from microfed.training.storage import staged_input, staged_output
from microfed.training.text import printable
from microfed.training.train import Preprocess

__all__ = ["evaluate_step"]


@step("evaluate")
def evaluate_step(
    model_dir: str | Path,
    shards_dir: str | Path,
    micro_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 512,
) -> Metrics:
    """Test-set metrics of the global model and of each micro-model, the history of the rounds and the step
    timings, written as METRICS_FILE and the run's HTML report (REPORT_FILE) in `out_dir`."""
    start = time.perf_counter()
    with (
        staged_input(model_dir) as model_path,
        staged_input(shards_dir, only=[DATASET_FILE, *TEST_FILES]) as shards,
        staged_input(micro_dir) as micro,
        staged_output(out_dir) as out,
    ):
        metrics = _evaluate(model_path, shards, micro, batch_size)
        metrics["timings"]["evaluate"] = time.perf_counter() - start
        write_metrics(out, metrics)
        job, dataset = read_job_record(micro), read_dataset_manifest(shards)
        from microfed.training.report import render_report, write_report  # matplotlib: only this step draws

        html = render_report(metrics, config=job["config"], dataset=dataset, workers=job["workers"])
        write_report(out / REPORT_FILE, html)
        # what the report was made from, so a caller can render it again with more (the run's own totals)
        write_job_record(out, job)
        write_dataset_manifest(out, dataset)
    return metrics


def _evaluate(model_dir: Path, shards: Path, micro: Path, batch_size: int) -> Metrics:
    # this run's own model, written from its --model: the factory it names is the one the run was given
    model, card = load_model(model_dir, trust_recorded_code=True)
    test = load_test_set(shards)
    pre = Preprocess(list(card.mean), list(card.std), device=torch.device("cpu"))
    classes = card.architecture.num_classes
    res = evaluate(model, test.images, test.labels, preprocess=pre, num_classes=classes, batch_size=batch_size)
    dataset = read_dataset_manifest(shards)
    job = read_job_record(micro)
    aggregate = read_json(model_dir / AGGREGATE_FILE)
    # each micro-model on the same test set: how much the average gains over its parts
    micro_accuracy = []
    for w in job["workers"]:
        state, _ = read_safetensors(micro / w["file"])
        model.load_state_dict(state)
        micro_accuracy.append(
            evaluate(
                model, test.images, test.labels, preprocess=pre, num_classes=classes, batch_size=batch_size
            ).accuracy
        )
    # the global model's accuracy per round: on the validation split when one was held out (the aggregate step
    # recorded it), else only the final model's, on the test set
    history = aggregate.get("val_history") or []
    log(
        f"evaluate: test accuracy {res.accuracy:.4f} on {res.num_examples} examples "
        f"(micro-models {min(micro_accuracy):.4f} to {max(micro_accuracy):.4f})"
    )
    return {
        "accuracy": res.accuracy,
        "loss": res.loss,
        "class_names": list(card.class_names),
        # None for a class with no test images: no accuracy to report, rather than a 0.0 that reads as failure
        "per_class_accuracy": dict(zip(card.class_names, res.per_class_accuracy, strict=True)),
        "macro_accuracy": res.macro_accuracy,  # over the classes with test images only
        "classes_without_test_images": [
            c for c, a in zip(card.class_names, res.per_class_accuracy, strict=True) if a is None
        ],
        "confusion_matrix": res.confusion_matrix,
        "num_test_examples": res.num_examples,
        "skipped_images": _skipped_images(dataset),
        "shard_sizes": [s["num_examples"] for s in dataset["shards"]],
        "shard_class_histograms": [s["class_histogram"] for s in dataset["shards"]],
        "round_accuracy": [h["val_accuracy"] for h in history] or [res.accuracy],
        "round_loss": [h["val_loss"] for h in history] or [res.loss],
        "round_numbers": [h["round"] for h in history]
        or [int(aggregate.get("rounds") or len(job["workers"][0]["rounds"]))],
        "round_split": "validation" if history else "test",
        "selected_round": aggregate.get("selected_round"),
        "strategy": aggregate.get("strategy", {}).get("name", "fedavg"),
        "micro_model_accuracy": micro_accuracy,
        "train_loss": [[r["epochs"][-1]["loss"] for r in w["rounds"]] for w in job["workers"]],
        "resource_plan": job.get("plan"),
        "resource_usage": job.get("usage"),  # measured peaks against the plan's requests
        "timings": {"split": dataset.get("seconds", 0.0), "train": job["seconds"], "aggregate": aggregate["seconds"]},
    }


# How many skipped files the metrics and the run summary name; the shards' dataset manifest lists up to 1000.
_SKIPPED_EXAMPLES = 5


def _skipped_images(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """What `--bad-images skip` left out, from the split step's manifest, for metrics.json and the summary.

    `total` (the manifest's num_skipped_files), `train` and `test` (files skipped in each split folder; the
    validation split is drawn from train) and `examples`: the first few as {split, file, reason}, escaped with
    `printable`, since a file name comes from the upload (dataset.json keeps the exact names). When more files
    were skipped than the manifest lists by name, `train` and `test` count the listed ones and `unlisted` the rest.
    """
    listed = [f for f in dataset.get("skipped_files") or [] if isinstance(f, dict)]
    total = max(int(dataset.get("num_skipped_files") or 0), len(listed))
    out: dict[str, Any] = {
        "total": total,
        **{split: sum(1 for f in listed if f.get("split") == split) for split in ("train", "test")},
        "examples": [
            {key: printable(f.get(key, ""), max_chars=200) for key in ("split", "file", "reason")}
            for f in listed[:_SKIPPED_EXAMPLES]
        ],
    }
    if total > len(listed):
        out["unlisted"] = total - len(listed)
    return out
