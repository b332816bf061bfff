"""benchmarks/defaults.py: its two sides are the configurations it names, and its verdict and table follow the
runs. Pure logic: nothing here trains (the benchmark itself runs the pipeline)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import defaults as bench_defaults

from microfed.training.config import RunConfig
from microfed.training.strategies import Strategy


def test_the_sides_are_the_current_and_the_previous_defaults() -> None:
    now = RunConfig.from_flat(bench_defaults.SIDES["default"])
    assert now == RunConfig()
    assert now.loop.rounds * now.loop.local_epochs <= bench_defaults.MAX_EPOCHS  # the goal's epochs
    assert now.optim.for_workers(now.split.workers).batch_size == 43  # ceil(128 / 3)
    assert Strategy.from_config(now.strategy).sync_every_steps == 4
    before = RunConfig.from_flat(bench_defaults.SIDES["previous"])
    assert (before.loop.rounds, before.loop.local_epochs) == (4, 3)
    assert before.optim.for_workers(3).batch_size == 128
    assert Strategy.from_config(before.strategy).build().label() == "fedavg"  # round-end averages only


def _run(side: str, seed: int, accuracy: float, epochs: int = 9) -> dict[str, Any]:
    return {
        "side": side,
        "seed": seed,
        "epochs": epochs,
        "accuracy": accuracy,
        "wall_seconds": 100.0 + seed,
        "train_seconds": 80.0,
        "sync_bytes": 1e6,
        "batch_per_worker": 43 if side == "default" else 128,
    }


def test_the_verdict_needs_every_seed_to_reach_the_goal() -> None:
    met = bench_defaults.summarize([_run("default", 0, 0.925), _run("default", 1, 0.921), _run("previous", 0, 0.91)])
    assert met["default"]["verdict"] == "met"
    assert met["default"]["accuracy"] == {"median": 0.923, "min": 0.921, "max": 0.925}
    assert "verdict" not in met["previous"]
    noise = bench_defaults.summarize([_run("default", 0, 0.925), _run("default", 1, 0.919)])
    assert noise["default"]["verdict"] == "within noise"
    slow = bench_defaults.summarize([_run("default", 0, 0.93, epochs=12)])  # accurate, but too many epochs
    assert slow["default"]["verdict"] == "missed"


def test_the_table_names_each_sides_options() -> None:
    runs = [_run("default", 0, 0.9285), _run("previous", 0, 0.9191, epochs=12)]
    text = bench_defaults.markdown({"summary": bench_defaults.summarize(runs), "seeds": [0]})
    default_line, previous_line = text.splitlines()[2:4]
    assert default_line.startswith("| default | (none) | 9 | 43 | 92.85% (92.85-92.85) |")
    assert previous_line.startswith("| previous | --rounds 4 --batch-size 128 --sync-every-steps 0 | 12 | 128 | 91.91%")
    assert default_line.endswith("| met |")
