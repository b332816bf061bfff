"""Pure readers of what the Kubernetes API says about a PyTorchJob and its pods, as the SDKs deserialise it.

Each reading names the source whose behaviour it relies on:
- job conditions: kubeflow/training-operator v1.9.0, pkg/util/status.go (`setCondition`: once `Failed` is
  set nothing changes; `Running` and `Restarting` replace each other; `Succeeded`/`Failed` turn `Running` False);
- pod waiting reasons: kubernetes/kubernetes pkg/kubelet/images/types.go (ErrImagePull, ImagePullBackOff,
  InvalidImageName) and pkg/kubelet/kuberuntime (CreateContainerConfigError, CreateContainerError);
- autoscaler verdicts: kubernetes/autoscaler cluster-autoscaler/core/scaleup/orchestrator/skippedreasons.go
  (BackoffReason "in backoff after failed scale-up", MaxLimitReachedReason "max node group size reached",
  NotReadyReason "not ready for scale-up"), reported in a `NotTriggerScaleUp` event "pod didn't trigger
  scale-up: <count> <reason>, ..." (one entry per node group);
- in-place restarts (restartPolicy OnFailure/Always, a TrainJob's pods): kubernetes/kubernetes
  pkg/kubelet/kuberuntime/kuberuntime_manager.go (computePodActions restarts the container in the same pod) and
  pkg/kubelet/kubelet_pods.go (convertToAPIContainerStatuses: `restartCount` counts the restarts, `lastState.terminated`
  is the previous container's end; in CrashLoopBackOff the state is `waiting` and lastState is the container that just
  died, whose log `kubectl logs` and `kubectl logs -p` both return: validateContainerLogStatus);
- API errors: kubeflow-training 1.9 SDK, TrainingClient.get_job/create_job/delete_job/get_job_pods wrap an
  ApiException in a RuntimeError raised `from e`, a request timeout in TimeoutError, and anything else (a reset
  connection, urllib3's MaxRetryError) in a bare RuntimeError whose `__context__` is the original error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubernetes.client import V1Pod

__all__ = [
    "FINISHED",
    "Crash",
    "START_FAILURES",
    "TEMPORARY_NO_SCALE_UP",
    "Termination",
    "autoscaler_verdict",
    "crash_in_place",
    "is_transient",
    "job_state",
    "memory_limit",
    "replica_count",
    "start_failure",
    "termination",
    "unschedulable",
]

FINISHED = ("Succeeded", "Failed")
# Waiting reasons of a container that will not start on its own: a wrong image, a missing secret or config map.
START_FAILURES = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}
)
# A node group skipped for one of these reasons may take the pod later: wait (bounded) instead of failing.
TEMPORARY_NO_SCALE_UP = ("in backoff after failed scale-up", "not ready for scale-up", "max node group size reached")
_SCALE_UP, _NO_SCALE_UP = "TriggeredScaleUp", "NotTriggerScaleUp"


def job_state(job: Any) -> tuple[str, str]:
    """The job's state and that condition's message: Failed or Succeeded when set (they are final), else the
    latest true condition (Restarting, Running, Created), else Pending."""
    conditions = (job.status.conditions if job.status else None) or []
    true = [c for c in conditions if c.status == "True"]
    for final in ("Failed", "Succeeded"):
        for c in true:
            if c.type == final:
                return final, str(c.message or c.reason or "")
    if not true:
        return "Pending", ""
    return str(true[-1].type), str(true[-1].message or true[-1].reason or "")


def replica_count(job: Any) -> int:
    """Replicas the job asks for, over every replica type."""
    specs = (job.spec.pytorch_replica_specs if job.spec else None) or {}
    return sum(int(spec.replicas or 0) for spec in specs.values())


def unschedulable(pod: V1Pod) -> str | None:
    """The scheduler's message when `pod` is Pending and Unschedulable, else None."""
    if pod.status is None or pod.status.phase != "Pending":
        return None
    for cond in pod.status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
            return str(cond.message or "unschedulable")
    return None


def start_failure(pod: V1Pod) -> tuple[str, str] | None:
    """(reason, message) when a container of `pod` waits for a reason that does not clear by itself."""
    for cs in (pod.status.container_statuses if pod.status else None) or []:
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None and waiting.reason in START_FAILURES:
            return str(waiting.reason), str(waiting.message or "")
    return None


@dataclass(frozen=True)
class Termination:
    """How a replica's `pytorch` container ended."""

    exit_code: int
    reason: str  # Completed, Error, OOMKilled, ...
    finished_at: float  # seconds since the epoch; inf when the API did not say


def termination(pod: V1Pod) -> Termination | None:
    for cs in (pod.status.container_statuses if pod.status else None) or []:
        term = cs.state.terminated if cs.state else None
        if term is not None and term.exit_code is not None:
            return _termination(term)
    return None


@dataclass(frozen=True)
class Crash:
    """A container that ended non-zero and that the kubelet restarts in the same pod."""

    attempt: int  # which container of the pod it was: 0 the first, then one more per restart
    end: Termination
    log_is_previous: bool  # whether its log is `kubectl logs -p` (lastState) or the current one (state)


def crash_in_place(pod: V1Pod) -> Crash | None:
    """The latest crash of a container restarted in place (pod restartPolicy OnFailure or Always), else None. A pod
    with restartPolicy Never (a PyTorchJob's) ends in `state.terminated` and is never restarted: None."""
    if pod.spec is None or pod.spec.restart_policy not in ("OnFailure", "Always"):
        return None
    for cs in (pod.status.container_statuses if pod.status else None) or []:
        state, last, count = cs.state, cs.last_state, int(cs.restart_count or 0)
        if state is not None and state.terminated is not None and state.terminated.exit_code:
            return Crash(count, _termination(state.terminated), log_is_previous=False)
        if last is not None and last.terminated is not None and last.terminated.exit_code:
            waiting = state is not None and state.waiting is not None  # CrashLoopBackOff: not restarted yet
            return Crash(count if waiting else count - 1, _termination(last.terminated), log_is_previous=True)
    return None


def _termination(term: Any) -> Termination:
    when = term.finished_at.timestamp() if term.finished_at else float("inf")
    return Termination(int(term.exit_code), str(term.reason or ""), when)


def memory_limit(pod: V1Pod) -> str | None:
    """The `pytorch` container's memory limit as written in the pod spec (e.g. "4Gi")."""
    for c in (pod.spec.containers if pod.spec else None) or []:
        limits = (c.resources.limits if c.resources else None) or {}
        if "memory" in limits:
            return str(limits["memory"])
    return None


def autoscaler_verdict(events: list[tuple[str, str]]) -> str | None:
    """The message of the autoscaler's latest NotTriggerScaleUp for a pod, unless a scale-up came after it."""
    verdict = None
    for reason, message in events:
        if reason == _NO_SCALE_UP:
            verdict = message
        elif reason == _SCALE_UP:
            verdict = None
    return verdict


def is_transient(error: BaseException) -> bool:
    """Whether an API call's error may clear on retry: a timeout, a dropped connection, 429 or a 5xx."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        status = getattr(e, "status", None)
        if isinstance(status, int) and (status == 429 or status >= 500):
            return True
        if isinstance(e, TimeoutError | ConnectionError) or _is_urllib3_error(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _is_urllib3_error(error: BaseException) -> bool:
    module = type(error).__module__ or ""
    return module.startswith("urllib3")
