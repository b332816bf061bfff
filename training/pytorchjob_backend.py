"""The cluster side of the PyTorchJob launcher: the narrow `JobBackend` interface and its implementation over
the kubeflow-training SDK's TrainingClient (in-cluster config inside a KFP step, kube-config outside)."""

from __future__ import annotations

from typing import Any, Protocol

from kubeflow.training import KubeflowOrgV1PyTorchJob
from kubernetes.client import V1DeleteOptions, V1Pod

__all__ = ["JobBackend", "TrainingClientBackend"]


class JobBackend(Protocol):
    """What the launcher needs from the cluster. Errors are raised as the SDK raises them; the launcher retries
    the transient ones (microfed.training.job_status.is_transient)."""

    def create(self, job: KubeflowOrgV1PyTorchJob) -> bool:
        """Create the job; False when one of that name already exists (HTTP 409)."""
        ...

    def get(self, name: str) -> KubeflowOrgV1PyTorchJob | None: ...

    def pods(self, name: str) -> list[V1Pod]: ...

    def pod_log(self, pod: str, previous: bool = False) -> str:
        """The `pytorch` container's log; `previous`: its last terminated container's (never asked for: the
        operator recreates pods instead of restarting them in place)."""
        ...

    def events(self, name: str, uid: str | None = None) -> list[tuple[str, str]]:
        """(reason, message) of the events on the object called `name` (the job or a pod), oldest first; events
        outlive their object, so with `uid` only those of that incarnation."""
        ...

    def delete(self, name: str) -> None:
        """Delete the job and (by owner references) its pods; no error when it is already gone."""
        ...


class TrainingClientBackend:
    """JobBackend over the kubeflow-training SDK."""

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

    def pod_log(self, pod: str, previous: bool = False) -> str:
        text: str = self.client.core_api.read_namespaced_pod_log(
            name=pod, namespace=self.namespace, container="pytorch", previous=previous
        )
        return text

    def events(self, name: str, uid: str | None = None) -> list[tuple[str, str]]:
        selector = f"involvedObject.name={name}" + (f",involvedObject.uid={uid}" if uid else "")
        events = self.client.core_api.list_namespaced_event(namespace=self.namespace, field_selector=selector)
        ordered = sorted(events.items, key=lambda e: str(e.last_timestamp or e.event_time or ""))
        return [(str(e.reason), str(e.message or "")) for e in ordered]

    def delete(self, name: str) -> None:
        # Foreground: the job object stays until its pods are gone, so a job of the same name created after it
        # disappears never meets the old pods (their names are the same: <job>-master-0, ...).
        try:
            self.client.delete_job(
                name=name, namespace=self.namespace, delete_options=V1DeleteOptions(propagation_policy="Foreground")
            )
        except RuntimeError as e:
            if _status(e) != 404:
                raise


def _status(error: BaseException) -> int | None:
    """The HTTP status of the ApiException that TrainingClient wrapped in a RuntimeError."""
    status = getattr(error.__cause__, "status", None)
    return int(status) if status is not None else None
