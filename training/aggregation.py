"""FedAvg: the weighted average of micro-models, weights n_k / n.

One set of math serves both places it runs: `weighted_average` (the aggregate step, over state_dicts read
from disk) and `allreduce_average` (between rounds inside the job, over torch.distributed). Both accumulate
with `_accumulate` and finish with `_finish`:

- floating tensors (parameters *and* BatchNorm running statistics) become sum_k (n_k / n) * theta_k,
  accumulated in float64 and cast back to their own dtype;
- other tensors (integer buffers such as `num_batches_tracked`) are never float-averaged: the result keeps
  the input dtype and takes the element-wise maximum, which is order-independent.

Properties (tests/test_properties.py): scaling all weights changes nothing; the order of the inputs changes
at most the last bit; for float32, float16 and bfloat16 tensors equal inputs come back bit for bit and every
output lies between the inputs, because the float64 accumulator's rounding vanishes in the cast back. A float64
tensor has no wider accumulator, so there the same holds to within an ulp or so.

The strategies (microfed.training.strategies) build on the same average; their server steps and per-step terms
that are plain math live here: `server_update` (FedAvgM's momentum), `proximal_step` (FedProx's gradient term),
`batchnorm_keys` (what FedBN keeps local).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from microfed.training.errors import MicrofedError

__all__ = [
    "ARCHITECTURE_KEY",
    "allreduce_average",
    "batchnorm_keys",
    "check_compatible",
    "check_same_architecture",
    "proximal_step",
    "server_update",
    "weighted_average",
]

# The safetensors metadata field in which the worker records a micro-model's architecture (ModelConfig as JSON).
ARCHITECTURE_KEY = "architecture"

State = Mapping[str, torch.Tensor]


def __getattr__(name: str) -> object:
    # Strategy and STRATEGIES moved to microfed.training.strategies (which imports this module): still found here
    if name in ("Strategy", "STRATEGIES"):
        from microfed.training import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _accumulate(acc: dict[str, torch.Tensor] | None, state: State, weight: float) -> dict[str, torch.Tensor]:
    """Add `weight * state` to the float entries of `acc` and fold the others in with max. Never mutates `state`."""
    if acc is None:
        acc = {}
        for key, t in state.items():
            acc[key] = (
                t.detach().to(torch.float64, copy=True).mul_(weight) if t.is_floating_point() else t.detach().clone()
            )
        return acc
    for key, t in state.items():
        if t.is_floating_point():
            # in place, promoting t on the fly: no float64 copy of each input
            acc[key].add_(t.detach(), alpha=weight)
        else:
            torch.maximum(acc[key], t.detach(), out=acc[key])
    return acc


def _finish(acc: Mapping[str, torch.Tensor], template: State) -> dict[str, torch.Tensor]:
    """Cast the accumulated tensors back to the dtypes (and devices) of `template`."""
    return {key: acc[key].to(dtype=t.dtype, device=t.device) for key, t in template.items()}


def _label(names: Sequence[str] | None, i: int) -> str:
    return names[i] if names is not None else f"input {i}"


def check_compatible(states: Sequence[State], names: Sequence[str] | None = None, *, finite: bool = True) -> None:
    """Raise MicrofedError naming the input and key when states differ in keys, shapes or dtypes, or (with
    `finite`) hold NaN/Inf."""
    if not states:
        raise MicrofedError("nothing to aggregate: no micro-models were given")
    ref = states[0]
    for i, state in enumerate(states):
        who = _label(names, i)
        missing, extra = set(ref) - set(state), set(state) - set(ref)
        if missing or extra:
            raise MicrofedError(
                f"{who} does not match {_label(names, 0)}: missing keys {sorted(missing)[:5]}, "
                f"unexpected keys {sorted(extra)[:5]}",
                hint="all micro-models must come from the same model architecture",
            )
        for key, t in state.items():
            r = ref[key]
            if t.shape != r.shape or t.dtype != r.dtype:
                raise MicrofedError(
                    f"{who}: tensor {key!r} is {t.dtype} {tuple(t.shape)} but {_label(names, 0)} has "
                    f"{r.dtype} {tuple(r.shape)}",
                    hint="all micro-models must come from the same model configuration",
                )
            if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MicrofedError(f"{who}: tensor {key!r} contains NaN or Inf", hint="that worker diverged")


def check_same_architecture(metadata: Sequence[Mapping[str, str]], names: Sequence[str] | None = None) -> None:
    """Raise MicrofedError naming the input when the micro-models' recorded architectures differ.

    `metadata` is each micro-model file's safetensors metadata; the worker stores its ModelConfig as JSON under
    ARCHITECTURE_KEY. Tensors of the same keys and shapes can still belong to different architectures (a
    custom factory with another activation, say), which `check_compatible` cannot see. Files that record no
    architecture are only compared with each other: all or none must record one.
    """
    if not metadata:
        raise MicrofedError("nothing to aggregate: no micro-models were given")
    ref = _architecture(metadata[0], _label(names, 0))
    for i, meta in enumerate(metadata[1:], start=1):
        arch = _architecture(meta, _label(names, i))
        if arch != ref:
            keys = sorted({*(ref or {}), *(arch or {})})
            diff = [k for k in keys if (ref or {}).get(k) != (arch or {}).get(k)] or ["architecture"]
            raise MicrofedError(
                f"{_label(names, i)} was trained as a different architecture than {_label(names, 0)}: "
                + ", ".join(f"{k} {(arch or {}).get(k)!r} vs {(ref or {}).get(k)!r}" for k in diff[:5]),
                hint="all micro-models must come from the same model configuration (one train step)",
            )


def _architecture(meta: Mapping[str, str], who: str) -> dict[str, object] | None:
    raw = meta.get(ARCHITECTURE_KEY)
    if raw is None:
        return None
    try:
        arch = json.loads(raw)
    except json.JSONDecodeError:
        arch = None
    if not isinstance(arch, dict):
        raise MicrofedError(f"{who}: the {ARCHITECTURE_KEY!r} metadata is not a JSON object")
    return arch


def weighted_average(
    states: Sequence[State], weights: Sequence[float], *, names: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Average `states` with `weights` (normalised to sum to 1, e.g. n_k), returning a new state_dict.

    Inputs are not modified. `names` (one per state) are used in error messages.
    """
    if len(weights) != len(states):
        raise MicrofedError(f"got {len(states)} micro-models but {len(weights)} weights")
    check_compatible(states, names, finite=False)
    for i, w in enumerate(weights):
        if not (math.isfinite(w) and w > 0):
            raise MicrofedError(f"{_label(names, i)}: weight must be a positive number, got {w}")
    total = math.fsum(weights)
    acc = None
    for state, w in zip(states, weights, strict=True):
        acc = _accumulate(acc, state, w / total)
    assert acc is not None  # states is non-empty (checked above)
    # NaN and Inf survive a sum with positive weights, so one pass over the result finds them; only then
    # are the inputs scanned, to name the one they came from.
    if not all(bool(torch.isfinite(t).all()) for t in acc.values() if t.is_floating_point()):
        check_compatible(states, names)
    return _finish(acc, states[0])


