"""The train component's body: from what KFP hands the component (its artifacts' local paths and URIs, the run id
and task name it resolves at run time) to one call of the train step (microfed.training.step_train).

It lives here, not in training/, because it is KFP adapter code; and outside components/steps.py because KFP ships
a lightweight component's function source alone: the train component imports this module inside its body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from microfed.training.config import RunConfig
from microfed.training.launcher_select import choose_launcher
from microfed.training.layout import JobRecord
from microfed.training.pipeline_root import check_replica_uris, usage_cache_uri
from microfed.training.shards import read_dataset_manifest
from microfed.training.step_log import log
from microfed.training.step_train import ClusterOptions, train_step
from microfed.training.worker import WorkerConfig

__all__ = ["train_component_step"]


def train_component_step(
    *, shards: tuple[str, str], out: tuple[str, str], params: Mapping[str, Any], run_id: str, task_name: str
) -> JobRecord:
    """The train component's body: `shards` and `out` are the artifacts' (local path, URI) pairs, `params` the
    component's parameters by name (RunConfig's fields, training/config.py, plus `worker_image`).

    With a cluster launcher the replicas run in other pods, which cannot see this pod's files, so they
    get the URIs, which must be gs:// (checked before any job exists); locally the paths. `out`'s URI also
    locates the pipeline root, beside which the measured-usage cache lives by default.
    """
    values = dict(params)
    image = str(values.pop("worker_image", ""))
    config = RunConfig.from_flat(values)  # the Kubeflow UI passes values unchecked: RunConfig checks every one
    on_cluster = config.cluster.launcher != "local"
    if on_cluster:
        check_replica_uris({"shards": shards[1], "micro_models": out[1]})
        launcher = choose_launcher(config.cluster.launcher, log=log)
    workers = len(read_dataset_manifest(shards[0])["shards"])
    cfg = WorkerConfig.from_run_config(config, shards=shards[on_cluster], out=out[on_cluster])
    cluster = None
    if on_cluster:
        c = config.cluster
        cluster = ClusterOptions(
            launcher=launcher,
            image=image,
            namespace=c.job_namespace,
            accelerators=tuple(a.strip() for a in c.accelerators.split(",") if a.strip()),
            timeout_seconds=60.0 * c.timeout_minutes,
            run_id=run_id,
            task=task_name,
            service_account=c.service_account,
            pool_max_nodes=c.pool_max_nodes,
        )
    # the measured-usage cache: where the caller says ("off": none), else next to the pipeline root, so later
    # runs of the same model and input shape start their plan from this one's measurement. The root is read
    # from the micro_models URI: KFP 2.14's backend leaves `{{$.pipeline_root}}` unresolved (pipeline_root.py).
    usage_cache = config.cluster.usage_cache
    if usage_cache == "off":
        usage_cache = ""
    elif not usage_cache:
        usage_cache = usage_cache_uri(out[1], artifact="micro_models", task_name=task_name, run_id=run_id)
    return train_step(cfg, workers, cluster=cluster, usage_cache=usage_cache)
