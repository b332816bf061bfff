"""benchmarks/ method (issue 17): interleaved repeats, per-pair ratios, verdicts, the --device and --repeats checks,
and reference numbers kept out of the measured columns. Pure logic: nothing here trains or starts a process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench
import common
import peer_ddp
from common import MIN_REPEATS, Settings, SettingsError, interleave, pair_ratios, row, spread, verdict


def test_pair_ratios_are_ours_relative_to_the_alternative_higher_is_better() -> None:
    assert pair_ratios([4.0, 6.0], [2.0, 3.0]) == [2.0, 2.0]  # throughputs: ours / alternative
    assert pair_ratios([2.0, 4.0], [4.0, 4.0], higher_is_better=False) == [2.0, 1.0]  # seconds: alternative / ours
    with pytest.raises(ValueError, match="as many samples"):
        pair_ratios([1.0, 2.0], [1.0])


def test_spread_is_median_min_max() -> None:
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert spread([1.0, 2.0, 3.0, 10.0])["median"] == 2.5


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ([1.0, 1.1, 1.2], "met"),  # the worst pair reaches the goal (>=, inclusive)
        ([0.5, 0.9, 0.99], "missed"),  # the best pair falls short
        ([0.9, 1.05, 1.1], "within noise"),  # the pairs straddle the goal
        ([0.8, 1.0, 0.9], "within noise"),  # the best pair exactly at the goal is not "missed"
    ],
)
def test_verdict(ratios: list[float], expected: str) -> None:
    assert verdict(ratios, 1.0) == expected


def test_verdict_of_an_unrepeated_timing() -> None:
    assert verdict([5.0], 1.0, repeated=False) == "not repeated"


def test_a_ceiling_goal_uses_the_same_rule() -> None:
    # orchestration: pipeline <= 1.15x the in-process time, as in-process / pipeline >= 1/1.15
    goal = round(1 / 1.15, 2)
    assert row("o", [100.0, 110.0, 120.0], [100.0] * 3, "s", goal, "", higher_is_better=False)["verdict"] == (
        "within noise"  # ratios 1.0, 0.91, 0.83
    )
    assert row("o", [100.0, 105.0, 110.0], [100.0] * 3, "s", goal, "", higher_is_better=False)["verdict"] == "met"
    assert row("o", [120.0, 125.0, 130.0], [100.0] * 3, "s", goal, "", higher_is_better=False)["verdict"] == "missed"


def test_interleave_calls_the_legs_a_b_a_b_a_b() -> None:
    calls: list[str] = []

    def leg(name: str, value: float) -> Any:
        def run() -> float:
            calls.append(name)
            return value + len(calls)

        return run

    samples = interleave({"A": leg("A", 0.0), "B": leg("B", 100.0)}, 3)
    assert calls == ["A", "B", "A", "B", "A", "B"]
    assert samples == {"A": [1.0, 3.0, 5.0], "B": [102.0, 104.0, 106.0]}


def test_row_keeps_medians_spreads_every_sample_and_a_verdict_not_met() -> None:
    # pairs: 10/5, 12/4, 8/8 -> ratios 2, 3, 1: the median of the ratios, not the ratio of the medians (10/5)
    r = row("x", [10.0, 12.0, 8.0], [5.0, 4.0, 8.0], "img/s", 1.5, "n")
    assert (r["ours"], r["alternative"], r["ratio"]) == (10.0, 5.0, 2.0)
    assert r["ours_spread"] == [8.0, 12.0] and r["alternative_spread"] == [4.0, 8.0] and r["ratio_spread"] == [1.0, 3.0]
    assert r["samples"] == {"ours": [10.0, 12.0, 8.0], "alternative": [5.0, 4.0, 8.0], "ratio": [2.0, 3.0, 1.0]}
    assert r["verdict"] == "within noise" and r["repeats"] == 3
    assert "met" not in r


def test_a_timing_with_fewer_repeats_is_not_repeated_and_a_single_number_is_judged() -> None:
    assert row("t", [2.0], [1.0], "img/s", 1.0, "")["verdict"] == "not repeated"
    # not a timing (an accuracy): one value, judged by the same rule
    assert row("acc", 90.0, 92.0, "%", 0.99, "")["verdict"] == "missed"
    assert row("acc", 91.9, 92.0, "%", 0.99, "")["verdict"] == "met"


def test_repeats_at_least_three_and_one_only_with_quick() -> None:
    assert Settings().repeats == MIN_REPEATS
    assert Settings(quick=True, repeats=1).repeats == 1
    for quick, repeats in ((False, 1), (False, 2), (True, 2), (True, 0)):
        with pytest.raises(SettingsError, match="--repeats"):
            Settings(quick=quick, repeats=repeats)


def test_bench_refuses_repeats_1_without_quick(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench.settings_from(["--repeats", "1"])
    assert e.value.code == 2
    assert "--repeats 1" in capsys.readouterr().err


def test_device_cuda_without_cuda_exits_naming_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda", "--only", "aggregation", "--json", "/dev/null", "--markdown", "/dev/null"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "no CUDA device" in err


def test_device_defaults_to_cpu() -> None:
    _, s = bench.settings_from([])
    assert s.device == "cpu" and s.torch_device == torch.device("cpu")


def test_reference_numbers_stay_out_of_the_measured_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        common, "MEASURED", {"single_img_s": 9000.0, "shard_bytes_per_example": 792.0, "micro_model_bytes": 1.7e6}
    )
    monkeypatch.setattr(bench, "MEASURED", common.MEASURED)
    (projection,) = bench.cluster(Settings(quick=True))
    ref = projection["reference"]
    assert ref["source"] and all(e["source"] for e in ref["epoch_s_by_nodes"])
    assert {e["nodes"]: e["value"] for e in ref["epoch_s_by_nodes"]} == {1: 75.4, 3: 35.1}
    assert all(
        set(t) == {"workers", "epoch_s", "all_reduce_s", "total_warm_s", "total_cold_s"} for t in projection["table"]
    )
    # a timed row with a reference: the reference is its own field, the columns are this run's samples only
    timed = row("r", [2.0, 2.0, 2.0], [1.0, 1.0, 1.0], "s", 1.0, "", reference=common.reference(75.4, "s", "GKE"))
    assert (timed["ours"], timed["alternative"]) == (2.0, 1.0)
    assert timed["reference"] == {"value": 75.4, "unit": "s", "source": "GKE"}
    text = bench.markdown(
        [timed, projection], {"commit": "c", "cpu": "cpu", "cores": 2, "capability": "x", "torch": "t"}, True
    )
    assert "Reference numbers (not measured in this run)" in text and "| r | 75.4 s | GKE |" in text
    assert "Reference, not measured here (source: " in text and "| seconds per epoch, 1 node | 75.4 |" in text
    measured_table = text.split("Reference numbers")[0]
    assert "75.4" not in measured_table


def test_markdown_shows_median_spread_ratio_range_and_verdict() -> None:
    r = row("data path, x", [3000.0, 3600.0, 3300.0], [2000.0, 2400.0, 2200.0], "img/s", 1.5, "note")
    text = bench.markdown([r], {"commit": "c", "cpu": "cpu", "cores": 2, "capability": "x", "torch": "t"}, False)
    assert (
        "| data path, x | 3,300 img/s (3,000-3,600) | 2,200 img/s (2,000-2,400) | 1.50x [1.50-1.50] | >= 1.5x | met |"
        in text
    )


def test_ddp_peer_splits_indices_as_distributed_sampler_does() -> None:
    from torch.utils.data import DistributedSampler

    for n, world in ((10, 3), (9, 3), (2, 3)):
        data = torch.utils.data.TensorDataset(torch.arange(n))
        for epoch in (0, 1):
            for rank in range(world):
                sampler: DistributedSampler[Any] = DistributedSampler(
                    data, num_replicas=world, rank=rank, shuffle=True, seed=7
                )
                sampler.set_epoch(epoch)
                assert peer_ddp.rank_indices(n, world, rank, 7, epoch).tolist() == list(sampler)


def test_accuracy_rows_keep_working_and_get_a_verdict() -> None:
    import accuracy

    fed = {"accuracy": 0.90, "round_accuracy": [0.85, 0.90], "seconds": 10.0, "shard_sizes": [2, 2, 2]}
    fed |= {"alpha": None, "rounds": 2, "local_epochs": 1, "round_seconds": [5.0, 10.0]}
    cen = {"accuracy": 0.92, "seconds": 8.0}
    goal = accuracy.Config(3, "stratified", 0.5, False, 0.5)
    reported = accuracy.Config(3, "dirichlet", 0.1, False, None)
    rows = [accuracy._accuracy_row(c, fed, cen, 2) for c in (goal, reported)]
    assert [r["verdict"] for r in rows] == ["missed", "reported"]
    text = bench.markdown(rows, {"commit": "c", "cpu": "cpu", "cores": 2, "capability": "x", "torch": "t"}, True)
    assert "| +2.00 | <= 0.5 | **missed** |" in text
