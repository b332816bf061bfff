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

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubeflow.training import KubeflowOrgV1PyTorchJob

from microfed.training.job_kinds import PYTORCHJOB
from microfed.training.job_run import JobOutcome, run_job
from microfed.training.job_status import FINISHED, job_state
from microfed.training.job_watch import (
    Api,
    JobFailed,
    JobTerminated,
    JobTimeout,
    JobUnschedulable,
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
    return run_job(
        PYTORCHJOB,
        str(job.metadata.name),
        lambda api: _claim(api, job, policy, clock, sleep, log),
        backend,
        policy=policy,
        log_dir=log_dir,
        outputs_missing=outputs_missing,
        clock=clock,
        sleep=sleep,
        log=log,
    )


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
