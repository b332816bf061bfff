"""What differs between the two kinds of training job the launcher watches, as a small adapter per kind.

The watch (job_watch.py) and the launcher's run loop (job_run.py) are the same for both kinds; a `JobKind` says how
to read one kind's object and where its controllers report what the watch needs:

- PyTorchJob (Training Operator v1.9, `kubeflow.org/v1`, the kubeflow-training SDK's model objects): state from its
  conditions (job_status.job_state; pkg/util/status.go), replicas from `pytorchReplicaSpecs`, pods rejected by the
  API server as `FailedCreatePod` events on the job (pkg/controller.v1/control/pod_control.go :: createPod).
- TrainJob (Kubeflow Trainer v2.3.0, `trainer.kubeflow.org/v1alpha1`, a dict as CustomObjectsApi returns it): the
  controller copies the JobSet's `Completed` as `Complete` and its `Failed` as `Failed`, and sets NO condition while
  it runs (pkg/runtime/framework/plugins/jobset/jobset.go :: Status; pkg/controller/trainjob_controller.go ::
  Reconcile); replicas are `trainer.numNodes` (torch.go :: EnforceMLPolicy). Pods the API server rejects show as the
  Job controller's `FailedCreate` event ("Error creating: ...") on the Job `<name>-node-0`
  (kubernetes pkg/controller/controller_utils.go :: RealPodControl.CreatePods, FailedCreatePodReason), and objects
  the trainer cannot build (a JobSet its webhook refuses, a runtime snapshot of another owner) as
  `TrainJobResourcesCreationFailed` events on the TrainJob (trainjob_controller.go :: Reconcile): neither ever
  becomes a condition. The trainer copies the status of whatever JobSet carries the TrainJob's name, its owner
  unchecked (jobset.go :: Status), so a final state only counts when that JobSet is this TrainJob's
  (`own_final_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from microfed.training.job_status import job_state, replica_count

__all__ = ["PYTORCHJOB", "TRAINJOB", "Events", "JobKind", "trainjob_state"]

Events = Callable[[str, str | None], list[tuple[str, str]]]
"""events(object name, uid or None) -> [(reason, message)], oldest first."""


@dataclass(frozen=True)
class JobKind:
    """How the watch reads one kind of training job."""

    name: str
    """The kind, as messages name it."""
    state: Callable[[Any], tuple[str, str]]
    """(Pending | Running | Restarting | Succeeded | Failed, the message) of the job object."""
    replicas: Callable[[Any], int]
    """How many pods the job asks for."""
    uid: Callable[[Any], str | None]
    rejections: Callable[[Any, Events], list[str]]
    """Messages of the events saying that the job's pods or objects cannot be created, oldest first."""
    own_final_state: Callable[[Any, Any], str | None]
    """(job, backend) -> None when the job's final state is its own, else why it is not."""
    restarts_note: str
    """What the controllers would do about a replica that keeps being killed (for the restart-limit message)."""
    describe: str
    """The kubectl command that shows the job's events."""


def _pytorchjob_rejections(job: Any, events: Events) -> list[str]:
    # events outlive their job: only this job's (a replaced predecessor's have another uid)
    return [m for reason, m in events(str(job.metadata.name), job.metadata.uid) if reason == "FailedCreatePod"]


PYTORCHJOB = JobKind(
    name="PyTorchJob",
    state=job_state,
    replicas=replica_count,
    uid=lambda job: job.metadata.uid,
    rejections=_pytorchjob_rejections,
    own_final_state=lambda job, backend: None,
    restarts_note="the operator would go on until activeDeadlineSeconds; it deletes a killed pod at once",
    describe="kubectl describe pytorchjob",
)


def trainjob_state(trainjob: dict[str, Any]) -> tuple[str, str]:
    """Failed or Succeeded from the TrainJob's `Failed` / `Complete` condition, else Running (it has no other)."""
    conditions = [c for c in (trainjob.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    for ctype, state in (("Failed", "Failed"), ("Complete", "Succeeded")):
        for c in conditions:
            if c.get("type") == ctype:
                return state, str(c.get("message") or c.get("reason") or "")
    return "Running", ""


def _trainjob_replicas(trainjob: dict[str, Any]) -> int:
    return int(((trainjob.get("spec") or {}).get("trainer") or {}).get("numNodes") or 1)


def _trainjob_uid(trainjob: dict[str, Any]) -> str | None:
    uid = (trainjob.get("metadata") or {}).get("uid")
    return str(uid) if uid else None


def _trainjob_rejections(trainjob: dict[str, Any], events: Events) -> list[str]:
    name = str(trainjob["metadata"]["name"])
    # The Job's uid is not known here; a replaced predecessor's Job events may be listed too, which only matters
    # while fewer pods than nodes exist for start_grace_seconds (the watch's rule).
    pods = [m for reason, m in events(f"{name}-node-0", None) if reason == "FailedCreate"]
    objects = [m for reason, m in events(name, _trainjob_uid(trainjob)) if reason == "TrainJobResourcesCreationFailed"]
    return objects + pods


def _trainjob_own_final_state(trainjob: dict[str, Any], backend: Any) -> str | None:
    name, uid = str(trainjob["metadata"]["name"]), _trainjob_uid(trainjob)
    jobset = backend.jobset(name)
    if jobset is None:
        return None  # deleted since (by whom: the message says nothing more can be known)
    owners = (jobset.get("metadata") or {}).get("ownerReferences") or []
    owner = next((o.get("uid") for o in owners if o.get("controller")), None)
    if owner == uid:
        return None
    return (
        f"its status was copied from JobSet {name} of an earlier TrainJob of that name (owner uid {owner}, this "
        f"TrainJob's {uid}), which the garbage collector has not deleted yet"
    )


TRAINJOB = JobKind(
    name="TrainJob",
    state=trainjob_state,
    replicas=_trainjob_replicas,
    uid=_trainjob_uid,
    rejections=_trainjob_rejections,
    own_final_state=_trainjob_own_final_state,
    restarts_note=(
        "the kubelet restarts it in place until the restarts of all nodes sum to the Job's backoffLimit 6, then the "
        "Job deletes every pod"
    ),
    describe="kubectl describe trainjob",
)
