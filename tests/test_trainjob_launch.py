"""The TrainJob launcher's pieces that the scenario suite (test_launcher_scenarios.py) cannot pin down with processes:
KubernetesTrainJobBackend through the real kubernetes client against a loopback server that answers as the API
server does (status codes, JSON bodies: which requests it sends, how it reads 404 / 409 / 5xx), the readers of a
container restarted in place, and the rules the watch applies to states the stand-in reaches only by chance (a
`Complete` copied from a predecessor's JobSet; a Job that deleted its pods before the step saw why)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes.client import ApiClient, Configuration
from kubernetes.client import V1Pod as Pod
from kubernetes.client.exceptions import ApiException

from microfed.training.job_kinds import trainjob_state
from microfed.training.job_status import crash_in_place, is_transient
from microfed.training.job_watch import JobFailed, WatchPolicy
from microfed.training.trainjob_backend import KubernetesTrainJobBackend
from microfed.training.trainjob_launch import run_trainjob
from tests.test_pytorchjob_backend import ApiServer, status

pytestmark = pytest.mark.unit

NS, NAME, UID = "team-a", "train-run-1", "uid-new"
TRAINJOBS = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
JOBSET = f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{NS}/jobsets/{NAME}"
SNAPSHOT = f"/api/v1/namespaces/{NS}/configmaps/{NAME}-runtime-snapshot"
PODS = f"/api/v1/namespaces/{NS}/pods"
EVENTS = f"/api/v1/namespaces/{NS}/events"


def trainjob(*conditions: tuple[str, str], uid: str = UID, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": NAME, "namespace": NS, "uid": uid}
    if deleting:
        meta.update(deletionTimestamp="2026-12-01T10:00:00Z", finalizers=["foregroundDeletion"])
    body: dict[str, Any] = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": meta,
        "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 2}},
    }
    if conditions:
        body["status"] = {
            "conditions": [{"type": t, "status": "True", "reason": r, "message": f"{t}: {r}"} for t, r in conditions]
        }
    return body


def jobset(owner: str) -> dict[str, Any]:
    ref = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "name": NAME, "uid": owner}
    return {"kind": "JobSet", "metadata": {"name": NAME, "ownerReferences": [{**ref, "controller": True}]}}


def pod(index: int, *, restarts: int = 0, last_exit: int | None = None, state: str = "running") -> dict[str, Any]:
    status: dict[str, Any] = {
        "name": "node",
        "ready": state == "running",
        "restartCount": restarts,
        "image": "i",
        "imageID": "",
        "state": {state: {"reason": "CrashLoopBackOff"} if state == "waiting" else {}},
    }
    if last_exit is not None:
        reason = "OOMKilled" if last_exit == 137 else "Error"
        status["lastState"] = {"terminated": {"exitCode": last_exit, "reason": reason}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{NAME}-node-0-{index}-abcde", "uid": f"pod-{index}"},
        "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "node", "image": "i"}]},
        "status": {"phase": "Running", "containerStatuses": [status]},
    }


def pod_list(*pods: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return 200, {"kind": "PodList", "apiVersion": "v1", "items": list(pods)}


def backend_at(url: str) -> KubernetesTrainJobBackend:
    config = Configuration(host=url)
    config.retries = 0
    return KubernetesTrainJobBackend(NS, api_client=ApiClient(config))


def run(api: ApiServer, tmp_path: Path, **policy: Any) -> list[str]:
    messages: list[str] = []
    run_trainjob(
        trainjob(),
        backend_at(api.url),
        policy=WatchPolicy(**{"timeout_seconds": 60, "poll_seconds": 0.01, **policy}),
        log_dir=tmp_path / "logs",
        sleep=lambda s: None,
        log=messages.append,
    )
    return messages


# --- the backend over the kubernetes client -----------------------------------------------------------------


def test_not_found_is_none_conflict_is_false_and_5xx_is_transient(api: ApiServer) -> None:
    api.routes[("POST", TRAINJOBS)] = [status(409)]
    api.routes[("GET", f"{TRAINJOBS}/{NAME}")] = [status(404), status(503)]
    backend = backend_at(api.url)
    assert backend.create(trainjob()) is False
    assert backend.get(NAME) is None and backend.jobset(NAME) is None and backend.config_map(f"{NAME}-x") is None
    with pytest.raises(ApiException) as info:
        backend.get(NAME)
    assert is_transient(info.value)


def test_the_requests_name_the_jobsets_pods_the_node_container_and_a_foreground_delete(api: ApiServer) -> None:
    api.routes[("GET", PODS)] = [pod_list(pod(0))]
    api.routes[("GET", f"{PODS}/{NAME}-node-0-0-abcde/log")] = [(200, "the crashed one")]
    api.routes[("DELETE", f"{TRAINJOBS}/{NAME}")] = [status(404)]  # already gone: no error
    backend = backend_at(api.url)
    (found,) = backend.pods(NAME)
    assert found.spec.restart_policy == "OnFailure"
    assert backend.pod_log(f"{NAME}-node-0-0-abcde", previous=True)
    backend.delete(NAME)
    queries = {path: parse_qs(urlsplit(full).query) for _, full, _ in api.requests if (path := urlsplit(full).path)}
    assert queries[PODS]["labelSelector"] == [f"jobset.sigs.k8s.io/jobset-name={NAME}"]
    log_query = queries[f"{PODS}/{NAME}-node-0-0-abcde/log"]
    # the client writes Python's "True"; the API server reads it with strconv.ParseBool, which takes it
    assert log_query["container"] == ["node"] and [v.lower() for v in log_query["previous"]] == ["true"]
    (delete,) = [body for method, _, body in api.requests if method == "DELETE"]
    assert json.loads(delete)["propagationPolicy"] == "Foreground"


# --- the launcher through the backend -------------------------------------------------------------------------


def test_a_complete_trainjob_owned_jobset_succeeds_and_is_deleted(api: ApiServer, tmp_path: Path) -> None:
    api.routes[("POST", TRAINJOBS)] = [(201, trainjob())]
    api.routes[("GET", f"{TRAINJOBS}/{NAME}")] = [(200, trainjob()), (200, trainjob(("Complete", "AllJobsCompleted")))]
    api.routes[("GET", JOBSET)] = [(200, jobset(owner=UID))]
    api.routes[("GET", PODS)] = [pod_list()]
    api.routes[("GET", EVENTS)] = [(200, {"kind": "EventList", "items": []})]
    api.routes[("DELETE", f"{TRAINJOBS}/{NAME}")] = [(200, {"kind": "Status", "status": "Success"})]
    assert run(api, tmp_path) == [f"created TrainJob {NAME}"]
    assert [m for m, _, _ in api.requests].count("DELETE") == 1


def test_a_complete_copied_from_a_predecessors_jobset_is_not_success(api: ApiServer, tmp_path: Path) -> None:
    """Someone re-created the TrainJob before the old JobSet was collected: the trainer copies that JobSet's
    Complete (jobset.go Status looks it up by name) and never removes it. Trusting it would skip the training."""
    api.routes[("POST", TRAINJOBS)] = [(201, trainjob())]
    api.routes[("GET", f"{TRAINJOBS}/{NAME}")] = [(200, trainjob(("Complete", "AllJobsCompleted")))]
    api.routes[("GET", JOBSET)] = [(200, jobset(owner="uid-old"))]
    api.routes[("GET", PODS)] = [pod_list()]
    api.routes[("DELETE", f"{TRAINJOBS}/{NAME}")] = [(200, {"kind": "Status", "status": "Success"})]
    with pytest.raises(JobFailed, match=r"shows Succeeded, but its status was copied from JobSet .* uid-old"):
        run(api, tmp_path)


def test_a_retry_waits_for_the_trainjob_its_jobset_and_its_snapshot_to_go(api: ApiServer, tmp_path: Path) -> None:
    failed = trainjob(("Failed", "FailedJobs"), uid="uid-old")
    api.routes[("POST", TRAINJOBS)] = [status(409), (201, trainjob())]
    api.routes[("GET", f"{TRAINJOBS}/{NAME}")] = [
        (200, failed),  # the claim reads it: Failed, to be replaced
        (200, {**failed, "metadata": trainjob(uid="uid-old", deleting=True)["metadata"]}),  # foreground: still there
        status(404),
        (200, trainjob(("Complete", "AllJobsCompleted"))),  # the new one, once it ran
    ]
    api.routes[("GET", JOBSET)] = [(200, jobset(owner="uid-old")), status(404), (200, jobset(owner=UID))]
    api.routes[("GET", SNAPSHOT)] = [(200, {"kind": "ConfigMap", "metadata": {"name": "s"}}), status(404)]
    api.routes[("GET", PODS)] = [pod_list()]
    api.routes[("DELETE", f"{TRAINJOBS}/{NAME}")] = [(200, {"kind": "Status", "status": "Success"})]
    messages = run(api, tmp_path)
    assert "is Failed: deleting it" in messages[0] and messages[-1] == f"created TrainJob {NAME}"
    order = [(m, urlsplit(p).path) for m, p, _ in api.requests]
    second_post = [i for i, r in enumerate(order) if r == ("POST", TRAINJOBS)][1]
    last_snapshot_read = max(i for i, r in enumerate(order) if r == ("GET", SNAPSHOT))
    assert last_snapshot_read < second_post  # created again only once everything of the old one was gone


def test_a_job_that_deleted_its_pods_is_blamed_on_the_last_exit_seen(api: ApiServer, tmp_path: Path) -> None:
    """Two nodes killed in turn: their restartCounts sum to backoffLimit 6 before either reaches max_restarts; the
    Job fails and deletes its pods, so the step names the last exit it saw, with that container's log."""
    api.routes[("POST", TRAINJOBS)] = [(201, trainjob())]
    api.routes[("GET", f"{TRAINJOBS}/{NAME}")] = [
        (200, trainjob()),
        (200, trainjob(("Failed", "FailedJobs"))),
    ]
    api.routes[("GET", JOBSET)] = [(200, jobset(owner=UID))]
    api.routes[("GET", PODS)] = [
        pod_list(pod(0, restarts=3, last_exit=137), pod(1, restarts=3, last_exit=143)),
        pod_list(),
    ]
    api.routes[("GET", f"{PODS}/{NAME}-node-0-0-abcde/log")] = [(200, "node 0 ran out of memory\n")]
    api.routes[("GET", f"{PODS}/{NAME}-node-0-1-abcde/log")] = [(200, "node 1 was preempted\n")]
    api.routes[("GET", EVENTS)] = [(200, {"kind": "EventList", "items": []})]
    api.routes[("DELETE", f"{TRAINJOBS}/{NAME}")] = [(200, {"kind": "Status", "status": "Success"})]
    with pytest.raises(JobFailed) as info:
        run(api, tmp_path, max_restarts=5)
    text = str(info.value)
    assert f"failed: Failed: FailedJobs; replica {NAME}-node-0-0-abcde: exit code 137 (OOMKilled)" in text
    assert text.endswith("its last lines:\nnode 0 ran out of memory")
    assert {p.name for p in (tmp_path / "logs").iterdir()} >= {f"{NAME}-node-0-0-abcde.restart-1.log"}


