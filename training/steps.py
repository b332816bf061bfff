"""The four pipeline steps as plain functions over folders; each KFP component is one call into this module.

split_step      dataset name / zip / folder  ->  shards folder (one shard per worker + test set)
train_step      shards folder                ->  micro-models folder (one per worker, with n_k)
aggregate_step  micro-models folder          ->  global model folder (weights n_k / n)
evaluate_step   global model + shards        ->  metrics dict (also written as metrics.json)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from microfed.training.aggregation import weighted_average
from microfed.training.datasets import LoadedDataset, load_dataset
from microfed.training.errors import MicrofedError
from microfed.training.evaluation import evaluate
from microfed.training.io import read_json, read_safetensors, write_json
from microfed.training.launch import launch_local
from microfed.training.model_files import MODEL_CONFIG_FILE, ModelCard, load_model, save_model
from microfed.training.shards import SplitConfig, load_test_set, subsample, write_shards
from microfed.training.train import Preprocess
from microfed.training.worker import WorkerConfig, config_to_argv

__all__ = ["SplitOptions", "aggregate_step", "evaluate_step", "split_step", "train_step"]


@dataclass(frozen=True, kw_only=True)
class SplitOptions:
    """What the split step reads besides the split itself."""

    source: str
    """Dataset name (fashion-mnist, mnist, cifar10), or a path to a zip or folder of class folders."""
    image_size: tuple[int, int] | None = None
    """Resize every image to (H, W); None keeps a common size (the most frequent one when sizes differ)."""
    data_dir: str | None = None
    """Where the named dataset's files are; None searches the default places."""
    train_limit: int = 0
    """Use at most this many training examples, class proportions kept (0 = all); for quick runs."""
    test_limit: int = 0
    """Use at most this many test examples (0 = all)."""


def split_step(options: SplitOptions, split: SplitConfig, out_dir: str | Path) -> dict[str, Any]:
    """Decode the dataset once and write the shards; returns the dataset manifest (with `seconds`)."""
    start = time.perf_counter()
    data = load_dataset(options.source, data_dir=options.data_dir, image_size=options.image_size)
    train = subsample(data.train, options.train_limit, split.seed)
    test = subsample(data.test, options.test_limit, split.seed)
    summary = write_shards(LoadedDataset(name=data.name, train=train, test=test), out_dir, split)
    summary["seconds"] = time.perf_counter() - start
    write_json(Path(out_dir) / "dataset.json", summary)
    _log(
        f"split {data.name}: {summary['num_train_examples']} training examples into {split.num_shards} "
        f"{split.strategy} shards of {[s['num_examples'] for s in summary['shards']]}, "
        f"{summary['num_test_examples']} test examples ({summary['seconds']:.1f} s)"
    )
    return summary


def train_step(cfg: WorkerConfig, world_size: int) -> dict[str, Any]:
    """Run WORLD_SIZE local workers (the PyTorchJob contract on one machine); returns the job record."""
    start = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    _log(f"train: {world_size} workers, {cfg.rounds} rounds x {cfg.local_epochs} local epochs of {cfg.model}")
    launch_local(world_size, config_to_argv(cfg), log_dir=cfg.out / "logs")
    workers = [read_json(cfg.out / f"worker-{r:05d}.json") for r in range(world_size)]
    record = {"world_size": world_size, "workers": workers, "seconds": time.perf_counter() - start}
    write_json(cfg.out / "job.json", record)
    return record


def aggregate_step(micro_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Weighted average (n_k / n) of the micro-models listed in `job.json`; writes the global model."""
    start = time.perf_counter()
    micro_dir = Path(micro_dir)
    job = read_json(micro_dir / "job.json")
    states, weights, names = [], [], []
    for w in job["workers"]:
        state, meta = read_safetensors(micro_dir / w["file"])
        if meta.get("n_k") != str(w["n_k"]):
            raise MicrofedError(
                f"{micro_dir / w['file']}: n_k {meta.get('n_k')} in the file disagrees with "
                f"worker-{w['rank']:05d}.json ({w['n_k']})"
            )
        states.append(state)
        weights.append(float(w["n_k"]))
        names.append(f"micro-model of worker {w['rank']} ({w['file']})")
    card = ModelCard.from_dict(read_json(micro_dir / MODEL_CONFIG_FILE), str(micro_dir / MODEL_CONFIG_FILE))
    average = weighted_average(states, weights, names=names)
    n = int(sum(weights))
    save_model(out_dir, average, card, metadata={"n": str(n), "micro_models": str(len(states))})
    record = {
        "num_examples": n,
        "micro_models": len(states),
        "weights": [w / n for w in weights],
        "seconds": time.perf_counter() - start,
    }
    write_json(Path(out_dir) / "aggregate.json", record)
    _log(f"aggregate: weighted average of {len(states)} micro-models, weights {[round(w / n, 4) for w in weights]}")
    return record


def evaluate_step(
    model_dir: str | Path,
    shards_dir: str | Path,
    micro_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Test-set metrics of the global model, with the history of the rounds and the step timings."""
    start = time.perf_counter()
    model, card = load_model(model_dir)
    test = load_test_set(shards_dir)
    pre = Preprocess(list(card.mean), list(card.std), device=torch.device("cpu"))
    res = evaluate(
        model,
        test.images,
        test.labels,
        preprocess=pre,
        num_classes=card.architecture.num_classes,
        batch_size=batch_size,
    )
    dataset = read_json(Path(shards_dir) / "dataset.json")
    job = read_json(Path(micro_dir) / "job.json")
    aggregate = read_json(Path(model_dir) / "aggregate.json")
    rank0_rounds = job["workers"][0]["rounds"]
    round_accuracy = [r["test_accuracy"] for r in rank0_rounds[:-1] if "test_accuracy" in r]
    metrics = {
        "accuracy": res.accuracy,
        "loss": res.loss,
        "class_names": list(card.class_names),
        "per_class_accuracy": dict(zip(card.class_names, res.per_class_accuracy, strict=True)),
        "confusion_matrix": res.confusion_matrix,
        "num_test_examples": res.num_examples,
        "shard_sizes": [s["num_examples"] for s in dataset["shards"]],
        "shard_class_histograms": [s["class_histogram"] for s in dataset["shards"]],
        "round_accuracy": [*round_accuracy, res.accuracy],
        "train_loss": [[r["epochs"][-1]["loss"] for r in w["rounds"]] for w in job["workers"]],
        "timings": {
            "split": dataset.get("seconds", 0.0),
            "train": job["seconds"],
            "aggregate": aggregate["seconds"],
            "evaluate": time.perf_counter() - start,
        },
    }
    write_json(Path(out_dir) / "metrics.json", metrics)
    _log(f"evaluate: test accuracy {res.accuracy:.4f} on {res.num_examples} examples")
    return metrics


def _log(message: str) -> None:
    print(f"[microfed] {message}", flush=True)
