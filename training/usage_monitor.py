"""What a worker used: CPU, memory and GPU, measured from inside its own process.

`UsageMonitor` wraps a worker's life: a daemon thread samples every `SAMPLE_SECONDS` (a few small /proc and
cgroup reads, no subprocess) and the end result is a `Usage`:

- memory: the process's peak resident set (the kernel's high-water mark, VmHWM in /proc/self/status, or
  getrusage where there is no /proc) and, inside a container that can see its own memory cgroup, the cgroup's
  working set (usage minus inactive page cache: what the kubelet reports and evicts by) sampled at its
  maximum. The planned peak is the larger of the two; `memory_source` says which one it was. The cgroup's own
  `memory.peak` / `memory.max_usage_in_bytes` is recorded too but not planned on: it counts page cache the
  kernel reclaims before it would kill the container (the staged shard files, for one);
- CPU: process CPU time (all threads, user + system) over wall time, as mean cores and as the busiest
  `PEAK_WINDOW_SECONDS` window; and the demand: CPU time plus the time the process's threads waited for a
  core while runnable (run_delay in /proc/self/task/*/schedstat), over wall time. On a contended machine
  (other processes, or replicas sharing a node beyond their requests) use is what the process got, demand
  what it would have used: the cache keeps the demand, so a run measured on a busy machine does not shrink
  the next plan's CPU request;
- GPU, when the worker trains on CUDA: PyTorch's peak allocated and reserved device memory, and the device's
  utilisation through NVML when `torch.cuda.utilization` works (it needs pynvml; without it the field stays
  empty);
- seconds per epoch: the mean of the epochs the worker timed.

`microfed.training.usage` compares a `Usage` with the plan's requests and keeps it in the cache the next plan
starts from.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from microfed.training.errors import MicrofedError

__all__ = [
    "PEAK_WINDOW_SECONDS",
    "SAMPLE_SECONDS",
    "Usage",
    "UsageMonitor",
    "find_cgroup",
]

SAMPLE_SECONDS = 0.5
PEAK_WINDOW_SECONDS = 2.0


@dataclass(frozen=True, kw_only=True)
class Usage:
    """What one process used between `UsageMonitor.start` and `stop`. Bytes, cores, seconds, percent."""

    wall_seconds: float
    cpu_seconds: float
    """Process CPU time (user + system, all threads) spent in the interval."""
    cpu_cores_mean: float
    """cpu_seconds / wall_seconds."""
    cpu_cores_peak: float
    """Cores used in the busiest PEAK_WINDOW_SECONDS window (the mean when the interval was shorter)."""
    cpu_wait_seconds: float | None = None
    """Time the process's threads spent runnable but waiting for a core (None without schedstat)."""
    cpu_cores_demand: float | None = None
    """(cpu_seconds + cpu_wait_seconds) / wall_seconds: the cores it would have used uncontended."""
    memory_peak_bytes: int
    """The larger of the process's peak RSS and the cgroup's peak working set: what a plan sizes memory by."""
    memory_source: str
    """Which measurement `memory_peak_bytes` is: `process VmHWM`, `process getrusage`, `cgroup v2 working
    set` or `cgroup v1 working set`."""
    rss_start_bytes: int | None
    """Resident set when monitoring started (None without /proc)."""
    rss_peak_bytes: int | None
    """The process's high-water mark since it started (kernel-tracked: no sampling gaps)."""
    cgroup_working_set_peak_bytes: int | None = None
    """Largest sampled working set of the container's memory cgroup (None outside a container)."""
    cgroup_peak_bytes: int | None = None
    """The cgroup's own peak, page cache included (memory.peak / memory.max_usage_in_bytes)."""
    gpu_name: str | None = None
    gpu_memory_allocated_peak_bytes: int | None = None
    """torch.cuda.max_memory_allocated: tensors at their peak."""
    gpu_memory_reserved_peak_bytes: int | None = None
    """torch.cuda.max_memory_reserved: what PyTorch's caching allocator held from the driver at its peak."""
    gpu_utilization_mean: float | None = None
    """Mean of the sampled NVML utilisation, percent (None without pynvml or a GPU)."""
    gpu_utilization_peak: float | None = None
    epoch_seconds_mean: float | None = None
    """Mean seconds of the epochs trained in the interval (None when none were given)."""
    samples: int = 0
    """Sampling ticks taken (the CPU peak and cgroup working set rest on them)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        """The inverse of `to_dict`; unknown keys are ignored (a newer worker's record), missing ones raise."""
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise MicrofedError(f"not a usage record ({e}): {dict(data)}") from None


@dataclass(frozen=True)
class _Cgroup:
    """The memory cgroup of the container this process runs in."""

    version: int
    usage: Path
    stat: Path
    inactive_key: str
    peak: Path

    def working_set(self) -> int | None:
        usage = _read_int(self.usage)
        if usage is None:
            return None
        inactive = _stat_value(self.stat, self.inactive_key) or 0
        return max(0, usage - inactive)

    def peak_bytes(self) -> int | None:
        return _read_int(self.peak)


def find_cgroup(
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    root: Path = Path("/sys/fs/cgroup"),
    environ: Mapping[str, str] | None = None,
) -> _Cgroup | None:
    """The container's own memory cgroup, or None where what /sys/fs/cgroup shows is not (only) ours.

    cgroup v2: /proc/self/cgroup reads `0::/` when the process sits at the root of its cgroup namespace, which a
    container runtime gives each container; the host's real root cgroup has no memory.current, so a host
    process is never mistaken for a container. cgroup v1 has no such namespace by default: its memory hierarchy
    is trusted to be the container's only inside a Kubernetes pod (KUBERNETES_SERVICE_HOST set), where the
    runtime mounts the container's cgroup there. Elsewhere (a workstation, a CI sandbox) it may be a whole
    machine's, and the process's own peak is used instead.
    """
    env = os.environ if environ is None else environ
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    if "0::/" in lines and (root / "memory.current").is_file():
        return _Cgroup(2, root / "memory.current", root / "memory.stat", "inactive_file", root / "memory.peak")
    v1 = root / "memory"
    has_v1 = any("memory" in line.split(":")[1].split(",") for line in lines if line.count(":") >= 2)
    if has_v1 and env.get("KUBERNETES_SERVICE_HOST") and (v1 / "memory.usage_in_bytes").is_file():
        return _Cgroup(
            1,
            v1 / "memory.usage_in_bytes",
            v1 / "memory.stat",
            "total_inactive_file",
            v1 / "memory.max_usage_in_bytes",
        )
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat_value(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def _status_bytes(field: str, status: Path = Path("/proc/self/status")) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is no /proc."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _process_peak() -> tuple[int, str]:
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm, "process VmHWM"
    # ru_maxrss: KiB on Linux, bytes on macOS
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024, "process getrusage"


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _run_delays(tasks: Path = Path("/proc/self/task")) -> dict[str, int] | None:
    """Nanoseconds each thread of this process has waited runnable for a core; None without schedstat."""
    delays = {}
    try:
        for task in tasks.iterdir():
            try:
                delays[task.name] = int((task / "schedstat").read_text().split()[1])
            except FileNotFoundError:  # the thread exited while we looked
                continue
    except (OSError, ValueError, IndexError):
        return None
    return delays


class _Sampler:
    """The sampling thread's state; kept apart from the monitor so that a monitor dropped without `stop`
    (an exception in the worker) is collected and its thread ends."""

    def __init__(self, interval: float, cgroup: _Cgroup | None, gpu_index: int | None) -> None:
        self.interval = interval
        self.cgroup = cgroup
        self.gpu_index = gpu_index
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.samples = 0
        self.cpu_peak = 0.0
        self.window: tuple[float, float] = (time.perf_counter(), _cpu_seconds())
        self.cgroup_peak: int | None = None
        self.gpu_util: list[float] = []
        self.gpu_util_works = gpu_index is not None

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        now, cpu = time.perf_counter(), _cpu_seconds()
        working_set = self.cgroup.working_set() if self.cgroup else None
        util = self._gpu_utilization()
        with self.lock:
            self.samples += 1
            start, start_cpu = self.window
            if now - start >= PEAK_WINDOW_SECONDS:
                self.cpu_peak = max(self.cpu_peak, (cpu - start_cpu) / (now - start))
                self.window = (now, cpu)
            if working_set is not None:
                self.cgroup_peak = max(self.cgroup_peak or 0, working_set)
            if util is not None:
                self.gpu_util.append(util)

    def _gpu_utilization(self) -> float | None:
        if not self.gpu_util_works or self.gpu_index is None:
            return None
        try:
            return float(torch.cuda.utilization(self.gpu_index))
        except Exception:  # no pynvml/amdsmi, no NVML permission: utilisation is optional
            self.gpu_util_works = False
            return None


class UsageMonitor:
    """Measure this process's CPU, memory and GPU use from `start` to `stop` (or over a `with` block).

    with UsageMonitor(device) as monitor:
        train()
    record["usage"] = monitor.usage.to_dict()
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        *,
        interval: float = SAMPLE_SECONDS,
        cgroup: _Cgroup | str | None = "auto",
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise MicrofedError(f"sampling interval must be positive, got {interval}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._gpu_index: int | None = None
        if dev.type == "cuda" and torch.cuda.is_available():
            self._gpu_index = dev.index if dev.index is not None else torch.cuda.current_device()
        self._cgroup = find_cgroup() if cgroup == "auto" else cgroup if isinstance(cgroup, _Cgroup) else None
        self._interval = interval
        self._sampler: _Sampler | None = None
        self._thread: threading.Thread | None = None
        self._started = (0.0, 0.0)
        self._rss_start: int | None = None
        self._delays: dict[str, int] | None = None
        self._usage: Usage | None = None

    def start(self) -> UsageMonitor:
        if self._sampler is not None:
            raise MicrofedError("this UsageMonitor was started already")
        if self._gpu_index is not None:
            torch.cuda.reset_peak_memory_stats(self._gpu_index)
        self._rss_start = _status_bytes("VmRSS")
        self._delays = _run_delays()
        self._started = (time.perf_counter(), _cpu_seconds())
        self._sampler = _Sampler(self._interval, self._cgroup, self._gpu_index)
        self._sampler.sample()  # the cgroup's working set at the start counts too
        self._thread = threading.Thread(target=self._sampler.run, name="microfed-usage", daemon=True)
        self._thread.start()
        return self

    def stop(self, epoch_seconds: Iterable[float] = ()) -> Usage:
        """End the measurement; `epoch_seconds` (the worker's timed epochs) give the mean seconds per epoch."""
        if self._sampler is None or self._thread is None:
            raise MicrofedError("UsageMonitor.stop without start")
        if self._usage is not None:
            return self._usage
        s = self._sampler
        s.done.set()
        self._thread.join()
        s.sample()
        wall = time.perf_counter() - self._started[0]
        cpu = _cpu_seconds() - self._started[1]
        mean = cpu / wall if wall > 0 else 0.0
        wait, demand = None, None
        delays = _run_delays()
        if self._delays is not None and delays is not None:
            # threads that exited in between are missing: the wait is a lower bound
            wait = sum(max(0, d - self._delays.get(tid, 0)) for tid, d in delays.items()) / 1e9
            demand = (cpu + wait) / wall if wall > 0 else 0.0
        rss_peak, source = _process_peak()
        memory, chosen = rss_peak, source
        if s.cgroup_peak is not None and s.cgroup_peak > rss_peak:
            memory, chosen = s.cgroup_peak, f"cgroup v{s.cgroup.version} working set" if s.cgroup else source
        epochs = [float(x) for x in epoch_seconds]
        gpu: dict[str, Any] = {}
        if self._gpu_index is not None:
            gpu = {
                "gpu_name": torch.cuda.get_device_name(self._gpu_index),
                "gpu_memory_allocated_peak_bytes": int(torch.cuda.max_memory_allocated(self._gpu_index)),
                "gpu_memory_reserved_peak_bytes": int(torch.cuda.max_memory_reserved(self._gpu_index)),
                "gpu_utilization_mean": sum(s.gpu_util) / len(s.gpu_util) if s.gpu_util else None,
                "gpu_utilization_peak": max(s.gpu_util) if s.gpu_util else None,
            }
        self._usage = Usage(
            wall_seconds=wall,
            cpu_seconds=cpu,
            cpu_cores_mean=mean,
            cpu_cores_peak=max(s.cpu_peak, mean),
            cpu_wait_seconds=wait,
            cpu_cores_demand=demand,
            memory_peak_bytes=memory,
            memory_source=chosen,
            rss_start_bytes=self._rss_start,
            rss_peak_bytes=rss_peak if source == "process VmHWM" else None,
            cgroup_working_set_peak_bytes=s.cgroup_peak,
            cgroup_peak_bytes=s.cgroup.peak_bytes() if s.cgroup else None,
            epoch_seconds_mean=sum(epochs) / len(epochs) if epochs else None,
            samples=s.samples,
            **gpu,
        )
        return self._usage

    @property
    def usage(self) -> Usage:
        if self._usage is None:
            raise MicrofedError("UsageMonitor.usage before stop")
        return self._usage

    def __enter__(self) -> UsageMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if self._sampler is not None:
            self._sampler.done.set()