def allreduce_average(state: State, weight: float, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """The same average across the ranks of a torch.distributed job: each rank passes its state and n_k.

    Every rank gets the averaged state. Weights are summed across ranks first, so each rank scales its own
    contribution by n_k / n and a SUM all-reduce completes the average.
    """
    if not (math.isfinite(weight) and weight > 0):
        raise MicrofedError(f"weight must be a positive number, got {weight}")
    device = next(iter(state.values())).device
    total = torch.tensor([weight], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=group)
    acc = _accumulate(None, state, weight / float(total.item()))
    for t in acc.values():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if t.is_floating_point() else dist.ReduceOp.MAX, group=group)
    return _finish(acc, state)


def batchnorm_keys(model: torch.nn.Module) -> set[str]:
    """state_dict keys of the model's BatchNorm layers (weights, biases, running statistics): what FedBN keeps
    local."""
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            keys.update(f"{prefix}.{name}" if prefix else name for name in module.state_dict())
    return keys


def server_update(
    global_state: State, average: State, momentum: State | None, *, beta: float, lr: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """FedAvgM's server step: returns (new global state, new momentum). Inputs are not modified.

    Floating tensors: d = global - average, v = beta * v + d, global' = global - lr * v, in float64 and cast back
    (momentum is kept in float32). Other tensors (counters) take the average's value. `momentum` None means zero.
    """
    check_compatible([global_state, average], ["the global model", "the average"], finite=True)
    new_global: dict[str, torch.Tensor] = {}
    new_momentum: dict[str, torch.Tensor] = {}
    for key, g in global_state.items():
        a = average[key]
        if not g.is_floating_point():
            new_global[key] = a.detach().clone()
            continue
        g64 = g.detach().to(torch.float64)
        v = g64 - a.detach().to(torch.float64)
        if momentum is not None and key in momentum:
            v.add_(momentum[key].detach().to(device=v.device, dtype=torch.float64), alpha=beta)
        new_global[key] = (g64 - lr * v).to(g.dtype)
        new_momentum[key] = v.to(torch.float32)
    return new_global, new_momentum


def proximal_step(params: Sequence[torch.nn.Parameter], anchor: Sequence[torch.Tensor], mu: float) -> None:
    """Add FedProx's proximal gradient mu * (w - w_global) to each parameter's gradient, in place."""
    for p, a in zip(params, anchor, strict=True):
        if p.grad is not None:
            p.grad.add_(p.detach() - a, alpha=mu)
