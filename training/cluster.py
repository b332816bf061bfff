"""The cluster the train step runs on: node labels and taints of infra/'s training pools and their default sizes
(`cluster.json`), how replicas are placed on GKE Autopilot (`cluster.json`'s `autopilot` key), and what infra/ says
about the cluster it created (the `microfed-cluster` ConfigMap, read by `read_cluster_info`).

One file holds the names so the Terraform in infra/ (which reads the same JSON) and the PyTorchJob builder
cannot drift apart. The pools' default machine types and node limits live there too, for the capacity check
(`microfed.training.capacity`); Terraform cannot take a variable's default from a file, so a test keeps them equal
to infra/modules/microfed/variables.tf and main.tf.

A cluster infra/ created carries a ConfigMap `microfed-cluster` in the KFP namespace whose key `cluster.json` says
how it was made (mode, Spot, machine types, node limits); the train step reads it once per job. A cluster made
some other way has none, and is taken for a Standard cluster with infra/'s defaults.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .errors import MicrofedError

__all__ = [
    "CLUSTER_CONFIGMAP",
    "CLUSTER_CONFIGMAP_KEY",
    "CLUSTER_FILE",
    "CLUSTER_INFO_KEYS",
    "MODES",
    "AutopilotPlacement",
    "AutopilotPodLimit",
    "ClusterContract",
    "ClusterInfo",
    "PoolDefaults",
    "Taint",
    "autopilot_placement",
    "cluster_contract",
    "load_kubernetes_config",
    "parse_cluster_info",
    "pool_defaults",
    "read_cluster_info",
]

CLUSTER_FILE = Path(__file__).with_name("cluster.json")
CLUSTER_CONFIGMAP = "microfed-cluster"
"""The ConfigMap infra/ creates in the KFP namespace (the pipeline-runner Role may `get` it, and nothing else)."""
CLUSTER_CONFIGMAP_KEY = "cluster.json"
MODES = ("standard", "autopilot")
GIB = 1024**3


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass(frozen=True)
class ClusterContract:
    training_taint: Taint
    """Taint on every training pool: only pods that tolerate it (our PyTorchJob replicas) land there."""
    pool_label_key: str
    """Node label naming the pool; the builder selects pools by it."""
    cpu_pool: str
    """Value of `pool_label_key` on the CPU training pool."""
    gpu_pools: dict[str, str]
    """Accelerator type (GKE name) → value of `pool_label_key` on its pool."""
    gpu_label_key: str
    """The label GKE puts on GPU nodes with the accelerator type."""
    gpu_taint: Taint
    """The taint GKE puts on GPU nodes."""
    gpu_resource: str
    """The extended resource name of a GPU."""


@cache
def cluster_contract() -> ClusterContract:
    raw: dict[str, Any] = json.loads(CLUSTER_FILE.read_text())
    return ClusterContract(
        training_taint=Taint(**raw["training_taint"]),
        pool_label_key=raw["pool_label_key"],
        cpu_pool=raw["cpu_pool"],
        gpu_pools=dict(raw["gpu_pools"]),
        gpu_label_key=raw["gpu_label_key"],
        gpu_taint=Taint(**raw["gpu_taint"]),
        gpu_resource=raw["gpu_resource"],
    )


@dataclass(frozen=True, kw_only=True)
class PoolDefaults:
    """The training pools as infra/ creates them when terraform.tfvars leaves them alone."""

    cpu_machine_type: str
    """Default of the `cpu_machine_type` variable."""
    cpu_max_nodes: int
    """Default of the `cpu_max_nodes` variable (nodes summed over the pool's zones)."""
    gpu_machine_types: dict[str, str]
    """Accelerator type → machine type of its pool: main.tf's `default_gpu_machine_types` (the
    `gpu_machine_types` variable overrides entries)."""
    gpu_max_nodes: int
    """Default of the `gpu_max_nodes` variable (per GPU pool, summed over its zones)."""
    gpus_per_node: int
    """main.tf's `gpus_per_node`: GPUs attached to each node of a GPU pool."""


@cache
def pool_defaults() -> PoolDefaults:
    raw: dict[str, Any] = json.loads(CLUSTER_FILE.read_text())["pool_defaults"]
    return PoolDefaults(
        cpu_machine_type=raw["cpu"]["machine_type"],
        cpu_max_nodes=raw["cpu"]["max_nodes"],
        gpu_machine_types=dict(raw["gpu"]["machine_types"]),
        gpu_max_nodes=raw["gpu"]["max_nodes"],
        gpus_per_node=raw["gpu"]["gpus_per_node"],
    )


# ---------------------------------------------------------------------------------------------------------------
# GKE Autopilot: cluster.json's `autopilot` key
# ---------------------------------------------------------------------------------------------------------------
# Sources (what each says is written out in cluster.json, under `autopilot.sources`):
#   https://cloud.google.com/kubernetes-engine/docs/how-to/autopilot-spot-pods          Spot selector, toleration, grace
#   https://cloud.google.com/kubernetes-engine/docs/how-to/autopilot-gpus               GPU selector, Accelerator class
#   https://cloud.google.com/kubernetes-engine/docs/how-to/workload-separation          why no labels or taints of ours
#   https://cloud.google.com/kubernetes-engine/docs/concepts/autopilot-resource-requests  per-pod maximum, ratio
# Unclear or unverified, because the stored copies of these pages stop after their opening sections:
# - the 25 s a preempted Spot Pod gets is read in the Spot page's zh-CN edition; the Spot VMs concept page
#   (https://cloud.google.com/kubernetes-engine/docs/concepts/spot-vms) says Pods get the first 15 s of a 30 s notice;
# - the maximum of a pod with one T4 (46 cores, 202 GiB) or one L4 (31 cores, 115 GiB) could not be read and is
#   unverified; the A100's (11 cores, 74 GiB) is GKE Warden's own rejection message, General-purpose's (30 cores,
#   110 GiB) the page's table as quoted by its users.
# A maximum set too high lets a job through that Autopilot then refuses pod by pod (the launcher fails the step on
# the FailedCreatePod events after start_grace_seconds); one set too low refuses a job Autopilot would have run.


@dataclass(frozen=True, kw_only=True)
class AutopilotPodLimit:
    """The largest pod Autopilot accepts for one replica of an accelerator (`none` = CPU only)."""

    accelerator: str
    compute_class: str
    """The Autopilot compute class the pod lands on: General-purpose without a GPU, Accelerator with one."""
    max_cpu: float
    """Cores, summed over the pod's containers' requests."""
    max_memory_bytes: int
    """Memory, summed over the pod's containers' requests."""
    cpu_memory_ratio: tuple[float, float] | None
    """(lowest, highest) GiB of memory per requested core; Autopilot raises the smaller request to reach the
    range. None where the class enforces no ratio."""
    source: str
    """Where the maximum comes from (some could not be checked against Google's table: see cluster.json)."""


@dataclass(frozen=True, kw_only=True)
class AutopilotPlacement:
    """How a replica asks Autopilot for its node: node selectors only, no node pools, no taints of ours."""

    spot_selector: tuple[str, str]
    """(key, value) of the node selector that makes a pod a Spot Pod. GKE taints Spot nodes and adds the
    toleration to the pod itself, so the builder writes none."""
    spot_max_grace_seconds: int
    """The most grace a Spot Pod gets when its node is preempted, whatever terminationGracePeriodSeconds says."""
    gpu_selector_key: str
    """Node selector key whose value names the GPU type; Autopilot refuses a GPU pod without it."""
    pod_limits: dict[str, AutopilotPodLimit]
    """Accelerator (`none` for CPU) -> the largest pod Autopilot accepts with one such GPU."""


@cache
def autopilot_placement() -> AutopilotPlacement:
    raw: dict[str, Any] = json.loads(CLUSTER_FILE.read_text())["autopilot"]
    limits = {}
    for accelerator, entry in raw["pod_limits"].items():
        ratio = entry["cpu_memory_ratio"]
        limits[accelerator] = AutopilotPodLimit(
            accelerator=accelerator,
            compute_class=entry["compute_class"],
            max_cpu=float(entry["max_cpu"]),
            max_memory_bytes=int(entry["max_memory_gib"] * GIB),
            cpu_memory_ratio=None if ratio is None else (float(ratio[0]), float(ratio[1])),
            source=entry["source"],
        )
    return AutopilotPlacement(
        spot_selector=(raw["spot_selector"]["key"], raw["spot_selector"]["value"]),
        spot_max_grace_seconds=int(raw["spot_max_grace_seconds"]),
        gpu_selector_key=raw["gpu_selector_key"],
        pod_limits=limits,
    )


# ---------------------------------------------------------------------------------------------------------------
# The cluster as infra/ made it: the microfed-cluster ConfigMap
# ---------------------------------------------------------------------------------------------------------------

CLUSTER_INFO_KEYS: dict[str, str] = {
    "mode": '"standard" or "autopilot"',
    "training_spot": "true or false",
    "cpu_machine_type": "a machine type name",
    "cpu_max_nodes": "an integer >= 1",
    "gpu_types": "a list of GKE accelerator names",
    "gpu_machine_types": "an object: accelerator -> machine type",
    "gpu_max_nodes": "an integer >= 1",
}
"""The keys of the ConfigMap's JSON, each with what it may hold (for error messages)."""


@dataclass(frozen=True, kw_only=True)
class ClusterInfo:
    """What infra/ says about the cluster it created (its variables of the same names)."""

    mode: str = "standard"
    """`standard`: training node pools, tainted and labelled as cluster.json says; `autopilot`: no node pools,
    pods select Spot capacity and GPUs by node selector."""
    training_spot: bool = True
    """Training runs on Spot capacity: Standard's pools are Spot VMs; on Autopilot the replicas ask for Spot Pods."""
    cpu_machine_type: str
    """Machine type of the CPU training pool (Standard)."""
    cpu_max_nodes: int
    """Node limit of the CPU training pool (Standard)."""
    gpu_types: tuple[str, ...]
    """Accelerators the cluster offers: a training pool each on Standard."""
    gpu_machine_types: dict[str, str]
    """Accelerator -> machine type of its pool (Standard)."""
    gpu_max_nodes: int
    """Node limit of each GPU pool (Standard)."""
    source: str = ""
    """Where this came from, for log lines: the ConfigMap, or infra/'s defaults."""

    @classmethod
    def infra_defaults(cls, source: str = "infra/'s defaults") -> ClusterInfo:
        """A Standard cluster as infra/ creates it when terraform.tfvars changes nothing (training/cluster.json's
        pool_defaults). Every accelerator cluster.json knows counts as offered: a cluster without the ConfigMap
        was not made by infra/, and what its pools are is not known here."""
        d = pool_defaults()
        return cls(
            mode="standard",
            training_spot=True,
            cpu_machine_type=d.cpu_machine_type,
            cpu_max_nodes=d.cpu_max_nodes,
            gpu_types=tuple(d.gpu_machine_types),
            gpu_machine_types=dict(d.gpu_machine_types),
            gpu_max_nodes=d.gpu_max_nodes,
            source=source,
        )


def _where(namespace: str) -> str:
    return f"ConfigMap {namespace}/{CLUSTER_CONFIGMAP}, key {CLUSTER_CONFIGMAP_KEY}"


def _bad(namespace: str, what: str) -> MicrofedError:
    return MicrofedError(
        f"{_where(namespace)}: {what}",
        hint="infra/ writes this ConfigMap: run terraform apply in infra/ again, or delete the ConfigMap to have "
        "the cluster taken for a Standard cluster with infra/'s defaults",
    )


def _whole(value: Any) -> bool:
    """A JSON number that is a whole number (Terraform's jsonencode writes numbers as written: 8 or 8.0)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and float(value).is_integer()
    )


def parse_cluster_info(text: str, *, namespace: str) -> ClusterInfo:
    """The ClusterInfo in `text`, the ConfigMap's `cluster.json`; MicrofedError naming the ConfigMap, the key and
    what it may hold when anything is missing or of the wrong type. Keys beyond the contract are ignored (a newer
    infra/ may add some)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(namespace, f"not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise _bad(namespace, f"must be a JSON object with the keys {', '.join(CLUSTER_INFO_KEYS)}")
    missing = [k for k in CLUSTER_INFO_KEYS if k not in raw]
    if missing:
        raise _bad(namespace, f"missing {', '.join(missing)} (keys: {', '.join(CLUSTER_INFO_KEYS)})")

    def wrong(key: str) -> MicrofedError:
        return _bad(namespace, f"`{key}` must be {CLUSTER_INFO_KEYS[key]}, got {raw[key]!r}")

    known = cluster_contract().gpu_pools
    if raw["mode"] not in MODES:
        raise wrong("mode")
    if not isinstance(raw["training_spot"], bool):
        raise wrong("training_spot")
    if not isinstance(raw["cpu_machine_type"], str) or not raw["cpu_machine_type"]:
        raise wrong("cpu_machine_type")
    for key in ("cpu_max_nodes", "gpu_max_nodes"):
        if not _whole(raw[key]) or raw[key] < 1:
            raise wrong(key)
    gpu_types = raw["gpu_types"]
    if not isinstance(gpu_types, list) or not all(isinstance(t, str) for t in gpu_types):
        raise wrong("gpu_types")
    unknown = [t for t in gpu_types if t not in known]
    if unknown:
        raise _bad(namespace, f"`gpu_types` holds {', '.join(unknown)}; allowed: {', '.join(known)}")
    machines = raw["gpu_machine_types"]
    if not isinstance(machines, dict) or not all(isinstance(v, str) and v for v in machines.values()):
        raise wrong("gpu_machine_types")
    # the capacity check reads a pool's machine type on Standard only: Autopilot chooses machines itself
    lacking = [t for t in gpu_types if t not in machines]
    if raw["mode"] == "standard" and lacking:
        raise _bad(namespace, f"`gpu_machine_types` has no machine type for {', '.join(lacking)} (in gpu_types)")
    return ClusterInfo(
        mode=raw["mode"],
        training_spot=raw["training_spot"],
        cpu_machine_type=raw["cpu_machine_type"],
        cpu_max_nodes=int(raw["cpu_max_nodes"]),
        gpu_types=tuple(gpu_types),
        gpu_machine_types=dict(machines),
        gpu_max_nodes=int(raw["gpu_max_nodes"]),
        source=f"ConfigMap {namespace}/{CLUSTER_CONFIGMAP}",
    )


def _print(message: str) -> None:
    print(f"[microfed] {message}", flush=True)


def read_cluster_info(
    namespace: str,
    core_api: Any = None,
    *,
    log: Callable[[str], None] = _print,
    attempts: int = 5,
    sleep: Callable[[float], None] = time.sleep,
) -> ClusterInfo:
    """The cluster as infra/ describes it in ConfigMap `microfed-cluster` of `namespace`.

    `core_api` is a kubernetes `CoreV1Api`; None builds one from the in-cluster configuration inside a pod
    (kube-config outside), as the kubeflow-training SDK's TrainingClient does. 404 (no such ConfigMap: a cluster
    infra/ did not create) and 403 (not allowed to read it) give infra/'s Standard defaults, with a log line that
    says so. A transient API error (timeout, dropped connection, 429, 5xx: `job_status.is_transient`) is retried
    up to `attempts` times with doubling waits; then, and for any other API error or a malformed ConfigMap, a
    MicrofedError names the ConfigMap.
    """
    from kubernetes.client.exceptions import ApiException

    from .job_status import is_transient

    api = core_api if core_api is not None else _core_api()
    attempts, delay = max(1, attempts), 1.0
    for attempt in range(1, attempts + 1):
        try:
            config_map = api.read_namespaced_config_map(name=CLUSTER_CONFIGMAP, namespace=namespace)
            break
        except Exception as e:
            if isinstance(e, ApiException) and e.status in (403, 404):
                return _defaults_without_configmap(namespace, int(e.status), log)
            if not is_transient(e) or attempt == attempts:
                raise _unreadable(namespace, e) from e
            log(f"cluster info: reading {_where(namespace)} failed ({_reason(e)}); retrying in {delay:.0f} s")
        sleep(delay)
        delay *= 2
    data = config_map.data or {}
    if CLUSTER_CONFIGMAP_KEY not in data:
        raise _bad(namespace, f"the ConfigMap has no key {CLUSTER_CONFIGMAP_KEY} (keys: {', '.join(data) or 'none'})")
    info = parse_cluster_info(data[CLUSTER_CONFIGMAP_KEY], namespace=namespace)
    spot = "Spot" if info.training_spot else "on-demand"
    log(f"cluster info: {info.mode} cluster, {spot} training capacity ({info.source})")
    return info


def load_kubernetes_config() -> None:
    """The kubernetes client's configuration by TrainingClient's rule (kubeflow-training 1.9,
    training/api/training_client.py): in-cluster when this runs in a pod (the service account's token is mounted),
    the kube-config file otherwise."""
    from kubernetes import config

    if Path("/var/run/secrets/kubernetes.io/").is_dir():
        config.load_incluster_config()
    else:
        config.load_kube_config()


def _core_api() -> Any:
    from kubernetes import client

    load_kubernetes_config()
    return client.CoreV1Api()


def _defaults_without_configmap(namespace: str, status: int, log: Callable[[str], None]) -> ClusterInfo:
    if status == 404:
        why = "does not exist (a cluster infra/ did not create)"
    else:
        why = "may not be read by this pod's service account (403; infra/modules/microfed grants get on it)"
    where = f"ConfigMap {namespace}/{CLUSTER_CONFIGMAP}"
    log(f"cluster info: {where} {why}; taking a Standard cluster with infra/'s defaults")
    return ClusterInfo.infra_defaults(source=f"infra/'s defaults: {where} {why}")


def _reason(error: BaseException) -> str:
    status, reason = getattr(error, "status", None), getattr(error, "reason", None)
    if status:
        return f"HTTP {status} {reason or ''}".strip()
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _unreadable(namespace: str, error: BaseException) -> MicrofedError:
    return MicrofedError(
        f"cannot read ConfigMap {namespace}/{CLUSTER_CONFIGMAP}: {_reason(error)}",
        hint="check the API server is reachable from the step's pod and that its service account may get the "
        "ConfigMap (infra/modules/microfed grants it to pipeline-runner)",
    )
