"""What a worker used, compared with what its resource plan requested, and a cache the next plan starts from.

The measuring itself (`UsageMonitor`, `Usage`: what one process used, CPU demand included) lives in
`microfed.training.usage_monitor` and is re-exported here.

The cache (`usage-cache.json`, a local path or gs:// URI) maps the work (model, input shape, batch size,
precision, optimizer) and the device kind (cpu/cuda) to a `MeasuredUsage`: memory is stored as the part that
does not depend on the shard plus bytes per example, so a run split into more, smaller shards rescales it
rather than missing the cache. Each run replaces its entry with its own measurement (the latest run is the best
guide; two runs writing at once keep one of the two, which is all a cache needs). A cache that cannot be read
or parsed, or not written, is reported as a warning and ignored: it must never stop a training run.
"""

from __future__ import annotations

import datetime
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from microfed.training.errors import MicrofedError
from microfed.training.layout import USAGE_CACHE_FILE
from microfed.training.resources import MeasuredUsage, ResourcePlan, shard_bytes_per_example
from microfed.training.storage import exists, join, read_bytes, write_bytes
from microfed.training.usage_monitor import SAMPLE_SECONDS, Usage, UsageMonitor, find_cgroup

__all__ = [
    "REQUEST_UTILISATION_GOAL",
    "SAMPLE_SECONDS",
    "Usage",
    "UsageKey",
    "UsageMonitor",
    "cache_uri",
    "find_cgroup",
    "job_usage",
    "measured_from_workers",
    "read_measured",
    "request_utilisation",
    "update_cache",
]

CACHE_VERSION = 1
# The goal: measured use / requested above 75% (planned requests within 25% of measured peaks).
REQUEST_UTILISATION_GOAL = 0.75


# --- the cache ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class UsageKey:
    """The work a measurement is valid for; the device kind is the second level of the cache."""

    model: str
    image_shape: tuple[int, int, int]
    """(C, H, W) of the input."""
    batch_size: int
    precision: str
    optimizer: str

    @classmethod
    def from_plan(cls, plan: ResourcePlan) -> UsageKey:
        """The key of the work a plan was made for (its estimate records model, shape, batch and optimizer)."""
        e = plan.estimate
        try:
            c, h, w = (int(v) for v in e["image_shape"])
            return cls(
                model=str(e["model"]),
                image_shape=(c, h, w),
                batch_size=int(e["batch_size"]),
                precision=str(e["precision"]),
                optimizer=str(e["optimizer"]),
            )
        except (KeyError, TypeError, ValueError):
            raise MicrofedError("a hand-made resource plan carries no estimate to key a usage cache by") from None

    def text(self) -> str:
        c, h, w = self.image_shape
        return f"{self.model}|{c}x{h}x{w}|batch={self.batch_size}|{self.precision}|{self.optimizer}"


def cache_uri(location: str) -> str:
    """The cache file: `location` itself when it names a .json file, else `usage-cache.json` inside it."""
    return location if location.lower().endswith(".json") else join(location, USAGE_CACHE_FILE)


