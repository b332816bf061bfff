"""The worker under the PyTorchJob contract: torchrun by hand, the local launcher, and in-job averaging."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from microfed.training import worker
from microfed.training.aggregation import weighted_average
from microfed.training.errors import MicrofedError
from microfed.training.io import read_json, read_safetensors
from microfed.training.launch import EXIT_PEER_LOST, WorkerFailed, free_port, launch_local
from microfed.training.layout import micro_model_file
from microfed.training.shards import SplitConfig, write_shards
from microfed.training.step_aggregate import aggregate_step
from microfed.training.step_evaluate import evaluate_step
from microfed.training.step_train import train_step
from microfed.training.train import OptimConfig
from microfed.training.worker import (
    DEFAULT_COLLECTIVE_TIMEOUT_MINUTES,
    DistEnv,
    WorkerConfig,
    collective_timeout,
    config_to_argv,
    parse_config,
    stall_timeout,
)
from tests.conftest import synthetic_dataset

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    # 150 examples: 30 held out for validation, 120 into shards of 40 and 80
    data = synthetic_dataset(n_train=150, n_test=60)
    write_shards(data, out, SplitConfig(workers=2, ratios=(1, 2), val_fraction=0.2))
    return out


def worker_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--model",
        "cnn-small",
        "--rounds",
        "2",
        "--local-epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "0.01",
        "--threads",
        "1",
        *extra,
    ]


@pytest.mark.integration
def test_worker_by_hand_with_torchrun_two_gloo_processes(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "micro"
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "microfed.training.worker",
        *worker_args(shards, out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [read_json(out / f"worker-{r:05d}.json") for r in range(2)]
    # shard RANK is what each worker trained on: ratios 1:2 of 120 examples
    assert [r["n_k"] for r in records] == [40, 80]
    for rank, rec in enumerate(records):
        _, meta = read_safetensors(out / micro_model_file(rank))
        assert meta["n_k"] == str(rec["n_k"]) and meta["rank"] == str(rank)
        assert len(rec["rounds"]) == 2
    # the ranks evaluated the in-job average of round 1 on the validation split (never the test set); the last
    # round is left to the aggregate step, and rank 0 left it the validation history
    assert 0.0 <= records[0]["rounds"][0]["val_accuracy"] <= 1.0
    assert records[1]["rounds"][0]["val_accuracy"] == records[0]["rounds"][0]["val_accuracy"]
    assert not any("test_accuracy" in r for rec in records for r in rec["rounds"])
    assert "val_accuracy" not in records[0]["rounds"][1]
    rounds = read_json(out / "rounds.json")
    assert rounds["val"] == [{k: records[0]["rounds"][0][k] for k in ("round", "val_accuracy", "val_loss")}]
    assert rounds["best_round"] == 1 and (out / "best-round.safetensors").exists()
    assert (out / "model_config.json").exists()
    # only rank 0 logs
    assert "[microfed worker] round 1/2" in proc.stdout


@pytest.mark.integration
def test_launcher_runs_the_same_worker_and_the_pipeline_steps_finish_it(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "micro"
    cfg = WorkerConfig(
        shards=shards,
        out=out,
        model="cnn-small",
        rounds=2,
        local_epochs=2,
        threads=1,
        optim=OptimConfig(batch_size=16, lr=0.01),
    )
    job = train_step(cfg, workers=2)
    assert [w["n_k"] for w in job["workers"]] == [40, 80]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["worker-00000.log", "worker-00001.log"]
    agg = aggregate_step(out, tmp_path / "model")
    assert agg["weights"] == pytest.approx([1 / 3, 2 / 3])
    states = [read_safetensors(out / micro_model_file(r))[0] for r in range(2)]
    global_state, meta = read_safetensors(tmp_path / "model" / "model.safetensors")
    expected = weighted_average(states, [40, 80])
    assert meta["n"] == "120"
    for key, value in expected.items():
        assert torch.equal(global_state[key], value), key
    # with the shards, the aggregate step also validates round 2 and keeps the better of rounds 1 and 2
    selected = aggregate_step(out, tmp_path / "selected", shards)
    assert [h["round"] for h in selected["val_history"]] == [1, 2]
    metrics = evaluate_step(tmp_path / "selected", shards, out, tmp_path / "eval")
    # the bands are easy: two rounds of two epochs learn them
    assert metrics["accuracy"] > 0.9
    assert metrics["round_split"] == "validation" and metrics["round_numbers"] == [1, 2]
    assert metrics["round_accuracy"] == [h["val_accuracy"] for h in selected["val_history"]]
    assert metrics["selected_round"] == selected["selected_round"]
    assert metrics["shard_sizes"] == [40, 80]


@pytest.mark.integration
def test_a_failing_worker_fails_the_launch_with_its_log_and_stops_the_others(shards: Path, tmp_path: Path) -> None:
    shard1 = shards / "shard-00001.safetensors"
    data = bytearray(shard1.read_bytes())
    data[-1] ^= 0xFF
    shard1.write_bytes(bytes(data))
    start = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        launch_local(2, worker_args(shards, tmp_path / "micro"), log_dir=tmp_path / "logs", echo_rank0=False)
    assert info.value.rank == 1
    assert "checksum" in info.value.log_tail
    assert "worker-00001.log" in str(info.value)
    # rank 0 waits for rank 1 in a collective; the launcher must not wait for the 30-minute timeout
    assert time.monotonic() - start < 60


@pytest.mark.integration
def test_in_job_average_across_two_processes_equals_weighted_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = tmp_path / "probe_allreduce.py"
    probe.write_text(
        textwrap.dedent("""
        import os, sys, torch, torch.distributed as dist
        from microfed.training.aggregation import allreduce_average
        from microfed.training.io import write_safetensors
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                                rank=rank, world_size=world)
        state = {"w": torch.full((3,), float(rank + 1)), "half": torch.full((2,), rank + 1.0, dtype=torch.float16),
                 "num_batches_tracked": torch.tensor(10 * (rank + 1))}
        out = allreduce_average(state, weight=float(rank + 1))
        write_safetensors(sys.argv[1] + f"/avg-{rank}.safetensors", out)
        dist.destroy_process_group()
    """)
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    launch_local(2, [str(tmp_path)], log_dir=tmp_path / "logs", module="probe_allreduce", echo_rank0=False)
    # weights 1 and 2: (1*1 + 2*2) / 3 = 5/3; the int buffer keeps its dtype and takes the max
    for rank in range(2):
        avg, _ = read_safetensors(tmp_path / f"avg-{rank}.safetensors")
        assert torch.allclose(avg["w"], torch.full((3,), 5 / 3))
        assert avg["half"].dtype == torch.float16
        assert avg["num_batches_tracked"].dtype == torch.int64 and int(avg["num_batches_tracked"]) == 20


def test_dist_env_reads_the_training_operator_variables() -> None:
    env = DistEnv.from_environ({"WORLD_SIZE": "4", "RANK": "3", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"})
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (3, 4, "job-master-0", 23456)
    with pytest.raises(ValueError, match="RANK=4"):
        DistEnv.from_environ({"WORLD_SIZE": "4", "RANK": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        DistEnv.from_environ({"WORLD_SIZE": "two"})


@pytest.mark.integration
def test_stopping_the_launcher_stops_its_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sleeper.py").write_text(
        "import os, sys, time\n"
        "open(os.path.join(sys.argv[1], f\"pid-{os.environ['RANK']}\"), 'w').write(str(os.getpid()))\n"
        "time.sleep(600)\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    code = (
        "import sys; from microfed.training.launch import launch_local; "
        "launch_local(2, [sys.argv[1]], log_dir=sys.argv[1] + '/logs', module='sleeper', echo_rank0=False)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("pid-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid-*")]
    assert len(pids) == 2
    parent.terminate()
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM  # the launcher's exit, after stopping its workers
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_collective_timeout_is_a_flag_that_round_trips() -> None:
    cfg = WorkerConfig(shards="s", out="o", collective_timeout_minutes=7.5, stall_minutes=2.5)
    assert parse_config(config_to_argv(cfg)) == cfg
    assert collective_timeout(cfg) == datetime.timedelta(minutes=7.5)
    assert stall_timeout(cfg) == datetime.timedelta(minutes=2.5)
    default = parse_config(["--shards", "s", "--out", "o"])
    assert default.collective_timeout_minutes == 0
    assert DEFAULT_COLLECTIVE_TIMEOUT_MINUTES == 30  # torch's own default for gloo
    assert collective_timeout(default) == datetime.timedelta(minutes=30)
    with pytest.raises(MicrofedError, match="collective-timeout-minutes"):
        WorkerConfig(shards="s", out="o", collective_timeout_minutes=-1)


def fake_group(monkeypatch: pytest.MonkeyPatch, calls: list[Any], barrier_error: Exception | None = None) -> None:
    """Replace the process group and the training by recorders (world size 2, rank 0)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    def init_process_group(backend: str, **kwargs: Any) -> None:
        calls.append(("init", kwargs["timeout"]))

    def barrier() -> None:
        calls.append(("barrier",))
        if barrier_error is not None:
            raise barrier_error

    monkeypatch.setattr(worker.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(worker.dist, "barrier", barrier)
    monkeypatch.setattr(worker.dist, "is_initialized", lambda: False)

    def run_worker(cfg: WorkerConfig, env: DistEnv) -> dict[str, Any]:
        calls.append(("run_worker",))
        return {}

    monkeypatch.setattr(worker, "run_worker", run_worker)


@pytest.mark.parametrize(("flag", "minutes"), [([], 30.0), (["--collective-timeout-minutes", "90"], 90.0)])
def test_the_collective_timeout_reaches_the_process_group(
    monkeypatch: pytest.MonkeyPatch, flag: list[str], minutes: float
) -> None:
    calls: list[Any] = []
    fake_group(monkeypatch, calls)
    assert worker.main(["--shards", "s", "--out", "o", *flag]) == 0
    assert calls[0] == ("init", datetime.timedelta(minutes=minutes))


def test_every_rank_waits_for_all_outputs_before_exiting(monkeypatch: pytest.MonkeyPatch) -> None:
    # run_worker returns once this rank's outputs are uploaded; the barrier then holds rank 0 (the Master, whose
    # exit ends the PyTorchJob) until every rank's are
    calls: list[Any] = []
    fake_group(monkeypatch, calls)
    assert worker.main(["--shards", "s", "--out", "o"]) == 0
    assert [c[0] for c in calls] == ["init", "run_worker", "barrier"]
    # a peer lost in that barrier is PeerLost: the restartable exit code
    calls.clear()
    fake_group(monkeypatch, calls, barrier_error=RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    assert worker.main(["--shards", "s", "--out", "o"]) == EXIT_PEER_LOST


@pytest.mark.integration
def test_a_peer_that_never_joins_times_out_as_peer_lost(tmp_path: Path) -> None:
    # rank 0 of 2, alone: the rendezvous waits for the flag's 3 s (not 30 min) and exits restartable (200)
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "microfed.training.worker", "--shards", str(tmp_path), "--out", str(tmp_path)]
    start = time.monotonic()
    proc = subprocess.run(
        [*cmd, "--collective-timeout-minutes", "0.05"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == EXIT_PEER_LOST, proc.stderr
    assert "joining the group" in proc.stderr and "within 0.05 min" in proc.stderr
    assert time.monotonic() - start < 60


@pytest.mark.integration
def test_a_recreated_rank_does_not_join_the_previous_groups_rendezvous(tmp_path: Path) -> None:
    # the previous group's rank 0 still serves its store (it notices a lost peer only at its next collective);
    # a recreated rank 1 must wait for it to go, not read that group's addresses
    port = free_port()
    old = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    old.add("microfed/members", 2)  # both ranks of the previous group joined it
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    cmd = [sys.executable, "-m", "microfed.training.worker", "--shards", str(tmp_path), "--out", str(tmp_path)]
    proc = subprocess.run(
        [*cmd, "--collective-timeout-minutes", "0.05"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == EXIT_PEER_LOST, proc.stderr
    assert "is still the previous one; waiting for it to end" in proc.stderr
    assert re.search(r"was still the previous one \(\d+ members for WORLD_SIZE=2\) after 0.05 min", proc.stderr)
    del old


def test_dist_env_reads_the_trainer_v2_torch_plugin_variables() -> None:
    # kubeflow/trainer v2.3.0, pkg/runtime/framework/plugins/torch/torch.go :: EnforceMLPolicy injects PET_* only
    env = DistEnv.from_environ(
        {"PET_NODE_RANK": "1", "PET_NNODES": "3", "PET_MASTER_ADDR": "j-node-0-0.j", "PET_MASTER_PORT": "29500"}
    )
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (1, 3, "j-node-0-0.j", 29500)
    with pytest.raises(ValueError, match="PET_MASTER_ADDR is not set"):
        DistEnv.from_environ({"PET_NODE_RANK": "0", "PET_NNODES": "2", "PET_MASTER_PORT": "29500"})
    alone = DistEnv.from_environ({})
    assert (alone.rank, alone.world_size, alone.master_addr) == (0, 1, "127.0.0.1")
