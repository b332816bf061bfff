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
import functools
import json
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from microfed.training.aggregation import check_same_architecture
from microfed.training.datasets import LoadedDataset, load_dataset
from microfed.training.errors import MicrofedError
from microfed.training.evaluation import evaluate
from microfed.training.io import read_json, read_safetensors, write_json
from microfed.training.launch import launch_local
from microfed.training.model_files import MODEL_CONFIG_FILE, ModelCard, load_model, save_model
from microfed.training.models import ModelConfig, build_model
from microfed.training.resources import ResourcePlan, format_plan, plan_resources
from microfed.training.shards import (
    SplitConfig,
    load_test_set,
    load_val_set,
    read_dataset_manifest,
    subsample,
    write_shards,
)
from microfed.training.storage import (
    exists,
    is_gcs,
    join,
    read_bytes,
    staged_file,
    staged_input,
    staged_output,
    upload_tree,
    write_bytes,
)
from microfed.training.strategies import Strategy, unpack_server_state
from microfed.training.text import printable
from microfed.training.train import OptimConfig, Preprocess
from microfed.training.usage import UsageKey, job_usage, measured_from_workers, read_measured, update_cache

if TYPE_CHECKING:  # the cluster client (kubernetes) is imported only by the steps that create jobs
    from microfed.training.cluster import ClusterInfo
    from microfed.training.pytorchjob_launch import JobBackend
from microfed.training.worker import (
    BEST_ROUND_FILE,
    ROUNDS_FILE,
    SERVER_STATE_FILE,
    WorkerConfig,
    config_to_argv,
    micro_model_name,
)

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
    """A dataset name as is; a gs:// zip or folder downloaded first (the name of a zip is kept). A CSV (local or
    gs://) is passed as is: load_dataset reads it and the images it lists from wherever they are."""
    if not is_gcs(source) or source.strip().lower().endswith(".csv"):
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
    """KFP run id; with `task` it names the job, so a retried step (a new pod) finds the job of the attempt before
    it and adopts it (running) or replaces it (finished)."""
    task: str
    """KFP task name."""
    service_account: str = "pipeline-runner"
    """Kubernetes service account of the replicas: the one Workload Identity maps to a Google service account
    with access to the bucket (KFP's `pipeline-runner`; `default-editor` in a multi-user profile namespace)."""
    backend: JobBackend | None = None
    """The cluster to talk to; None means the Training Operator through TrainingClient (in-cluster config)."""
    poll_seconds: float = 10.0
    """How often the job's state is read."""
    max_restarts: int = 3
    """Recreations of one replica (exit 128-255) before the step fails; the operator alone never stops."""
    start_grace_seconds: float = 180.0
    """How long pods may fail to start (image pull, config error, rejected creation) before the step fails."""
    capacity_wait_seconds: float = 1800.0
    """How long a temporary "no scale-up" of the cluster autoscaler is waited for."""
    pool_max_nodes: int = 0
    """Maximum node count of the training pool the plan picks (infra/'s cpu_max_nodes or gpu_max_nodes); 0 = the
    cluster's own (ConfigMap microfed-cluster, else infra's defaults in training/cluster.json). A job that needs
    more nodes fails before it is created. Autopilot has no pools: ignored there."""
    cluster_info: ClusterInfo | None = None
    """The cluster's mode, Spot setting and pools (training/cluster.py). None reads the ConfigMap microfed-cluster
    that infra/ creates in the KFP namespace (the step's own); with a `backend` given (a stand-in with no API server
    behind it), None means infra/'s Standard defaults."""


