"""The microfed pipeline: split → train (one worker per shard) → aggregate (FedAvg) → evaluate."""

# No `from __future__ import annotations`: KFP reads the real annotation objects.

import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from kfp import compiler, dsl

from microfed.components import aggregate, evaluate, export, split_dataset, train
from microfed.components.image import component_image
from microfed.training.config import config_fields, defaults
from microfed.training.config_checks import SPLIT, TRAIN
from microfed.training.io import atomic_write_bytes
from microfed.training.layout import PIPELINE_FILE

__all__ = ["PIPELINE_NAME", "compile_pipeline", "microfed_pipeline"]

PIPELINE_NAME = "microfed"
# Every parameter's default comes from RunConfig (training/config.py), the one place a default changes; KFP reads
# the values (plain literals) from the signature. worker_image is the components' image, not a run setting.
_D = defaults()


def _taking(step: str, params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's parameters that the component `step` takes: the RunConfig fields listed for it."""
    return {f.name: params[f.name] for f in config_fields() if step in f.steps}


def _step(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    """Name a task, let it be retried, and turn KFP's cache off for it (both reasons below)."""
    # Every step is idempotent (deterministic outputs, each file replaced whole; the train step resumes from its
    # round checkpoints), so a pod lost to a preempted spot node or a transient error is simply run again.
    task.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2.0)
    # No cache: every output lives under the pipeline root, whose objects the bucket deletes after
    # `artifact_retention_days` (infra/modules/microfed/), while a KFP v2 cache entry never expires. KFP 2.14.3 reuses
    # the newest earlier task with the same fingerprint whatever its age (kubeflow/pipelines 2.14.3,
    # backend/src/v2/driver/cache.go, `getFingerPrintsAndID`; backend/src/v2/cacheutils/cache.go,
    # `GetExecutionCache`: a filter on fingerprint, pipeline name and namespace, newest first, no time bound),
    # and hands on its artifact URIs without checking they exist (driver/cache.go, `reuseCachedOutputs`). The
    # `max_cache_staleness` annotation belongs to the v1 cache webhook, which skips v2 pods
    # (backend/src/cache/server/mutation.go, `MutatePodIfCached`: "KFP v2 handles caching by its driver").
    # A cached split would hand later runs shard URIs that no longer exist.
    task.set_caching_options(False)
    return task.set_display_name(name)


class Outputs(NamedTuple):
    """The pipeline's outputs: every step's (a local run records where each is, training/layout.py RunArtifacts)."""

    shards: dsl.Dataset
    micro_models: dsl.Model
    global_model: dsl.Model
    report: dsl.Artifact
    exported: dsl.Model


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Federated-style training: shards, one worker per shard, FedAvg, evaluation.",
)
def microfed_pipeline(
    dataset: str = _D["dataset"],
    model: str = _D["model"],
    workers: int = _D["workers"],
    rounds: int = _D["rounds"],
    local_epochs: int = _D["local_epochs"],
    batch_size: int = _D["batch_size"],
    global_batch_size: int = _D["global_batch_size"],
    lr: float = _D["lr"],
    optimizer: str = _D["optimizer"],
    weight_decay: float = _D["weight_decay"],
    momentum: float = _D["momentum"],
    schedule: str = _D["schedule"],
    warmup_fraction: float = _D["warmup_fraction"],
    augment: str = _D["augment"],
    precision: str = _D["precision"],
    split: str = _D["split"],
    split_ratios: str = _D["split_ratios"],
    alpha: float = _D["alpha"],
    seed: int = _D["seed"],
    image_size: int = _D["image_size"],
    train_limit: int = _D["train_limit"],
    test_limit: int = _D["test_limit"],
    bad_images: str = _D["bad_images"],
    val_fraction: float = _D["val_fraction"],
    strategy: str = _D["strategy"],
    mu: float = _D["mu"],
    server_momentum: float = _D["server_momentum"],
    server_lr: float = _D["server_lr"],
    fedbn: bool = _D["fedbn"],
    sync_every_steps: int = _D["sync_every_steps"],
    sync_optimizer: str = _D["sync_optimizer"],
    patience: int = _D["patience"],
    usage_cache: str = _D["usage_cache"],
    launcher: str = _D["launcher"],
    worker_image: str = component_image(),
    job_namespace: str = _D["job_namespace"],
    accelerators: str = _D["accelerators"],
    timeout_minutes: int = _D["timeout_minutes"],
    service_account: str = _D["service_account"],
    pool_max_nodes: int = _D["pool_max_nodes"],
    collective_timeout_minutes: int = _D["collective_timeout_minutes"],
) -> Outputs:
    """Train `model` on `dataset` split into `workers` shards: `rounds` rounds of `local_epochs` local
    epochs, combined by `strategy` (fedavg: averaged with weights n_k / n), keep the round with the best
    accuracy on a validation split held out from train, and evaluate that model once on the test set."""
    params = dict(locals())  # {parameter: its channel}: each component gets the RunConfig fields it takes
    split_task = _step(split_dataset(**_taking(SPLIT, params)), "split dataset")
    # run_id and task_name are placeholders the KFP 2.14 driver resolves (pipelines/backend_placeholders.json);
    # the pipeline root is not one: the train step reads it from its micro_models URI (training/pipeline_root.py)
    train_task = _step(
        train(
            shards=split_task.outputs["shards"],
            worker_image=worker_image,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
            **_taking(TRAIN, params),
        ),
        "train micro-models",
    )
    agg_task = _step(
        aggregate(micro_models=train_task.outputs["micro_models"], shards=split_task.outputs["shards"]), "aggregate"
    )
    eval_task = _step(
        evaluate(
            global_model=agg_task.outputs["global_model"],
            shards=split_task.outputs["shards"],
            micro_models=train_task.outputs["micro_models"],
        ),
        "evaluate",
    )
    export_task = _step(
        export(global_model=agg_task.outputs["global_model"], shards=split_task.outputs["shards"]), "export (ONNX)"
    )
    return Outputs(
        shards=split_task.outputs["shards"],
        micro_models=train_task.outputs["micro_models"],
        global_model=agg_task.outputs["global_model"],
        report=eval_task.outputs["report"],
        exported=export_task.outputs["exported"],
    )


def compile_pipeline(path: str | Path, image: str | None = None) -> Path:
    """Write the pipeline YAML that users upload to Kubeflow Pipelines; `image` replaces every executor's image.

    The compiled spec is data, so the image is set there rather than by re-declaring the components.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = Path(tmp) / PIPELINE_FILE
        compiler.Compiler().compile(microfed_pipeline, str(compiled))
        text = compiled.read_text()
    if image:
        spec = yaml.safe_load(text)
        for executor in spec["deploymentSpec"]["executors"].values():
            executor["container"]["image"] = image
        # the PyTorchJob replicas run the same image as the steps
        spec["root"]["inputDefinitions"]["parameters"]["worker_image"]["defaultValue"] = image
        text = yaml.safe_dump(spec, sort_keys=False)
    atomic_write_bytes(path, text.encode())
    return path
