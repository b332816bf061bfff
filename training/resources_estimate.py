"""What one worker replica holds and costs while training, and the machines it may run on.

`microfed.training.resources` plans requests from these numbers; every one of them derives from an estimate of
what one replica uses:

- parameters, gradients and optimizer state: counted from the built model (fp32 master weights, also under
  bf16 autocast);
- activations of one training batch: measured by a dry run on CPU that records the tensors autograd saves for
  backward (the memory a training step holds at its peak beyond the weights), at two small batch sizes and
  extrapolated linearly to the real one;
- the shard: uint8 images and int64 labels, preloaded whole by the worker (and copied whole onto the GPU);
- the runtime: interpreter, torch and its libraries.

The dry run also counts FLOPs: the planner compares an epoch's compute with a CPU replica's budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch import nn

from .errors import MicrofedError
from .models import ModelConfig, build_model, count_parameters

__all__ = [
    "ACCELERATORS",
    "CPU_GFLOPS_PER_CORE",
    "CUDA_CONTEXT_RESERVE",
    "CUDA_HOST_BYTES",
    "GIB",
    "GPUS",
    "GPU_EFFICIENCY",
    "MIB",
    "GpuSpec",
    "MemoryEstimate",
    "OPTIMIZER_STATE_COPIES",
    "RUNTIME_BYTES",
    "estimate_memory",
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
# Depthwise-heavy convnets reach a fraction of a GPU's fp32 peak; only for the logged epoch-time guess.
GPU_EFFICIENCY = 0.3


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


def _check_count(name: str, value: object, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MicrofedError(f"{name} must be an integer >= 1, got {value!r}", hint=f"check {where}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise MicrofedError(f"unknown {name} {value!r}", hint=f"use one of {', '.join(allowed)}")
