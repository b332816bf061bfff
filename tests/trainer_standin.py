"""A local model of Kubeflow Trainer v2.3.0 + JobSet v0.12.0 + the Kubernetes Job controller and kubelet, whose pods
are real processes.

`LocalTrainer` takes a TrainJob manifest (the dict `microfed.training.trainjob.build_trainjob` returns, as the
kubernetes client's CustomObjectsApi sends and returns it), renders the JobSet the trainer would, and runs each pod's
`node` container as a subprocess with the environment the torch plugin injects. A background thread plays the
kubelet, the Job controller, the JobSet controller and the TrainJob controller, so a poller sees the states
asynchronously, as on a cluster. Its protocol (create / get / jobset / config_map / pods / pod_log / events / delete) is
microfed.training.trainjob_backend.TrainJobBackend: TrainJob and JobSet as dicts, pods and ConfigMaps as the
kubernetes client's V1Pod and V1ConfigMap.

Rules, with their sources (file :: function). T = kubeflow/trainer tag v2.3.0 (commit 658725bd), J =
kubernetes-sigs/jobset tag v0.12.0 (the JobSet release T's manifests/third-party/jobset installs), K =
kubernetes/kubernetes (Job controller and kubelet). The Job rules were read in its source through the code index:
pkg/apis/batch/v1/defaults.go :: SetDefaults_Job (backoffLimit 6 unless set; MaxInt32 with backoffLimitPerIndex) and
pkg/controller/job/job_controller.go :: pastBackoffLimitOnFailure (restartPolicy OnFailure: the restart counts of the
Running and Pending pods' containers, summed, >= backoffLimit fails the Job). The kubelet's crash-loop back-off
(10 s doubling to 300 s) is its documented default, not re-read here:

Rule (what this model does)                                      | Source
-----------------------------------------------------------------+------------------------------------------------------
Admission: metadata.name an RFC-1035 label of <= 63 characters   | T manifests/base/crds/trainer.kubeflow.org_trainjobs
                                                                 | .yaml (x-kubernetes-validations)
The runtimeRef names an existing ClusterTrainingRuntime          | T pkg/runtime/core/clustertrainingruntime.go
                                                                 | :: ValidateObjects
trainer.env must not set PET_NNODES, PET_NPROC_PER_NODE,         | T pkg/runtime/framework/plugins/torch/torch.go
PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT                  | :: Validate (constants :: TorchRunReservedEnvNames)
runtimePatches: manager a domain-prefixed path; a patched        | T pkg/runtime/framework/plugins/jobset/jobset.go
replicatedJob/container must exist in the runtime; no env for    | :: Validate
the `node` container                                             |
JobSet admission, when the trainer applies the JobSet: the       | J pkg/webhooks/jobset_webhook.go :: ValidateCreate
longest pod name `<js>-<rjob>-<job index>-<pod index>-abcde`     | T trainjob_controller.go :: Reconcile (the error is
must be a DNS-1035 label (<= 63). The TrainJob itself was        | only an event; no condition ever says so)
admitted: it stays without JobSet and without any condition,     |
with Warning events TrainJobResourcesCreationFailed              |
-----------------------------------------------------------------+------------------------------------------------------
CRD defaults: runtimeRef apiGroup trainer.kubeflow.org, kind     | T pkg/apis/trainer/v1alpha1/trainjob_types.go
ClusterTrainingRuntime; suspend false; managedBy                 | (kubebuilder:default markers)
trainer.kubeflow.org/trainjob-controller                         |
-----------------------------------------------------------------+------------------------------------------------------
Runtime snapshot: the first reconcile copies the runtime into    | T pkg/runtime/core/snapshot.go :: getRuntimeSnapshot,
ConfigMap `<name>-runtime-snapshot`, owned by the TrainJob; a    | createRuntimeSnapshot; T pkg/controller/
later one reads it. One owned by ANOTHER uid (the predecessor of | trainjob_controller.go :: Reconcile (the error is a
a re-created TrainJob, not yet garbage-collected) is an error:   | Warning event TrainJobResourcesCreationFailed; the
no JobSet, event, retried                                        | request is requeued with backoff)
A JobSet of the TrainJob's name that exists is left as it is,    | T jobset.go :: Build (returns nothing for an existing
and its status is copied whoever owns it: a TrainJob re-created  | unsuspended JobSet), Status (Get by name);
before the predecessor's JobSet is collected shows THAT JobSet's | trainjob_controller.go :: Reconcile
Failed (or Complete, which then sticks: it is never removed)     | (removeFailedCondition, IsTrainJobFinished)
-----------------------------------------------------------------+------------------------------------------------------
JobSet `<name>`: the runtime's template with runtimePatches      | T pkg/runtime/core/trainingruntime.go
merged (pod/Job/JobSet labels and annotations, serviceAccount-   | :: newRuntimeInfo, mergeRuntimePatches
Name, nodeSelector, tolerations, terminationGracePeriodSeconds); |
trainer.resourcesPerNode merged into the `node` container        |
The trainer ReplicatedJob (ancestor label `trainjob-ancestor-    | T pkg/runtime/framework/plugins/jobset/builder.go
step: trainer`) gets replicas 1; its `node` container the        | :: Builder.Trainer; jobset.go :: SyncParallelCount,
trainer's image, command, args, env; parallelism = completions = | Build (ownerReference controller=true to TrainJob)
numNodes                                                         |
Env of `node`: trainer.env, then PET_NNODES=numNodes,            | T pkg/runtime/framework/plugins/torch/torch.go
PET_NPROC_PER_NODE (numProcPerNode, else `auto`, which without a | :: EnforceMLPolicy, getNumCPUPerNode;
GPU becomes max(1, CPU request rounded up)), PET_NODE_RANK from  | pkg/runtime/runtime.go :: GetNumGPUPerNode;
the pod annotation batch.kubernetes.io/job-completion-index,     | pkg/constants :: JobCompletionIndexFieldPath,
PET_MASTER_ADDR `<name>-node-0-0.<name>`, PET_MASTER_PORT 29500; | ContainerTrainerPort
container port 29500                                             |
-----------------------------------------------------------------+------------------------------------------------------
JobSet defaults: completionMode Indexed, pod restartPolicy       | J pkg/webhooks/jobset_webhook.go :: Default
OnFailure, DNS hostnames on (subdomain = JobSet name); no        | J pkg/controllers/jobset_controller.go::constructJob
failurePolicy and successPolicy All in torch-distributed         | T manifests/base/runtimes/torch_distributed.yaml
Job `<js>-<rjob>-<i>` (i < replicas) labelled jobset-name,       | J pkg/controllers/jobset_controller.go
replicatedjob-name, job-index, restart-attempt; its              | :: constructJob, labelAndAnnotateObject;
backoffLimit defaults to 6                                       | K pkg/apis/batch/v1/defaults.go :: SetDefaults_Job
-----------------------------------------------------------------+------------------------------------------------------
Indexed Job: one pod per index `<job>-<index>-<5 random>`,       | K pkg/controller/job/indexed_job_utils.go
annotation and label batch.kubernetes.io/job-completion-index,   | (addCompletionIndexEnvVariable, ...);
env JOB_COMPLETION_INDEX, hostname `<job>-<index>`               | K pkg/controller/job/job_controller.go :: manageJob
-----------------------------------------------------------------+------------------------------------------------------
restartPolicy OnFailure: a container exiting non-zero is         | K pkg/kubelet/kuberuntime/kuberuntime_manager.go
restarted IN PLACE (same pod, restartCount + 1): the first time  | :: computePodActions, doBackOff; K pkg/kubelet/
at once, then after the crash-loop back-off (10 s, doubling, at  | kubelet.go (backOffPeriod, MaxContainerBackOff)
most 300 s; waiting CrashLoopBackOff meanwhile, lastState        |
terminated); exit 0: the pod Succeeded. The phase stays Running  |
-----------------------------------------------------------------+------------------------------------------------------
The Job fails when the restartCounts of its active pods sum to   | K pkg/controller/job/job_controller.go
backoffLimit (6): condition Failed BackoffLimitExceeded, and its | :: pastBackoffLimitOnFailure, syncJob
active pods are deleted, with their logs. So a program error in  | (deleteActivePods)
one node is retried 6 times, ~5 min of back-off, before anything |
fails; the counts of all nodes add up                            |
The Job completes when every index has a Succeeded pod           | K job_controller.go :: syncJob (succeeded ==
                                                                 | completions)
-----------------------------------------------------------------+------------------------------------------------------
JobSet: a failed Job and no failurePolicy: condition Failed,     | J pkg/controllers/failure_policy.go
reason FailedJobs, "jobset failed due to one or more job         | :: executeFailurePolicy, messageWithFirstFailedJob
failures (first failed job: <job>)". With failurePolicy          | :: restartJobSetActionApplier,
maxRestarts (a runtime could set it; torch-distributed does      | failurePolicyRecreateAll; J jobset_controller.go
not): while restarts < maxRestarts, restarts + 1 and EVERY Job   | :: getChildJobs (restart-attempt < restarts: deleted,
of the group is deleted (foreground) and recreated; then Failed  | then recreated)
ReachedMaxRestarts                                               |
JobSet Completed (AllJobsCompleted, "jobset completed            | J jobset_controller.go :: executeSuccessPolicy;
successfully") when every Job completed; a finished JobSet's     | reconcile (jobSetFinished -> deleteJobs(active))
active Jobs are deleted                                          |
-----------------------------------------------------------------+------------------------------------------------------
TrainJob status: NO condition while it runs (no Created or       | T pkg/runtime/framework/plugins/jobset/jobset.go
Running); the JobSet's Completed condition is copied as          | :: Status; T pkg/controller/trainjob_controller.go
`Complete`, its Failed as `Failed` (reason and message kept);    | :: Reconcile, setTrainJobStatus
jobsStatus mirrors replicatedJobsStatus. The controller reads    |
the JobSet from its informer cache: the TrainJob's status lags   |
the JobSet's by `status_lag_seconds`                             |
activeDeadlineSeconds (from creation): Failed DeadlineExceeded   | T trainjob_controller.go :: reconcileDeadline
"TrainJob exceeded its active deadline", JobSet deleted          |
-----------------------------------------------------------------+------------------------------------------------------
Deleting a TrainJob, propagationPolicy Background: it is gone at | ownerReferences: TrainJob -> JobSet and snapshot
once; the garbage collector deletes the JobSet, the snapshot,    | ConfigMap (T jobset.go :: Build, snapshot.go);
the Jobs and pods `gc_seconds` later: the pods run on meanwhile  | JobSet -> Job -> Pod (J constructJob; K Job ctrl)
Foreground (what the launcher's backend sends): the TrainJob     | K staging/src/k8s.io/apiserver/pkg/registry/generic/
stays, with deletionTimestamp and the foregroundDeletion         | registry/store.go :: Delete (foreground finalizer);
finalizer, and is still reconciled, until the collector has      | K pkg/controller/garbagecollector/garbagecollector.go
deleted its dependents (all with blockOwnerDeletion) `gc_seconds`| :: processDeletingDependentsItem; T trainjob_
later; then it is gone. Create meanwhile: 409                    | controller.go :: Reconcile (no deletionTimestamp
                                                                 | check)
-----------------------------------------------------------------+------------------------------------------------------
A pod naming a service account that does not exist is refused by | K plugin/pkg/admission/serviceaccount/admission.go
the API server (pods "<generateName>" is forbidden: error looking| :: Admit; K staging/.../apiserver/pkg/admission/
up service account NS/SA: serviceaccount "SA" not found): no pod;| errors.go :: NewForbidden (extractResourceName);
the Job controller's Warning event FailedCreate "Error creating: | K pkg/controller/controller_utils.go :: RealPod-
<error>" on the Job, and it tries again                          | Control.createPods (FailedCreatePodReason)
-----------------------------------------------------------------+------------------------------------------------------
An image no node can pull: the pod stays Pending, its container  | K pkg/kubelet/images/types.go (ErrImagePull,
waiting ErrImagePull, then ImagePullBackOff "Back-off pulling    | ImagePullBackOff); K pkg/kubelet/images/
image", retried after a doubling back-off; no process, no log    | image_manager.go :: EnsureImageExists (backOff)
-----------------------------------------------------------------+------------------------------------------------------

Deliberate differences: every pod shares this machine's network, so the processes get PET_MASTER_ADDR=127.0.0.1 and
a free port per JobSet incarnation (the pod spec keeps the cluster values); the processes inherit this process's
environment minus any rank variables; `backoff_scale` shrinks the crash-loop back-off for tests (1.0 is the kubelet's);
only the `node` container runs; no scheduling, events on pods, or suspend; image pull failures come from
`unpullable_images` and their back-off from `image_pull_backoff_seconds`; the only pod admission modelled is the
service account's (`service_accounts`).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import math
import os
import random
import re
import signal
import string
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from kubernetes.client import (
    ApiClient,
    V1ConfigMap,
    V1ContainerState,
    V1ContainerStateRunning,
    V1ContainerStateTerminated,
    V1ContainerStateWaiting,
    V1ContainerStatus,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodStatus,
)
from kubernetes.utils.quantity import parse_quantity

from microfed.training.launch import free_port

__all__ = ["RUNTIME_MANIFEST", "LocalTrainer", "TrainJobRejected"]

RUNTIME_MANIFEST = Path(__file__).with_name("schemas") / "torch_distributed.yaml"  # T, see schemas/TRAINER.md
NODE = "node"
TRAINER_PORT = 29500
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
RJOB_NAME = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX = "jobset.sigs.k8s.io/job-index"
RESTART_ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"
JOB_NAME = "batch.kubernetes.io/job-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
DEFAULT_BACKOFF_LIMIT = 6
CRASH_BACKOFF, CRASH_BACKOFF_MAX = 10.0, 300.0
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DOMAIN_PATH = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/\S+")
_RANK_ENV = re.compile(r"^(MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|PET_.*)$")
_PATCHABLE_POD_SPEC = (
    "serviceAccountName",
    "nodeSelector",
    "tolerations",
    "terminationGracePeriodSeconds",
    "affinity",
    "volumes",
    "imagePullSecrets",
    "securityContext",
    "schedulingGates",
)


class TrainJobRejected(ValueError):
    """The API server (CRD validation or the trainer's / JobSet's webhook) refused the TrainJob: HTTP 422."""


def _stamp() -> datetime.datetime:
    """A time as the kubernetes client deserialises one (a datetime; the API's resolution is one second)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class _Pod:
    job: str
    jobset: str
    name: str
    uid: str
    index: int
    container: dict[str, Any]
    spec: dict[str, Any]
    labels: dict[str, str]
    annotations: dict[str, str]
    log_dir: Path
    phase: str = "Pending"
    restart_count: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    started_at: datetime.datetime | None = None
    last: V1ContainerStateTerminated | None = None  # lastState.terminated
    terminated: V1ContainerStateTerminated | None = None  # state.terminated (exit 0)
    restart_at: float | None = None  # in crash-loop back-off until then
    waiting: tuple[str, str] | None = None  # an image pull failure: (reason, message)
    pull_attempts: int = 0
    pull_next: float = 0.0

    def log_path(self, attempt: int) -> Path:
        return self.log_dir / f"{self.name}.{attempt}.log"


@dataclass
class _Job:
    name: str
    jobset: str
    restart_attempt: int
    completions: int
    backoff_limit: int
    pod_template: dict[str, Any]
    uid: str = ""
    namespace: str = "default"
    condition: tuple[str, str, str] | None = None  # (type, reason, message) once finished
    succeeded: set[int] = field(default_factory=set)


@dataclass
class _JobSet:
    name: str
    uid: str
    owner_uid: str
    spec: dict[str, Any]
    labels: dict[str, str]
    port: int
    restarts: int = 0
    conditions: list[dict[str, Any]] = field(default_factory=list)
    # (when, conditions, replicatedJobsStatus) at each status change: what a watcher's cache holds lags the object
    history: list[tuple[float, list[dict[str, Any]], list[dict[str, Any]]]] = field(default_factory=list)

    def record(self, now: float, jobs_status: list[dict[str, Any]]) -> None:
        if not self.history or (self.history[-1][1], self.history[-1][2]) != (self.conditions, jobs_status):
            self.history.append((now, copy.deepcopy(self.conditions), copy.deepcopy(jobs_status)))

    def view(self, as_of: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        """The status a cache that is `now - as_of` seconds behind holds; None: it has not seen the JobSet yet."""
        seen = [h for h in self.history if h[0] <= as_of]
        return (seen[-1][1], seen[-1][2]) if seen else None


@dataclass
class _TrainJob:
    obj: dict[str, Any]
    uid: str
    created: float
    deleting: bool = False  # foreground deletion: gone once the garbage collector has deleted its dependents
    deleting_since: str = ""
    conditions: list[dict[str, Any]] = field(default_factory=list)
    jobs_status: list[dict[str, Any]] = field(default_factory=list)
    retry_at: float = 0.0
    errors: int = 0


class LocalTrainer:
    """A TrainJob backend served by a local model of Trainer v2.3 + JobSet + Job + kubelet (see the module doc)."""

    def __init__(
        self,
        log_dir: Path,
        extra_env: dict[str, str] | None = None,
        *,
        runtimes: dict[str, dict[str, Any]] | None = None,
        backoff_scale: float = 0.01,
        status_lag_seconds: float = 0.2,
        gc_seconds: float = 0.5,
        tick_seconds: float = 0.05,
        grace_seconds: float = 2.0,
        seed: int = 0,
        unpullable_images: tuple[str, ...] = (),
        image_pull_backoff_seconds: float = 0.2,
        service_accounts: tuple[str, ...] | None = None,
    ) -> None:
        """`runtimes`: ClusterTrainingRuntimes by name (default: the vendored torch-distributed). `backoff_scale`:
        the kubelet's crash-loop back-off times this (1.0: 10 s doubling to 300 s). `status_lag_seconds`: how long
        after the JobSet's status changes the TrainJob's follows. `gc_seconds`: how long the garbage collector
        takes to delete a deleted TrainJob's dependents (their pods run meanwhile). `unpullable_images`: images no node
        can pull; `image_pull_backoff_seconds`: the kubelet's first pull back-off (10 s on a node), doubling.
        `service_accounts`: the service accounts that exist (None: any); a pod naming another is refused."""
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(extra_env or {})
        if runtimes is None:
            runtime = yaml.safe_load(RUNTIME_MANIFEST.read_text())
            runtimes = {runtime["metadata"]["name"]: runtime}
        self.runtimes = copy.deepcopy(runtimes)
        self.backoff_scale = backoff_scale
        self.status_lag_seconds = status_lag_seconds
        self.gc_seconds = gc_seconds
        self.tick_seconds = tick_seconds
        self.grace_seconds = grace_seconds
        self.unpullable_images = set(unpullable_images)
        self.image_pull_backoff_seconds = image_pull_backoff_seconds
        self.service_accounts = None if service_accounts is None else set(service_accounts)
        self.trainjobs: dict[str, _TrainJob] = {}
        self.jobsets: dict[str, _JobSet] = {}
        self.snapshots: dict[str, str] = {}  # ConfigMap name -> owner uid
        self.jobs: dict[str, _Job] = {}
        self.created: list[dict[str, Any]] = []  # as submitted
        self.deleted: list[str] = []
        self._pods: list[_Pod] = []
        self._events: list[tuple[str, str, str, str]] = []  # (object, uid, reason, message)
        self._gc: list[tuple[float, str]] = []  # (when, owner uid) of deleted owners
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._crash: BaseException | None = None
        self._closed = False
        atexit.register(self.close)

    # --- the launcher's protocol -----------------------------------------------------------------------

    def create(self, trainjob: dict[str, Any]) -> bool:
        """Create the TrainJob; False when one of that name exists (409). TrainJobRejected when admission refuses."""
        with self._api():
            name = str(trainjob["metadata"]["name"])
            if name in self.trainjobs:
                return False
            stored = copy.deepcopy(trainjob)
            _set_defaults(stored)
            self._admit(stored)
            uid = str(uuid.uuid4())
            stored["metadata"].update(uid=uid, creationTimestamp=_now())
            stored["metadata"].setdefault("namespace", "default")
            self.trainjobs[name] = _TrainJob(obj=stored, uid=uid, created=time.monotonic())
            self.created.append(copy.deepcopy(trainjob))
            self._ensure_thread()
            return True

    def get(self, name: str) -> dict[str, Any] | None:
        """The TrainJob with its status, as CustomObjectsApi returns it; None when there is none."""
        with self._api():
            t = self.trainjobs.get(name)
            if t is None:
                return None
            obj = copy.deepcopy(t.obj)
            if t.deleting:
                obj["metadata"].update(deletionTimestamp=t.deleting_since, finalizers=["foregroundDeletion"])
            status: dict[str, Any] = {}
            if t.conditions:
                status["conditions"] = copy.deepcopy(t.conditions)
            if t.jobs_status:
                status["jobsStatus"] = copy.deepcopy(t.jobs_status)
            if status:
                obj["status"] = status
            return obj

    def jobset(self, name: str) -> dict[str, Any] | None:
        with self._api():
            js = self.jobsets.get(name)
            if js is None:
                return None
            return {
                "apiVersion": "jobset.x-k8s.io/v1alpha2",
                "kind": "JobSet",
                "metadata": {
                    "name": js.name,
                    "uid": js.uid,
                    "labels": dict(js.labels),
                    "ownerReferences": [_owner(js.name, js.owner_uid)],
                },
                "spec": copy.deepcopy(js.spec),
                "status": {"restarts": js.restarts, "conditions": copy.deepcopy(js.conditions)},
            }

    def config_map(self, name: str) -> V1ConfigMap | None:
        """The ConfigMap `name` (only runtime snapshots exist here), as CoreV1Api.read_namespaced_config_map."""
        with self._api():
            owner = self.snapshots.get(name)
            if owner is None:
                return None
            ref = _owner(name.removesuffix("-runtime-snapshot"), owner)
            return V1ConfigMap(
                metadata=V1ObjectMeta(
                    name=name,
                    owner_references=[
                        V1OwnerReference(
                            api_version=ref["apiVersion"],
                            kind=ref["kind"],
                            name=ref["name"],
                            uid=ref["uid"],
                            controller=True,
                            block_owner_deletion=True,
                        )
                    ],
                )
            )

    def pods(self, name: str) -> list[V1Pod]:
        """The pods of the TrainJob `name` (label selector jobset.sigs.k8s.io/jobset-name=name)."""
        with self._api():
            return [_v1pod(p) for p in sorted(self._pods, key=lambda p: p.name) if p.jobset == name]

    def pod_log(self, pod: str, previous: bool = False) -> str:
        """The `node` container's log; `previous`: that of its last terminated incarnation (kubectl logs -p)."""
        with self._api():
            p = next((p for p in self._pods if p.name == pod), None)
            if p is None:
                raise LookupError(f'pods "{pod}" not found')  # 404: the log is gone with the pod
            # in back-off the current container IS the last terminated one
            attempt = p.restart_count - 1 if previous and p.restart_at is None else p.restart_count
            path = p.log_path(attempt)
            if attempt < 0 or not path.exists():
                raise LookupError(f'previous terminated container "{NODE}" in pod "{pod}" not found')
            return path.read_text(errors="replace")

    def events(self, name: str, uid: str | None = None) -> list[tuple[str, str]]:
        with self._api():
            return [(r, m) for (o, u, r, m) in self._events if o == name and uid in (None, u)]

    def delete(self, name: str, propagation_policy: str = "Foreground") -> None:
        """Delete the TrainJob; its dependents go `gc_seconds` later. Foreground (what the launcher's backend sends):
        the TrainJob stays, being deleted, until then; Background (the API's default): it is gone at once."""
        with self._api():
            t = self.trainjobs.get(name)
            if t is None or t.deleting:
                return
            self.deleted.append(name)
            self._gc.append((time.monotonic() + self.gc_seconds, t.uid))
            if propagation_policy == "Foreground":
                t.deleting, t.deleting_since = True, _now()
            else:
                del self.trainjobs[name]

    # --- helpers for tests -------------------------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 60.0, what: str = "the condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"LocalTrainer: {what} did not happen within {timeout} s")
            time.sleep(self.tick_seconds)

    def state(self, name: str) -> str:
        """Complete / Failed when the TrainJob has that condition True, Gone without a TrainJob, else Running
        (what a launcher can tell: the TrainJob has no condition while it runs)."""
        t = self.get(name)
        if t is None:
            return "Gone"
        for c in t.get("status", {}).get("conditions", []):
            if c["type"] in ("Complete", "Failed") and c["status"] == "True":
                return str(c["type"])
        return "Running"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stop.set()
            self._kill(list(self._pods))
            self.trainjobs.clear()
            self.jobsets.clear()
            self.jobs.clear()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def __enter__(self) -> LocalTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- machinery -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _api(self) -> Any:
        with self._lock:
            if self._crash is not None:
                raise RuntimeError("LocalTrainer's controller thread crashed") from self._crash
            yield

    def _ensure_thread(self) -> None:
        if self._closed:
            raise RuntimeError("LocalTrainer is closed")
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="local-trainer", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                try:
                    self._tick(time.monotonic())
                except BaseException as e:  # surfaced by the next API call
                    self._crash = e
                    return
            self._stop.wait(self.tick_seconds)

    def _tick(self, now: float) -> None:
        self._collect_garbage(now)
        for p in list(self._pods):
            self._kubelet(p, now)
        for job in list(self.jobs.values()):
            self._sync_job(job)
        for js in list(self.jobsets.values()):
            self._reconcile_jobset(js, now)
        for name in list(self.trainjobs):
            self._reconcile_trainjob(name, now)

    def _event(self, obj: str, uid: str, reason: str, message: str) -> None:
        if (obj, uid, reason, message) not in self._events:
            self._events.append((obj, uid, reason, message))

    # --- admission -------------------------------------------------------------------------------------

    def _admit(self, tj: dict[str, Any]) -> None:
        name = tj["metadata"]["name"]
        if len(name) > 63 or not _DNS1035.fullmatch(name):
            raise TrainJobRejected(f"metadata.name {name!r} must match RFC 1035 DNS label format (<= 63 characters)")
        spec = tj["spec"]
        ref = spec["runtimeRef"]
        runtime = self.runtimes.get(ref["name"])
        if ref.get("kind") != "ClusterTrainingRuntime" or runtime is None:
            raise TrainJobRejected(
                f"spec.RuntimeRef: clustertrainingruntimes {ref['name']!r} not found: specified "
                "clusterTrainingRuntime must be created before the TrainJob is created"
            )
        env = {e["name"] for e in (spec.get("trainer") or {}).get("env", [])}
        if reserved := sorted(env.intersection(RESERVED_ENV)):
            raise TrainJobRejected(
                f"spec.trainer.env: must not have reserved envs, invalid envs configured: {reserved}"
            )
        rjobs = {r["name"]: r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
        for patch in spec.get("runtimePatches", []):
            if not _DOMAIN_PATH.fullmatch(patch["manager"]):
                raise TrainJobRejected(
                    f"spec.runtimePatches.manager {patch['manager']!r} is not a domain-prefixed path"
                )
            for rp in _get(patch, "trainingRuntimeSpec", "template", "spec", "replicatedJobs") or []:
                if rp["name"] not in rjobs:
                    raise TrainJobRejected(
                        "spec.runtimePatches: must not have replicated job that doesn't exist in the runtime job "
                        "template"
                    )
                names = {
                    c["name"] for c in _get(rjobs[rp["name"]], "template", "spec", "template", "spec", "containers")
                }
                for c in _get(rp, "template", "spec", "template", "spec", "containers") or []:
                    if c["name"] not in names:
                        raise TrainJobRejected(f"spec.runtimePatches: container {c['name']!r} not in the runtime")
                    if c.get("env") and c["name"] == NODE:
                        raise TrainJobRejected("spec.runtimePatches: must not have envs for the node containers")

    # --- the TrainJob controller -------------------------------------------------------------------------

    def _reconcile_trainjob(self, name: str, now: float) -> None:
        """trainjob_controller.go Reconcile: drop a Failed condition (unless DeadlineExceeded), build the objects
        unless finished, copy the status from the JobSet as the controller's cache holds it, check the deadline."""
        t = self.trainjobs[name]
        t.conditions = [c for c in t.conditions if c["type"] != "Failed" or c["reason"] == "DeadlineExceeded"]
        if not _trainjob_finished(t.conditions) and now >= t.retry_at:
            self._ensure_objects(name, t, now)
        js = self.jobsets.get(name)
        view = js.view(now - self.status_lag_seconds) if js is not None else None
        if view is not None:  # jobset.go Status: whatever JobSet of that name, its owner unchecked
            conditions, jobs_status = view
            for jtype, ttype in (("Completed", "Complete"), ("Failed", "Failed")):
                c = next((c for c in conditions if c["type"] == jtype and c["status"] == "True"), None)
                if c is not None:
                    _set_condition(t.conditions, ttype, c["reason"], c["message"], c["lastTransitionTime"])
            t.jobs_status = copy.deepcopy(jobs_status)
        deadline = t.obj["spec"].get("activeDeadlineSeconds")
        if deadline and not _trainjob_finished(t.conditions) and now - t.created > deadline:
            _set_condition(t.conditions, "Failed", "DeadlineExceeded", "TrainJob exceeded its active deadline")
            if js is not None:
                self._delete_jobset(js)

    def _ensure_objects(self, name: str, t: _TrainJob, now: float) -> None:
        """ClusterTrainingRuntime.NewObjects + JobSet.Build: the snapshot first; an existing, unsuspended JobSet of
        that name is left as it is (whoever owns it)."""
        snapshot = f"{name}-runtime-snapshot"
        owner = self.snapshots.get(snapshot)
        if owner is not None and owner != t.uid:
            t.errors += 1
            t.retry_at = now + min(0.005 * 2**t.errors, 5.0)  # controller-runtime's per-item backoff
            self._event(
                name,
                t.uid,
                "TrainJobResourcesCreationFailed",
                "TrainJob resources reconciliation failed: getting runtime snapshot: invalid runtime snapshot: a "
                "snapshot configmap exists but is owned by another object",
            )
            return
        t.errors = 0
        self.snapshots[snapshot] = t.uid
        if name not in self.jobsets:
            self._create_jobset(name, t, now)

    def _create_jobset(self, name: str, t: _TrainJob, now: float) -> None:
        runtime = self.runtimes[t.obj["spec"]["runtimeRef"]["name"]]
        spec, labels = _render_jobset(t.obj, runtime)
        for i, r in enumerate(spec["replicatedJobs"]):
            replicas, completions = int(r.get("replicas", 1)), int(r["template"]["spec"].get("completions", 1))
            longest = f"{name}-{r['name']}-{replicas - 1}-{completions - 1}-abcde"
            if len(longest) > 63:  # JobSet's validating webhook refuses the JobSet
                t.errors += 1
                t.retry_at = now + min(0.005 * 2**t.errors, 5.0)
                job = f"{name}-{r['name']}-{replicas - 1}"
                self._event(
                    name,
                    t.uid,
                    "TrainJobResourcesCreationFailed",
                    'TrainJob resources reconciliation failed: admission webhook "vjobset.kb.io" denied the request: '
                    f'spec.replicatedJobs[{i}].name: Invalid value: "{job}": JobSet name is too long, pod names '
                    "generated for this JobSet will exceed 63 characters",
                )
                return
        js = _JobSet(name=name, uid=str(uuid.uuid4()), owner_uid=t.uid, spec=spec, labels=labels, port=free_port())
        js.record(now, self._jobs_status(js))
        self.jobsets[name] = js

    # --- the JobSet controller ---------------------------------------------------------------------------

    def _reconcile_jobset(self, js: _JobSet, now: float) -> None:
        self._reconcile_jobset_pass(js, now)
        js.record(now, self._jobs_status(js))

    def _jobs_status(self, js: _JobSet) -> list[dict[str, Any]]:
        """replicatedJobsStatus as the TrainJob's jobsStatus copies it (jobset_controller.go
        calculateReplicatedJobStatuses)."""
        jobs = [j for j in self.jobs.values() if j.jobset == js.name and j.restart_attempt == js.restarts]
        out = []
        for r in js.spec["replicatedJobs"]:
            mine = [j for j in jobs if j.name.startswith(f"{js.name}-{r['name']}-")]
            ready = [j for j in mine if j.condition is None and self._ready(j)]
            out.append(
                {
                    "name": r["name"],
                    "ready": len(ready),
                    "succeeded": sum(j.condition is not None and j.condition[0] == "Complete" for j in mine),
                    "failed": sum(j.condition is not None and j.condition[0] == "Failed" for j in mine),
                    "active": sum(j.condition is None for j in mine),
                    "suspended": 0,
                }
            )
        return out

    def _ready(self, job: _Job) -> bool:
        pods = [p for p in self._pods if p.job == job.name]
        return sum(p.proc is not None or p.phase == "Succeeded" for p in pods) >= job.completions

    def _reconcile_jobset_pass(self, js: _JobSet, now: float) -> None:
        mine = [j for j in self.jobs.values() if j.jobset == js.name]
        if _finished(js.conditions):
            for j in mine:
                if j.condition is None:
                    self._delete_job(j)
            return
        for j in [j for j in mine if j.restart_attempt < js.restarts]:  # getChildJobs: previous attempts
            self._delete_job(j)
        current = [j for j in mine if j.restart_attempt == js.restarts]
        failed = [j for j in current if j.condition is not None and j.condition[0] == "Failed"]
        if failed:
            first = failed[0].name
            policy = js.spec.get("failurePolicy")
            if policy is None:
                msg = f"jobset failed due to one or more job failures (first failed job: {first})"
                self._jobset_condition(js, now, "Failed", "FailedJobs", msg)
            elif js.restarts >= int(policy.get("maxRestarts", 0)):
                msg = f"jobset failed due to reaching max number of restarts (first failed job: {first})"
                self._jobset_condition(js, now, "Failed", "ReachedMaxRestarts", msg)
            else:
                js.restarts += 1  # failurePolicyRecreateAll: every Job of the group is deleted and recreated
                js.port = free_port()
            return
        rjobs = js.spec["replicatedJobs"]
        expected = sum(int(r.get("replicas", 1)) for r in rjobs)
        if sum(j.condition is not None and j.condition[0] == "Complete" for j in current) >= expected:
            self._jobset_condition(js, now, "Completed", "AllJobsCompleted", "jobset completed successfully")
            return
        names = {j.name for j in mine}
        for r in rjobs:
            for i in range(int(r.get("replicas", 1))):
                job_name = f"{js.name}-{r['name']}-{i}"
                if job_name not in names:
                    self._create_job(js, r, i, job_name)

    def _jobset_condition(self, js: _JobSet, now: float, ctype: str, reason: str, message: str) -> None:
        js.conditions.append(
            {"type": ctype, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _now()}
        )

    def _create_job(self, js: _JobSet, rjob: dict[str, Any], index: int, name: str) -> None:
        job_spec = rjob["template"]["spec"]
        template = copy.deepcopy(job_spec["template"])
        labels = template.setdefault("metadata", {}).setdefault("labels", {})
        labels.update(
            {
                JOBSET_NAME: js.name,
                RJOB_NAME: rjob["name"],
                JOB_INDEX: str(index),
                RESTART_ATTEMPT: str(js.restarts),
                JOB_NAME: name,
            }
        )
        self.jobs[name] = _Job(
            name=name,
            jobset=js.name,
            restart_attempt=js.restarts,
            completions=int(job_spec.get("completions", 1)),
            backoff_limit=int(job_spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)),
            pod_template=template,
            uid=str(uuid.uuid4()),
            namespace=next(
                (t.obj["metadata"]["namespace"] for t in self.trainjobs.values() if t.uid == js.owner_uid), "default"
            ),
        )

    # --- the Job controller --------------------------------------------------------------------------------

    def _sync_job(self, job: _Job) -> None:
        if job.condition is not None:
            return
        pods = [p for p in self._pods if p.job == job.name]
        active = [p for p in pods if p.phase in ("Pending", "Running")]
        job.succeeded |= {p.index for p in pods if p.phase == "Succeeded"}
        restarts = sum(p.restart_count for p in active)
        limit = job.backoff_limit
        if (restarts > 0) if limit == 0 else (restarts >= limit):  # pastBackoffLimitOnFailure
            job.condition = ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            self._kill(active)  # deleteActivePods: their logs go with them
            return
        if len(job.succeeded) >= job.completions:
            job.condition = ("Complete", "CompletionsReached", "Reached expected number of succeeded pods")
            return
        present = {p.index for p in pods}
        for index in range(job.completions):
            if index not in present and index not in job.succeeded:
                self._create_pod(job, index)

    def _create_pod(self, job: _Job, index: int) -> None:
        suffix = "".join(self._rng.choice(string.ascii_lowercase + string.digits) for _ in range(5))
        template = job.pod_template
        account = template["spec"].get("serviceAccountName") or "default"
        if self.service_accounts is not None and account not in self.service_accounts:
            # the ServiceAccount admission plugin refuses the pod (named by its generateName: no name yet); the Job
            # controller reports it on the Job and tries again later
            self._event(
                job.name,
                job.uid,
                "FailedCreate",
                f'Error creating: pods "{job.name}-{index}-" is forbidden: error looking up service account '
                f'{job.namespace}/{account}: serviceaccount "{account}" not found',
            )
            return
        spec = copy.deepcopy(template["spec"])
        spec["hostname"] = f"{job.name}-{index}"
        container = next(c for c in spec["containers"] if c["name"] == NODE)
        container.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "value": str(index)})
        labels = {**template["metadata"].get("labels", {}), COMPLETION_INDEX: str(index)}
        annotations = {**template["metadata"].get("annotations", {}), COMPLETION_INDEX: str(index)}
        self._pods.append(
            _Pod(
                job=job.name,
                jobset=job.jobset,
                name=f"{job.name}-{index}-{suffix}",
                uid=str(uuid.uuid4()),
                index=index,
                container=container,
                spec=spec,
                labels=labels,
                annotations=annotations,
                log_dir=self.log_dir,
            )
        )

    def _delete_job(self, job: _Job) -> None:
        self._kill([p for p in self._pods if p.job == job.name])  # foreground: pods first
        self.jobs.pop(job.name, None)

    def _delete_jobset(self, js: _JobSet) -> None:
        for j in [j for j in self.jobs.values() if j.jobset == js.name]:
            self._delete_job(j)
        self.jobsets.pop(js.name, None)

    def _collect_garbage(self, now: float) -> None:
        due = {uid for when, uid in self._gc if when <= now}
        if not due:
            return
        self._gc = [(when, uid) for when, uid in self._gc if uid not in due]
        for js in [js for js in self.jobsets.values() if js.owner_uid in due]:
            self._delete_jobset(js)
        for name in [n for n, owner in self.snapshots.items() if owner in due]:
            del self.snapshots[name]
        for name in [n for n, t in self.trainjobs.items() if t.deleting and t.uid in due]:  # foreground: now
            del self.trainjobs[name]

    # --- the kubelet ---------------------------------------------------------------------------------------

    def _kubelet(self, p: _Pod, now: float) -> None:
        if p.phase == "Pending" and p.container.get("image") in self.unpullable_images:
            self._pull_failure(p, now)
        elif p.phase == "Pending" or (p.restart_at is not None and now >= p.restart_at):
            if p.restart_at is not None:
                p.restart_count += 1
            self._start(p)
        elif p.proc is not None and (code := p.proc.poll()) is not None:
            self._exited(p, code, now)

    def _pull_failure(self, p: _Pod, now: float) -> None:
        image = p.container.get("image")
        if now >= p.pull_next:
            p.pull_attempts += 1
            p.waiting = (
                "ErrImagePull",
                f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to resolve '
                f'reference "{image}": {image}: not found',
            )
            p.pull_next = now + self.image_pull_backoff_seconds * 2 ** min(p.pull_attempts, 5)
        elif p.waiting is not None and p.waiting[0] == "ErrImagePull":
            p.waiting = ("ImagePullBackOff", f'Back-off pulling image "{image}"')

    def _start(self, p: _Pod) -> None:
        js = self.jobsets[p.jobset]
        env = {k: v for k, v in os.environ.items() if not _RANK_ENV.match(k)}
        env.update(self.extra_env)
        for e in p.container.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            elif _get(e, "valueFrom", "fieldRef", "fieldPath") == f"metadata.annotations['{COMPLETION_INDEX}']":
                env[e["name"]] = p.annotations[COMPLETION_INDEX]
        if "PET_MASTER_ADDR" in env:  # one machine, one network
            env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"] = "127.0.0.1", str(js.port)
        command = [*p.container.get("command", []), *p.container.get("args", [])]
        command = [sys.executable if part == "python" else part for part in command]
        if not command:
            raise NotImplementedError("LocalTrainer needs an explicit command for the node container")
        p.log_file = open(p.log_path(p.restart_count), "wb")  # noqa: SIM115 - closed when the process is reaped
        p.proc = subprocess.Popen(command, env=env, stdout=p.log_file, stderr=subprocess.STDOUT, start_new_session=True)
        p.phase, p.restart_at, p.started_at = "Running", None, _stamp()

    def _exited(self, p: _Pod, code: int, now: float) -> None:
        exit_code = code if code >= 0 else 128 - code
        term = V1ContainerStateTerminated(
            exit_code=exit_code,
            reason="Completed" if exit_code == 0 else "Error",
            started_at=p.started_at,
            finished_at=_stamp(),
        )
        if p.log_file is not None:
            p.log_file.close()
            p.log_file = None
        p.proc = None
        if exit_code == 0:
            p.phase, p.terminated = "Succeeded", term
            return
        p.last = term  # OnFailure: restarted in place, the first time at once, then after the crash-loop back-off
        delay = 0.0 if p.restart_count == 0 else min(CRASH_BACKOFF * 2 ** (p.restart_count - 1), CRASH_BACKOFF_MAX)
        p.restart_at = now + delay * self.backoff_scale

    def _kill(self, pods: list[_Pod]) -> None:
        running = [p for p in pods if p.proc is not None and p.proc.poll() is None]
        for p in running:
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


