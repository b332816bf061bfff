"""Build the Kubeflow Training Operator `PyTorchJob` that runs one worker replica per shard.

`build_pytorchjob` is a pure function from a `JobConfig` to the SDK's job object; submitting, waiting and
cleaning up live elsewhere, so this file can be tested against the CRD schema without a cluster.
The replica with RANK 0 is the Master; the operator injects MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK, which is
all the worker entrypoint needs (see microfed.training.worker).

Placement depends on the cluster's mode (`JobConfig.placement`). On GKE Standard infra/ declares tainted, labelled
training pools, and a replica tolerates the training taint and selects its pool (training/cluster.json). On GKE
Autopilot there are no pools: a replica selects Spot capacity and its GPU type by node selector and Autopilot
creates a node that fits it (training/cluster.json's `autopilot` key lists the sources); our labels and taints
would be refused there.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from kubeflow.training.models import (
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
)
from kubernetes.client import (
    ApiClient,
    V1Container,
    V1EnvVar,
    V1ObjectMeta,
    V1PodSpec,
    V1PodTemplateSpec,
    V1ResourceRequirements,
    V1Toleration,
)

from microfed.training.cluster import MODES, Taint, autopilot_placement, cluster_contract
from microfed.training.errors import MicrofedError
from microfed.training.resources import ResourcePlan

__all__ = [
    "APP_LABEL",
    "CLEAN_POD_POLICIES",
    "CONTAINER_NAME",
    "ISTIO_INJECT_ANNOTATION",
    "MAX_JOB_NAME",
    "RESERVED_ENV",
    "WORKER_MODULE",
    "JobConfig",
    "Placement",
    "build_pytorchjob",
    "job_name",
    "pod_template",
    "pytorchjob_to_dict",
]

# The operator builds pod names `<job>-master-0` / `<job>-worker-<i>` and a service per pod; all of them must
# stay within the 63-character label limit. 45 leaves room for `-worker-` plus up to 10 index digits.
MAX_JOB_NAME = 45
CONTAINER_NAME = "pytorch"  # the Training Operator only wires MASTER_ADDR etc. into a container of this name
WORKER_MODULE = "microfed.training.worker"
APP_LABEL = ("app.kubernetes.io/name", "microfed")
# Istio's sidecar never exits, so an injected pod never reaches Succeeded and the job never finishes.
ISTIO_INJECT_ANNOTATION = ("sidecar.istio.io/inject", "false")
CLEAN_POD_POLICIES = ("None", "Running", "All")
# Exit codes 128-255 (killed, OOM-killed, preempted node) are retried; 1-127 are program errors and are not.
RESTART_POLICY = "ExitCode"
# Set by the builder or injected by the operator: a caller's value would silently break the rendezvous.
RESERVED_ENV = frozenset({"MICROFED_BACKEND", "PYTHONUNBUFFERED", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"})

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


# --- job names ---------------------------------------------------------------------------------------------


def _sanitise(text: str) -> str:
    """Lowercase; every run of characters outside [a-z0-9] becomes one '-'; no '-' at either end."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def job_name(run_id: str, task: str) -> str:
    """A deterministic DNS-1035 name (≤ MAX_JOB_NAME chars) for the job of one task of one run.

    It depends on the run and the task only: a KFP (Argo) retry runs the step in a new pod, and must find the
    job of the attempt before it by name, to adopt it or replace it (never two jobs writing the same outputs).
    Inputs that are already valid and short are used as they are (`train-<run id>`); anything else keeps a
    readable prefix and adds a hash of the exact inputs, so two inputs that sanitise alike (`Run_1`, `run-1`)
    cannot collide.
    """
    if not run_id or not task:
        raise MicrofedError(f"job_name needs a run id and a task name, got run_id={run_id!r} task={task!r}")
    raw = f"{task}-{run_id}"
    readable = _sanitise(raw)
    if not readable[:1].isalpha():  # DNS-1035 must start with a letter; run ids often start with a digit
        readable = f"mf-{readable}".rstrip("-")
    if readable == raw and len(readable) <= MAX_JOB_NAME:
        return readable
    digest = hashlib.sha256(json.dumps([run_id, task]).encode()).hexdigest()[:8]
    head = readable[: MAX_JOB_NAME - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}"


