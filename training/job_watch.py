"""Watching one PyTorchJob: its state, its replicas' recreations, pods that never start, capacity waits, logs.

The rules each check applies, and the sources of the behaviours they answer, are in pytorchjob_launch.py's
docstring and job_status.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kubeflow.training import KubeflowOrgV1PyTorchJob
from kubernetes.client import V1Pod

from microfed.training.errors import MicrofedError
from microfed.training.io import atomic_write_bytes
from microfed.training.job_status import (
    TEMPORARY_NO_SCALE_UP,
    Termination,
    autoscaler_verdict,
    is_transient,
    job_state,
    memory_limit,
    replica_count,
    start_failure,
    termination,
    unschedulable,
)
from microfed.training.launch import EXIT_PEER_LOST
from microfed.training.layout import pod_log_file
from microfed.training.pytorchjob_backend import JobBackend

__all__ = ["Api", "JobFailed", "JobTerminated", "JobTimeout", "JobUnschedulable", "Watch", "WatchPolicy"]

_T = TypeVar("_T")
_TAIL_LINES = 40
# The worker's exit code for an error it diagnosed itself (MicrofedError): it points at the cause.
_OWN_ERROR_EXIT = 2
_EXITED = re.compile(r"Pod: (\S+) exited with code (\d+)")


class JobFailed(MicrofedError):
    """The PyTorchJob failed, restarted too often, or its pods never started; the message says which replica and
    why, with its log tail."""


class JobTimeout(MicrofedError):
    """The job did not finish within the step's timeout (it has been deleted)."""


class JobUnschedulable(MicrofedError):
    """A replica cannot be scheduled: no node pool fits it, or capacity did not come within the bound."""


class JobTerminated(MicrofedError):
    """The step received SIGTERM (KFP Terminate, eviction, node drain); the job has been deleted."""


@dataclass(frozen=True, kw_only=True)
class WatchPolicy:
    """How long the launcher waits for what, and how often it looks."""

    timeout_seconds: float
    """Overall wait for the job, capacity waits included."""
    poll_seconds: float = 10.0
    """How often the job's state is read."""
    max_restarts: int = 3
    """Recreations of one replica (exit 128-255: killed, OOM-killed, peer lost) before the job is failed; the
    operator itself never stops recreating (same default as the local launcher)."""
    start_grace_seconds: float = 180.0
    """How long a pod may stay unable to start (image pull, config error, rejected creation) before failing."""
    capacity_wait_seconds: float = 1800.0
    """How long a temporary "no scale-up" (autoscaler backoff, pool not ready or at its maximum) is waited for."""
    api_retry_seconds: float = 300.0
    """How long transient API errors are retried before the step gives up."""
    outputs_grace_seconds: float = 600.0
    """After `Succeeded`: how long to wait for every replica's record to appear."""
    memory_note: str = ""
    """What the plan expected of a replica's memory (named when a replica is OOM-killed)."""

    def __post_init__(self) -> None:
        for name in ("timeout_seconds", "poll_seconds", "start_grace_seconds", "capacity_wait_seconds"):
            if getattr(self, name) <= 0:
                raise MicrofedError(f"WatchPolicy.{name} must be > 0, got {getattr(self, name)}")
        if self.max_restarts < 0:
            raise MicrofedError(f"WatchPolicy.max_restarts must be >= 0, got {self.max_restarts}")


@dataclass
class _Replica:
    """What the launcher has seen of one replica (pod name) across its recreations."""

    uids: list[str] = field(default_factory=list)
    retryable_exits: dict[str, Termination] = field(default_factory=dict)  # uid -> how that pod ended
    last: Termination | None = None
    memory_limit: str | None = None
    start_failure_since: float | None = None

    @property
    def restarts(self) -> int:
        return max(len(self.uids) - 1, len(self.retryable_exits))


