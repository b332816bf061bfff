"""Submit a TrainJob (Kubeflow Trainer v2), watch it, keep its logs, delete it: the cluster half of the train step on
a platform that serves TrainJobs. The guarantees are the PyTorchJob launcher's; the run loop and the watch are
shared (job_run.py, job_watch.py), and job_kinds.py reads the TrainJob.

What Kubeflow Trainer v2.3.0, JobSet v0.12.0 and the Kubernetes Job controller do, and what this launcher does about
it (sources in tests/trainer_standin.py, the stand-in that reproduces them):
- The TrainJob has NO condition while it runs; the JobSet's `Completed` becomes `Complete`, its `Failed` `Failed`
  (trainer pkg/runtime/framework/plugins/jobset/jobset.go :: Status). With successPolicy All, `Complete` means every
  node exited 0; the launcher still checks every rank's record (`outputs_missing`) before it deletes the job.
- The pods run under restartPolicy OnFailure: a container that exits non-zero is restarted IN PLACE by the kubelet
  (restartCount + 1, lastState.terminated), until the restartCounts of the Job's pods sum to backoffLimit 6; then
  the Job fails and deletes its pods, logs and all (kubernetes pkg/controller/job/job_controller.go ::
  pastBackoffLimitOnFailure, deleteActivePods). So the watch reads each restart as it happens: exit 1-127 is the
  worker's own error and fails the step at once with that container's log (`kubectl logs -p`); exit 128-255
  (killed, OOM-killed, peer lost) counts against `max_restarts`, as a recreated PyTorchJob replica does. Every dead
  container's log is saved when its restart is seen.
- Pods the API server rejects show only as the Job controller's `FailedCreate` events on Job `<name>-node-0`;
  objects the trainer cannot build (a JobSet refused by its webhook) only as `TrainJobResourcesCreationFailed`
  events on the TrainJob; images that cannot be pulled as the container's waiting reason. Each fails the step after
  `start_grace_seconds`.
- The job's name comes from the run and the task only, so a KFP retry (a new pod) finds its predecessor's TrainJob.
  A running one is adopted. A finished one is deleted, and the launcher waits until the TrainJob, its JobSet and
  its `<name>-runtime-snapshot` ConfigMap are all gone before creating it again: a TrainJob created sooner copies
  the status of the old JobSet (the trainer looks the JobSet up by name, owner unchecked; a stale `Complete` is
  never removed) and cannot build its own objects while the old snapshot exists (snapshot.go :: getRuntimeSnapshot).
  A final state is accepted only when the JobSet it was copied from belongs to this TrainJob.
- SIGTERM (KFP's Terminate, an eviction, a node drain) and every other way out delete the TrainJob (Foreground).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microfed.training.job_kinds import TRAINJOB, trainjob_state
from microfed.training.job_run import JobOutcome, run_job
from microfed.training.job_status import FINISHED
from microfed.training.job_watch import Api, JobFailed, WatchPolicy
from microfed.training.trainjob_backend import KubernetesTrainJobBackend, TrainJobBackend, snapshot_name

__all__ = ["KubernetesTrainJobBackend", "TrainJobBackend", "run_trainjob"]


def run_trainjob(
    manifest: dict[str, Any],
    backend: TrainJobBackend,
    *,
    policy: WatchPolicy,
    log_dir: str | Path,
    outputs_missing: Callable[[], list[int]] = list,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> JobOutcome:
    """Create (or adopt) the TrainJob `manifest` (microfed.training.trainjob.build_trainjob), watch it until it
    succeeds with every node's outputs written, fails or times out, save its logs, and delete it whatever happens
    (SIGTERM included). The same contract as run_pytorchjob.

    `outputs_missing` returns the ranks whose outputs are not durable yet; it is asked after `Complete`.
    """
    return run_job(
        TRAINJOB,
        str(manifest["metadata"]["name"]),
        lambda api: _claim(api, manifest, policy, clock, sleep, log),
        backend,
        policy=policy,
        log_dir=log_dir,
        outputs_missing=outputs_missing,
        clock=clock,
        sleep=sleep,
        log=log,
    )


def _claim(api: Api, manifest: dict[str, Any], policy: WatchPolicy, clock: Any, sleep: Any, log: Any) -> bool:
    """Create the TrainJob; when one of that name exists (a KFP retry of this step), adopt it while it runs, or
    delete a finished one (or one being deleted) and create it again once it and its objects are gone. Returns
    whether a running TrainJob was adopted."""
    name = str(manifest["metadata"]["name"])
    backend = api.backend
    if api("create the TrainJob", lambda: backend.create(manifest)):
        log(f"created TrainJob {name}")
        _check_kept(api, manifest)
        return False
    existing = api("read the TrainJob", lambda: backend.get(name))
    state = trainjob_state(existing)[0] if existing is not None else "gone"
    deleting = existing is not None and bool((existing.get("metadata") or {}).get("deletionTimestamp"))
    if existing is not None and state not in FINISHED and not deleting:
        log(f"adopted existing TrainJob {name} of an earlier attempt of this step (no final condition yet)")
        return True
    log(
        f"TrainJob {name} of an earlier attempt is {'being deleted' if deleting else state}: deleting it, waiting "
        "for its JobSet and runtime snapshot to go, then creating it again"
    )
    api("delete the TrainJob", lambda: backend.delete(name))
    _wait_gone(api, name, policy, clock, sleep)
    if not api("create the TrainJob", lambda: backend.create(manifest)):
        raise JobFailed(f"TrainJob {name} was created again by someone else while this step replaced it")
    log(f"created TrainJob {name}")
    _check_kept(api, manifest)
    return False


def _check_kept(api: Api, manifest: dict[str, Any]) -> None:
    """Refuse a TrainJob whose API server dropped the pod settings. The API server prunes fields its CRD's schema
    does not declare, silently (apiextensions-apiserver, structural schema pruning): Trainer v2.0 and v2.1 (Kubeflow
    1.11 ships v2.1.0) have no `spec.runtimePatches` (their TrainJob CRD has `podTemplateOverrides` instead;
    kubeflow/trainer v2.1.0 manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml), so the service account,
    tolerations and node selector would be lost and the pods would never reach a training node."""
    name = str(manifest["metadata"]["name"])
    sent = (manifest.get("spec") or {}).get("runtimePatches")
    if not sent:
        return
    stored = api("read the TrainJob", lambda: api.backend.get(name))
    if stored is not None and not (stored.get("spec") or {}).get("runtimePatches"):
        raise JobFailed(
            f"TrainJob {name}: the API server dropped spec.runtimePatches (the pods' service account, tolerations "
            "and node selector): this cluster's Kubeflow Trainer is older than v2.2",
            hint="upgrade Kubeflow Trainer to v2.2 or later (infra/ installs v2.3.0), or run launcher=pytorchjob on "
            "a cluster with the Training Operator v1",
        )


def _wait_gone(api: Api, name: str, policy: WatchPolicy, clock: Any, sleep: Any) -> None:
    """Until the TrainJob, its JobSet and its runtime snapshot are all gone, at most `replace_wait_seconds`."""
    backend, since = api.backend, clock()
    checks = (
        (f"TrainJob {name}", lambda: backend.get(name)),
        (f"JobSet {name}", lambda: backend.jobset(name)),
        (f"ConfigMap {snapshot_name(name)}", lambda: backend.config_map(snapshot_name(name))),
    )
    while left := [what for what, read in checks if api(f"read {what}", read) is not None]:
        if clock() - since > policy.replace_wait_seconds:
            raise JobFailed(
                f"TrainJob {name} of an earlier attempt was deleted {policy.replace_wait_seconds:.0f} s ago, but "
                f"{', '.join(left)} still exist(s)",
                hint="the garbage collector has not deleted them (a finalizer, or pods that do not terminate); "
                f"`kubectl get trainjob,jobset {name}` and `kubectl get configmap {snapshot_name(name)}` show what "
                "is left",
            )
        sleep(min(policy.poll_seconds, 2.0))