# --- configuration -----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Placement:
    """The kind of cluster the job goes to, as infra/ made it (training/cluster.py `ClusterInfo`)."""

    mode: str = "standard"
    """`standard`: select infra/'s training pools and tolerate their taint; `autopilot`: node selectors for Spot
    and the GPU type only (one of MODES)."""
    spot: bool = False
    """On Autopilot, run the replicas as Spot Pods. On Standard it changes nothing: the pools are Spot VMs or not
    as infra/ created them."""


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything that varies between PyTorchJobs of the train step."""

    name: str
    """Job name: a DNS-1035 label of at most MAX_JOB_NAME characters; use `job_name()`."""
    namespace: str
    """Namespace the job runs in (the KFP run's namespace, where infra/modules/microfed/rbac.yaml applies)."""
    image: str
    """Container image holding microfed and its dependencies (the same image as the components)."""
    workers: int
    """Replicas in all, one per shard: 1 Master (RANK 0) plus workers - 1 Workers."""
    worker_args: list[str]
    """Arguments after `python -m microfed.training.worker` (shards, output, model, rounds, device...)."""
    plan: ResourcePlan = field(default_factory=ResourcePlan)
    """Per-replica accelerator, CPU and memory requests and limits."""
    service_account: str | None = None
    """Pod service account (for Workload Identity access to gs://); None keeps the namespace default."""
    active_deadline_seconds: int = 6 * 3600
    """Wall-clock limit the operator enforces on the whole job, seconds (> 0)."""
    backoff_limit: int = 3
    """Written for completeness, but the v1.9 operator never enforces it with restartPolicy ExitCode (it counts
    RestartCount of running pods, which stays 0: pkg/core/job.go PastBackoffLimit); the launcher's
    WatchPolicy.max_restarts is the limit that holds (>= 0)."""
    ttl_seconds_after_finished: int = 3600
    """Seconds after the job finishes before the operator deletes it, a backstop for a launcher that died."""
    clean_pod_policy: str = "None"
    """Which pods the operator deletes when the job ends: None (keeps failed pods' logs readable; the launcher
    deletes the job in a `finally` anyway), Running or All."""
    labels: dict[str, str] = field(default_factory=dict)
    """Extra labels on the job and its pods (for example the KFP run id), besides app.kubernetes.io/name."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for every replica (for example STORAGE_EMULATOR_HOST)."""
    placement: Placement = field(default_factory=Placement)
    """The cluster's mode; the default keeps infra/'s Standard training pools."""
    termination_grace_period_seconds: int | None = None
    """Seconds a replica's container gets between SIGTERM and SIGKILL (>= 0); None keeps Kubernetes' 30. Autopilot
    gives a preempted Spot Pod at most `spot_max_grace_seconds` (25) whatever is asked, so a Spot replica there is
    written with at most that."""

    def __post_init__(self) -> None:
        self._check_names()
        self._check_numbers()
        _check_placement(self.placement)
        _check_plan(self.plan)
        _check_labels(self.labels)
        _check_env(self.env)
        if not isinstance(self.worker_args, list) or not all(isinstance(a, str) for a in self.worker_args):
            raise MicrofedError(f"JobConfig.worker_args must be a list of strings, got {self.worker_args!r}")

    def _check_names(self) -> None:
        if len(self.name) > MAX_JOB_NAME or not _DNS1035.fullmatch(self.name):
            raise MicrofedError(
                f"JobConfig.name {self.name!r} is not a DNS-1035 label of at most {MAX_JOB_NAME} characters",
                hint="build it with microfed.training.pytorchjob.job_name()",
            )
        if len(self.namespace) > 63 or not _DNS1123_LABEL.fullmatch(self.namespace):
            raise MicrofedError(f"JobConfig.namespace {self.namespace!r} is not a valid namespace name")
        if not self.image or any(c.isspace() for c in self.image):
            raise MicrofedError(f"JobConfig.image {self.image!r} must be a non-empty image reference")
        sa = self.service_account
        if sa is not None and (len(sa) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(sa)):
            raise MicrofedError(f"JobConfig.service_account {sa!r} is not a valid service account name")

    def _check_numbers(self) -> None:
        if self.workers < 1:
            raise MicrofedError(f"JobConfig.workers must be >= 1, got {self.workers}")
        if self.active_deadline_seconds <= 0:
            raise MicrofedError(f"JobConfig.active_deadline_seconds must be > 0, got {self.active_deadline_seconds}")
        if self.backoff_limit < 0:
            raise MicrofedError(f"JobConfig.backoff_limit must be >= 0, got {self.backoff_limit}")
        if self.ttl_seconds_after_finished < 0:
            raise MicrofedError(
                f"JobConfig.ttl_seconds_after_finished must be >= 0, got {self.ttl_seconds_after_finished}"
            )
        grace = self.termination_grace_period_seconds
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, int) or grace < 0):
            raise MicrofedError(f"JobConfig.termination_grace_period_seconds must be an integer >= 0, got {grace!r}")
        if self.clean_pod_policy not in CLEAN_POD_POLICIES:
            raise MicrofedError(
                f"JobConfig.clean_pod_policy {self.clean_pod_policy!r} is not allowed",
                hint=f"use one of {', '.join(CLEAN_POD_POLICIES)}",
            )


