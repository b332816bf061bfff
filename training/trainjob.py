"""Build the Kubeflow Trainer v2 `TrainJob` that runs one worker per shard (the worker reads its rank from the
Trainer's variables through training/rank_env.py).

`build_trainjob` is the Trainer v2 twin of `microfed.training.pytorchjob.build_pytorchjob`: a pure function from the
same `JobConfig` to the manifest (a dict, as the API server receives it), tested against the TrainJob CRD of the
pinned release (tests/schemas/TRAINER.md). The pod the worker runs in is the one the PyTorchJob builder writes
(image, command, arguments, env, resources, tolerations, node selector, service account, grace period, labels and
the Istio annotation); only where each piece goes differs. How the Trainer turns the manifest into pods, in
kubeflow/trainer at TRAINER_RELEASE (file :: function):

- The `torch-distributed` ClusterTrainingRuntime has one ReplicatedJob `node` (replicas 1) whose Job template carries
  the label `trainer.kubeflow.org/trainjob-ancestor-step: trainer` and one container `node`
  (manifests/base/runtimes/torch_distributed.yaml). `trainer.numNodes` becomes that Job's parallelism and completions
  (pkg/runtime/framework/plugins/torch/torch.go :: EnforceMLPolicy sets the trainer PodSet's count;
  pkg/runtime/framework/plugins/jobset/jobset.go :: SyncParallelCount copies it).
- `trainer.image/command/args/env` go to the container named `node` of the trainer ancestor
  (pkg/runtime/framework/plugins/jobset/builder.go :: Builder.Trainer); `trainer.resourcesPerNode` is merged into its
  resources (pkg/runtime/core/trainingruntime.go :: newRuntimeInfo, MergeResourceRequirements).
- Everything else about the pod (service account, node selector, tolerations, grace period, pod labels and
  annotations) goes through `spec.runtimePatches[]`, a strategic merge patch of the JobSet spec keyed by a
  domain-prefixed `manager` (pkg/runtime/core/trainingruntime.go :: mergeRuntimePatches;
  pkg/runtime/framework/plugins/jobset/jobset.go :: Validate). Env of the `node` container may not be patched there.
- The torch plugin injects PET_NNODES (numNodes), PET_NPROC_PER_NODE, PET_NODE_RANK (the Job completion index,
  from the pod annotation batch.kubernetes.io/job-completion-index), PET_MASTER_ADDR `<name>-node-0-0.<name>` and
  PET_MASTER_PORT 29500, and refuses a TrainJob whose trainer env sets any of them (torch.go :: EnforceMLPolicy,
  Validate). Without `numProcPerNode` a CPU node gets PET_NPROC_PER_NODE = its CPU request rounded up, so the builder
  asks for 1: the worker is one process per node.
- There is no TrainJob field for backoffLimit, ttlSecondsAfterFinished or cleanPodPolicy in this release: those
  JobConfig fields do not reach the cluster on this path (the launcher bounds restarts and deletes the job itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from microfed.training.errors import MicrofedError

if TYPE_CHECKING:
    from microfed.training.pytorchjob import JobConfig

__all__ = [
    "API_VERSION",
    "KIND",
    "NODE",
    "PATCH_MANAGER",
    "RUNTIME_NAME",
    "TORCH_RESERVED_ENV",
    "TRAINER_RELEASE",
    "build_trainjob",
]

TRAINER_RELEASE = "v2.3.0"  # the release whose CRD the tests validate against (tests/schemas/TRAINER.md)
API_VERSION = "trainer.kubeflow.org/v1alpha1"
KIND = "TrainJob"
RUNTIME_NAME = "torch-distributed"
RUNTIME_KIND = "ClusterTrainingRuntime"
RUNTIME_API_GROUP = "trainer.kubeflow.org"
NODE = "node"  # the runtime's ReplicatedJob and its container (pkg/constants/constants.go :: Node)
# runtimePatches entries are keyed by a domain-prefixed path (jobset.go :: Validate, IsDomainPrefixedPath).
PATCH_MANAGER = "microfed.dev/train-step"
TORCH_RESERVED_ENV = frozenset(
    {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
)
# JobSet's webhook refuses a JobSet whose longest pod name `<name>-node-0-<last index>-xxxxx` is no DNS-1035 label
# (kubernetes-sigs/jobset v0.12.0, pkg/webhooks/jobset_webhook.go :: ValidateCreate).
_MAX_POD_NAME = 63
_POD_SUFFIX = 6  # "-" and the 5 random characters of a Job's pod name


# --- the manifest ------------------------------------------------------------------------------------------


def build_trainjob(cfg: JobConfig) -> dict[str, Any]:
    """The `trainer.kubeflow.org/v1alpha1` TrainJob for `cfg`: `cfg.workers` nodes of the `torch-distributed`
    ClusterTrainingRuntime, each running the pod that `build_pytorchjob(cfg)` gives every replica."""
    _check(cfg)
    pod = _pod_template_dict(cfg)
    container = pod["spec"]["containers"][0]
    command = list(container["command"])
    trainer: dict[str, Any] = {
        "image": container["image"],
        # the entrypoint and the worker's arguments apart: `kubectl describe` shows them as such
        "command": command[:3],
        "args": command[3:],
        "env": container.get("env", []),
        "numNodes": cfg.workers,
        "numProcPerNode": 1,
        "resourcesPerNode": container["resources"],
    }
    pod_spec = {k: v for k, v in pod["spec"].items() if k != "containers"}
    node_patch = {"name": NODE, "template": {"spec": {"template": {"metadata": pod["metadata"], "spec": pod_spec}}}}
    labels = dict(pod["metadata"]["labels"])
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {"metadata": {"labels": labels}, "spec": {"replicatedJobs": [node_patch]}},
        },
    }
    manifest = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": cfg.name, "namespace": cfg.namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": RUNTIME_NAME, "apiGroup": RUNTIME_API_GROUP, "kind": RUNTIME_KIND},
            "trainer": trainer,
            "runtimePatches": [patch],
            "activeDeadlineSeconds": cfg.active_deadline_seconds,
        },
    }
    return _through_sdk_model(manifest)


def _through_sdk_model(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest parsed into Kubeflow Trainer's own TrainJob model (kubeflow-trainer-api 2.3, generated from this
    release's API) and serialised back: a field of the wrong type or shape fails here, and what is sent is what the
    model holds. A field the model does not know would be lost: refuse that instead of sending less."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    modelled: dict[str, Any] = TrainerV1alpha1TrainJob.from_dict(manifest).to_dict()
    if modelled != manifest:
        raise MicrofedError(
            "the TrainJob does not survive kubeflow-trainer-api's TrainJob model unchanged",
            hint="a field is not in the pinned Trainer API (kubeflow-trainer-api>=2.3.0,<2.4)",
        )
    return modelled


def _check(cfg: JobConfig) -> None:
    reserved = sorted(TORCH_RESERVED_ENV & set(cfg.env))
    if reserved:
        raise MicrofedError(
            f"JobConfig.env must not set {', '.join(reserved)}",
            hint="the Trainer's torch plugin injects them and refuses a TrainJob that sets them",
        )
    longest = f"{cfg.name}-{NODE}-0-{cfg.workers - 1}"
    if len(longest) + _POD_SUFFIX > _MAX_POD_NAME:
        raise MicrofedError(
            f"TrainJob {cfg.name!r} with {cfg.workers} nodes would name pods {longest}-xxxxx, longer than "
            f"{_MAX_POD_NAME} characters (JobSet refuses it)",
            hint="use a shorter job name or fewer workers",
        )


def _pod_template_dict(cfg: JobConfig) -> dict[str, Any]:
    """The PyTorchJob builder's pod template, serialised as the API server receives it.

    Imported here, not at module level: the kubernetes and kubeflow-training clients load only when a manifest
    is built."""
    from kubernetes.client import ApiClient

    from microfed.training.pytorchjob import pod_template

    with ApiClient() as client:  # only its serialiser is used: nothing connects to a cluster
        data: dict[str, Any] = client.sanitize_for_serialization(pod_template(cfg))
    return data
