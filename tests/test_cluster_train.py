"""The train step's cluster path end to end: resource plan → PyTorchJob manifest → replicas run by a local
model of the Training Operator v1.9 (tests/local_operator.py) → micro-models on gs:// (the emulator) → aggregate."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from microfed.training import storage
from microfed.training.errors import MicrofedError
from microfed.training.layout import micro_model_file
from microfed.training.pytorchjob import JobConfig, build_pytorchjob, job_name
from microfed.training.pytorchjob_launch import JobFailed, JobTerminated
from microfed.training.shards import SplitConfig, parse_ratios, write_shards
from microfed.training.step_aggregate import aggregate_step
from microfed.training.step_train import ClusterOptions, train_step
from microfed.training.train import OptimConfig
from microfed.training.worker import WorkerConfig, config_to_argv
from tests.conftest import synthetic_dataset
from tests.gcs_emulator import GcsEmulator, gcs  # noqa: F401
from tests.local_operator import LocalOperator, OomKill

pytestmark = pytest.mark.integration

# A model whose every training step takes at least PACE seconds however fast or busy the machine is, so that the
# time of a round grows with the shard as it does on a cluster (a `path.py:function` factory, as a user would give).
PACED_MODEL = """
import time
import torch.nn as nn

PACE = {pace!r}


class Paced(nn.Module):
    def __init__(self, num_classes, in_channels, image_size):
        super().__init__()
        self.linear = nn.Linear(in_channels * image_size[0] * image_size[1], num_classes)

    def forward(self, x):
        if self.training:
            time.sleep(PACE)
        return self.linear(x.reshape(x.shape[0], -1))


def make(num_classes, in_channels, image_size):
    return Paced(num_classes, in_channels, image_size)
