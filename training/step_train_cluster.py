"""The train step's workers as a TrainJob or a PyTorchJob: the cluster's description, the capacity checks made
before the job exists, each replica's configuration from the resource plan, and the job's submission and watch."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, cast

from microfed.training.errors import MicrofedError
from microfed.training.layout import micro_model_file, worker_record_file
from microfed.training.resources import ResourcePlan
from microfed.training.step_log import log
from microfed.training.storage import exists, join
from microfed.training.worker import WorkerConfig, config_to_argv

if TYPE_CHECKING:  # the cluster client (kubernetes) is imported only when a job is created
    from microfed.training.cluster import ClusterInfo
    from microfed.training.pytorchjob_backend import JobBackend
    from microfed.training.step_train import ClusterOptions  # train_step imports this module
    from microfed.training.trainjob_backend import TrainJobBackend

__all__ = ["run_on_cluster"]


def run_on_cluster(cfg: WorkerConfig, workers: int, cluster: ClusterOptions, plan: ResourcePlan, logs: Path) -> None:
    """Run the workers as one job of `workers` replicas sized by `plan` (a TrainJob or a PyTorchJob, as
    `cluster.launcher` says), after refusing a job the cluster can never hold; returns when the job succeeded with
    every worker's record and micro-model in `cfg.out`. The replicas' logs go to `logs`."""
    from microfed.training.job_watch import WatchPolicy
    from microfed.training.pytorchjob import JobConfig, Placement, job_name

    namespace = cluster.namespace or _own_namespace()
    info = _cluster_info(cluster)
    _check_capacity(plan, workers, cluster, info)
    job = JobConfig(
        name=job_name(cluster.run_id, cluster.task),
        namespace=namespace,
        image=cluster.image,
        workers=workers,
        worker_args=config_to_argv(_replica_config(cfg, plan)),
        plan=plan,
        service_account=cluster.service_account or None,
        # the controller's deadline deletes every pod, logs included: let the launcher's timeout (which saves the
        # logs, then deletes the job) come first
        active_deadline_seconds=int(cluster.timeout_seconds) + _DEADLINE_MARGIN_SECONDS,
        labels={"pipelines.kubeflow.org/run-id": cluster.run_id[:63]} if cluster.run_id else {},
        placement=Placement(mode=info.mode, spot=info.training_spot),
    )
    policy = WatchPolicy(
        timeout_seconds=cluster.timeout_seconds,
        poll_seconds=cluster.poll_seconds,
        max_restarts=cluster.max_restarts,
        start_grace_seconds=cluster.start_grace_seconds,
        capacity_wait_seconds=cluster.capacity_wait_seconds,
        memory_note=_memory_note(plan),
    )
    missing = functools.partial(_missing_records, cfg.out, workers)
    if cluster.launcher == "trainjob":
        from microfed.training.trainjob import build_trainjob
        from microfed.training.trainjob_launch import KubernetesTrainJobBackend, run_trainjob

        kind, manifest = "TrainJob", build_trainjob(job)
        backend = cast("TrainJobBackend", cluster.backend) or KubernetesTrainJobBackend(namespace=namespace)
        outcome = run_trainjob(manifest, backend, policy=policy, log_dir=logs, outputs_missing=missing, log=log)
    elif cluster.launcher == "pytorchjob":
        from microfed.training.pytorchjob import build_pytorchjob
        from microfed.training.pytorchjob_launch import TrainingClientBackend, run_pytorchjob

        kind, built = "PyTorchJob", build_pytorchjob(job)
        client = cast("JobBackend", cluster.backend) or TrainingClientBackend(namespace=namespace)
        outcome = run_pytorchjob(built, client, policy=policy, log_dir=logs, outputs_missing=missing, log=log)
    else:
        raise MicrofedError(f"unknown cluster launcher {cluster.launcher!r}", hint="use trainjob or pytorchjob")
    restarts = f", replicas restarted: {outcome.restarts}" if outcome.restarts else ""
    log(
        f"{kind} {outcome.name} succeeded in {outcome.seconds:.0f} s "
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
    return read_cluster_info(_own_namespace(), log=log)


def _check_capacity(plan: ResourcePlan, workers: int, cluster: ClusterOptions, info: ClusterInfo) -> None:
    """Refuse, before the job exists, a job the cluster can never run."""
    from microfed.training.capacity import check_autopilot_pod, check_gpu_type, check_pool_capacity, pool_limits_of

    if info.mode == "autopilot":
        check_gpu_type(info, plan.accelerator)
        # no pools to outgrow; a replica larger than any Autopilot pod of its class is refused outright
        limit = check_autopilot_pod(plan, log=log)
        spot = "Spot " if info.training_spot else ""
        log(
            f"capacity: Autopilot, {workers} {spot}pods of the {limit.compute_class} class (at most "
            f"{limit.max_cpu:g} cores and {limit.max_memory_bytes / 2**30:g} GiB each); nodes come as pods need "
            "them, within the project's quota"
        )
        return
    # "max node group size reached" is permanent when the job needs more nodes than the pool may ever have
    limits = pool_limits_of(info, plan.accelerator, max_nodes=cluster.pool_max_nodes or None)
    nodes = check_pool_capacity(plan, workers, limits, log=log)
    if nodes is not None:
        log(
            f"capacity: {workers} replicas need {nodes} of at most {limits.max_nodes} nodes of {limits.pool} "
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


def _missing_records(out: str, workers: int) -> list[int]:
    """Ranks whose record or micro-model is not in `out` yet (a worker uploads its files in parallel)."""
    names = [worker_record_file, micro_model_file]
    return [r for r in range(workers) if not all(exists(join(out, name(r))) for name in names)]


def _memory_note(plan: ResourcePlan) -> str:
    source = "measured in an earlier run" if plan.estimate.get("requests_from") == "measurement" else "estimated"
    return f"the plan requested {plan.memory_request / 2**30:.2f} GiB per replica ({source})"


def _own_namespace() -> str:
    """The namespace this pod runs in (KFP runs steps in the pipeline's namespace)."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.exists() else "default"
