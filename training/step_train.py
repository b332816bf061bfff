"""The train step: shards folder -> micro-models folder (one per worker, with n_k).

A plain function over folders: one worker per shard, locally (processes) or as a PyTorchJob
(step_train_cluster.py); the train component (components/train_adapter.py) is one call into it. Folder arguments
may be local paths or gs:// URIs.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microfed.training.config import ClusterConfig
from microfed.training.errors import MicrofedError
from microfed.training.launch import launch_local
from microfed.training.layout import (
    DATASET_FILE,
    JOB_FILE,
    LOGS_DIR,
    JobRecord,
    WorkerRecord,
    parse_dataset_manifest,
    parse_worker_record,
    worker_record_file,
)
from microfed.training.models import ModelConfig
from microfed.training.resources import ResourcePlan, format_plan, plan_resources
from microfed.training.step_log import event, log, step
from microfed.training.step_train_cluster import run_on_cluster
from microfed.training.storage import is_gcs, join, read_bytes, upload_tree, write_bytes
from microfed.training.usage import UsageKey, job_usage, measured_from_workers, read_measured, update_cache
from microfed.training.worker import WorkerConfig, config_to_argv

if TYPE_CHECKING:  # the cluster client (kubernetes) is imported only by the steps that create jobs
    from microfed.training.cluster import ClusterInfo
    from microfed.training.pytorchjob_launch import JobBackend
    from microfed.training.trainjob_backend import TrainJobBackend

__all__ = ["ClusterOptions", "train_step"]


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    """Where and how the train step runs its workers as a TrainJob or a PyTorchJob."""

    launcher: str = "pytorchjob"
    """The job kind: `trainjob` (Kubeflow Trainer v2) or `pytorchjob` (Training Operator v1); `auto` is resolved
    before (training/launcher_select.py)."""
    image: str
    """Image of the worker replicas (the components' image)."""
    namespace: str
    """Namespace of the job; the step's own namespace when empty."""
    accelerators: tuple[str, ...]
    """Accelerators the resource plan may choose from, e.g. ("none", "nvidia-tesla-t4")."""
    timeout_seconds: float
    """Overall wait for the job, capacity waits included."""
    run_id: str
    """KFP run id; with `task` it names the job, so a retried step (a new pod) finds the job of the attempt before
    it and adopts it (running) or replaces it (finished)."""
    task: str
    """KFP task name."""
    service_account: str = ClusterConfig().service_account
    """Kubernetes service account of the replicas: the one Workload Identity maps to a Google service account
    with access to the bucket (KFP's `pipeline-runner`; `default-editor` in a multi-user profile namespace)."""
    backend: JobBackend | TrainJobBackend | None = None
    """The cluster to talk to; None means the Training Operator through TrainingClient (in-cluster config)."""
    poll_seconds: float = 10.0
    """How often the job's state is read."""
    max_restarts: int = 3
    """Recreations of one replica (exit 128-255) before the step fails; the operator alone never stops."""
    start_grace_seconds: float = 180.0
    """How long pods may fail to start (image pull, config error, rejected creation) before the step fails."""
    capacity_wait_seconds: float = 1800.0
    """How long a temporary "no scale-up" of the cluster autoscaler is waited for."""
    pool_max_nodes: int = ClusterConfig().pool_max_nodes
    """Maximum node count of the training pool the plan picks (infra/'s cpu_max_nodes or gpu_max_nodes); 0 = the
    cluster's own (ConfigMap microfed-cluster, else infra's defaults in training/cluster.json). A job that needs
    more nodes fails before it is created. Autopilot has no pools: ignored there."""
    cluster_info: ClusterInfo | None = None
    """The cluster's mode, Spot setting and pools (training/cluster.py). None reads the ConfigMap microfed-cluster
    that infra/ creates in the KFP namespace (the step's own); with a `backend` given (a stand-in with no API server
    behind it), None means infra/'s Standard defaults."""


@step("train")
def train_step(
    cfg: WorkerConfig,
    workers: int,
    *,
    cluster: ClusterOptions | None = None,
    log_dir: Path | None = None,
    usage_cache: str = "",
) -> JobRecord:
    """Run `workers` workers, one per shard, locally (processes) or as a PyTorchJob; returns the job record.

    Worker logs go to `log_dir` (a temporary folder when None) and are uploaded beside the micro-models,
    also when the job fails. `usage_cache` is the measured-usage cache (microfed.training.usage): a local path
    or gs:// URI of a folder (which holds usage-cache.json) or of a .json file; "" turns it off. The cluster
    plan starts from its entry for this work, and the workers' measurement replaces that entry after the job.
    The record's `usage` compares each replica's measured peaks with the plan's requests (a local run: with
    the plan a cluster run on CPU would have got).
    """
    start = time.perf_counter()
    shared = not cfg.optim.batch_size  # each worker's share of the global batch
    cfg = dataclasses.replace(cfg, optim=cfg.optim.for_workers(workers))  # the workers resolve it alike
    log(
        f"train: {workers} workers, {cfg.rounds} rounds x {cfg.local_epochs} local epochs of {cfg.model}, batch "
        f"{cfg.optim.batch_size} per worker" + (f" (global {cfg.optim.global_batch_size})" if shared else "")
    )
    event("train_plan", workers=workers, rounds=cfg.rounds, local_epochs=cfg.local_epochs, model=cfg.model)
    plan = None
    with tempfile.TemporaryDirectory() as tmp:
        # local output: logs go straight to their place (errors name files that stay); gs://: uploaded after
        logs = log_dir or (Path(tmp) if is_gcs(cfg.out) else Path(cfg.out) / LOGS_DIR)
        logs.mkdir(parents=True, exist_ok=True)
        try:
            if cluster is None:
                launch_local(workers, config_to_argv(cfg), log_dir=logs)
            else:
                from microfed.training.image import image_torch_variant, usable_accelerators

                # the replicas run this step's image: a CPU build of torch cannot use a GPU plan
                plan = _plan(
                    cfg, usable_accelerators(cluster.accelerators, image_torch_variant(), log=log), usage_cache
                )
                run_on_cluster(cfg, workers, cluster, plan, logs)
        finally:
            if any(logs.iterdir()):
                upload_tree(logs, join(cfg.out, LOGS_DIR))
    records = [_read_worker_record(cfg.out, r) for r in range(workers)]
    record: JobRecord = {
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),  # paths as text
        "workers": records,
        "plan": plan.to_dict() if plan else None,
        "usage": _job_usage(cfg, records, plan, usage_cache),
        "seconds": time.perf_counter() - start,
    }
    write_bytes(join(cfg.out, JOB_FILE), json.dumps(record, indent=2, sort_keys=True).encode())
    return record


