"""The train step's cluster path end to end: resource plan → PyTorchJob manifest → replicas run by a local
stand-in for the Training Operator → micro-models on gs:// (the emulator) → aggregate."""

from __future__ import annotations

from pathlib import Path

import pytest

from microfed.training import storage
from microfed.training.errors import MicrofedError
from microfed.training.pytorchjob_launch import JobFailed
from microfed.training.shards import SplitConfig, write_shards
from microfed.training.steps import ClusterOptions, aggregate_step, train_step
from microfed.training.train import OptimConfig
from microfed.training.worker import WorkerConfig
from tests.conftest import synthetic_dataset
from tests.gcs_emulator import GcsEmulator, gcs  # noqa: F401
from tests.local_operator import LocalOperator


def shards_on_gcs(gcs: GcsEmulator, tmp_path: Path, workers: int) -> str:  # noqa: F811
    local = tmp_path / "shards"
    write_shards(synthetic_dataset(n_train=90, n_test=30), local, SplitConfig(num_shards=workers))
    storage.upload_tree(local, gcs.uri("run/shards"))
    return gcs.uri("run/shards")


def options(operator: LocalOperator, attempt: int = 0) -> ClusterOptions:
    return ClusterOptions(
        image="microfed:test",
        namespace="team-a",
        accelerators=("none", "nvidia-tesla-t4"),
        timeout_seconds=300,
        run_id="run-42",
        task="train",
        attempt=attempt,
        backend=operator,
        poll_seconds=0.2,
    )


def test_train_step_runs_the_built_pytorchjob_and_cleans_up(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    shards = shards_on_gcs(gcs, tmp_path, workers=3)
    micro = gcs.uri("run/micro")
    operator = LocalOperator(tmp_path)
    cfg = WorkerConfig(
        shards=shards, out=micro, model="cnn-small", rounds=2, local_epochs=2, optim=OptimConfig(batch_size=16, lr=0.01)
    )
    record = train_step(cfg, 3, cluster=options(operator))
    # the plan put this small model on CPU even though a T4 was allowed, and it was saved with the run
    assert record["plan"]["accelerator"] == "none" and record["plan"]["gpus"] == 0
    assert [w["n_k"] for w in record["workers"]] == [30, 30, 30]
    # the replicas run as the account Workload Identity maps to the bucket, in the namespace asked for
    (job,) = operator.created
    assert job.metadata.namespace == "team-a"
    assert job.spec.pytorch_replica_specs["Worker"].template.spec.service_account_name == "pipeline-runner"
    # one job, deleted after it succeeded; its replicas' logs kept beside the micro-models
    assert len(operator.deleted) == 1 and operator.jobs == {}
    files = set(storage.list_files(micro))
    assert {f"micro-model-0000{r}.safetensors" for r in range(3)} <= files
    assert {f"logs/{operator.deleted[0]}-master-0.log", f"logs/{operator.deleted[0]}-worker-1.log"} <= files
    assert aggregate_step(micro, gcs.uri("run/model"))["num_examples"] == 90


def test_a_failing_replica_fails_the_step_with_its_log_and_keeps_the_logs(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    shards = shards_on_gcs(gcs, tmp_path, workers=2)
    shard1 = storage.join(shards, "shard-00001.safetensors")
    data = bytearray(storage.read_bytes(shard1))
    data[-1] ^= 0xFF
    storage.write_bytes(shard1, bytes(data))
    micro = gcs.uri("run/micro")
    operator = LocalOperator(tmp_path)
    cfg = WorkerConfig(shards=shards, out=micro, model="cnn-small", rounds=2, local_epochs=1)
    with pytest.raises(JobFailed) as info:
        train_step(cfg, 2, cluster=options(operator, attempt=1))
    # the replica that failed first is named, with its own error in the log tail
    assert "worker-0" in str(info.value) and "checksum" in str(info.value)
    assert operator.jobs == {}  # deleted in the finally
    assert any(name.startswith("logs/") and "worker-0" in name for name in storage.list_files(micro))


def test_a_model_factory_that_cannot_be_imported_fails_before_any_job(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    operator = LocalOperator(tmp_path)
    cfg = WorkerConfig(
        shards=shards_on_gcs(gcs, tmp_path, workers=2), out=gcs.uri("run/micro"), model="missing_module:factory"
    )
    with pytest.raises(MicrofedError, match="missing_module"):
        train_step(cfg, 2, cluster=options(operator))
    assert operator.deleted == [] and operator.jobs == {}
