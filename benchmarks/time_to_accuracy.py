"""Time to accuracy by how often the workers average (issue 17, "close the accuracy gap").

Every setting trains cnn-fmnist on Fashion-MNIST for T epochs (T rounds of 1 local epoch: a test-accuracy point per
epoch) through the pipeline's own steps (`accuracy.run_federated`: write_shards, train_step's worker processes over
gloo, aggregate_step), for W in {3, 8} workers, stratified and Dirichlet 0.5 shards, and several seeds (the split's,
the initial weights' and the data order's). The settings, from rare to frequent averaging:

  fedavg        weights averaged at round ends only (once an epoch here)
  sync-K        also every K optimizer steps inside the round (--sync-every-steps K; local SGD)
  ddp           gradients all-reduced in every step (one model)

and `sync-K-average` / `sync-K-reset`: the same with the optimizer's state averaged or reset at each average
(--sync-optimizer). A `+equal-steps` suffix gives each worker a batch of ceil(128 / W) instead of 128, so that an
epoch takes as many sequential steps as centralized training's (the global batch is 128 as there). Centralized
training (1 worker, all data, batch 128, the same T epochs and seed) is the yardstick.

Each row reports, over the seeds: the final test accuracy (median, min-max), its gap to centralized at equal epochs
(per seed, then median and spread), the epochs and seconds until the global model first reaches 91.4% (the GKE
reference's accuracy) and 92.0%, and the bytes each worker put into all-reduces (payload, as the worker measured it
for the syncs; the round-end averages are float64 all-reduces of every float, ddp's one fp32 gradient all-reduce
per step). A cluster projection turns the bytes into network seconds per epoch under stated assumptions.

Goals (issue 17): within 0.5 points of centralized at equal epochs on stratified shards, within 1.0 on Dirichlet
0.5. Verdict over the seeds' gaps g_i: met if max g <= goal, missed if min g > goal, otherwise within noise.

    .venv/bin/python benchmarks/time_to_accuracy.py [--quick] [--seeds 0 1 2] [--workers 3 8]
        [--splits stratified dirichlet] [--settings fedavg sync-16 ddp] [--json F --markdown F]

Full default: 3 seeds x 2 worker counts x 2 splits x 6 settings + 3 centralized runs of 5 epochs on 60,000
examples, about 75 runs of 70-110 s on a quiet 2-core machine: 1.5-2 hours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy import FULL_EPOCHS, QUICK_EPOCHS, centralized, run_federated  # noqa: E402
from common import BATCH, FMNIST, fashion_mnist, round_end, write_atomic  # noqa: E402

from microfed.training.models import build_model  # noqa: E402
from microfed.training.shards import SplitConfig  # noqa: E402
from microfed.training.strategies import Strategy  # noqa: E402
from microfed.training.train import OptimConfig  # noqa: E402

TARGETS = (0.914, 0.920)
GOALS = {"stratified": 0.5, "dirichlet": 1.0}  # largest allowed gap to centralized, points
DEFAULT_SETTINGS = ("fedavg", "sync-64", "sync-16", "sync-4", "sync-1", "ddp")
# Cluster projection: ring all-reduce, each rank sends and receives 2 (W - 1) / W of the payload; a link of
# 10 Gbit/s (GKE's n2-standard-8 egress is 16 Gbit/s; 10 leaves room for other traffic) and 50 us per hop.
LINK_BYTES_S = 10e9 / 8
HOP_SECONDS = 50e-6


EQUAL_STEPS = "+equal-steps"


def batch_of(setting: str, workers: int) -> int:
    """Each worker's batch: 128, or ceil(128 / W) with the `+equal-steps` suffix."""
    return -(-BATCH // workers) if setting.endswith(EQUAL_STEPS) else BATCH


def strategy_of(setting: str) -> Strategy:
    """`fedavg`, `ddp`, `sync-K` or `sync-K-average` / `sync-K-reset`, each with an optional `+equal-steps`."""
    setting = setting.removesuffix(EQUAL_STEPS)
    if setting in ("fedavg", "ddp"):
        return round_end(setting)
    parts = setting.split("-")
    if parts[0] != "sync" or len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
        raise SystemExit(
            f"--settings {setting!r}: use fedavg, ddp, sync-K or sync-K-average / sync-K-reset (K >= 1), each "
            f"optionally followed by {EQUAL_STEPS}"
        )
    return Strategy(sync_every_steps=int(parts[1]), sync_optimizer=parts[2] if len(parts) == 3 else "local")


def first_reaching(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """(epochs, seconds) at the first epoch whose global test accuracy is >= target; (None, None) if none."""
    for acc, epochs, seconds in zip(run["round_accuracy"], run["round_epochs"], run["round_seconds"], strict=True):
        if acc >= target:
            return epochs, seconds
    return None, None


def allreduce_bytes(run: dict[str, Any], setting: str, params: int, batch: int = BATCH) -> dict[str, float]:
    """What one worker put into all-reduces over the run, and how many all-reduces: measured syncs, the round-end
    averages (float64, every float), or ddp's gradient all-reduce per step (fp32, the trainable parameters)."""
    epochs = run["round_epochs"][-1]
    if len(run["shard_sizes"]) == 1:  # one process: nothing to all-reduce
        return {"bytes": 0.0, "collectives": 0.0}
    if setting.removesuffix(EQUAL_STEPS) == "ddp":
        steps = math.ceil(max(run["shard_sizes"]) / batch) * epochs
        return {"bytes": 4.0 * params * steps, "collectives": float(steps)}
    combines = len(run["round_epochs"]) - 1
    return {
        "bytes": float(run["sync_bytes"] + 8 * run["model_floats"] * combines),
        "collectives": float(run["in_round_syncs"] + combines),
    }


def project(bytes_per_epoch: float, collectives_per_epoch: float, workers: int) -> float:
    """Network seconds per epoch on a cluster of `workers` nodes (ring all-reduce; LINK_BYTES_S, HOP_SECONDS)."""
    share = 2 * (workers - 1) / workers
    return share * bytes_per_epoch / LINK_BYTES_S + collectives_per_epoch * 2 * (workers - 1) * HOP_SECONDS


def verdict(gaps: list[float], goal: float | None) -> str | None:
    if goal is None:
        return None
    if max(gaps) <= goal:
        return "met"
    return "missed" if min(gaps) > goal else "within noise"


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(
    workers: int, split: str, setting: str, runs: list[dict[str, Any]], central: list[dict[str, Any]], params: int
) -> dict[str, Any]:
    """One row: a setting over the seeds, against centralized with the same seeds."""
    finals = [100 * r["accuracy"] for r in runs]
    gaps = [100 * c["accuracy"] - f for c, f in zip(central, finals, strict=True)]
    epochs = runs[0]["round_epochs"][-1]
    comm = [allreduce_bytes(r, setting, params, batch_of(setting, workers)) for r in runs]
    per_epoch = statistics.median(c["bytes"] for c in comm) / epochs
    collectives = statistics.median(c["collectives"] for c in comm) / epochs
    goal = GOALS.get(split)
    to = {}
    for t in TARGETS:
        hits = [first_reaching(r, t) for r in runs]
        to[f"{100 * t:.1f}"] = {"epochs": [h[0] for h in hits], "seconds": [h[1] for h in hits]}
    return {
        "row": f"time to accuracy, {workers} workers, {split}, {setting}",
        "kind": "time-to-accuracy",
        "workers": workers,
        "split": split,
        "setting": setting,
        "strategy": strategy_of(setting).build().label() if setting != "centralized" else "one process",
        "batch_size": batch_of(setting, workers),
        "seeds": len(runs),
        "accuracy": _spread(finals),
        "centralized_accuracy": _spread([100 * c["accuracy"] for c in central]),
        "gap_points": _spread(gaps),
        "gaps": gaps,
        "goal_points": goal,
        "verdict": verdict(gaps, goal),
        "to_target": to,
        "seconds": _spread([r["seconds"] for r in runs]),
        "allreduce_bytes_per_epoch": per_epoch,
        "allreduces_per_epoch": collectives,
        "projected_network_s_per_epoch": project(per_epoch, collectives, workers),
        "round_accuracy": [r["round_accuracy"] for r in runs],
        "round_seconds": [r["round_seconds"] for r in runs],
        "shard_sizes": [r["shard_sizes"] for r in runs],
    }


def measure(
    *,
    quick: bool,
    seeds: list[int],
    workers: list[int],
    splits: list[str],
    settings: list[str],
    device: str,
    on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
) -> list[dict[str, Any]]:
    """Every row; `on_row` gets the rows so far after each (the results are written as they come: a long matrix
    that stops part-way keeps what it measured)."""
    epochs, n_train, n_test = (QUICK_EPOCHS, 6000, 2000) if quick else (FULL_EPOCHS, 0, 0)
    dataset = fashion_mnist(n_train, n_test)
    params = sum(p.numel() for p in build_model(FMNIST).parameters() if p.requires_grad)
    started = time.perf_counter()

    def progress(label: str, run: dict[str, Any]) -> None:
        curve = ", ".join(f"{100 * a:.2f}" for a in run["round_accuracy"])
        print(
            f"[time-to-accuracy] {label}: {curve} in {run['seconds']:.0f} s "
            f"({time.perf_counter() - started:.0f} s so far)",
            file=sys.stderr,
            flush=True,
        )

    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        central = []
        for seed in seeds:
            central.append(centralized(dataset, epochs=epochs, tmp=tmp, seed=seed, device=device))
            progress(f"centralized, seed {seed}", central[-1])
        rows.append(summarize(1, "all data", "centralized", central, central, params))
        rows[-1]["examples"] = {"train": dataset.train.labels.numel(), "test": dataset.test.labels.numel()}
        rows[-1]["epochs"] = epochs
        for w in workers:
            for split in splits:
                for entry in settings:
                    only, _, setting = entry.rpartition(":")
                    if only and only != split:
                        continue
                    runs = []
                    for seed in seeds:
                        config = SplitConfig(workers=w, split=split, alpha=0.5, seed=seed, val_fraction=0.0)
                        runs.append(
                            run_federated(
                                dataset,
                                workers=w,
                                split=config,
                                rounds=epochs,
                                local_epochs=1,
                                tmp=tmp,
                                seed=seed,
                                device=device,
                                strategy=strategy_of(setting),
                                optim=OptimConfig(batch_size=batch_of(setting, w)),
                            )
                        )
                        progress(f"{w} workers, {split}, {setting}, seed {seed}", runs[-1])
                    rows.append(summarize(w, split, setting, runs, central, params))
                    rows[-1]["examples"] = {"train": dataset.train.labels.numel(), "test": dataset.test.labels.numel()}
                    rows[-1]["epochs"] = epochs
                    on_row(rows)
    return rows


def _epochs_cell(hits: dict[str, list[Any]]) -> str:
    """Per seed: `epochs (seconds)`, or `-` where the seed did not reach the target."""
    if all(e is None for e in hits["epochs"]):
        return "not reached"
    return ", ".join(
        "-" if e is None else f"{e} ({s:.0f} s)" for e, s in zip(hits["epochs"], hits["seconds"], strict=True)
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workers, split, setting (batch per worker) | final accuracy, median (min-max) "
        "| gap to centralized, points | goal | verdict "
        "| epochs (s) to 91.4%, per seed | epochs (s) to 92.0%, per seed | all-reduce bytes/epoch per worker "
        "| projected network s/epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, g = r["accuracy"], r["gap_points"]
        goal = f"<= {r['goal_points']:g}" if r["goal_points"] is not None else "reported"
        lines.append(
            f"| {r['workers']}, {r['split']}, {r['setting']} ({r['batch_size']}) "
            f"| {a['median']:.2f}% ({a['min']:.2f}-{a['max']:.2f}) "
            f"| {g['median']:+.2f} ({g['min']:+.2f} to {g['max']:+.2f}) | {goal} | {r['verdict'] or ''} "
            f"| {_epochs_cell(r['to_target']['91.4'])} | {_epochs_cell(r['to_target']['92.0'])} "
            f"| {r['allreduce_bytes_per_epoch']:,.0f} | {r['projected_network_s_per_epoch']:.3f} |"
        )
    if rows:
        c = rows[0]["centralized_accuracy"]
        lines += [
            "",
            f"Centralized, {rows[0]['epochs']} epochs: {c['median']:.2f}% ({c['min']:.2f}-{c['max']:.2f}) over "
            f"{rows[0]['seeds']} seeds. Projection: ring all-reduce at {LINK_BYTES_S * 8 / 1e9:g} Gbit/s and "
            f"{HOP_SECONDS * 1e6:g} us per hop (assumed, not measured).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="6,000 / 2,000 examples, 2 epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, nargs="+", default=[3, 8])
    p.add_argument("--splits", nargs="+", choices=["stratified", "dirichlet"], default=["stratified", "dirichlet"])
    p.add_argument(
        "--settings",
        nargs="+",
        default=list(DEFAULT_SETTINGS),
        help="settings for every split; SPLIT:SETTING runs SETTING on that split only",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--render", type=Path, help="print the table of a results JSON this wrote, and measure nothing")
    p.add_argument("--json", type=Path, default=HERE / "results-time-to-accuracy.json")
    p.add_argument("--markdown", type=Path, default=HERE / "results-time-to-accuracy.md")
    args = p.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text(encoding="utf-8"))["rows"]), end="")
        return 0
    for s in args.settings:
        only, _, setting = s.rpartition(":")
        if only and only not in args.splits:
            raise SystemExit(f"--settings {s!r}: {only!r} is not one of --splits {' '.join(args.splits)}")
        strategy_of(setting)
    started = time.perf_counter()

    def write(rows: list[dict[str, Any]], complete: bool = False) -> None:
        info = {
            "seconds": time.perf_counter() - started,
            "load_average": os.getloadavg(),
            "quick": args.quick,
            "complete": complete,
            "argv": sys.argv[1:] if argv is None else argv,
        }
        write_atomic(args.json, json.dumps({"info": info, "rows": rows}, indent=1))
        write_atomic(args.markdown, markdown(rows))

    rows = measure(
        quick=args.quick,
        seeds=args.seeds,
        workers=args.workers,
        splits=args.splits,
        settings=args.settings,
        device=args.device,
        on_row=write,
    )
    write(rows, complete=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
