"""Training strategies: the math of each by hand, the degenerate cases that must equal FedAvg or a single
process, best-round selection and early stopping, on real worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from microfed.training.aggregation import batchnorm_keys, proximal_step, server_update
from microfed.training.errors import MicrofedError
from microfed.training.io import read_json, read_safetensors, write_safetensors
from microfed.training.layout import micro_model_file
from microfed.training.models import ModelConfig, build_model
from microfed.training.shards import SplitConfig, load_shard, read_dataset_manifest, write_shards
from microfed.training.step_aggregate import aggregate_step
from microfed.training.step_train import train_step
from microfed.training.strategies import Strategy
from microfed.training.train import OptimConfig, Preprocess, make_optimizer, make_scheduler, train_epoch
from microfed.training.worker import WorkerConfig
from tests.conftest import synthetic_dataset

OPTIM = OptimConfig(batch_size=16, lr=0.01, precision="fp32")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("strategies") / "shards"
    data = synthetic_dataset(n_train=150, n_test=40)
    write_shards(data, out, SplitConfig(workers=2, ratios=(1, 2), val_fraction=0.2))
    return out


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("strategies") / "one"
    write_shards(synthetic_dataset(n_train=96, n_test=20), out, SplitConfig(val_fraction=0.0, workers=1))
    return out


def train(shards: Path, out: Path, world_size: int, **overrides: object) -> dict[str, torch.Tensor]:
    """Train with the local launcher, aggregate, and return the global model's state_dict."""
    base: dict[str, object] = dict(
        shards=str(shards), out=str(out / "micro"), model="cnn-small", rounds=2, local_epochs=1, threads=1, optim=OPTIM
    )
    cfg = WorkerConfig(**{**base, **overrides})  # type: ignore[arg-type]
    train_step(cfg, world_size)
    aggregate_step(out / "micro", out / "model")
    state, _ = read_safetensors(out / "model" / "model.safetensors")
    return state


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=atol, msg=key)


# ------------------------------------------------------------------------------------------------- by hand


def test_server_update_by_hand() -> None:
    g = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    avg = {"w": torch.tensor([0.5, 2.5]), "n": torch.tensor(5)}
    # first round: v = g - avg = [0.5, -0.5]; g' = g - 1.0 * v = avg
    new, v = server_update(g, avg, None, beta=0.9, lr=1.0)
    assert new["w"].tolist() == [0.5, 2.5] and v["w"].tolist() == [0.5, -0.5] and int(new["n"]) == 5
    # second round from g' with the same pseudo-gradient: v = 0.9 * [0.5, -0.5] + [0.5, -0.5] = [0.95, -0.95]
    avg2 = {"w": torch.tensor([0.0, 3.0]), "n": torch.tensor(5)}
    new2, v2 = server_update(new, avg2, v, beta=0.9, lr=1.0)
    assert v2["w"].tolist() == pytest.approx([0.95, -0.95])
    assert new2["w"].tolist() == pytest.approx([0.5 - 0.95, 2.5 + 0.95])
    # server learning rate scales the step; inputs untouched
    half, _ = server_update(g, avg, None, beta=0.0, lr=0.5)
    assert half["w"].tolist() == [0.75, 2.25] and g["w"].tolist() == [1.0, 2.0]


def test_proximal_step_adds_mu_times_the_distance_to_the_global_model() -> None:
    p = nn.Parameter(torch.tensor([1.0, -1.0]))
    p.grad = torch.tensor([0.1, 0.1])
    proximal_step([p], [torch.tensor([0.0, 1.0])], mu=0.5)
    assert p.grad.tolist() == pytest.approx([0.1 + 0.5, 0.1 - 1.0])