# --- readers ----------------------------------------------------------------------------------------------------


def as_pod(raw: dict[str, Any]) -> Pod:
    from kubeflow.training.utils.utils import FakeResponse

    parsed: Pod = ApiClient().deserialize(FakeResponse(raw), "V1Pod")
    return parsed


def test_which_container_an_in_place_restart_reports() -> None:
    # restarted and running again: lastState is the previous container (attempt restartCount - 1)
    crash = crash_in_place(as_pod(pod(0, restarts=2, last_exit=137)))
    assert crash is not None and (crash.attempt, crash.end.exit_code, crash.log_is_previous) == (1, 137, True)
    # in CrashLoopBackOff: lastState is the container that just died, not restarted yet (attempt restartCount)
    crash = crash_in_place(as_pod(pod(0, restarts=2, last_exit=3, state="waiting")))
    assert crash is not None and (crash.attempt, crash.end.exit_code) == (2, 3)
    # a PyTorchJob's pod (restartPolicy Never) is recreated, not restarted: not an in-place crash
    never = pod(0, restarts=0, last_exit=137)
    never["spec"]["restartPolicy"] = "Never"
    assert crash_in_place(as_pod(never)) is None
    assert crash_in_place(as_pod(pod(0))) is None


def test_a_trainjob_has_no_condition_while_it_runs() -> None:
    assert trainjob_state(trainjob()) == ("Running", "")
    assert trainjob_state(trainjob(("Complete", "AllJobsCompleted")))[0] == "Succeeded"
    assert trainjob_state(trainjob(("Complete", "AllJobsCompleted"), ("Failed", "DeadlineExceeded")))[0] == "Failed"


