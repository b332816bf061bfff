"""Resource plan for one worker replica: which accelerator, how much CPU and memory to request.

The reference platform's failure was requesting far more than it used (62% of CPU and 34% of memory idle), and
handing A100s to models a T4 holds. So every number here derives from an estimate of what one replica uses
(`microfed.training.resources_estimate`: parameters, gradients and optimizer state, the activations of one
training batch, the preloaded shard and the runtime; its names are re-exported here).

Compute decides CPU against GPU: the dry run also counts FLOPs, and a shard whose epoch would take a CPU
replica longer than a budget goes to a GPU when one is allowed. The smallest allowed GPU that holds the
estimate times a headroom factor wins, so a model that needs a T4 never gets an A100.

Measured right-sizing. An estimate needs a wide headroom because it can be wrong; a measurement of the same
work needs little. When an earlier run of the same model, input shape, batch size, precision and optimizer
recorded what its replicas used (`microfed.training.usage`, `MeasuredUsage` here), `plan_resources(...,
measured=...)` keeps the accelerator choice above but takes the CPU and memory requests from the measurement:

- memory request = measured peak, rescaled to this shard (the host memory a replica does not spend on its
  shard, plus this shard's bytes), x `MEASURED_MEMORY_HEADROOM` (1.15), rounded up to 64 MiB;
- CPU request = the measured mean cores (process CPU time, plus the time runnable threads waited for a core,
  over wall time) rounded up to 0.1 core, at most `MAX_CPU_CORES`: CPU is compressible (an under-request is
  throttled at the limit, never killed), so no headroom on the request;
- limits: the same factors over the requests as for estimated plans (memory x1.5, CPU x2).

Measured peak / request is then 1/1.15 = 0.87 minus rounding for memory, and close to 1 for CPU: above the 75%
request utilisation the issue sets (the reference platform's 62% CPU / 34% memory).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import MicrofedError
from .models import ModelConfig
from .resources_estimate import (
    ACCELERATORS,
    CPU_GFLOPS_PER_CORE,
    CUDA_CONTEXT_RESERVE,
    CUDA_HOST_BYTES,
    GIB,
    GPU_EFFICIENCY,
    GPUS,
    MIB,
    OPTIMIZER_STATE_COPIES,
    GpuSpec,
    MemoryEstimate,
    estimate_memory,
    shard_bytes_per_example,
)

__all__ = [
    "ACCELERATORS",
    "CPU_EPOCH_BUDGET_SECONDS",
    "CUDA_CONTEXT_RESERVE",
    "CPU_GFLOPS_PER_CORE",
    "DEFAULT_CPU_THRESHOLD_GFLOP",
    "GPUS",
    "GpuSpec",
    "MAX_CPU_CORES",
    "MAX_REPLICA_MEMORY",
    "MEASURED_CPU_STEP",
    "MEASURED_MEMORY_HEADROOM",
    "MeasuredUsage",
    "MemoryEstimate",
    "OPTIMIZER_STATE_COPIES",
    "ResourcePlan",
    "estimate_memory",
    "format_plan",
    "plan_resources",
    "shard_bytes_per_example",
]

# Beyond ~4 intra-op threads small convnets scale poorly, and a 4-core request fits the common 4-8 vCPU
# node types of a CPU pool with room for system pods.
MAX_CPU_CORES = 4.0
MIN_CPU_CORES = 1.0
CPU_STEP = 0.25  # Requests are rounded up to 250 millicores.
# An epoch a CPU replica cannot finish within this budget is GPU work: longer epochs make a federated round
# (E epochs on every shard) take hours, and a T4 is cheaper than the hours it saves.
CPU_EPOCH_BUDGET_SECONDS = 600.0
# The same budget in FLOPs for a replica at the core cap: 20 GFLOP/s x 4 cores x 600 s = 48,000 GFLOP/epoch.
DEFAULT_CPU_THRESHOLD_GFLOP = CPU_GFLOPS_PER_CORE * MAX_CPU_CORES * CPU_EPOCH_BUDGET_SECONDS

# Limits above requests: room for the test set in rounds that evaluate, state_dict copies when saving, and
# allocator fragmentation, without making the scheduler reserve them. Hitting a memory limit kills the pod,
# hence the wider margin than the CPU's, which only throttles.
MEMORY_LIMIT_FACTOR = 1.5
CPU_LIMIT_FACTOR = 2.0
MEMORY_GRANULE = 64 * MIB  # Requests are rounded up to 64 MiB.
# Largest memory request planned for one replica: a 64 GB node's allocatable memory after GKE's reservations
# and system pods is about 57 GB. Bigger replicas mean the shard should be split further.
MAX_REPLICA_MEMORY = 48 * GIB

# Plans from a measurement (see the module docstring): a small memory margin over the measured peak for run-to-run
# variation (allocator state, a different shard order), and CPU requests in 100 millicore steps.
MEASURED_MEMORY_HEADROOM = 1.15
MEASURED_CPU_STEP = 0.1
# Device kinds of measurements: the host memory of a GPU replica (CUDA libraries) differs from a CPU one's.
MEASURED_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class ResourcePlan:
    """Per-replica requests and limits, and the estimate they derive from."""

    accelerator: str = "none"
    """One of ACCELERATORS; `none` trains on CPU (gloo), anything else on one GPU (nccl)."""
    gpus: int = 0
    """GPUs per replica (0 or 1)."""
    cpu_request: float = 1.0
    """CPU cores requested per replica."""
    cpu_limit: float = 2.0
    """CPU cores limit per replica."""
    memory_request: int = 2 * 1024**3
    """Memory request per replica, bytes."""
    memory_limit: int = 4 * 1024**3
    """Memory limit per replica, bytes."""
    gpu_memory: int = 0
    """Estimated GPU memory per replica, bytes (0 on CPU)."""
    estimate: dict[str, Any] = field(default_factory=dict)
    """How the numbers were reached: parameter, optimizer, activation and shard bytes, headroom."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class MeasuredUsage:
    """What replicas of an earlier run of the same work used on one device kind, in a form that rescales to a
    shard of another size (the worker keeps its whole shard in memory, so memory grows with it)."""

    device: str
    """`cpu` or `cuda`: the kind of replica that was measured."""
    memory_fixed_bytes: int
    """Peak host memory of the largest replica minus the bytes of the shard it held."""
    bytes_per_example: int
    """Host bytes one example of the shard takes (uint8 image + int64 label)."""
    cpu_cores: float
    """Mean CPU cores the busiest replica used over its life, or would have used uncontended (its CPU time
    plus the time its threads waited for a core, over wall time)."""
    gpu_memory_fixed_bytes: int = 0
    """Peak GPU memory PyTorch reserved minus the shard's copy on the GPU (0 on CPU)."""
    source: str = ""
    """Where the numbers come from (cache entry, memory source), for the plan's log line."""

    def __post_init__(self) -> None:
        if self.device not in MEASURED_DEVICES:
            raise MicrofedError(f"measured device must be one of {MEASURED_DEVICES}, got {self.device!r}")
        numbers = (self.memory_fixed_bytes, self.bytes_per_example, self.cpu_cores, self.gpu_memory_fixed_bytes)
        if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in numbers):
            raise MicrofedError(f"measured usage must be finite and non-negative numbers, got {self}")

    def memory_bytes(self, shard_examples: int) -> int:
        """Peak host memory of a replica holding `shard_examples` examples."""
        return self.memory_fixed_bytes + shard_examples * self.bytes_per_example

    def gpu_memory_bytes(self, shard_examples: int) -> int:
        """Peak GPU memory of a replica holding `shard_examples` examples (0 when none was measured)."""
        if not self.gpu_memory_fixed_bytes:
            return 0
        return self.gpu_memory_fixed_bytes + shard_examples * self.bytes_per_example

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_resources(
    arch: ModelConfig,
    *,
    batch_size: int,
    optimizer: str,
    shard_examples: int,
    precision: str = "fp32",
    accelerators: Sequence[str] = ("none",),
    headroom: float = 1.25,
    cpu_threshold_gflop: float = DEFAULT_CPU_THRESHOLD_GFLOP,
    max_memory: int = MAX_REPLICA_MEMORY,
    measured: Mapping[str, MeasuredUsage] | None = None,
    measured_headroom: float = MEASURED_MEMORY_HEADROOM,
) -> ResourcePlan:
    """Plan one replica: the smallest allowed accelerator that fits the estimate x `headroom`.

    A replica whose epoch costs more than `cpu_threshold_gflop` (training GFLOP over the shard) goes to a GPU
    when one is allowed and fits, else to CPU; cheaper work goes to CPU when `none` is allowed. Requests and
    limits derive from the estimate, or, where `measured` holds a measurement for the chosen device kind
    (`cpu` for `none`, `cuda` for a GPU) of an earlier run of the same work, from the measurement: memory
    request = measured peak rescaled to this shard x `measured_headroom`, CPU request = measured mean cores
    rounded up to 0.1 (module docstring). A CPU replica whose measured memory exceeds `max_memory` does not fit.
    The GPU type is always chosen by the estimate. Raises MicrofedError when no allowed accelerator fits, or
    when `accelerators` names an unknown one.
    """
    allowed = _check_accelerators(accelerators)
    if not (math.isfinite(headroom) and headroom >= 1.0):
        raise MicrofedError(f"headroom must be a finite factor >= 1, got {headroom}", hint="use e.g. 1.25")
    if not (math.isfinite(measured_headroom) and measured_headroom >= 1.0):
        raise MicrofedError(f"measured_headroom must be a finite factor >= 1, got {measured_headroom}")
    measured = dict(measured or {})
    for kind, given in measured.items():
        if kind != given.device:
            raise MicrofedError(f"measured[{kind!r}] holds a measurement of device {given.device!r}")
    if not (math.isfinite(cpu_threshold_gflop) and cpu_threshold_gflop > 0):
        raise MicrofedError(f"cpu_threshold_gflop must be positive, got {cpu_threshold_gflop}")
    est = estimate_memory(
        arch, batch_size=batch_size, optimizer=optimizer, shard_examples=shard_examples, precision=precision
    )
    epoch_gflop = est.train_flops_per_example * shard_examples / 1e9
    gpu_work = epoch_gflop > cpu_threshold_gflop
    base = {
        "model": arch.name,
        "image_shape": [arch.in_channels, *arch.image_size],
        "batch_size": batch_size,
        "optimizer": optimizer,
        "precision": precision,
        "shard_examples": shard_examples,
        **est.to_dict(),
        "headroom": headroom,
        "train_gflop_per_epoch": epoch_gflop,
        "cpu_threshold_gflop": cpu_threshold_gflop,
        "reason": f"{epoch_gflop:,.0f} GFLOP per epoch {'>' if gpu_work else '<='} {cpu_threshold_gflop:,.0f}",
        "requests_from": "estimate",
    }
    for name in _preference(allowed, gpu_work):
        if name == "none":
            plan = _cpu_plan(est, base, max_memory)
            m: MeasuredUsage | None = measured.get("cpu")
        else:
            plan = _gpu_plan(GPUS[name], est, base, max_memory)
            m = measured.get("cuda")
        if plan is not None and m is not None:
            plan = _from_measurement(plan, m, shard_examples, measured_headroom, max_memory)
        if plan is not None:
            return plan
    raise _too_big(arch, est, allowed, headroom, max_memory)