def _check_placement(placement: Placement) -> None:
    if placement.mode not in MODES:
        raise MicrofedError(
            f"JobConfig.placement.mode {placement.mode!r} is not allowed",
            hint=f"use one of {', '.join(MODES)} (the cluster's mode, ConfigMap microfed-cluster)",
        )
    if not isinstance(placement.spot, bool):
        raise MicrofedError(f"JobConfig.placement.spot must be true or false, got {placement.spot!r}")


def _check_plan(plan: ResourcePlan) -> None:
    """Requests above limits or a GPU without a pool would be rejected by the API server or never schedule."""
    pools = cluster_contract().gpu_pools
    if plan.gpus not in (0, 1) or (plan.gpus == 0) != (plan.accelerator == "none"):
        raise MicrofedError(
            f"JobConfig.plan: accelerator {plan.accelerator!r} with gpus={plan.gpus}",
            hint="use accelerator 'none' with gpus=0, or a GPU accelerator with gpus=1",
        )
    if plan.gpus and plan.accelerator not in pools:
        raise MicrofedError(
            f"JobConfig.plan.accelerator {plan.accelerator!r} has no node pool",
            hint=f"use one of {', '.join(sorted(pools))} (training/cluster.json)",
        )
    if not 0.001 <= plan.cpu_request <= plan.cpu_limit:  # Kubernetes' CPU resolution is 1m
        raise MicrofedError(
            f"JobConfig.plan.cpu_request {plan.cpu_request} must be >= 0.001 and <= plan.cpu_limit {plan.cpu_limit}"
        )
    if not 0 < plan.memory_request <= plan.memory_limit:
        raise MicrofedError(
            f"JobConfig.plan.memory_request {plan.memory_request} must be > 0 and <= plan.memory_limit "
            f"{plan.memory_limit} (bytes)"
        )


