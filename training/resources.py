"""Resource plan for one worker replica: which accelerator, how much CPU and memory to request.

The reference platform's failure was requesting far more than it used (62% of CPU and 34% of memory idle), and
handing A100s to models a T4 holds. So every number here derives from an estimate of what one replica uses:

- parameters, gradients and optimizer state: counted from the built model (fp32 master weights, also under
  bf16 autocast);
- activations of one training batch: measured by a dry run on CPU that records the tensors autograd saves for
  backward (the memory a training step holds at its peak beyond the weights), at two small batch sizes and
  extrapolated linearly to the real one;
- the shard: uint8 images and int64 labels, preloaded whole by the worker (and copied whole onto the GPU);
- the runtime: interpreter, torch and its libraries.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from .errors import MicrofedError
from .models import ModelConfig, build_model, count_parameters

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

MIB = 1024**2
GIB = 1024**3

# Smallest first: the planner picks the first one that fits.
ACCELERATORS = ("none", "nvidia-tesla-t4", "nvidia-l4", "nvidia-tesla-a100")

# Device memory the CUDA context, cuBLAS/cuDNN handles and their workspaces take before any tensor of ours:
# typically 0.3-0.8 GiB with lazy module loading (CUDA >= 11.7); 1 GiB keeps a margin for cuDNN's
# convolution workspaces on top.
CUDA_CONTEXT_RESERVE = 1 * GIB


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type as GKE names it, with the memory a training process can actually use."""

    name: str
    total_bytes: int
    """Memory the driver reports (nvidia-smi's total), a little below the marketing figure."""
    usable_bytes: int
    """`total_bytes` minus `CUDA_CONTEXT_RESERVE`: what our tensors may fill."""
    fp32_tflops: float
    """Peak fp32 (non-tensor-core) throughput; only feeds the seconds-per-epoch guess that gets logged."""


def _gpu(name: str, total_mib: int, fp32_tflops: float) -> GpuSpec:
    total = total_mib * MIB
    return GpuSpec(name, total, total - CUDA_CONTEXT_RESERVE, fp32_tflops)


# In ACCELERATORS order (smallest first). Totals are what nvidia-smi reports for the 16 GB T4, the 24 GB L4
# and the 40 GB A100 (GKE's `nvidia-tesla-a100`; the 80 GB part is `nvidia-a100-80gb`).
GPUS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        _gpu("nvidia-tesla-t4", 15_360, 8.1),
        _gpu("nvidia-l4", 23_034, 30.3),
        _gpu("nvidia-tesla-a100", 40_960, 19.5),
    )
}

# State tensors each optimizer keeps per parameter: Adam/AdamW exp_avg and exp_avg_sq; SGD its momentum
# buffer (the train loop always uses Nesterov momentum).
OPTIMIZER_STATE_COPIES = {"adam": 2, "adamw": 2, "sgd": 1}
# Autocast dtype the dry run uses per precision. `auto` may resolve to fp32, so it is estimated as fp32:
# bf16 only ever shrinks activations, so the fp32 figure is the safe bound.
_AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "auto": None, "bf16": torch.bfloat16}

# The dry run's two batch sizes. Activation bytes are affine in the batch (a per-example slope plus a small
# constant such as BatchNorm's per-channel statistics), so two points pin both down; 2 rather than 1 keeps a
# BatchNorm after a global pool from refusing a single-example batch. Both are cheap even at 224x224.
DRY_RUN_BATCHES = (2, 4)
# Backward costs about twice the forward (gradients w.r.t. inputs and w.r.t. weights are each one
# forward-sized product). We count the forward only: FlopCounterMode counts a grouped (depthwise)
# convolution's backward as if it were dense (efficientnet_v2_s: 74 GFLOP of backward for 5.7 of forward).
TRAIN_FLOPS_PER_FORWARD_FLOP = 3

# Resident memory of a CPU worker before its model and data: interpreter, torch, torchvision, the worker
# module and oneDNN's kernel caches. Measured here at 674 MiB after the imports and 695 MiB after one step.
RUNTIME_BYTES = 768 * MIB
# What a CUDA build adds to the host process: the CUDA runtime, cuBLAS and cuDNN libraries paged in and the
# driver's host-side state. Not measurable on this GPU-less machine; the order of the libraries' loaded size.
CUDA_HOST_BYTES = 1 * GIB

# Effective training throughput of one CPU core, measured on this machine's 2 cores: cnn-fmnist trains at
# ~2,300 images/s x 25.4 MFLOP = 58 GFLOP/s (29 per core); efficientnet_v2_s (depthwise convolutions) at
# ~23 GFLOP/s (11.5 per core); a 2048^2 sgemm reaches 65 per core. 20 is the middle of the trained models.
CPU_GFLOPS_PER_CORE = 20.0
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
# Depthwise-heavy convnets reach a fraction of a GPU's fp32 peak; only for the logged epoch-time guess.
GPU_EFFICIENCY = 0.3

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
class MemoryEstimate:
    """What one replica holds while training, in bytes, and the compute one example costs."""

    parameters: int
    """Trainable parameters (`count_parameters`)."""
    parameter_bytes: int
    """Trainable parameters, fp32 (autocast keeps fp32 master weights)."""
    gradient_bytes: int
    """One gradient per parameter, same size as the parameters."""
    optimizer_bytes: int
    """Optimizer state: 2x parameters for Adam/AdamW, 1x for SGD with momentum."""
    activation_bytes: int
    """Tensors saved for backward during one training batch (measured, extrapolated to the batch size)."""
    shard_bytes: int
    """The preloaded shard: uint8 images (N x C x H x W) plus int64 labels."""
    runtime_bytes: int
    """Interpreter, torch and libraries of a CPU worker process."""
    train_flops_per_example: int
    """Forward + backward FLOPs of one example (3x the counted forward)."""

    @property
    def device_bytes(self) -> int:
        """What a GPU replica keeps on the GPU: the model's working set plus the shard the worker copies there."""
        return (
            self.parameter_bytes
            + self.gradient_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + (self.shard_bytes)
        )

    @property
    def total_bytes(self) -> int:
        """Everything, i.e. the memory of a CPU replica."""
        return self.device_bytes + self.runtime_bytes

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "device_bytes": self.device_bytes, "total_bytes": self.total_bytes}


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