def train_step(
    cfg: WorkerConfig,
    world_size: int,
    *,
    cluster: ClusterOptions | None = None,
    log_dir: Path | None = None,
    usage_cache: str = "",
) -> dict[str, Any]:
    """Run one worker per shard, locally (processes) or as a PyTorchJob; returns the job record.

    Worker logs go to `log_dir` (a temporary folder when None) and are uploaded beside the micro-models,
    also when the job fails. `usage_cache` is the measured-usage cache (microfed.training.usage): a local path
    or gs:// URI of a folder (which holds usage-cache.json) or of a .json file; "" turns it off. The cluster
    plan starts from its entry for this work, and the workers' measurement replaces that entry after the job.
    The record's `usage` compares each replica's measured peaks with the plan's requests (a local run: with
    the plan a cluster run on CPU would have got).
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
                from microfed.training.image import image_torch_variant, usable_accelerators

                # the replicas run this step's image: a CPU build of torch cannot use a GPU plan
                plan = _plan(
                    cfg, usable_accelerators(cluster.accelerators, image_torch_variant(), log=_log), usage_cache
                )
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
        "usage": _job_usage(cfg, workers, plan, usage_cache),
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
    strategy: Strategy | None = None,
    patience: int = 0,
    worker_image: str,
    namespace: str,
    accelerators: str,
    timeout_minutes: int,
    service_account: str,
    run_id: str,
    task_name: str,
    pool_max_nodes: int = 0,
    collective_timeout_minutes: int = 0,
    usage_cache: str = "",
) -> dict[str, Any]:
    """The train component's body: `shards` and `out` are the artifacts' (local path, URI) pairs.

    With `launcher="pytorchjob"` the replicas run in other pods, which cannot see this pod's files, so they
    get the URIs, which must be gs:// (checked before any job exists); locally the paths. `out`'s URI also
    locates the pipeline root, beside which the measured-usage cache lives by default.
    """
    from microfed.training.pipeline_root import check_replica_uris, usage_cache_uri

    if launcher not in ("local", "pytorchjob"):
        raise MicrofedError(f"unknown launcher {launcher!r}", hint="use local or pytorchjob")
    on_cluster = launcher == "pytorchjob"
    if on_cluster:
        check_replica_uris({"shards": shards[1], "micro_models": out[1]})
    world_size = len(read_dataset_manifest(shards[0])["shards"])
    cfg = WorkerConfig(
        shards=shards[on_cluster],
        out=out[on_cluster],
        model=model,
        rounds=rounds,
        local_epochs=local_epochs,
        seed=seed,
        optim=optim,
        strategy=strategy or Strategy(),
        patience=patience,
        collective_timeout_minutes=float(collective_timeout_minutes),
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
            service_account=service_account,
            pool_max_nodes=pool_max_nodes,
        )
    # the measured-usage cache: where the caller says ("off": none), else next to the pipeline root, so later
    # runs of the same model and input shape start their plan from this one's measurement. The root is read
    # from the micro_models URI: KFP 2.14's backend leaves `{{$.pipeline_root}}` unresolved (pipeline_root.py).
    if usage_cache == "off":
        usage_cache = ""
    elif not usage_cache:
        usage_cache = usage_cache_uri(out[1], artifact="micro_models", task_name=task_name, run_id=run_id)
    return train_step(cfg, world_size, cluster=cluster, usage_cache=usage_cache)


def _plan(cfg: WorkerConfig, accelerators: Sequence[str], usage_cache: str = "", note: str = "") -> ResourcePlan:
    """The resource plan of one replica, from the model and the largest shard, and from the measured-usage
    cache's entry for this work when there is one."""
    summary = json.loads(read_bytes(join(cfg.shards, "dataset.json")))
    c, h, w = summary["image_shape"]
    arch = ModelConfig(name=cfg.model, num_classes=len(summary["class_names"]), in_channels=c, image_size=(h, w))
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
    _log(f"resource plan per replica{note}: {format_plan(plan)}")
    return plan