"""


def paced_model(tmp_path: Path, pace: float = 0.02) -> str:
    path = tmp_path / "paced_model.py"
    path.write_text(PACED_MODEL.format(pace=pace))
    return f"{path}:make"


def shards_on_gcs(
    gcs: GcsEmulator,  # noqa: F811
    tmp_path: Path,
    workers: int,
    n_train: int = 90,
    ratios: str = "",
) -> str:
    local = tmp_path / "shards"
    split = SplitConfig(val_fraction=0.0, workers=workers, ratios=parse_ratios(ratios))
    write_shards(synthetic_dataset(n_train=n_train, n_test=30), local, split)
    storage.upload_tree(local, gcs.uri("run/shards"))
    return gcs.uri("run/shards")


def options(operator: LocalOperator) -> ClusterOptions:
    return ClusterOptions(
        image="microfed:test",
        namespace="team-a",
        accelerators=("none", "nvidia-tesla-t4"),
        timeout_seconds=300,
        run_id="run-42",
        task="train",
        backend=operator,
        poll_seconds=0.2,
    )


def test_train_step_runs_the_built_pytorchjob_and_cleans_up(
    gcs: GcsEmulator,  # noqa: F811
    tmp_path: Path,
    operator: LocalOperator,
) -> None:
    shards = shards_on_gcs(gcs, tmp_path, workers=3)
    micro = gcs.uri("run/micro")
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
    # the collectives' timeout comes from the plan (never under torch's 30 min), and the operator's deadline lies
    # beyond the step's own timeout, so the step (which keeps the logs) gives up first
    command = job.spec.pytorch_replica_specs["Master"].template.spec.containers[0].command
    assert float(command[command.index("--collective-timeout-minutes") + 1]) >= 30
    assert job.spec.run_policy.active_deadline_seconds > options(operator).timeout_seconds
    # one job, deleted after it succeeded; its replicas' logs kept beside the micro-models
    assert len(operator.deleted) == 1 and operator.jobs == {}
    files = set(storage.list_files(micro))
    assert {f"micro-model-0000{r}.safetensors" for r in range(3)} <= files
    assert {f"logs/{operator.deleted[0]}-master-0.log", f"logs/{operator.deleted[0]}-worker-1.log"} <= files
    assert aggregate_step(micro, gcs.uri("run/model"))["num_examples"] == 90


def test_train_step_runs_the_workers_as_a_trainjob_with_launcher_trainjob(
    gcs: GcsEmulator,  # noqa: F811
    tmp_path: Path,
) -> None:
    # the same step, the same worker, Kubeflow Trainer v2's job kind (tests/trainer_standin.py): the worker reads
    # the torch plugin's PET_* variables, and the step keeps the records, the logs and the guarantees
    from tests.trainer_standin import LocalTrainer

    shards = shards_on_gcs(gcs, tmp_path, workers=2, n_train=60)
    micro = gcs.uri("run/micro-v2")
    cfg = WorkerConfig(
        shards=shards, out=micro, model="cnn-small", rounds=1, local_epochs=1, optim=OptimConfig(batch_size=16, lr=0.01)
    )
    with LocalTrainer(tmp_path / "pods") as trainer:
        cluster = dataclasses.replace(options(trainer), launcher="trainjob")
        record = train_step(cfg, 2, cluster=cluster)
        (manifest,) = trainer.created
        assert manifest["kind"] == "TrainJob" and manifest["spec"]["trainer"]["numNodes"] == 2
        assert manifest["metadata"]["namespace"] == "team-a"
        assert trainer.deleted == [manifest["metadata"]["name"]]
    assert [w["n_k"] for w in record["workers"]] == [30, 30]
    files = set(storage.list_files(micro))
    assert {micro_model_file(r) for r in range(2)} <= files
    assert any(f.startswith("logs/") for f in files)
    assert aggregate_step(micro, gcs.uri("run/model-v2"))["num_examples"] == 60


def test_a_failing_replica_fails_the_step_with_its_log_and_keeps_the_logs(
    gcs: GcsEmulator,  # noqa: F811
    tmp_path: Path,
    operator: LocalOperator,
) -> None:
    shards = shards_on_gcs(gcs, tmp_path, workers=2)
    shard1 = storage.join(shards, "shard-00001.safetensors")
    data = bytearray(storage.read_bytes(shard1))
    data[-1] ^= 0xFF
    storage.write_bytes(shard1, bytes(data))
    micro = gcs.uri("run/micro")
    cfg = WorkerConfig(shards=shards, out=micro, model="cnn-small", rounds=2, local_epochs=1)
    with pytest.raises(JobFailed) as info:
        train_step(cfg, 2, cluster=options(operator))
    # the replica that failed first is named, with its own error in the log tail
    assert "worker-0" in str(info.value) and "checksum" in str(info.value)
    assert operator.jobs == {}  # deleted in the finally
    assert any(name.startswith("logs/") and "worker-0" in name for name in storage.list_files(micro))


def test_a_model_factory_that_cannot_be_imported_fails_before_any_job(
    gcs: GcsEmulator,  # noqa: F811
    tmp_path: Path,
    operator: LocalOperator,
) -> None:
    cfg = WorkerConfig(
        rounds=1,
        local_epochs=1,
        shards=shards_on_gcs(gcs, tmp_path, workers=2),
        out=gcs.uri("run/micro"),
        model="missing_module:factory",
    )
    with pytest.raises(MicrofedError, match="missing_module"):
        train_step(cfg, 2, cluster=options(operator))
    assert operator.deleted == [] and operator.jobs == {}


def test_unequal_shards_with_the_smallest_on_rank_0_leave_every_record(
    gcs: GcsEmulator,  # noqa: F811
    tmp_path: Path,
    operator: LocalOperator,
) -> None:
    """Defect 1 of issue 12. The operator marks the job Succeeded as soon as the Master (rank 0) exits, and the
    last round has no average to hold the ranks together: with rank 0's shard the smallest it would finish, upload
    and exit while ranks 1 and 2 still train, and the job would be deleted under them. The workers' final barrier
    keeps rank 0 until every rank's outputs are uploaded."""
    shards = shards_on_gcs(gcs, tmp_path, workers=3, n_train=900, ratios="1,4,4")
    micro = gcs.uri("run/micro")
    # the last round: 3 epochs of 7 batches on rank 0, of 25 batches on ranks 1 and 2 (at least 1 s longer)
    cfg = WorkerConfig(
        shards=shards,
        out=micro,
        model=paced_model(tmp_path),
        rounds=2,
        local_epochs=3,
        optim=OptimConfig(batch_size=16),
    )
    record = train_step(cfg, 3, cluster=options(operator))
    assert [w["n_k"] for w in record["workers"]] == [100, 400, 400]
    files = set(storage.list_files(micro))
    assert {f"worker-0000{r}.json" for r in range(3)} <= files
    assert {f"micro-model-0000{r}.safetensors" for r in range(3)} <= files
    # the operator ended the job when the Master succeeded, as it always does
    (name,) = operator.deleted
    assert ("PyTorchJobSucceeded", f"PyTorchJob {name} is successfully completed.") in operator.events(name)
    assert aggregate_step(micro, gcs.uri("run/model"))["num_examples"] == 900


