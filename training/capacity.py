"""Checks made before a PyTorchJob is created: does the training pool have room for it, and how long may a
collective wait.

Pool capacity. The cluster autoscaler reports "max node group size reached" when a pending pod would need a node
beyond the pool's maximum. When the job as a whole needs more nodes than the pool may ever have, that verdict is
permanent: the replicas that do not fit stay Pending, and the ones that started wait at the rendezvous until the
job's deadline. `check_pool_capacity` computes the nodes a job needs before it is created and fails with the
Terraform variable to raise (infra/variables.tf) and by how much.

How many replicas fit a node: the scheduler places a pod where its requests fit the node's *allocatable*
resources minus what other pods on the node request. So per node we take the machine type's vCPUs and memory
(`MACHINE_TYPES`), subtract what GKE reserves for the kubelet, the OS and eviction (`gke_allocatable`, Google's
published formula) and what the system DaemonSets request (`DAEMONSET_CPU` ...), and divide by the replica's
requests; the scarcest of CPU, memory and GPUs decides. Replicas of one job are identical, so nodes needed =
ceil(replicas / replicas per node).

Every number is a little uncertain (the kernel keeps some memory before the kubelet sees it, DaemonSet requests
move between GKE versions), so the check errs on the side of letting a job through: it fails only when the job
cannot fit by the published figures. A machine type missing from `MACHINE_TYPES` (a user's tfvars may name any)
skips the check with a note rather than guess.

On a cluster infra/ created, the pools' machine types and node limits come from its ConfigMap (`pool_limits_of`,
training/cluster.py `ClusterInfo`), else from infra/'s defaults.

GKE Autopilot has no pools to fill: Autopilot creates a node for each pod that fits one of its compute classes, and
refuses a pod whose requests exceed the class's (or GPU type's) maximum. `check_autopilot_pod` compares a replica
with that maximum before the job exists; how many replicas may run at once is then a matter of the project's quota.

Collective timeout. gloo and nccl give up on a collective after the process group's timeout. The end-of-round
all-reduce is one: the rank with the smallest shard reaches it first and waits there for the rank with the
largest. `collective_timeout_minutes` derives the timeout from the plan's estimated seconds per epoch instead of
a fixed 30 minutes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .cluster import AutopilotPodLimit, ClusterInfo, autopilot_placement, pool_defaults
from .errors import MicrofedError
from .resources import ResourcePlan

__all__ = [
    "COLLECTIVE_TIMEOUT_MARGIN",
    "DAEMONSET_CPU",
    "DAEMONSET_MEMORY",
    "DEFAULT_COLLECTIVE_TIMEOUT_MINUTES",
    "EVICTION_THRESHOLD",
    "GPU_DAEMONSET_CPU",
    "GPU_DAEMONSET_MEMORY",
    "MACHINE_TYPES",
    "MachineType",
    "NodeRoom",
    "PoolLimits",
    "autopilot_requests",
    "check_autopilot_pod",
    "check_pool_capacity",
    "collective_timeout_minutes",
    "gke_allocatable",
    "node_room",
    "pool_limits",
    "pool_limits_of",
    "replicas_per_node",
]

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True)
class MachineType:
    """A Compute Engine machine type's size, as Google lists it."""

    name: str
    vcpus: int
    memory_bytes: int
    """Compute Engine's "GB" here are GiB: the API's `memoryMb` of e2-standard-8 is 32768."""


def _machine(name: str, vcpus: int, memory_gib: float) -> MachineType:
    return MachineType(name, vcpus, int(memory_gib * GIB))


