"""`make bench`: microfed measured side by side with what people use instead, in one run, as ratios.

These machines are noisy and have no GPU, so every row runs ours and the alternative in the same process,
back to back, and reports the ratio; absolute numbers only describe this machine. Rows:

  data-path     training images/s from our uint8 shards vs torchvision ImageFolder + DataLoader on the same
                PNGs (same model, batch and compute), end to end (our one-time decode included) and loader alone
  compute       our train loop (channels_last, bf16 autocast where the CPU has it) vs a plain eager fp32 loop;
                achieved GFLOP/s against a matrix-multiply peak measured in the same run
  aggregation   GB/s of weighted_average vs a tensor copy of the same bytes
  orchestration `microfed run` (kfp.local) wall time vs the same steps called in one process; fixed cost per step
  parallel      2 local workers (cores/2 threads each) vs one process on all cores, same data and epochs
  peers         the same federated setup run by Flower's FedAvg (simulation) and by torchrun DDP
                (benchmarks/peers.py; Flower in its own .venv-flower)
  accuracy      FedAvg test accuracy (3/8 workers; stratified, Dirichlet 0.5/0.1; one-shot, multi-round) vs
                centralized training with the same epochs; epochs and seconds to 91.4% (benchmarks/accuracy.py)
  strategies    every registered strategy (training/strategies.py) vs fedavg on Dirichlet 0.5 and 0.1 shards
  cluster       a projection of wall time for 1-64 workers on a cluster from this run's numbers (a table, with
                its assumptions; no side-by-side timing)

    python benchmarks/bench.py [--quick] [--only ROW ...] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from microfed.training.aggregation import weighted_average
from microfed.training.datasets import load_dataset
from microfed.training.layout import GLOBAL_MODEL_FILE, shard_files
from microfed.training.models import ModelConfig, build_model
from microfed.training.resources import estimate_memory
from microfed.training.shards import SplitConfig, load_shard, subsample, write_shards
from microfed.training.train import OptimConfig, Preprocess, autocast_dtype, make_optimizer, make_scheduler, train_epoch
from microfed.training.worker import WorkerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import accuracy, strategies
from accuracy import markdown as accuracy_markdown
from common import BATCH, FMNIST, MEASURED, fashion_mnist, row, timed
from peers import peers

# --------------------------------------------------------------------------------------------- data path


def _png_folder(data: Any, root: Path) -> Path:
    """The images as PNG files in ImageFolder's layout (class folders), as a user would have them."""
    from PIL import Image

    for i, (img, y) in enumerate(zip(data.images, data.labels, strict=True)):
        folder = root / "train" / data.class_names[int(y)].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i:06d}.png")
    # the layout needs a test/ split; one image per class keeps it from costing anything. Not a training image:
    # the loader refuses a test image that is a copy of a training one (it would leak the test set).
    for k, name in enumerate(data.class_names):
        folder = root / "test" / name.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        flat = np.full(data.images[0][0].shape, 7 + 23 * k, dtype=np.uint8)
        Image.fromarray(flat, mode="L").save(folder / "0.png")
    return root


def _fresh_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(FMNIST).to(memory_format=torch.channels_last)
    return model, make_optimizer(model, OptimConfig())