class Api:
    """Backend calls with transient errors retried (exponential backoff, bounded in time)."""

    def __init__(self, backend: JobBackend, policy: WatchPolicy, clock: Callable[[], float], sleep: Any, log: Any):
        self.backend, self.policy, self.clock, self.sleep, self.log = backend, policy, clock, sleep, log

    def __call__(self, what: str, call: Callable[[], _T]) -> _T:
        start, delay = self.clock(), 1.0
        while True:
            try:
                return call()
            except Exception as e:
                if not is_transient(e) or self.clock() - start >= self.policy.api_retry_seconds:
                    raise
                self.log(f"Kubernetes API: {what} failed ({_first_line(e)}); retrying in {delay:.0f} s")
                self.sleep(delay)
                delay = min(delay * 2, 30.0)


class Watch:
    """One PyTorchJob under watch: its state, its replicas, capacity waits, logs."""

    def __init__(self, api: Api, name: str, policy: WatchPolicy, log_dir: Path, log: Callable[[str], None]):
        self.api, self.name, self.policy, self.log_dir, self.log = api, name, policy, log_dir, log
        self.replicas: dict[str, _Replica] = {}
        self.logs: dict[str, Path] = {}
        self.pending_since: float | None = None
        self.capacity_waited = 0.0
        self.rejected_since: float | None = None

    def poll(self, now: float) -> str:
        job = self.api("read the job", lambda: self.api.backend.get(self.name))
        if job is None:
            raise JobFailed(
                f"PyTorchJob {self.name} disappeared while it was being watched",
                hint="someone deleted it, or its TTL expired; rerun the step",
            )
        state, message = job_state(job)
        pods = self.api("list the job's pods", lambda: self.api.backend.pods(self.name))
        self._observe(pods, now)
        if state == "Failed":
            self._capacity_done(now)
            raise self._failure(message, pods)
        if state == "Succeeded":
            self._capacity_done(now)
            return state
        self._check_restarts(job.metadata.uid)
        self._check_start(pods, now)
        self._check_rejected(job, pods, now)
        self._check_capacity(pods, now)
        return state

    # --- replicas ----------------------------------------------------------------------------------------

    def _observe(self, pods: list[V1Pod], now: float) -> None:
        """Note new pod UIDs (recreations) and terminations; save a terminated pod's log before it is deleted."""
        for pod in pods:
            name, uid = str(pod.metadata.name), str(pod.metadata.uid or pod.metadata.name)
            rep = self.replicas.setdefault(name, _Replica())
            if uid not in rep.uids:
                if rep.uids:
                    self.log(f"replica {name} was recreated by the operator (restart {len(rep.uids)})")
                rep.uids.append(uid)
            rep.memory_limit = memory_limit(pod) or rep.memory_limit
            term = termination(pod)
            if term is None:
                continue
            if term.exit_code >= 128 and uid not in rep.retryable_exits:
                rep.retryable_exits[uid] = term
                self._save_log(name, suffix=f".restart-{len(rep.retryable_exits)}")
            if rep.last != term:
                rep.last = term
                self._save_log(name)

    def _save_log(self, pod: str, suffix: str = "") -> None:
        try:
            text = self.api(f"read the log of {pod}", lambda: self.api.backend.pod_log(pod))
        except Exception as e:  # a pod that never started, or is already gone, has no log: say so in the file
            text = f"(no log: {_first_line(e)})\n"
        path = self.log_dir / pod_log_file(pod, suffix)
        atomic_write_bytes(path, text.encode())
        if not suffix:
            self.logs[pod] = path

    def save_all_logs(self) -> dict[str, Path]:
        for pod in self.api("list the job's pods", lambda: self.api.backend.pods(self.name)):
            self._save_log(str(pod.metadata.name))
        return self.logs

    def _check_restarts(self, job_uid: str | None) -> None:
        over = [n for n, r in self.replicas.items() if r.restarts > self.policy.max_restarts]
        if not over:
            return
        exits = {n: self._last_exit(n, job_uid) for n in over}

        def blame(pod: str) -> tuple[bool, str]:
            # a replica OOM-killed or crashed takes its peers down with it (they exit 200, peer lost): the cause first
            last = exits[pod]
            return (last is None or last.exit_code == EXIT_PEER_LOST, pod)

        name = min(over, key=blame)
        rep, last = self.replicas[name], exits[name]
        self._save_log(name)  # the running incarnation's log: it has resumed where the killed one stopped
        why = _describe_exit(last, rep.memory_limit, self.policy.memory_note)
        todo = (
            "raise the memory plan or lower batch_size"
            if last is not None and last.exit_code == 137
            else "read the replica's log; exit 200 means a peer was lost"
        )
        raise JobFailed(
            f"PyTorchJob {self.name}: replica {name} was restarted {rep.restarts} times (limit "
            f"{self.policy.max_restarts}; the operator would go on until activeDeadlineSeconds); last exit: "
            f"{why}; {todo}. The operator deletes a killed pod at once, so its own log is only in the "
            f'cluster\'s log store (GKE: Cloud Logging, resource.labels.pod_name="{name}"); the last lines '
            f"the step could read:\n{self._tail(name)}"
        )

    def _last_exit(self, pod: str, job_uid: str | None) -> Termination | None:
        rep = self.replicas[pod]
        last = list(rep.retryable_exits.values())[-1] if rep.retryable_exits else None
        return last or self._exit_from_events(pod, job_uid) or rep.last

    def _exit_from_events(self, pod: str, job_uid: str | None) -> Termination | None:
        """The exit code in the operator's latest `ExitedWithCode` event for `pod` ("Pod: <ns>.<pod> exited with
        code <n>", common/pod.go ReconcilePods): all that is left of a pod deleted between two polls."""
        code = None
        for reason, message in self._events(self.name, job_uid):
            found = _EXITED.fullmatch(message) if reason == "ExitedWithCode" else None
            if found is not None and found.group(1).endswith(f".{pod}"):
                code = int(found.group(2))
        return Termination(code, "", float("inf")) if code is not None else None

    def _tail(self, pod: str) -> str:
        """The last lines of the newest saved log of `pod` (a restarted pod's own log, when it was saved)."""
        paths = sorted(self.log_dir.glob(pod_log_file(pod, "*")), key=lambda p: p.stat().st_mtime_ns)
        return _tail(paths[-1].read_text(errors="replace")) if paths else "(no log was saved)"

    # --- pods that never start ---------------------------------------------------------------------------

    def _check_start(self, pods: list[V1Pod], now: float) -> None:
        for pod in pods:
            rep = self.replicas[str(pod.metadata.name)]
            failure = start_failure(pod)
            if failure is None:
                rep.start_failure_since = None
                continue
            rep.start_failure_since = rep.start_failure_since if rep.start_failure_since is not None else now
            if now - rep.start_failure_since >= self.policy.start_grace_seconds:
                reason, message = failure
                raise JobFailed(
                    f"PyTorchJob {self.name}: the container of {pod.metadata.name} cannot start: {reason}: "
                    f"{message or '(no message)'} (for {now - rep.start_failure_since:.0f} s)",
                    hint="check the worker_image parameter and that the nodes can pull it"
                    if "Image" in reason
                    else "check the secrets and config maps the pod refers to",
                )

    def _check_rejected(self, job: KubeflowOrgV1PyTorchJob, pods: list[V1Pod], now: float) -> None:
        """Fewer pods than replicas and a FailedCreatePod event on the job: the API server rejects the pods."""
        if len(pods) >= replica_count(job):
            self.rejected_since = None
            return
        # events outlive their job: only this job's (a replaced predecessor's have another uid)
        rejected = [m for reason, m in self._events(self.name, job.metadata.uid) if reason == "FailedCreatePod"]
        if not rejected:
            return
        self.rejected_since = self.rejected_since if self.rejected_since is not None else now
        if now - self.rejected_since >= self.policy.start_grace_seconds:
            raise JobFailed(
                f"PyTorchJob {self.name}: the operator cannot create its pods: {rejected[-1]}",
                hint="a missing service account (service_account parameter), a ResourceQuota or an admission "
                "webhook rejects them; see `kubectl describe pytorchjob`",
            )

    # --- capacity ----------------------------------------------------------------------------------------

    def _check_capacity(self, pods: list[V1Pod], now: float) -> None:
        pending = [(p, msg) for p in pods if (msg := unschedulable(p)) is not None]
        if not pending:
            self._capacity_done(now)
            return
        temporary = None
        for pod, message in pending:
            name = str(pod.metadata.name)
            verdict = autoscaler_verdict(self._events(name))
            if verdict is None:
                continue
            if not any(reason in verdict for reason in TEMPORARY_NO_SCALE_UP):
                raise JobUnschedulable(
                    f"PyTorchJob {self.name}: pod {name} cannot be scheduled: {message}; the cluster autoscaler: "
                    f"{verdict}",
                    hint="no node pool fits the request: lower the resource plan, allow another accelerator, "
                    "or add a node pool that fits",
                )
            temporary = verdict
        if self.pending_since is None:
            self.pending_since = now
            self.log(f"waiting for capacity: {len(pending)} pod(s) Pending while the cluster adds nodes")
        if temporary is not None and now - self.pending_since >= self.policy.capacity_wait_seconds:
            raise JobUnschedulable(
                f"PyTorchJob {self.name}: no capacity after {now - self.pending_since:.0f} s; the cluster "
                f"autoscaler: {temporary}",
                hint="Spot or GPU capacity is short in this zone, or the pool is at its maximum: raise "
                "cpu_max_nodes/gpu_max_nodes in infra/, allow another accelerator, or retry later",
            )

    def _events(self, name: str, uid: str | None = None) -> list[tuple[str, str]]:
        return self.api(f"read the events of {name}", lambda: self.api.backend.events(name, uid))

    def _capacity_done(self, now: float) -> None:
        if self.pending_since is not None:
            self.capacity_waited += now - self.pending_since
            self.log(f"capacity arrived after {now - self.pending_since:.0f} s")
            self.pending_since = None

    # --- failure -----------------------------------------------------------------------------------------

    def _failure(self, message: str, pods: list[V1Pod]) -> JobFailed:
        self.save_all_logs()
        pod = _failed_replica(pods)
        if pod is None:
            return JobFailed(f"PyTorchJob {self.name} failed: {message}; logs in {self.log_dir}")
        name = str(pod.metadata.name)
        term = termination(pod)
        rep = self.replicas.get(name, _Replica())
        return JobFailed(
            f"PyTorchJob {self.name} failed: {message}; replica {name}: "
            f"{_describe_exit(term, rep.memory_limit, self.policy.memory_note)}; its last lines:\n{self._tail(name)}"
        )