def _check_labels(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (
            len(name) > 63
            or not _LABEL_NAME.fullmatch(name)
            or (prefix and not _DNS1123_SUBDOMAIN.fullmatch(prefix))
            or len(value) > 63
            or not _LABEL_VALUE.fullmatch(value)
        ):
            raise MicrofedError(
                f"JobConfig.labels: {key!r}: {value!r} is not a valid Kubernetes label",
                hint="keys [prefix/]name and values of at most 63 alphanumerics, '-', '_' or '.'",
            )


def _check_env(env: dict[str, str]) -> None:
    for key in env:
        if not _ENV_NAME.fullmatch(key):
            raise MicrofedError(f"JobConfig.env: {key!r} is not a valid environment variable name")
        if key in RESERVED_ENV:
            raise MicrofedError(
                f"JobConfig.env must not set {key}",
                hint="the builder or the Training Operator sets it",
            )


# --- manifest ----------------------------------------------------------------------------------------------


def _cpu(cores: float) -> str:
    return f"{round(cores * 1000)}m"


def _memory(nbytes: int) -> str:
    """Binary units when exact (readable in `kubectl describe`), plain bytes otherwise."""
    for unit, size in (("Gi", 1024**3), ("Mi", 1024**2)):
        if nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return str(nbytes)


def _resources(plan: ResourcePlan) -> V1ResourceRequirements:
    requests = {"cpu": _cpu(plan.cpu_request), "memory": _memory(plan.memory_request)}
    limits = {"cpu": _cpu(plan.cpu_limit), "memory": _memory(plan.memory_limit)}
    if plan.gpus:
        # Extended resources are set as limits; Kubernetes copies them into requests.
        limits[cluster_contract().gpu_resource] = str(plan.gpus)
    return V1ResourceRequirements(requests=requests, limits=limits)


def _toleration(taint: Taint) -> V1Toleration:
    return V1Toleration(key=taint.key, operator="Equal", value=taint.value, effect=taint.effect)


def _placement(plan: ResourcePlan, placement: Placement) -> tuple[list[V1Toleration], dict[str, str]]:
    """Tolerations and node selector that put a replica where its plan can run, and only there."""
    if placement.mode == "autopilot":
        return [], _autopilot_selector(plan, placement)
    contract = cluster_contract()
    if not plan.gpus:
        return [_toleration(contract.training_taint)], {contract.pool_label_key: contract.cpu_pool}
    tolerations = [_toleration(contract.training_taint), _toleration(contract.gpu_taint)]
    selector = {
        contract.pool_label_key: contract.gpu_pools[plan.accelerator],
        contract.gpu_label_key: plan.accelerator,
    }
    return tolerations, selector


def _autopilot_selector(plan: ResourcePlan, placement: Placement) -> dict[str, str]:
    """Autopilot's own labels only (sources in cluster.json's `autopilot.sources`).

    No toleration: GKE adds the Spot toleration to a Spot Pod itself, and Autopilot refuses custom labels
    (microfed.dev/pool) unless they pair a toleration and a selector of the same key:value ("workload
    separation"), which buys nothing here. A GPU pod must name its GPU type with cloud.google.com/gke-accelerator;
    no `cloud.google.com/compute-class: Accelerator` selector: GKE 1.29.4-gke.1427000 and later put GPU pods on the
    Accelerator class without it. (1.28.9 to 1.29.4 needed it; an Autopilot cluster that old is not supported.)
    """
    auto = autopilot_placement()
    selector: dict[str, str] = {}
    if placement.spot:
        key, value = auto.spot_selector
        selector[key] = value
    if plan.gpus:
        selector[auto.gpu_selector_key] = plan.accelerator
    return selector


def _grace_seconds(cfg: JobConfig) -> int | None:
    """terminationGracePeriodSeconds: the caller's, within what a preempted Autopilot Spot Pod is given."""
    grace = cfg.termination_grace_period_seconds
    if grace is not None and cfg.placement.mode == "autopilot" and cfg.placement.spot:
        # Asking more does not buy more on preemption; writing it would promise time that never comes.
        return min(grace, autopilot_placement().spot_max_grace_seconds)
    return grace


def _env(cfg: JobConfig) -> list[V1EnvVar]:
    backend = "nccl" if cfg.plan.gpus else "gloo"
    # Unbuffered output so a failing replica's last lines reach its log before the container dies.
    fixed = {"MICROFED_BACKEND": backend, "PYTHONUNBUFFERED": "1"}
    return [V1EnvVar(name=k, value=v) for k, v in {**fixed, **cfg.env}.items()]


def _labels(cfg: JobConfig) -> dict[str, str]:
    return {**cfg.labels, APP_LABEL[0]: APP_LABEL[1]}


def pod_template(cfg: JobConfig) -> V1PodTemplateSpec:
    container = V1Container(
        name=CONTAINER_NAME,
        image=cfg.image,
        command=["python", "-m", WORKER_MODULE, *cfg.worker_args],
        env=_env(cfg),
        resources=_resources(cfg.plan),
    )
    tolerations, selector = _placement(cfg.plan, cfg.placement)
    spec = V1PodSpec(
        containers=[container],
        tolerations=tolerations or None,
        node_selector=selector or None,
        service_account_name=cfg.service_account,
        termination_grace_period_seconds=_grace_seconds(cfg),
    )
    metadata = V1ObjectMeta(labels=_labels(cfg), annotations=dict([ISTIO_INJECT_ANNOTATION]))
    return V1PodTemplateSpec(metadata=metadata, spec=spec)


def _replica(replicas: int, cfg: JobConfig) -> KubeflowOrgV1ReplicaSpec:
    # A fresh template per replica type: the SDK objects are mutable and must not be shared.
    return KubeflowOrgV1ReplicaSpec(replicas=replicas, restart_policy=RESTART_POLICY, template=pod_template(cfg))


def build_pytorchjob(cfg: JobConfig) -> KubeflowOrgV1PyTorchJob:
    """The `kubeflow.org/v1` PyTorchJob for `cfg`: 1 Master plus workers - 1 Workers (none when workers == 1)."""
    replica_specs = {"Master": _replica(1, cfg)}
    if cfg.workers > 1:
        replica_specs["Worker"] = _replica(cfg.workers - 1, cfg)
    # These belong under runPolicy: directly under spec the API server prunes them without a word.
    run_policy = KubeflowOrgV1RunPolicy(
        clean_pod_policy=cfg.clean_pod_policy,
        ttl_seconds_after_finished=cfg.ttl_seconds_after_finished,
        active_deadline_seconds=cfg.active_deadline_seconds,
        backoff_limit=cfg.backoff_limit,
    )
    return KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=V1ObjectMeta(name=cfg.name, namespace=cfg.namespace, labels=_labels(cfg)),
        spec=KubeflowOrgV1PyTorchJobSpec(pytorch_replica_specs=replica_specs, run_policy=run_policy),
    )


def pytorchjob_to_dict(job: KubeflowOrgV1PyTorchJob) -> dict[str, Any]:
    """The job as the API server receives it: camelCase keys, unset fields left out."""
    with ApiClient() as client:  # only its serialiser is used: nothing connects to a cluster
        data: dict[str, Any] = client.sanitize_for_serialization(job)
    return data