def _job_usage(
    cfg: WorkerConfig, workers: list[dict[str, Any]], plan: ResourcePlan | None, usage_cache: str
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
        _log(f"usage: not compared with the plan or cached ({e})")
        return None
    low = report["lowest_utilisation"]
    if low["cpu"] is not None and low["memory"] is not None:
        _log(
            f"usage: lowest request utilisation CPU {low['cpu']:.0%} (demand {low['cpu_demand']:.0%}), "
            f"memory {low['memory']:.0%} "
            f"(requests from the {report['requests_from']}; goal {report['goal']:.0%})"
        )
    return report


def _run_on_cluster(
    cfg: WorkerConfig, world_size: int, cluster: ClusterOptions, plan: ResourcePlan, logs: Path
) -> None:
    from microfed.training.pytorchjob import JobConfig, Placement, build_pytorchjob, job_name
    from microfed.training.pytorchjob_launch import TrainingClientBackend, WatchPolicy, run_pytorchjob

    namespace = cluster.namespace or _own_namespace()
    info = _cluster_info(cluster)
    _check_capacity(plan, world_size, cluster, info)
    worker = _replica_config(cfg, plan)
    job = build_pytorchjob(
        JobConfig(
            name=job_name(cluster.run_id, cluster.task),
            namespace=namespace,
            image=cluster.image,
            workers=world_size,
            worker_args=config_to_argv(worker),
            plan=plan,
            service_account=cluster.service_account or None,
            # the operator's deadline deletes every pod, logs included: let the launcher's timeout (which saves
            # the logs, then deletes the job) come first
            active_deadline_seconds=int(cluster.timeout_seconds) + _DEADLINE_MARGIN_SECONDS,
            labels={"pipelines.kubeflow.org/run-id": cluster.run_id[:63]} if cluster.run_id else {},
            placement=Placement(mode=info.mode, spot=info.training_spot),
        )
    )
    backend = cluster.backend or TrainingClientBackend(namespace=str(job.metadata.namespace))
    policy = WatchPolicy(
        timeout_seconds=cluster.timeout_seconds,
        poll_seconds=cluster.poll_seconds,
        max_restarts=cluster.max_restarts,
        start_grace_seconds=cluster.start_grace_seconds,
        capacity_wait_seconds=cluster.capacity_wait_seconds,
        memory_note=_memory_note(plan),
    )
    missing = functools.partial(_missing_records, cfg.out, world_size)
    outcome = run_pytorchjob(job, backend, policy=policy, log_dir=logs, outputs_missing=missing, log=_log)
    restarts = f", replicas restarted: {outcome.restarts}" if outcome.restarts else ""
    _log(
        f"PyTorchJob {outcome.name} succeeded in {outcome.seconds:.0f} s "
        f"({outcome.waiting_for_capacity_seconds:.0f} s waiting for capacity{restarts})"
    )


_DEADLINE_MARGIN_SECONDS = 600


def _cluster_info(cluster: ClusterOptions) -> ClusterInfo:
    """The cluster's description, read once per job: the caller's, else the ConfigMap infra/ wrote in the KFP
    namespace, which is this step's own (a job may go to another namespace; the ConfigMap stays there). A backend
    given without one is a stand-in with no API server to ask: infra/'s Standard defaults."""
    from microfed.training.cluster import ClusterInfo, read_cluster_info

    if cluster.cluster_info is not None:
        return cluster.cluster_info
    if cluster.backend is not None:
        return ClusterInfo.infra_defaults(source="infra/'s defaults (a backend was given without cluster_info)")
    return read_cluster_info(_own_namespace(), log=_log)


def _check_capacity(plan: ResourcePlan, world_size: int, cluster: ClusterOptions, info: ClusterInfo) -> None:
    """Refuse, before the job exists, a job the cluster can never run."""
    from microfed.training.capacity import check_autopilot_pod, check_gpu_type, check_pool_capacity, pool_limits_of

    if info.mode == "autopilot":
        check_gpu_type(info, plan.accelerator)
        # no pools to outgrow; a replica larger than any Autopilot pod of its class is refused outright
        limit = check_autopilot_pod(plan, log=_log)
        spot = "Spot " if info.training_spot else ""
        _log(
            f"capacity: Autopilot, {world_size} {spot}pods of the {limit.compute_class} class (at most "
            f"{limit.max_cpu:g} cores and {limit.max_memory_bytes / 2**30:g} GiB each); nodes come as pods need "
            "them, within the project's quota"
        )
        return
    # "max node group size reached" is permanent when the job needs more nodes than the pool may ever have
    limits = pool_limits_of(info, plan.accelerator, max_nodes=cluster.pool_max_nodes or None)
    nodes = check_pool_capacity(plan, world_size, limits, log=_log)
    if nodes is not None:
        _log(
            f"capacity: {world_size} replicas need {nodes} of at most {limits.max_nodes} nodes of {limits.pool} "
            f"({info.source})"
        )


def _replica_config(cfg: WorkerConfig, plan: ResourcePlan) -> WorkerConfig:
    """The worker configuration of one replica: threads and the collective timeout from the plan."""
    from microfed.training.capacity import collective_timeout_minutes

    # In a pod, sched_getaffinity sees the node's cores, not the container's CPU limit: pass the plan's.
    # Threads: the plan's limit for an estimate; for requests taken from a measurement, the request (rounded up),
    # or more threads would measure more cores and the next request would climb to the cap.
    measured = plan.estimate.get("requests_from") == "measurement"
    threads = max(1, math.ceil(plan.cpu_request) if measured else int(plan.cpu_limit))
    # the end-of-round all-reduce waits for the slowest rank's local epochs: bound it by the plan, not a fixed 30 min
    timeout = cfg.collective_timeout_minutes or collective_timeout_minutes(
        plan, local_epochs=cfg.local_epochs, largest_shard=plan.estimate.get("shard_examples", 1)
    )
    return dataclasses.replace(cfg, threads=threads, collective_timeout_minutes=float(timeout))


def _missing_records(out: str, world_size: int) -> list[int]:
    """Ranks whose record or micro-model is not in `out` yet (a worker uploads its files in parallel)."""
    names = [lambda r: f"worker-{r:05d}.json", micro_model_name]
    return [r for r in range(world_size) if not all(exists(join(out, name(r))) for name in names)]


def _memory_note(plan: ResourcePlan) -> str:
    source = "measured in an earlier run" if plan.estimate.get("requests_from") == "measurement" else "estimated"
    return f"the plan requested {plan.memory_request / 2**30:.2f} GiB per replica ({source})"


def _own_namespace() -> str:
    """The namespace this pod runs in (KFP runs steps in the pipeline's namespace)."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.exists() else "default"


def aggregate_step(
    micro_dir: str | Path, out_dir: str | Path, shards_dir: str | Path | None = None, batch_size: int = 512
) -> dict[str, Any]:
    """Combine the micro-models listed in `job.json` by the job's strategy (its `combine_final`: the weighted
    average, n_k / n, and a server optimizer's last step; ddp's single model passed through) and write the global
    model.

    With `shards_dir` holding a validation split, the result is round R's model or the best earlier round's,
    whichever has the higher validation accuracy (ties: the earlier round).
    """
    start = time.perf_counter()
    # only what the average reads: not the workers' logs or checkpoints
    extra = [f for f in (ROUNDS_FILE, BEST_ROUND_FILE, SERVER_STATE_FILE) if exists(join(micro_dir, f))]
    files = ["job.json", MODEL_CONFIG_FILE, *_micro_model_files(micro_dir), *extra]
    with contextlib.ExitStack() as stack:
        micro = stack.enter_context(staged_input(micro_dir, only=files))
        shards = None
        if shards_dir is not None and exists(join(shards_dir, "val.json")):
            shards = stack.enter_context(staged_input(shards_dir, only=["dataset.json", "val.safetensors", "val.json"]))
        out = stack.enter_context(staged_output(out_dir))
        record = _aggregate(micro, out, shards, batch_size)
        record["seconds"] = time.perf_counter() - start
        write_json(out / "aggregate.json", record)
    return record


def _micro_model_files(micro_dir: str | Path) -> list[str]:
    job = json.loads(read_bytes(join(micro_dir, "job.json")))
    return [str(w["file"]) for w in job["workers"]]


def _aggregate(micro: Path, out: Path, shards: Path | None, batch_size: int) -> dict[str, Any]:
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
    rounds = read_json(micro / ROUNDS_FILE) if (micro / ROUNDS_FILE).exists() else {}
    strategy = Strategy(**rounds.get("strategy", {}))
    n = int(sum(weights))
    # a server optimizer's state, when the job left it: the global model round R started from, and its moments
    server = None
    if (micro / SERVER_STATE_FILE).exists():
        server = unpack_server_state(read_safetensors(micro / SERVER_STATE_FILE)[0])
    model_state, how = strategy.build().combine_final(states, weights, names=names, server=server)
    record: dict[str, Any] = {
        "num_examples": n,
        "micro_models": len(states),
        "weights": [w / n for w in weights],
        "strategy": dataclasses.asdict(strategy),
        "rounds": int(rounds.get("stopped_after_round", job.get("config", {}).get("rounds", 0)) or 0),
    }
    record.update(_select(shards, rounds, record["rounds"], model_state, card, batch_size))
    if record.get("selected_round") not in (None, record["rounds"]):
        model_state, _ = read_safetensors(micro / BEST_ROUND_FILE)
    save_model(
        out,
        model_state,
        card,
        metadata={"n": str(n), "micro_models": str(len(states)), "round": str(record.get("selected_round") or "")},
    )
    _log(f"aggregate: {how}")
    return record


def _select(
    shards: Path | None,
    rounds: dict[str, Any],
    last: int,
    final: dict[str, torch.Tensor],
    card: ModelCard,
    batch_size: int,
) -> dict[str, Any]:
    """Validation accuracy of every round (the job's records plus the final model's, measured here) and the
    round to keep; nothing when no validation split was held out."""
    if shards is None:
        return {}
    val = load_val_set(shards)
    if val is None:
        return {}
    model = build_model(card.architecture)
    model.load_state_dict(final)
    pre = Preprocess(list(card.mean), list(card.std), device=torch.device("cpu"))
    res = evaluate(
        model, val.images, val.labels, preprocess=pre, num_classes=card.architecture.num_classes, batch_size=batch_size
    )
    history = [r for r in rounds.get("val", []) if r["round"] != last]
    history.append({"round": last, "val_accuracy": res.accuracy, "val_loss": res.loss})
    best = rounds.get("best_round")
    selected = last
    if best is not None and rounds.get("best_file") and float(rounds["best_val_accuracy"]) >= res.accuracy:
        selected = int(best)
    chosen = next(r for r in history if r["round"] == selected)
    _log(
        f"aggregate: validation accuracy by round {[round(r['val_accuracy'], 4) for r in history]}; "
        f"keeping round {selected} ({chosen['val_accuracy']:.4f})"
    )
    return {"val_history": history, "selected_round": selected, "val_accuracy": chosen["val_accuracy"]}


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
        from microfed.training.report import render_report, write_report  # matplotlib: only this step draws

        html = render_report(metrics, config=job.get("config", {}), dataset=dataset, workers=job["workers"])
        write_report(out / "report.html", html)
        # what the report was made from, so a caller can render it again with more (the run's own totals)
        write_json(out / "job.json", job)
        write_json(out / "dataset.json", dataset)
    return metrics


def _evaluate(model_dir: Path, shards: Path, micro: Path, batch_size: int) -> dict[str, Any]:
    # this run's own model, written from its --model: the factory it names is the one the run was given
    model, card = load_model(model_dir, trust_recorded_code=True)
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
    # the global model's accuracy per round: on the validation split when one was held out (the aggregate step
    # recorded it), else only the final model's, on the test set
    history = aggregate.get("val_history") or []
    per_round = {
        "round_accuracy": [h["val_accuracy"] for h in history] or [res.accuracy],
        "round_loss": [h["val_loss"] for h in history] or [res.loss],
        "round_numbers": [h["round"] for h in history]
        or [int(aggregate.get("rounds") or len(job["workers"][0]["rounds"]))],
        "round_split": "validation" if history else "test",
        "selected_round": aggregate.get("selected_round"),
        "strategy": aggregate.get("strategy", {}).get("name", "fedavg"),
    }
    _log(
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
        **per_round,
        "micro_model_accuracy": micro_accuracy,
        "train_loss": [[r["epochs"][-1]["loss"] for r in w["rounds"]] for w in job["workers"]],
        "resource_plan": job.get("plan"),
        "resource_usage": job.get("usage"),  # measured peaks against the plan's requests
        "timings": {"split": dataset.get("seconds", 0.0), "train": job["seconds"], "aggregate": aggregate["seconds"]},
    }


# How many skipped files metrics.json and the run summary name; the shards' dataset.json lists up to 1000.
_SKIPPED_EXAMPLES = 5


def _skipped_images(dataset: dict[str, Any]) -> dict[str, Any]:
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
        record = export_model(
            model_path, out, fmt=fmt, parity_images=images, tolerance=tolerance, trust_recorded_code=True
        )
    _log(
        f"export: {record['file']} ({record['bytes'] / 1e6:.1f} MB), max |logit difference| "
        f"{record['parity']['max_abs_diff']:.1e} on {record['parity']['images']} test images"
    )
    return record


def _log(message: str) -> None:
    print(f"[microfed] {message}", flush=True)