def _torchvision_epoch(folder: Path, workers: int) -> tuple[float, float]:
    """(seconds for one training epoch, seconds for the loader alone) through ImageFolder + DataLoader."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Grayscale(), transforms.ToTensor(), transforms.Normalize([0.286], [0.353])])
    ds = datasets.ImageFolder(str(folder / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers)
    loader_only = timed(lambda: [None for _ in loader])
    model, opt = _fresh_model()

    def epoch() -> None:
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return timed(epoch), loader_only


def data_path(quick: bool) -> list[dict[str, Any]]:
    n = 3000 if quick else 12000
    train = subsample(load_dataset("fashion-mnist").train, n, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _png_folder(train, Path(tmp) / "pngs")
        # ours: decode the PNG tree once (the split step), then train from the uint8 shard
        split_s = timed(
            lambda: write_shards(
                load_dataset(str(folder)), Path(tmp) / "shards", SplitConfig(workers=1, val_fraction=0.0)
            )
        )
        shard = load_shard(Path(tmp) / "shards", 0)
        pre = Preprocess([0.286], [0.353], torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        ours_loader = timed(lambda: [pre(shard.images[i : i + BATCH]) for i in range(0, n, BATCH)])
        model, opt = _fresh_model()
        sched = make_scheduler(opt, OptimConfig(schedule="constant"), 10**6)
        ours_epoch = timed(
            lambda: train_epoch(
                model,
                shard.images,
                shard.labels,
                preprocess=pre,
                optimizer=opt,
                scheduler=sched,
                batch_size=BATCH,
                generator=g,
            )
        )
        theirs = min((_torchvision_epoch(folder, w) for w in (0, 1)), key=lambda t: t[0])
    epochs = 3
    ours_e2e = epochs * n / (split_s + epochs * ours_epoch)
    theirs_e2e = epochs * n / (epochs * theirs[0])
    return [
        row(
            "data path, end to end (3 epochs)",
            ours_e2e,
            theirs_e2e,
            "img/s",
            1.5,
            f"{n} Fashion-MNIST PNGs; ours includes the one-time decode ({split_s:.1f} s); same model and fp32 compute",
        ),
        row(
            "data path, loader alone",
            n / ours_loader,
            n / theirs[1],
            "img/s",
            20.0,
            "batches of normalised tensors; theirs: the faster of num_workers 0 and 1",
        ),
    ]


# --------------------------------------------------------------------------------------------- compute


def _matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    reps = 5
    s = timed(lambda: [torch.mm(a, b) for _ in range(reps)], repeat=3)
    return 2 * n**3 * reps / s / 1e9


def _plain_fp32_epoch(images: torch.Tensor, labels: torch.Tensor) -> float:
    torch.manual_seed(0)
    model = build_model(FMNIST)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_all = (images.float() / 255 - 0.286) / 0.353

    def epoch() -> None:
        for i in range(0, labels.numel(), BATCH):
            loss = F.cross_entropy(model(x_all[i : i + BATCH]), labels[i : i + BATCH])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return timed(epoch, repeat=2)


def _our_epoch(train: Any, amp: torch.dtype | None) -> float:
    """Seconds of one epoch of our train loop (channels_last, batched preprocessing) at precision `amp`."""
    cpu = torch.device("cpu")
    model, opt = _fresh_model()
    sched = make_scheduler(opt, OptimConfig(schedule="constant"), 10**6)
    pre = Preprocess([0.286], [0.353], cpu)
    g = torch.Generator().manual_seed(0)
    return timed(
        lambda: train_epoch(
            model,
            train.images,
            train.labels,
            preprocess=pre,
            optimizer=opt,
            scheduler=sched,
            batch_size=BATCH,
            generator=g,
            amp_dtype=amp,
        ),
        repeat=2,
    )


def compute(quick: bool) -> list[dict[str, Any]]:
    n = 4000 if quick else 20000
    train = subsample(load_dataset("fashion-mnist").train, n, seed=0)
    amp = autocast_dtype("auto", torch.device("cpu"))
    ours = _our_epoch(train, amp)
    plain = _plain_fp32_epoch(train.images, train.labels)
    flops = estimate_memory(FMNIST, batch_size=BATCH, optimizer="adam", shard_examples=n).train_flops_per_example
    fp32_peak, bf16_peak = _matmul_peak(torch.float32), _matmul_peak(torch.bfloat16)
    peaks = f"peaks: fp32 {fp32_peak:.0f}, bf16 {bf16_peak:.0f} GFLOP/s (2048^2 matmul)"
    work = f"training FLOPs {flops / 1e6:.1f} M/example (forward x3)"
    rows = [
        row(
            "compute, train loop vs eager fp32",
            n / ours,
            n / plain,
            "img/s",
            1.2,
            f"cnn-fmnist, batch {BATCH}, {torch.get_num_threads()} threads; ours: channels_last + "
            f"{'bf16 autocast' if amp else 'fp32'}",
        )
    ]
    # Like with like: each precision's loop against that precision's matmul peak, never bf16 against fp32's.
    fp32_ours = ours if amp is None else _our_epoch(train, None)
    rows.append(
        row(
            "compute, fp32 train loop, share of fp32 matmul peak",
            flops * n / fp32_ours / 1e9,
            fp32_peak,
            "GFLOP/s",
            0.45,
            f"{work}; {peaks}",
        )
    )
    if amp is not None:
        rows.append(
            row(
                "compute, bf16 train loop, share of bf16 matmul peak",
                flops * n / ours / 1e9,
                bf16_peak,
                "GFLOP/s",
                0.45,
                f"{work}; {peaks}",
            )
        )
    return rows


# --------------------------------------------------------------------------------------------- aggregation


def aggregation(quick: bool) -> list[dict[str, Any]]:
    k = 4 if quick else 8
    arch = ModelConfig(name="resnet18", num_classes=10, in_channels=3, image_size=(32, 32))
    states = []
    for i in range(k):
        torch.manual_seed(i)
        states.append({n: t.clone() for n, t in build_model(arch).state_dict().items()})
    nbytes = sum(t.numel() * t.element_size() for s in states for t in s.values())
    ours = timed(lambda: weighted_average(states, [float(i + 1) for i in range(k)]), repeat=3)
    flat = [torch.cat([t.reshape(-1).float() for t in s.values()]) for s in states]
    copy = timed(lambda: [f.clone() for f in flat], repeat=3)
    return [
        row(
            "aggregation, weighted_average vs copy",
            nbytes / ours / 1e9,
            nbytes / copy / 1e9,
            "GB/s",
            0.5,
            f"{k} resnet18 micro-models, {nbytes / 1e6:.0f} MB read",
        )
    ]


# --------------------------------------------------------------------------------------------- orchestration

_TASK_STEP = {"split-dataset": "split", "train": "train", "aggregate": "aggregate", "evaluate": "evaluate"}
_KFP_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) - INFO - (Executing task|Task) '([\w-]+)'")


def _task_walls(kfp_log: Path) -> dict[str, float]:
    """Wall seconds of each kfp.local task, from the "Executing task" / "Task ... finished" lines of its log."""
    started: dict[str, float] = {}
    walls: dict[str, float] = {}
    for line in kfp_log.read_text(errors="replace").splitlines():
        m = _KFP_LINE.match(re.sub(r"\x1b\[[0-9;]*m", "", line))
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
        if m[4] == "Executing task":
            started[m[5]] = t
        elif m[5] in started:
            walls[m[5]] = (t - started[m[5]]) % 86400  # a run across midnight
    return walls


def _in_process(arguments: dict[str, Any], tmp: Path) -> dict[str, float]:
    """The pipeline's steps called directly, in order, in this process; seconds of each."""
    from microfed.training.step_aggregate import aggregate_step
    from microfed.training.step_evaluate import evaluate_step
    from microfed.training.step_export import export_step
    from microfed.training.step_split import SplitOptions, split_step
    from microfed.training.step_train import train_step

    a = arguments
    shards, micro, model, report, exported = (tmp / d for d in ("shards", "micro", "model", "report", "exported"))
    seconds: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        seconds["split"] = timed(
            lambda: split_step(
                SplitOptions(source=a["dataset"], train_limit=a["train_limit"], test_limit=a["test_limit"]),
                SplitConfig(workers=a["workers"], seed=0, val_fraction=0.0),
                shards,
            )
        )
        cfg = WorkerConfig(
            shards=str(shards),
            out=str(micro),
            model=a["model"],
            rounds=a["rounds"],
            local_epochs=a["local_epochs"],
            seed=0,
            optim=OptimConfig(),
        )
        seconds["train"] = timed(lambda: train_step(cfg, a["workers"]))
        seconds["aggregate"] = timed(lambda: aggregate_step(micro, model))
        seconds["evaluate"] = timed(lambda: evaluate_step(model, shards, micro, report))
        seconds["export"] = timed(lambda: export_step(model, shards, exported))
    MEASURED["micro_model_bytes"] = float((model / GLOBAL_MODEL_FILE).stat().st_size)
    return seconds