def _read_worker_record(out: str, rank: int) -> WorkerRecord:
    uri = join(out, worker_record_file(rank))
    return parse_worker_record(json.loads(read_bytes(uri)), uri)


def _plan(cfg: WorkerConfig, accelerators: Sequence[str], usage_cache: str = "", note: str = "") -> ResourcePlan:
    """The resource plan of one replica, from the model and the largest shard, and from the measured-usage
    cache's entry for this work when there is one."""
    uri = join(cfg.shards, DATASET_FILE)
    summary = parse_dataset_manifest(json.loads(read_bytes(uri)), uri)
    c, h, w = summary["image_shape"]
    arch = ModelConfig(name=cfg.model, num_classes=len(summary["class_names"]), in_channels=c, image_size=(h, w))
    cfg = dataclasses.replace(cfg, optim=cfg.optim.for_workers(len(summary["shards"])))  # one worker per shard
    key = UsageKey(
        model=cfg.model,
        image_shape=(c, h, w),
        batch_size=cfg.optim.batch_size,
        precision=cfg.optim.precision,
        optimizer=cfg.optim.optimizer,
    )
    plan = plan_resources(
        arch,
        batch_size=cfg.optim.batch_size,
        optimizer=cfg.optim.optimizer,
        shard_examples=max(s["num_examples"] for s in summary["shards"]),
        precision=cfg.optim.precision,
        accelerators=accelerators,
        measured=read_measured(usage_cache, key),
    )
    log(f"resource plan per replica{note}: {format_plan(plan)}")
    return plan


def _job_usage(
    cfg: WorkerConfig, workers: list[WorkerRecord], plan: ResourcePlan | None, usage_cache: str
) -> dict[str, Any] | None:
    """The workers' measured use against the plan's requests, and their measurement into the usage cache.

    A local run has no plan: it is compared with the plan a cluster run on CPU would have got. Measuring
    never fails the step: what goes wrong here is logged, and the record's `usage` is None.
    """
    try:
        reference = plan or _plan(cfg, ("none",), usage_cache, note=" (local run; what a CPU cluster run would get)")
        report = job_usage(reference, workers, planned=plan is not None)
        key = UsageKey.from_plan(reference)
        measured = measured_from_workers(workers, key.image_shape)
        if usage_cache and measured is not None:
            report["cache"] = update_cache(usage_cache, key, *measured)
    except (MicrofedError, OSError) as e:
        log(f"usage: not compared with the plan or cached ({e})")
        return None
    low = report["lowest_utilisation"]
    if low["cpu"] is not None and low["memory"] is not None:
        log(
            f"usage: lowest request utilisation CPU {low['cpu']:.0%} (demand {low['cpu_demand']:.0%}), "
            f"memory {low['memory']:.0%} "
            f"(requests from the {report['requests_from']}; goal {report['goal']:.0%})"
        )
    return report