# The machine types infra/ defaults to or names as alternatives (infra/modules/microfed/: variables.tf, main.tf's
# default_gpu_machine_types).
# Sizes from Google's machine type pages (https://cloud.google.com/compute/docs/general-purpose-machines: E2
# standard and N1 standard tables; https://cloud.google.com/compute/docs/accelerator-optimized-machines: G2 and A2
# tables). The GPUs of a node come from the pool (`PoolLimits.gpus_per_node`), not from this table.
MACHINE_TYPES: dict[str, MachineType] = {
    m.name: m
    for m in (
        _machine("e2-standard-4", 4, 16),  # the system pool (system_machine_type)
        _machine("e2-standard-8", 8, 32),  # the CPU training pool (cpu_machine_type)
        _machine("n1-standard-8", 8, 30),  # nvidia-tesla-t4 (a T4 is attached to an N1 machine)
        _machine("g2-standard-8", 8, 32),  # nvidia-l4 (1 L4 built in)
        _machine("a2-highgpu-1g", 12, 85),  # nvidia-tesla-a100 (1 A100 40 GB built in)
        # The other general-purpose types infra/cost/prices.json prices: the candidates infra/cost/sizing.py sizes
        # the system pool against (same tables). e2-medium is shared-core: 2 vCPUs that sustain 1 between them.
        _machine("e2-medium", 2, 4),
        _machine("e2-standard-2", 2, 8),
        _machine("e2-standard-16", 16, 64),
        _machine("e2-highmem-2", 2, 16),
        _machine("e2-highmem-4", 4, 32),
        _machine("e2-highcpu-4", 4, 4),
        _machine("e2-highcpu-8", 8, 8),
        _machine("n2-standard-2", 2, 8),
        _machine("n2-standard-4", 4, 16),
        _machine("n2-standard-8", 8, 32),
        _machine("n2d-standard-2", 2, 8),
        _machine("n2d-standard-4", 4, 16),
        _machine("n2d-standard-8", 8, 32),
        _machine("n1-standard-4", 4, 15),
        _machine("n1-standard-16", 16, 60),
    )
}

# What GKE keeps from every node of a Standard cluster, from "Memory and CPU reservations" in
# https://cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes ("Node allocatable resources"):
# memory: 255 MiB on machines under 1 GiB; else 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8,
# 6% of the next 112 and 2% above 128 GiB; plus an eviction threshold of 100 MiB.
# CPU: 6% of the first core, 1% of the next, 0.5% of the next 2 and 0.25% of every core above 4.
_MEMORY_TIERS = ((4 * GIB, 0.25), (4 * GIB, 0.20), (8 * GIB, 0.10), (112 * GIB, 0.06), (math.inf, 0.02))
_CPU_TIERS = ((1, 0.06), (1, 0.01), (2, 0.005), (math.inf, 0.0025))
_SMALL_MACHINE_MEMORY_RESERVE = 255 * MIB
EVICTION_THRESHOLD = 100 * MIB

# Requests of the DaemonSets GKE runs on every node of this cluster's configuration (infra/modules/: logging of
# system components and workloads, system monitoring, Workload Identity, Calico network policy, the PD CSI
# driver), as `kubectl describe node` lists them in kube-system: fluentbit-gke 105m / 230 MiB,
# gke-metadata-server 100m / 100 MiB, ip-masq-agent 10m / 16 MiB (a GKE 1.29 node in cryptnono/cryptnono#34),
# kube-proxy 100m, calico-node about 100m, gke-metrics-agent, pdcsi-node and netd about 30m and 200 MiB together.
# Not a figure Google publishes and it moves by tens of millicores and MiB between GKE versions: rounded up.
DAEMONSET_CPU = 0.5
DAEMONSET_MEMORY = 640 * MIB
# GPU nodes add the NVIDIA device plugin and the driver installer (whose init container's request counts for as
# long as the pod exists), about 200m and 128 MiB.
GPU_DAEMONSET_CPU = 0.2
GPU_DAEMONSET_MEMORY = 128 * MIB


def _tiered(amount: float, tiers: tuple[tuple[float, float], ...]) -> float:
    """Sum of rate x slice over consecutive slices of `amount` (a progressive scale, like a tax table)."""
    total, rest = 0.0, amount
    for size, rate in tiers:
        part = min(rest, size)
        total += part * rate
        rest -= part
        if rest <= 0:
            break
    return total


def gke_allocatable(machine: MachineType) -> tuple[float, int]:
    """(CPU cores, memory bytes) Kubernetes may hand to pods on a GKE Standard node of `machine`."""
    if machine.memory_bytes < GIB:
        memory_reserved = float(_SMALL_MACHINE_MEMORY_RESERVE)
    else:
        memory_reserved = _tiered(machine.memory_bytes, _MEMORY_TIERS)
    cpu = machine.vcpus - _tiered(machine.vcpus, _CPU_TIERS)
    return cpu, int(machine.memory_bytes - memory_reserved - EVICTION_THRESHOLD)


