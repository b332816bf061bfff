"""Submit a PyTorchJob, wait for it, keep its logs, delete it: the cluster half of the train step.

What the public KFP launcher gets wrong and this does not: a job that ends `Failed` fails the step (with the
failing replica's log tail); the overall timeout is real; the job is deleted in a `finally`; a job that already
exists under our deterministic name (the same step attempt, restarted) is adopted, not recreated. Pods that
are Pending while the cluster autoscaler adds nodes are *waiting for capacity*; a pod that no node pool can
ever fit (the autoscaler says it will not scale up for it) fails fast with the scheduler's reason.

`JobBackend` is the narrow interface to the cluster; `TrainingClientBackend` implements it with the
kubeflow-training SDK's TrainingClient (and its kubernetes CoreV1Api for events).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubeflow.training import KubeflowOrgV1PyTorchJob
from kubernetes.client import V1Pod

from microfed.training.errors import MicrofedError
from microfed.training.io import atomic_write_bytes

__all__ = [
    "JobBackend",
    "JobFailed",
    "JobOutcome",
    "JobTimeout",
    "JobUnschedulable",
    "TrainingClientBackend",
    "run_pytorchjob",
]

_TAIL_LINES = 40
# The cluster autoscaler's verdicts on a Pending pod, as events on that pod.
_SCALE_UP = "TriggeredScaleUp"
_NO_SCALE_UP = "NotTriggerScaleUp"
# A NotTriggerScaleUp for this reason only means "not now": the pool exists but is at its maximum size.
_TEMPORARY_NO_SCALE_UP = "max node group size reached"


class JobFailed(MicrofedError):
    """The PyTorchJob ended `Failed`; the message holds the failing replica's log tail."""


class JobTimeout(MicrofedError):
    """The job did not finish within the step's timeout (it has been deleted)."""


class JobUnschedulable(MicrofedError):
    """A replica can never be scheduled: no node pool fits its request."""


class JobBackend(Protocol):
    """What the launcher needs from the cluster."""

    def create(self, job: KubeflowOrgV1PyTorchJob) -> bool:
        """Create the job; False when one of that name already exists (it is then adopted)."""
        ...

    def get(self, name: str) -> KubeflowOrgV1PyTorchJob | None: ...

    def pods(self, name: str) -> list[V1Pod]: ...

    def pod_log(self, pod: str) -> str: ...

    def pod_events(self, pod: str) -> list[tuple[str, str]]:
        """(reason, message) of the events on a pod, oldest first."""
        ...

    def delete(self, name: str) -> None:
        """Delete the job; no error when it is already gone."""
        ...


@dataclass
class JobOutcome:
    name: str
    adopted: bool
    seconds: float
    waiting_for_capacity_seconds: float
    logs: dict[str, Path] = field(default_factory=dict)


def _condition(job: KubeflowOrgV1PyTorchJob) -> tuple[str, str]:
    """The job's current state (the last condition whose status is True) and its message."""
    conditions = (job.status.conditions if job.status else None) or []
    current = [c for c in conditions if c.status == "True"]
    if not current:
        return "Pending", ""
    last = current[-1]
    return str(last.type), str(last.message or last.reason or "")


def _unschedulable(pod: V1Pod) -> str | None:
    """The scheduler's message when `pod` is Pending and Unschedulable, else None."""
    if pod.status is None or pod.status.phase != "Pending":
        return None
    for cond in pod.status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
            return str(cond.message or "unschedulable")
    return None


# The worker's exit code for an error it diagnosed itself (MicrofedError); peers that then lose a collective
# exit with other codes, so this one points at the cause.
_OWN_ERROR_EXIT = 2


def _failed_replica(pods: list[V1Pod]) -> V1Pod | None:
    """The replica to blame: one that reported its own error, else the first to exit non-zero (Kubernetes
    timestamps have one-second resolution, so ties go by name), else a Failed pod, else None."""
    terminated = []
    for pod in pods:
        for cs in (pod.status.container_statuses if pod.status else None) or []:
            term = cs.state.terminated if cs.state else None
            if term is not None and term.exit_code not in (0, None):
                when = term.finished_at.timestamp() if term.finished_at else float("inf")
                terminated.append((term.exit_code != _OWN_ERROR_EXIT, when, str(pod.metadata.name), pod))
    if terminated:
        return min(terminated, key=lambda t: t[:3])[3]
    failed = [p for p in pods if p.status is not None and p.status.phase == "Failed"]
    return failed[0] if failed else None


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


class _Waiter:
    """One poll of the job: state, capacity waits, unschedulable verdicts."""

    def __init__(self, backend: JobBackend, name: str, log: Callable[[str], None]) -> None:
        self.backend, self.name, self.log = backend, name, log
        self.pending_since: float | None = None
        self.waited = 0.0

    def poll(self, now: float) -> str:
        job = self.backend.get(self.name)
        if job is None:
            raise JobFailed(
                f"PyTorchJob {self.name} disappeared while it was being watched",
                hint="someone deleted it, or its TTL expired; rerun the step",
            )
        state, _ = _condition(job)
        if state in ("Succeeded", "Failed"):
            self._capacity_done(now)
            return state
        self._check_capacity(now)
        return state

    def _check_capacity(self, now: float) -> None:
        pending = [(p, msg) for p in self.backend.pods(self.name) if (msg := _unschedulable(p)) is not None]
        if not pending:
            self._capacity_done(now)
            return
        for pod, message in pending:
            verdict = self._autoscaler_verdict(pod.metadata.name)
            if verdict is not None and _TEMPORARY_NO_SCALE_UP not in verdict:
                raise JobUnschedulable(
                    f"PyTorchJob {self.name}: pod {pod.metadata.name} cannot be scheduled: {message}; "
                    f"the cluster autoscaler: {verdict}",
                    hint="no node pool fits the request: lower the resource plan, allow another accelerator, "
                    "or add a node pool that fits",
                )
        if self.pending_since is None:
            self.pending_since = now
            self.log(f"waiting for capacity: {len(pending)} pod(s) Pending while the cluster adds nodes")

    def _autoscaler_verdict(self, pod: str) -> str | None:
        """The message of the autoscaler's latest NotTriggerScaleUp for `pod`, unless a scale-up came after."""
        verdict = None
        for reason, message in self.backend.pod_events(pod):
            if reason == _NO_SCALE_UP:
                verdict = message
            elif reason == _SCALE_UP:
                verdict = None
        return verdict

    def _capacity_done(self, now: float) -> None:
        if self.pending_since is not None:
            self.waited += now - self.pending_since
            self.log(f"capacity arrived after {now - self.pending_since:.0f} s")
            self.pending_since = None


