"""The cluster side of the TrainJob launcher: the narrow `TrainJobBackend` interface and its implementation over the
kubernetes client (CustomObjectsApi for the TrainJob and its JobSet, CoreV1Api for pods, logs, events and the runtime
snapshot ConfigMap; in-cluster config inside a KFP step, kube-config outside).

Errors are raised as the kubernetes client raises them (ApiException with `.status`, urllib3 errors); the launcher
retries the transient ones (microfed.training.job_status.is_transient).
"""

from __future__ import annotations

from typing import Any, Protocol

from kubernetes.client import V1Pod

from microfed.training.trainjob import API_VERSION, NODE

__all__ = [
    "JOBSET_GROUP",
    "JOBSET_NAME_LABEL",
    "JOBSET_PLURAL",
    "JOBSET_VERSION",
    "TRAINJOB_GROUP",
    "TRAINJOB_PLURAL",
    "TRAINJOB_VERSION",
    "KubernetesTrainJobBackend",
    "TrainJobBackend",
    "snapshot_name",
]

TRAINJOB_GROUP, TRAINJOB_VERSION = API_VERSION.split("/")
TRAINJOB_PLURAL = "trainjobs"
# The JobSet the trainer creates under the TrainJob's name (kubernetes-sigs/jobset v0.12.0, api/jobset/v1alpha2).
JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # on every pod of the JobSet (jobset_controller.go)


def snapshot_name(trainjob: str) -> str:
    """The ConfigMap the trainer copies the runtime into (kubeflow/trainer v2.3.0 pkg/runtime/core/snapshot.go)."""
    return f"{trainjob}-runtime-snapshot"


class TrainJobBackend(Protocol):
    """What the TrainJob launcher needs from the cluster."""

    def create(self, manifest: dict[str, Any]) -> bool:
        """Create the TrainJob; False when one of that name already exists (HTTP 409)."""
        ...

    def get(self, name: str) -> dict[str, Any] | None:
        """The TrainJob with its status; None when there is none."""
        ...

    def jobset(self, name: str) -> dict[str, Any] | None:
        """The JobSet of that name (the trainer's, or a predecessor's not yet collected); None when there is none."""
        ...

    def config_map(self, name: str) -> Any | None:
        """The ConfigMap of that name (the runtime snapshot); None when there is none."""
        ...

    def pods(self, name: str) -> list[V1Pod]:
        """The pods of the TrainJob's JobSet (label jobset.sigs.k8s.io/jobset-name=<name>)."""
        ...

    def pod_log(self, pod: str, previous: bool = False) -> str:
        """The `node` container's log; `previous`: its last terminated container's (kubectl logs -p)."""
        ...

    def events(self, name: str, uid: str | None = None) -> list[tuple[str, str]]:
        """(reason, message) of the events on the object called `name`, oldest first; with `uid` only that
        incarnation's (events outlive their object)."""
        ...

    def delete(self, name: str) -> None:
        """Delete the TrainJob with propagationPolicy Foreground; no error when it is already gone."""
        ...


class KubernetesTrainJobBackend:
    """TrainJobBackend over the kubernetes client."""

    def __init__(self, namespace: str, api_client: Any = None) -> None:
        from kubernetes import client

        if api_client is None:
            from microfed.training.cluster import load_kubernetes_config

            load_kubernetes_config()
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def create(self, manifest: dict[str, Any]) -> bool:
        try:
            self.custom.create_namespaced_custom_object(
                TRAINJOB_GROUP, TRAINJOB_VERSION, self.namespace, TRAINJOB_PLURAL, manifest
            )
        except Exception as e:
            if _status(e) == 409:
                return False
            raise
        return True

    def get(self, name: str) -> dict[str, Any] | None:
        return _absent_is_none(
            lambda: self.custom.get_namespaced_custom_object(
                TRAINJOB_GROUP, TRAINJOB_VERSION, self.namespace, TRAINJOB_PLURAL, name
            )
        )

    def jobset(self, name: str) -> dict[str, Any] | None:
        return _absent_is_none(
            lambda: self.custom.get_namespaced_custom_object(
                JOBSET_GROUP, JOBSET_VERSION, self.namespace, JOBSET_PLURAL, name
            )
        )

    def config_map(self, name: str) -> Any | None:
        return _absent_is_none(lambda: self.core.read_namespaced_config_map(name=name, namespace=self.namespace))

    def pods(self, name: str) -> list[V1Pod]:
        found = self.core.list_namespaced_pod(namespace=self.namespace, label_selector=f"{JOBSET_NAME_LABEL}={name}")
        return list(found.items)

    def pod_log(self, pod: str, previous: bool = False) -> str:
        text: str = self.core.read_namespaced_pod_log(
            name=pod, namespace=self.namespace, container=NODE, previous=previous
        )
        return text

    def events(self, name: str, uid: str | None = None) -> list[tuple[str, str]]:
        selector = f"involvedObject.name={name}" + (f",involvedObject.uid={uid}" if uid else "")
        events = self.core.list_namespaced_event(namespace=self.namespace, field_selector=selector)
        ordered = sorted(events.items, key=lambda e: str(e.last_timestamp or e.event_time or ""))
        return [(str(e.reason), str(e.message or "")) for e in ordered]

    def delete(self, name: str) -> None:
        # Foreground: the TrainJob stays (with a deletionTimestamp) until the garbage collector has deleted its
        # JobSet and runtime snapshot (ownerReferences with blockOwnerDeletion, trainer jobset.go :: Build and
        # snapshot.go), and they until their Jobs and pods are gone.
        from kubernetes.client import V1DeleteOptions

        try:
            self.custom.delete_namespaced_custom_object(
                TRAINJOB_GROUP,
                TRAINJOB_VERSION,
                self.namespace,
                TRAINJOB_PLURAL,
                name,
                body=V1DeleteOptions(propagation_policy="Foreground"),
            )
        except Exception as e:
            if _status(e) != 404:
                raise


def _absent_is_none(call: Any) -> Any:
    try:
        return call()
    except Exception as e:
        if _status(e) == 404:
            return None
        raise


def _status(error: BaseException) -> int | None:
    """The HTTP status of a kubernetes client ApiException (None for any other error)."""
    status = getattr(error, "status", None)
    return int(status) if isinstance(status, int) else None
