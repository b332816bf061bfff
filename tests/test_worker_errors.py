"""A worker's failures as one clear line (issue 14, items 7, 12 and 9 on the component side): a model factory that
raises or returns an unusable model fails before the first epoch with its own line, also at the CLI; a stalled
worker is named with its round, as a warning while the others wait and as the error at the collective timeout;
the worker and train configurations refuse non-finite and out-of-range numbers themselves."""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from microfed.pipelines.cli import main as cli_main
from microfed.training import worker, worker_progress
from microfed.training.errors import MicrofedError
from microfed.training.launch import (
    PROGRESS_DIR_ENV,
    WorkerStalled,
    _GroupFailed,
    _Proc,
    _StallWatch,
    launch_local,
    progress_file,
)
from microfed.training.shards import SplitConfig, write_shards
from microfed.training.strategies import Strategy
from microfed.training.train import OptimConfig
from microfed.training.worker import WorkerConfig, stall_timeout
from tests.conftest import synthetic_dataset, write_zip

# Factories as a user writes them (tests/test_model_factory.py), each wrong in one way the issue met.
FACTORIES = textwrap.dedent(
    """
    import os
    import time

    import torch
    from torch import nn


    def boom(num_classes, in_channels, image_size):
        raise ValueError("boom")


    def too_many_outputs(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size[0] * image_size[1], num_classes + 2))


    class Empty(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 3)


    def no_parameters(num_classes, in_channels, image_size):
        return Empty()


    def four_d(num_classes, in_channels, image_size):
        return nn.Conv2d(in_channels, num_classes, kernel_size=1)


    def for_other_images(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, num_classes))


    class Stalling(nn.Module):
        '''Its third training forward pass on rank STALL_RANK never returns (within the test).'''

        def __init__(self, num_classes, in_channels, image_size):
            super().__init__()
            self.linear = nn.Linear(in_channels * image_size[0] * image_size[1], num_classes)
            self.calls = 0

        def forward(self, x):
            if self.training:
                self.calls += 1
                if os.environ["RANK"] == os.environ.get("STALL_RANK") and self.calls == 3:
                    time.sleep(600)
            return self.linear(x.reshape(x.shape[0], -1))


    def stalling(num_classes, in_channels, image_size):
        return Stalling(num_classes, in_channels, image_size)
    """
)

# (factory, what its one line says after "model factory '<file>:<factory>' ")
UNUSABLE = [
    ("boom", "raised ValueError: boom"),
    (
        "too_many_outputs",
        "returns the wrong output for a batch of shape 2x1x16x16: expected float logits of shape "
        "(batch, num_classes) = (2, 3), found (2, 5)",
    ),
    ("no_parameters", "returned Empty, a model with no trainable parameters: nothing to train or average"),
    (
        "four_d",
        "returns the wrong output for a batch of shape 2x1x16x16: expected float logits of shape "
        "(batch, num_classes) = (2, 3), found (2, 3, 16, 16)",
    ),
    (
        "for_other_images",
        "fails on a batch of shape 2x1x16x16 (batch, channels, height, width): RuntimeError: mat1 and mat2 shapes "
        "cannot be multiplied",
    ),
]


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return path


def shards(tmp_path: Path, workers: int) -> Path:
    out = tmp_path / f"shards-{workers}"
    # 120 examples: shards of 40 and 80 for two workers
    split = SplitConfig(val_fraction=0.0, workers=workers, ratios=(1, 2) if workers == 2 else None)
    write_shards(synthetic_dataset(n_train=120, n_test=30), out, split)
    return out


# ------------------------------------------------------------------- 7: a model that cannot be trained


