"""The four pipeline steps as plain functions over folders; each KFP component is one call into this module.

Every folder argument may be a local path or a gs:// URI: inputs are staged in (only the files a step reads),
outputs are written locally and uploaded when the step succeeds.

split_step      dataset name / zip / folder  ->  shards folder (one shard per worker + test set)
train_step      shards folder                ->  micro-models folder (one per worker, with n_k)
aggregate_step  micro-models folder          ->  global model folder (weights n_k / n)
evaluate_step   global model + shards        ->  metrics dict (also written as metrics.json)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from microfed.training.aggregation import check_same_architecture, weighted_average
from microfed.training.datasets import LoadedDataset, load_dataset
from microfed.training.errors import MicrofedError
from microfed.training.evaluation import evaluate
from microfed.training.io import read_json, read_safetensors, write_json
from microfed.training.launch import launch_local
from microfed.training.model_files import MODEL_CONFIG_FILE, ModelCard, load_model, save_model
from microfed.training.models import ModelConfig
from microfed.training.pytorchjob_launch import JobBackend
from microfed.training.report import render_report, write_report
from microfed.training.resources import ResourcePlan, format_plan, plan_resources
from microfed.training.shards import SplitConfig, load_test_set, read_dataset_manifest, subsample, write_shards
from microfed.training.storage import (
    is_gcs,
    join,
    read_bytes,
    staged_file,
    staged_input,
    staged_output,
    upload_tree,
    write_bytes,
)
from microfed.training.train import OptimConfig, Preprocess
from microfed.training.worker import WorkerConfig, config_to_argv

__all__ = [
    "ClusterOptions",
    "SplitOptions",
    "aggregate_step",
    "evaluate_step",
    "export_step",
    "split_step",
    "train_component_step",
    "train_step",
]


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
    bad_images: str = "fail"
    """`fail` on an image that cannot be decoded (the error names it), or `skip` it with a warning and a
    count in the manifest."""


def split_step(options: SplitOptions, split: SplitConfig, out_dir: str | Path) -> dict[str, Any]:
    """Decode the dataset once and write the shards; returns the dataset manifest (with `seconds`)."""
    start = time.perf_counter()
    with _staged_source(options.source) as source, staged_output(out_dir) as out:
        data = load_dataset(
            source, data_dir=options.data_dir, image_size=options.image_size, bad_images=options.bad_images
        )
        train = subsample(data.train, options.train_limit, split.seed)
        test = subsample(data.test, options.test_limit, split.seed)
        summary = write_shards(LoadedDataset(name=data.name, train=train, test=test), out, split)
        summary["seconds"] = time.perf_counter() - start
        write_json(out / "dataset.json", summary)
    _log(
        f"split {data.name}: {summary['num_train_examples']} training examples into {split.num_shards} "
        f"{split.strategy} shards of {[s['num_examples'] for s in summary['shards']]}, "
        f"{summary['num_test_examples']} test examples ({summary['seconds']:.1f} s)"
    )
    return summary


@contextlib.contextmanager
def _staged_source(source: str) -> Iterator[str]:
    """A dataset name as is; a gs:// zip or folder downloaded first (the name of a zip is kept)."""
    if not is_gcs(source):
        yield source
    elif source.rstrip("/").lower().endswith(".zip"):
        with staged_file(source) as path:
            yield str(path)
    else:
        with staged_input(source) as path:
            yield str(path)


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    """Where and how the train step runs its workers as a PyTorchJob."""

    image: str
    """Image of the worker replicas (the components' image)."""
    namespace: str
    """Namespace of the job; the step's own namespace when empty."""
    accelerators: tuple[str, ...]
    """Accelerators the resource plan may choose from, e.g. ("none", "nvidia-tesla-t4")."""
    timeout_seconds: float
    """Overall wait for the job, capacity waits included."""
    run_id: str
    """KFP run id; with `task` and `attempt` it names the job, so a restarted step adopts its job."""
    task: str
    attempt: int
    service_account: str = "pipeline-runner"
    """Kubernetes service account of the replicas: the one Workload Identity maps to a Google service account
    with access to the bucket (KFP's `pipeline-runner`; `default-editor` in a multi-user profile namespace)."""
    backend: JobBackend | None = None
    """The cluster to talk to; None means the Training Operator through TrainingClient (in-cluster config)."""
    poll_seconds: float = 10.0
    """How often the job's state is read."""


