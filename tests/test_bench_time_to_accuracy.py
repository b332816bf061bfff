"""benchmarks/time_to_accuracy.py's arithmetic: the settings it accepts, the bytes it counts per setting, the network
projection, the verdict over seeds and the table. Pure logic: nothing here trains."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import time_to_accuracy as tta


def test_settings_name_strategies() -> None:
    assert tta.strategy_of("fedavg").build().label() == "fedavg"
    assert tta.strategy_of("ddp").name == "ddp"
    assert tta.strategy_of("sync-16").build().label() == "fedavg sync=16"
    assert tta.strategy_of("sync-4-reset").build().label() == "fedavg sync=4 optimizer-state=reset"
    assert tta.strategy_of("sync-4+equal-steps").build().label() == "fedavg sync=4"
    assert (tta.batch_of("sync-4+equal-steps", 3), tta.batch_of("sync-4", 3), tta.batch_of("ddp+equal-steps", 8)) == (
        43,
        128,
        16,
    )
    for bad in ("sync", "sync-0", "sync-x", "sync-4-mean", "fedsgd"):
        with pytest.raises((SystemExit, Exception), match=r"sync|optimizer"):
            tta.strategy_of(bad)


def _run(**over: Any) -> dict[str, Any]:
    run = {
        "accuracy": 0.9,
        "round_accuracy": [0.90, 0.913, 0.915, 0.921],
        "round_epochs": [1, 2, 3, 4],
        "round_seconds": [10.0, 20.0, 30.0, 40.0],
        "seconds": 41.0,
        "shard_sizes": [300, 200, 100],
        "in_round_syncs": 12,
        "sync_bytes": 12 * 4000,
        "model_floats": 1000,
    }
    return {**run, **over}


def test_bytes_per_setting() -> None:
    # syncs as the worker measured them, plus 3 round-end float64 averages of 1,000 floats
    assert tta.allreduce_bytes(_run(), "sync-16", params=900) == {"bytes": 48000 + 3 * 8000, "collectives": 15}
    # ddp: one fp32 all-reduce of the trainable parameters per step; ceil(300 / 128) = 3 steps per epoch
    assert tta.allreduce_bytes(_run(), "ddp", params=900) == {"bytes": 4 * 900 * 3 * 4, "collectives": 12}
    # with a batch of 43: ceil(300 / 43) = 7 steps per epoch
    assert tta.allreduce_bytes(_run(), "ddp+equal-steps", params=900, batch=43)["collectives"] == 28


def test_projection_is_a_ring_all_reduce() -> None:
    one = tta.project(1.25e9, 0, 2)  # 2 workers send (2 - 1) / 2 * 2 = 1 payload: one second at 10 Gbit/s
    assert one == pytest.approx(1.0)
    assert tta.project(0, 100, 3) == pytest.approx(100 * 4 * tta.HOP_SECONDS)
    assert tta.project(1e6, 10, 1) == 0  # alone: nothing on the wire


def test_first_reaching_and_verdict_over_seeds() -> None:
    assert tta.first_reaching(_run(), 0.914) == (3, 30.0)
    assert tta.first_reaching(_run(), 0.95) == (None, None)
    assert tta.verdict([0.1, 0.4, 0.5], 0.5) == "met"
    assert tta.verdict([0.6, 0.7, 0.9], 0.5) == "missed"
    assert tta.verdict([0.3, 0.6, 0.7], 0.5) == "within noise"
    assert tta.verdict([3.0], None) is None


def test_summary_and_table() -> None:
    runs = [_run(accuracy=0.91), _run(accuracy=0.92, round_accuracy=[0.9, 0.91, 0.912, 0.913])]
    central = [{"accuracy": 0.922}, {"accuracy": 0.924}]
    row = tta.summarize(3, "stratified", "sync-16", runs, central, params=900)
    assert row["gaps"] == pytest.approx([1.2, 0.4])
    assert row["verdict"] == "within noise" and row["goal_points"] == 0.5
    assert row["to_target"]["91.4"] == {"epochs": [3, None], "seconds": [30.0, None]}
    row["epochs"] = 4
    table = tta.markdown([row])
    assert (
        "| 3, stratified, sync-16 (128) | 91.50% (91.00-92.00) | +0.80 (+0.40 to +1.20) | <= 0.5 | within noise "
        in table
    )
    # per seed; bytes: 48,000 in syncs + 3 float64 round averages of 1,000 floats, over 4 epochs
    assert "| 3 (30 s), - | 4 (40 s), - | 18,000 | " in table
    assert "assumed, not measured" in table


def test_the_centralized_row_sends_nothing_and_has_no_goal() -> None:
    runs = [_run(accuracy=0.92, shard_sizes=[600])]
    row = tta.summarize(1, "all data", "centralized", runs, [{"accuracy": 0.92}], params=900)
    assert row["gaps"] == [0.0] and row["verdict"] is None and row["strategy"] == "one process"
    assert row["allreduce_bytes_per_epoch"] == 0 and row["projected_network_s_per_epoch"] == 0