@dataclass(frozen=True)
class NodeRoom:
    """What one node of a training pool offers to our replicas: allocatable minus the system DaemonSets."""

    cpu: float
    """CPU cores."""
    memory_bytes: int
    gpus: int


def node_room(machine: MachineType, *, gpus: int = 0) -> NodeRoom:
    """Room for replicas on a node of `machine` with `gpus` GPUs attached."""
    cpu, memory = gke_allocatable(machine)
    cpu -= DAEMONSET_CPU + (GPU_DAEMONSET_CPU if gpus else 0.0)
    memory -= DAEMONSET_MEMORY + (GPU_DAEMONSET_MEMORY if gpus else 0)
    return NodeRoom(cpu=max(0.0, cpu), memory_bytes=max(0, memory), gpus=gpus)


def replicas_per_node(plan: ResourcePlan, room: NodeRoom) -> tuple[int, str]:
    """How many replicas of `plan` fit `room`, and the resource that limits it (`cpu`, `memory` or `gpu`)."""
    # Millicores, as the PyTorchJob builder writes the request: no float rounding at the boundary.
    fits = {
        "cpu": round(room.cpu * 1000) // max(1, round(plan.cpu_request * 1000)),
        "memory": room.memory_bytes // max(1, plan.memory_request),
    }
    if plan.gpus:
        fits["gpu"] = room.gpus // plan.gpus
    binding = min(fits, key=lambda k: fits[k])
    return fits[binding], binding


@dataclass(frozen=True, kw_only=True)
class PoolLimits:
    """The training pool a plan lands on, as the cluster was created (infra/ defaults unless overridden)."""

    accelerator: str
    """`none` for the CPU pool, else the GPU type whose pool it is."""
    machine_type: str
    max_nodes: int
    """The pool's `total_max_node_count`: nodes summed over its zones."""
    gpus_per_node: int

    @property
    def pool(self) -> str:
        return "CPU pool" if self.accelerator == "none" else f"{self.accelerator} pool"

    @property
    def max_nodes_variable(self) -> str:
        """The infra/variables.tf variable that sets `max_nodes` (gpu_max_nodes applies to every GPU pool)."""
        return "cpu_max_nodes" if self.accelerator == "none" else "gpu_max_nodes"

    @property
    def machine_type_variable(self) -> str:
        """The infra/variables.tf setting that sets `machine_type`, as a tfvars line would name it."""
        return "cpu_machine_type" if self.accelerator == "none" else f'gpu_machine_types["{self.accelerator}"]'


def pool_limits(accelerator: str, *, machine_type: str | None = None, max_nodes: int | None = None) -> PoolLimits:
    """The limits of `accelerator`'s training pool: infra/'s defaults (training/cluster.json), with the caller's
    `machine_type` / `max_nodes` in their place where given (a cluster whose terraform.tfvars changed them)."""
    defaults = pool_defaults()
    if accelerator == "none":
        default_type, default_max, gpus = defaults.cpu_machine_type, defaults.cpu_max_nodes, 0
    elif accelerator in defaults.gpu_machine_types:
        default_type = defaults.gpu_machine_types[accelerator]
        default_max, gpus = defaults.gpu_max_nodes, defaults.gpus_per_node
    else:
        known = ", ".join(["none", *defaults.gpu_machine_types])
        raise MicrofedError(f"no training pool for accelerator {accelerator!r}", hint=f"use one of {known}")
    if max_nodes is not None and (isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1):
        raise MicrofedError(
            f"the pool's maximum node count must be an integer >= 1, got {max_nodes!r}",
            hint="pass the cluster's cpu_max_nodes / gpu_max_nodes from infra/terraform.tfvars",
        )
    return PoolLimits(
        accelerator=accelerator,
        machine_type=machine_type or default_type,
        max_nodes=default_max if max_nodes is None else max_nodes,
        gpus_per_node=gpus,
    )