def _check_accelerators(accelerators: Sequence[str]) -> list[str]:
    if isinstance(accelerators, str):  # ("none") without the comma is a string, not a one-element tuple
        accelerators = [accelerators]
    unknown = [a for a in accelerators if a not in ACCELERATORS]
    if unknown or not accelerators:
        raise MicrofedError(
            f"unknown accelerators {unknown}" if unknown else "no accelerators allowed",
            hint=f"allow one or more of {', '.join(ACCELERATORS)} ('none' trains on CPU)",
        )
    return [a for a in ACCELERATORS if a in accelerators]  # smallest first, whatever the caller's order


def _preference(allowed: list[str], gpu_work: bool) -> list[str]:
    gpus = [a for a in allowed if a != "none"]
    cpu = ["none"] if "none" in allowed else []
    # GPU work falls back to CPU only when no allowed GPU holds it; the reason in the estimate says so.
    return gpus + cpu if gpu_work else cpu + gpus


def _cpu_plan(est: MemoryEstimate, base: dict[str, Any], max_memory: int) -> ResourcePlan | None:
    request = _round_memory(est.total_bytes * base["headroom"])
    if request > max_memory:
        return None
    cores = _cpu_cores(base["train_gflop_per_epoch"])
    return ResourcePlan(
        accelerator="none",
        gpus=0,
        cpu_request=cores,
        cpu_limit=cores * CPU_LIMIT_FACTOR,
        memory_request=request,
        memory_limit=_round_memory(request * MEMORY_LIMIT_FACTOR),
        gpu_memory=0,
        estimate={
            **base,
            "host_bytes": est.total_bytes,
            "seconds_per_epoch": base["train_gflop_per_epoch"] / (CPU_GFLOPS_PER_CORE * cores),
        },
    )


