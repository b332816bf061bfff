"""The PyTorchJob launcher against recorded job/pod state sequences, as the SDK deserialises them.

The fake cluster below is a small in-memory API: it stores the job the launcher creates, serves each poll the
next recorded state (parsed by the kubeflow-training / kubernetes clients' own deserialisers, as
TrainingClient.get_job does), and deletes. The tests assert what a user sees: the outcome, the error text,
the saved logs, and that no job is left behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubeflow.training import KubeflowOrgV1PyTorchJob
from kubeflow.training.api_client import ApiClient as TrainingApiClient
from kubeflow.training.utils.utils import FakeResponse
from kubernetes.client import ApiClient as K8sApiClient
from kubernetes.client import V1ObjectMeta, V1Pod

from microfed.training.pytorchjob_launch import JobFailed, JobTimeout, JobUnschedulable, run_pytorchjob

NAME = "microfed-run1-train-a0"


def job_state(*conditions: tuple[str, str], message: str = "") -> KubeflowOrgV1PyTorchJob:
    """A PyTorchJob as the API returns it, with the operator's conditions in order (type, status)."""
    raw = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": NAME, "namespace": "kubeflow"},
        "spec": {"pytorchReplicaSpecs": {}, "runPolicy": {"cleanPodPolicy": "None"}},
        "status": {
            "conditions": [
                {"type": t, "status": s, "reason": f"PyTorchJob{t}", "message": message or f"PyTorchJob {NAME} is {t}."}
                for t, s in conditions
            ]
        },
    }
    job: KubeflowOrgV1PyTorchJob = TrainingApiClient().deserialize(FakeResponse(raw), "KubeflowOrgV1PyTorchJob")
    return job


def pod(name: str, phase: str, *, exit_code: int | None = None, unschedulable: str | None = None) -> V1Pod:
    status: dict[str, Any] = {"phase": phase}
    if unschedulable:
        status["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        ]
    if exit_code is not None:
        status["containerStatuses"] = [
            {
                "name": "pytorch",
                "ready": False,
                "restartCount": 0,
                "image": "img",
                "imageID": "",
                "state": {"terminated": {"exitCode": exit_code, "finishedAt": "2026-11-21T10:00:00Z"}},
            }
        ]
    raw = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "status": status}
    parsed: V1Pod = K8sApiClient().deserialize(FakeResponse(raw), "V1Pod")
    return parsed


CREATED = ("Created", "True")
RUNNING = ("Running", "True")
SUCCEEDED = ("Succeeded", "True")
FAILED = ("Failed", "True")


