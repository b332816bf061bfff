"""Submit a PyTorchJob, watch it, keep its logs, delete it: the cluster half of the train step.

What the real Training Operator v1.9 does, and what this launcher does about it (sources in job_status.py and
tests/local_operator.py):
- A job with a Master is `Succeeded` as soon as the Master pod succeeds, whatever the Workers do
  (pkg/controller.v1/pytorch/pytorchjob_controller.go, UpdateJobStatus). On `Succeeded` the launcher waits,
  bounded, until every replica's record exists (`outputs_missing`) before it deletes the job.
- With `restartPolicy: ExitCode` a pod exiting 128-255 is deleted and recreated under the same name
  (pkg/controller.v1/common/pod.go, ReconcilePods) and `backoffLimit` never triggers (pkg/core/job.go,
  PastBackoffLimit counts RestartCount of Running pods, which stays 0). The launcher counts recreations itself
  (new pod UIDs per replica) and fails the job after `max_restarts`, naming the exit (OOMKilled with the memory
  limit), with the replica's last log lines (saved as soon as a pod is seen terminated: the operator deletes it).
- A pod whose creation is rejected (service account, quota, webhook) exists only as a `FailedCreatePod` event on
  the job (pkg/controller.v1/control/pod_control.go); a container that cannot start waits with a reason
  (ImagePullBackOff, CreateContainerConfigError, ...). Either fails the step after `start_grace_seconds`.
- Pending pods while the autoscaler adds nodes are waiting; a temporary "no scale-up" (backoff after a failed
  scale-up, a pool not ready or at its maximum) is waited for, bounded; any other "no scale-up" fails at once.
- A transient API error (timeout, reset, 429, 5xx) is retried with backoff for `api_retry_seconds`.
- SIGTERM (KFP's Terminate, an eviction, a node drain) deletes the job before the step exits; so does every
  other way out of the watch (`finally`).
- The job's name comes from the run and the task only, so a KFP retry (a new pod) finds its predecessor's job:
  a running one is adopted; a finished one is deleted and created again (the workers resume from the round
  checkpoints).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from kubeflow.training import KubeflowOrgV1PyTorchJob

from microfed.training.job_status import FINISHED, job_state
from microfed.training.job_watch import (
    Api,
    JobFailed,
    JobTerminated,
    JobTimeout,
    JobUnschedulable,
    Watch,
    WatchPolicy,
)
from microfed.training.pytorchjob_backend import JobBackend, TrainingClientBackend

__all__ = [
    "JobBackend",
    "JobFailed",
    "JobOutcome",
    "JobTerminated",
    "JobTimeout",
    "JobUnschedulable",
    "TrainingClientBackend",
    "WatchPolicy",
    "run_pytorchjob",
]


@dataclass
class JobOutcome:
    name: str
    adopted: bool
    seconds: float
    waiting_for_capacity_seconds: float
    restarts: dict[str, int] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)


def run_pytorchjob(
    job: KubeflowOrgV1PyTorchJob,
    backend: JobBackend,
    *,
    policy: WatchPolicy,
    log_dir: str | Path,
    outputs_missing: Callable[[], list[int]] = list,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> JobOutcome:
    """Create (or adopt) `job`, watch it until it succeeds with every replica's outputs written, fails or times
    out, save its logs, and delete it whatever happens (SIGTERM included).

    `outputs_missing` returns the ranks whose outputs are not durable yet; it is asked after `Succeeded`.
    """
    name = str(job.metadata.name)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    api = Api(backend, policy, clock, sleep, log)
    start = clock()
    with _delete_on_sigterm(name):
        try:
            adopted = _claim(api, job, policy, clock, sleep, log)
            watch = Watch(api, name, policy, log_dir, log)
            _wait(watch, policy, start, clock, sleep)
            _confirm_outputs(watch, policy, outputs_missing, clock, sleep, log)
            logs = watch.save_all_logs()
            restarts = {pod: rep.restarts for pod, rep in watch.replicas.items() if rep.restarts}
            return JobOutcome(
                name=name,
                adopted=adopted,
                seconds=clock() - start,
                waiting_for_capacity_seconds=watch.capacity_waited,
                restarts=restarts,
                logs=logs,
            )
        finally:
            api("delete the job", lambda: backend.delete(name))


def _wait(watch: Watch, policy: WatchPolicy, start: float, clock: Callable[[], float], sleep: Any) -> None:
    while True:
        now = clock()
        state = watch.poll(now)
        if state == "Succeeded":
            return
        if now - start > policy.timeout_seconds:
            logs = watch.save_all_logs()
            raise JobTimeout(
                f"PyTorchJob {watch.name} did not finish in {policy.timeout_seconds:.0f} s (state {state}, "
                f"{watch.capacity_waited:.0f} s of it waiting for capacity); logs in {watch.log_dir} "
                f"({len(logs)} pods)",
                hint="raise the step's timeout_minutes, or lower rounds/epochs",
            )
        sleep(policy.poll_seconds)


def _confirm_outputs(
    watch: Watch, policy: WatchPolicy, outputs_missing: Callable[[], list[int]], clock: Any, sleep: Any, log: Any
) -> None:
    """The operator says Succeeded when the Master exits 0; Workers may still be writing. Wait for their records
    while any replica still runs, at most `outputs_grace_seconds`."""
    since = clock()
    while missing := outputs_missing():
        pods = watch.api("list the job's pods", lambda: watch.api.backend.pods(watch.name))
        running = [p.metadata.name for p in pods if p.status is not None and p.status.phase in ("Running", "Pending")]
        waited = clock() - since
        if not running or waited >= policy.outputs_grace_seconds:
            watch.save_all_logs()
            still = f"{len(running)} replica(s) still running after {waited:.0f} s" if running else "no replica runs"
            raise JobFailed(
                f"PyTorchJob {watch.name} succeeded, but the records of rank(s) {missing} are missing ({still})",
                hint="a worker exited before writing its outputs; read its log beside the micro-models",
            )
        if waited == 0:
            log(f"PyTorchJob {watch.name} succeeded; waiting for the records of rank(s) {missing} ({running} run)")
        sleep(min(policy.poll_seconds, 5.0))


def _claim(api: Api, job: KubeflowOrgV1PyTorchJob, policy: WatchPolicy, clock: Any, sleep: Any, log: Any) -> bool:
    """Create the job; when one of that name exists (a KFP retry of this step), adopt it while it runs, or delete a
    finished one and create the job again. Returns whether a running job was adopted."""
    name = str(job.metadata.name)
    if api("create the job", lambda: api.backend.create(job)):
        log(f"created PyTorchJob {name}")
        return False
    existing = api("read the job", lambda: api.backend.get(name))
    state = job_state(existing)[0] if existing is not None else "gone"
    if state not in FINISHED and existing is not None:
        log(f"adopted existing PyTorchJob {name} ({state}) of an earlier attempt of this step")
        return True
    log(f"PyTorchJob {name} of an earlier attempt is {state}: deleting it and creating it again")
    api("delete the job", lambda: api.backend.delete(name))
    since = clock()
    while api("read the job", lambda: api.backend.get(name)) is not None:
        if clock() - since > policy.api_retry_seconds:
            raise JobFailed(
                f"PyTorchJob {name} of an earlier attempt is still there {policy.api_retry_seconds:.0f} s after delete"
            )
        sleep(min(policy.poll_seconds, 2.0))
    if not api("create the job", lambda: api.backend.create(job)):
        raise JobFailed(f"PyTorchJob {name} was created again by someone else while this step replaced it")
    log(f"created PyTorchJob {name}")
    return False


@contextlib.contextmanager
def _delete_on_sigterm(name: str) -> Iterator[None]:
    """Turn SIGTERM into JobTerminated so that the `finally` deletes the job; Python's default would exit at once.
    Signal handlers can only be set from the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise JobTerminated(f"the train step was terminated (signal {signum}); deleting PyTorchJob {name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
