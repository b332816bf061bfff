"""Reading the cluster's description (ConfigMap `microfed-cluster`, issue 13) with the real kubernetes client, talking
HTTP to a small server that answers as the Kubernetes API server does (tests/test_pytorchjob_backend.py's ApiServer),
and what the train step does with it: the job's pods select Spot capacity on Autopilot and infra/'s pools on
Standard, and a cluster without the ConfigMap is taken for Standard.

The replies are the API server's: a ConfigMap GET answers the object (kind ConfigMap, `data` of strings); a missing
object answers a Status with reason NotFound and message `configmaps "microfed-cluster" not found`
(kubernetes/apimachinery pkg/api/errors/errors.go, NewNotFound); a request RBAC denies answers 403 Forbidden with
message `configmaps "microfed-cluster" is forbidden: User "..." cannot get resource "configmaps" in API group ""
in the namespace "..."` (NewForbidden, and kubernetes/apiserver pkg/endpoints/handlers/responsewriters/errors.go,
forbiddenMessage).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient, Configuration, CoreV1Api

from microfed.training.cluster import CLUSTER_CONFIGMAP, ClusterInfo, read_cluster_info
from microfed.training.errors import MicrofedError
from microfed.training.shards import SplitConfig, write_shards
from microfed.training.step_train import ClusterOptions, train_step
from microfed.training.worker import WorkerConfig
from tests.conftest import synthetic_dataset
from tests.test_pytorchjob_backend import ApiServer

pytestmark = pytest.mark.unit

NS = "kubeflow"
PATH = f"/api/v1/namespaces/{NS}/configmaps/{CLUSTER_CONFIGMAP}"
SERVICE_ACCOUNT = f"system:serviceaccount:{NS}:pipeline-runner"

AUTOPILOT = {
    "mode": "autopilot",
    "training_spot": True,
    "cpu_machine_type": "e2-standard-8",
    "cpu_max_nodes": 8,
    "gpu_types": ["nvidia-tesla-t4", "nvidia-l4"],
    "gpu_machine_types": {"nvidia-tesla-t4": "n1-standard-8", "nvidia-l4": "g2-standard-8"},
    "gpu_max_nodes": 4,
}
STANDARD = {**AUTOPILOT, "mode": "standard", "cpu_machine_type": "e2-standard-16", "cpu_max_nodes": 12}


def config_map(data: dict[str, str]) -> tuple[int, dict[str, Any]]:
    return 200, {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {"name": CLUSTER_CONFIGMAP, "namespace": NS, "uid": "c0ffee", "resourceVersion": "1"},
        "data": data,
    }


def cluster_json(body: Any) -> tuple[int, dict[str, Any]]:
    return config_map({"cluster.json": body if isinstance(body, str) else json.dumps(body)})


def status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    return code, {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": CLUSTER_CONFIGMAP, "kind": "configmaps"},
        "code": code,
    }


NOT_FOUND = status(404, "NotFound", f'configmaps "{CLUSTER_CONFIGMAP}" not found')
FORBIDDEN = status(
    403,
    "Forbidden",
    f'configmaps "{CLUSTER_CONFIGMAP}" is forbidden: User "{SERVICE_ACCOUNT}" cannot get resource "configmaps" '
    f'in API group "" in the namespace "{NS}"',
)
UNAVAILABLE = status(503, "ServiceUnavailable", "the server is currently unable to handle the request")


def core_api(url: str) -> CoreV1Api:
    config = Configuration(host=url)
    config.retries = 0  # urllib3's own retries would only slow the refused-connection case down
    return CoreV1Api(ApiClient(config))


def read(api: ApiServer, **kwargs: Any) -> tuple[ClusterInfo, list[str]]:
    logs: list[str] = []
    info = read_cluster_info(NS, core_api(api.url), log=logs.append, sleep=lambda s: None, **kwargs)
    return info, logs


# --- the four answers ------------------------------------------------------------------------------------------


def test_an_autopilot_cluster_is_read_from_its_configmap(api: ApiServer) -> None:
    api.routes[("GET", PATH)] = [cluster_json(AUTOPILOT)]
    info, logs = read(api)
    assert (info.mode, info.training_spot) == ("autopilot", True)
    assert info.gpu_types == ("nvidia-tesla-t4", "nvidia-l4")
    assert info.source == f"ConfigMap {NS}/{CLUSTER_CONFIGMAP}"
    assert [(m, p) for m, p, _ in api.requests] == [("GET", PATH)]
    assert logs == [f"cluster info: autopilot cluster, Spot training capacity (ConfigMap {NS}/{CLUSTER_CONFIGMAP})"]


def test_a_standard_cluster_brings_its_machine_types_and_node_limits(api: ApiServer) -> None:
    # Terraform's jsonencode may write a whole number as 12 or 12.0: both are read as 12
    api.routes[("GET", PATH)] = [cluster_json({**STANDARD, "gpu_max_nodes": 6.0, "added_by_a_newer_infra": 1})]
    info, _ = read(api)
    assert (info.mode, info.cpu_machine_type, info.cpu_max_nodes, info.gpu_max_nodes) == (
        "standard",
        "e2-standard-16",
        12,
        6,
    )
    assert info.gpu_machine_types["nvidia-l4"] == "g2-standard-8"


def test_a_missing_configmap_means_standard_with_infra_defaults(api: ApiServer) -> None:
    api.routes[("GET", PATH)] = [NOT_FOUND]
    info, logs = read(api)
    defaults = ClusterInfo.infra_defaults()
    assert (info.mode, info.cpu_machine_type, info.cpu_max_nodes, info.gpu_max_nodes) == (
        "standard",
        defaults.cpu_machine_type,
        defaults.cpu_max_nodes,
        defaults.gpu_max_nodes,
    )
    assert len(logs) == 1 and "does not exist" in logs[0] and "Standard cluster with infra/'s defaults" in logs[0]
    assert len(api.requests) == 1  # a 404 is an answer, not an error to retry


def test_a_configmap_the_service_account_may_not_read_means_standard_and_says_why(api: ApiServer) -> None:
    api.routes[("GET", PATH)] = [FORBIDDEN]
    info, logs = read(api)
    assert info.mode == "standard"
    assert len(logs) == 1 and "403" in logs[0] and "Standard cluster" in logs[0]
    assert "403" in info.source
    assert len(api.requests) == 1


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ("{not json", ["not valid JSON"]),
        ([AUTOPILOT], ["JSON object", "gpu_max_nodes"]),
        ({k: v for k, v in AUTOPILOT.items() if k != "training_spot"}, ["missing training_spot"]),
        ({**AUTOPILOT, "mode": "serverless"}, ["`mode`", '"standard" or "autopilot"', "serverless"]),
        ({**AUTOPILOT, "training_spot": "true"}, ["`training_spot`", "true or false"]),
        ({**AUTOPILOT, "cpu_max_nodes": "8"}, ["`cpu_max_nodes`", "integer >= 1"]),
        ({**AUTOPILOT, "gpu_max_nodes": 0}, ["`gpu_max_nodes`", "integer >= 1"]),
        ({**AUTOPILOT, "cpu_max_nodes": True}, ["`cpu_max_nodes`"]),
        ({**AUTOPILOT, "gpu_types": "nvidia-tesla-t4"}, ["`gpu_types`", "list of GKE accelerator names"]),
        ({**AUTOPILOT, "gpu_types": ["nvidia-h100-80gb"]}, ["nvidia-h100-80gb", "allowed: nvidia-tesla-t4"]),
        ({**AUTOPILOT, "gpu_machine_types": ["n1-standard-8"]}, ["`gpu_machine_types`", "accelerator -> machine"]),
        ({**STANDARD, "gpu_machine_types": {"nvidia-tesla-t4": "n1-standard-8"}}, ["no machine type for nvidia-l4"]),
    ],
)
def test_a_malformed_configmap_names_the_configmap_the_key_and_what_is_allowed(
    api: ApiServer, body: Any, names: list[str]
) -> None:
    api.routes[("GET", PATH)] = [cluster_json(body)]
    with pytest.raises(MicrofedError) as info:
        read(api)
    assert info.value.message.startswith(f"ConfigMap {NS}/{CLUSTER_CONFIGMAP}, key cluster.json: ")
    for name in names:
        assert name in info.value.message
    assert "terraform apply" in info.value.hint


def test_a_configmap_without_the_key_is_malformed(api: ApiServer) -> None:
    api.routes[("GET", PATH)] = [config_map({"cluster.yaml": "mode: autopilot"})]
    with pytest.raises(MicrofedError, match=r"microfed-cluster.*has no key cluster.json \(keys: cluster.yaml\)"):
        read(api)


# --- transient and permanent API errors ------------------------------------------------------------------------


def test_transient_errors_are_retried_with_growing_waits(api: ApiServer) -> None:
    api.routes[("GET", PATH)] = [UNAVAILABLE, status(429, "TooManyRequests", "slow down"), cluster_json(AUTOPILOT)]
    waits: list[float] = []
    logs: list[str] = []
    info = read_cluster_info(NS, core_api(api.url), log=logs.append, sleep=waits.append)
    assert info.mode == "autopilot"
    assert waits == [1.0, 2.0]
    assert sum("retrying" in m for m in logs) == 2 and "HTTP 503" in logs[0]


def test_an_api_server_that_stays_unavailable_fails_naming_the_configmap(api: ApiServer) -> None:
    api.routes[("GET", PATH)] = [UNAVAILABLE]
    with pytest.raises(MicrofedError) as info:
        read(api, attempts=3)
    assert len(api.requests) == 3
    assert f"cannot read ConfigMap {NS}/{CLUSTER_CONFIGMAP}: HTTP 503" in info.value.message


def test_a_permanent_error_is_not_retried(api: ApiServer) -> None:
    api.routes[("GET", PATH)] = [status(401, "Unauthorized", "Unauthorized")]
    with pytest.raises(MicrofedError, match="HTTP 401"):
        read(api)
    assert len(api.requests) == 1


def test_a_refused_connection_is_retried_then_reported() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits: list[float] = []
    with pytest.raises(MicrofedError, match=f"cannot read ConfigMap {NS}/{CLUSTER_CONFIGMAP}"):
        read_cluster_info(NS, core_api(f"http://127.0.0.1:{port}"), log=lambda m: None, sleep=waits.append, attempts=2)
    assert waits == [1.0]


# --- what the train step makes of it ---------------------------------------------------------------------------


class Stop(Exception):
    """Raised by the recording backend once the job exists: what follows (the watch) is tested elsewhere."""


class RecordingBackend:
    """Records the job the train step creates, then stops the step (a JobBackend for creation only)."""

    def __init__(self) -> None:
        self.created: list[Any] = []

    def create(self, job: Any) -> bool:
        self.created.append(job)
        raise Stop

    def delete(self, name: str) -> None:
        pass


def created_pods(tmp_path: Path, info: ClusterInfo) -> list[dict[str, Any]]:
    write_shards(
        synthetic_dataset(n_train=60, n_test=20), tmp_path / "shards", SplitConfig(val_fraction=0.0, workers=2)
    )
    cfg = WorkerConfig(local_epochs=1, shards=tmp_path / "shards", out=tmp_path / "out", model="cnn-small", rounds=1)
    backend = RecordingBackend()
    options = ClusterOptions(
        image="microfed:test",
        namespace="team-a",
        accelerators=("none",),
        timeout_seconds=60,
        run_id="run-13",
        task="train",
        backend=backend,  # type: ignore[arg-type]
        cluster_info=info,
    )
    with pytest.raises(Stop):
        train_step(cfg, 2, cluster=options)
    (job,) = backend.created
    data: dict[str, Any] = ApiClient().sanitize_for_serialization(job)
    return [spec["template"]["spec"] for spec in data["spec"]["pytorchReplicaSpecs"].values()]


def test_on_autopilot_the_train_steps_pods_ask_for_spot_and_for_no_pool(api: ApiServer, tmp_path: Path) -> None:
    api.routes[("GET", PATH)] = [cluster_json(AUTOPILOT)]
    info, _ = read(api)
    for pod in created_pods(tmp_path, info):
        assert pod["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
        assert "tolerations" not in pod


def test_without_the_configmap_the_train_steps_pods_select_infras_standard_pool(api: ApiServer, tmp_path: Path) -> None:
    api.routes[("GET", PATH)] = [NOT_FOUND]
    info, _ = read(api)
    for pod in created_pods(tmp_path, info):
        assert pod["nodeSelector"] == {"microfed.dev/pool": "training-cpu"}
        assert [t["key"] for t in pod["tolerations"]] == ["microfed.dev/training"]