def _save_logs(backend: JobBackend, name: str, log_dir: Path) -> dict[str, Path]:
    """Every replica's log into log_dir (the step keeps them as an artifact); unreadable logs are noted."""
    saved = {}
    for pod in backend.pods(name):
        pod_name = pod.metadata.name
        try:
            text = backend.pod_log(pod_name)
        except Exception as e:  # a pod that never started has no log; say so in the file
            text = f"(no log: {e})\n"
        path = log_dir / f"{pod_name}.log"
        atomic_write_bytes(path, text.encode())
        saved[pod_name] = path
    return saved


def run_pytorchjob(
    job: KubeflowOrgV1PyTorchJob,
    backend: JobBackend,
    *,
    timeout_seconds: float,
    log_dir: str | Path,
    poll_seconds: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> JobOutcome:
    """Create (or adopt) `job`, wait until it succeeds, fails or times out, save its logs, delete it."""
    name = str(job.metadata.name)
    log_dir = Path(log_dir)
    start = clock()
    adopted = not backend.create(job)
    log(f"{'adopted existing' if adopted else 'created'} PyTorchJob {name}")
    waiter = _Waiter(backend, name, log)
    try:
        while True:
            now = clock()
            state = waiter.poll(now)
            if state in ("Succeeded", "Failed"):
                break
            if now - start > timeout_seconds:
                logs = _save_logs(backend, name, log_dir)
                raise JobTimeout(
                    f"PyTorchJob {name} did not finish in {timeout_seconds:.0f} s (state {state}, "
                    f"{waiter.waited:.0f} s of it waiting for capacity); logs in {log_dir} ({len(logs)} pods)",
                    hint="raise the step's timeout, or lower rounds/epochs",
                )
            sleep(poll_seconds)
        logs = _save_logs(backend, name, log_dir)
        if state == "Failed":
            raise _failure(backend, name, log_dir, logs)
        return JobOutcome(
            name=name, adopted=adopted, seconds=clock() - start, waiting_for_capacity_seconds=waiter.waited, logs=logs
        )
    finally:
        backend.delete(name)


def _failure(backend: JobBackend, name: str, log_dir: Path, logs: dict[str, Path]) -> JobFailed:
    job = backend.get(name)
    _, message = _condition(job) if job is not None else ("Failed", "")
    pod = _failed_replica(backend.pods(name))
    if pod is None:
        return JobFailed(f"PyTorchJob {name} failed: {message}; logs in {log_dir}")
    pod_name = pod.metadata.name
    tail = _tail(logs[pod_name].read_text()) if pod_name in logs else "(no log)"
    return JobFailed(f"PyTorchJob {name} failed: {message}; the last lines of replica {pod_name}:\n{tail}")


class TrainingClientBackend:
    """JobBackend over the kubeflow-training SDK (in-cluster config inside a KFP step, kube-config outside)."""

    def __init__(self, namespace: str, client: Any = None) -> None:
        if client is None:
            from kubeflow.training import TrainingClient

            client = TrainingClient(namespace=namespace)
        self.client = client
        self.namespace = namespace

    def create(self, job: KubeflowOrgV1PyTorchJob) -> bool:
        try:
            self.client.create_job(job=job, namespace=self.namespace)
        except RuntimeError as e:
            if _status(e) == 409:
                return False
            raise
        return True

    def get(self, name: str) -> KubeflowOrgV1PyTorchJob | None:
        try:
            job: KubeflowOrgV1PyTorchJob = self.client.get_job(name=name, namespace=self.namespace)
        except RuntimeError as e:
            if _status(e) == 404:
                return None
            raise
        return job

    def pods(self, name: str) -> list[V1Pod]:
        pods: list[V1Pod] = self.client.get_job_pods(name=name, namespace=self.namespace)
        return pods

    def pod_log(self, pod: str) -> str:
        text: str = self.client.core_api.read_namespaced_pod_log(
            name=pod, namespace=self.namespace, container="pytorch"
        )
        return text

    def pod_events(self, pod: str) -> list[tuple[str, str]]:
        events = self.client.core_api.list_namespaced_event(
            namespace=self.namespace, field_selector=f"involvedObject.name={pod}"
        )
        ordered = sorted(events.items, key=lambda e: str(e.last_timestamp or e.event_time or ""))
        return [(str(e.reason), str(e.message or "")) for e in ordered]

    def delete(self, name: str) -> None:
        try:
            self.client.delete_job(name=name, namespace=self.namespace)
        except RuntimeError as e:
            if _status(e) != 404:
                raise


def _status(error: BaseException) -> int | None:
    """The HTTP status of the ApiException that TrainingClient wrapped in a RuntimeError."""
    cause = error.__cause__
    status = getattr(cause, "status", None)
    return int(status) if status is not None else None
