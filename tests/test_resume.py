"""Faults: round checkpoints, a killed worker's group restarted and resumed, a diverged worker stopped, and
steps that give the same outputs when they run again (which is what makes KFP's retries safe).

The faults are real: a worker process SIGKILLs itself in the middle of round 2 (through a wrapper module that
counts epochs; a marker file makes only the first attempt die), or one worker's weights are set to NaN so its
loss diverges. Everything runs on CPU with one thread per worker, so runs are bit-for-bit reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from microfed.pipelines.pipeline import compile_pipeline
from microfed.training import checkpoint, step_train, storage
from microfed.training.checkpoint import (
    build_checkpoint,
    capture_rank_state,
    latest_round,
    parse_checkpoint,
    read_checkpoint,
    restore_rank_state,
    write_checkpoint,
)
from microfed.training.errors import MicrofedError
from microfed.training.io import read_json, read_safetensors, write_json, write_safetensors
from microfed.training.launch import WorkerFailed, launch_local
from microfed.training.layout import MODEL_CONFIG_FILE, micro_model_file
from microfed.training.model_files import ModelCard
from microfed.training.models import ModelConfig, build_model
from microfed.training.shards import SplitConfig, write_shards
from microfed.training.step_aggregate import aggregate_step
from microfed.training.step_evaluate import evaluate_step
from microfed.training.step_split import SplitOptions, split_step
from microfed.training.step_train import train_step
from microfed.training.strategies import Strategy
from microfed.training.train import OptimConfig, Preprocess, make_optimizer, make_scheduler, train_epoch
from microfed.training.worker import WorkerConfig, config_to_argv
from tests.conftest import synthetic_dataset, write_zip
from tests.gcs_emulator import GcsEmulator, gcs  # noqa: F401

# A worker that misbehaves on cue: after epoch call FAULT_CALL of rank FAULT_RANK (counted per process), it
# kills itself (kill) or, before that epoch, sets its weights to NaN (nan). Only while MARKER does not exist.
FAULTY_WORKER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from microfed.training import worker, worker_rounds

    marker = Path(os.environ["FAULT_MARKER"])
    fault, rank, at = os.environ["FAULT"], os.environ["FAULT_RANK"], int(os.environ["FAULT_CALL"])
    real_train_epoch = worker_rounds.train_epoch
    calls = 0

    def train_epoch(model, *args, **kwargs):
        global calls
        calls += 1
        armed = os.environ["RANK"] == rank and calls == at and not marker.exists()
        if armed and fault == "nan":
            marker.write_text("nan")
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        stats = real_train_epoch(model, *args, **kwargs)
        if armed and fault == "kill":
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return stats

    worker_rounds.train_epoch = train_epoch  # where the round loop looks it up
    sys.exit(worker.main())
""")


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    write_shards(
        synthetic_dataset(n_train=120, n_test=60), out, SplitConfig(val_fraction=0.0, workers=2, ratios=(1, 2))
    )
    return out