# --- rendering the JobSet ------------------------------------------------------------------------------------


def _set_defaults(tj: dict[str, Any]) -> None:
    spec = tj.setdefault("spec", {})
    ref = spec.setdefault("runtimeRef", {})
    ref.setdefault("apiGroup", "trainer.kubeflow.org")
    ref.setdefault("kind", "ClusterTrainingRuntime")
    spec.setdefault("suspend", False)
    spec.setdefault("managedBy", "trainer.kubeflow.org/trainjob-controller")
    if spec["suspend"]:
        raise NotImplementedError("LocalTrainer does not model suspended TrainJobs")


def _render_jobset(tj: dict[str, Any], runtime: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The JobSet spec and labels the trainer builds for `tj` from `runtime` (see the rules table)."""
    name = tj["metadata"]["name"]
    template = copy.deepcopy(runtime["spec"]["template"])
    spec = template["spec"]
    labels = dict(template.get("metadata", {}).get("labels", {}))
    for patch in tj["spec"].get("runtimePatches", []):
        labels.update(_get(patch, "trainingRuntimeSpec", "template", "metadata", "labels") or {})
        for rp in _get(patch, "trainingRuntimeSpec", "template", "spec", "replicatedJobs") or []:
            _merge_rjob_patch(next(r for r in spec["replicatedJobs"] if r["name"] == rp["name"]), rp)
    trainer = tj["spec"].get("trainer") or {}
    ml = runtime["spec"].get("mlPolicy", {})
    nodes = int(trainer.get("numNodes") or ml.get("numNodes", 1))
    for r in spec["replicatedJobs"]:
        jspec = r["template"]["spec"]
        jspec.setdefault("completionMode", "Indexed")
        jspec.setdefault("backoffLimit", DEFAULT_BACKOFF_LIMIT)
        pod = jspec["template"]["spec"]
        pod.setdefault("restartPolicy", "OnFailure")
        pod["subdomain"] = name
        if r["template"].get("metadata", {}).get("labels", {}).get(ANCESTOR_LABEL) != "trainer":
            continue
        r["replicas"] = 1
        jspec["parallelism"] = jspec["completions"] = nodes
        container = next(c for c in pod["containers"] if c["name"] == NODE)
        for key in ("image", "command", "args"):
            if trainer.get(key) is not None:
                container[key] = copy.deepcopy(trainer[key])
        if trainer.get("resourcesPerNode"):
            resources = container.setdefault("resources", {})
            for kind, values in trainer["resourcesPerNode"].items():
                resources[kind] = {**resources.get(kind, {}), **values}
        if "torch" in ml:
            _upsert_env(container, trainer.get("env", []))
            _upsert_env(container, _torch_env(name, nodes, trainer, container.get("resources", {})))
            container["ports"] = [{"containerPort": TRAINER_PORT}]
    return spec, labels


def _merge_rjob_patch(rjob: dict[str, Any], patch: dict[str, Any]) -> None:
    """mergeRuntimePatches for the fields a ReplicatedJobPatch may carry (strategic merge: maps merge, lists of
    tolerations and scalars replace)."""
    job_meta = _get(patch, "template", "metadata") or {}
    pod_meta = _get(patch, "template", "spec", "template", "metadata") or {}
    pod_spec = _get(patch, "template", "spec", "template", "spec") or {}
    target_job = rjob["template"].setdefault("metadata", {})
    target_pod = rjob["template"]["spec"]["template"]
    for meta, target in ((job_meta, target_job), (pod_meta, target_pod.setdefault("metadata", {}))):
        for key in ("labels", "annotations"):
            if meta.get(key):
                target[key] = {**target.get(key, {}), **meta[key]}
    for key, value in pod_spec.items():
        if key not in _PATCHABLE_POD_SPEC:
            raise NotImplementedError(f"LocalTrainer does not model the pod spec patch field {key}")
        if key == "nodeSelector":
            target_pod["spec"][key] = {**target_pod["spec"].get(key, {}), **value}
        else:
            target_pod["spec"][key] = copy.deepcopy(value)


def _torch_env(name: str, nodes: int, trainer: dict[str, Any], resources: dict[str, Any]) -> list[dict[str, Any]]:
    nproc = trainer.get("numProcPerNode")
    if nproc is None:
        gpus = _num_gpu(resources.get("requests", {})) or _num_gpu(resources.get("limits", {}))
        nproc = "auto" if gpus else max(1, _num_cpu(resources))
    return [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        {
            "name": "PET_NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}},
        },
        {"name": "PET_MASTER_ADDR", "value": f"{name}-{NODE}-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
    ]


def _num_gpu(resources: dict[str, Any]) -> int:
    """runtime.go numGPU: the first resource whose name contains "gpu"."""
    for key, value in resources.items():
        if "gpu" in key.lower():
            return math.ceil(parse_quantity(value))
    return 0


def _num_cpu(resources: dict[str, Any]) -> int:
    """torch.go getNumCPUPerNode: the CPU request (else limit), rounded up as Quantity.Value() does."""
    cpu = resources.get("requests", {}).get("cpu") or resources.get("limits", {}).get("cpu")
    return math.ceil(parse_quantity(cpu)) if cpu else 0


def _upsert_env(container: dict[str, Any], env: list[dict[str, Any]]) -> None:
    current = container.setdefault("env", [])
    for e in env:
        current[:] = [c for c in current if c["name"] != e["name"]]
        current.append(copy.deepcopy(e))


def _set_condition(
    conditions: list[dict[str, Any]], ctype: str, reason: str, message: str, when: str | None = None
) -> None:
    """apimachinery meta.SetStatusCondition: one condition per type; the transition time kept while the status
    stays."""
    current = next((c for c in conditions if c["type"] == ctype), None)
    if current is None:
        conditions.append(
            {
                "type": ctype,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": when or _now(),
            }
        )
    else:
        current.update(reason=reason, message=message)


def _finished(conditions: list[dict[str, Any]]) -> bool:
    return any(c["type"] in ("Completed", "Failed") and c["status"] == "True" for c in conditions)


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _signal(p: _Pod, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.proc.pid, sig)  # type: ignore[union-attr]


def _v1pod(p: _Pod) -> V1Pod:
    if p.terminated is not None:
        state = V1ContainerState(terminated=p.terminated)
    elif p.restart_at is not None:
        message = f"back-off restarting failed container {NODE} in pod {p.name}"
        state = V1ContainerState(waiting=V1ContainerStateWaiting(reason="CrashLoopBackOff", message=message))
    elif p.proc is not None:
        state = V1ContainerState(running=V1ContainerStateRunning(started_at=p.started_at))
    elif p.waiting is not None:
        state = V1ContainerState(waiting=V1ContainerStateWaiting(reason=p.waiting[0], message=p.waiting[1]))
    else:
        state = V1ContainerState(waiting=V1ContainerStateWaiting(reason="ContainerCreating"))
    running = p.proc is not None
    status = V1ContainerStatus(
        name=NODE,
        image=str(p.container.get("image", "")),
        image_id="",
        ready=running,
        started=running,
        restart_count=p.restart_count,
        state=state,
        last_state=V1ContainerState(terminated=p.last) if p.last is not None else None,
    )
    owner = V1OwnerReference(api_version="batch/v1", kind="Job", name=p.job, uid=p.job, controller=True)
    return V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=V1ObjectMeta(
            name=p.name, uid=p.uid, labels=dict(p.labels), annotations=dict(p.annotations), owner_references=[owner]
        ),
        spec=_deserialize(p.spec, "V1PodSpec"),
        status=V1PodStatus(phase=p.phase, container_statuses=[status]),
    )


def _owner(trainjob: str, uid: str) -> dict[str, Any]:
    """The controller ownerReference the trainer gives the JobSet and the snapshot (blockOwnerDeletion true)."""
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "name": trainjob,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _deserialize(data: dict[str, Any], klass: str) -> Any:
    """A camelCase dict as the kubernetes client's model object (its own deserialiser, as for an API response)."""
    with ApiClient() as client:
        return client._ApiClient__deserialize(copy.deepcopy(data), klass)


def _trainjob_finished(conditions: list[dict[str, Any]]) -> bool:
    """pkg/util/trainjob/trainjob.go IsTrainJobFinished: Complete or Failed is True."""
    return any(c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in conditions)