def train_step(
    cfg: WorkerConfig, world_size: int, *, cluster: ClusterOptions | None = None, log_dir: Path | None = None
) -> dict[str, Any]:
    """Run one worker per shard, locally (processes) or as a PyTorchJob; returns the job record.

    Worker logs go to `log_dir` (a temporary folder when None) and are uploaded beside the micro-models,
    also when the job fails.
    """
    start = time.perf_counter()
    _log(f"train: {world_size} workers, {cfg.rounds} rounds x {cfg.local_epochs} local epochs of {cfg.model}")
    plan = None
    with tempfile.TemporaryDirectory() as tmp:
        # local output: logs go straight to their place (errors name files that stay); gs://: uploaded after
        logs = log_dir or (Path(tmp) if is_gcs(cfg.out) else Path(cfg.out) / "logs")
        logs.mkdir(parents=True, exist_ok=True)
        try:
            if cluster is None:
                launch_local(world_size, config_to_argv(cfg), log_dir=logs)
            else:
                plan = _plan(cfg, cluster)
                _run_on_cluster(cfg, world_size, cluster, plan, logs)
        finally:
            if any(logs.iterdir()):
                upload_tree(logs, join(cfg.out, "logs"))
    workers = [json.loads(read_bytes(join(cfg.out, f"worker-{r:05d}.json"))) for r in range(world_size)]
    record = {
        "world_size": world_size,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),  # paths as text
        "workers": workers,
        "plan": plan.to_dict() if plan else None,
        "seconds": time.perf_counter() - start,
    }
    write_bytes(join(cfg.out, "job.json"), json.dumps(record, indent=2, sort_keys=True).encode())
    return record


def train_component_step(
    *,
    shards: tuple[str, str],
    out: tuple[str, str],
    launcher: str,
    model: str,
    rounds: int,
    local_epochs: int,
    seed: int,
    optim: OptimConfig,
    worker_image: str,
    namespace: str,
    accelerators: str,
    timeout_minutes: int,
    service_account: str,
    run_id: str,
    task_name: str,
) -> dict[str, Any]:
    """The train component's body: `shards` and `out` are the artifacts' (local path, URI) pairs.

    With `launcher="pytorchjob"` the replicas run in other pods, which cannot see this pod's files, so they
    get the URIs (gs://); locally the paths.
    """
    if launcher not in ("local", "pytorchjob"):
        raise MicrofedError(f"unknown launcher {launcher!r}", hint="use local or pytorchjob")
    on_cluster = launcher == "pytorchjob"
    world_size = len(read_dataset_manifest(shards[0])["shards"])
    cfg = WorkerConfig(
        shards=shards[on_cluster],
        out=out[on_cluster],
        model=model,
        rounds=rounds,
        local_epochs=local_epochs,
        seed=seed,
        optim=optim,
    )
    cluster = None
    if on_cluster:
        cluster = ClusterOptions(
            image=worker_image,
            namespace=namespace,
            accelerators=tuple(a.strip() for a in accelerators.split(",") if a.strip()),
            timeout_seconds=60.0 * timeout_minutes,
            run_id=run_id,
            task=task_name,
            # A retried step runs in a new pod (a new HOSTNAME) and gets a new job; a restarted container
            # in the same pod adopts the job it had started.
            attempt=zlib.crc32(os.environ.get("HOSTNAME", "").encode()) % 10000,
            service_account=service_account,
        )
    return train_step(cfg, world_size, cluster=cluster)