def _cpu_cores(epoch_gflop: float) -> float:
    """Cores that finish an epoch within the CPU budget, in 250m steps, at least 1 and at most the cap."""
    need = epoch_gflop / (CPU_GFLOPS_PER_CORE * CPU_EPOCH_BUDGET_SECONDS)
    return min(MAX_CPU_CORES, max(MIN_CPU_CORES, math.ceil(need / CPU_STEP) * CPU_STEP))


def _gpu_plan(gpu: GpuSpec, est: MemoryEstimate, base: dict[str, Any], max_memory: int) -> ResourcePlan | None:
    if est.device_bytes * base["headroom"] > gpu.usable_bytes:
        return None
    # The host keeps the shard it loaded (the GPU copy is a second one), a model copy from building and
    # saving, and the CUDA libraries on top of the usual runtime.
    host = est.shard_bytes + est.parameter_bytes + est.runtime_bytes + CUDA_HOST_BYTES
    request = _round_memory(host * base["headroom"])
    if request > max_memory:
        return None
    return ResourcePlan(
        accelerator=gpu.name,
        gpus=1,
        # The GPU does the arithmetic and Preprocess normalises batches on the device, so the host only
        # drives the loop: the floor is its compute need.
        cpu_request=MIN_CPU_CORES,
        cpu_limit=MIN_CPU_CORES * CPU_LIMIT_FACTOR,
        memory_request=request,
        memory_limit=_round_memory(request * MEMORY_LIMIT_FACTOR),
        gpu_memory=est.device_bytes,
        estimate={
            **base,
            "host_bytes": host,
            "gpu_usable_bytes": gpu.usable_bytes,
            "seconds_per_epoch": base["train_gflop_per_epoch"] / (gpu.fp32_tflops * 1e3 * GPU_EFFICIENCY),
        },
    )


