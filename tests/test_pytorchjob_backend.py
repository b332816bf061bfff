"""TrainingClientBackend with the real kubeflow-training TrainingClient and kubernetes client, talking HTTP to a
small server that answers as the Kubernetes API server does (status codes, JSON bodies). What is under test is
how the real client libraries surface each answer and how the launcher reads that: 404 → gone, 409 → exists,
429/5xx, a timeout or a refused connection → transient (retried), 403 → permanent."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubeflow.training import KubeflowOrgV1PyTorchJob, TrainingClient
from kubernetes.client import Configuration, V1ObjectMeta

from microfed.training.job_status import is_transient
from microfed.training.pytorchjob_backend import TrainingClientBackend
from microfed.training.pytorchjob_launch import WatchPolicy, run_pytorchjob

pytestmark = pytest.mark.unit

NS, NAME = "team-a", "train-run-1"
JOB_PATH = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs/{NAME}"


def job_body(*conditions: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1}}, "runPolicy": {"cleanPodPolicy": "None"}},
        "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]},
    }


POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": f"{NAME}-master-0", "uid": "u1"},
    "status": {
        "phase": "Succeeded",
        "containerStatuses": [
            {
                "name": "pytorch",
                "ready": False,
                "restartCount": 0,
                "image": "i",
                "imageID": "",
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
            }
        ],
    },
}


class ApiServer:
    """Answers (method, path) with queued (status, body) replies; the last reply of a route repeats."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self.requests: list[tuple[str, str, bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                path = self.path.split("?")[0]
                server.requests.append((self.command, self.path, self.rfile.read(length) if length else b""))
                queue = server.routes.get((self.command, path)) or [(404, {"kind": "Status", "code": 404})]
                status, body = queue.pop(0) if len(queue) > 1 else queue[0]
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _reply

            def log_message(self, *args: Any) -> None:
                pass  # quiet

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # shutdown() waits up to one poll interval: socketserver's default 0.5 s would be added to every test
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def backend(self) -> TrainingClientBackend:
        return backend_at(self.url)


def backend_at(url: str) -> TrainingClientBackend:
    config = Configuration(host=url)
    config.retries = 0  # urllib3's own retries would only slow the refused-connection case down
    return TrainingClientBackend(NS, client=TrainingClient(client_configuration=config, namespace=NS))


def status(code: int) -> tuple[int, dict[str, Any]]:
    return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}


def test_not_found_is_none_and_conflict_is_an_existing_job(api: ApiServer) -> None:
    api.routes[("GET", JOB_PATH)] = [status(404)]
    api.routes[("POST", f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs")] = [status(409)]
    backend = api.backend()
    assert backend.get(NAME) is None
    job = KubeflowOrgV1PyTorchJob(api_version="kubeflow.org/v1", kind="PyTorchJob", metadata=V1ObjectMeta(name=NAME))
    assert backend.create(job) is False


@pytest.mark.parametrize(("code", "transient"), [(503, True), (500, True), (429, True), (403, False), (422, False)])
def test_http_errors_are_classified_as_the_client_raises_them(api: ApiServer, code: int, transient: bool) -> None:
    api.routes[("GET", JOB_PATH)] = [status(code)]
    with pytest.raises(RuntimeError) as info:
        api.backend().get(NAME)
    assert is_transient(info.value) is transient


def test_a_refused_connection_is_transient() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = backend_at(f"http://127.0.0.1:{port}")
    with pytest.raises(Exception) as info:
        backend.get(NAME)
    assert is_transient(info.value), repr(info.value)


def test_the_launcher_rides_out_5xx_through_the_real_client_and_deletes_in_the_foreground(
    api: ApiServer, tmp_path: Path
) -> None:
    api.routes[("POST", f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs")] = [(201, job_body())]
    api.routes[("GET", JOB_PATH)] = [status(503), status(502), (200, job_body("Created", "Succeeded"))]
    api.routes[("GET", f"/api/v1/namespaces/{NS}/pods")] = [(200, {"kind": "PodList", "items": [POD]})]
    api.routes[("GET", f"/api/v1/namespaces/{NS}/pods/{NAME}-master-0/log")] = [(200, "done")]
    api.routes[("DELETE", JOB_PATH)] = [(200, {"kind": "Status", "status": "Success"})]
    job = KubeflowOrgV1PyTorchJob(api_version="kubeflow.org/v1", kind="PyTorchJob", metadata=V1ObjectMeta(name=NAME))
    messages: list[str] = []
    outcome = run_pytorchjob(
        job,
        api.backend(),
        policy=WatchPolicy(timeout_seconds=60, poll_seconds=0.01),
        log_dir=tmp_path,
        sleep=lambda s: None,
        log=messages.append,
    )
    assert outcome.name == NAME and sum("retrying" in m for m in messages) == 2
    (delete,) = [r for r in api.requests if r[0] == "DELETE"]
    assert json.loads(delete[2])["propagationPolicy"] == "Foreground"