@pytest.fixture
def faulty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Puts the faulty worker module on PYTHONPATH; returns the marker file's path."""
    (tmp_path / "faulty_worker.py").write_text(FAULTY_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAULT_MARKER", str(tmp_path / "fault-marker"))
    return tmp_path / "fault-marker"


def worker_config(shards: Path, out: Path) -> WorkerConfig:
    return WorkerConfig(
        shards=str(shards),
        out=str(out),
        model="cnn-small",
        rounds=3,
        local_epochs=2,
        threads=1,
        optim=OptimConfig(batch_size=16, lr=0.01),
    )


def states_of(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [read_safetensors(folder / micro_model_file(rank))[0] for rank in range(2)]


@pytest.mark.integration
def test_a_worker_killed_in_round_2_is_restarted_and_resumes_from_round_1_with_identical_results(
    shards: Path, tmp_path: Path, faulty: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the reference, an uninterrupted run with the same seed.
    reference = tmp_path / "reference"
    train_step(worker_config(shards, reference), workers=2)
    # Rank 1 dies by SIGKILL right after the first epoch of round 2 (its third epoch).
    monkeypatch.setenv("FAULT", "kill")
    monkeypatch.setenv("FAULT_RANK", "1")
    monkeypatch.setenv("FAULT_CALL", "3")
    monkeypatch.setattr(step_train, "launch_local", functools.partial(launch_local, module="faulty_worker"))
    resumed = tmp_path / "resumed"

    # Execute
    job = train_step(worker_config(shards, resumed), workers=2)

    # Assert: it died, the group was restarted once, and it went on after round 1's checkpoint.
    assert faulty.exists()
    log0 = (resumed / "logs" / "worker-00000.log").read_text()
    before, after = log0.split("[microfed launcher] restart 1: worker group started again")
    assert "round 2/3 epoch 1/2" in before and "round 3/3" not in before
    assert f"resuming after round 1/3 from {resumed / 'checkpoints' / 'round-00001.safetensors'}" in after
    assert "round 1/3 epoch" not in after  # round 1 was not trained again
    assert "round 2/3 epoch 1/2" in after and "round 3/3 epoch 2/2" in after
    assert "restart 2" not in log0
    assert [w["resumed_from_round"] for w in job["workers"]] == [1, 1]
    assert [[r["round"] for r in w["rounds"]] for w in job["workers"]] == [[1, 2, 3], [1, 2, 3]]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == [
        "round-00001.safetensors",
        "round-00002.safetensors",
    ]
    # On CPU the resumed run computes exactly what the uninterrupted one did: same micro-models, bit for bit.
    for got, want in zip(states_of(resumed), states_of(reference), strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    for rank in range(2):  # and the same history (round 1's record comes from the checkpoint)
        got_rounds = read_json(resumed / f"worker-{rank:05d}.json")["rounds"]
        want_rounds = read_json(reference / f"worker-{rank:05d}.json")["rounds"]
        assert [r.get("test_accuracy") for r in got_rounds] == [r.get("test_accuracy") for r in want_rounds]
    # The global model and its accuracy therefore match too (the issue asks within 0.5 points: it is 0).
    aggregate_step(resumed, tmp_path / "model-resumed")
    aggregate_step(reference, tmp_path / "model-reference")
    got_model, _ = read_safetensors(tmp_path / "model-resumed" / "model.safetensors")
    want_model, _ = read_safetensors(tmp_path / "model-reference" / "model.safetensors")
    assert all(torch.equal(got_model[k], want_model[k]) for k in want_model)
    got_acc = evaluate_step(tmp_path / "model-resumed", shards, resumed, tmp_path / "eval-resumed")["accuracy"]
    want_acc = evaluate_step(tmp_path / "model-reference", shards, reference, tmp_path / "eval-reference")["accuracy"]
    assert got_acc == want_acc > 0.9

    # A retried train step (same inputs, same output folder) resumes after round 2, trains round 3 only, and
    # writes the same micro-models again, no new checkpoint and no duplicate.
    files_before = sorted(p.relative_to(resumed) for p in resumed.rglob("*") if "logs" not in p.parts)
    again = train_step(worker_config(shards, resumed), workers=2)
    assert [w["resumed_from_round"] for w in again["workers"]] == [2, 2]
    assert sorted(p.relative_to(resumed) for p in resumed.rglob("*") if "logs" not in p.parts) == files_before
    for got, want in zip(states_of(resumed), states_of(reference), strict=True):
        assert all(torch.equal(got[key], want[key]) for key in want)


@pytest.mark.integration
def test_a_killed_worker_resumes_from_checkpoints_on_gcs(
    shards: Path,
    tmp_path: Path,
    faulty: Path,
    monkeypatch: pytest.MonkeyPatch,
    gcs: GcsEmulator,  # noqa: F811
) -> None:
    # The cluster path: workers write their checkpoints straight to gs:// (the rest is uploaded at the end).
    monkeypatch.setenv("FAULT", "kill")
    monkeypatch.setenv("FAULT_RANK", "0")
    monkeypatch.setenv("FAULT_CALL", "2")  # rank 0, after its epoch of round 2, before the average
    out = gcs.uri("run/micro")
    cfg = dataclasses.replace(worker_config(shards, tmp_path), out=out, local_epochs=1)

    launch_local(2, config_to_argv(cfg), log_dir=tmp_path / "logs", module="faulty_worker", echo_rank0=False)

    assert faulty.exists()
    checkpoints = storage.list_files(storage.join(out, "checkpoints"))
    assert checkpoints == ["round-00001.safetensors", "round-00002.safetensors"]
    records = [json.loads(storage.read_bytes(storage.join(out, f"worker-{r:05d}.json"))) for r in range(2)]
    assert [r["resumed_from_round"] for r in records] == [1, 1]
    assert "resuming after round 1/3 from gs://" in (tmp_path / "logs" / "worker-00000.log").read_text()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("sync_every_steps", "found"),
    [
        (0, "mean loss of this epoch is nan"),  # at the end of the epoch, before the round's average
        (4, "weights hold NaN or Inf (tensor '0.weight') at an average inside the round"),  # before the next sync
    ],
)
def test_a_diverging_worker_stops_the_job_naming_its_rank_and_round(
    shards: Path, tmp_path: Path, faulty: Path, monkeypatch: pytest.MonkeyPatch, sync_every_steps: int, found: str
) -> None:
    monkeypatch.setenv("FAULT", "nan")
    monkeypatch.setenv("FAULT_RANK", "1")
    monkeypatch.setenv("FAULT_CALL", "3")  # the first epoch of round 2
    out = tmp_path / "micro"
    cfg = dataclasses.replace(worker_config(shards, out), strategy=Strategy(sync_every_steps=sync_every_steps))
    argv = config_to_argv(cfg)

    with pytest.raises(WorkerFailed) as info:
        launch_local(2, argv, log_dir=tmp_path / "logs", module="faulty_worker", echo_rank0=False)

    # the diverged rank, not a peer it would have poisoned through an average
    assert (info.value.rank, info.value.returncode, info.value.restarts) == (1, 2, 0)  # not restarted
    assert "worker 1 diverged in round 2/3, local epoch 1/2" in str(info.value)
    assert found in info.value.log_tail
    # Nothing poisoned was averaged or written: round 1's checkpoint only, no micro-models.
    assert latest_round(str(out)) == 1
    assert not list(out.glob("micro-model-*"))


# ----------------------------------------------------------------------------- the launcher's restarts

CRASHER = textwrap.dedent("""
    import os, signal, sys, time
    if os.environ["RANK"] == "1":
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(int(sys.argv[1]))
    time.sleep(0.5)
    sys.exit(200)  # rank 0 "lost its peer"
""")


@pytest.fixture
def crasher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "crasher.py").write_text(CRASHER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.integration
def test_a_fault_that_repeats_stops_after_the_restart_limit(tmp_path: Path, crasher: None) -> None:
    with pytest.raises(WorkerFailed) as info:
        launch_local(2, ["kill"], log_dir=tmp_path, module="crasher", echo_rank0=False, max_restarts=1)

    assert (info.value.rank, info.value.returncode, info.value.restarts) == (1, -9, 1)
    assert "worker 1 was killed by SIGKILL (exit code -9) after 1 restart of the group" in str(info.value)
    assert (tmp_path / "worker-00000.log").read_text().count("restart 1: worker group started again") == 1


@pytest.mark.integration
@pytest.mark.parametrize("code", ["1", "2"])
def test_a_program_error_is_not_restarted_even_when_its_peer_reports_a_lost_peer(
    tmp_path: Path, crasher: None, code: str
) -> None:
    with pytest.raises(WorkerFailed) as info:
        launch_local(2, [code], log_dir=tmp_path, module="crasher", echo_rank0=False, max_restarts=3)

    assert (info.value.rank, info.value.returncode, info.value.restarts) == (1, int(code), 0)
    assert "restart" not in (tmp_path / "worker-00000.log").read_text()


# ----------------------------------------------------------------------------------- checkpoint files


SMALL = ModelConfig(name="cnn-small", num_classes=3, in_channels=1, image_size=(16, 16))
OPTIM = OptimConfig(batch_size=8, lr=0.01)
Objects = tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.Generator]


def fresh_objects(seed: int) -> Objects:
    torch.manual_seed(seed)
    model = build_model(SMALL)
    opt = make_optimizer(model, OPTIM)
    return model, opt, make_scheduler(opt, OPTIM, total_steps=20), torch.Generator().manual_seed(seed)


def one_epoch(objects: Objects, n: int = 24) -> None:
    model, opt, sched, gen = objects
    data = synthetic_dataset(n_train=n, n_test=3)
    pre = Preprocess([0.5], [0.25], torch.device("cpu"))
    train_epoch(
        model, data.train.images, data.train.labels, preprocess=pre, optimizer=opt, scheduler=sched, batch_size=8,
        generator=gen,
    )  # fmt: skip


def test_a_restored_rank_continues_exactly_like_the_original() -> None:
    original = fresh_objects(seed=0)
    one_epoch(original)
    model, opt, sched, gen = original
    records = [{"round": 1, "test_accuracy": 0.5}]
    data = build_checkpoint(1, {"seed": 0}, model.state_dict(), [capture_rank_state(opt, sched, gen, records)])
    rng_at_capture = torch.get_rng_state()
    ckpt = parse_checkpoint(data, "in memory")
    restored = fresh_objects(seed=1)  # other weights, other generator, other global RNG state
    restored[0].load_state_dict(ckpt.weights)

    assert restore_rank_state(ckpt.ranks[0], *restored[1:]) == records
    assert torch.equal(torch.get_rng_state(), rng_at_capture)

    one_epoch(original)
    one_epoch(restored)
    assert restored[2].last_epoch == sched.last_epoch == 6  # the schedule went on from step 3, not from 0
    for key, value in model.state_dict().items():
        assert torch.equal(restored[0].state_dict()[key], value), key


def test_a_round_is_committed_once_and_the_latest_is_found(base: str) -> None:
    model, opt, sched, gen = fresh_objects(seed=0)
    fingerprint = {"seed": 0, "world_size": 1}
    ranks = [capture_rank_state(opt, sched, gen, [])]
    assert latest_round(base) == 0

    for r in (1, 2):
        write_checkpoint(base, r, build_checkpoint(r, fingerprint, model.state_dict(), ranks))

    assert latest_round(base) == 2
    # A round's checkpoint is never replaced (on gs:// a generation precondition, if_generation_match=0).
    with pytest.raises(MicrofedError, match=r"round-00002\.safetensors.*(already exists|precondition)"):
        write_checkpoint(base, 2, build_checkpoint(2, fingerprint, model.state_dict(), ranks))
    ckpt = read_checkpoint(base, 2, fingerprint=fingerprint, world_size=1)
    assert ckpt.round == 2 and torch.equal(ckpt.weights["0.weight"], model.state_dict()["0.weight"])


def test_a_checkpoint_of_another_configuration_or_size_is_refused(tmp_path: Path) -> None:
    model, opt, sched, gen = fresh_objects(seed=0)
    out = str(tmp_path)
    write_checkpoint(
        out, 1, build_checkpoint(1, {"seed": 0}, model.state_dict(), [capture_rank_state(opt, sched, gen, [])])
    )

    with pytest.raises(MicrofedError, match=r"different training configuration \(seed: 0 there, 1 now\)"):
        read_checkpoint(out, 1, fingerprint={"seed": 1}, world_size=1)
    with pytest.raises(MicrofedError, match="round 1 of 1 workers, expected round 1 of 2"):
        read_checkpoint(out, 1, fingerprint={"seed": 0}, world_size=2)


def test_a_damaged_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / checkpoint.CHECKPOINT_DIR / "round-00001.safetensors"
    path.parent.mkdir()
    path.write_bytes(json.dumps({"not": "safetensors"}).encode())

    with pytest.raises(MicrofedError, match=r"round-00001\.safetensors: not a readable microfed checkpoint"):
        read_checkpoint(str(tmp_path), 1, fingerprint={}, world_size=1)


# ------------------------------------------------------------------------------------------ step reruns


def test_split_gives_the_same_bytes_and_aggregate_the_same_model_when_run_again(tmp_path: Path) -> None:
    source = write_zip(tmp_path / "shapes.zip", per_class_train=8, per_class_test=2)
    split = SplitConfig(val_fraction=0.0, workers=2, split="dirichlet", alpha=0.5, seed=3)
    first, second = tmp_path / "first", tmp_path / "second"

    split_step(SplitOptions(source=str(source)), split, first)
    split_step(SplitOptions(source=str(source)), split, second)
    split_step(SplitOptions(source=str(source)), split, first)  # a retry into the same folder

    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())  # nothing duplicated, no temporary file left
    assert names == ["dataset.json", "shard-00000.json", "shard-00000.safetensors", "shard-00001.json",
                     "shard-00001.safetensors", "test.json", "test.safetensors"]  # fmt: skip
    for name in names:
        if name == "dataset.json":  # the same but for the step's own timing
            a, b = read_json(first / name), read_json(second / name)
            assert a.pop("seconds") >= 0 and b.pop("seconds") >= 0 and a == b
        else:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name

    micro = tmp_path / "micro"
    for rank, seed in enumerate((1, 2)):
        torch.manual_seed(seed)
        state = build_model(SMALL).state_dict()
        write_safetensors(micro / micro_model_file(rank), state, {"n_k": str(10 * (rank + 1))})
    workers = [{"rank": r, "n_k": 10 * (r + 1), "file": micro_model_file(r)} for r in range(2)]
    write_json(micro / "job.json", {"config": {}, "workers": workers, "plan": None, "usage": None, "seconds": 0.0})
    card = ModelCard(architecture=SMALL, class_names=("a", "b", "c"), mean=(0.5,), std=(0.25,))
    write_json(micro / MODEL_CONFIG_FILE, card.to_dict())
    aggregate_step(micro, tmp_path / "model-1")
    aggregate_step(micro, tmp_path / "model-2")
    # Same tensors and metadata. (Not the same bytes: safetensors writes a metadata map of two or more keys in
    # a random order, so only the header's key order may differ; shards, with no metadata, are byte-identical.)
    one, meta_one = read_safetensors(tmp_path / "model-1" / "model.safetensors")
    two, meta_two = read_safetensors(tmp_path / "model-2" / "model.safetensors")
    assert meta_one == meta_two and one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    config_one, config_two = (tmp_path / m / MODEL_CONFIG_FILE for m in ("model-1", "model-2"))
    assert config_one.read_bytes() == config_two.read_bytes()


def test_every_step_of_the_compiled_pipeline_may_be_retried() -> None:
    spec = yaml.safe_load(compile_pipeline(Path(tempfile.mkdtemp()) / "pipeline.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]

    for name in ("split-dataset", "train", "aggregate", "evaluate"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2, name