def _failed_replica(pods: list[V1Pod]) -> V1Pod | None:
    """The replica to blame: one that reported its own error, else the first to exit non-zero (Kubernetes
    timestamps have one-second resolution, so ties go by name), else a Failed pod, else None."""
    ended = [(t, p) for p in pods if (t := termination(p)) is not None and t.exit_code != 0]
    if ended:
        key = min(ended, key=lambda e: (e[0].exit_code != _OWN_ERROR_EXIT, e[0].finished_at, str(e[1].metadata.name)))
        return key[1]
    failed = [p for p in pods if p.status is not None and p.status.phase == "Failed"]
    return failed[0] if failed else None


def _describe_exit(term: Termination | None, limit: str | None, memory_note: str) -> str:
    if term is None:
        return "no exit recorded"
    text = f"exit code {term.exit_code}" + (f" ({term.reason})" if term.reason else "")
    note = f"; {memory_note}" if memory_note else ""
    if term.reason == "OOMKilled":
        text += f": out of memory at its limit of {limit or 'unknown'}{note}"
    elif term.exit_code == 137:  # SIGKILL, the reason unknown (the pod was gone before it was seen)
        text += f" (SIGKILL: the OOM killer at its memory limit of {limit or 'unknown'}, or a preemption{note})"
    return text


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