def test_a_trainer_older_than_v2_2_that_prunes_runtime_patches_is_refused(api: ApiServer, tmp_path: Path) -> None:
    """Trainer v2.1 (Kubeflow 1.11) has no spec.runtimePatches: its API server prunes them silently, and the pods
    would lose their service account, tolerations and node selector. The launcher reads the job back and stops."""
    sent = trainjob()
    sent["spec"]["runtimePatches"] = [{"manager": "microfed.dev/train-step", "trainingRuntimeSpec": {}}]
    api.routes[("POST", TRAINJOBS)] = [(201, trainjob())]
    api.routes[("GET", f"{TRAINJOBS}/{NAME}")] = [(200, trainjob())]  # as stored: pruned
    api.routes[("DELETE", f"{TRAINJOBS}/{NAME}")] = [(200, {"kind": "Status", "status": "Success"})]
    with pytest.raises(JobFailed, match=r"dropped spec\.runtimePatches.*older than v2\.2") as info:
        run_trainjob(
            sent,
            backend_at(api.url),
            policy=WatchPolicy(timeout_seconds=60, poll_seconds=0.01),
            log_dir=tmp_path / "logs",
            sleep=lambda s: None,
            log=lambda m: None,
        )
    assert "launcher=pytorchjob" in info.value.hint
    assert [m for m, _, _ in api.requests].count("DELETE") == 1  # and the job is deleted on the way out
