"""Averages inside a round (--sync-every-steps) and the optimizer's state at each average (--sync-optimizer): where
the syncs fall, what they are equal to at their two ends (ddp at K = 1, FedAvg's rounds at K = an epoch), on real
worker processes over gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microfed.training.config import RunConfig
from microfed.training.errors import MicrofedError
from microfed.training.io import read_json
from microfed.training.layout import ROUNDS_FILE
from microfed.training.local_sgd import sync_points
from microfed.training.shards import SplitConfig, read_dataset_manifest, write_shards
from microfed.training.strategies import Strategy
from microfed.training.train import OptimConfig
from tests.conftest import synthetic_dataset
from tests.test_strategies import assert_same, train

# plain Nesterov SGD at a constant rate: with averaged momentum buffers, K = 1 is exactly averaged gradients
SGD = OptimConfig(batch_size=16, lr=0.05, optimizer="sgd", momentum=0.9, schedule="constant", precision="fp32")


@pytest.mark.parametrize(
    ("steps", "per_epoch", "expected"),
    [
        (8, 4, [0, 1, 0, 1, 0, 1, 0, 1]),  # the largest shard, K = 2: every 2 steps
        (4, 4, [1, 1, 1, 1]),  # a shard half as large syncs after every one of its steps
        (3, 2, [0, 1, 1]),  # ceil(1 * 3 / 2) = 2, ceil(2 * 3 / 2) = 3
        (2, 5, [2, 3]),  # fewer steps than syncs: several after one step, so the all-reduces still pair up
        (5, 1, [0, 0, 0, 0, 1]),  # one sync per epoch: at its end
    ],
)
def test_sync_points_fall_at_the_same_fractions_of_the_epoch(steps: int, per_epoch: int, expected: list[int]) -> None:
    assert sync_points(steps, per_epoch) == expected
    assert sum(expected) == per_epoch


def test_sync_settings_are_checked_where_every_parameter_is() -> None:
    with pytest.raises(MicrofedError, match="sync_every_steps") as err:
        RunConfig.from_flat({"sync_every_steps": -1})
    assert "--sync-every-steps" in str(err.value.hint) or "--sync-every-steps" in str(err.value)
    with pytest.raises(MicrofedError, match="unknown sync_optimizer 'mean'") as err:
        RunConfig.from_flat({"sync_optimizer": "mean"})
    assert "local, average, reset (--sync-optimizer)" in str(err.value.hint)
    # ddp's ranks average gradients every step: the (default) in-round average does not apply and is recorded as 0
    assert Strategy(name="ddp", sync_every_steps=4).sync_every_steps == 0
    assert Strategy(name="ddp").build().label() == "ddp"
    with pytest.raises(MicrofedError, match=r"--sync-optimizer applies to .*not ddp"):
        Strategy(name="ddp", sync_optimizer="reset")
    label = Strategy(name="fedprox", sync_every_steps=8, sync_optimizer="average").build().label()
    assert label == "fedprox mu=0.01 sync=8 optimizer-state=average"


@pytest.fixture(scope="module")
def equal_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local_sgd") / "equal"
    write_shards(synthetic_dataset(n_train=128, n_test=20), out, SplitConfig(workers=2, val_fraction=0.0))
    sizes = [s["num_examples"] for s in read_dataset_manifest(out)["shards"]]
    assert sizes == [64, 64]  # whole batches: ddp's fixed step count takes no wrapped-around examples
    return out


@pytest.fixture(scope="module")
def unequal_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local_sgd") / "unequal"
    write_shards(synthetic_dataset(n_train=150, n_test=20), out, SplitConfig(workers=2, ratios=(1, 2), val_fraction=0))
    return out


@pytest.mark.integration
def test_sync_every_step_with_averaged_momentum_is_ddp(equal_shards: Path, tmp_path: Path) -> None:
    """Local SGD at K = 1 from one model, momentum buffers averaged too, equal shards: every step applies the mean
    of the ranks' gradients, which is what DistributedDataParallel does."""
    every_step = Strategy(sync_every_steps=1, sync_optimizer="average")
    local = train(equal_shards, tmp_path / "k1", 2, optim=SGD, strategy=every_step)
    ddp = train(equal_shards, tmp_path / "ddp", 2, optim=SGD, strategy=Strategy(name="ddp"))
    assert_same(local, ddp, atol=2e-6)
    fedavg = train(equal_shards, tmp_path / "fedavg", 2, optim=SGD, strategy=Strategy(sync_every_steps=0))
    # and it is not what FedAvg ends with
    assert max(float((local[k] - fedavg[k]).abs().max()) for k in local) > 1e-3