def test_every_rank_outputs_are_durable_when_the_operator_declares_success(
    gcs: GcsEmulator,  # noqa: F811
    tmp_path: Path,
    operator: LocalOperator,
) -> None:
    """The worker's half of defect 1, without the launcher: at the moment the job is Succeeded (the Master,
    rank 0, has exited), every rank's record and micro-model is already in the bucket."""
    shards = shards_on_gcs(gcs, tmp_path, workers=3, n_train=900, ratios="1,4,4")
    micro = gcs.uri("run/micro")
    cfg = WorkerConfig(
        shards=shards,
        out=micro,
        model=paced_model(tmp_path),
        rounds=2,
        local_epochs=3,
        optim=OptimConfig(batch_size=16),
    )
    job = build_pytorchjob(
        JobConfig(
            name="train-durable", namespace="team-a", image="microfed:test", workers=3, worker_args=config_to_argv(cfg)
        )
    )
    assert operator.create(job)
    operator.wait_until(lambda: operator.state("train-durable") in ("Succeeded", "Failed"), timeout=240, what="the end")
    assert operator.state("train-durable") == "Succeeded"
    files = set(storage.list_files(micro))
    missing = [r for r in range(3) if f"worker-{r:05d}.json" not in files or micro_model_file(r) not in files]
    assert missing == [], f"ranks {missing} had not written their outputs when the job succeeded"
    operator.delete("train-durable")