def check_gpu_type(info: ClusterInfo, accelerator: str) -> None:
    """Refuse an accelerator outside the cluster's gpu_types: on Standard it has no pool (the replicas would stay
    Pending for ever); on Autopilot gpu_types is the set of GPU types the cluster's owner allows the train step."""
    if accelerator == "none" or accelerator in info.gpu_types:
        return
    offered = ", ".join(["none", *info.gpu_types])
    what = "the cluster has no training pool for it" if info.mode == "standard" else "the cluster does not allow it"
    raise MicrofedError(
        f"{accelerator}: {what} (gpu_types: {', '.join(info.gpu_types)}; from {info.source})",
        hint=f"allow only {offered} in the `accelerators` parameter, or add {accelerator} to gpu_types in "
        "infra/terraform.tfvars and run terraform apply",
    )


def pool_limits_of(info: ClusterInfo, accelerator: str, *, max_nodes: int | None = None) -> PoolLimits:
    """The limits of `accelerator`'s training pool on the Standard cluster `info` describes (its ConfigMap, or
    infra/'s defaults); `max_nodes` in place of the cluster's where given (the train step's pool_max_nodes).

    Raises MicrofedError when the cluster has no pool for `accelerator` (not in its gpu_types): the replicas
    would stay Pending for ever."""
    check_gpu_type(info, accelerator)
    if accelerator == "none":
        machine_type, cluster_max = info.cpu_machine_type, info.cpu_max_nodes
    else:
        machine_type = info.gpu_machine_types.get(accelerator) or pool_defaults().gpu_machine_types[accelerator]
        cluster_max = info.gpu_max_nodes
    return pool_limits(accelerator, machine_type=machine_type, max_nodes=max_nodes or cluster_max)


def _print(message: str) -> None:
    print(f"[microfed] {message}", flush=True)


