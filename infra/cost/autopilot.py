"""What GKE Autopilot bills a pod for: its requests after Autopilot's rules, as pure functions.

Autopilot bills the CPU, memory and ephemeral storage a running pod requests, not nodes; before it does, it changes
the requests (https://cloud.google.com/kubernetes-engine/docs/concepts/autopilot-resource-requests):

1. Defaults, per container (general-purpose compute class): a container that requests neither CPU nor memory gets
   0.5 vCPU and 2 GiB; one that requests only one of them gets the other from the CPU:memory ratio of rule 3 (the
   docs say "a value that fits the ratio", not which: the smallest fitting value is assumed, see `billed_requests`);
   every container that requests no ephemeral storage gets 1 GiB.
2. Minimums, per pod: on clusters that support bursting (created on GKE 1.26 or later and running 1.30.2-gke.1394000
   or later) 50m CPU and 52 MiB; on older ones 250m and 512 MiB, with CPU in steps of 250m.
3. The pod's memory must be between 1 and 6.5 GiB per vCPU; outside that range Autopilot raises the smaller of the
   two, never lowers the larger.

System pods (kube-system, GKE's own DaemonSets) are not billed. The figures, with their sources, are in
infra/cost/prices.json (`autopilot.rules`); `AutopilotRules.from_prices` reads them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["AutopilotRules", "ContainerRequests", "PodRequests", "billed_requests"]


@dataclass(frozen=True)
class PodRequests:
    """A pod's requests: vCPU, GiB of memory, GiB of ephemeral storage."""

    vcpu: float
    memory_gib: float
    ephemeral_gib: float = 0.0

    def times(self, n: int) -> PodRequests:
        return PodRequests(self.vcpu * n, self.memory_gib * n, self.ephemeral_gib * n)

    def __add__(self, other: PodRequests) -> PodRequests:
        return PodRequests(
            self.vcpu + other.vcpu, self.memory_gib + other.memory_gib, self.ephemeral_gib + other.ephemeral_gib
        )


@dataclass(frozen=True)
class ContainerRequests:
    """One container's requests as its manifest (with requests.json applied) states them; None where unset."""

    vcpu: float | None
    memory_gib: float | None
    ephemeral_gib: float | None = None


@dataclass(frozen=True, kw_only=True)
class AutopilotRules:
    """Autopilot's request rules for general-purpose pods (see the module docstring)."""

    default_vcpu: float
    """A container that requests neither CPU nor memory gets this much CPU ..."""
    default_memory_gib: float
    """... and this much memory."""
    default_ephemeral_gib: float
    """A container that requests no ephemeral storage gets this much."""
    min_vcpu: float
    """The least CPU a pod is billed for."""
    min_memory_gib: float
    """The least memory a pod is billed for."""
    min_gib_per_vcpu: float
    """The CPU:memory range: memory below `min_gib_per_vcpu` x CPU is raised to it ..."""
    max_gib_per_vcpu: float
    """... and CPU below memory / `max_gib_per_vcpu` is raised to that."""
    vcpu_step: float = 0.0
    """CPU is rounded up to a multiple of this (0: not rounded, as on clusters that support bursting)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_gib_per_vcpu <= self.max_gib_per_vcpu:
            raise ValueError(
                f"the CPU:memory range must satisfy 0 < min_gib_per_vcpu <= max_gib_per_vcpu, got "
                f"{self.min_gib_per_vcpu} and {self.max_gib_per_vcpu}"
            )
        if min(self.default_vcpu, self.default_memory_gib, self.min_vcpu, self.min_memory_gib) <= 0:
            raise ValueError("Autopilot's defaults and minimums must be positive")
        if self.default_ephemeral_gib < 0 or self.vcpu_step < 0:
            raise ValueError("default_ephemeral_gib and vcpu_step must not be negative")

    @classmethod
    def from_prices(cls, prices: Mapping[str, Any]) -> AutopilotRules:
        """The rules recorded in prices.json under `autopilot.rules` (each a {value, source} entry)."""
        try:
            rules = prices["autopilot"]["rules"]
        except KeyError as e:
            raise KeyError(
                "prices.json has no autopilot.rules: add Autopilot's request rules with their sources"
            ) from e
        names = [name for name in cls.__dataclass_fields__ if name != "vcpu_step"]
        missing = [name for name in names if name not in rules]
        if missing:
            raise KeyError(f"prices.json autopilot.rules lacks {', '.join(missing)}")

        def value(name: str) -> float:
            entry = rules[name]
            return float(entry["value"] if isinstance(entry, Mapping) else entry)

        step = value("vcpu_step") if "vcpu_step" in rules else 0.0
        return cls(**{name: value(name) for name in names}, vcpu_step=step)


def _container(c: ContainerRequests, rules: AutopilotRules) -> PodRequests:
    """Rule 1: a container's requests with Autopilot's defaults filled in."""
    if c.vcpu is None and c.memory_gib is None:
        vcpu, memory = rules.default_vcpu, rules.default_memory_gib
    elif c.vcpu is not None and c.memory_gib is None:
        vcpu, memory = c.vcpu, c.vcpu * rules.min_gib_per_vcpu  # assumed: the smallest memory the ratio allows
    elif c.vcpu is None and c.memory_gib is not None:
        vcpu, memory = c.memory_gib / rules.max_gib_per_vcpu, c.memory_gib  # assumed: the smallest CPU it allows
    else:
        vcpu, memory = float(c.vcpu or 0.0), float(c.memory_gib or 0.0)
    ephemeral = rules.default_ephemeral_gib if c.ephemeral_gib is None else c.ephemeral_gib
    return PodRequests(vcpu, memory, ephemeral)


def _step_up(value: float, step: float) -> float:
    # Rounded to a millionth first, so 0.75 / 0.25 computed as 3.0000000001 does not become 4 steps.
    return math.ceil(round(value / step, 6)) * step if step else value


def billed_requests(containers: Sequence[ContainerRequests], rules: AutopilotRules) -> PodRequests:
    """What Autopilot bills a pod for, from its app containers' requests: defaults per container (rule 1), summed;
    the pod's minimums (rule 2), CPU rounded up to the rules' step; then the CPU:memory range (rule 3), raising the
    smaller resource. Init containers are not taken: the pods priced here have none, and sizing.py checks that."""
    if not containers:
        raise ValueError("a pod has at least one container")
    total = PodRequests(0.0, 0.0, 0.0)
    for c in containers:
        total = total + _container(c, rules)
    vcpu = _step_up(max(total.vcpu, rules.min_vcpu), rules.vcpu_step)
    memory = max(total.memory_gib, rules.min_memory_gib)
    if memory > vcpu * rules.max_gib_per_vcpu:
        vcpu = _step_up(memory / rules.max_gib_per_vcpu, rules.vcpu_step)
    memory = max(memory, vcpu * rules.min_gib_per_vcpu)
    return PodRequests(vcpu, memory, total.ephemeral_gib)