def _read_entries(uri: str) -> dict[str, Any]:
    """The cache's entries; {} when it does not exist or is unreadable (with a warning naming the file)."""
    try:
        if not exists(uri):
            return {}
        data = json.loads(read_bytes(uri))
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError("expected an object with an `entries` object")
        if data.get("version") != CACHE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, this release reads version {CACHE_VERSION}")
        return data["entries"]
    except (MicrofedError, OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        warnings.warn(
            f"usage cache {uri} is unreadable and ignored ({e}); plans fall back to the estimate and the next "
            f"run rewrites the file",
            stacklevel=2,
        )
        return {}


def read_measured(location: str, key: UsageKey) -> dict[str, MeasuredUsage]:
    """Measurements of `key`'s work by device kind (`cpu`, `cuda`) from the cache at `location`; {} when the
    cache is off (""), missing, unreadable (warned about) or has no entry for the work."""
    if not location:
        return {}
    uri = cache_uri(location)
    entry = _read_entries(uri).get(key.text(), {})
    out: dict[str, MeasuredUsage] = {}
    for kind, raw in entry.items() if isinstance(entry, dict) else ():
        try:
            out[kind] = MeasuredUsage(
                device=kind,
                memory_fixed_bytes=int(raw["memory_fixed_bytes"]),
                bytes_per_example=int(raw["bytes_per_example"]),
                cpu_cores=float(raw["cpu_cores"]),
                gpu_memory_fixed_bytes=int(raw.get("gpu_memory_fixed_bytes", 0)),
                source=f"{uri} ({raw.get('measured_at', 'unknown time')}, {raw.get('memory_source', '?')})",
            )
        except (MicrofedError, KeyError, TypeError, ValueError, AttributeError) as e:
            warnings.warn(f"usage cache {uri}: entry {key.text()}/{kind} is malformed and ignored ({e})", stacklevel=2)
    return out


def measured_from_workers(
    workers: Sequence[Mapping[str, Any]], image_shape: Sequence[int]
) -> tuple[MeasuredUsage, dict[str, Any]] | None:
    """One measurement for the whole job from its workers' records (None when none recorded usage).

    Every replica gets the same request, so the largest need wins: the largest memory beyond each replica's
    own shard, the most cores. Returns the measurement and the extra facts the cache keeps beside it.
    """
    measured = [(w, Usage.from_dict(w["usage"])) for w in workers if isinstance(w.get("usage"), Mapping)]
    if not measured:
        return None
    per_example = shard_bytes_per_example(image_shape)
    kinds = {"cuda" if str(w.get("device", "cpu")).startswith("cuda") else "cpu" for w, _ in measured}
    kind = "cuda" if "cuda" in kinds else "cpu"
    fixed = max(max(0, u.memory_peak_bytes - int(w["n_k"]) * per_example) for w, u in measured)
    gpu_fixed = max(
        (max(0, (u.gpu_memory_reserved_peak_bytes or 0) - int(w["n_k"]) * per_example) for w, u in measured),
        default=0,
    )
    m = MeasuredUsage(
        device=kind,
        memory_fixed_bytes=fixed,
        bytes_per_example=per_example,
        # demand, not use: a replica that waited for cores would have used them (usage_monitor's docstring)
        cpu_cores=max(max(u.cpu_cores_mean, u.cpu_cores_demand or 0.0) for _, u in measured),
        gpu_memory_fixed_bytes=gpu_fixed if kind == "cuda" else 0,
        source="this run",
    )
    epochs = [u.epoch_seconds_mean for _, u in measured if u.epoch_seconds_mean is not None]
    extra = {
        "replicas": len(measured),
        "shard_examples": [int(w["n_k"]) for w, _ in measured],
        "threads": max((int(w.get("threads", 0)) for w, _ in measured), default=0),
        "memory_peak_bytes": max(u.memory_peak_bytes for _, u in measured),
        "memory_source": ", ".join(sorted({u.memory_source for _, u in measured})),
        "cpu_cores_used": max(u.cpu_cores_mean for _, u in measured),
        "cpu_cores_peak": max(u.cpu_cores_peak for _, u in measured),
        "epoch_seconds_mean": sum(epochs) / len(epochs) if epochs else None,
    }
    return m, extra


def update_cache(location: str, key: UsageKey, measured: MeasuredUsage, extra: Mapping[str, Any] | None = None) -> str:
    """Replace `key`'s entry for `measured.device` in the cache at `location` (created when missing; a
    corrupt one is replaced); returns the cache's URI. Local files are replaced atomically, gs:// objects by
    one upload."""
    uri = cache_uri(location)
    entries = _read_entries(uri)
    entry = entries.get(key.text())
    entry = dict(entry) if isinstance(entry, dict) else {}
    entry[measured.device] = {
        **{k: v for k, v in measured.to_dict().items() if k not in ("device", "source")},
        **(extra or {}),
        "model": key.model,
        "image_shape": list(key.image_shape),
        "batch_size": key.batch_size,
        "precision": key.precision,
        "optimizer": key.optimizer,
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    entries[key.text()] = entry
    data = {"version": CACHE_VERSION, "entries": entries}
    write_bytes(uri, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return uri


# --- measured against requested ----------------------------------------------------------------------------


def request_utilisation(plan: ResourcePlan, usage: Usage) -> dict[str, float | None]:
    """Measured / requested per resource (1.0 = the request was exactly what was used; above 1, the replica
    used more than it reserved). `memory_of_limit` is how close the peak came to the kill line."""
    reserved = usage.gpu_memory_reserved_peak_bytes
    return {
        "cpu": usage.cpu_cores_mean / plan.cpu_request,
        "cpu_peak": usage.cpu_cores_peak / plan.cpu_request,
        "cpu_demand": usage.cpu_cores_demand / plan.cpu_request if usage.cpu_cores_demand is not None else None,
        "memory": usage.memory_peak_bytes / plan.memory_request,
        "memory_of_limit": usage.memory_peak_bytes / plan.memory_limit,
        "gpu_memory": reserved / plan.gpu_memory if plan.gpu_memory and reserved is not None else None,
    }


def job_usage(plan: ResourcePlan, workers: Sequence[Mapping[str, Any]], *, planned: bool) -> dict[str, Any]:
    """The job record's `usage`: each replica's measured peaks against `plan`'s requests, and the lowest
    utilisation per resource against the goal (CPU judged by demand, memory by the peak). `planned` says
    whether the replicas ran under `plan` (a cluster) or it is the plan a cluster run would have got (a
    local run)."""
    replicas: list[dict[str, Any]] = []
    ratios: list[dict[str, float | None]] = []
    for w in workers:
        if not isinstance(w.get("usage"), Mapping):
            continue
        u = Usage.from_dict(w["usage"])
        ratios.append(request_utilisation(plan, u))
        replicas.append(
            {
                "rank": w.get("rank"),
                "n_k": w.get("n_k"),
                "cpu_cores_mean": u.cpu_cores_mean,
                "cpu_cores_peak": u.cpu_cores_peak,
                "cpu_cores_demand": u.cpu_cores_demand,
                "memory_peak_bytes": u.memory_peak_bytes,
                "memory_source": u.memory_source,
                "gpu_memory_reserved_peak_bytes": u.gpu_memory_reserved_peak_bytes,
                "gpu_utilization_mean": u.gpu_utilization_mean,
                "epoch_seconds_mean": u.epoch_seconds_mean,
                "utilisation": ratios[-1],
            }
        )
    lowest: dict[str, float | None] = {
        k: min(float(r[k] or 0.0) for r in ratios) if ratios else None for k in ("cpu", "memory")
    }
    # The goal is about over-requesting: a replica that waited for cores was not over-requested, so CPU counts
    # by demand where it was measured (on a machine shared with other work, use says more about the others).
    demand = [r["cpu_demand"] if r["cpu_demand"] is not None else r["cpu"] for r in ratios]
    lowest["cpu_demand"] = min(float(d or 0.0) for d in demand) if demand else None
    judged = [lowest["cpu_demand"], lowest["memory"]]
    return {
        "plan": "the job's plan" if planned else "the plan a cluster run would have got (local run)",
        "requests_from": plan.estimate.get("requests_from", "estimate"),
        "requested": {
            "accelerator": plan.accelerator,
            "cpu_request": plan.cpu_request,
            "cpu_limit": plan.cpu_limit,
            "memory_request": plan.memory_request,
            "memory_limit": plan.memory_limit,
            "gpu_memory": plan.gpu_memory,
        },
        "replicas": replicas,
        "lowest_utilisation": lowest,
        "goal": REQUEST_UTILISATION_GOAL,
        "meets_goal": bool(replicas) and all(v is not None and v >= REQUEST_UTILISATION_GOAL for v in judged),
    }