def check_pool_capacity(
    plan: ResourcePlan, replicas: int, limits: PoolLimits | None = None, *, log: Callable[[str], None] = _print
) -> int | None:
    """Nodes of the plan's pool that `replicas` replicas of `plan` need; None when the pool's machine type is not
    in `MACHINE_TYPES` (the check is skipped, with a note through `log`).

    Raises MicrofedError, before any job exists, when one replica does not fit a node of the pool (raise the
    machine type) or the replicas need more nodes than the pool's maximum (raise the maximum by the difference).
    `limits` defaults to `pool_limits(plan.accelerator)`, infra/'s defaults.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise MicrofedError(f"replicas must be an integer >= 1, got {replicas!r}")
    limits = limits or pool_limits(plan.accelerator)
    machine = MACHINE_TYPES.get(limits.machine_type)
    if machine is None:
        log(
            f"capacity check skipped: machine type {limits.machine_type!r} of the {limits.pool} is not in "
            f"microfed.training.capacity.MACHINE_TYPES ({', '.join(MACHINE_TYPES)})"
        )
        return None
    room = node_room(machine, gpus=limits.gpus_per_node)
    per_node, binding = replicas_per_node(plan, room)
    if per_node == 0:
        raise _does_not_fit(plan, limits, room, binding)
    nodes = math.ceil(replicas / per_node)
    if nodes > limits.max_nodes:
        raise _too_many_nodes(limits, replicas, per_node, binding, nodes)
    return nodes


def _need(plan: ResourcePlan) -> str:
    gpus = f", {plan.gpus} GPU" if plan.gpus else ""
    cores = "1 CPU core" if plan.cpu_request == 1 else f"{plan.cpu_request:g} CPU cores"
    return f"{cores} and {plan.memory_request / GIB:.1f} GiB memory{gpus}"


def _does_not_fit(plan: ResourcePlan, limits: PoolLimits, room: NodeRoom, binding: str) -> MicrofedError:
    have = f"{room.cpu:.2f} cores and {room.memory_bytes / GIB:.1f} GiB"
    if plan.gpus:
        have += f" and {room.gpus} GPU"
    return MicrofedError(
        f"one replica requests {_need(plan)}, but each {limits.machine_type} node of the {limits.pool} has only "
        f"{have} for pods after GKE's reservations and the system DaemonSets (short of {binding}): "
        "the autoscaler can never place it",
        hint=(
            f"set {limits.machine_type_variable} in infra/terraform.tfvars to a larger machine type and run "
            "terraform apply (then pass it to the train step), or make the replica smaller: a smaller "
            "--batch-size, more shards"
        ),
    )


def _too_many_nodes(limits: PoolLimits, replicas: int, per_node: int, binding: str, nodes: int) -> MicrofedError:
    if limits.gpus_per_node:  # one GPU per node: a larger machine holds no more GPU replicas
        larger = f"; the project needs GPU quota for {nodes * limits.gpus_per_node} {limits.accelerator}"
    else:
        larger = f", or choose a larger {limits.machine_type_variable} (more replicas per node)"
    return MicrofedError(
        f"{replicas} replicas need {nodes} nodes of the {limits.pool} ({per_node} per {limits.machine_type} node, "
        f"limited by {binding}), but it may grow to {limits.max_nodes}: the autoscaler would stop at "
        "'max node group size reached' and the job would never start",
        hint=(
            f"raise {limits.max_nodes_variable} by {nodes - limits.max_nodes} to {nodes} in infra/terraform.tfvars "
            "and run terraform apply (then pass the new maximum to the train step), or train with at most "
            f"{limits.max_nodes * per_node} shards{larger}"
        ),
    )


# ---------------------------------------------------------------------------------------------------------------
# GKE Autopilot (figures and sources: training/cluster.json, key `autopilot`)
# ---------------------------------------------------------------------------------------------------------------


def autopilot_requests(plan: ResourcePlan, limit: AutopilotPodLimit) -> tuple[float, int]:
    """(cores, memory bytes) Autopilot bills and checks for one replica of `plan`: its requests, with the smaller
    of the two raised into the class's CPU:memory range where the class has one (General-purpose: 1 to 6.5 GiB
    per core; "Resource requests in Autopilot" says Autopilot raises the smaller resource rather than refusing)."""
    cpu, memory = float(plan.cpu_request), int(plan.memory_request)
    if limit.cpu_memory_ratio is not None:
        low, high = limit.cpu_memory_ratio
        memory = max(memory, math.ceil(cpu * low * GIB))
        cpu = max(cpu, memory / GIB / high)
    return cpu, memory


def check_autopilot_pod(
    plan: ResourcePlan, *, limit: AutopilotPodLimit | None = None, log: Callable[[str], None] = _print
) -> AutopilotPodLimit:
    """The Autopilot pod limit a replica of `plan` falls under (training/cluster.json, autopilot.pod_limits).

    Raises MicrofedError, before any job exists, when the replica's requests exceed it: Autopilot refuses such a
    pod outright, so no replica of the job would ever be created. Notes through `log` when Autopilot will raise a
    request to reach the class's CPU:memory range (the raised request is what it bills)."""
    limits = autopilot_placement().pod_limits
    if limit is None:
        if plan.accelerator not in limits:
            raise MicrofedError(
                f"no Autopilot pod limit for accelerator {plan.accelerator!r}",
                hint=f"use one of {', '.join(limits)} (training/cluster.json, autopilot.pod_limits)",
            )
        limit = limits[plan.accelerator]
    cpu, memory = autopilot_requests(plan, limit)
    raised = (cpu, memory) != (plan.cpu_request, plan.memory_request)
    pod = "pod" if plan.accelerator == "none" else f"pod with one {plan.accelerator}"
    if cpu > limit.max_cpu or memory > limit.max_memory_bytes:
        adjusted = f" ({cpu:.2f} cores and {memory / GIB:.1f} GiB after Autopilot's CPU:memory rule)" if raised else ""
        hint = "make the replica smaller: a smaller --batch-size, more shards"
        larger = _larger(limits, limit) if plan.gpus else ""
        if larger:
            hint += f", or allow a GPU type with larger Autopilot pods in `accelerators` ({larger})"
        raise MicrofedError(
            f"one replica requests {_need(plan)}{adjusted}, but GKE Autopilot accepts at most "
            f"{limit.max_cpu:g} CPU cores and {limit.max_memory_bytes / GIB:g} GiB memory for a {pod} "
            f"({limit.compute_class} class; training/cluster.json, autopilot.pod_limits): it would refuse every "
            "replica of the job",
            hint=hint,
        )
    if raised and limit.cpu_memory_ratio is not None:
        low, high = limit.cpu_memory_ratio
        log(
            f"Autopilot: one replica requests {_need(plan)}; its {limit.compute_class} class keeps {low:g} to "
            f"{high:g} GiB of memory per core, so the pod runs, and is billed, at {cpu:.2f} cores and "
            f"{memory / GIB:.1f} GiB"
        )
    return limit


