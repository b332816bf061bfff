"""The PyTorchJob launcher against recorded job/pod state sequences, as the SDK deserialises them.

The fake cluster below is a small in-memory API: it stores the job the launcher creates, serves each poll the
next recorded state (parsed by the kubeflow-training / kubernetes clients' own deserialisers, as
TrainingClient.get_job does), and deletes. The recorded states are the ones the real systems produce (sources in
microfed/training/job_status.py and tests/local_operator.py): a job `Succeeded` while a Worker still runs
(pytorchjob_controller.go UpdateJobStatus), a pod recreated under its name with a new UID after exit >= 128
(common/pod.go ReconcilePods), `FailedCreatePod` events on the job (control/pod_control.go), waiting reasons
(kubelet), autoscaler verdicts (skippedreasons.go), and API errors raised as TrainingClient raises them (an
ApiException wrapped in a RuntimeError `from e`). The tests assert what a user sees: the outcome, the error
text, the saved logs, and that no job is left behind.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubeflow.training import KubeflowOrgV1PyTorchJob, KubeflowOrgV1ReplicaSpec
from kubeflow.training.api_client import ApiClient as TrainingApiClient
from kubeflow.training.utils.utils import FakeResponse
from kubernetes.client import ApiClient as K8sApiClient
from kubernetes.client import V1ObjectMeta, V1Pod
from kubernetes.client.exceptions import ApiException

from microfed.training.pytorchjob_launch import (
    JobFailed,
    JobTerminated,
    JobTimeout,
    JobUnschedulable,
    WatchPolicy,
    run_pytorchjob,
)

pytestmark = pytest.mark.unit

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


def pod(
    name: str,
    phase: str,
    *,
    exit_code: int | None = None,
    reason: str = "",
    unschedulable: str | None = None,
    waiting: tuple[str, str] | None = None,
    uid: str = "",
) -> V1Pod:
    """A pod as the API returns it; `uid` defaults to one per name (the operator recreates pods under their name
    with a new uid)."""
    status: dict[str, Any] = {"phase": phase}
    if unschedulable:
        status["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        ]
    state: dict[str, Any] | None = None
    if exit_code is not None:
        terminated = {"exitCode": exit_code, "reason": reason, "finishedAt": "2026-11-21T10:00:00Z"}
        state = {"terminated": terminated}
    elif waiting is not None:
        state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    if state is not None:
        status["containerStatuses"] = [
            {"name": "pytorch", "ready": False, "restartCount": 0, "image": "img", "imageID": "", "state": state}
        ]
    container = {"name": "pytorch", "image": "img", "resources": {"limits": {"cpu": "2", "memory": "4Gi"}}}
    raw = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "uid": uid or f"uid-{name}"},
        "spec": {"containers": [container]},
        "status": status,
    }
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
        failures: dict[str, list[BaseException]] | None = None,
    ) -> None:
        self.states = states
        self.logs = logs or {}
        self.jobs: dict[str, KubeflowOrgV1PyTorchJob] = {}
        self.created = 0
        self.polls = 0
        self.deletes = 0
        # errors to raise, in order, from the next calls of a method ("get", "pods", ...)
        self.failures = failures or {}
        if existing:
            self.jobs[NAME] = job_state(CREATED)

    def _fail(self, method: str) -> None:
        queue = self.failures.get(method)
        if queue:
            raise queue.pop(0)

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
        self._fail("get")
        if name not in self.jobs:
            return None
        self.polls += 1
        job: KubeflowOrgV1PyTorchJob = self._current()[0]
        return job

    def pods(self, name: str) -> list[V1Pod]:
        self._fail("pods")
        return self._current()[1] if name in self.jobs else []

    def pod_log(self, pod: str) -> str:
        if pod not in self.logs:
            raise RuntimeError(f"container pytorch in pod {pod} is waiting to start")
        return self.logs[pod]

    def events(self, name: str, uid: str | None = None) -> list[tuple[str, str]]:
        return self._current()[2].get(name, [])

    def delete(self, name: str) -> None:
        self._fail("delete")
        self.deletes += 1
        self.jobs.pop(name, None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def launch(
    cluster: FakeCluster,
    tmp_path: Path,
    timeout: float = 3600.0,
    outputs_missing: Callable[[], list[int]] = list,
    **policy: Any,
) -> Any:
    clock = Clock()
    messages: list[str] = []
    job = KubeflowOrgV1PyTorchJob(api_version="kubeflow.org/v1", kind="PyTorchJob", metadata=V1ObjectMeta(name=NAME))
    try:
        outcome = run_pytorchjob(
            job,
            cluster,
            policy=WatchPolicy(timeout_seconds=timeout, poll_seconds=10, **policy),
            log_dir=tmp_path / "logs",
            outputs_missing=outputs_missing,
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
        [
            (job_state(CREATED, RUNNING), [pod(MASTER, "Running")], {}),
            (job_state(CREATED, SUCCEEDED), [pod(MASTER, "Succeeded", exit_code=0)], {}),
        ],
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


# --- issue 12: what the real operator and API server do --------------------------------------------------------


def api_error(status: int) -> RuntimeError:
    """What TrainingClient raises for an HTTP error: the ApiException wrapped in a RuntimeError `from e`."""
    try:
        raise ApiException(status=status, reason="Service Unavailable" if status >= 500 else "Forbidden")
    except ApiException as e:
        try:
            raise RuntimeError(f"Failed to get PyTorchJob: kubeflow/{NAME}. Error: {e}") from e
        except RuntimeError as wrapped:
            return wrapped


def test_success_waits_for_every_replicas_record_while_workers_still_run(tmp_path: Path) -> None:
    # v1.9: the job is Succeeded when the Master succeeds, whatever the Worker does (UpdateJobStatus)
    early = [pod(MASTER, "Succeeded", exit_code=0), pod(WORKER, "Running")]
    done = [pod(MASTER, "Succeeded", exit_code=0), pod(WORKER, "Succeeded", exit_code=0)]
    cluster = FakeCluster([(job_state(CREATED, SUCCEEDED), early, {})], logs={MASTER: "ok\n", WORKER: "ok\n"})
    asked: list[int] = []

    def missing() -> list[int]:
        asked.append(1)
        if len(asked) > 3:  # the worker's upload lands after three looks
            cluster.states = [(job_state(CREATED, SUCCEEDED), done, {})]
            return []
        return [1]

    outcome = launch(cluster, tmp_path, outputs_missing=missing)
    assert len(asked) == 4 and cluster.deletes == 1 and cluster.jobs == {}
    assert any("waiting for the records of rank(s) [1]" in m for m in launch.messages)  # type: ignore[attr-defined]
    assert outcome.name == NAME


def test_success_without_a_replicas_record_fails_instead_of_deleting_a_writing_worker(tmp_path: Path) -> None:
    early = [pod(MASTER, "Succeeded", exit_code=0), pod(WORKER, "Running")]
    cluster = FakeCluster([(job_state(CREATED, SUCCEEDED), early, {})], logs={MASTER: "ok\n", WORKER: "train\n"})
    with pytest.raises(JobFailed, match=r"records of rank\(s\) \[1\] are missing \(1 replica\(s\) still running"):
        launch(cluster, tmp_path, outputs_missing=lambda: [1], outputs_grace_seconds=60)
    assert 60 <= launch.clock.now <= 70  # type: ignore[attr-defined]
    assert cluster.jobs == {}


def restarted(uid: str, *, exit_code: int | None = 137, reason: str = "OOMKilled") -> V1Pod:
    if exit_code is None:
        return pod(WORKER, "Running", uid=uid)
    return pod(WORKER, "Failed", exit_code=exit_code, reason=reason, uid=uid)


def test_a_replica_recreated_past_the_limit_fails_the_job_naming_the_oom_kill(tmp_path: Path) -> None:
    # ExitCode policy: the operator deletes a pod that exited 137 and creates it again under the same name with a
    # new uid, forever (backoffLimit counts RestartCount of Running pods, which stays 0); the job stays Restarting
    states = []
    for attempt in range(6):
        states.append(
            (job_state(CREATED, RUNNING), [pod(MASTER, "Running"), restarted(f"w{attempt}", exit_code=None)], {})
        )
        states.append(
            (job_state(CREATED, ("Restarting", "True")), [pod(MASTER, "Running"), restarted(f"w{attempt}")], {})
        )
    logs = {MASTER: "all_reduce\n", WORKER: "epoch 1\nepoch 2 loss 0.3\n"}
    cluster = FakeCluster(states, logs=logs)
    with pytest.raises(JobFailed) as info:
        launch(cluster, tmp_path, max_restarts=3, memory_note="the plan requested 4.00 GiB per replica (estimated)")
    text = str(info.value)
    assert f"replica {WORKER} was restarted 4 times (limit 3" in text
    assert "exit code 137 (OOMKilled): out of memory at its limit of 4Gi" in text and "4.00 GiB" in text
    assert text.rstrip().endswith("epoch 2 loss 0.3")
    assert (tmp_path / "logs" / f"{WORKER}.restart-1.log").exists()  # each killed pod's log, before it went
    assert cluster.jobs == {}


def test_a_peer_lost_exit_is_a_restart_too_and_a_few_are_allowed(tmp_path: Path) -> None:
    states = [
        (job_state(CREATED, RUNNING), [pod(MASTER, "Running"), restarted("w0", exit_code=200, reason="Error")], {}),
        (job_state(CREATED, RUNNING), [pod(MASTER, "Running"), restarted("w1", exit_code=None)], {}),
        (
            job_state(CREATED, SUCCEEDED),
            [pod(MASTER, "Succeeded", exit_code=0), pod(WORKER, "Succeeded", exit_code=0, uid="w1")],
            {},
        ),
    ]
    outcome = launch(FakeCluster(states, logs={MASTER: "ok\n", WORKER: "ok\n"}), tmp_path)
    assert outcome.restarts == {WORKER: 1}


@pytest.mark.parametrize(
    ("waiting", "hint"),
    [
        (("ImagePullBackOff", 'Back-off pulling image "microfed:typo"'), "worker_image"),
        (("ErrImagePull", "rpc error: code = NotFound"), "worker_image"),
        (("CreateContainerConfigError", 'secret "gcs-key" not found'), "secrets"),
    ],
)
def test_a_container_that_cannot_start_fails_within_minutes(
    tmp_path: Path, waiting: tuple[str, str], hint: str
) -> None:
    stuck = [pod(MASTER, "Pending", waiting=waiting)]
    cluster = FakeCluster([(job_state(CREATED), stuck, {})])
    with pytest.raises(JobFailed) as info:
        launch(cluster, tmp_path, start_grace_seconds=120)
    assert waiting[0] in str(info.value) and waiting[1] in str(info.value) and hint in str(info.value)
    assert 120 <= launch.clock.now <= 130  # type: ignore[attr-defined]  # not the 12 h timeout
    assert cluster.jobs == {}


def test_pods_the_api_server_rejects_fail_within_minutes_with_the_event(tmp_path: Path) -> None:
    # pod_control.go CreatePodsWithControllerRef: a rejected create is a FailedCreatePod event on the job, no pod
    message = 'Error creating: pods "x" is forbidden: error looking up service account team-a/runner: not found'
    job = job_state(CREATED)
    job.spec.pytorch_replica_specs = {"Master": KubeflowOrgV1ReplicaSpec(replicas=1)}
    cluster = FakeCluster([(job, [], {NAME: [("FailedCreatePod", message)]})])
    with pytest.raises(JobFailed, match=r"cannot create its pods: Error creating.*service account") as info:
        launch(cluster, tmp_path, start_grace_seconds=120)
    assert "service_account parameter" in str(info.value)
    assert launch.clock.now <= 130  # type: ignore[attr-defined]


@pytest.mark.parametrize("reason", ["in backoff after failed scale-up", "not ready for scale-up"])
def test_a_temporary_no_scale_up_is_waited_for_then_capacity_arrives(tmp_path: Path, reason: str) -> None:
    pending = [pod(MASTER, "Pending", unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")]
    verdict = {MASTER: [("NotTriggerScaleUp", f"pod didn't trigger scale-up: 1 {reason}, 2 Insufficient cpu")]}
    cluster = FakeCluster(
        [(job_state(CREATED), pending, verdict)] * 30
        + [(job_state(CREATED, SUCCEEDED), [pod(MASTER, "Succeeded", exit_code=0)], {})],
        logs={MASTER: "ok\n"},
    )
    assert launch(cluster, tmp_path).waiting_for_capacity_seconds == 300


def test_a_temporary_no_scale_up_that_lasts_fails_after_the_bound(tmp_path: Path) -> None:
    pending = [pod(MASTER, "Pending", unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")]
    verdict = {MASTER: [("NotTriggerScaleUp", "pod didn't trigger scale-up: 1 in backoff after failed scale-up")]}
    cluster = FakeCluster([(job_state(CREATED), pending, verdict)])
    with pytest.raises(JobUnschedulable, match=r"no capacity after 600 s.*in backoff after failed scale-up"):
        launch(cluster, tmp_path, capacity_wait_seconds=600)
    assert cluster.jobs == {}


def test_transient_api_errors_are_retried_and_the_job_succeeds(tmp_path: Path) -> None:
    errors: list[BaseException] = [api_error(503), TimeoutError("Timeout to get PyTorchJob"), api_error(500)]
    cluster = FakeCluster(
        [
            (job_state(CREATED, RUNNING), [pod(MASTER, "Running")], {}),
            (job_state(CREATED, SUCCEEDED), [pod(MASTER, "Succeeded", exit_code=0)], {}),
        ],
        logs={MASTER: "ok\n"},
        failures={"get": errors, "pods": [api_error(429)], "delete": [api_error(502)]},
    )
    launch(cluster, tmp_path)
    assert cluster.jobs == {}  # the delete was retried too
    assert sum("retrying" in m for m in launch.messages) == 5  # type: ignore[attr-defined]


def test_api_errors_that_last_fail_after_the_bound_and_permanent_ones_at_once(tmp_path: Path) -> None:
    states = [(job_state(CREATED, RUNNING), [pod(MASTER, "Running")], {})]
    lasting = FakeCluster(states, failures={"get": [api_error(503) for _ in range(100)]})
    with pytest.raises(RuntimeError, match="Failed to get"):
        launch(lasting, tmp_path, api_retry_seconds=120)
    assert 120 <= launch.clock.now <= 200  # type: ignore[attr-defined]
    forbidden = FakeCluster(states, failures={"get": [api_error(403)]})
    with pytest.raises(RuntimeError, match="Failed to get"):
        launch(forbidden, tmp_path)
    assert launch.clock.now == 0  # type: ignore[attr-defined]


def test_a_finished_job_of_an_earlier_attempt_is_replaced_not_adopted(tmp_path: Path) -> None:
    old = (job_state(CREATED, FAILED, message="PyTorchJob failed"), [pod(MASTER, "Failed", exit_code=1)], {})
    cluster = FakeCluster(
        [old, (job_state(CREATED, SUCCEEDED), [pod(MASTER, "Succeeded", exit_code=0, uid="new")], {})],
        logs={MASTER: "ok\n"},
        existing=True,
    )
    outcome = launch(cluster, tmp_path)
    assert not outcome.adopted and cluster.created == 1 and cluster.deletes == 2
    assert "is Failed: deleting it and creating it again" in launch.messages[0]  # type: ignore[attr-defined]


def test_sigterm_deletes_the_job(tmp_path: Path) -> None:
    # KFP's Terminate, an eviction or a node drain send SIGTERM to the step; Python's default would exit without
    # running the launcher's finally
    states = [(job_state(CREATED, RUNNING), [pod(MASTER, "Running")], {})]

    class Terminated(FakeCluster):
        def get(self, name: str) -> KubeflowOrgV1PyTorchJob | None:
            if self.polls == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().get(name)

    cluster = Terminated(states, logs={MASTER: "x\n"})
    with pytest.raises(JobTerminated, match="terminated"):
        launch(cluster, tmp_path)
    assert cluster.jobs == {} and cluster.deletes == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the step's own handler is back


def test_a_sigterm_in_the_middle_of_a_call_leaves_no_lock_taken(tmp_path: Path) -> None:
    # the signal lands while the main thread is inside a client call that holds a lock taken outside any `try`
    # (as logging's module lock is between its acquire and its `try`): raising there would leave it taken for good,
    # and the delete, or any other thread, would wait on it forever; JobTerminated comes at the next wait instead
    states = [(job_state(CREATED, RUNNING), [pod(MASTER, "Running")], {})]
    lock = threading.Lock()

    class Terminated(FakeCluster):
        def get(self, name: str) -> KubeflowOrgV1PyTorchJob | None:
            lock.acquire()
            if self.polls == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode, with the lock held
            held = super().get(name)
            lock.release()
            return held

        def delete(self, name: str) -> None:
            with lock:
                super().delete(name)

    cluster = Terminated(states, logs={MASTER: "x\n"})
    with pytest.raises(JobTerminated, match="terminated"):
        launch(cluster, tmp_path)
    assert lock.acquire(blocking=False)
    assert cluster.jobs == {} and cluster.deletes == 1


def test_a_replica_deleted_between_polls_is_still_counted_and_its_exit_read_from_the_operators_event(
    tmp_path: Path,
) -> None:
    # the operator deletes a pod that exited >= 128 within milliseconds: a poller sees only new uids, and the exit
    # code survives in the job's ExitedWithCode event (common/pod.go ReconcilePods)
    exited = {NAME: [("ExitedWithCode", f"Pod: kubeflow.{WORKER} exited with code 137")]}
    states = [
        (job_state(CREATED, RUNNING), [pod(MASTER, "Running"), restarted(f"w{i}", exit_code=None)], exited)
        for i in range(6)
    ]
    cluster = FakeCluster(states, logs={MASTER: "m\n", WORKER: "resumed from round 2\n"})
    with pytest.raises(JobFailed) as info:
        launch(cluster, tmp_path, max_restarts=2)
    text = str(info.value)
    assert "restarted 3 times (limit 2" in text
    assert "exit code 137 (SIGKILL: the OOM killer at its memory limit of 4Gi, or a preemption" in text
    assert f'resource.labels.pod_name="{WORKER}"' in text and text.rstrip().endswith("resumed from round 2")


def test_the_restart_limit_blames_the_killed_replica_not_the_peers_it_took_down(tmp_path: Path) -> None:
    # rank 1 is OOM-killed; rank 0 then loses its peer in the all-reduce and exits 200: both are recreated
    states = []
    for i in range(4):
        states.append(
            (job_state(CREATED, RUNNING), [pod(MASTER, "Running", uid=f"m{i}"), restarted(f"w{i}", exit_code=None)], {})
        )
        master_lost = pod(MASTER, "Failed", exit_code=200, reason="Error", uid=f"m{i}")
        states.append((job_state(CREATED, ("Restarting", "True")), [master_lost, restarted(f"w{i}")], {}))
    cluster = FakeCluster(states, logs={MASTER: "peer lost\n", WORKER: "epoch 3\n"})
    with pytest.raises(JobFailed, match=rf"replica {WORKER} was restarted 2 times \(limit 1.*OOMKilled"):
        launch(cluster, tmp_path, max_restarts=1)