class FakeCluster:
    """Serves recorded (job, pods, events) states, one per poll; the last one repeats."""

    def __init__(
        self,
        states: list[tuple[KubeflowOrgV1PyTorchJob, list[V1Pod], dict[str, list[tuple[str, str]]]]],
        logs: dict[str, str] | None = None,
        existing: bool = False,
    ) -> None:
        self.states = states
        self.logs = logs or {}
        self.jobs: dict[str, KubeflowOrgV1PyTorchJob] = {}
        self.created = 0
        self.polls = 0
        if existing:
            self.jobs[NAME] = job_state(CREATED)

    def _current(self) -> tuple[Any, list[V1Pod], dict[str, list[tuple[str, str]]]]:
        """The state of the latest poll (each `get` moves on to the next recorded state)."""
        return self.states[min(max(self.polls - 1, 0), len(self.states) - 1)]

    def create(self, job: KubeflowOrgV1PyTorchJob) -> bool:
        if job.metadata.name in self.jobs:
            return False
        self.jobs[job.metadata.name] = job
        self.created += 1
        return True

    def get(self, name: str) -> KubeflowOrgV1PyTorchJob | None:
        if name not in self.jobs:
            return None
        self.polls += 1
        job: KubeflowOrgV1PyTorchJob = self._current()[0]
        return job

    def pods(self, name: str) -> list[V1Pod]:
        return self._current()[1] if name in self.jobs else []

    def pod_log(self, pod: str) -> str:
        if pod not in self.logs:
            raise RuntimeError(f"container pytorch in pod {pod} is waiting to start")
        return self.logs[pod]

    def pod_events(self, pod: str) -> list[tuple[str, str]]:
        return self._current()[2].get(pod, [])

    def delete(self, name: str) -> None:
        self.jobs.pop(name, None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def launch(cluster: FakeCluster, tmp_path: Path, timeout: float = 3600.0) -> Any:
    clock = Clock()
    messages: list[str] = []
    job = KubeflowOrgV1PyTorchJob(api_version="kubeflow.org/v1", kind="PyTorchJob", metadata=V1ObjectMeta(name=NAME))
    try:
        outcome = run_pytorchjob(
            job,
            cluster,
            timeout_seconds=timeout,
            log_dir=tmp_path / "logs",
            poll_seconds=10,
            clock=clock,
            sleep=clock.sleep,
            log=messages.append,
        )
    finally:
        launch.messages = messages  # type: ignore[attr-defined]
        launch.clock = clock  # type: ignore[attr-defined]
    return outcome


MASTER, WORKER = f"{NAME}-master-0", f"{NAME}-worker-0"


def test_a_job_that_succeeds_returns_its_logs_and_is_deleted(tmp_path: Path) -> None:
    running = [pod(MASTER, "Running"), pod(WORKER, "Running")]
    done = [pod(MASTER, "Succeeded", exit_code=0), pod(WORKER, "Succeeded", exit_code=0)]
    cluster = FakeCluster(
        [
            (job_state(CREATED), [], {}),
            (job_state(CREATED, RUNNING), running, {}),
            (job_state(CREATED, ("Running", "False"), SUCCEEDED), done, {}),
        ],
        logs={MASTER: "round 1/2 ...\naccuracy 0.91\n", WORKER: "worker ok\n"},
    )
    outcome = launch(cluster, tmp_path)
    assert not outcome.adopted and cluster.created == 1
    assert outcome.logs[MASTER].read_text().endswith("accuracy 0.91\n")
    assert (tmp_path / "logs" / f"{WORKER}.log").read_text() == "worker ok\n"
    assert outcome.seconds == 20 and outcome.waiting_for_capacity_seconds == 0
    assert cluster.jobs == {}


def test_a_failed_job_fails_the_step_with_the_failing_replicas_log_and_is_deleted(tmp_path: Path) -> None:
    failed = [pod(MASTER, "Failed", exit_code=137), pod(WORKER, "Failed", exit_code=2)]
    # the worker failed first (same finish time here; the name decides), the master was killed after it
    failed[0].status.container_statuses[0].state.terminated.finished_at = (
        failed[0].status.container_statuses[0].state.terminated.finished_at.replace(minute=5)
    )
    cluster = FakeCluster(
        [
            (job_state(CREATED, RUNNING), [pod(MASTER, "Running"), pod(WORKER, "Running")], {}),
            (
                job_state(CREATED, ("Running", "False"), FAILED, message="PyTorchJob failed because Worker failed"),
                failed,
                {},
            ),
        ],
        logs={MASTER: "waiting in all_reduce\n", WORKER: "line\n" * 50 + "MicrofedError: shard-00001: checksum\n"},
    )
    with pytest.raises(JobFailed) as info:
        launch(cluster, tmp_path)
    text = str(info.value)
    assert "Worker failed" in text and WORKER in text
    assert text.rstrip().endswith("MicrofedError: shard-00001: checksum")
    assert text.count("line") <= 40  # a tail, not the whole log
    assert (tmp_path / "logs" / f"{MASTER}.log").exists()  # every replica's log is kept
    assert cluster.jobs == {}


def test_the_overall_timeout_is_real_and_deletes_the_job(tmp_path: Path) -> None:
    cluster = FakeCluster([(job_state(CREATED, RUNNING), [pod(MASTER, "Running")], {})], logs={MASTER: "slow\n"})
    with pytest.raises(JobTimeout, match="did not finish in 600 s"):
        launch(cluster, tmp_path, timeout=600)
    assert 600 < launch.clock.now <= 620  # type: ignore[attr-defined]
    assert (tmp_path / "logs" / f"{MASTER}.log").read_text() == "slow\n"
    assert cluster.jobs == {}


def test_a_retried_step_adopts_the_existing_job_instead_of_clashing(tmp_path: Path) -> None:
    cluster = FakeCluster(
        [(job_state(CREATED, SUCCEEDED), [pod(MASTER, "Succeeded", exit_code=0)], {})],
        logs={MASTER: "done\n"},
        existing=True,
    )
    outcome = launch(cluster, tmp_path)
    assert outcome.adopted and cluster.created == 0
    assert "adopted existing PyTorchJob" in launch.messages[0]  # type: ignore[attr-defined]


def test_pods_pending_while_the_autoscaler_adds_nodes_are_waiting_not_failing(tmp_path: Path) -> None:
    pending = [pod(MASTER, "Pending", unschedulable="0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")]
    scale_up = {
        MASTER: [
            ("FailedScheduling", "0/2 nodes are available"),
            ("TriggeredScaleUp", "pod triggered scale-up: [{training-t4 0->1 (max: 4)}]"),
        ]
    }
    cluster = FakeCluster(
        [(job_state(CREATED), pending, scale_up)] * 6
        + [
            (job_state(CREATED, RUNNING), [pod(MASTER, "Running")], {}),
            (job_state(CREATED, SUCCEEDED), [pod(MASTER, "Succeeded", exit_code=0)], {}),
        ],
        logs={MASTER: "ok\n"},
    )
    outcome = launch(cluster, tmp_path)
    assert outcome.waiting_for_capacity_seconds == 60
    messages = launch.messages  # type: ignore[attr-defined]
    assert any("waiting for capacity" in m for m in messages)
    assert any("capacity arrived after 60 s" in m for m in messages)


def test_a_pool_at_its_maximum_size_is_waiting_too(tmp_path: Path) -> None:
    pending = [pod(MASTER, "Pending", unschedulable="0/5 nodes are available: 5 Insufficient cpu.")]
    at_max = {MASTER: [("NotTriggerScaleUp", "pod didn't trigger scale-up: 1 max node group size reached")]}
    cluster = FakeCluster(
        [(job_state(CREATED), pending, at_max)] * 3
        + [(job_state(CREATED, SUCCEEDED), [pod(MASTER, "Succeeded", exit_code=0)], {})],
        logs={MASTER: "ok\n"},
    )
    assert launch(cluster, tmp_path).waiting_for_capacity_seconds == 30


def test_an_unschedulable_request_fails_fast_with_the_reason(tmp_path: Path) -> None:
    reason = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    never = {
        MASTER: [
            (
                "NotTriggerScaleUp",
                "pod didn't trigger scale-up: 1 node(s) didn't match Pod's node affinity/selector, "
                "2 Insufficient nvidia.com/gpu",
            )
        ]
    }
    cluster = FakeCluster([(job_state(CREATED), [pod(MASTER, "Pending", unschedulable=reason)], never)])
    with pytest.raises(JobUnschedulable) as info:
        launch(cluster, tmp_path)
    assert reason in str(info.value) and "didn't match Pod's node affinity" in str(info.value)
    assert launch.clock.now == 0  # type: ignore[attr-defined]  # on the first poll, not after a timeout
    assert cluster.jobs == {}


def test_a_job_deleted_behind_our_back_fails_clearly(tmp_path: Path) -> None:
    cluster = FakeCluster([(job_state(CREATED, RUNNING), [], {})])

    class Vanishing(FakeCluster):
        def get(self, name: str) -> KubeflowOrgV1PyTorchJob | None:
            self.jobs.clear()
            return None

    vanishing = Vanishing(cluster.states)
    with pytest.raises(JobFailed, match="disappeared"):
        launch(vanishing, tmp_path)
