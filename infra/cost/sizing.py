"""How big the system node of infra/ must be: the requests of everything that runs while nothing trains, summed
from the vendored manifests, against GKE's allocatable resources of each machine type.

    .venv/bin/python infra/cost/sizing.py        # the sum, item by item, and the verdict per machine type

What is summed, for one system node (`system_min_nodes = 1`, the idle cluster):
1. The vendored Kubeflow Pipelines manifests and those of the training operator `training_operator` installs
   (infra/modules/microfed/manifests/*/rendered.yaml; `OPERATOR_KUSTOMIZATIONS` says which folders are whose, and
   the default, trainer-v2, is what is sized): every Deployment, StatefulSet and DaemonSet, replicas x the
   pod's effective request. Kubernetes' rule for a pod's effective request: the larger of (a) the sum of its app
   containers (plus restartable "sidecar" init containers) and (b) the largest init container (plus the sidecars
   started before it); init containers run one at a time, so they count as a max, never a sum. A DaemonSet runs
   once per node: once here.
2. The explicit requests infra/ sets on the containers that declare none (infra/modules/microfed/requests.json,
   applied by kustomize patches in both modes): what they add to (1). Autopilot bills a container without requests
   at 0.5 vCPU / 2 GiB, and the scheduler counts it as 0 on Standard, so every such container must have an entry:
   one without (a re-render that adds a container) raises `SizingError` naming it, and so does an entry that
   matches no container or one whose container already declares both requests. Each entry's `basis` says on what
   its figures rest.
3. GKE's own kube-system pods on a Standard cluster configured as infra/modules/microfed/cluster.tf configures
   it (private nodes, Calico network policy, Workload Identity, system and workload logging, system monitoring):
   per node, `microfed.training.capacity.DAEMONSET_CPU` / `DAEMONSET_MEMORY` (the figure the capacity check of
   the training pools already uses; `GKE_DAEMONSETS` itemizes it and a test keeps the items under it), and once
   per cluster `GKE_CLUSTER_PODS`. Every figure names its source (`SOURCES`) or says it is an estimate.

The same pods, with requests.json applied (`patched_workloads`), are what infra/cost/model.py prices for
`mode = "autopilot"`.

A machine type fits when sum x (1 + headroom) <= its allocatable (`microfed.training.capacity.gke_allocatable`,
Google's published reservation formula; shared-core E2 types keep 1060 millicores instead, see
`SHARED_CORE_ALLOCATABLE_CPU`), with 10% CPU and 20% memory headroom. `cheapest_fitting` picks, among the machine
types of prices.json without GPUs, the cheapest on-demand one that fits; tests/test_system_sizing.py asserts that
it is the default of `system_machine_type`, so a re-render or a price change that moves the answer fails there.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from microfed.training.capacity import DAEMONSET_CPU, DAEMONSET_MEMORY, MACHINE_TYPES, gke_allocatable

__all__ = [
    "CPU_HEADROOM",
    "DEFAULT_OPERATOR",
    "GKE_CLUSTER_PODS",
    "GKE_DAEMONSETS",
    "MANIFESTS_DIR",
    "MEMORY_HEADROOM",
    "MODULE_DIR",
    "MIB",
    "OPERATOR_KUSTOMIZATIONS",
    "PRICES_FILE",
    "REQUESTS_FILE",
    "SHARED_CORE_ALLOCATABLE_CPU",
    "SOURCES",
    "Container",
    "ExplicitRequest",
    "Fit",
    "KubeSystemPod",
    "Resources",
    "SizingError",
    "SystemLoad",
    "Workload",
    "candidate_machine_types",
    "cheapest_fitting",
    "effective_pod_requests",
    "container_key",
    "fit",
    "installed_workloads",
    "load_explicit_requests",
    "main",
    "node_allocatable",
    "parse_cpu",
    "parse_memory",
    "patched_workloads",
    "read_workloads",
    "render_text",
    "system_load",
    "vendored_workloads",
]

MIB = 1024**2
MODULE_DIR = Path(__file__).resolve().parents[1] / "modules" / "microfed"
MANIFESTS_DIR = MODULE_DIR / "manifests"
REQUESTS_FILE = MODULE_DIR / "requests.json"
PRICES_FILE = Path(__file__).resolve().with_name("prices.json")

CPU_HEADROOM = 0.10
"""Spare CPU on top of the summed requests: requests are not use, and step pods of a run land on this pool too."""
MEMORY_HEADROOM = 0.20
"""Spare memory on top of the summed requests (memory, unlike CPU, cannot be throttled)."""

_WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")

OPERATOR_KUSTOMIZATIONS: dict[str, tuple[str, ...]] = {
    "trainer-v2": ("trainer-v2", "trainer-v2-runtimes"),
    "training-operator-v1": ("training-operator",),
}
"""The vendored folders each value of `training_operator` installs (kubeflow.tf's local.operator_kustomizations;
tests/test_system_sizing.py keeps the two equal). Every other folder (KFP's) is installed whichever it is."""
DEFAULT_OPERATOR = "trainer-v2"
"""The default of `training_operator` (variables.tf; the same test checks it): the configuration that is sized."""


class SizingError(Exception):
    """A manifest or a machine type the sizing cannot read; the message says which."""


# ---------------------------------------------------------------------------------------------------------------
# Quantities
# ---------------------------------------------------------------------------------------------------------------

_BINARY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def parse_cpu(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity in cores: `250m` -> 0.25, `1` -> 1.0, `0.5` -> 0.5."""
    text = str(quantity).strip()
    try:
        if text.endswith("m"):
            return float(Decimal(text[:-1]) / 1000)
        return float(Decimal(text))
    except ArithmeticError as e:
        raise SizingError(f"not a CPU quantity: {quantity!r}") from e


def parse_memory(quantity: str | int | float) -> int:
    """A Kubernetes memory quantity in bytes: `500Mi` -> 524288000, `10M` -> 10000000, `1Gi`, `128974848`."""
    text = str(quantity).strip()
    try:
        for suffix, factor in _BINARY.items():
            if text.endswith(suffix):
                return int(Decimal(text[: -len(suffix)]) * factor)
        for suffix, factor in _DECIMAL.items():
            if text.endswith(suffix):
                return int(Decimal(text[: -len(suffix)]) * factor)
        if text.endswith("m"):  # millibytes: legal, and rounded up by Kubernetes
            return -int(-Decimal(text[:-1]) // 1000)
        return int(Decimal(text))
    except ArithmeticError as e:
        raise SizingError(f"not a memory quantity: {quantity!r}") from e


@dataclass(frozen=True)
class Resources:
    """CPU (cores) and memory (bytes)."""

    cpu: float = 0.0
    memory: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu + other.cpu, self.memory + other.memory)

    def times(self, n: int) -> Resources:
        return Resources(self.cpu * n, self.memory * n)

    @staticmethod
    def total(items: Iterable[Resources]) -> Resources:
        out = Resources()
        for item in items:
            out = out + item
        return out

    def __str__(self) -> str:
        return f"{round(self.cpu * 1000):d}m CPU, {self.memory / MIB:.0f} MiB"


# ---------------------------------------------------------------------------------------------------------------
# The vendored manifests
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Container:
    """One container's requests; None where it sets none."""

    name: str
    cpu: float | None
    memory: int | None
    restartable: bool = False
    """An init container with `restartPolicy: Always` (a sidecar): it keeps running beside the app containers."""

    @property
    def requests(self) -> Resources:
        return Resources(self.cpu or 0.0, self.memory or 0)


def _container(spec: Mapping[str, Any]) -> Container:
    requests = (spec.get("resources") or {}).get("requests") or {}
    cpu = parse_cpu(requests["cpu"]) if "cpu" in requests else None
    memory = parse_memory(requests["memory"]) if "memory" in requests else None
    return Container(str(spec["name"]), cpu, memory, spec.get("restartPolicy") == "Always")


def effective_pod_requests(containers: Sequence[Container], init_containers: Sequence[Container] = ()) -> Resources:
    """A pod's effective request, per resource (Kubernetes' rule, sidecar containers included): the larger of the
    app containers' sum plus every sidecar, and, for each non-sidecar init container, its own request plus the
    sidecars started before it. Init containers run one after another, so they count as a maximum, not a sum."""

    def per_resource(get: Any) -> Any:
        sidecars = 0
        peak_init = 0
        for init in init_containers:
            value = get(init)
            if init.restartable:
                sidecars += value
                peak_init = max(peak_init, sidecars)
            else:
                peak_init = max(peak_init, sidecars + value)
        return max(peak_init, sum(get(c) for c in containers) + sidecars)

    cpu: float = per_resource(lambda c: c.requests.cpu)
    memory: int = per_resource(lambda c: c.requests.memory)
    return Resources(cpu, memory)


@dataclass(frozen=True)
class Workload:
    """A Deployment, StatefulSet or DaemonSet of a manifest."""

    kind: str
    namespace: str
    name: str
    replicas: int
    """Pods while idle: `spec.replicas` (1 when unset); a DaemonSet's pod per node counts once (one system node)."""
    containers: tuple[Container, ...]
    init_containers: tuple[Container, ...] = ()
    source: str = ""

    @property
    def pod(self) -> Resources:
        return effective_pod_requests(self.containers, self.init_containers)

    @property
    def requests(self) -> Resources:
        return self.pod.times(self.replicas)

    def without_requests(self) -> list[Container]:
        """The app containers that set no CPU or no memory request (init containers finish: they need none)."""
        return [c for c in self.containers if c.cpu is None or c.memory is None]


def read_workloads(manifest_text: str, source: str = "") -> list[Workload]:
    """The Deployments, StatefulSets and DaemonSets of a multi-document YAML manifest."""
    out = []
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: the operator's render is 3.7 MB
    for doc in yaml.load_all(manifest_text, Loader=loader):
        if not isinstance(doc, Mapping) or doc.get("kind") not in _WORKLOAD_KINDS:
            continue
        meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
        pod = (spec.get("template") or {}).get("spec") or {}
        replicas = 1 if doc["kind"] == "DaemonSet" else int(spec.get("replicas", 1))
        out.append(
            Workload(
                kind=str(doc["kind"]),
                namespace=str(meta.get("namespace", "default")),
                name=str(meta["name"]),
                replicas=replicas,
                containers=tuple(_container(c) for c in pod.get("containers") or []),
                init_containers=tuple(_container(c) for c in pod.get("initContainers") or []),
                source=source,
            )
        )
    return out


def vendored_workloads(manifests_dir: Path = MANIFESTS_DIR) -> list[Workload]:
    """Every workload of the vendored renders (manifests_dir/*/rendered.yaml), in file order: both operators'."""
    files = sorted(manifests_dir.glob("*/rendered.yaml"))
    if not files:
        raise SizingError(f"no */rendered.yaml under {manifests_dir}")
    return [w for f in files for w in read_workloads(f.read_text(), f.parent.name)]


def installed_workloads(workloads: Sequence[Workload], operator: str = DEFAULT_OPERATOR) -> list[Workload]:
    """The workloads that run with `training_operator = operator`: KFP's, and that operator's (not the other's)."""
    if operator not in OPERATOR_KUSTOMIZATIONS:
        raise SizingError(f"training_operator {operator!r}: expected one of {', '.join(OPERATOR_KUSTOMIZATIONS)}")
    others = {k for name, folders in OPERATOR_KUSTOMIZATIONS.items() if name != operator for k in folders}
    return [w for w in workloads if w.source not in others]


# ---------------------------------------------------------------------------------------------------------------
# What the manifests do not say: GKE's kube-system, and the requests infra/ adds (requests.json)
# ---------------------------------------------------------------------------------------------------------------

SOURCES: dict[str, str] = {
    "cryptnono-34": "https://github.com/cryptnono/cryptnono/issues/34 (kubectl describe node of a GKE 1.29 Standard "
    "node, May 2024: fluentbit-gke 105m/230Mi, gke-metadata-server 100m/100Mi, ip-masq-agent 10m/16Mi, "
    "konnectivity-agent 15m/60Mi (two on the node), konnectivity-agent-autoscaler 10m/10M, kube-dns 260m/110Mi "
    "(two on the node), kube-dns-autoscaler 20m/10Mi)",
    "2i2c-daemonsets": "https://github.com/2i2c-org/infrastructure deployer/commands/generate/resource_allocation/"
    "daemonset_requests.yaml (GKE 1.27, summed DaemonSet requests per cluster: 344m/596Mi with calico-node and "
    "gke-metrics-agent, 338m/496Mi without gke-metrics-agent, 228m/480Mi without calico-node, gke-metrics-agent "
    "and ip-masq-agent; the differences give gke-metrics-agent 6m/100Mi and calico-node 100m/0) and "
    "daemonset_overhead.yaml (GKE 1.26 -> 1.27, netd starts requesting: 2m/30Mi). The sums include two 2i2c "
    "DaemonSets (support-cryptnono, support-prometheus-node-exporter), so what remains for pdcsi-node is an upper "
    "bound.",
    "k8s-calico-addon": "https://github.com/kubernetes/kubernetes cluster/addons/calico-policy-controller/ "
    "(the Calico add-on GKE's network policy descends from): calico-node-vertical-autoscaler-configmap.yaml (cpu "
    "base 80m + 20m per 10 nodes), typha-vertical-autoscaler-configmap.yaml (cpu base 120m + 80m per 10 nodes: "
    "200m on a small cluster, the same rounding that gives calico-node the 100m 2i2c measured), "
    "typha-horizontal-autoscaler-configmap.yaml (1 replica below 10 nodes), "
    "typha-horizontal-autoscaler-deployment.yaml (10m CPU); the two vertical autoscalers set no request there",
    "k8s-metrics-server-addon": "https://github.com/kubernetes/kubernetes cluster/addons/metrics-server/"
    "metrics-server-deployment.yaml: metrics-server-nanny requests 5m/50Mi and sizes metrics-server from a base "
    "plus a per-node step (the base is a GKE setting, not in the file)",
    "knative-271": "https://github.com/knative/serving/pull/271 (GKE nodes: kube-proxy 100m CPU; kube-proxy is a "
    "static pod of every GKE Standard node without Dataplane V2, and requests no memory)",
    "kubeflow-testing-997": "https://github.com/kubeflow/testing/pull/997 (metadata-grpc-deployment OOMKilled "
    "repeatedly at a 512Mi limit in Kubeflow's test cluster)",
    "typha-303": "https://github.com/projectcalico/typha/issues/303 (calico-typha's memory starts under 40 MiB and "
    "grew towards a 100 MiB limit)",
}


@dataclass(frozen=True)
class KubeSystemPod:
    """A pod GKE runs in kube-system, with what it requests (per replica) and where that figure comes from."""

    name: str
    cpu_m: int
    memory_mib: int
    replicas: int = 1
    source: str = ""
    """A key of SOURCES."""
    estimate: str = ""
    """Non-empty where the figure (or part of it) is not read from the source: on what it rests."""

    @property
    def requests(self) -> Resources:
        return Resources(self.cpu_m / 1000, self.memory_mib * MIB).times(self.replicas)


# Per node, on every node of this configuration. Their sum is what DAEMONSET_CPU / DAEMONSET_MEMORY of
# microfed.training.capacity round up; the sizing uses those constants, this list says what they hold.
GKE_DAEMONSETS: tuple[KubeSystemPod, ...] = (
    KubeSystemPod("kube-proxy (static pod)", 100, 0, source="knative-271"),
    KubeSystemPod("fluentbit-gke (logging: SYSTEM_COMPONENTS, WORKLOADS)", 105, 230, source="cryptnono-34"),
    KubeSystemPod("gke-metadata-server (Workload Identity)", 100, 100, source="cryptnono-34"),
    KubeSystemPod("ip-masq-agent", 10, 16, source="cryptnono-34"),
    KubeSystemPod("calico-node (network policy)", 100, 0, source="2i2c-daemonsets"),
    KubeSystemPod("gke-metrics-agent (monitoring: SYSTEM_COMPONENTS)", 6, 100, source="2i2c-daemonsets"),
    KubeSystemPod("netd (intranode visibility, Workload Identity)", 2, 30, source="2i2c-daemonsets"),
    KubeSystemPod(
        "pdcsi-node (PD CSI driver)",
        21,
        120,
        source="2i2c-daemonsets",
        estimate="upper bound: what 2i2c's sums leave after the other GKE DaemonSets, with their own two in it",
    ),
)

# Once per cluster (all on the system pool: none tolerates the training pools' taints).
GKE_CLUSTER_PODS: tuple[KubeSystemPod, ...] = (
    KubeSystemPod(
        "kube-dns",
        260,
        110,
        replicas=2,
        source="cryptnono-34",
        estimate="2 replicas as measured: one alone on a one-node cluster, but two as soon as a training node joins "
        "(kube-dns-autoscaler keeps two when there is more than one node), and both land on the system pool",
    ),
    KubeSystemPod("kube-dns-autoscaler", 20, 10, source="cryptnono-34"),
    KubeSystemPod(
        "konnectivity-agent",
        15,
        60,
        replicas=2,
        source="cryptnono-34",
        estimate="2 replicas as measured; the agent's autoscaler adds replicas with nodes",
    ),
    KubeSystemPod("konnectivity-agent-autoscaler", 10, 10, source="cryptnono-34"),
    KubeSystemPod(
        "calico-typha",
        200,
        100,
        source="k8s-calico-addon",
        estimate="CPU from the add-on's vertical autoscaler formula; no memory request there: 100 MiB allowance "
        "from typha-303",
    ),
    KubeSystemPod(
        "calico-typha-horizontal-autoscaler",
        10,
        16,
        source="k8s-calico-addon",
        estimate="memory: 16 MiB allowance (no request in the add-on)",
    ),
    KubeSystemPod(
        "calico-typha-vertical-autoscaler",
        10,
        16,
        source="k8s-calico-addon",
        estimate="no request in the add-on: 10m / 16 MiB allowance, as its horizontal sibling",
    ),
    KubeSystemPod(
        "calico-node-vertical-autoscaler",
        10,
        16,
        source="k8s-calico-addon",
        estimate="no request in the add-on: 10m / 16 MiB allowance, as its horizontal sibling",
    ),
    KubeSystemPod(
        "metrics-server (+ metrics-server-nanny 5m/50Mi)",
        55,
        150,
        source="k8s-metrics-server-addon",
        estimate="metrics-server itself 50m / 100 MiB (its base is a GKE setting not in the source)",
    ),
    KubeSystemPod(
        "event-exporter-gke",
        10,
        50,
        estimate="no public source for its requests found: 10m / 50 MiB assumed",
    ),
    KubeSystemPod(
        "l7-default-backend (HTTP load balancing add-on, on by default)",
        10,
        20,
        estimate="no public source for its requests found: 10m / 20 MiB assumed",
    ),
)


@dataclass(frozen=True)
class ExplicitRequest:
    """One entry of infra/modules/microfed/requests.json: the requests infra/ sets on a container that declares
    none (a kustomize patch, in both modes), and on what the figures rest."""

    key: str
    """`<kustomization>/<Kind>/<name>/<container>`, the kustomization being the vendored render's directory."""
    cpu: float
    """Cores."""
    memory: int
    """Bytes."""
    basis: str

    @property
    def resources(self) -> Resources:
        return Resources(self.cpu, self.memory)


def load_explicit_requests(path: Path = REQUESTS_FILE) -> dict[str, ExplicitRequest]:
    """requests.json's entries by key; a malformed entry raises SizingError naming it."""
    try:
        doc = json.loads(path.read_text())
        entries = doc["containers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SizingError(f"{path}: expected a JSON object with a 'containers' object ({e})") from e
    out: dict[str, ExplicitRequest] = {}
    for key, entry in entries.items():
        if key.count("/") != 3 or not isinstance(entry, Mapping):
            raise SizingError(f"{path}: {key!r} is not <kustomization>/<Kind>/<name>/<container> -> {{cpu, memory}}")
        missing = [field for field in ("cpu", "memory", "basis") if not entry.get(field)]
        if missing:
            raise SizingError(f"{path}: {key} lacks {', '.join(missing)}")
        out[key] = ExplicitRequest(key, parse_cpu(entry["cpu"]), parse_memory(entry["memory"]), str(entry["basis"]))
    return out


def container_key(workload: Workload, container: Container) -> str:
    """The key requests.json files a container under."""
    return f"{workload.source}/{workload.kind}/{workload.name}/{container.name}"


def patched_workloads(
    workloads: Sequence[Workload], requests: Mapping[str, ExplicitRequest], where: Path = REQUESTS_FILE
) -> list[Workload]:
    """The workloads as infra/ runs them: every app container that lacks a CPU or a memory request gets both from its
    requests.json entry. A container without requests and without an entry, an entry whose container declares both
    requests already, and an entry that matches no container raise SizingError, naming what to change."""
    unused = dict(requests)
    out = []
    missing: list[str] = []
    for w in workloads:
        containers = []
        for c in w.containers:
            key = container_key(w, c)
            entry = unused.pop(key, None)
            if entry is not None and c.cpu is not None and c.memory is not None:
                raise SizingError(
                    f"{where}: {key} declares its own requests in the vendored manifests; requests.json is for "
                    "containers that declare none: remove the entry"
                )
            if entry is None and (c.cpu is None or c.memory is None):
                missing.append(key)
                containers.append(c)
                continue
            containers.append(c if entry is None else replace(c, cpu=entry.cpu, memory=entry.memory))
        out.append(replace(w, containers=tuple(containers)))
    if missing:
        raise SizingError(
            f"{len(missing)} container(s) of the vendored manifests set no CPU or memory request and have no entry in "
            f"{where}: {', '.join(missing)}. Add one each (cpu, memory, basis): Autopilot would bill them at 0.5 vCPU "
            "/ 2 GiB, and the system node's size would not count them"
        )
    if unused:
        raise SizingError(
            f"{where}: {', '.join(sorted(unused))} match(es) no container of the vendored manifests (renamed or gone "
            "in a re-render?): correct or remove the entry"
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# The sum, and the machine types it fits
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SystemLoad:
    """Everything one idle system node holds, by origin."""

    workloads: tuple[Workload, ...]
    """The vendored workloads with requests.json applied (what runs)."""
    manifests: Resources
    """The requests the vendored manifests declare (a container without requests counts 0, as the scheduler counts
    it)."""
    explicit: tuple[tuple[str, ExplicitRequest], ...]
    """(`<kustomization>/<Kind>/<name>/<container>`, its requests.json entry) for every patched container, once per
    replica."""
    daemonsets: Resources
    """GKE's per-node DaemonSets (capacity.DAEMONSET_CPU / DAEMONSET_MEMORY)."""
    cluster_pods: Resources
    """GKE's once-per-cluster kube-system pods (GKE_CLUSTER_PODS)."""
    patched: Resources = Resources()
    """The workloads' requests with requests.json applied."""

    @property
    def requests_json(self) -> Resources:
        """What requests.json adds to the manifests' own requests."""
        return Resources(self.patched.cpu - self.manifests.cpu, self.patched.memory - self.manifests.memory)

    @property
    def kube_system(self) -> Resources:
        return self.daemonsets + self.cluster_pods

    @property
    def total(self) -> Resources:
        return self.manifests + self.requests_json + self.kube_system


def system_load(
    workloads: Sequence[Workload] | None = None,
    cluster_pods: Sequence[KubeSystemPod] = GKE_CLUSTER_PODS,
    daemonsets: Resources | None = None,
    requests: Mapping[str, ExplicitRequest] | None = None,
    operator: str = DEFAULT_OPERATOR,
) -> SystemLoad:
    """The load of the idle system node: the vendored workloads with requests.json applied (both by default; with
    `workloads` given, `requests` defaults to none), and GKE's kube-system. By default the workloads are those
    `training_operator = operator` installs, after every container of every vendored folder (the other operator's
    too) was checked against requests.json; given `workloads` are taken as they are."""
    if workloads is None:
        every = vendored_workloads()
        requests = load_explicit_requests() if requests is None else requests
        patched_workloads(every, requests)  # raises for a container without requests in either operator's folders
        workloads = installed_workloads(every, operator)
        sources = {w.source for w in workloads}
        requests = {key: entry for key, entry in requests.items() if key.split("/", 1)[0] in sources}
    requests = {} if requests is None else requests
    patched = patched_workloads(workloads, requests)
    explicit = tuple(
        (container_key(w, c), requests[container_key(w, c)])
        for w in workloads
        for c in w.containers
        if container_key(w, c) in requests
        for _ in range(w.replicas)
    )
    return SystemLoad(
        workloads=tuple(patched),
        manifests=Resources.total(w.requests for w in workloads),
        explicit=explicit,
        daemonsets=daemonsets if daemonsets is not None else Resources(DAEMONSET_CPU, DAEMONSET_MEMORY),
        cluster_pods=Resources.total(p.requests for p in cluster_pods),
        patched=Resources.total(w.requests for w in patched),
    )


# Shared-core E2 types: GKE reserves 1060 millicores of their 2 vCPUs (https://cloud.google.com/kubernetes-engine/
# docs/concepts/plan-node-sizes, "CPU reservations"), so 940m are allocatable whatever the tiered formula says.
SHARED_CORE_ALLOCATABLE_CPU: dict[str, float] = {"e2-micro": 0.94, "e2-small": 0.94, "e2-medium": 0.94}


def node_allocatable(machine_type: str) -> Resources:
    """What Kubernetes may hand to pods on a GKE Standard node of `machine_type`."""
    machine = MACHINE_TYPES.get(machine_type)
    if machine is None:
        raise SizingError(
            f"machine type {machine_type!r} is not in microfed.training.capacity.MACHINE_TYPES: add its vCPUs and "
            "memory there (from Google's machine type tables)"
        )
    cpu, memory = gke_allocatable(machine)
    return Resources(SHARED_CORE_ALLOCATABLE_CPU.get(machine_type, cpu), memory)


@dataclass(frozen=True)
class Fit:
    machine_type: str
    on_demand_hour: float
    allocatable: Resources
    needed: Resources
    """The load with its headroom."""

    @property
    def fits(self) -> bool:
        # CPU compared in millicores to a thousandth of one, so float rounding cannot decide a tie.
        cpu_ok = round(self.needed.cpu * 1000, 3) <= round(self.allocatable.cpu * 1000, 3)
        return cpu_ok and self.needed.memory <= self.allocatable.memory

    @property
    def short_of(self) -> str:
        lacks = []
        if round(self.needed.cpu * 1000, 3) > round(self.allocatable.cpu * 1000, 3):
            lacks.append(f"CPU ({self.needed.cpu:.2f} > {self.allocatable.cpu:.2f} cores)")
        if self.needed.memory > self.allocatable.memory:
            lacks.append(f"memory ({self.needed.memory / MIB:.0f} > {self.allocatable.memory / MIB:.0f} MiB)")
        return ", ".join(lacks)


def fit(
    load: SystemLoad | Resources,
    machine_type: str,
    on_demand_hour: float = 0.0,
    cpu_headroom: float = CPU_HEADROOM,
    memory_headroom: float = MEMORY_HEADROOM,
) -> Fit:
    total = load.total if isinstance(load, SystemLoad) else load
    needed = Resources(total.cpu * (1 + cpu_headroom), int(total.memory * (1 + memory_headroom)))
    return Fit(machine_type, on_demand_hour, node_allocatable(machine_type), needed)


def _load_prices(path: Path = PRICES_FILE) -> dict[str, Any]:
    prices: dict[str, Any] = json.loads(path.read_text())
    return prices


def candidate_machine_types(prices: Mapping[str, Any] | None = None) -> list[tuple[str, float]]:
    """(machine type, on-demand $/hour) of prices.json's machines without GPUs, cheapest first. A priced type
    missing from MACHINE_TYPES raises: its size must be known to be compared."""
    prices = prices if prices is not None else _load_prices()
    out = []
    for name, entry in prices["machines"].items():
        if entry.get("includes_gpu"):
            continue
        if name not in MACHINE_TYPES:
            raise SizingError(f"prices.json prices {name} but microfed.training.capacity.MACHINE_TYPES lacks it")
        out.append((name, float(entry["on_demand"])))
    return sorted(out, key=lambda item: (item[1], item[0]))


def cheapest_fitting(load: SystemLoad | None = None, prices: Mapping[str, Any] | None = None) -> Fit:
    """The cheapest on-demand machine type of prices.json whose allocatable holds `load` with its headroom."""
    load = load if load is not None else system_load()
    for name, hourly in candidate_machine_types(prices):
        verdict = fit(load, name, hourly)
        if verdict.fits:
            return verdict
    raise SizingError(f"no machine type of prices.json holds {load.total} with its headroom")


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _lines(load: SystemLoad, prices: Mapping[str, Any]) -> Iterator[str]:
    yield (
        f"Vendored workloads of KFP and training_operator = {DEFAULT_OPERATOR} (requests per pod x replicas, "
        "requests.json applied):"
    )
    patched = {key for key, _ in load.explicit}
    for w in load.workloads:
        from_json = ", ".join(c.name for c in w.containers if container_key(w, c) in patched)
        suffix = f"   [requests.json: {from_json}]" if from_json else ""
        yield f"  {w.source}: {w.kind} {w.namespace}/{w.name} x{w.replicas}: {w.requests}{suffix}"
    yield f"  sum: {load.patched}, of which the manifests declare {load.manifests}"
    yield "Explicit requests infra/ sets on the containers that declare none (modules/microfed/requests.json):"
    for name, entry in load.explicit:
        yield f"  {name}: {entry.resources}"
    yield f"  adds: {load.requests_json}"
    yield f"GKE per-node DaemonSets (capacity.DAEMONSET_CPU/MEMORY): {load.daemonsets}; itemized:"
    for pod in GKE_DAEMONSETS:
        yield f"  {pod.name}: {pod.requests} [{pod.source or 'estimate'}]{' (estimate)' if pod.estimate else ''}"
    yield f"  itemized sum: {Resources.total(p.requests for p in GKE_DAEMONSETS)}"
    yield "GKE kube-system pods once per cluster:"
    for pod in GKE_CLUSTER_PODS:
        yield f"  {pod.name} x{pod.replicas}: {pod.requests} [{pod.source or 'estimate'}]" + (
            " (estimate)" if pod.estimate else ""
        )
    yield f"  sum: {load.cluster_pods}"
    yield f"Total: {load.total}; with {CPU_HEADROOM:.0%} CPU / {MEMORY_HEADROOM:.0%} memory headroom:"
    for name, hourly in candidate_machine_types(prices):
        verdict = fit(load, name, hourly)
        state = "fits" if verdict.fits else f"short of {verdict.short_of}"
        yield f"  {name:16s} ${hourly:.4f}/h  allocatable {verdict.allocatable}: {state}"
    yield f"Cheapest that fits: {cheapest_fitting(load, prices).machine_type}"


def render_text(load: SystemLoad | None = None, prices: Mapping[str, Any] | None = None) -> str:
    load = load if load is not None else system_load()
    prices = prices if prices is not None else _load_prices()
    return "\n".join(_lines(load, prices))


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    print(render_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