def _larger(limits: dict[str, AutopilotPodLimit], than: AutopilotPodLimit) -> str:
    bigger = [
        f"{accelerator}: {lim.max_cpu:g} cores, {lim.max_memory_bytes / GIB:g} GiB"
        for accelerator, lim in limits.items()
        if accelerator != "none" and (lim.max_cpu > than.max_cpu or lim.max_memory_bytes > than.max_memory_bytes)
    ]
    return "; ".join(bigger)


# ---------------------------------------------------------------------------------------------------------------
# Collective timeout
# ---------------------------------------------------------------------------------------------------------------

# The timeout gloo / nccl had before it was derived (training/worker_config.py): also the floor. It covers the
# rendezvous as well, where one replica may wait for another's node to be created (minutes on a GPU pool).
DEFAULT_COLLECTIVE_TIMEOUT_MINUTES = 30
# How far the plan's seconds per epoch can be off, from training/resources_estimate.py's own comments: CPU throughput is
# taken as 20 GFLOP/s per core where the trained models measured 11.5 (efficientnet_v2_s) to 29 (cnn-fmnist),
# so up to 1.7x slow; reading through a DataLoader instead of preloaded tensors is 1.5x slower again (~2.6x);
# the GPU figure assumes 30% of fp32 peak ("only for the logged epoch-time guess"). Rank 0 also evaluates and
# writes checkpoints between rounds while the others wait. A factor 4 covers the known CPU error with room;
# where a small GPU job's estimate is off by more, its absolute time is small and the floor holds.
COLLECTIVE_TIMEOUT_MARGIN = 4.0


def collective_timeout_minutes(
    plan: ResourcePlan | None,
    *,
    local_epochs: int,
    largest_shard: int,
    margin: float = COLLECTIVE_TIMEOUT_MARGIN,
) -> int:
    """Minutes the workers' process group may wait in one collective (`init_process_group(timeout=...)`).

    A fast rank waits at the end-of-round all-reduce for at most one round of the slowest rank: `local_epochs`
    epochs over the largest shard. That time, from the plan's `seconds_per_epoch` (rescaled from the shard the
    plan was made for to `largest_shard`), times `margin`, rounded up to whole minutes, and never under
    `DEFAULT_COLLECTIVE_TIMEOUT_MINUTES`, which is also the answer when the plan carries no estimate.
    """
    if local_epochs < 1 or largest_shard < 1:
        raise MicrofedError(f"local_epochs and largest_shard must be >= 1, got {local_epochs}, {largest_shard}")
    if not (math.isfinite(margin) and margin >= 1.0):
        raise MicrofedError(f"margin must be a finite factor >= 1, got {margin}")
    epoch = _seconds_per_epoch(plan, largest_shard)
    if epoch is None:
        return DEFAULT_COLLECTIVE_TIMEOUT_MINUTES
    minutes = math.ceil(epoch * local_epochs * margin / 60)
    return max(DEFAULT_COLLECTIVE_TIMEOUT_MINUTES, minutes)


def _seconds_per_epoch(plan: ResourcePlan | None, shard_examples: int) -> float | None:
    """The plan's estimated seconds per epoch over `shard_examples` examples, or None without an estimate."""
    e = plan.estimate if plan is not None else {}
    seconds = e.get("seconds_per_epoch")
    if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        return None
    planned = e.get("shard_examples") or shard_examples  # the estimate is linear in the examples of an epoch
    seconds *= shard_examples / planned
    # The estimate assumes the cores the estimate asked for; a plan whose requests come from a measurement asks
    # for what an earlier run used, and the epoch runs on that many.
    estimated = e.get("estimated_requests", {}).get("cpu_request")
    if plan is not None and not plan.gpus and estimated and plan.cpu_request:
        seconds *= max(1.0, estimated / plan.cpu_request)
    return float(seconds)