@pytest.mark.parametrize(("factory", "what"), UNUSABLE)
def test_an_unusable_factory_stops_the_worker_before_the_first_epoch_with_one_line(
    factories: Path,
    tmp_path: Path,
    factory: str,
    what: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: one worker, in this process (the worker's own entrypoint, as a launcher starts it)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(PROGRESS_DIR_ENV, raising=False)
    out = tmp_path / "micro"
    argv = ["--shards", str(shards(tmp_path, 1)), "--out", str(out), "--model", f"{factories}:{factory}"]
    threads = torch.get_num_threads()

    # Execute
    try:
        code = worker.main([*argv, "--rounds", "2", "--batch-size", "16", "--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)

    # Assert: exit 2 (the user's error: not restarted), one line naming the factory, and no epoch ran
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[microfed worker] error: "), lines
    assert f"model factory '{factories}:{factory}' {what}" in lines[0]
    assert "epoch" not in captured.out and not (out / "worker-00000.json").exists()


@pytest.mark.e2e
def test_a_factory_that_raises_reaches_microfed_run_as_its_own_line(
    factories: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The case: the run ended with "worker 0 exited with code 1; the last lines of <log>:" and nothing
    # after it, since the CLI took the first line of the step's WorkerFailed and the worker's own error was a
    # traceback under torch's "[rank0]: " prefixes.
    zip_path = write_zip(tmp_path / "shapes.zip", per_class_train=8, per_class_test=2)
    flags = ["--dataset", str(zip_path), "--model", f"{factories}:boom", "--workers", "2", "--rounds", "1"]
    runs = ["run", "--runs-dir", str(tmp_path / "runs"), "--name", "r", "--local-epochs", "1", "--quiet"]

    assert cli_main([*runs, *flags]) == 2

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[1].startswith("microfed: hint: the full log is "), lines
    assert lines[0].startswith(f"microfed: error: model factory '{factories}:boom' raised ValueError: boom (")
    assert "the last lines of" not in lines[0]


# --------------------------------------------------------------------------------- 12: a stalled worker


@pytest.mark.integration
@pytest.mark.parametrize("sync_every_steps", [0, 4])
def test_a_stalled_worker_is_named_with_its_round_first_as_a_warning_then_as_the_error(
    factories: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sync_every_steps: int,
) -> None:
    # Prepare: rank 1's third training step never returns; rank 0 waits for it at the end of round 1 (K = 0) or at
    # the first average inside it (K = 4). A 9 s collective timeout and a 1.2 s stall time stand for the defaults'
    # 30 and 10 minutes.
    monkeypatch.setenv("STALL_RANK", "1")
    cfg = WorkerConfig(
        strategy=Strategy(sync_every_steps=sync_every_steps),
        local_epochs=1,
        shards=str(shards(tmp_path, 2)),
        out=str(tmp_path / "micro"),
        model=f"{factories}:stalling",
        rounds=2,
        threads=1,
        optim=OptimConfig(batch_size=16),
        collective_timeout_minutes=0.15,
        stall_minutes=0.02,
    )
    start = time.monotonic()

    # Execute
    with pytest.raises(WorkerStalled) as info:
        launch_local(2, worker.config_to_argv(cfg), log_dir=tmp_path / "logs", echo_rank0=False)

    # Assert: a warning while rank 0 waited, then the error, each one line naming rank 1 and its round
    out = capsys.readouterr().out
    assert re.search(
        r"^\[microfed\] warning: worker 1 has made no progress for \d+ s while training round 1/2, local epoch 1/1; "
        r"the run fails if it makes none for 9 s \(the collective timeout\); its log is .*worker-00001\.log$",
        out,
        re.MULTILINE,
    ), out
    assert "warning: worker 0" not in out.split("while training", 1)[-1]  # rank 0 only waited for it
    e = info.value
    assert e.rank == 1 and e.doing == "training round 1/2, local epoch 1/1" and e.idle_seconds >= 9
    assert re.fullmatch(
        r"worker 1 made no progress for \d+ s while training round 1/2, local epoch 1/1; "
        r"(its peers stopped waiting for it|the run stopped) at the collective timeout \(9 s\)",
        e.message,
    ), e.message
    assert "worker-00001.log" in e.hint and "collective_timeout_minutes" in e.hint
    assert time.monotonic() - start < 60  # not restarted: a restart would wait for the same step again


class FakePopen:
    """What _StallWatch uses of a subprocess.Popen: a process id, and poll() of a process that still runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> None:
        return None


def test_the_stall_watch_reads_the_workers_progress_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two records as the workers write them (this process's id stands for both workers')
    monkeypatch.setenv(PROGRESS_DIR_ENV, str(tmp_path))
    cfg = WorkerConfig(shards="s", out="o", collective_timeout_minutes=1, stall_minutes=0.5)
    records = [worker_progress.Progress.from_environ(cfg, rank) for rank in range(2)]
    procs = [_Proc(rank, FakePopen(os.getpid()), tmp_path / f"worker-{rank}.log") for rank in range(2)]  # type: ignore[arg-type]
    watch = _StallWatch(tmp_path, procs)

    def age(rank: int, seconds: float) -> None:
        path = tmp_path / progress_file(rank)
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "time": time.time() - seconds}))

    # Execute / Assert: rank 0 waits for its peer (never blamed), rank 1 trains
    with records[0].waiting_for("averaging round 3"):
        records[1].set("training round 3/5, local epoch 2/2")
        age(0, 100)
        age(1, 29)
        watch.check()
        assert capsys.readouterr().out == "" and watch.stalled() is None
        age(1, 31)  # past the stall time: one warning, however often the launcher looks
        watch.check()
        watch.check()
        warning = capsys.readouterr().out
        assert warning.count("\n") == 1
        assert warning.startswith("[microfed] warning: worker 1 has made no progress for 31 s while training round 3/5")
        records[1].written = 0.0  # the last write is older than the record's interval: a step rewrites it
        records[1].tick()
        watch.check()
        assert capsys.readouterr().out == "[microfed] worker 1 is making progress again (training round 3/5, " + (
            "local epoch 2/2)\n"
        )
        # rank 0's collective timed out (it exited): rank 1 is the one it waited for
        age(1, 45)
        stalled = watch.stalled()
        assert isinstance(stalled, WorkerStalled) and stalled.rank == 1
        assert "its peers stopped waiting for it at the collective timeout (60 s)" in stalled.message
        # alone (or all stalled), the collective timeout itself ends the run
        age(1, 61)
        with pytest.raises(_GroupFailed) as failed:
            watch.check()
        assert not failed.value.restartable and isinstance(failed.value.failure, WorkerStalled)
        assert "the run stopped at the collective timeout (60 s)" in failed.value.failure.message
    # a record another process wrote (a previous attempt of the group) does not count
    procs[1].popen = FakePopen(os.getpid() + 1)  # type: ignore[assignment]
    assert watch.stalled() is None


def test_the_stall_time_defaults_to_a_third_of_the_collective_timeout_and_fits_in_it() -> None:
    assert stall_timeout(WorkerConfig(shards="s", out="o")).total_seconds() == 10 * 60
    assert stall_timeout(WorkerConfig(shards="s", out="o", collective_timeout_minutes=90)).total_seconds() == 30 * 60
    assert stall_timeout(WorkerConfig(shards="s", out="o", stall_minutes=2)).total_seconds() == 2 * 60
    with pytest.raises(MicrofedError, match=r"stall_minutes must be a finite number at least 0 and at most 30"):
        WorkerConfig(shards="s", out="o", stall_minutes=31)
    cfg = WorkerConfig(shards="s", out="o", collective_timeout_minutes=45, stall_minutes=40)
    assert worker.parse_config(worker.config_to_argv(cfg)) == cfg


# ----------------------------------------------------------- 9: the configurations check their own numbers

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda: OptimConfig(weight_decay=NAN),
            "weight_decay must be a finite number at least 0 and at most 3.40282e+38, got nan",
        ),
        (lambda: OptimConfig(lr=INF), "lr must be a finite number greater than 0 and at most 3.40282e+38, got inf"),
        (lambda: OptimConfig(lr=-NAN), "lr must be a finite number greater than 0"),
        (lambda: OptimConfig(lr=10**400), "lr must be a finite number greater than 0"),
        (lambda: OptimConfig(momentum=NAN), "momentum must be a finite number at least 0 and less than 1, got nan"),
        (lambda: OptimConfig(optimizer="sgd", momentum=0), "momentum must be a finite number greater than 0"),
        (lambda: OptimConfig(warmup_fraction=NAN), "warmup_fraction must be a finite number at least 0"),
        (lambda: OptimConfig(batch_size=-1), "batch_size must be an integer from 0 to 9,007,199,254,740,991, got -1"),
        (lambda: OptimConfig(batch_size=True), "batch_size must be an integer from 0"),
        (lambda: OptimConfig(batch_size=0, global_batch_size=0), "batch_size and global_batch_size are both 0"),
        (lambda: WorkerConfig(shards="s", out="o", rounds=0), "rounds must be an integer from 1 to 99,999, got 0"),
        (lambda: WorkerConfig(shards="s", out="o", rounds=10**5), "rounds must be an integer from 1 to 99,999"),
        (lambda: WorkerConfig(shards="s", out="o", rounds=2.0), "rounds must be an integer from 1"),
        (lambda: WorkerConfig(shards="s", out="o", local_epochs=-3), "local_epochs must be an integer from 1"),
        (lambda: WorkerConfig(shards="s", out="o", patience=-1), "patience must be an integer from 0"),
        (lambda: WorkerConfig(shards="s", out="o", seed=-1), "seed must be an integer from 0 to 9,007,199,254,740,991"),
        (lambda: WorkerConfig(shards="s", out="o", seed=2**60), "seed must be an integer from 0"),
        (lambda: WorkerConfig(shards="s", out="o", threads=-1), "threads must be an integer from 0 to 4,096"),
        (
            lambda: WorkerConfig(shards="s", out="o", collective_timeout_minutes=NAN),
            "collective_timeout_minutes must be a finite number at least 0 and at most 525600, got nan",
        ),
        (lambda: WorkerConfig(shards="s", out="o", collective_timeout_minutes=1e9), "collective_timeout_minutes must"),
        (lambda: WorkerConfig(shards="s", out="o", stall_minutes=INF), "stall_minutes must be a finite number"),
    ],
)
def test_a_configuration_refuses_a_number_outside_its_range_in_one_line(make: Any, expected: str) -> None:
    with pytest.raises(MicrofedError) as caught:
        make()
    assert caught.value.message.startswith(expected), caught.value.message
    assert "\n" not in str(caught.value)


def test_the_worker_refuses_nan_from_its_command_line_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert worker.main(["--shards", "s", "--out", "o", "--weight-decay", "nan"]) == 2
    assert capsys.readouterr().err == (
        "[microfed worker] error: weight_decay must be a finite number at least 0 and at most 3.40282e+38, got nan "
        "(set the pipeline parameter weight_decay (--weight-decay))\n"
    )


def test_a_configuration_error_names_the_worker_flag_and_the_pipeline_parameter() -> None:
    with pytest.raises(MicrofedError) as caught:
        WorkerConfig(shards="s", out="o", rounds=0)
    assert caught.value.hint == (
        "round checkpoints are numbered with five digits; set the pipeline parameter rounds (--rounds)"
    )
