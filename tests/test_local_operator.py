"""The local Training Operator model behaves as the v1.9 controller does (tests/local_operator.py has the sources).

The jobs here run a tiny fake command, not the worker: each replica follows a script of actions, one per
incarnation of its pod, so a test can make rank 1 exit 137 once and then run, say.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from kubeflow.training import (
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
)
from kubernetes.client import (
    V1Container,
    V1EnvVar,
    V1ObjectMeta,
    V1Pod,
    V1PodSpec,
    V1PodTemplateSpec,
    V1ResourceRequirements,
)
from kubernetes.client.exceptions import ApiException

from tests.local_operator import LocalOperator, OomKill, exceeded_quota

# One incarnation of a replica: "exit:N", "sleep:S" (then exit 0) or "wait:NAME" (until the file NAME exists in
# the control folder, then exit 0). The replica's key is its RANK, or "w<index>" without one (no Master: no RANK).
REPLICA = r"""
import json, os, pathlib, sys, time
ctl = pathlib.Path(sys.argv[1])
key = os.environ.get("RANK") or "w" + os.environ["REPLICA_INDEX_HINT"]
n = 0  # this incarnation's number: claimed with O_EXCL, so two replicas of one key starting at once both count
while True:
    try:
        fd = os.open(ctl / f"start-{key}-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        break
    except FileExistsError:
        n += 1
os.write(fd, json.dumps(dict(os.environ)).encode())
os.close(fd)
actions = json.loads((ctl / "plan.json").read_text())[key]
kind, _, arg = actions[min(n, len(actions) - 1)].partition(":")
print(f"replica {key} incarnation {n}: {kind} {arg}", flush=True)
if kind == "exit":
    sys.exit(int(arg))
if kind == "sleep":
    time.sleep(float(arg))
if kind == "wait":
    while not (ctl / arg).exists():
        time.sleep(0.05)
"""


def fake_job(
    ctl: Path,
    plan: dict[str, list[str]],
    *,
    name: str = "fake",
    master: bool = True,
    workers: int = 1,
    image: str = "fake:1",
    service_account: str | None = None,
    clean_pod_policy: str = "None",
    backoff_limit: int = 3,
    active_deadline_seconds: int | None = None,
) -> KubeflowOrgV1PyTorchJob:
    """A PyTorchJob whose replicas run REPLICA with `plan` (as the microfed builder: restartPolicy ExitCode)."""
    ctl.mkdir(exist_ok=True)
    (ctl / "plan.json").write_text(json.dumps(plan))
    script = ctl / "replica.py"
    script.write_text(REPLICA)

    def replica(count: int, index_hint: str) -> KubeflowOrgV1ReplicaSpec:
        container = V1Container(
            name="pytorch",
            image=image,
            command=["python", str(script), str(ctl)],  # `python`: this test's interpreter
            env=[V1EnvVar(name="REPLICA_INDEX_HINT", value=index_hint)],
            resources=V1ResourceRequirements(limits={"memory": "1Gi"}),
        )
        return KubeflowOrgV1ReplicaSpec(
            replicas=count,
            restart_policy="ExitCode",
            template=V1PodTemplateSpec(
                metadata=V1ObjectMeta(labels={"app": "fake"}),
                spec=V1PodSpec(containers=[container], service_account_name=service_account),
            ),
        )

    specs = {"Master": replica(1, "m")} if master else {}
    if workers:
        specs["Worker"] = replica(workers, "0")
    return KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=V1ObjectMeta(name=name, namespace="team-a"),
        spec=KubeflowOrgV1PyTorchJobSpec(
            pytorch_replica_specs=specs,
            run_policy=KubeflowOrgV1RunPolicy(
                clean_pod_policy=clean_pod_policy,
                backoff_limit=backoff_limit,
                active_deadline_seconds=active_deadline_seconds,
            ),
        ),
    )


def conditions(op: LocalOperator, name: str) -> list[tuple[str, str]]:
    job = op.get(name)
    assert job is not None
    return [(c.type, c.status) for c in job.status.conditions or []]


def get(op: LocalOperator, name: str) -> KubeflowOrgV1PyTorchJob:
    job = op.get(name)
    assert job is not None
    return job


def pod(op: LocalOperator, name: str) -> V1Pod:
    (found,) = [p for job in list(op.jobs) for p in op.pods(job) if p.metadata.name == name]
    return found


def started(ctl: Path, key: str) -> list[dict[str, str]]:
    """The environment of each incarnation of replica `key` that has started, in order."""
    files = sorted(ctl.glob(f"start-{key}-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return [json.loads(p.read_text()) for p in files]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.integration
def test_the_job_succeeds_when_the_master_does_while_a_worker_still_runs(
    operator: LocalOperator, tmp_path: Path
) -> None:
    ctl = tmp_path / "ctl"
    assert operator.create(fake_job(ctl, {"0": ["sleep:0.5"], "1": ["wait:release"]}))
    assert not operator.create(fake_job(tmp_path / "other", {}))  # the name exists: 409
    operator.wait_until(lambda: operator.state("fake") == "Succeeded", what="Succeeded")
    # the Worker is still running: the job is finished anyway, and cleanPodPolicy None leaves the Worker running
    assert conditions(operator, "fake") == [("Created", "True"), ("Running", "False"), ("Succeeded", "True")]
    worker = operator.pods("fake")[1]
    assert worker.metadata.name == "fake-worker-0" and worker.status.phase == "Running"
    time.sleep(0.5)
    assert operator.pods("fake")[1].status.phase == "Running"
    assert ("PyTorchJobSucceeded", "PyTorchJob fake is successfully completed.") in operator.events("fake")
    job = get(operator, "fake")
    assert job.status.replica_statuses["Master"].succeeded == 1
    assert job.status.replica_statuses["Worker"].succeeded == 1  # active counted as succeeded once finished
    pid = _pid_of(operator, "fake-worker-0")
    # deleting the job garbage-collects its pods: the running Worker is killed, and its log is gone with it
    operator.delete("fake")
    assert operator.get("fake") is None and operator.pods("fake") == []
    assert not alive(pid)
    with pytest.raises(ApiException) as info:
        operator.pod_log("fake-worker-0")
    assert info.value.status == 404
    operator.delete("fake")  # no error when gone


def _pid_of(op: LocalOperator, pod_name: str) -> int:
    with op._lock:
        (p,) = [p for p in op._pods if p.name == pod_name]
        assert p.proc is not None
        return p.proc.pid


@pytest.mark.integration
def test_exit_137_recreates_the_pod_with_a_new_uid_and_never_stops_restarting(
    operator: LocalOperator, tmp_path: Path
) -> None:
    ctl = tmp_path / "ctl"
    # five retryable exits of rank 1, with backoffLimit 3: the operator recreates the pod every time
    plan = {"0": ["wait:release"], "1": ["exit:137"] * 5 + ["wait:release"]}
    assert operator.create(fake_job(ctl, plan, backoff_limit=3))
    operator.wait_until(lambda: len(started(ctl, "1")) == 6, what="six incarnations of rank 1")
    uids = operator.pod_uids["fake-worker-0"]
    assert len(uids) == 6 and len(set(uids)) == 6  # the same name, a new pod each time
    assert len(operator.pod_uids["fake-master-0"]) == 1
    # the job went Restarting (and Running again once the Master was seen running); never Failed
    assert ("Restarting", "True") in operator.history["fake"]
    operator.wait_until(lambda: operator.state("fake") in ("Running", "Restarting"), what="Running")
    assert "Failed" not in [t for t, _ in operator.history["fake"]]
    events = operator.events("fake")
    assert ("ExitedWithCode", "Pod: team-a.fake-worker-0 exited with code 137") in events
    assert ("PyTorchJobRestarting", "job fake is restarting because Worker replica(s) failed.") in events
    # every incarnation got the same rank environment, so a worker resumes from its round checkpoints
    envs = started(ctl, "1")
    assert {(e["RANK"], e["WORLD_SIZE"], e["MASTER_PORT"], e["MASTER_ADDR"]) for e in envs} == {
        ("1", "2", envs[0]["MASTER_PORT"], "127.0.0.1")
    }
    # the pod a poller sees now is the latest one, restart_count 0 as always (its pod policy is Never)
    (latest,) = [p for p in operator.pods("fake") if p.metadata.name == "fake-worker-0"]
    assert latest.metadata.uid == uids[-1] and latest.spec.restart_policy == "Never"
    assert latest.status.container_statuses[0].restart_count == 0
    (ctl / "release").write_text("")
    operator.wait_until(lambda: operator.state("fake") == "Succeeded", what="Succeeded")


@pytest.mark.integration
def test_exit_3_fails_the_job_and_keeps_the_pods(operator: LocalOperator, tmp_path: Path) -> None:
    ctl = tmp_path / "ctl"
    assert operator.create(fake_job(ctl, {"0": ["wait:release"], "1": ["exit:3"]}))
    operator.wait_until(lambda: operator.state("fake") == "Failed", what="Failed")
    job = get(operator, "fake")
    failed = job.status.conditions[-1]
    assert (failed.type, failed.reason) == ("Failed", "PyTorchJobFailed")
    assert failed.message == 'job "fake" is failing because "Worker" replica(s) failed.'
    # not recreated; cleanPodPolicy None keeps the failed pod (its log readable) and the Master running
    assert len(operator.pod_uids["fake-worker-0"]) == 1
    phases = {p.metadata.name: p.status.phase for p in operator.pods("fake")}
    assert phases == {"fake-master-0": "Running", "fake-worker-0": "Failed"}
    term = pod(operator, "fake-worker-0").status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (3, "Error") and term.finished_at.microsecond == 0
    assert "incarnation 0: exit 3" in operator.pod_log("fake-worker-0")
    # nothing changes once Failed, not even when the Master then succeeds
    (ctl / "release").write_text("")
    operator.wait_until(lambda: pod(operator, "fake-master-0").status.phase == "Succeeded", what="Master exit")
    time.sleep(0.3)
    assert operator.state("fake") == "Failed"


@pytest.mark.integration
def test_rank_environment_only_with_a_master(operator: LocalOperator, tmp_path: Path) -> None:
    with_master, without = tmp_path / "a", tmp_path / "b"
    operator.create(fake_job(with_master, {k: ["exit:0"] for k in "012"}, name="with-master", workers=2))
    operator.create(fake_job(without, {"w0": ["exit:0"]}, name="workers-only", master=False, workers=2))
    operator.wait_until(lambda: operator.state("with-master") == "Succeeded", what="with-master Succeeded")
    operator.wait_until(lambda: operator.state("workers-only") == "Succeeded", what="workers-only Succeeded")
    # with a Master: MASTER_ADDR is the Master's pod name, RANK 0 for it and index + 1 for Worker i
    spec_env = operator.pod_env("with-master-worker-1")
    assert spec_env["MASTER_ADDR"] == "with-master-master-0" and spec_env["MASTER_PORT"] == "23456"
    assert (spec_env["RANK"], spec_env["PET_NODE_RANK"], spec_env["WORLD_SIZE"]) == ("2", "2", "3")
    assert [started(with_master, k)[0]["RANK"] for k in "012"] == ["0", "1", "2"]
    # without a Master the operator injects no rank environment at all
    (first, second) = started(without, "w0")  # both Workers read key w0: they cannot tell each other apart
    for env in (first, second, operator.pod_env("workers-only-worker-1")):
        assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(env)
        assert env["PYTHONUNBUFFERED"] == "1" and env["PET_NNODES"] == "2"
    worker = pod(operator, "workers-only-worker-0")
    assert worker.metadata.labels["training.kubeflow.org/job-role"] == "master"  # Worker 0 has the master role
    assert worker.spec.init_containers is None
    assert pod(operator, "with-master-worker-0").spec.init_containers[0].name == "init-pytorch"


@pytest.mark.integration
def test_a_rejected_pod_is_only_an_event_on_the_job(operator: LocalOperator, tmp_path: Path) -> None:
    operator.service_accounts = {"default", "pipeline-runner"}
    ctl = tmp_path / "ctl"
    operator.create(fake_job(ctl, {"0": ["exit:0"], "1": ["exit:0"]}, service_account="missing"))
    operator.wait_until(lambda: len(operator.events("fake")) > 0, what="an event")
    time.sleep(0.5)
    assert operator.pods("fake") == []
    (reason, message), *_ = operator.events("fake")
    assert reason == "FailedCreatePod"
    assert message in (
        f'Error creating: pods "fake-{rt}-0" is forbidden: error looking up service account team-a/missing: '
        'serviceaccount "missing" not found'
        for rt in ("master", "worker")
    )
    # the failing pass writes no status: not even Created reaches the API server
    assert conditions(operator, "fake") == []
    # the operator keeps retrying (with backoff): once the account exists, the pods come
    operator.service_accounts.add("missing")
    operator.wait_until(lambda: operator.state("fake") == "Succeeded", timeout=60, what="Succeeded")
    assert conditions(operator, "fake")[0] == ("Created", "True")


def test_a_quota_rejection_is_reported_the_same_way(tmp_path: Path) -> None:
    with LocalOperator(tmp_path, admission=exceeded_quota()) as op:
        op.create(fake_job(tmp_path / "ctl", {"0": ["exit:0"]}, workers=0))
        op.wait_until(lambda: op.events("fake") != [], what="an event")
        assert op.events("fake")[0] == (
            "FailedCreatePod",
            'Error creating: pods "fake-master-0" is forbidden: exceeded quota: compute-resources, requested: '
            "limits.memory=8Gi, used: limits.memory=0, limited: limits.memory=4Gi",
        )


def test_an_image_that_cannot_be_pulled_leaves_the_pods_pending(tmp_path: Path) -> None:
    with LocalOperator(tmp_path, unpullable_images={"registry.example/microfed:typo"}) as op:
        ctl = tmp_path / "ctl"
        op.create(fake_job(ctl, {"0": ["exit:0"], "1": ["exit:0"]}, image="registry.example/microfed:typo"))

        def reasons() -> set[str | None]:
            return {
                p.status.container_statuses[0].state.waiting.reason
                for p in op.pods("fake")
                if p.status.container_statuses[0].state.waiting
            }

        op.wait_until(lambda: "ErrImagePull" in reasons(), what="ErrImagePull")
        op.wait_until(lambda: "ImagePullBackOff" in reasons(), what="ImagePullBackOff")
        assert {p.status.phase for p in op.pods("fake")} == {"Pending"}
        assert not list(ctl.glob("start-*"))  # no process ever started
        with pytest.raises(ApiException) as info:
            op.pod_log("fake-master-0")
        assert info.value.status == 400 and "waiting to start" in str(info.value.reason)
        pod_events = op.events("fake-master-0")
        assert ("BackOff", 'Back-off pulling image "registry.example/microfed:typo"') in pod_events
        assert any(r == "Failed" and m.startswith("Failed to pull image") for r, m in pod_events)
        # the operator repeats the waiting reason on the job (RecordAbnormalPods); the job stays Created
        assert any(r == "ErrImagePull" and "Error pod fake-master-0" in m for r, m in op.events("fake"))
        assert op.state("fake") == "Created"


@pytest.mark.integration
def test_an_oom_kill_exits_137_oomkilled_and_the_replica_is_recreated(tmp_path: Path) -> None:
    # a slow controller (reaction_seconds) lets the test see the terminated pod before it is deleted
    with LocalOperator(tmp_path, oom_kills=[OomKill(rank=1, after_seconds=0.3)], reaction_seconds=1.0) as op:
        ctl = tmp_path / "ctl"
        op.create(fake_job(ctl, {"0": ["wait:release"], "1": ["wait:release"]}))

        def terminated() -> object:
            pods = [p for p in op.pods("fake") if p.metadata.name == "fake-worker-0"]
            return pods and pods[0].status.container_statuses[0].state.terminated

        op.wait_until(lambda: bool(terminated()), what="the OOM kill")
        term = terminated()
        assert (term.exit_code, term.reason) == (137, "OOMKilled")  # type: ignore[attr-defined]
        op.wait_until(lambda: len(started(ctl, "1")) == 2, what="the replica's second incarnation")
        assert len(op.pod_uids["fake-worker-0"]) == 2
        (ctl / "release").write_text("")
        op.wait_until(lambda: op.state("fake") == "Succeeded", what="Succeeded")


@pytest.mark.integration
def test_active_deadline_fails_the_job_and_deletes_every_pod(operator: LocalOperator, tmp_path: Path) -> None:
    ctl = tmp_path / "ctl"
    operator.create(fake_job(ctl, {"0": ["wait:release"], "1": ["exit:137"]}, active_deadline_seconds=1))
    operator.wait_until(lambda: operator.state("fake") == "Failed", what="Failed")
    assert get(operator, "fake").status.conditions[-1].message == (
        "Job fake has failed because it was active longer than specified deadline"
    )
    assert operator.pods("fake") == []


@pytest.mark.integration
def test_clean_pod_policy_running_deletes_the_running_workers(operator: LocalOperator, tmp_path: Path) -> None:
    ctl = tmp_path / "ctl"
    operator.create(fake_job(ctl, {"0": ["sleep:0.3"], "1": ["wait:release"]}, clean_pod_policy="Running"))
    operator.wait_until(lambda: operator.state("fake") == "Succeeded", what="Succeeded")
    operator.wait_until(lambda: len(operator.pods("fake")) == 1, what="the Worker's deletion")
    assert [p.metadata.name for p in operator.pods("fake")] == ["fake-master-0"]
    assert ("SuccessfulDeletePod", "Deleted pod: fake-worker-0") in operator.events("fake")


def test_the_admission_webhook_refuses_a_job_without_a_pytorch_container(
    operator: LocalOperator, tmp_path: Path
) -> None:
    job = fake_job(tmp_path / "ctl", {"0": ["exit:0"]}, workers=0)
    job.spec.pytorch_replica_specs["Master"].template.spec.containers[0].name = "trainer"
    with pytest.raises(RuntimeError, match="at least one container with name pytorch"):
        operator.create(job)
    assert operator.jobs == {}
