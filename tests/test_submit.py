"""`microfed submit` against a real HTTP server that speaks the part of the KFP v2beta1 REST API it uses.

The server implements the endpoints kfp.Client 2.16 calls for this flow (paths and query parameters from
kfp_server_api's api classes, JSON in the shapes its models deserialize) and records every request, so the
tests assert on what reached Kubeflow Pipelines, not on which client methods were called.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kfp
import pytest
import yaml

from microfed.pipelines.cli import main
from microfed.pipelines.submit import submit
from microfed.training.errors import MicrofedError

pytestmark = pytest.mark.unit

API = "/apis/v2beta1"
STEPS = {"split-dataset", "train", "aggregate", "evaluate", "export"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def upload(self) -> str:
        """The `uploadfile` part of a multipart upload, as text."""
        head = f"Content-Type: {self.headers['content-type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + self.body)
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "uploadfile":
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                return payload.decode()
        raise AssertionError("no uploadfile part")


@dataclass
class FakeKfp:
    """State of the fake API server: what exists and every request received."""

    url: str = ""
    requests: list[Request] = field(default_factory=list)
    pipelines: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    experiments: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    require_token: str | None = None
    ids: Iterator[int] = field(default_factory=itertools.count)

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self.ids)}"

    def received(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == f"{API}{path}"]


def _name_filter(query: dict[str, str]) -> str | None:
    # kfp sends {"predicates": [{"operation": 1 (EQUALS), "key": "display_name", "stringValue": ...}]}
    if "filter" not in query:
        return None
    (predicate,) = json.loads(query["filter"])["predicates"]
    assert predicate["key"] == "display_name" and predicate["operation"] in (1, "EQUALS")
    return str(predicate["stringValue"])


def _matching(items: list[dict[str, Any]], query: dict[str, str]) -> list[dict[str, Any]]:
    name = _name_filter(query)
    namespace = query.get("namespace", "")
    return [i for i in items if (name is None or i["display_name"] == name) and i.get("namespace", "") == namespace]


def _handle(state: FakeKfp, req: Request) -> tuple[int, Any]:
    """(status, JSON body) for one request, in the shapes of the V2beta1* models."""
    path, q = req.path.removeprefix(API), req.query
    if path == "/healthz" and req.method == "GET":
        return 200, {"multi_user": False, "pipeline_store": "database"}
    if state.require_token and req.headers.get("authorization") != f"Bearer {state.require_token}":
        return 401, {"error": "Unauthenticated", "message": "missing or invalid token", "code": 16}
    if path == "/pipelines" and req.method == "GET":
        found = _matching(state.pipelines, q)
        # The real server leaves empty lists out of the JSON, which kfp then reads as None.
        return 200, {"pipelines": found, "total_size": len(found)} if found else {}
    if path == "/pipelines/upload" and req.method == "POST":
        pipeline = {"pipeline_id": state.new_id("pipeline"), "display_name": q["name"], "name": q["name"]}
        if q.get("namespace"):
            pipeline["namespace"] = q["namespace"]
        state.pipelines.append(pipeline)
        # Like the real server, the upload also creates the first version under the pipeline's name.
        _add_version(state, pipeline["pipeline_id"], q["name"], req.upload())
        return 200, pipeline
    if path == "/pipelines/upload_version" and req.method == "POST":
        if not any(p["pipeline_id"] == q["pipelineid"] for p in state.pipelines):
            return 404, {"message": f"pipeline {q['pipelineid']} not found"}
        return 200, _add_version(state, q["pipelineid"], q["name"], req.upload())
    if path.startswith("/pipelines/") and path.endswith("/versions") and req.method == "GET":
        pipeline_id = path.split("/")[2]
        versions = [v for v in state.versions if v["pipeline_id"] == pipeline_id]
        if q.get("sort_by") == "created_at desc":
            versions.reverse()
        versions = versions[: int(q.get("page_size", "10"))]
        return 200, {"pipeline_versions": versions, "total_size": len(versions)} if versions else {}
    if path == "/experiments" and req.method == "GET":
        found = _matching(state.experiments, q)
        return 200, {"experiments": found, "total_size": len(found)} if found else {}
    if path == "/experiments" and req.method == "POST":
        experiment = {**req.json(), "experiment_id": state.new_id("experiment"), "storage_state": "AVAILABLE"}
        state.experiments.append(experiment)
        return 200, experiment
    if path == "/runs" and req.method == "POST":
        run = {**req.json(), "run_id": state.new_id("run"), "state": "PENDING"}
        state.runs.append(run)
        return 200, run
    return 404, {"message": f"fake KFP does not implement {req.method} {req.path}"}


def _add_version(state: FakeKfp, pipeline_id: str, name: str, package: str) -> dict[str, Any]:
    version = {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": state.new_id("version"),
        "display_name": name,
        "name": name,
        "package": package,  # not a V2beta1PipelineVersion field: kept for the tests, ignored by kfp
    }
    state.versions.append(version)
    return version


def _handler(state: FakeKfp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            req = Request(
                method=self.command,
                path=parts.path,
                query={k: v[-1] for k, v in parse_qs(parts.query).items()},
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
            )
            state.requests.append(req)
            status, payload = _handle(state, req)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep pytest's output to the failures

    return Handler


@pytest.fixture(autouse=True)
def _no_user_kfp_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # kfp.Client reads a saved namespace from ~/.config/kfp/context.json and a UI address from the environment.
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for name in ("KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def kfp_server() -> Iterator[FakeKfp]:
    state = FakeKfp()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_first_submit_uploads_the_compiled_pipeline_and_runs_it_with_the_arguments(kfp_server: FakeKfp) -> None:
    arguments = {"workers": 8, "dataset": "gs://b/data.zip"}
    result = submit(kfp_server.url, arguments, namespace=None, experiment="microfed", image="registry.example/mf:1")

    (upload,) = kfp_server.received("POST", "/pipelines/upload")
    assert upload.query["name"] == "microfed"
    spec = yaml.safe_load(upload.upload())
    assert set(spec["root"]["dag"]["tasks"]) == STEPS
    executors = spec["deploymentSpec"]["executors"].values()
    assert executors and {e["container"]["image"] for e in executors} == {"registry.example/mf:1"}
    assert not kfp_server.received("POST", "/pipelines/upload_version")

    (run,) = kfp_server.runs
    (pipeline,) = kfp_server.pipelines
    (version,) = kfp_server.versions
    (experiment,) = kfp_server.experiments
    assert run["runtime_config"]["parameters"] == arguments
    assert run["pipeline_version_reference"] == {
        "pipeline_id": pipeline["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"],
    }
    assert experiment["display_name"] == "microfed" and run["experiment_id"] == experiment["experiment_id"]
    assert (result.pipeline_id, result.version_id, result.run_id) == (
        pipeline["pipeline_id"],
        version["pipeline_version_id"],
        run["run_id"],
    )
    assert result.run_url == f"{kfp_server.url}/#/runs/details/{run['run_id']}"


def test_submitting_again_uploads_a_new_version_in_the_same_experiment(kfp_server: FakeKfp) -> None:
    first = submit(kfp_server.url, {"workers": 2}, namespace=None, experiment="exp-a")
    second = submit(kfp_server.url, {"workers": 3}, namespace=None, experiment="exp-a")

    assert len(kfp_server.received("POST", "/pipelines/upload")) == 1
    (new_version,) = kfp_server.received("POST", "/pipelines/upload_version")
    assert new_version.query["pipelineid"] == first.pipeline_id
    assert new_version.query["name"].startswith("microfed-")
    assert set(yaml.safe_load(new_version.upload())["root"]["dag"]["tasks"]) == STEPS
    assert len(kfp_server.pipelines) == 1 and len(kfp_server.versions) == 2
    assert second.pipeline_id == first.pipeline_id and second.version_id != first.version_id
    assert kfp_server.runs[1]["pipeline_version_reference"]["pipeline_version_id"] == second.version_id
    assert len(kfp_server.experiments) == 1
    assert kfp_server.runs[0]["experiment_id"] == kfp_server.runs[1]["experiment_id"]
    assert second.run_id != first.run_id and second.run_id in second.run_url


def test_namespace_and_token_reach_the_server(kfp_server: FakeKfp) -> None:
    kfp_server.require_token = "s3cret"
    submit(kfp_server.url, {"workers": 2}, namespace="team-a", experiment="microfed", existing_token="s3cret")

    assert kfp_server.pipelines[0]["namespace"] == "team-a"
    assert kfp_server.experiments[0]["namespace"] == "team-a"
    assert all(r.headers.get("authorization") == "Bearer s3cret" for r in kfp_server.requests)


def test_a_rejected_token_says_how_to_authenticate(kfp_server: FakeKfp) -> None:
    kfp_server.require_token = "s3cret"
    with pytest.raises(MicrofedError) as e:
        submit(kfp_server.url, {}, namespace=None, experiment="microfed", existing_token="wrong")
    assert kfp_server.url in e.value.message and "401" in e.value.message
    assert "missing or invalid token" in e.value.message
    assert "--token" in e.value.hint and not kfp_server.runs


def test_an_unreachable_host_names_it_and_how_to_forward_a_port() -> None:
    with socket.socket() as s:  # a port nothing listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(MicrofedError) as e:
        submit(url, {}, namespace=None, experiment="microfed")
    assert url in e.value.message
    assert "kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80" in e.value.hint
    assert "--host http://localhost:8080" in e.value.hint


def test_a_host_without_scheme_is_refused_before_connecting() -> None:
    with pytest.raises(MicrofedError, match="scheme"):
        submit("localhost:8080", {}, namespace=None, experiment="microfed")


def test_cli_submit_prints_the_run_url_and_sends_every_pipeline_parameter(
    kfp_server: FakeKfp, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["submit", "--host", kfp_server.url, "--workers", "2", "--dataset", "gs://b/data.zip"])

    assert code == 0
    (run,) = kfp_server.runs
    assert capsys.readouterr().out.strip() == f"{kfp_server.url}/#/runs/details/{run['run_id']}"
    params = run["runtime_config"]["parameters"]
    assert params["workers"] == 2 and params["dataset"] == "gs://b/data.zip"
    assert params["model"] == "cnn-fmnist" and params["split"] == "stratified"  # the pipeline's defaults
    if "launcher" in params:
        assert params["launcher"] == "auto"


def test_cli_submit_refuses_a_local_dataset_path_before_uploading(
    kfp_server: FakeKfp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["submit", "--host", kfp_server.url, "--dataset", str(tmp_path)])

    assert code == 2 and not kfp_server.requests
    assert "gs://" in capsys.readouterr().err


def test_cli_submit_checks_parameters_before_uploading(kfp_server: FakeKfp, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["submit", "--host", kfp_server.url, "--rounds", "0"])

    assert code == 2 and not kfp_server.requests
    assert "--rounds" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"dataset": "/home/me/pets.zip"}, "the cluster cannot read paths on this machine"),
        ({"model": "nets/my_net.py:make"}, "names a file on this machine"),
        ({"rounds": 0}, "rounds must be an integer from 1"),
        ({"launcher": "slurm"}, "unknown launcher 'slurm'"),
        ({"split_ratios": "1,2"}, "split_ratios has 2 values but there are 3 workers"),
    ],
)
def test_submit_itself_refuses_what_the_cluster_cannot_run_before_any_request(
    kfp_server: FakeKfp, arguments: dict[str, Any], message: str
) -> None:
    # the notebook calls submit() directly: the same rules as the CLI, before anything reaches the server
    with pytest.raises(MicrofedError, match=message):
        submit(kfp_server.url, arguments, namespace=None, experiment="microfed")
    assert not kfp_server.requests


def test_cli_submit_sends_the_cluster_settings(kfp_server: FakeKfp) -> None:
    flags = ["--job-namespace", "team-a", "--accelerators", "none", "--timeout-minutes", "90", "--launcher", "local"]
    assert main(["submit", "--host", kfp_server.url, "--namespace", "profile-a", *flags]) == 0
    (run,) = kfp_server.runs
    params = run["runtime_config"]["parameters"]
    assert (params["job_namespace"], params["accelerators"], params["timeout_minutes"]) == ("team-a", "none", 90)
    assert params["launcher"] == "local" and kfp_server.experiments[0]["namespace"] == "profile-a"