def _plan(cfg: WorkerConfig, cluster: ClusterOptions) -> ResourcePlan:
    """The resource plan of one replica, from the model and the largest shard."""
    summary = json.loads(read_bytes(join(cfg.shards, "dataset.json")))
    c, h, w = summary["image_shape"]
    arch = ModelConfig(name=cfg.model, num_classes=len(summary["class_names"]), in_channels=c, image_size=(h, w))
    plan = plan_resources(
        arch,
        batch_size=cfg.optim.batch_size,
        optimizer=cfg.optim.optimizer,
        shard_examples=max(s["num_examples"] for s in summary["shards"]),
        precision=cfg.optim.precision,
        accelerators=cluster.accelerators,
    )
    _log(f"resource plan per replica: {format_plan(plan)}")
    return plan


def _run_on_cluster(
    cfg: WorkerConfig, world_size: int, cluster: ClusterOptions, plan: ResourcePlan, logs: Path
) -> None:
    from microfed.training.pytorchjob import JobConfig, build_pytorchjob, job_name
    from microfed.training.pytorchjob_launch import TrainingClientBackend, run_pytorchjob

    # In a pod, sched_getaffinity sees the node's cores, not the container's CPU limit: pass the plan's.
    worker = dataclasses.replace(cfg, threads=max(1, int(plan.cpu_limit)))
    job = build_pytorchjob(
        JobConfig(
            name=job_name(cluster.run_id, cluster.task, cluster.attempt),
            namespace=cluster.namespace or _own_namespace(),
            image=cluster.image,
            workers=world_size,
            worker_args=config_to_argv(worker),
            plan=plan,
            service_account=cluster.service_account or None,
            active_deadline_seconds=int(cluster.timeout_seconds),
            labels={"pipelines.kubeflow.org/run-id": cluster.run_id[:63]} if cluster.run_id else {},
        )
    )
    backend = cluster.backend or TrainingClientBackend(namespace=str(job.metadata.namespace))
    outcome = run_pytorchjob(
        job,
        backend,
        timeout_seconds=cluster.timeout_seconds,
        log_dir=logs,
        poll_seconds=cluster.poll_seconds,
        log=_log,
    )
    _log(
        f"PyTorchJob {outcome.name} succeeded in {outcome.seconds:.0f} s "
        f"({outcome.waiting_for_capacity_seconds:.0f} s waiting for capacity)"
    )


def _own_namespace() -> str:
    """The namespace this pod runs in (KFP runs steps in the pipeline's namespace)."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.exists() else "default"


def aggregate_step(micro_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Weighted average (n_k / n) of the micro-models listed in `job.json`; writes the global model."""
    start = time.perf_counter()
    # only what the average reads: not the workers' logs or checkpoints
    files = ["job.json", MODEL_CONFIG_FILE, *_micro_model_files(micro_dir)]
    with staged_input(micro_dir, only=files) as micro, staged_output(out_dir) as out:
        record = _aggregate(micro, out)
        record["seconds"] = time.perf_counter() - start
        write_json(out / "aggregate.json", record)
    return record


def _micro_model_files(micro_dir: str | Path) -> list[str]:
    job = json.loads(read_bytes(join(micro_dir, "job.json")))
    return [str(w["file"]) for w in job["workers"]]


def _aggregate(micro: Path, out: Path) -> dict[str, Any]:
    job = read_json(micro / "job.json")
    states, weights, names, metas = [], [], [], []
    for w in job["workers"]:
        state, meta = read_safetensors(micro / w["file"])
        metas.append(meta)
        if meta.get("n_k") != str(w["n_k"]):
            raise MicrofedError(
                f"{micro / w['file']}: n_k {meta.get('n_k')} in the file disagrees with "
                f"worker-{w['rank']:05d}.json ({w['n_k']})"
            )
        states.append(state)
        weights.append(float(w["n_k"]))
        names.append(f"micro-model of worker {w['rank']} ({w['file']})")
    card = ModelCard.from_dict(read_json(micro / MODEL_CONFIG_FILE), str(micro / MODEL_CONFIG_FILE))
    check_same_architecture(metas, names)
    average = weighted_average(states, weights, names=names)
    n = int(sum(weights))
    save_model(out, average, card, metadata={"n": str(n), "micro_models": str(len(states))})
    _log(f"aggregate: weighted average of {len(states)} micro-models, weights {[round(w / n, 4) for w in weights]}")
    return {"num_examples": n, "micro_models": len(states), "weights": [w / n for w in weights]}