def shard_bytes_per_example(image_shape: Sequence[int]) -> int:
    """Bytes one preloaded example takes: its uint8 image (C x H x W) and its int64 label."""
    return math.prod(image_shape) + torch.int64.itemsize


@dataclass(frozen=True)
class _DryRun:
    """Batch-independent results of the dry run, cached per model and precision."""

    parameters: int
    parameter_bytes: int
    activation_fixed: float
    activation_per_example: float
    forward_flops_per_example: int


def estimate_memory(
    arch: ModelConfig, *, batch_size: int, optimizer: str, shard_examples: int, precision: str = "fp32"
) -> MemoryEstimate:
    """Estimate one replica's memory for training `arch` on a shard of `shard_examples` examples.

    The model is built and run forward on CPU at two tiny batches (cached per `arch` and `precision`, so
    planning the same model again costs nothing); the caller's RNG state is left untouched.
    """
    _check_count("batch_size", batch_size, "--batch-size")
    _check_count("shard_examples", shard_examples, "the shard's num_examples")
    _check_choice("optimizer", optimizer, tuple(OPTIMIZER_STATE_COPIES))
    _check_choice("precision", precision, tuple(_AUTOCAST))
    run = _dry_run(arch, precision)
    c, (h, w) = arch.in_channels, arch.image_size
    return MemoryEstimate(
        parameters=run.parameters,
        parameter_bytes=run.parameter_bytes,
        gradient_bytes=run.parameter_bytes,
        optimizer_bytes=OPTIMIZER_STATE_COPIES[optimizer] * run.parameter_bytes,
        activation_bytes=math.ceil(run.activation_fixed + run.activation_per_example * batch_size),
        shard_bytes=shard_examples * shard_bytes_per_example((c, h, w)),
        runtime_bytes=RUNTIME_BYTES,
        train_flops_per_example=TRAIN_FLOPS_PER_FORWARD_FLOP * run.forward_flops_per_example,
    )


@lru_cache(maxsize=32)
def _dry_run(arch: ModelConfig, precision: str) -> _DryRun:
    # fork_rng: building the model draws from the global RNG, which the worker seeds for identical weights.
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        model = build_model(arch).train().to(memory_format=torch.channels_last)  # as the worker runs it
        (n1, (bytes1, flops1)), (n2, (bytes2, flops2)) = (
            (n, _measure_forward(model, arch, n, _AUTOCAST[precision])) for n in DRY_RUN_BATCHES
        )
    per_example = (bytes2 - bytes1) / (n2 - n1)
    return _DryRun(
        parameters=count_parameters(model),
        parameter_bytes=sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        activation_fixed=max(0.0, bytes1 - per_example * n1),
        activation_per_example=per_example,
        forward_flops_per_example=(flops2 - flops1) // (n2 - n1),
    )


def _measure_forward(model: nn.Module, arch: ModelConfig, batch: int, amp: torch.dtype | None) -> tuple[int, int]:
    """(bytes saved for backward, FLOPs) of one forward pass over `batch` examples."""
    # Random, not zeros: an all-zero batch gives BatchNorm zero variance and fills the rest of the network
    # with denormals, which the CPU computes ~50x slower. The values affect neither bytes nor FLOPs.
    x = torch.randn(batch, arch.in_channels, *arch.image_size, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    # Weights saved for backward are the parameters themselves (counted separately), not activations.
    weights = {_storage_key(t)[0] for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}
    hooks = torch.autograd.graph.saved_tensors_hooks(_recorder(saved, weights), _identity)
    autocast = torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None)
    from torch.utils.flop_counter import FlopCounterMode  # pulls in triton: only when a plan is made

    with FlopCounterMode(display=False) as counter:
        with hooks, autocast:
            out = model(x)
        # `out` keeps the graph, and so every saved storage, alive until here: no address can be reused
        # by a later tensor and alias an earlier one in `saved`.
        activation_bytes = sum(saved.values())
        del out
    return activation_bytes, counter.get_total_flops()


def _recorder(saved: dict[int, int], exclude: set[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Keyed by storage: views and in-place results share one allocation and must count once.
        key, nbytes = _storage_key(tensor)
        if key not in exclude:
            saved[key] = nbytes
        return tensor

    return pack


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (NotImplementedError, RuntimeError):  # tensor subclasses without a plain storage
        return id(tensor), tensor.numel() * tensor.element_size()


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


def _check_count(name: str, value: object, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MicrofedError(f"{name} must be an integer >= 1, got {value!r}", hint=f"check {where}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise MicrofedError(f"unknown {name} {value!r}", hint=f"use one of {', '.join(allowed)}")