def test_an_oom_killed_replica_is_recreated_and_the_group_resumes_from_its_checkpoint(
    gcs: GcsEmulator,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Exit 137 of rank 1 early in round 2: the operator recreates its pod at once (same name and rank
    environment), while ranks 0 and 2 go on training until round 2's average, where they lose their peer, exit 200
    and are recreated in turn. The new rank 1 starts meanwhile and finds the previous group's rendezvous still
    up; it must not join it. The new group resumes after round 1's checkpoint."""
    shards = shards_on_gcs(gcs, tmp_path, workers=3, n_train=300)
    micro = gcs.uri("run/micro")
    # rounds of 2 epochs x 7 batches x 0.25 s: round 2 outlasts the new rank 1's start
    cfg = WorkerConfig(
        shards=shards,
        out=micro,
        model=paced_model(tmp_path, pace=0.25),
        rounds=3,
        local_epochs=2,
        optim=OptimConfig(batch_size=16),
    )
    oom = OomKill(rank=1, when_log_contains="round 1/3: checkpoint", watch_rank=0)
    with LocalOperator(tmp_path / "pods", oom_kills=[oom]) as operator:
        record = train_step(cfg, 3, cluster=options(operator))
        (name,) = operator.deleted
        incarnations = {pod.removeprefix(f"{name}-"): len(uids) for pod, uids in operator.pod_uids.items()}
    assert incarnations == {"master-0": 2, "worker-0": 2, "worker-1": 2}
    assert [w["resumed_from_round"] for w in record["workers"]] == [1, 1, 1]


# --- the launcher against the faithful operator: each of issue 12's failure modes, end to end -----------------


def test_an_oom_kill_past_the_restart_limit_fails_the_step_instead_of_restarting_forever(
    gcs: GcsEmulator,  # noqa: F811
    tmp_path: Path,
) -> None:
    shards = shards_on_gcs(gcs, tmp_path, workers=2)
    cfg = WorkerConfig(
        local_epochs=1, shards=shards, out=gcs.uri("run/micro"), model=paced_model(tmp_path, pace=0.5), rounds=2
    )
    # the v1.9 operator would recreate the killed pod until activeDeadlineSeconds; the step stops after 1 restart
    oom = OomKill(rank=1, after_seconds=0.5, times=10)
    with LocalOperator(tmp_path / "pods", oom_kills=[oom]) as op:
        with pytest.raises(JobFailed, match=r"worker-0 was restarted [2-9] times \(limit 1") as info:
            train_step(cfg, 2, cluster=dataclasses.replace(options(op), max_restarts=1))
        assert op.jobs == {} and len(op.deleted) == 1
    assert "exit code 137" in str(info.value) and "Cloud Logging" in str(info.value)


def test_an_image_no_node_can_pull_fails_the_step_within_the_grace(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    cfg = WorkerConfig(
        rounds=1, local_epochs=1, shards=shards_on_gcs(gcs, tmp_path, workers=2), out=gcs.uri("run/micro")
    )
    with LocalOperator(tmp_path / "pods", unpullable_images=["microfed:test"]) as op:
        started = time.monotonic()
        with pytest.raises(JobFailed, match=r"cannot start: (ErrImagePull|ImagePullBackOff)") as info:
            train_step(cfg, 2, cluster=dataclasses.replace(options(op), start_grace_seconds=2.0))
        assert time.monotonic() - started < 60 and op.jobs == {}
    assert "worker_image" in str(info.value)


def test_pods_rejected_for_a_missing_service_account_fail_the_step_with_the_api_servers_reason(
    gcs: GcsEmulator,  # noqa: F811
    tmp_path: Path,
) -> None:
    cfg = WorkerConfig(
        rounds=1, local_epochs=1, shards=shards_on_gcs(gcs, tmp_path, workers=2), out=gcs.uri("run/micro")
    )
    with LocalOperator(tmp_path / "pods", service_accounts=["default"]) as op:
        with pytest.raises(JobFailed, match=r"cannot create its pods: Error creating: .*pipeline-runner") as info:
            train_step(cfg, 2, cluster=dataclasses.replace(options(op), start_grace_seconds=1.0))
        assert op.jobs == {}
    assert "service_account parameter" in str(info.value)


def test_a_kfp_retry_replaces_the_failed_job_of_the_earlier_attempt(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    cfg = WorkerConfig(
        rounds=1,
        local_epochs=1,
        shards=shards_on_gcs(gcs, tmp_path, workers=2),
        out=gcs.uri("run/micro"),
        model="cnn-small",
    )
    with LocalOperator(tmp_path / "pods") as op:
        # the earlier attempt's job: same name (run id + task), failed (its workers exited 2 on a bad flag)
        name = job_name("run-42", "train")
        op.create(
            build_pytorchjob(
                JobConfig(name=name, namespace="team-a", image="microfed:test", workers=2, worker_args=["--bogus"])
            )
        )
        op.wait_until(lambda: op.state(name) == "Failed", timeout=60, what="the earlier attempt to fail")
        record = train_step(cfg, 2, cluster=options(op))
        assert op.jobs == {} and op.deleted == [name, name]
    assert [w["n_k"] for w in record["workers"]] == [45, 45]


def test_sigterm_during_the_job_deletes_it_and_leaves_no_process(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    # KFP's Terminate, an eviction or a node drain: Argo sends SIGTERM to the step's container
    cfg = WorkerConfig(
        local_epochs=1,
        shards=shards_on_gcs(gcs, tmp_path, workers=2),
        out=gcs.uri("run/micro"),
        model=paced_model(tmp_path, pace=0.5),
        rounds=3,
    )
    with LocalOperator(tmp_path / "pods") as op:
        timer = threading.Timer(4.0, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        try:
            with pytest.raises(JobTerminated, match="terminated"):
                train_step(cfg, 2, cluster=options(op))
        finally:
            timer.cancel()
        assert op.jobs == {} and len(op.deleted) == 1
        assert op._pods == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