def orchestration(quick: bool) -> list[dict[str, Any]]:
    from microfed.pipelines.local_run import run_local

    arguments: dict[str, Any] = {
        "dataset": "fashion-mnist",
        "model": "cnn-fmnist",
        "workers": 3,
        "rounds": 2,
        "local_epochs": 1 if quick else 3,
        "train_limit": 6000 if quick else 0,
        "test_limit": 2000 if quick else 0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        direct = _in_process(arguments, Path(tmp) / "direct")
        inproc_s = sum(direct.values())
        start = time.perf_counter()
        result = run_local(arguments, runs_dir=Path(tmp) / "runs", name="bench", quiet=True)
        pipeline_s = time.perf_counter() - start
        walls = _task_walls(result.run_dir / "kfp.log")
    own = result.metrics["timings"]
    # fixed cost of a step: its kfp.local task's wall time minus the step's own time (export records none:
    # the same step's time in the in-process run stands in)
    fixed = {
        task: round(wall - (own[_TASK_STEP[task]] if task in _TASK_STEP else direct.get(task, 0.0)), 2)
        for task, wall in walls.items()
    }
    # compile, kfp.local setup and collecting the run folder: pipeline time outside any task
    fixed["outside tasks"] = round(pipeline_s - sum(walls.values()), 2)
    size = "6000/2000 examples, 2 rounds x 1 epoch" if quick else "60000/10000 examples, 2 rounds x 3 epochs"
    return [
        row(
            "orchestration, microfed run vs steps in one process",
            pipeline_s,
            inproc_s,
            "s",
            round(1 / 1.15, 2),
            f"fashion-mnist, cnn-fmnist, 3 local workers, {size}; both run split, train (worker processes), "
            f"aggregate, evaluate, export; fixed cost per step (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in fixed.items()),
            higher_is_better=False,
            fixed_cost_s=fixed,
            in_process_s=direct,
            pipeline_timings_s=own,
        )
    ]


# --------------------------------------------------------------------------------------------- parallel


def _train_throughput(shards: Path, out: Path, workers: int, examples: int, epochs: int) -> dict[str, float]:
    """images/s of the train step (worker processes started and joined) and of the training epochs alone."""
    from microfed.training.step_train import train_step

    cfg = WorkerConfig(
        shards=str(shards),
        out=str(out),
        model="cnn-fmnist",
        rounds=1,
        local_epochs=epochs,
        seed=0,
        optim=OptimConfig(),
        eval_every_round=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        record = train_step(cfg, workers)
    epoch_s = max(sum(e["seconds"] for r in w["rounds"] for e in r["epochs"]) for w in record["workers"])
    return {"step": examples * epochs / record["seconds"], "epochs": examples * epochs / epoch_s}


def parallel(quick: bool) -> list[dict[str, Any]]:
    n, epochs = (8000, 2) if quick else (30000, 2)
    dataset = fashion_mnist(n, 500)
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 2):
            write_shards(dataset, Path(tmp) / f"shards{k}", SplitConfig(workers=k, seed=0, val_fraction=0.0))
        # interleaved and best of 2: other load on a shared machine only slows a run down
        runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for _ in range(2):
            for k in (1, 2):
                micro = Path(tmp) / f"micro{k}-{len(runs[k])}"
                runs[k].append(_train_throughput(Path(tmp) / f"shards{k}", micro, k, n, epochs))
        t = {k: {key: max(r[key] for r in rs) for key in ("step", "epochs")} for k, rs in runs.items()}
        shard_bytes = (Path(tmp) / "shards1" / shard_files(0).tensors).stat().st_size
    MEASURED["single_img_s"] = t[1]["epochs"]
    MEASURED["shard_bytes_per_example"] = shard_bytes / n
    cores = os.cpu_count() or 1
    return [
        row(
            "parallel efficiency, 2 workers vs 1 process",
            t[2]["step"],
            t[1]["step"],
            "img/s",
            0.9,
            f"{n} examples x {epochs} epochs, train step wall time (process start included), best of 2; 2 workers x "
            f"{max(1, cores // 2)} threads vs 1 x {cores}; training epochs alone: "
            f"{t[2]['epochs']:.0f} vs {t[1]['epochs']:.0f} img/s ({t[2]['epochs'] / t[1]['epochs']:.2f}x)",
            epochs_only_ratio=t[2]["epochs"] / t[1]["epochs"],
        )
    ]


# --------------------------------------------------------------------------------------------- cluster

REFERENCE_EPOCH_S = {1: 75.4, 3: 35.1}  # the GKE reference platform, Fashion-MNIST, seconds per epoch
CLUSTER_ASSUMPTIONS = {
    "pod_start_s": 45.0,  # image pull from a warm node cache + Python/torch import: 30-60 s
    "node_scale_up_s": 240.0,  # node pool from zero: 3-5 min; 0 when the nodes are warm
    "gcs_bytes_per_s": 100e6,  # per pod, shard download and micro-model upload
    "network_bytes_per_s": 10e9 / 8,  # 10 Gb/s between pods, ring all-reduce of the model once per round
    "all_reduce_latency_s": 0.5e-3,  # per ring hop
    "train_examples": 60000,
    "rounds": 2,
    "local_epochs": 2,
}


def _project(workers: int, img_s: float, shard_bpe: float, model_bytes: float, cold: bool) -> dict[str, float]:
    a = CLUSTER_ASSUMPTIONS
    n_k = a["train_examples"] / workers
    epoch = n_k / img_s  # each pod has the cores this machine has (one worker per pod)
    ring = (
        2 * (workers - 1) / workers * model_bytes / a["network_bytes_per_s"]
        + 2 * (workers - 1) * a["all_reduce_latency_s"]
    )
    rounds = a["rounds"]
    total = (
        (a["node_scale_up_s"] if cold else 0.0)
        + a["pod_start_s"]
        + n_k * shard_bpe / a["gcs_bytes_per_s"]  # download the shard
        + rounds * a["local_epochs"] * epoch
        + (rounds - 1) * ring  # rounds 1..R-1 average inside the job
        + model_bytes / a["gcs_bytes_per_s"]  # upload the micro-model
        + a["pod_start_s"]  # aggregate step's pod
        + workers * model_bytes / a["gcs_bytes_per_s"]  # which downloads every micro-model
    )
    return {"epoch_s": epoch, "all_reduce_s": ring, "total_s": total}


def cluster(quick: bool) -> list[dict[str, Any]]:
    if "single_img_s" not in MEASURED:
        parallel(quick)
    if "micro_model_bytes" not in MEASURED:
        state = build_model(FMNIST).state_dict()
        MEASURED["micro_model_bytes"] = float(sum(t.numel() * t.element_size() for t in state.values()))
    img_s, bpe, mb = MEASURED["single_img_s"], MEASURED["shard_bytes_per_example"], MEASURED["micro_model_bytes"]
    table = []
    for w in (1, 2, 3, 4, 8, 16, 32, 64):
        warm = _project(w, img_s, bpe, mb, cold=False)
        cold = _project(w, img_s, bpe, mb, cold=True)
        table.append(
            {
                "workers": w,
                "epoch_s": warm["epoch_s"],
                "all_reduce_s": warm["all_reduce_s"],
                "total_warm_s": warm["total_s"],
                "total_cold_s": cold["total_s"],
                "reference_epoch_s": REFERENCE_EPOCH_S.get(w),
            }
        )
    return [
        {
            "row": "cluster projection",
            "kind": "projection",
            "measured": {"img_s_per_pod": img_s, "shard_bytes_per_example": bpe, "micro_model_bytes": mb},
            "assumptions": CLUSTER_ASSUMPTIONS,
            "table": table,
        }
    ]


ROWS: dict[str, Callable[[bool], list[dict[str, Any]]]] = {
    "data-path": data_path,
    "compute": compute,
    "aggregation": aggregation,
    "orchestration": orchestration,
    "parallel": parallel,
    "peers": peers,
    "accuracy": accuracy,
    "strategies": strategies,
    "cluster": cluster,
}


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }


def _projection_markdown(p: dict[str, Any]) -> str:
    a, m = p["assumptions"], p["measured"]
    lines = [
        "",
        f"Cluster projection: {a['train_examples']} Fashion-MNIST examples, {a['rounds']} rounds x "
        f"{a['local_epochs']} local epochs, one worker per pod, each pod training at this machine's measured "
        f"{m['img_s_per_pod']:.0f} img/s. Total = the train step (pod start, shard download, epochs, in-job "
        "all-reduce, micro-model upload) + the aggregate step (pod start, micro-model downloads); the split and "
        "evaluate steps are left out.",
        "",
        "| workers | s per epoch | all-reduce s per round | total s (warm nodes) | total s (nodes from zero) "
        "| reference s per epoch |",
        "|---|---|---|---|---|---|",
    ]
    for t in p["table"]:
        ref = f"{t['reference_epoch_s']}" if t["reference_epoch_s"] else ""
        lines.append(
            f"| {t['workers']} | {t['epoch_s']:.1f} | {t['all_reduce_s']:.3f} | {t['total_warm_s']:.0f} | "
            f"{t['total_cold_s']:.0f} | {ref} |"
        )
    lines += [
        "",
        f"Measured in this run: {m['img_s_per_pod']:.0f} img/s per pod (the single-process training epochs of the "
        f"parallel row), {m['shard_bytes_per_example']:.0f} shard bytes per example, micro-model "
        f"{m['micro_model_bytes'] / 1e6:.2f} MB. Assumed: pod start {a['pod_start_s']:.0f} s (30-60 s), node "
        f"scale-up from zero {a['node_scale_up_s']:.0f} s (3-5 min), GCS {a['gcs_bytes_per_s'] / 1e6:.0f} MB/s "
        f"per pod, ring all-reduce over {a['network_bytes_per_s'] * 8 / 1e9:.0f} Gb/s with "
        f"{a['all_reduce_latency_s'] * 1e3:.1f} ms per hop, the aggregate step in its own pod reading every "
        "micro-model.",
    ]
    return "\n".join(lines) + "\n"


