"""The train component's body: from what KFP hands the component (its artifacts' local paths and URIs, the run id
and task name it resolves at run time) to one call of the train step (microfed.training.step_train).

It lives here, not in training/, because it is KFP adapter code; and outside components/steps.py because KFP ships
a lightweight component's function source alone: the train component imports this module inside its body.
"""

from __future__ import annotations

from typing import Any

from microfed.training.errors import MicrofedError
from microfed.training.pipeline_root import check_replica_uris, usage_cache_uri
from microfed.training.shards import read_dataset_manifest
from microfed.training.step_train import ClusterOptions, train_step
from microfed.training.strategies import Strategy
from microfed.training.train import OptimConfig
from microfed.training.worker import WorkerConfig

__all__ = ["train_component_step"]


def train_component_step(
    *,
    shards: tuple[str, str],
    out: tuple[str, str],
    launcher: str,
    model: str,
    rounds: int,
    local_epochs: int,
    seed: int,
    optim: OptimConfig,
    strategy: Strategy | None = None,
    patience: int = 0,
    worker_image: str,
    namespace: str,
    accelerators: str,
    timeout_minutes: int,
    service_account: str,
    run_id: str,
    task_name: str,
    pool_max_nodes: int = 0,
    collective_timeout_minutes: int = 0,
    usage_cache: str = "",
) -> dict[str, Any]:
    """The train component's body: `shards` and `out` are the artifacts' (local path, URI) pairs.

    With `launcher="pytorchjob"` the replicas run in other pods, which cannot see this pod's files, so they
    get the URIs, which must be gs:// (checked before any job exists); locally the paths. `out`'s URI also
    locates the pipeline root, beside which the measured-usage cache lives by default.
    """
    if launcher not in ("local", "pytorchjob"):
        raise MicrofedError(f"unknown launcher {launcher!r}", hint="use local or pytorchjob")
    on_cluster = launcher == "pytorchjob"
    if on_cluster:
        check_replica_uris({"shards": shards[1], "micro_models": out[1]})
    world_size = len(read_dataset_manifest(shards[0])["shards"])
    cfg = WorkerConfig(
        shards=shards[on_cluster],
        out=out[on_cluster],
        model=model,
        rounds=rounds,
        local_epochs=local_epochs,
        seed=seed,
        optim=optim,
        strategy=strategy or Strategy(),
        patience=patience,
        collective_timeout_minutes=float(collective_timeout_minutes),
    )
    cluster = None
    if on_cluster:
        cluster = ClusterOptions(
            image=worker_image,
            namespace=namespace,
            accelerators=tuple(a.strip() for a in accelerators.split(",") if a.strip()),
            timeout_seconds=60.0 * timeout_minutes,
            run_id=run_id,
            task=task_name,
            service_account=service_account,
            pool_max_nodes=pool_max_nodes,
        )
    # the measured-usage cache: where the caller says ("off": none), else next to the pipeline root, so later
    # runs of the same model and input shape start their plan from this one's measurement. The root is read
    # from the micro_models URI: KFP 2.14's backend leaves `{{$.pipeline_root}}` unresolved (pipeline_root.py).
    if usage_cache == "off":
        usage_cache = ""
    elif not usage_cache:
        usage_cache = usage_cache_uri(out[1], artifact="micro_models", task_name=task_name, run_id=run_id)
    return train_step(cfg, world_size, cluster=cluster, usage_cache=usage_cache)
