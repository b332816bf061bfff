"""FedAdam and FedYogi (Reddi et al., "Adaptive Federated Optimization", 2021, Algorithm 2): one and two server
steps by hand, the server state across rounds and across a resumed job, and 2-worker runs that learn; the
strategies' registry that the worker, the CLI and the benchmark read."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from microfed.training.errors import MicrofedError
from microfed.training.io import read_json, read_safetensors, write_safetensors
from microfed.training.layout import micro_model_file
from microfed.training.shards import SplitConfig, write_shards
from microfed.training.step_aggregate import aggregate_step
from microfed.training.step_evaluate import evaluate_step
from microfed.training.step_train import train_step
from microfed.training.strategies import (
    REGISTRY,
    STRATEGIES,
    FedAdam,
    FedYogi,
    Strategy,
    adaptive_server_update,
    pack_server_state,
    unpack_server_state,
)
from microfed.training.train import OptimConfig
from microfed.training.worker import DistEnv, WorkerConfig, build_parser, run_worker
from tests.conftest import synthetic_dataset

OPTIM = OptimConfig(batch_size=16, lr=0.01, precision="fp32")


def adam_step(x: float, avg: float, m: float, v: float, lr: float, b1: float, b2: float, tau: float) -> tuple:
    """One coordinate of Algorithm 2 (FedAdam), in plain floats."""
    d = avg - x
    m = b1 * m + (1 - b1) * d
    v = b2 * v + (1 - b2) * d * d
    return x + lr * m / (math.sqrt(v) + tau), m, v


def yogi_step(x: float, avg: float, m: float, v: float, lr: float, b1: float, b2: float, tau: float) -> tuple:
    """One coordinate of Algorithm 2 (FedYogi), in plain floats."""
    d = avg - x
    m = b1 * m + (1 - b1) * d
    v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
    return x + lr * m / (math.sqrt(v) + tau), m, v


# ------------------------------------------------------------------------------------------------- by hand


def test_fedadam_with_tau_0_moves_each_coordinate_by_eta_in_the_first_step() -> None:
    # Prepare: tau = 0 (so v starts at 0): m = 0.1 d, v = 0.01 d^2, m / sqrt(v) = sign(d)
    g = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    avg = {"w": torch.tensor([1.5, 1.0]), "b": torch.tensor([[0.25]])}

    # Execute
    new, state = adaptive_server_update(
        g, avg, {}, lr=0.1, beta1=0.9, beta2=0.99, tau=0.0, second_moment=FedAdam.second_moment
    )

    # Assert: d = [0.5, -1.0] and [[-0.25]]
    assert new["w"].tolist() == pytest.approx([1.1, 1.9])
    assert new["b"].shape == (1, 1) and new["b"].item() == pytest.approx(0.4)
    assert state["m"]["w"].tolist() == pytest.approx([0.05, -0.1])
    assert state["v"]["w"].tolist() == pytest.approx([0.0025, 0.01])
    assert g["w"].tolist() == [1.0, 2.0] and avg["w"].tolist() == [1.5, 1.0]  # inputs untouched


def test_fedadam_one_and_two_server_steps_by_hand_with_the_paper_defaults() -> None:
    # Prepare: the class defaults (beta1 0.9 = server_momentum, beta2 0.99, tau 1e-3, eta 0.01)
    rule = Strategy(name="fedadam").build()
    assert (rule.config.server_lr, rule.config.server_momentum, FedAdam.beta2, FedAdam.tau) == (0.01, 0.9, 0.99, 1e-3)
    g = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    avg1 = {"w": torch.tensor([1.2, -2.5], dtype=torch.float64)}

    # Execute: two rounds; the second round's average is 0.1 above the first step's result
    x1, state1 = rule.server_step(g, avg1, {})
    avg2 = {"w": x1["w"] + 0.1}
    x2, state2 = rule.server_step(x1, avg2, state1)

    # Assert: coordinate by coordinate, Algorithm 2 with m_{-1} = 0 and v_{-1} = tau^2
    for i, (x, a1) in enumerate([(1.0, 1.2), (-2.0, -2.5)]):
        e1, m1, v1 = adam_step(x, a1, 0.0, 1e-6, 0.01, 0.9, 0.99, 1e-3)
        assert x1["w"][i].item() == pytest.approx(e1, rel=1e-12)
        assert state1["m"]["w"][i].item() == pytest.approx(m1, rel=1e-6)  # kept in float32
        assert state1["v"]["w"][i].item() == pytest.approx(v1, rel=1e-6)
        e2, _, v2 = adam_step(
            x1["w"][i].item(),
            x1["w"][i].item() + 0.1,
            state1["m"]["w"][i].item(),
            state1["v"]["w"][i].item(),
            0.01,
            0.9,
            0.99,
            1e-3,
        )
        assert x2["w"][i].item() == pytest.approx(e2, rel=1e-12)
        assert state2["v"]["w"][i].item() == pytest.approx(v2, rel=1e-6)
    # the first step: |d| >> tau, so each coordinate moves by about eta, in the direction of the average
    assert (x1["w"] - g["w"]).tolist() == pytest.approx([0.01, -0.01], rel=0.06)


def test_fedyogi_one_and_two_server_steps_by_hand() -> None:
    # Prepare: tau = 0, d = 1 in both rounds
    g = {"w": torch.tensor([0.0])}
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, tau=0.0)

    # Execute
    x1, s1 = adaptive_server_update(g, {"w": torch.tensor([1.0])}, {}, **kw, second_moment=FedYogi.second_moment)
    x2, s2 = adaptive_server_update(x1, {"w": x1["w"] + 1.0}, s1, **kw, second_moment=FedYogi.second_moment)
    adam2, adam_s2 = adaptive_server_update(x1, {"w": x1["w"] + 1.0}, s1, **kw, second_moment=FedAdam.second_moment)

    # Assert: round 1: v = 0 - 0.01 * 1 * sign(0 - 1) = 0.01, m = 0.1, step 0.1 * 0.1 / 0.1 = 0.1
    assert x1["w"].item() == pytest.approx(0.1) and s1["v"]["w"].item() == pytest.approx(0.01)
    # round 2: m = 0.09 + 0.1 = 0.19; Yogi v = 0.01 + 0.01 = 0.02 (v < d^2: it grows by (1 - beta2) d^2),
    # where Adam's is 0.99 * 0.01 + 0.01 = 0.0199
    assert s2["m"]["w"].item() == pytest.approx(0.19)
    assert s2["v"]["w"].item() == pytest.approx(0.02) and adam_s2["v"]["w"].item() == pytest.approx(0.0199)
    assert x2["w"].item() == pytest.approx(0.1 + 0.1 * 0.19 / math.sqrt(0.02))
    assert adam2["w"].item() == pytest.approx(0.1 + 0.1 * 0.19 / math.sqrt(0.0199))
    # and with the defaults, plain floats agree coordinate by coordinate (v above d^2: Yogi shrinks it)
    rule = Strategy(name="fedyogi").build()
    big = {"w": torch.tensor([0.5, -0.5], dtype=torch.float64)}
    start = {"w": torch.zeros(2, dtype=torch.float64)}
    y1, t1 = rule.server_step(start, big, {})
    y2, t2 = rule.server_step(y1, {"w": y1["w"] + 0.001}, t1)
    for i in range(2):
        e1, m1, v1 = yogi_step(0.0, big["w"][i].item(), 0.0, 1e-6, 0.01, 0.9, 0.99, 1e-3)
        assert y1["w"][i].item() == pytest.approx(e1, rel=1e-12)
        m1, v1 = t1["m"]["w"][i].item(), t1["v"]["w"][i].item()
        e2, _, v2 = yogi_step(y1["w"][i].item(), y1["w"][i].item() + 0.001, m1, v1, 0.01, 0.9, 0.99, 1e-3)
        assert y2["w"][i].item() == pytest.approx(e2, rel=1e-12)
        assert t2["v"]["w"][i].item() == pytest.approx(v2, rel=1e-6) and v2 < v1


def test_integer_buffers_are_not_optimised_and_dtypes_are_kept() -> None:
    g = {"w": torch.tensor([1.0], dtype=torch.bfloat16), "num_batches_tracked": torch.tensor(3)}
    avg = {"w": torch.tensor([2.0], dtype=torch.bfloat16), "num_batches_tracked": torch.tensor(7)}
    for name in ("fedadam", "fedyogi"):
        new, state = Strategy(name=name).build().server_step(g, avg, {})
        assert new["num_batches_tracked"].dtype == torch.int64 and int(new["num_batches_tracked"]) == 7
        assert new["w"].dtype == torch.bfloat16
        assert set(state["m"]) == set(state["v"]) == {"w"}  # counters have no moments
        assert state["m"]["w"].dtype == torch.float32


def test_a_diverged_average_is_refused_by_name() -> None:
    g = {"w": torch.tensor([1.0])}
    with pytest.raises(MicrofedError, match="'w' contains NaN"):
        Strategy(name="fedadam").build().server_step(g, {"w": torch.tensor([float("nan")])}, {})


def test_the_server_state_survives_a_safetensors_round_trip(tmp_path: Path) -> None:
    # Prepare: round 1's state, written as the round checkpoint and the server-state file hold it
    rule = Strategy(name="fedadam", server_lr=0.05).build()
    g = {"a.w": torch.tensor([[1.0, 2.0]]), "a.b": torch.tensor([0.5])}
    avg1 = {"a.w": torch.tensor([[1.5, 1.0]]), "a.b": torch.tensor([0.0])}
    x1, state1 = rule.server_step(g, avg1, {})
    write_safetensors(tmp_path / "state.safetensors", pack_server_state({"global": x1, **state1}), {})

    # Execute: round 2 uninterrupted, and from what the file holds
    avg2 = {"a.w": torch.tensor([[1.0, 1.0]]), "a.b": torch.tensor([1.0])}
    direct, direct_state = rule.server_step(x1, avg2, state1)
    parts = unpack_server_state(read_safetensors(tmp_path / "state.safetensors")[0])
    origin = parts.pop("global")
    resumed, resumed_state = rule.server_step(origin, avg2, parts)

    # Assert: bit for bit
    assert set(parts) == {"m", "v"}
    for key in g:
        assert torch.equal(direct[key], resumed[key]), key
        assert torch.equal(direct_state["v"][key], resumed_state["v"][key]), key


# -------------------------------------------------------------------------------------------- registry


def test_the_registry_names_the_strategies_and_their_defaults() -> None:
    assert tuple(REGISTRY) == STRATEGIES
    assert {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "ddp"} <= set(STRATEGIES)
    # server_lr 0 is the strategy's own default, written back into the configuration (records show the value)
    assert Strategy(name="fedavgm").server_lr == 1.0 and Strategy(name="fedadam").server_lr == 0.01
    assert Strategy(name="fedyogi", server_lr=0.5).server_lr == 0.5
    assert Strategy(name="fedadam", sync_every_steps=0).build().label() == "fedadam beta=0.9 lr=0.01"
    assert Strategy(name="fedprox").build().label() == "fedprox mu=0.01 sync=4"  # the default in-round average
    help_text = build_parser().format_help()
    assert all(name in help_text for name in STRATEGIES)
    with pytest.raises(MicrofedError, match="use one of fedavg, fedprox, fedavgm, fedadam, fedyogi, ddp"):
        Strategy(name="fedadagrad")
    with pytest.raises(MicrofedError, match=r"--fedbn applies to fedavg, .*fedyogi, not ddp"):
        Strategy(name="ddp", fedbn=True)


# --------------------------------------------------------------------------------------- real workers


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adaptive") / "shards"
    write_shards(
        synthetic_dataset(n_train=150, n_test=60), out, SplitConfig(workers=2, ratios=(1, 2), val_fraction=0.2)
    )
    return out


def test_a_resumed_fedadam_job_continues_with_the_same_server_state(tmp_path: Path) -> None:
    # Prepare: one worker in this process (no process group); the server step runs with one worker too
    shards = tmp_path / "shards"
    write_shards(synthetic_dataset(n_train=64, n_test=20), shards, SplitConfig(val_fraction=0.0, workers=1))
    env = DistEnv(rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1", master_port=0)

    def cfg(out: Path) -> WorkerConfig:
        return WorkerConfig(
            local_epochs=1,
            shards=str(shards),
            out=str(out),
            model="cnn-small",
            rounds=3,
            threads=1,
            optim=OPTIM,
            strategy=Strategy(name="fedadam", server_lr=0.05),
        )

    run_worker(cfg(tmp_path / "whole"), env)
    # a job that stopped during round 2: round 1's checkpoint is all it left
    run_worker(cfg(tmp_path / "cut"), env)
    cut = tmp_path / "cut"
    for name in ("checkpoints/round-00002.safetensors", micro_model_file(0), "worker-00000.json"):
        (cut / name).unlink()
    from microfed.training.checkpoint import checkpoint_uri, parse_checkpoint
    from microfed.training.storage import read_bytes

    uri = checkpoint_uri(str(cut), 1)
    assert {k.split(".", 1)[0] for k in parse_checkpoint(read_bytes(uri), uri).server} == {"m", "v"}

    # Execute
    record = run_worker(cfg(cut), env)

    # Assert: resumed after round 1, and the same model and server state as the uninterrupted job
    assert record["resumed_from_round"] == 1
    for name in (micro_model_file(0), "server-state.safetensors"):
        whole, _ = read_safetensors(tmp_path / "whole" / name)
        again, _ = read_safetensors(cut / name)
        assert whole.keys() == again.keys()
        assert all(torch.equal(whole[k], again[k]) for k in whole), name


@pytest.mark.integration
@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_two_workers_learn_with_an_adaptive_server(shards: Path, tmp_path: Path, name: str) -> None:
    # Execute: 2 workers, 3 rounds, through the local launcher, the aggregate and the evaluate steps
    cfg = WorkerConfig(
        shards=str(shards),
        out=str(tmp_path / "micro"),
        model="cnn-small",
        rounds=3,
        local_epochs=1,
        threads=1,
        optim=OPTIM,
        strategy=Strategy(name=name),
    )
    train_step(cfg, 2)
    agg = aggregate_step(tmp_path / "micro", tmp_path / "model")
    metrics = evaluate_step(tmp_path / "model", shards, tmp_path / "micro", tmp_path / "eval")

    # Assert: the server state of round 3's start went to the aggregate step, which applied the last server step
    state, meta = read_safetensors(tmp_path / "micro" / "server-state.safetensors")
    assert meta["strategy"] == name and {k.split(".", 1)[0] for k in state} == {"global", "m", "v"}
    assert agg["strategy"]["name"] == name and agg["strategy"]["server_lr"] == 0.01
    assert read_json(tmp_path / "micro" / "rounds.json")["server_state_file"] == "server-state.safetensors"
    assert metrics["accuracy"] > 0.5  # three classes: chance is a third
