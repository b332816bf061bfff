"""Watching one training job (a PyTorchJob or a TrainJob): its state, its replicas' restarts, pods that never start,
capacity waits, logs.

The rules each check applies, and the sources of the behaviours they answer, are in pytorchjob_launch.py's and
trainjob_launch.py's docstrings, job_status.py and job_kinds.py (what differs between the two kinds). Restarts come
in two forms, both counted against `max_restarts` when the exit is 128-255 (killed, OOM-killed, peer lost): a pod
recreated under its name with a new uid (a PyTorchJob's, restartPolicy Never) and a container restarted in the same
pod (a TrainJob's, restartPolicy OnFailure). A container restarted in place after exit 1-127 is the worker's own
error: the Job controller would only restart it until backoffLimit, so the watch fails at once with its log.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kubernetes.client import V1Pod

from microfed.training.errors import MicrofedError
from microfed.training.io import atomic_write_bytes
from microfed.training.job_kinds import PYTORCHJOB, JobKind
from microfed.training.job_status import (
    TEMPORARY_NO_SCALE_UP,
    Crash,
    Termination,
    autoscaler_verdict,
    crash_in_place,
    is_transient,
    memory_limit,
    start_failure,
    termination,
    unschedulable,
)
from microfed.training.launch import EXIT_PEER_LOST
from microfed.training.layout import pod_log_file

__all__ = [
    "Api",
    "JobFailed",
    "JobTerminated",
    "JobTimeout",
    "JobUnschedulable",
    "Watch",
    "WatchPolicy",
    "WatchedBackend",
]

_T = TypeVar("_T")
_TAIL_LINES = 40
# The worker's exit code for an error it diagnosed itself (MicrofedError): it points at the cause.
_OWN_ERROR_EXIT = 2
_EXITED = re.compile(r"Pod: (\S+) exited with code (\d+)")


class WatchedBackend(Protocol):
    """The reads the watch makes (both kinds' backends have them)."""

    def get(self, name: str) -> Any: ...

    def pods(self, name: str) -> list[V1Pod]: ...

    def pod_log(self, pod: str, previous: bool = False) -> str: ...

    def events(self, name: str, uid: str | None = None) -> list[tuple[str, str]]: ...

    def delete(self, name: str) -> None: ...


class JobFailed(MicrofedError):
    """The job failed, restarted too often, or its pods never started; the message says which replica and
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
    replace_wait_seconds: float = 600.0
    """On a KFP retry that finds a finished job of an earlier attempt: how long to wait, after deleting it, for it
    and its dependents to be gone (their pods have their termination grace period) before creating it again."""
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
    # how each killed container ended: "<pod uid>" (recreated pods) or "<pod uid>#<attempt>" (restarts in place)
    retryable_exits: dict[str, Termination] = field(default_factory=dict)
    in_place: dict[str, int] = field(default_factory=dict)  # pod uid -> its container's restartCount
    last: Termination | None = None
    memory_limit: str | None = None
    start_failure_since: float | None = None

    @property
    def restarts(self) -> int:
        return max(len(self.uids) - 1 + sum(self.in_place.values()), len(self.retryable_exits))


class Api:
    """Backend calls with transient errors retried (exponential backoff, bounded in time)."""

    def __init__(self, backend: Any, policy: WatchPolicy, clock: Callable[[], float], sleep: Any, log: Any):
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
    """One job under watch: its state, its replicas, capacity waits, logs."""

    def __init__(
        self,
        api: Api,
        name: str,
        policy: WatchPolicy,
        log_dir: Path,
        log: Callable[[str], None],
        kind: JobKind = PYTORCHJOB,
    ):
        self.api, self.name, self.policy, self.log_dir, self.log = api, name, policy, log_dir, log
        self.kind = kind
        self.replicas: dict[str, _Replica] = {}
        self.logs: dict[str, Path] = {}
        self.pending_since: float | None = None
        self.capacity_waited = 0.0
        self.rejected_since: float | None = None

    def poll(self, now: float) -> str:
        job = self.api("read the job", lambda: self.api.backend.get(self.name))
        if job is None:
            raise JobFailed(
                f"{self.kind.name} {self.name} disappeared while it was being watched",
                hint="someone deleted it, or its TTL expired; rerun the step",
            )
        state, message = self.kind.state(job)
        pods = self.api("list the job's pods", lambda: self.api.backend.pods(self.name))
        self._observe(pods, now)
        if state in ("Failed", "Succeeded"):
            self._capacity_done(now)
            stale = self.api("read the job's objects", lambda: self.kind.own_final_state(job, self.api.backend))
            if stale is not None:
                raise JobFailed(
                    f"{self.kind.name} {self.name} shows {state}, but {stale}",
                    hint="the step deletes a finished job and waits for its objects to go before creating it again; "
                    f"someone re-created it sooner: delete it ({self.kind.describe} shows it) and retry",
                )
        if state == "Failed":
            raise self._failure(message, pods)
        if state == "Succeeded":
            return state
        self._check_restarts(self.kind.uid(job))
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
                    self.log(f"replica {name} was recreated under its name (restart {len(rep.uids)})")
                rep.uids.append(uid)
            rep.memory_limit = memory_limit(pod) or rep.memory_limit
            crash = crash_in_place(pod)
            if crash is not None:
                self._crashed_in_place(name, uid, rep, crash, pod)
                continue
            term = termination(pod)
            if term is None:
                continue
            if term.exit_code >= 128 and uid not in rep.retryable_exits:
                rep.retryable_exits[uid] = term
                self._save_log(name, suffix=f".restart-{len(rep.retryable_exits)}")
            if rep.last != term:
                rep.last = term
                self._save_log(name)

    def _crashed_in_place(self, name: str, uid: str, rep: _Replica, crash: Crash, pod: V1Pod) -> None:
        """A container restarted in the same pod: save the dead container's log now (a Job that reaches its
        backoffLimit deletes its pods, logs and all); exit 1-127 is the worker's own error and fails the job."""
        cs = (pod.status.container_statuses or [None])[0] if pod.status else None
        rep.in_place[uid] = max(rep.in_place.get(uid, 0), int(getattr(cs, "restart_count", 0) or 0))
        key = f"{uid}#{crash.attempt}"
        if key in rep.retryable_exits:
            return
        rep.last = crash.end
        if crash.end.exit_code >= 128:
            rep.retryable_exits[key] = crash.end
            suffix = f".restart-{len(rep.retryable_exits)}"
            self.log(f"replica {name} was killed ({_describe_exit(crash.end, rep.memory_limit, '')}) and restarted")
        else:
            suffix = ".crash"
        self._save_log(name, suffix=suffix, previous=crash.log_is_previous)
        if crash.end.exit_code < 128:
            self.save_all_logs()
            raise JobFailed(
                f"{self.kind.name} {self.name}: replica {name} failed with "
                f"{_describe_exit(crash.end, rep.memory_limit, self.policy.memory_note)} (the worker's own error: "
                f"the kubelet would only restart it until the Job's backoffLimit); its last lines:\n"
                f"{self._tail(name, suffix)}",
                hint="read the replica's log beside the micro-models; exit 2 is an error the worker diagnosed",
            )

    def _save_log(self, pod: str, suffix: str = "", previous: bool = False) -> None:
        def read() -> str:
            # keyword only when needed: the PyTorchJob backends' pods are never restarted in place
            return self.api.backend.pod_log(pod, previous=True) if previous else self.api.backend.pod_log(pod)

        try:
            text = self.api(f"read the log of {pod}", read)
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
            f"{self.kind.name} {self.name}: replica {name} was restarted {rep.restarts} times (limit "
            f"{self.policy.max_restarts}; {self.kind.restarts_note}); last exit: {why}; {todo}. A killed "
            f"container's log the step did not read in time is only in the cluster's log store (GKE: Cloud "
            f'Logging, resource.labels.pod_name="{name}"); the last lines the step could read:\n'
            f"{self._tail(name)}"
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

    def _tail(self, pod: str, suffix: str = "*") -> str:
        """The last lines of the newest saved log of `pod` that has any (a just-recreated replica's log is empty;
        a killed container's own log, when it was saved in time, says more)."""
        paths = sorted(self.log_dir.glob(pod_log_file(pod, suffix)), key=lambda p: p.stat().st_mtime_ns)
        texts = [text for path in paths if (text := path.read_text(errors="replace")).strip()]
        return _tail(texts[-1]) if texts else "(no log was saved)"

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
                    f"{self.kind.name} {self.name}: the container of {pod.metadata.name} cannot start: {reason}: "
                    f"{message or '(no message)'} (for {now - rep.start_failure_since:.0f} s)",
                    hint="check the worker_image parameter and that the nodes can pull it"
                    if "Image" in reason
                    else "check the secrets and config maps the pod refers to",
                )

    def _check_rejected(self, job: Any, pods: list[V1Pod], now: float) -> None:
        """Fewer pods than replicas and an event saying they cannot be created (job_kinds.py: which, per kind)."""
        if len(pods) >= self.kind.replicas(job):
            self.rejected_since = None
            return
        rejected = self.kind.rejections(job, self._events)
        if not rejected:
            return
        self.rejected_since = self.rejected_since if self.rejected_since is not None else now
        if now - self.rejected_since >= self.policy.start_grace_seconds:
            raise JobFailed(
                f"{self.kind.name} {self.name}: its controllers cannot create its pods: {rejected[-1]}",
                hint="a missing service account (service_account parameter), a ResourceQuota or an admission "
                f"webhook rejects them; see `{self.kind.describe}`",
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
                    f"{self.kind.name} {self.name}: pod {name} cannot be scheduled: {message}; the cluster autoscaler: "
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
                f"{self.kind.name} {self.name}: no capacity after {now - self.pending_since:.0f} s; the cluster "
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
        if pod is not None:
            name, term = str(pod.metadata.name), termination(pod)
        else:  # the pods are gone (a Job past its backoffLimit deletes them): the last exit the watch saw
            seen = [(n, r.last) for n, r in self.replicas.items() if r.last is not None and r.last.exit_code != 0]
            if not seen:
                return JobFailed(f"{self.kind.name} {self.name} failed: {message}; logs in {self.log_dir}")
            name, term = min(seen, key=lambda e: (e[1].exit_code == EXIT_PEER_LOST, -e[1].finished_at, e[0]))
        rep = self.replicas.get(name, _Replica())
        return JobFailed(
            f"{self.kind.name} {self.name} failed: {message}; replica {name}: "
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
