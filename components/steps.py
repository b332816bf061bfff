"""The five KFP v2 components. Each is a typed signature, a docstring and one call into microfed.training (the
train component's goes through components/train_adapter.py, which reads KFP's runtime placeholders first).

Bodies import inside the function because KFP ships a lightweight component's source to the executor on
its own; the image (or, locally, this Python environment) provides microfed. The call runs inside
`reported_errors()`, which hands a failure's own message to `microfed run` (training/errors.py); a decorator
could not do it, since KFP ships the function's body without its decorators.

The parameters' defaults are literals for the same reason (the shipped source cannot read training/config.py):
they are RunConfig's, and tests/test_config.py fails when one differs.
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from microfed.components.image import component_image

__all__ = ["aggregate", "evaluate", "export", "split_dataset", "train"]

_IMAGE = component_image()


@dsl.component(base_image=_IMAGE, install_kfp_package=False)
def split_dataset(
    shards: Output[Dataset],
    dataset: str = "fashion-mnist",
    workers: int = 3,
    split: str = "stratified",
    split_ratios: str = "",
    alpha: float = 0.5,
    seed: int = 0,
    image_size: int = 0,
    train_limit: int = 0,
    test_limit: int = 0,
    bad_images: str = "fail",
    val_fraction: float = 0.05,
) -> None:
    """Decode `dataset` (fashion-mnist, mnist, cifar10, or a zip/folder of train/ and test/ class folders)
    once and write one shard per worker plus the test set: uint8 safetensors with JSON manifests.

    split: stratified | iid | dirichlet (label skew with concentration `alpha`). split_ratios: relative
    shard sizes for stratified/iid, comma-separated ("1,2,1"; empty = equal). bad_images: `fail` on an image
    that cannot be decoded, or `skip` it (counted in the manifest). image_size: resize to a
    square of this side (0 keeps the images' size). train_limit/test_limit: use at most that many examples.
    val_fraction: share of the training examples held out (stratified) as the validation split that selects
    the best round (0 = none; then the last round is kept).
    """
    from microfed.training.errors import reported_errors
    from microfed.training.shards import SplitConfig, parse_ratios
    from microfed.training.step_split import SplitOptions, split_step

    with reported_errors():
        summary = split_step(
            SplitOptions(
                source=dataset,
                image_size=(image_size, image_size) if image_size else None,
                train_limit=train_limit,
                test_limit=test_limit,
                bad_images=bad_images,
            ),
            SplitConfig(
                workers=workers,
                split=split,
                ratios=parse_ratios(split_ratios),
                alpha=alpha,
                seed=seed,
                val_fraction=val_fraction,
            ),
            shards.path,
        )
    shards.metadata.update(
        {
            "workers": workers,
            "classes": len(summary["class_names"]),
            "train_examples": summary["num_train_examples"],
            "val_examples": summary["num_val_examples"],
            "test_examples": summary["num_test_examples"],
        }
    )


@dsl.component(base_image=_IMAGE, install_kfp_package=False)
def train(
    shards: Input[Dataset],
    micro_models: Output[Model],
    model: str = "cnn-fmnist",
    rounds: int = 3,
    local_epochs: int = 3,
    batch_size: int = 0,
    global_batch_size: int = 128,
    optimizer: str = "adam",
    lr: float = 0.003,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    schedule: str = "cosine",
    warmup_fraction: float = 0.02,
    augment: str = "none",
    precision: str = "auto",
    seed: int = 0,
    strategy: str = "fedavg",
    mu: float = 0.01,
    server_momentum: float = 0.9,
    server_lr: float = 0.0,
    fedbn: bool = False,
    sync_every_steps: int = 4,
    sync_optimizer: str = "local",
    patience: int = 0,
    launcher: str = "auto",
    worker_image: str = "",
    job_namespace: str = "",
    accelerators: str = "none,nvidia-tesla-t4",
    timeout_minutes: int = 720,
    service_account: str = "pipeline-runner",
    pool_max_nodes: int = 0,
    collective_timeout_minutes: int = 0,
    run_id: str = "",
    task_name: str = "train",
    usage_cache: str = "",
) -> None:
    """Train one micro-model per shard: one worker per shard, `rounds` rounds of `local_epochs` epochs with in-job
    weighted averaging between rounds. launcher: `auto` (the job kind the cluster serves: TrainJob, else
    PyTorchJob; the step log says which), `trainjob` (a Kubeflow Trainer v2 TrainJob on the torch-distributed
    runtime, one node per shard), `pytorchjob` (a Training Operator v1 job, one replica per shard) or `local`
    (WORLD_SIZE processes in this step); a cluster job has resources from the plan, image `worker_image` and
    accelerators chosen from the comma-separated `accelerators`. Fails with the failing worker's log when a worker
    fails.

    strategy: how the workers train and how their models are combined, a name in the strategies' registry
    (microfed.training.strategies; `microfed run --help` lists them), with its settings: `mu` (fedprox's proximal
    term), `server_momentum` and `server_lr` (a server optimizer's momentum and learning rate; server_lr 0 = the
    strategy's own default). fedbn: keep BatchNorm layers out of the in-job averages. sync_every_steps: also average
    the weights inside each round every that many optimizer steps (local SGD; 0 = at round ends only);
    sync_optimizer: the optimizer's state at each in-job average (local, average or reset). patience: stop after that
    many rounds without a better validation accuracy (0 = run every round). usage_cache: the measured-usage
    cache (a folder or .json, local or gs://; default `<pipeline root>/usage-cache.json`, the root read from
    micro_models' URI, "off" for none): the workers' measured peaks go there and later plans for the same model
    and input shape start from them.
    momentum: sgd's (Nesterov) momentum; warmup_fraction: the share of all steps the cosine schedule warms up.
    batch_size: examples per step on each worker; 0 = ceil(global_batch_size / workers).
    sync_every_steps: also average the weights every this many steps inside a round (0: at round ends; ddp ignores it).
    a cluster launcher needs a gs:// pipeline root and fails before creating the job on another.
    pool_max_nodes: the training pool's maximum node count when infra/ was applied with a non-default
    cpu_max_nodes/gpu_max_nodes (0 = infra's defaults); a job needing more nodes fails before it is created.
    collective_timeout_minutes: how long a worker waits in one collective (a fast rank at the end of a round waits
    for the slowest) before it counts its peer as lost; 0 = from the plan's round time (x 4, at least 30).
    """
    params = dict(locals())  # first: every parameter by name, the artifacts and KFP's placeholders dropped below
    from microfed.components.train_adapter import train_component_step
    from microfed.training.errors import reported_errors

    with reported_errors():
        record = train_component_step(
            shards=(shards.path, shards.uri),
            out=(micro_models.path, micro_models.uri),
            params={k: v for k, v in params.items() if k not in ("shards", "micro_models", "run_id", "task_name")},
            run_id=run_id,
            task_name=task_name,
        )
    micro_models.metadata.update({"workers": len(record["workers"]), "n_k": [w["n_k"] for w in record["workers"]]})


@dsl.component(base_image=_IMAGE, install_kfp_package=False)
def aggregate(micro_models: Input[Model], shards: Input[Dataset], global_model: Output[Model]) -> None:
    """Combine the micro-models by the training strategy's final combine: FedAvg's average weighted by n_k / n
    (floating tensors, BatchNorm statistics included; integer buffers kept integer), then a server optimizer's last
    step, or ddp's single model. With a validation split, keeps the round with the best validation accuracy. Writes
    model.safetensors and model_config.json."""
    from microfed.training.errors import reported_errors
    from microfed.training.step_aggregate import aggregate_step

    with reported_errors():
        record = aggregate_step(micro_models.path, global_model.path, shards.path)
    global_model.metadata.update(
        {
            "num_examples": record["num_examples"],
            "micro_models": record["micro_models"],
            "strategy": record["strategy"]["name"],
            "round": record.get("selected_round") or record["rounds"],
        }
    )


@dsl.component(base_image=_IMAGE, install_kfp_package=False)
def evaluate(
    global_model: Input[Model],
    shards: Input[Dataset],
    micro_models: Input[Model],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    report: Output[Artifact],
    report_html: Output[HTML],
) -> None:
    """Test-set loss, accuracy, per-class accuracy and confusion matrix of the global model; `report` holds
    metrics.json (per-round accuracy, each micro-model's accuracy, shard sizes, step timings) and report.html,
    which `report_html` shows in the Kubeflow UI (split audit, rounds, confusion matrix, plan, configuration)."""
    import re
    import shutil

    from microfed.training.errors import reported_errors
    from microfed.training.layout import REPORT_FILE
    from microfed.training.step_evaluate import evaluate_step

    with reported_errors():
        m = evaluate_step(global_model.path, shards.path, micro_models.path, report.path)
    shutil.copyfile(f"{report.path}/{REPORT_FILE}", report_html.path)
    metrics.log_metric("accuracy", m["accuracy"])
    metrics.log_metric("loss", m["loss"])
    split = "val" if m["round_split"] == "validation" else "test"
    for r, acc in zip(m["round_numbers"], m["round_accuracy"], strict=True):
        metrics.log_metric(f"round_{r}_{split}_accuracy", acc)
    if m.get("selected_round"):
        metrics.log_metric("selected_round", m["selected_round"])
    if m.get("macro_accuracy") is not None:
        metrics.log_metric("macro_accuracy", m["macro_accuracy"])
    if m.get("skipped_images"):
        metrics.log_metric("skipped_images", m["skipped_images"]["total"])
    for name, class_accuracy in m["per_class_accuracy"].items():
        # a class without test images has no accuracy (the metrics say null); the UI wants numbers
        if class_accuracy is None:
            continue
        # Metric names show as table rows in the UI; keep them to one safe token ("T-shirt/top" has a slash).
        metrics.log_metric("accuracy_" + re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_"), class_accuracy)
    for i, n in enumerate(m["shard_sizes"]):
        metrics.log_metric(f"shard_{i}_examples", n)
    for step, seconds in m["timings"].items():
        metrics.log_metric(f"seconds_{step}", round(seconds, 3))
    classification.log_confusion_matrix(m["class_names"], m["confusion_matrix"])


@dsl.component(base_image=_IMAGE, install_kfp_package=False)
def export(
    global_model: Input[Model],
    shards: Input[Dataset],
    exported: Output[Model],
    export_format: str = "onnx",
    parity_images: int = 64,
    tolerance: float = 0.0001,
) -> None:
    """The global model as ONNX (or TorchScript) taking uint8 NCHW images, normalisation inside, with model.json
    (class names, input size); fails unless its logits match eager PyTorch within `tolerance` on test images."""
    from microfed.training.errors import reported_errors
    from microfed.training.step_export import export_step

    with reported_errors():
        r = export_step(
            global_model.path,
            shards.path,
            exported.path,
            fmt=export_format,
            parity_images=parity_images,
            tolerance=tolerance,
        )
    exported.metadata.update(
        {
            "format": export_format,
            "file": r["file"],
            "bytes": r["bytes"],
            "parity_max_abs_diff": r["parity"]["max_abs_diff"],
        }
    )
