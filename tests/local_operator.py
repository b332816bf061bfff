"""A local model of the Kubeflow Training Operator v1.9 PyTorchJob controller whose pods are real processes.

`LocalOperator` implements the launcher's cluster protocol (create / get / pods / pod_log / events / delete) with
the kubeflow-training and kubernetes clients' own model classes. Each pod's `pytorch` container runs as a
subprocess with the environment the operator would inject, so a test drives the real manifest, the real worker
command and the real launcher. A background thread plays the kubelet (starts containers, reports exits) and the
controller (reconciles every job whose pods changed), so the launcher sees the states asynchronously, as it
would on a cluster.

The controller's rules, each with its source in kubeflow/training-operator at tag v1.9.0 (file :: function):

Rule (what this model does)                                      | Source: file :: function
-----------------------------------------------------------------+------------------------------------------------------
Defaults: cleanPodPolicy None, replicas 1, restartPolicy         | pkg/apis/kubeflow.org/v1/pytorch_defaults.go
OnFailure, port `pytorchjob-port` 23456 on the `pytorch`         | :: SetDefaults_PyTorchJob, setPyTorchDefaultPort
container, nprocPerNode `auto`                                   |
-----------------------------------------------------------------+------------------------------------------------------
Admission: the name is a DNS-1035 label; replica types           | pkg/webhooks/pytorch/pytorchjob_webhook.go
Master/Worker, each with a container named `pytorch` and an      | :: validatePyTorchJob, validatePyTorchReplicaSpecs
image; Master replicas must be 1                                 |
-----------------------------------------------------------------+------------------------------------------------------
Condition Created ("PyTorchJob X is created.") when the          | pkg/controller.v1/pytorch/pytorchjob_controller.go
controller first sees the job                                    | :: onOwnerCreateFunc
-----------------------------------------------------------------+------------------------------------------------------
Pod `<job>-<master|worker>-<index>`; labels job-name, operator-  | pkg/controller.v1/common/pod.go :: createNewPod
name, replica-type (lower case), replica-index, job-role=master; | pkg/core/utils.go :: GenGeneralName
controller ownerReference                                        | pkg/controller.v1/common/job_controller.go
                                                                 | :: GenLabels, GenOwnerReference
-----------------------------------------------------------------+------------------------------------------------------
Env of every container: PYTHONUNBUFFERED=1; ONLY when a Master   | pkg/controller.v1/pytorch/envvar.go
replica exists: MASTER_PORT/PET_MASTER_PORT (the Master's        | :: setPodEnv, getNprocPerNodeInt
pytorchjob-port), MASTER_ADDR/PET_MASTER_ADDR `<job>-master-0`,  | pkg/controller.v1/pytorch/master.go
WORLD_SIZE (replicas x nproc, `auto` counts 1), RANK =           | :: MasterEnvVarGenerator.Generate
PET_NODE_RANK = index (+1 for a Worker); always PET_NNODES,      |
PET_NPROC_PER_NODE                                               |
-----------------------------------------------------------------+------------------------------------------------------
Workers (when a Master exists) get the `init-pytorch` init       | pkg/controller.v1/pytorch/initcontainer.go
container (nslookup of the Master)                               | :: setInitContainer
-----------------------------------------------------------------+------------------------------------------------------
restartPolicy ExitCode gives the pod restartPolicy Never (its    | pkg/core/pod.go :: SetRestartPolicy
restartCount stays 0)                                            |
-----------------------------------------------------------------+------------------------------------------------------
A pod creation the API server rejects: Warning event             | pkg/controller.v1/control/pod_control.go
FailedCreatePod "Error creating: <error>" on the JOB, no pod;    | :: RealPodControl.createPods
ReconcilePods returns the error, so that pass writes no status   | pkg/controller.v1/common/pod.go :: createNewPod
and the job is requeued (backoff). Accepted: SuccessfulCreatePod | pkg/controller.v1/common/job.go :: ReconcileJobs
"Created pod: P"                                                 |
-----------------------------------------------------------------+------------------------------------------------------
Every terminated `pytorch` container: event ExitedWithCode "Pod: | pkg/controller.v1/common/pod.go :: ReconcilePods
NS.P exited with code N" on the job                              |
-----------------------------------------------------------------+------------------------------------------------------
A Failed pod under restartPolicy ExitCode: exit code >= 128      | pkg/controller.v1/common/pod.go :: ReconcilePods
(retryable): the pod is DELETED and recreated on the next pass   | pkg/util/train/train_util.go
with the same name and a new UID, condition Restarting; exit     | :: IsRetryableExitCode
1..127: condition Failed, pod kept                               |
-----------------------------------------------------------------+------------------------------------------------------
Replica status: Running pods count active, Succeeded succeeded,  | pkg/core/status.go :: UpdateJobReplicaStatuses
Failed failed                                                    |
-----------------------------------------------------------------+------------------------------------------------------
With a Master: Running while the Master runs; Succeeded as soon  | pkg/controller.v1/pytorch/pytorchjob_controller.go
as the Master's replicas - succeeded is 0, whatever the Workers  | :: UpdateJobStatus
do ("when master is succeed, the job is finished"). Without one: |
Succeeded when every Worker succeeded. failed > 0 and replicas > |
succeeded + running: Restarting unless restartPolicy is Never    |
(then Failed)                                                    |
-----------------------------------------------------------------+------------------------------------------------------
Replica types are visited in Go map order (random; seeded here): | pkg/controller.v1/common/job.go :: ReconcileJobs
in one pass the Master's Running and a Worker's Restarting       | pytorchjob_controller.go :: UpdateJobStatus
overwrite each other, so a poller may never see Restarting       | (`for rtype, spec := range replicas`)
-----------------------------------------------------------------+------------------------------------------------------
Conditions: nothing changes once Failed; same status and reason: | pkg/util/status.go :: UpdateJobConditions,
no change; Running and Restarting replace each other;            | setCondition, filterOutCondition
Succeeded/Failed turn Running to False; a new condition is       |
appended last                                                    |
-----------------------------------------------------------------+------------------------------------------------------
backoffLimit never fires under ExitCode: PastBackoffLimit sums   | pkg/core/job.go :: PastBackoffLimit
the RestartCount of Running pods only (0 with the pod policy     | pkg/controller.v1/common/job.go :: ReconcileJobs
Never; upstream issue #2045); exceedsBackoffLimit needs          | pkg/common/util/fake_workqueue.go
NumRequeues + 1 > backoffLimit and NumRequeues is always 0       | :: FakeWorkQueue.NumRequeues
-----------------------------------------------------------------+------------------------------------------------------
activeDeadlineSeconds: every pod deleted, condition Failed "Job  | pkg/controller.v1/common/job.go :: ReconcileJobs
X has failed because it was active longer than specified         | pkg/core/job.go :: PastActiveDeadline
deadline"; checked only when a reconcile runs (the AddAfter      | pkg/common/util/fake_workqueue.go
requeue is a no-op)                                              | :: FakeWorkQueue.AddAfter
-----------------------------------------------------------------+------------------------------------------------------
A finished job: pods deleted by cleanPodPolicy (None keeps every | pkg/controller.v1/common/job.go
pod and running ones go on running; Running deletes Running and  | :: ReconcileJobs, CleanUpResources,
Pending pods; All deletes all); active replicas then count as    | DeletePodsAndServices
succeeded                                                        |
-----------------------------------------------------------------+------------------------------------------------------
ttlSecondsAfterFinished: the job is deleted that long after its  | pkg/controller.v1/common/job.go :: CleanupJob
completion time                                                  |
-----------------------------------------------------------------+------------------------------------------------------
An active pod whose container waits with a message               | pkg/core/job.go :: RecordAbnormalPods
(ErrImagePull, ...): Warning event, reason = the waiting reason, |
"Error pod P container C waiting message: M", on the job         |
-----------------------------------------------------------------+------------------------------------------------------

What Kubernetes itself does (not the operator) and is modelled too: a container killed by signal N exits 128 + N;
the OOM killer gives exit 137, reason `OOMKilled`; other exits: reason `Completed` (0) or `Error`; timestamps have
one-second resolution; an image that cannot be pulled keeps the pod Pending with the container waiting
`ErrImagePull`, then `ImagePullBackOff` (and events `Failed`/`BackOff` on the pod), and no process; the
ServiceAccount admission plugin rejects a pod whose service account does not exist (`pods "P" is forbidden:
error looking up service account NS/SA: serviceaccount "SA" not found`); a pod's log is gone with the pod (404)
and unavailable while its container waits (400); deleting a job garbage-collects its pods (ownerReference);
events outlive the object they are about, so a re-created job of the same name lists its predecessor's too.

Deliberate differences: every pod shares this machine's network, so the processes get MASTER_ADDR=127.0.0.1
and a free port chosen per job instead of `<job>-master-0:23456` (the pods' spec shows the cluster values); the
processes inherit this process's environment (minus the rank variables) for the venv and the storage emulator;
only the `pytorch` container runs; restartPolicy `OnFailure`/`Always` (in-place kubelet restarts) are not
modelled and are refused.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubeflow.training import (
    KubeflowOrgV1JobCondition,
    KubeflowOrgV1JobStatus,
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1ReplicaStatus,
)
from kubernetes.client import (
    V1Container,
    V1ContainerPort,
    V1ContainerState,
    V1ContainerStateRunning,
    V1ContainerStateTerminated,
    V1ContainerStateWaiting,
    V1ContainerStatus,
    V1EnvVar,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodCondition,
    V1PodSpec,
    V1PodStatus,
    V1ResourceRequirements,
)
from kubernetes.client.exceptions import ApiException

from microfed.training.launch import free_port

__all__ = ["LocalOperator", "OomKill", "exceeded_quota"]

KIND = "PyTorchJob"
CONTROLLER_NAME = "pytorchjob-controller"
CONTAINER = "pytorch"
PORT_NAME, DEFAULT_PORT = "pytorchjob-port", 23456
MASTER, WORKER = "Master", "Worker"
LABEL_JOB_NAME = "training.kubeflow.org/job-name"
LABEL_OPERATOR = "training.kubeflow.org/operator-name"
LABEL_REPLICA_TYPE = "training.kubeflow.org/replica-type"
LABEL_REPLICA_INDEX = "training.kubeflow.org/replica-index"
LABEL_JOB_ROLE = "training.kubeflow.org/job-role"
INIT_IMAGE, INIT_MAX_TRIES = "alpine:3.10", 100  # pkg/config/config.go defaults
_BEEF = 0xBEEF  # ReconcilePods' exit code for a pod without a terminated `pytorch` container
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# The test process's own rank variables must not leak into a pod that the operator gives none.
_RANK_ENV = re.compile(r"^(MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|PET_.*)$")


@dataclass(frozen=True)
class OomKill:
    """The kernel's OOM killer ends the container of replica `rank` (RANK as the operator numbers them: the Master
    0, Worker i i + 1; without a Master, Worker i) `after_seconds` after it started and, if `when_log_contains`
    is set, once the log of replica `watch_rank` (default: `rank`) holds that text; the first `times`
    incarnations of that replica are killed, later ones run on."""

    rank: int
    after_seconds: float = 0.0
    when_log_contains: str | None = None
    watch_rank: int | None = None
    times: int = 1


def exceeded_quota(quota: str = "compute-resources", resource: str = "limits.memory") -> Callable[[V1Pod], str]:
    """An admission rule for `LocalOperator(admission=...)`: the namespace's ResourceQuota rejects every pod."""

    def rule(pod: V1Pod) -> str:
        return (
            f'pods "{pod.metadata.name}" is forbidden: exceeded quota: {quota}, requested: {resource}=8Gi, '
            f"used: {resource}=0, limited: {resource}=4Gi"
        )

    return rule