def _from_measurement(
    plan: ResourcePlan, m: MeasuredUsage, shard_examples: int, headroom: float, max_memory: int
) -> ResourcePlan | None:
    """`plan` with its CPU and memory requests (and the limits over them) taken from a measurement; None when
    the measured memory does not fit a replica."""
    host = m.memory_bytes(shard_examples)
    request = _round_memory(host * headroom)
    if request > max_memory:
        return None
    cores = _measured_cores(m.cpu_cores)
    return dataclasses.replace(
        plan,
        cpu_request=cores,
        cpu_limit=round(cores * CPU_LIMIT_FACTOR, 3),
        memory_request=request,
        memory_limit=_round_memory(request * MEMORY_LIMIT_FACTOR),
        estimate={
            **plan.estimate,
            "requests_from": "measurement",
            "measured": m.to_dict(),
            "measured_headroom": headroom,
            "measured_host_bytes": host,
            "measured_gpu_bytes": m.gpu_memory_bytes(shard_examples),
            "estimated_requests": {
                "cpu_request": plan.cpu_request,
                "memory_request": plan.memory_request,
            },
        },
    )


def _measured_cores(cores: float) -> float:
    """Measured cores rounded up to 100 millicores, at least one step and at most the cap."""
    steps = math.ceil(cores / MEASURED_CPU_STEP - 1e-9)  # 0.3 / 0.1 is 2.9999999999999996
    return round(min(MAX_CPU_CORES, max(MEASURED_CPU_STEP, steps * MEASURED_CPU_STEP)), 3)