def test_batchnorm_keys_are_what_fedbn_keeps_local() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    assert batchnorm_keys(model) == {
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "scaffold"}, "unknown strategy 'scaffold'"),
        ({"mu": -1.0}, "--mu"),
        ({"server_momentum": 1.0}, "--server-momentum"),
        ({"server_lr": -1.0}, "--server-lr"),
        ({"name": "ddp", "fedbn": True}, "--fedbn"),
    ],
)
def test_bad_strategy_settings_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(MicrofedError, match=message):
        Strategy(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- degenerate cases


def single_process(shards: Path, epochs: int) -> dict[str, torch.Tensor]:
    """The same training written as one plain loop: what the worker must reduce to with one worker."""
    summary = read_dataset_manifest(shards)
    shard = load_shard(shards, 0)
    c, h, w = summary["image_shape"]
    torch.manual_seed(0)
    arch = ModelConfig(name="cnn-small", num_classes=len(summary["class_names"]), in_channels=c, image_size=(h, w))
    model = build_model(arch).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, OPTIM)
    steps = -(-shard.num_examples // OPTIM.batch_size)
    sched = make_scheduler(opt, OPTIM, epochs * steps)
    gen = torch.Generator().manual_seed(0 + 1000)
    pre = Preprocess(summary["mean"], summary["std"], torch.device("cpu"))
    torch.set_num_threads(1)
    for _ in range(epochs):
        train_epoch(
            model,
            shard.images,
            shard.labels,
            preprocess=pre,
            optimizer=opt,
            scheduler=sched,
            batch_size=OPTIM.batch_size,
            generator=gen,
        )
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.integration
def test_fedavg_and_ddp_with_one_worker_equal_a_single_process(one_shard: Path, tmp_path: Path) -> None:
    expected = single_process(one_shard, epochs=2)
    fedavg = train(one_shard, tmp_path / "fedavg", 1)
    ddp = train(one_shard, tmp_path / "ddp", 1, strategy=Strategy(name="ddp"))
    assert_same({k: v.contiguous() for k, v in fedavg.items()}, expected)
    assert_same({k: v.contiguous() for k, v in ddp.items()}, expected)


@pytest.mark.integration
def test_fedprox_with_mu_0_equals_fedavg(shards: Path, tmp_path: Path) -> None:
    fedavg = train(shards, tmp_path / "fedavg", 2)
    prox0 = train(shards, tmp_path / "prox0", 2, strategy=Strategy(name="fedprox", mu=0.0))
    assert_same(prox0, fedavg)
    # and mu > 0 changes the result (the term is applied)
    prox = train(shards, tmp_path / "prox", 2, strategy=Strategy(name="fedprox", mu=1.0))
    assert any(not torch.equal(prox[k], fedavg[k]) for k in fedavg if fedavg[k].is_floating_point())


@pytest.mark.integration
def test_fedavgm_with_momentum_0_equals_fedavg(shards: Path, tmp_path: Path) -> None:
    fedavg = train(shards, tmp_path / "fedavg", 2, rounds=3)
    m0 = train(shards, tmp_path / "m0", 2, rounds=3, strategy=Strategy(name="fedavgm", server_momentum=0.0))
    # g - (g - avg) in float64, cast back to float32: equal to the last bit or within one float32 ulp
    assert_same(m0, fedavg, atol=1e-6)
    # momentum 0.9 moves the model elsewhere, and the aggregate step applied round 3's server update
    m9 = train(shards, tmp_path / "m9", 2, rounds=3, strategy=Strategy(name="fedavgm", server_momentum=0.9))
    assert (tmp_path / "m9" / "micro" / "server-state.safetensors").exists()
    assert any(not torch.allclose(m9[k], fedavg[k]) for k in fedavg if fedavg[k].is_floating_point())


@pytest.mark.integration
def test_ddp_ranks_train_one_model_on_unequal_shards(shards: Path, tmp_path: Path) -> None:
    train(shards, tmp_path, 2, strategy=Strategy(name="ddp"))
    micro = [read_safetensors(tmp_path / "micro" / micro_model_file(r))[0] for r in range(2)]
    assert_same(micro[0], micro[1])  # one model (BatchNorm statistics settled in-job)
    job = read_json(tmp_path / "micro" / "job.json")
    # both ranks took as many steps per epoch as the larger shard (80 examples / 16 = 5)
    assert {w["rounds"][0]["epochs"][0]["examples"] for w in job["workers"]} == {80}
    agg = read_json(tmp_path / "model" / "aggregate.json")
    assert agg["strategy"]["name"] == "ddp"
    assert_same(read_safetensors(tmp_path / "model" / "model.safetensors")[0], micro[0])


# ------------------------------------------------------------------------------ selection, early stopping


@pytest.mark.integration
def test_the_aggregate_step_keeps_the_round_with_the_best_validation_accuracy(shards: Path, tmp_path: Path) -> None:
    train(shards, tmp_path, 2, rounds=2)
    micro = tmp_path / "micro"
    rounds = read_json(micro / "rounds.json")
    assert rounds["best_round"] == 1 and [r["round"] for r in rounds["val"]] == [1]
    # the normal case: round 2 is no worse here (easy bands), so it is kept
    normal = aggregate_step(micro, tmp_path / "normal", shards)
    assert [h["round"] for h in normal["val_history"]] == [1, 2]
    best_acc = max(h["val_accuracy"] for h in normal["val_history"])
    assert normal["val_accuracy"] == best_acc
    # spoil round 2: micro-models of untrained weights; round 1's model must now win
    for r in range(2):
        state, meta = read_safetensors(micro / micro_model_file(r))
        write_safetensors(micro / micro_model_file(r), {k: torch.zeros_like(v) for k, v in state.items()}, meta)
    spoiled = aggregate_step(micro, tmp_path / "spoiled", shards)
    assert spoiled["selected_round"] == 1
    assert spoiled["val_history"][1]["val_accuracy"] < spoiled["val_history"][0]["val_accuracy"]
    kept, meta = read_safetensors(tmp_path / "spoiled" / "model.safetensors")
    best, _ = read_safetensors(micro / "best-round.safetensors")
    assert_same(kept, best)
    assert meta["round"] == "1"


@pytest.mark.integration
def test_patience_stops_when_validation_accuracy_stops_improving(shards: Path, tmp_path: Path) -> None:
    # a learning rate too small to change a prediction: round 1 stays the best, so patience 1 stops after 2
    frozen = OptimConfig(optimizer="sgd", lr=1e-12, batch_size=16, precision="fp32", schedule="constant")
    train(shards, tmp_path, 2, rounds=5, patience=1, optim=frozen)
    job = read_json(tmp_path / "micro" / "job.json")
    assert all(len(w["rounds"]) == 2 and w["stopped_after_round"] == 2 for w in job["workers"])
    assert read_safetensors(tmp_path / "micro" / micro_model_file(0))[1]["rounds"] == "2"
    assert read_json(tmp_path / "micro" / "rounds.json")["stopped_after_round"] == 2


BN_FACTORY = """
from torch import nn


def make(num_classes, in_channels, image_size):
    h, w = image_size
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * h * w, num_classes),
    )
"""


@pytest.mark.integration
def test_fedbn_keeps_batchnorm_out_of_the_in_job_average(shards: Path, tmp_path: Path) -> None:
    from microfed.training.checkpoint import checkpoint_uri, parse_checkpoint
    from microfed.training.storage import read_bytes

    factory = tmp_path / "bn_net.py"
    factory.write_text(BN_FACTORY)
    model = f"{factory}:make"
    # averages at round ends only: an in-round one would mix the BatchNorm layers (fedavg) or not (fedbn) before
    # the round-1 checkpoint compared below, and the other layers would then differ too
    train(shards, tmp_path / "fedavg", 2, model=model, strategy=Strategy(sync_every_steps=0))
    train(shards, tmp_path / "fedbn", 2, model=model, strategy=Strategy(fedbn=True, sync_every_steps=0))

    def round_1(run: str) -> dict[str, torch.Tensor]:  # the global model after round 1's in-job average (rank 0)
        uri = checkpoint_uri(str(tmp_path / run / "micro"), 1)
        return parse_checkpoint(read_bytes(uri), uri).weights

    plain, bn = round_1("fedavg"), round_1("fedbn")
    # round 1 trained the same way in both runs: the averaged layers agree, the BatchNorm layers do not (fedbn
    # kept rank 0's own, fedavg averaged both ranks')
    for key in ("0.weight", "0.bias", "4.weight", "4.bias"):
        assert torch.equal(plain[key], bn[key]), key
    for key in ("1.weight", "1.running_mean", "1.running_var"):
        assert not torch.equal(plain[key], bn[key]), key