@pytest.mark.integration
def test_one_sync_per_epoch_is_fedavg_with_one_epoch_rounds(unequal_shards: Path, tmp_path: Path) -> None:
    """K = the largest shard's steps per epoch: every rank syncs once, at the end of each of its epochs, so one
    round of 2 epochs is FedAvg's 2 rounds of 1 epoch (the schedule spans the same steps), even with shards of
    different sizes (100 and 50 examples: 7 and 4 steps of 16)."""
    synced = train(
        unequal_shards, tmp_path / "k", 2, rounds=1, local_epochs=2, optim=SGD, strategy=Strategy(sync_every_steps=7)
    )
    fedavg = Strategy(sync_every_steps=0)
    rounds = train(unequal_shards, tmp_path / "r", 2, rounds=2, local_epochs=1, optim=SGD, strategy=fedavg)
    assert_same(synced, rounds, atol=2e-6)
    record = read_json(tmp_path / "k" / "micro" / "job.json")
    assert [r["in_round_syncs"] for w in record["workers"] for r in w["rounds"]] == [1, 1]


@pytest.mark.integration
def test_the_rounds_record_counts_syncs_and_bytes(unequal_shards: Path, tmp_path: Path) -> None:
    """K = 2 on shards of 7 and 4 steps: J = 4 syncs per epoch; 2 epochs a round less the one the round's combine
    replaces = 7 per round; each sync sends every float of the model once as float32 (cnn-small: no integer
    buffers). The optimizer state is reset at each sync, so nothing else travels."""
    strategy = Strategy(sync_every_steps=2, sync_optimizer="reset")
    state = train(unequal_shards, tmp_path / "run", 2, rounds=2, local_epochs=2, optim=SGD, strategy=strategy)
    floats = sum(t.numel() for t in state.values())
    record = read_json(tmp_path / "run" / "micro" / "job.json")
    for worker in record["workers"]:
        assert [r["in_round_syncs"] for r in worker["rounds"]] == [7, 7]
        assert [r["sync_bytes"] for r in worker["rounds"]] == [7 * 4 * floats] * 2
    info = read_json(tmp_path / "run" / "micro" / ROUNDS_FILE)
    assert info["strategy"]["sync_every_steps"] == 2 and info["strategy"]["sync_optimizer"] == "reset"
    assert all(torch.isfinite(t).all() for t in state.values())


def test_a_global_batch_is_shared_by_the_workers() -> None:
    assert OptimConfig(global_batch_size=128).for_workers(3).batch_size == 43
    assert OptimConfig(global_batch_size=128).for_workers(1).batch_size == 128
    assert OptimConfig(batch_size=64).for_workers(8).batch_size == 64  # a set --batch-size replaces the share
    assert OptimConfig().for_workers(3) == OptimConfig(batch_size=43)  # the default: a global batch of 128
    assert OptimConfig().for_workers(3).for_workers(5).batch_size == 43  # resolved once (the train step, the worker)
    with pytest.raises(MicrofedError, match="global_batch_size"):
        RunConfig.from_flat({"global_batch_size": -1})


@pytest.mark.integration
def test_global_batch_size_trains_as_its_per_worker_share(unequal_shards: Path, tmp_path: Path) -> None:
    """--global-batch-size 32 on 2 workers trains exactly as --batch-size 16 does, and the job record says 16; a
    --batch-size above 0 replaces the global batch."""
    import dataclasses

    shared = train(
        unequal_shards, tmp_path / "g", 2, optim=dataclasses.replace(SGD, batch_size=0, global_batch_size=32)
    )
    each = train(unequal_shards, tmp_path / "b", 2, optim=dataclasses.replace(SGD, batch_size=16, global_batch_size=8))
    assert_same(shared, each)
    record = read_json(tmp_path / "g" / "micro" / "job.json")
    assert record["config"]["optim"]["batch_size"] == 16 and record["config"]["optim"]["global_batch_size"] == 32
    assert read_json(tmp_path / "b" / "micro" / "job.json")["config"]["optim"]["batch_size"] == 16


def test_a_failed_sync_is_a_lost_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """gloo raises RuntimeError when a peer drops out of an all-reduce: the worker reports PeerLost (its restartable
    exit code), naming the rank and what it was doing."""
    from torch import nn

    from microfed.training import local_sgd
    from microfed.training.worker_group import PeerLost

    def dropped(tensors: list[torch.Tensor], share: float) -> int:
        raise RuntimeError("[gloo] Connection closed by peer\nmore detail")

    monkeypatch.setattr(local_sgd, "_allreduce_in_place", dropped)
    model = nn.Linear(2, 2)
    sync = local_sgd.InRoundSync(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        keys=set(model.state_dict()),
        share=0.5,
        steps=4,
        per_epoch=2,
        policy="local",
        rank=1,
    )
    with pytest.raises(
        PeerLost, match=r"^worker 1: averaging inside a round failed, a peer is gone \(\[gloo\] Connection"
    ):
        step = sync.on_step(False, lambda: None)
        step()  # 4 steps, 2 syncs: the first after step 2
        step()