def markdown(results: list[dict[str, Any]], info: dict[str, Any], quick: bool) -> str:
    head = (
        f"Commit `{info['commit']}`, {info['cpu']}, {info['cores']} cores ({info['capability']}), torch "
        f"{info['torch']}{', --quick' if quick else ''}.\n\n"
    )
    lines = ["| row | ours | alternative | ratio | goal | met | note |", "|---|---|---|---|---|---|---|"]
    projections = [r for r in results if r.get("kind") == "projection"]
    # accuracy and strategy rows compare points, not ratios: their own tables below
    points = [r for r in results if r.get("kind") == "time-to-accuracy" or "gap_points" in r or "gain_points" in r]
    for r in results:
        if r.get("kind") == "projection" or any(r is q for q in points):
            continue
        lines.append(
            f"| {r['row']} | {r['ours']:.1f} {r['unit']} | {r['alternative']:.1f} {r['unit']} | "
            f"{r['ratio']:.2f}x | >= {r['goal']}x | {'yes' if r['met'] else '**missed**'} | {r['note']} |"
        )
    extra = "\n" + accuracy_markdown(points) if points else ""
    return head + "\n".join(lines) + "\n" + extra + "".join(_projection_markdown(p) for p in projections)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes")
    p.add_argument("--only", nargs="*", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results.json (a full run)")
    p.add_argument("--markdown", type=Path, default=None, help="default: benchmarks/results.md (a full run)")
    a = p.parse_args(argv)
    # a partial run (--only) never overwrites the full run's results: it writes results-<rows>.json/.md
    stem = "results" if set(a.only) == set(ROWS) else "results-" + "-".join(a.only)
    a.json = a.json or Path("benchmarks") / f"{stem}.json"
    a.markdown = a.markdown or Path("benchmarks") / f"{stem}.md"
    results = []
    start = time.perf_counter()
    for name in a.only:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results.extend(ROWS[name](a.quick))
    info = machine()
    info["seconds"] = round(time.perf_counter() - start, 1)
    a.json.write_text(json.dumps({"machine": info, "quick": a.quick, "rows": results}, indent=2) + "\n")
    text = markdown(results, info, a.quick)
    a.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
