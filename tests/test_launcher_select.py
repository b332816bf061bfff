"""`launcher=auto` asks the API server's discovery documents which training CRD it serves, through the real
kubernetes client (CustomObjectsApi.get_api_resources) against a loopback HTTP server that answers as an API
server does: `GET /apis/<group>/<version>` is an APIResourceList, 404 for a group version it does not serve
(kubernetes/apiserver, pkg/endpoints/discovery/version.go :: APIVersionHandler; the aggregated 404 for an unknown
group comes from pkg/server/mux's NotFoundHandler)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from microfed.training.errors import MicrofedError
from microfed.training.launcher_select import choose_launcher, served_by

pytestmark = pytest.mark.unit


class _Discovery:
    def __init__(self) -> None:
        self.served: dict[str, list[str]] = {}  # "/apis/group/version" -> resource names
        self.failures: list[int] = []  # statuses to answer first, one per request
        self.requests: list[str] = []


@pytest.fixture
def api_server() -> Iterator[tuple[_Discovery, client.CustomObjectsApi]]:
    state = _Discovery()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            if state.failures:
                self._send(state.failures.pop(0), {"kind": "Status", "code": 503})
            elif self.path in state.served:
                group_version = self.path.removeprefix("/apis/")
                resources = [
                    {"name": n, "singularName": "", "namespaced": True, "kind": n.title(), "verbs": ["get"]}
                    for n in state.served[self.path]
                ]
                self._send(200, {"kind": "APIResourceList", "groupVersion": group_version, "resources": resources})
            else:
                self._send(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with client.ApiClient(configuration) as api_client:
            yield state, client.CustomObjectsApi(api_client)
    finally:
        server.shutdown()
        server.server_close()


TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"
V1 = "/apis/kubeflow.org/v1"


def test_auto_takes_trainjob_when_both_are_served_and_says_so(api_server: Any) -> None:
    state, api = api_server
    state.served = {TRAINER: ["trainjobs", "trainjobs/status"], V1: ["pytorchjobs", "tfjobs"]}
    lines: list[str] = []
    assert choose_launcher("auto", api, log=lines.append) == "trainjob"
    assert lines == [
        "launcher auto: trainjob (trainjobs.trainer.kubeflow.org served; pytorchjobs.kubeflow.org served too)"
    ]


def test_auto_takes_pytorchjob_on_a_training_operator_v1_cluster(api_server: Any) -> None:
    state, api = api_server
    state.served = {V1: ["pytorchjobs"]}
    lines: list[str] = []
    assert choose_launcher("auto", api, log=lines.append) == "pytorchjob"
    assert "trainjobs.trainer.kubeflow.org not served" in lines[0]


def test_a_group_that_serves_other_resources_does_not_count(api_server: Any) -> None:
    state, api = api_server
    state.served = {TRAINER: ["clustertrainingruntimes"], V1: ["tfjobs"]}
    with pytest.raises(
        MicrofedError, match=r"serves neither trainjobs\.trainer\.kubeflow\.org nor pytorchjobs\.kubeflow\.org"
    ):
        choose_launcher("auto", api, log=lambda _: None)


def test_transient_discovery_errors_are_retried(api_server: Any) -> None:
    state, api = api_server
    state.served = {TRAINER: ["trainjobs"]}
    state.failures = [503, 503]
    waits: list[float] = []
    assert [c.launcher for c in served_by(api, sleep=waits.append)] == ["trainjob"]
    assert waits == [1.0, 2.0]


def test_a_refused_discovery_names_the_crd_and_how_to_skip_the_question(api_server: Any) -> None:
    state, api = api_server
    state.failures = [403]
    with pytest.raises(MicrofedError, match="cannot ask the API server whether it serves trainjobs") as e:
        served_by(api, sleep=lambda _: None)
    assert "launcher=trainjob or launcher=pytorchjob" in e.value.hint


def test_an_explicit_launcher_asks_nothing(api_server: Any) -> None:
    state, api = api_server
    assert choose_launcher("pytorchjob", api) == "pytorchjob" and choose_launcher("trainjob", api) == "trainjob"
    assert not state.requests