def _now() -> datetime.datetime:
    """A Kubernetes timestamp: UTC, whole seconds."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@dataclass
class _Pod:
    """One pod object (a recreated replica is a new _Pod with the same name and a new uid)."""

    job: str
    namespace: str
    name: str
    uid: str
    rtype: str
    index: int
    rank: int  # the rank the operator's numbering gives (for OomKill), whether or not RANK is injected
    spec: V1PodSpec
    labels: dict[str, str]
    annotations: dict[str, str]
    owner: V1OwnerReference
    created: datetime.datetime
    log_path: Path
    phase: str = "Pending"
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    started_mono: float = 0.0
    started_at: datetime.datetime | None = None
    terminated: V1ContainerStateTerminated | None = None
    oom_killed: bool = False
    pull_attempts: int = 0
    pull_next: float = 0.0
    pull_backoff_at: float = 0.0

    @property
    def container(self) -> V1Container:
        return next(c for c in self.spec.containers if c.name == CONTAINER)


@dataclass
class _Job:
    obj: KubeflowOrgV1PyTorchJob  # as stored by the API server (defaults applied); .status rendered on read
    uid: str
    port: int  # the local stand-in for the Master's pytorchjob-port
    status: dict[str, Any] = field(
        default_factory=lambda: {
            "conditions": [],
            "replica_statuses": {},
            "start_time": None,
            "completion_time": None,
        }
    )
    created: KubeflowOrgV1JobCondition | None = None  # onOwnerCreateFunc's condition, on the cached object
    signature: tuple[Any, ...] | None = None
    changed_at: float | None = None
    dirty: bool = True  # a status update is itself a watch event: reconcile once more
    errors: int = 0
    requeue_at: float | None = None


class LocalOperator:
    """The launcher's JobBackend, served by a local model of the Training Operator v1.9 (see the module doc)."""

    def __init__(
        self,
        log_dir: Path,
        extra_env: dict[str, str] | None = None,
        *,
        unpullable_images: Iterable[str] = (),
        service_accounts: Iterable[str] | None = None,
        admission: Callable[[V1Pod], str | None] | None = None,
        oom_kills: Sequence[OomKill] = (),
        seed: int = 0,
        tick_seconds: float = 0.05,
        image_pull_backoff_seconds: float = 0.5,
        grace_seconds: float = 2.0,
        reaction_seconds: float = 0.0,
    ) -> None:
        """`unpullable_images`: images no node can pull. `service_accounts`: the service accounts that exist in
        every namespace (None: any); a pod naming another one is rejected by the API server. `admission`: an
        extra admission rule, returning the error of a rejected pod (e.g. `exceeded_quota()`). `oom_kills`:
        OOM kills to inflict. `seed`: the order replica types are visited in (Go map order is random).
        `reaction_seconds`: how long after a pod changes the controller reacts (its informer's latency: on a
        cluster milliseconds, so a poller almost never sees the terminated state of a pod that exited 128-255
        before the controller deletes it; raise it to let a test observe that state)."""
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(extra_env or {})
        self.unpullable_images = set(unpullable_images)
        self.service_accounts = None if service_accounts is None else set(service_accounts)
        self.admission = admission
        self.oom_kills = list(oom_kills)
        self.tick_seconds = tick_seconds
        self.image_pull_backoff_seconds = image_pull_backoff_seconds
        self.grace_seconds = grace_seconds
        self.reaction_seconds = reaction_seconds
        self.jobs: dict[str, _Job] = {}
        self.created: list[KubeflowOrgV1PyTorchJob] = []  # as submitted
        self.deleted: list[str] = []  # names deleted through delete()
        self.history: dict[str, list[tuple[str, str]]] = {}  # job -> every condition change (type, status)
        self.pod_uids: dict[str, list[str]] = {}  # pod name -> the uid of each pod of that name, oldest first
        self._pods: list[_Pod] = []
        self._events: list[dict[str, Any]] = []
        self._seq = 0
        self._oom_done: dict[int, int] = {}
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._crash: BaseException | None = None
        self._closed = False
        atexit.register(self.close)

    # --- the launcher's protocol -----------------------------------------------------------------------

    def create(self, job: KubeflowOrgV1PyTorchJob) -> bool:
        """Create the job; False when a job of that name exists (the API server's 409)."""
        with self._api():
            name = str(job.metadata.name)
            if name in self.jobs:
                return False
            stored = copy.deepcopy(job)
            _set_defaults(stored)
            _validate(stored)
            for rtype, spec in stored.spec.pytorch_replica_specs.items():
                if spec.restart_policy not in ("ExitCode", "Never"):
                    raise NotImplementedError(
                        f"LocalOperator models restartPolicy ExitCode and Never, not {spec.restart_policy} ({rtype})"
                    )
            uid = str(uuid.uuid4())
            stored.metadata.uid = uid
            stored.metadata.namespace = stored.metadata.namespace or "default"
            stored.metadata.creation_timestamp = _now()
            stored.status = None
            self.jobs[name] = _Job(obj=stored, uid=uid, port=free_port())
            self.created.append(job)
            self.history.setdefault(name, [])
            self._ensure_thread()
            return True

    def get(self, name: str) -> KubeflowOrgV1PyTorchJob | None:
        with self._api():
            j = self.jobs.get(name)
            if j is None:
                return None
            job = copy.deepcopy(j.obj)
            st = j.status
            job.status = KubeflowOrgV1JobStatus(
                conditions=copy.deepcopy(st["conditions"]) or None,
                replica_statuses=copy.deepcopy(st["replica_statuses"]) or None,
                start_time=st["start_time"],
                completion_time=st["completion_time"],
            )
            return job

    def pods(self, name: str) -> list[V1Pod]:
        with self._api():
            return [_v1pod(p) for p in sorted(self._live(name), key=lambda p: p.name)]

    def pod_log(self, pod: str) -> str:
        with self._api():
            found = [p for p in self._pods if p.name == pod]
            if not found:
                raise ApiException(status=404, reason=f'pods "{pod}" not found')
            p = found[0]
            if p.proc is None:
                reason = p.waiting[0] if p.waiting else "PodInitializing"
                raise ApiException(
                    status=400, reason=f'container "{CONTAINER}" in pod "{pod}" is waiting to start: {reason}'
                )
            return p.log_path.read_text(errors="replace")

    def events(self, name: str, uid: str | None = None) -> list[tuple[str, str]]:
        """(reason, message) of the events about the object `name` (a job or a pod), oldest first; a repeated
        event counts up and moves to the end, as the API server's event aggregation does. Events outlive their
        object: with `uid` (the involvedObject.uid field selector) only those of that incarnation."""
        with self._api():
            mine = [e for e in self._events if e["object"] == name and uid in (None, e["uid"])]
            return [(e["reason"], e["message"]) for e in sorted(mine, key=lambda e: e["seq"])]

    def delete(self, name: str) -> None:
        """Delete the job; the garbage collector deletes its pods (ownerReference). No error when gone."""
        with self._api():
            if self._delete_job(name):
                self.deleted.append(name)

    # --- helpers for tests -----------------------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 60.0, what: str = "the condition") -> None:
        """Poll `predicate` (outside the lock) until it holds; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"LocalOperator: {what} did not happen within {timeout} s")
            time.sleep(self.tick_seconds)

    def state(self, name: str) -> str:
        """The job's current state as a watcher reads it: the last condition whose status is True."""
        job = self.get(name)
        conds = [c for c in (job.status.conditions or []) if c.status == "True"] if job and job.status else []
        return str(conds[-1].type) if conds else ("Gone" if job is None else "Pending")

    def pod_env(self, pod: str) -> dict[str, str]:
        """The `pytorch` container's environment in the pod spec (cluster values)."""
        with self._api():
            (p,) = [p for p in self._pods if p.name == pod]
            return {e.name: e.value for e in p.container.env or []}

    def close(self) -> None:
        """Stop the controller and kill every pod's process (idempotent)."""
        with self._lock:
            self._closed = True
            self._stop.set()
            for name in list(self.jobs):
                self._delete_job(name)
            for p in list(self._pods):
                self._kill([p])
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def __enter__(self) -> LocalOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- machinery -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _api(self) -> Any:
        with self._lock:
            if self._crash is not None:
                raise RuntimeError("LocalOperator's controller thread crashed") from self._crash
            yield

    def _ensure_thread(self) -> None:
        if self._closed:
            raise RuntimeError("LocalOperator is closed")
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="local-operator", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                try:
                    self._tick()
                except BaseException as e:  # surfaced by the next API call
                    self._crash = e
                    return
                if not self.jobs and not any(p.proc is not None and p.proc.poll() is None for p in self._pods):
                    self._thread = None
                    return
            self._stop.wait(self.tick_seconds)

    def _tick(self) -> None:
        now = time.monotonic()
        for p in list(self._pods):
            self._kubelet(p, now)
        for name in list(self.jobs):
            j = self.jobs.get(name)
            if j is None:
                continue
            sig = tuple((p.name, p.uid, p.phase, p.waiting[0] if p.waiting else "") for p in self._live(name))
            if sig != j.signature:
                j.changed_at = now if j.changed_at is None else j.changed_at
                if now - j.changed_at < self.reaction_seconds:
                    continue  # the controller's cache has not seen the change yet
            due = j.requeue_at is not None and now >= j.requeue_at
            if sig != j.signature or j.dirty or due or j.created is None:
                j.signature, j.changed_at, j.requeue_at = sig, None, None
                self._reconcile(name, j)

    def _live(self, job: str) -> list[_Pod]:
        return [p for p in self._pods if p.job == job]

    def _event(self, obj: str, reason: str, message: str, kind: str = "Normal") -> None:
        self._seq += 1
        uid = self._uid_of(obj)
        for e in self._events:
            if (e["object"], e["uid"], e["reason"], e["message"]) == (obj, uid, reason, message):
                e["count"] += 1
                e["seq"] = self._seq
                return
        self._events.append(
            {"object": obj, "uid": uid, "reason": reason, "message": message, "type": kind, "count": 1}
            | {"seq": self._seq}
        )

    def _uid_of(self, obj: str) -> str:
        """The uid of the job or (newest) pod called `obj` now: the event's involvedObject.uid."""
        if obj in self.jobs:
            return self.jobs[obj].uid
        pods = [p for p in self._pods if p.name == obj]
        return pods[-1].uid if pods else ""

    # --- the kubelet ---------------------------------------------------------------------------------------

    def _kubelet(self, p: _Pod, now: float) -> None:
        if p.phase == "Pending":
            if p.container.image in self.unpullable_images:
                self._pull_failure(p, now)
            else:
                self._start(p, now)
        elif p.phase == "Running" and p.proc is not None:
            self._oom(p, now)
            code = p.proc.poll()
            if code is not None:
                self._exited(p, code)

    def _pull_failure(self, p: _Pod, now: float) -> None:
        image = p.container.image
        if p.pull_attempts == 0:
            self._event(p.name, "Scheduled", f"Successfully assigned {p.namespace}/{p.name} to local-node")
        if now >= p.pull_next:
            p.pull_attempts += 1
            error = (
                f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to resolve '
                f'reference "{image}": {image}: not found'
            )
            self._event(p.name, "Pulling", f'Pulling image "{image}"')
            self._event(p.name, "Failed", f'Failed to pull image "{image}": {error}', "Warning")
            self._event(p.name, "Failed", "Error: ErrImagePull", "Warning")
            p.waiting = ("ErrImagePull", error)
            p.pull_backoff_at = now + self.image_pull_backoff_seconds
            p.pull_next = now + self.image_pull_backoff_seconds * 2 ** min(p.pull_attempts, 5)
        elif p.waiting and p.waiting[0] == "ErrImagePull" and now >= p.pull_backoff_at:
            p.waiting = ("ImagePullBackOff", f'Back-off pulling image "{image}"')
            self._event(p.name, "BackOff", f'Back-off pulling image "{image}"')
            self._event(p.name, "Failed", "Error: ImagePullBackOff", "Warning")

    def _start(self, p: _Pod, now: float) -> None:
        c = p.container
        j = self.jobs[p.job]
        env = {k: v for k, v in os.environ.items() if not _RANK_ENV.match(k)}
        env.update(self.extra_env)
        for e in c.env or []:
            if e.value is not None:
                env[e.name] = e.value
        # one machine, one network: the Master's DNS name and container port become loopback and a free port
        for key in ("MASTER_ADDR", "PET_MASTER_ADDR"):
            if key in env:
                env[key] = "127.0.0.1"
        for key in ("MASTER_PORT", "PET_MASTER_PORT"):
            if key in env:
                env[key] = str(j.port)
        command = [sys.executable if part == "python" else part for part in [*(c.command or []), *(c.args or [])]]
        if not command:
            raise NotImplementedError("LocalOperator needs an explicit command in the pytorch container")
        self._event(p.name, "Scheduled", f"Successfully assigned {p.namespace}/{p.name} to local-node")
        self._event(p.name, "Pulled", f'Container image "{c.image}" already present on machine')
        self._event(p.name, "Created", f"Created container {CONTAINER}")
        p.log_file = open(p.log_path, "wb")  # noqa: SIM115 - closed when the process is reaped
        p.proc = subprocess.Popen(command, env=env, stdout=p.log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self._event(p.name, "Started", f"Started container {CONTAINER}")
        p.phase, p.waiting = "Running", None
        p.started_mono, p.started_at = now, _now()

    def _oom(self, p: _Pod, now: float) -> None:
        for i, oom in enumerate(self.oom_kills):
            if oom.rank != p.rank or self._oom_done.get(i, 0) >= oom.times or now - p.started_mono < oom.after_seconds:
                continue
            if oom.when_log_contains is not None and not self._log_holds(p, oom):
                continue
            self._oom_done[i] = self._oom_done.get(i, 0) + 1
            p.oom_killed = True
            _signal(p, signal.SIGKILL)
            p.proc.wait()  # type: ignore[union-attr]
            return

    def _log_holds(self, p: _Pod, oom: OomKill) -> bool:
        watched = p if oom.watch_rank in (None, p.rank) else None
        if watched is None:
            watched = next((q for q in self._live(p.job) if q.rank == oom.watch_rank and q.proc is not None), None)
        if watched is None:
            return False
        return str(oom.when_log_contains) in watched.log_path.read_text(errors="replace")

    def _exited(self, p: _Pod, code: int) -> None:
        exit_code = code if code >= 0 else 128 - code  # a signal N gives 128 + N in a container
        reason = "OOMKilled" if p.oom_killed else "Completed" if exit_code == 0 else "Error"
        p.terminated = V1ContainerStateTerminated(
            exit_code=exit_code,
            reason=reason,
            started_at=p.started_at,
            finished_at=_now(),
            container_id=f"local://{p.uid}",
        )
        p.phase = "Succeeded" if exit_code == 0 else "Failed"
        if p.log_file is not None:
            p.log_file.close()
            p.log_file = None

    def _kill(self, pods: list[_Pod]) -> None:
        """Delete pods: SIGTERM, then SIGKILL after the grace period; the pod objects disappear."""
        running = [p for p in pods if p.proc is not None and p.proc.poll() is None]
        for p in running:
            self._event(p.name, "Killing", f"Stopping container {CONTAINER}")
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        for p in running:
            try:
                p.proc.wait(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                _signal(p, signal.SIGKILL)
                p.proc.wait()  # type: ignore[union-attr]
        for p in pods:
            if p.log_file is not None:
                p.log_file.close()
                p.log_file = None
            if p in self._pods:
                self._pods.remove(p)

    def _delete_job(self, name: str) -> bool:
        j = self.jobs.pop(name, None)
        self._kill(self._live(name))
        return j is not None

    # --- the controller ----------------------------------------------------------------------------------

    def _reconcile(self, name: str, j: _Job) -> None:
        """ReconcileJobs + ReconcilePods + UpdateJobStatus for one job (see the table in the module doc)."""
        old = copy.deepcopy(j.status)
        st = copy.deepcopy(j.status)
        spec = j.obj.spec
        rp = spec.run_policy
        specs = spec.pytorch_replica_specs
        pods = list(self._live(name))
        if j.created is None:  # onOwnerCreateFunc sets it on the cached object: every pass starts from it
            self._set_condition(name, st, "Created", "True", f"{KIND}Created", f"PyTorchJob {name} is created.")
            j.created = st["conditions"][-1]
        elif not any(c.type == "Created" for c in st["conditions"]):
            st["conditions"].insert(0, copy.deepcopy(j.created))
        if _finished(st):
            self._delete_pods_and_services(name, rp, st, pods)
            if _is_true(st, "Succeeded"):
                for rs in st["replica_statuses"].values():
                    rs.succeeded += rs.active
                    rs.active = 0
            self._write(j, old, st)
            if rp.ttl_seconds_after_finished is not None and st["completion_time"] is not None:
                expire = st["completion_time"] + datetime.timedelta(seconds=rp.ttl_seconds_after_finished)
                left = (expire - datetime.datetime.now(datetime.UTC)).total_seconds()
                if left <= 0:
                    self._delete_job(name)
                else:
                    j.requeue_at = time.monotonic() + left
            return
        active = [p for p in pods if p.phase not in ("Succeeded", "Failed")]
        self._record_abnormal(name, active)
        failed = sum(p.phase == "Failed" for p in pods)
        total = sum(s.replicas for s in specs.values())
        prev_failed = sum(rs.failed for rs in st["replica_statuses"].values())
        failure = None
        if rp.backoff_limit is not None:
            previous_retry = 0  # FakeWorkQueue.NumRequeues
            exceeds = failed > prev_failed and len(active) != total and previous_retry + 1 > rp.backoff_limit
            if exceeds or _past_backoff_limit(rp, specs, pods):
                failure = f"Job {name} has failed because it has reached the specified backoff limit"
        if failure is None and _past_active_deadline(rp, st):
            failure = f"Job {name} has failed because it was active longer than specified deadline"
        if failure is not None:
            st["completion_time"] = st["completion_time"] or _now()
            self._kill(pods)  # DeletePodsAndServices on a job not yet finished: every pod
            for p in pods:
                self._event(name, "SuccessfulDeletePod", f"Deleted pod: {p.name}")
            self._event(name, f"{KIND}Failed", failure)
            self._set_condition(name, st, "Failed", "True", f"{KIND}Failed", failure)
            self._write(j, old, st)
            return
        order = list(specs)
        self._rng.shuffle(order)  # Go map iteration order
        for rtype in order:
            if not self._reconcile_pods(name, j, st, pods, rtype):
                j.errors += 1  # controller-runtime requeues with exponential backoff; the status is not written
                j.requeue_at = time.monotonic() + min(0.005 * 2**j.errors, 1000.0)
                j.dirty = False
                return
        j.errors = 0
        self._update_job_status(name, j, st)
        self._write(j, old, st)

    def _write(self, j: _Job, old: dict[str, Any], st: dict[str, Any]) -> None:
        j.dirty = st != old
        j.status = st

    def _set_condition(self, name: str, st: dict[str, Any], ctype: str, cstatus: str, reason: str, msg: str) -> None:
        """pkg/util/status.go setCondition + filterOutCondition."""
        if _is_true(st, "Failed"):
            return
        conds: list[KubeflowOrgV1JobCondition] = st["conditions"]
        current = next((c for c in conds if c.type == ctype), None)
        if current is not None and current.status == cstatus and current.reason == reason:
            return
        now = _now()
        new = KubeflowOrgV1JobCondition(
            type=ctype, status=cstatus, reason=reason, message=msg, last_transition_time=now, last_update_time=now
        )
        if current is not None and current.status == cstatus:
            new.last_transition_time = current.last_transition_time
        kept = []
        for c in conds:
            if (ctype, c.type) in (("Restarting", "Running"), ("Running", "Restarting")) or c.type == ctype:
                continue
            if ctype in ("Failed", "Succeeded") and c.type == "Running":
                c = copy.deepcopy(c)
                c.status = "False"
            kept.append(c)
        st["conditions"] = [*kept, new]
        self.history[name].append((ctype, cstatus))

    def _record_abnormal(self, name: str, active: list[_Pod]) -> None:
        """pkg/core/job.go RecordAbnormalPods."""
        for p in active:
            for cs in _v1pod(p).status.container_statuses:
                term, wait = cs.state.terminated, cs.state.waiting
                if term is not None and term.exit_code != 0:
                    self._event(
                        name,
                        str(term.reason),
                        f"Error pod {p.name} container {cs.name} exitCode: {term.exit_code} terminated message: "
                        f"{term.message or ''}",
                        "Warning",
                    )
                if wait is not None and wait.message:
                    self._event(
                        name,
                        str(wait.reason),
                        f"Error pod {p.name} container {cs.name} waiting message: {wait.message}",
                        "Warning",
                    )

    def _delete_pods_and_services(self, name: str, rp: Any, st: dict[str, Any], pods: list[_Pod]) -> None:
        """pkg/controller.v1/common/job.go DeletePodsAndServices, for a finished job."""
        if not pods or rp.clean_pod_policy == "None":
            return
        doomed = [p for p in pods if rp.clean_pod_policy != "Running" or p.phase in ("Running", "Pending")]
        self._kill(doomed)
        for p in doomed:
            self._event(name, "SuccessfulDeletePod", f"Deleted pod: {p.name}")

    def _reconcile_pods(self, name: str, j: _Job, st: dict[str, Any], pods: list[_Pod], rtype: str) -> bool:
        """pkg/controller.v1/common/pod.go ReconcilePods; False where it returns an error."""
        spec = j.obj.spec.pytorch_replica_specs[rtype]
        mine = [p for p in pods if p.rtype == rtype]
        st["replica_statuses"][rtype] = KubeflowOrgV1ReplicaStatus(active=0, succeeded=0, failed=0)
        rs = st["replica_statuses"][rtype]
        size = max([spec.replicas, *(p.index + 1 for p in mine)])
        for index in range(size):
            slice_ = [p for p in mine if p.index == index]
            if len(slice_) > 1:
                continue
            if not slice_:
                if not self._create_pod(name, j, rtype, index):
                    return False
                continue
            pod = slice_[0]
            if index >= spec.replicas:
                self._kill([pod])
            exit_code = _BEEF
            if pod.terminated is not None:
                exit_code = pod.terminated.exit_code
                self._event(name, "ExitedWithCode", f"Pod: {pod.namespace}.{pod.name} exited with code {exit_code}")
            if pod.phase == "Failed":
                if spec.restart_policy == "ExitCode" and exit_code >= 128:  # IsRetryableExitCode
                    self._kill([pod])
                    self._event(name, "SuccessfulDeletePod", f"Deleted pod: {pod.name}")
                    msg = f"job {name} is restarting because {rtype} replica(s) failed."
                    self._event(name, f"{KIND}Restarting", msg, "Warning")
                    self._set_condition(name, st, "Restarting", "True", f"{KIND}Restarting", msg)
                elif spec.restart_policy == "ExitCode":
                    msg = f'job "{name}" is failing because "{rtype}" replica(s) failed.'
                    self._event(name, f"{KIND}Failed", msg, "Warning")
                    self._set_condition(name, st, "Failed", "True", f"{KIND}Failed", msg)
            # UpdateJobReplicaStatuses, on the pod as it was listed
            if pod.phase == "Running":
                rs.active += 1
            elif pod.phase == "Succeeded":
                rs.succeeded += 1
            elif pod.phase == "Failed":
                rs.failed += 1
        return True

    def _update_job_status(self, name: str, j: _Job, st: dict[str, Any]) -> None:
        """pkg/controller.v1/pytorch/pytorchjob_controller.go UpdateJobStatus."""
        job = j.obj
        specs = job.spec.pytorch_replica_specs
        ns = job.metadata.namespace
        if st["start_time"] is None:
            st["start_time"] = _now()
        order = list(specs)
        self._rng.shuffle(order)
        for rtype in order:
            spec = specs[rtype]
            rs = st["replica_statuses"].setdefault(rtype, KubeflowOrgV1ReplicaStatus(active=0, succeeded=0, failed=0))
            rs.selector = (
                f"{LABEL_JOB_NAME}={name},{LABEL_OPERATOR}={CONTROLLER_NAME},{LABEL_REPLICA_TYPE}={rtype.lower()}"
            )
            succeeded, running, failed = rs.succeeded, rs.active, rs.failed
            expected = spec.replicas - succeeded
            if MASTER in specs:
                if rtype == MASTER:
                    if running > 0:
                        msg = f"PyTorchJob {name} is running."
                        self._set_condition(name, st, "Running", "True", f"{KIND}Running", msg)
                    if expected == 0:  # "when master is succeed, the job is finished"
                        msg = f"PyTorchJob {name} is successfully completed."
                        self._event(name, f"{KIND}Succeeded", msg)
                        st["completion_time"] = st["completion_time"] or _now()
                        self._set_condition(name, st, "Succeeded", "True", f"{KIND}Succeeded", msg)
                        return
            elif rtype == WORKER:
                if expected == 0 or (job.spec.elastic_policy is not None and succeeded > 0):
                    msg = f"PyTorchJob {ns}/{name} successfully completed."
                    self._event(name, f"{KIND}Succeeded", msg)
                    st["completion_time"] = st["completion_time"] or _now()
                    self._set_condition(name, st, "Succeeded", "True", f"{KIND}Succeeded", msg)
                elif running > 0:
                    msg = f"PyTorchJob {ns}/{name} is running."
                    self._set_condition(name, st, "Running", "True", f"{KIND}Running", msg)
            if failed > 0 and spec.replicas > succeeded + running:
                if spec.restart_policy != "Never":
                    msg = f"PyTorchJob {name} is restarting because {failed} {rtype} replica(s) failed."
                    self._event(name, f"{KIND}Restarting", msg, "Warning")
                    self._set_condition(name, st, "Restarting", "True", f"{KIND}Restarting", msg)
                else:
                    msg = f"PyTorchJob {name} is failed because {failed} {rtype} replica(s) failed."
                    self._event(name, f"{KIND}Failed", msg)
                    st["completion_time"] = st["completion_time"] or _now()
                    self._set_condition(name, st, "Failed", "True", f"{KIND}Failed", msg)

    def _create_pod(self, name: str, j: _Job, rtype: str, index: int) -> bool:
        """createNewPod + RealPodControl.createPods; False when the API server rejects the pod."""
        job = j.obj
        specs = job.spec.pytorch_replica_specs
        spec = specs[rtype]
        rt = rtype.lower()
        pod_name = f"{name}-{rt}-{index}".replace("/", "-")
        template = copy.deepcopy(spec.template)
        labels = dict((template.metadata.labels if template.metadata else None) or {})
        labels.update({LABEL_OPERATOR: CONTROLLER_NAME, LABEL_JOB_NAME: name.replace("/", "-")})
        labels.update({LABEL_REPLICA_TYPE: rt, LABEL_REPLICA_INDEX: str(index)})
        master_role = rtype == MASTER if MASTER in specs else (rtype == WORKER and index == 0)
        if master_role:
            labels[LABEL_JOB_ROLE] = "master"
        pod_spec: V1PodSpec = template.spec
        _set_pod_env(job, pod_spec, rt, index)
        if MASTER in specs and rtype == WORKER:
            pod_spec.init_containers = [*(pod_spec.init_containers or []), _init_container(f"{name}-master-0")]
        if pod_spec.restart_policy:
            self._event(
                name,
                "SettedPodTemplateRestartPolicy",
                "Restart policy in pod template will be overwritten by restart policy in replica spec",
                "Warning",
            )
        pod_spec.restart_policy = "Never" if spec.restart_policy == "ExitCode" else spec.restart_policy
        uid = str(uuid.uuid4())
        rank = index + 1 if (MASTER in specs and rtype == WORKER) else index
        owner = V1OwnerReference(
            api_version="kubeflow.org/v1", kind=KIND, name=name, uid=j.uid, controller=True, block_owner_deletion=True
        )
        pod = _Pod(
            job=name,
            namespace=str(job.metadata.namespace),
            name=pod_name,
            uid=uid,
            rtype=rtype,
            index=index,
            rank=rank,
            spec=pod_spec,
            labels=labels,
            annotations=dict((template.metadata.annotations if template.metadata else None) or {}),
            owner=owner,
            created=_now(),
            log_path=self.log_dir / f"{pod_name}.{uid[:8]}.log",
            waiting=("PodInitializing" if pod_spec.init_containers else "ContainerCreating", ""),
        )
        error = self._admit(_v1pod(pod))
        if error is not None:
            self._event(name, "FailedCreatePod", f"Error creating: {error}", "Warning")
            return False
        self._pods.append(pod)
        self.pod_uids.setdefault(pod_name, []).append(uid)
        self._event(name, "SuccessfulCreatePod", f"Created pod: {pod_name}")
        return True

    def _admit(self, pod: V1Pod) -> str | None:
        """The API server's admission: the ServiceAccount plugin, then the test's own rule."""
        account = pod.spec.service_account_name or "default"
        if self.service_accounts is not None and account not in self.service_accounts:
            return (
                f'pods "{pod.metadata.name}" is forbidden: error looking up service account '
                f'{pod.metadata.namespace}/{account}: serviceaccount "{account}" not found'
            )
        return self.admission(pod) if self.admission is not None else None


# --- the API server's side of a job ------------------------------------------------------------------------


def _set_defaults(job: KubeflowOrgV1PyTorchJob) -> None:
    """pkg/apis/kubeflow.org/v1/pytorch_defaults.go SetDefaults_PyTorchJob."""
    from kubeflow.training import KubeflowOrgV1RunPolicy

    spec = job.spec
    if spec.run_policy is None:
        spec.run_policy = KubeflowOrgV1RunPolicy()
    if spec.run_policy.clean_pod_policy is None:
        spec.run_policy.clean_pod_policy = "None"
    for rs in (spec.pytorch_replica_specs or {}).values():
        if rs.replicas is None:
            rs.replicas = 1
        if not rs.restart_policy:
            rs.restart_policy = "OnFailure"
        for c in rs.template.spec.containers or []:
            if c.name == CONTAINER and not any(p.name == PORT_NAME for p in c.ports or []):
                c.ports = [*(c.ports or []), V1ContainerPort(name=PORT_NAME, container_port=DEFAULT_PORT)]
    if spec.elastic_policy is None and spec.nproc_per_node is None:
        spec.nproc_per_node = "auto"


def _validate(job: KubeflowOrgV1PyTorchJob) -> None:
    """pkg/webhooks/pytorch/pytorchjob_webhook.go validatePyTorchJob (the admission webhook)."""
    errors = []
    name = str(job.metadata.name or "")
    if not (_DNS1035.fullmatch(name) and len(name) <= 63):
        errors.append(f"metadata.name: Invalid value: {name!r}: should match a DNS-1035 label")
    specs = job.spec.pytorch_replica_specs
    if not specs:
        errors.append("spec.pytorchReplicaSpecs: Required value: must be required")
    for rtype, rs in (specs or {}).items():
        path = f"spec.pytorchReplicaSpecs[{rtype}]"
        if rtype not in (MASTER, WORKER):
            errors.append(f"{path}: Unsupported value: {rtype!r}")
        containers = rs.template.spec.containers or []
        if not containers:
            errors.append(f"{path}.template.spec.containers: Required value: must be specified")
        if any(not c.image for c in containers):
            errors.append(f"{path}.template.spec.containers.image: Required value: must be required")
        if not any(c.name == CONTAINER for c in containers):
            errors.append(f"{path}.template.spec.containers: must have at least one container with name {CONTAINER}")
        if rtype == MASTER and rs.replicas != 1:
            errors.append(f"{path}.replicas: Forbidden: must be 1")
        elif rs.replicas is not None and rs.replicas < 1:
            errors.append(f"{path}.replicas: Forbidden: must be at least 1")
    if errors:
        raise RuntimeError(
            f'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request: '
            f"{'; '.join(errors)}"
        )


def _set_pod_env(job: KubeflowOrgV1PyTorchJob, pod_spec: V1PodSpec, rt: str, index: int) -> None:
    """pkg/controller.v1/pytorch/envvar.go setPodEnv (no elastic policy)."""
    specs = job.spec.pytorch_replica_specs
    total = sum(s.replicas for s in specs.values())
    nproc = job.spec.nproc_per_node
    nproc_int = int(nproc) if nproc is not None and str(nproc).isdigit() else 1
    for c in pod_spec.containers:
        env = list(c.env or [])
        env.append(V1EnvVar(name="PYTHONUNBUFFERED", value="1"))
        if MASTER in specs:
            port = next(
                (
                    p.container_port
                    for mc in specs[MASTER].template.spec.containers
                    if mc.name == CONTAINER
                    for p in mc.ports or []
                    if p.name == PORT_NAME
                ),
                None,
            )
            if port is None:
                raise RuntimeError("port not found")
            addr = f"{job.metadata.name}-master-0".replace("/", "-")
            env += [
                V1EnvVar(name="MASTER_PORT", value=str(port)),
                V1EnvVar(name="PET_MASTER_PORT", value=str(port)),
                V1EnvVar(name="MASTER_ADDR", value=addr),
                V1EnvVar(name="PET_MASTER_ADDR", value=addr),
            ]
            rank = index + 1 if rt == "worker" else index
            env += [
                V1EnvVar(name="WORLD_SIZE", value=str(total * nproc_int)),
                V1EnvVar(name="RANK", value=str(rank)),
                V1EnvVar(name="PET_NODE_RANK", value=str(rank)),
            ]
        if nproc is not None:
            env.append(V1EnvVar(name="PET_NPROC_PER_NODE", value=str(nproc)))
        if job.spec.elastic_policy is not None:
            raise NotImplementedError("LocalOperator does not model elasticPolicy")
        env.append(V1EnvVar(name="PET_NNODES", value=str(total)))
        c.env = env


def _init_container(master: str) -> V1Container:
    """pkg/controller.v1/pytorch/initcontainer.go initContainerTemplate."""
    script = (
        f"err=1;for i in $(seq {INIT_MAX_TRIES}); do if nslookup {master}; then err=0 && break; fi;"
        "echo waiting for master; sleep 2; done; exit $err"
    )
    return V1Container(
        name="init-pytorch",
        image=INIT_IMAGE,
        image_pull_policy="IfNotPresent",
        command=["sh", "-c", script],
        resources=V1ResourceRequirements(
            limits={"cpu": "100m", "memory": "20Mi"}, requests={"cpu": "50m", "memory": "10Mi"}
        ),
    )


def _is_true(st: dict[str, Any], ctype: str) -> bool:
    return any(c.type == ctype and c.status == "True" for c in st["conditions"])


def _finished(st: dict[str, Any]) -> bool:
    return _is_true(st, "Succeeded") or _is_true(st, "Failed")


def _past_backoff_limit(rp: Any, specs: dict[str, Any], pods: list[_Pod]) -> bool:
    """pkg/core/job.go PastBackoffLimit: restart counts of Running pods only (always 0 here: pods never restart
    in place, their restartPolicy being Never)."""
    if rp.backoff_limit is None:
        return False
    result = 0
    for rtype, spec in specs.items():
        if spec.restart_policy not in ("OnFailure", "Always", "ExitCode"):
            continue
        result += sum(0 for p in pods if p.rtype == rtype and p.phase == "Running")  # RestartCount == 0
    if rp.backoff_limit == 0:
        return result > 0
    return bool(result >= rp.backoff_limit)


def _past_active_deadline(rp: Any, st: dict[str, Any]) -> bool:
    """pkg/core/job.go PastActiveDeadline."""
    if rp.active_deadline_seconds is None or st["start_time"] is None:
        return False
    elapsed = datetime.datetime.now(datetime.UTC) - st["start_time"]
    return elapsed >= datetime.timedelta(seconds=rp.active_deadline_seconds)


def _signal(p: _Pod, sig: int) -> None:
    """Signal every process of the pod's container (it runs in its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.proc.pid, sig)  # type: ignore[union-attr]


def _v1pod(p: _Pod) -> V1Pod:
    c = p.container
    if p.terminated is not None:
        state = V1ContainerState(terminated=p.terminated)
    elif p.waiting is not None:
        state = V1ContainerState(waiting=V1ContainerStateWaiting(reason=p.waiting[0], message=p.waiting[1] or None))
    else:
        state = V1ContainerState(running=V1ContainerStateRunning(started_at=p.started_at))
    running = p.phase == "Running"
    status = V1ContainerStatus(
        name=CONTAINER,
        image=c.image,
        image_id="" if p.started_at is None else f"local://{c.image}",
        ready=running,
        started=running,
        restart_count=0,
        state=state,
    )
    init_statuses = None
    if p.spec.init_containers:
        done = p.started_at is not None or (
            p.waiting is not None and p.waiting[0] not in ("ContainerCreating", "PodInitializing")
        )
        init_state = (
            V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=0, reason="Completed"))
            if done
            else V1ContainerState(running=V1ContainerStateRunning())
        )
        init_statuses = [
            V1ContainerStatus(name=ic.name, image=ic.image, image_id="", ready=done, restart_count=0, state=init_state)
            for ic in p.spec.init_containers
        ]
    conditions = [
        V1PodCondition(type="PodScheduled", status="True"),
        V1PodCondition(type="Initialized", status="True" if p.phase != "Pending" or init_statuses is None else "False"),
        V1PodCondition(type="ContainersReady", status="True" if running else "False"),
        V1PodCondition(type="Ready", status="True" if running else "False"),
    ]
    return V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=V1ObjectMeta(
            name=p.name,
            namespace=p.namespace,
            uid=p.uid,
            labels=dict(p.labels),
            annotations=dict(p.annotations),
            owner_references=[copy.deepcopy(p.owner)],
            creation_timestamp=p.created,
        ),
        spec=copy.deepcopy(p.spec),
        status=V1PodStatus(
            phase=p.phase,
            conditions=conditions,
            container_statuses=[status],
            init_container_statuses=init_statuses,
            start_time=p.created,
        ),
    )