def evaluate_step(
    model_dir: str | Path,
    shards_dir: str | Path,
    micro_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Test-set metrics of the global model and of each micro-model, the history of the rounds and the step
    timings, written as metrics.json and the run's HTML report (report.html) in `out_dir`."""
    start = time.perf_counter()
    with (
        staged_input(model_dir) as model_path,
        staged_input(shards_dir, only=["dataset.json", "test.safetensors", "test.json"]) as shards,
        staged_input(micro_dir) as micro,
        staged_output(out_dir) as out,
    ):
        metrics = _evaluate(model_path, shards, micro, batch_size)
        metrics["timings"]["evaluate"] = time.perf_counter() - start
        write_json(out / "metrics.json", metrics)
        job, dataset = read_json(micro / "job.json"), read_json(shards / "dataset.json")
        html = render_report(metrics, config=job.get("config", {}), dataset=dataset, workers=job["workers"])
        write_report(out / "report.html", html)
        # what the report was made from, so a caller can render it again with more (the run's own totals)
        write_json(out / "job.json", job)
        write_json(out / "dataset.json", dataset)
    return metrics


def _evaluate(model_dir: Path, shards: Path, micro: Path, batch_size: int) -> dict[str, Any]:
    model, card = load_model(model_dir)
    test = load_test_set(shards)
    pre = Preprocess(list(card.mean), list(card.std), device=torch.device("cpu"))
    classes = card.architecture.num_classes
    res = evaluate(model, test.images, test.labels, preprocess=pre, num_classes=classes, batch_size=batch_size)
    dataset = read_json(shards / "dataset.json")
    job = read_json(micro / "job.json")
    aggregate = read_json(model_dir / "aggregate.json")
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
    rank0_rounds = job["workers"][0]["rounds"]
    round_accuracy = [r["test_accuracy"] for r in rank0_rounds[:-1] if "test_accuracy" in r]
    _log(
        f"evaluate: test accuracy {res.accuracy:.4f} on {res.num_examples} examples "
        f"(micro-models {min(micro_accuracy):.4f} to {max(micro_accuracy):.4f})"
    )
    return {
        "accuracy": res.accuracy,
        "loss": res.loss,
        "class_names": list(card.class_names),
        "per_class_accuracy": dict(zip(card.class_names, res.per_class_accuracy, strict=True)),
        "confusion_matrix": res.confusion_matrix,
        "num_test_examples": res.num_examples,
        "shard_sizes": [s["num_examples"] for s in dataset["shards"]],
        "shard_class_histograms": [s["class_histogram"] for s in dataset["shards"]],
        "round_accuracy": [*round_accuracy, res.accuracy],
        "micro_model_accuracy": micro_accuracy,
        "train_loss": [[r["epochs"][-1]["loss"] for r in w["rounds"]] for w in job["workers"]],
        "resource_plan": job.get("plan"),
        "timings": {"split": dataset.get("seconds", 0.0), "train": job["seconds"], "aggregate": aggregate["seconds"]},
    }


def export_step(
    model_dir: str | Path,
    shards_dir: str | Path,
    out_dir: str | Path,
    *,
    fmt: str = "onnx",
    parity_images: int = 64,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """The global model as ONNX or TorchScript with its preprocessing, checked against eager PyTorch on test images."""
    from microfed.training.export import export_model, parity_images_from_shards

    with (
        staged_input(model_dir) as model_path,
        staged_input(shards_dir, only=["test.safetensors", "test.json"]) as shards,
        staged_output(out_dir) as out,
    ):
        images = parity_images_from_shards(shards, parity_images)
        record = export_model(model_path, out, fmt=fmt, parity_images=images, tolerance=tolerance)
    _log(
        f"export: {record['file']} ({record['bytes'] / 1e6:.1f} MB), max |logit difference| "
        f"{record['parity']['max_abs_diff']:.1e} on {record['parity']['images']} test images"
    )
    return record


def _log(message: str) -> None:
    print(f"[microfed] {message}", flush=True)