def _round_memory(nbytes: float) -> int:
    return math.ceil(nbytes / MEMORY_GRANULE) * MEMORY_GRANULE


def _too_big(
    arch: ModelConfig, est: MemoryEstimate, allowed: list[str], headroom: float, max_memory: int
) -> MicrofedError:
    largest = allowed[-1]
    if largest == "none":
        need, where = est.total_bytes * headroom, f"CPU (at most {_human(max_memory)} per replica)"
    else:
        need, where = est.device_bytes * headroom, f"{largest} ({_human(GPUS[largest].usable_bytes)} usable)"
    return MicrofedError(
        f"{arch.name} does not fit any allowed accelerator: it needs {_human(need)} "
        f"(estimate {_human(need / headroom)} x headroom {headroom}: {_breakdown(est.to_dict())}); "
        f"the largest allowed is {where}",
        hint="lower --batch-size, split the data into more shards, use bf16, or allow a larger accelerator",
    )


def format_plan(plan: ResourcePlan) -> str:
    """One line for logs: accelerator, requests (limits), and the estimate behind them."""
    where = "CPU" if plan.accelerator == "none" else f"GPU {plan.accelerator} x{plan.gpus}"
    line = (
        f"{where}, {_cores(plan.cpu_request)} (limit {plan.cpu_limit:g}), "
        f"{_human(plan.memory_request)} memory (limit {_human(plan.memory_limit)})"
    )
    e = plan.estimate
    if "total_bytes" not in e:  # a hand-made plan carries no estimate
        return line
    if plan.gpus:
        usable = f" of {_human(e['gpu_usable_bytes'])} usable" if "gpu_usable_bytes" in e else ""
        line += f", {_human(plan.gpu_memory)} GPU memory{usable}"
        total = f"GPU {_human(e['device_bytes'])} + host {_human(e['host_bytes'])}"
    else:
        total = _human(e["total_bytes"])
    epoch = f", ~{e['seconds_per_epoch'] / 60:,.1f} min/epoch" if "seconds_per_epoch" in e else ""
    measured = ""
    if e.get("requests_from") == "measurement":
        m = e["measured"]
        measured = (
            f"; requests from a measurement: {_human(e['measured_host_bytes'])} peak x{e['measured_headroom']:g}, "
            f"{m['cpu_cores']:.2f} cores used ({m['source']})"
        )
    return (
        f"{line} (estimate {total}: {_breakdown(e)}; {_gflop(e['train_flops_per_example'])}/example"
        f"{epoch}; headroom x{e['headroom']:g}{measured})"
    )


def _breakdown(e: dict[str, Any]) -> str:
    state = f"{e.get('optimizer', 'optimizer')} state"
    parts = ("params", "parameter"), ("grads", "gradient"), (state, "optimizer"), ("activations", "activation")
    text = ", ".join(f"{label} {_human(e[f'{key}_bytes'])}" for label, key in parts)
    batch = f" (batch {e['batch_size']})" if "batch_size" in e else ""
    return f"{text}{batch}, shard {_human(e['shard_bytes'])}, runtime {_human(e['runtime_bytes'])}"


def _cores(cores: float) -> str:
    return f"{cores:g} core" if cores == 1 else f"{cores:g} cores"


def _gflop(flops: float) -> str:
    return f"{flops / 1e9:,.2f} GFLOP" if flops >= 1e9 else f"{flops / 1e6:,.1f} MFLOP"


def _human(nbytes: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes:.0f} B"
