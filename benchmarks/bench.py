"""`make bench`: microfed measured side by side with what people use instead, in one run, as ratios.

These machines are noisy and shared, so every timed row runs each leg `--repeats` times (at least 3),
interleaved (ours, alternative, ours, alternative, ...), and reports each leg's median and spread and the ratio
of each interleaved pair: its median, its [min, max], and a verdict (common.py: "met" if even the worst pair
reaches the goal, "missed" if even the best falls short, else "within noise"). Absolute numbers only describe
this machine. `--device cpu` (the default) runs every side on the CPU (the GPUs are hidden from every
process); `--device cuda` runs every side on the GPU. Rows:

  data-path     our uint8 shards vs torchvision ImageFolder + DataLoader on the same PNGs, both shuffled with a
                seeded generator: the PNG decode + 3 training epochs (same model and fp32 compute), and one
                epoch of batches alone
  compute       our train loop (channels_last, bf16 autocast where the device has it) vs a plain eager fp32 loop;
                each precision's achieved GFLOP/s against that precision's matmul peak, measured interleaved
  aggregation   GB/s of weighted_average vs a tensor copy of the same bytes
  orchestration `microfed run` (kfp.local) wall time vs the same steps called in one process; fixed cost per step
  parallel      2 local workers (cores/2 threads each) vs one process on all cores, same data and epochs
  peers         the same federated setup run by Flower's FedAvg (simulation) and by torchrun DDP, every side a
                fresh interpreter timed from spawn to exit (benchmarks/peers.py; Flower in its own .venv-flower)
  accuracy      FedAvg test accuracy (3/8 workers; stratified, Dirichlet 0.5/0.1; one-shot, multi-round) vs
                centralized training with the same epochs; epochs and seconds to 91.4% (benchmarks/accuracy.py)
  strategies    every registered strategy (training/strategies.py) vs fedavg on Dirichlet 0.5 and 0.1 shards
  cluster       a projection of wall time for 1-64 workers on a cluster from this run's numbers (a table, with
                its assumptions; no side-by-side timing); the GKE reference's numbers beside it, as a reference

    python benchmarks/bench.py [--quick] [--repeats N] [--device cpu|cuda] [--only ROW ...] [--json PATH]
                               [--markdown PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import statistics
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
from common import (
    BATCH,
    BENCH_OPTIM,
    FMNIST,
    MEASURED,
    ROUND_END,
    Settings,
    SettingsError,
    fashion_mnist,
    interleave,
    machine,
    round_end,
    row,
    seconds,
)
from common import reference as reference_number
from peers import peers

WARM = "start line: both legs in this (warm) interpreter, after imports"
MAX_LOCAL_WORKERS = 8  # the most worker processes a row starts on this machine (accuracy's 8-worker runs)

# --------------------------------------------------------------------------------------------- data path

DATA_EPOCHS = 3
LOADER_PASSES = 20
MEAN, STD = [0.286], [0.353]


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


def _fresh_model(device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(FMNIST).to(device).to(memory_format=torch.channels_last)
    return model, make_optimizer(model, OptimConfig())


def _dataloader(folder: Path, workers: int) -> torch.utils.data.DataLoader[Any]:
    """ImageFolder + DataLoader as a user writes it, shuffled by a seeded generator (as our randperm is)."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Grayscale(), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(str(folder / "train"), transform=tf)
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, generator=g)


def _their_epochs(folder: Path, workers: int, epochs: int, device: torch.device) -> None:
    loader = _dataloader(folder, workers)
    model, opt = _fresh_model(device)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _our_epochs(folder: Path, shards: Path, epochs: int, device: torch.device) -> None:
    """The split step's decode of the PNG tree into a uint8 shard, then `epochs` epochs of our loop from it."""
    write_shards(load_dataset(str(folder)), shards, SplitConfig(workers=1, val_fraction=0.0))
    shard = load_shard(shards, 0)
    images, labels = shard.images.to(device), shard.labels.to(device)
    model, opt = _fresh_model(device)
    sched = make_scheduler(opt, OptimConfig(schedule="constant"), 10**6)
    pre, g = Preprocess(MEAN, STD, device), torch.Generator().manual_seed(0)
    for _ in range(epochs):
        train_epoch(
            model, images, labels, preprocess=pre, optimizer=opt, scheduler=sched, batch_size=BATCH, generator=g
        )


def data_path(s: Settings) -> list[dict[str, Any]]:
    n = 3000 if s.quick else 12000
    dev = s.torch_device
    train = subsample(load_dataset("fashion-mnist").train, n, seed=0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = _png_folder(train, tmp / "pngs")
        runs = itertools.count()
        write_shards(load_dataset(str(folder)), tmp / "shards", SplitConfig(workers=1, val_fraction=0.0))
        shard = load_shard(tmp / "shards", 0)
        images = shard.images.to(dev)
        pre, g = Preprocess(MEAN, STD, dev), torch.Generator().manual_seed(0)

        def our_batches(passes: int) -> None:  # the batched gather of train_epoch: a permutation, then images[idx]
            for _ in range(passes):
                order = torch.randperm(n, generator=g)
                for i in range(0, n, BATCH):
                    pre(images[order[i : i + BATCH]])

        def their_batches(workers: int) -> None:
            for x, _ in _dataloader(folder, workers):
                x.to(dev)

        legs: dict[str, Callable[[], float]] = {
            "ours": lambda: seconds(lambda: _our_epochs(folder, tmp / f"s{next(runs)}", DATA_EPOCHS, dev), dev),
            "theirs0": lambda: seconds(lambda: _their_epochs(folder, 0, DATA_EPOCHS, dev), dev),
            "theirs1": lambda: seconds(lambda: _their_epochs(folder, 1, DATA_EPOCHS, dev), dev),
            # one pass takes milliseconds: a sample is the mean of LOADER_PASSES, so one preemption does not rule it
            "ours loader": lambda: seconds(lambda: our_batches(LOADER_PASSES), dev) / LOADER_PASSES,
            "theirs0 loader": lambda: seconds(lambda: their_batches(0), dev),
            "theirs1 loader": lambda: seconds(lambda: their_batches(1), dev),
        }
        t = interleave(legs, s.repeats)
    # the alternative at its best in each repeat: the faster of num_workers 0 and 1
    theirs = [min(a, b) for a, b in zip(t["theirs0"], t["theirs1"], strict=True)]
    theirs_loader = [min(a, b) for a, b in zip(t["theirs0 loader"], t["theirs1 loader"], strict=True)]
    work = DATA_EPOCHS * n
    return [
        row(
            f"data path, PNG decode + {DATA_EPOCHS} training epochs vs ImageFolder + DataLoader, {DATA_EPOCHS} epochs",
            [work / v for v in t["ours"]],
            [work / v for v in theirs],
            "img/s",
            1.5,
            f"{n} Fashion-MNIST PNGs x {DATA_EPOCHS} epochs; ours: the split step's decode into a uint8 shard, then "
            f"our train loop; theirs: torchvision transforms in a DataLoader (the faster of num_workers 0 and 1 in "
            f"each repeat); both shuffle with a generator seeded 0, build the same model (channels_last, fp32) and "
            f"train it on {s.device}; {WARM}, the timing starts before the decode and the ImageFolder scan",
            num_workers_samples={"0": t["theirs0"], "1": t["theirs1"]},
        ),
        row(
            "data path, loader alone, 1 shuffled epoch of batches",
            [n / v for v in t["ours loader"]],
            [n / v for v in theirs_loader],
            "img/s",
            20.0,
            f"{n} examples, batch {BATCH}: normalised float batches on {s.device}; ours: randperm + images[idx] "
            f"from the decoded shard (each sample the mean of {LOADER_PASSES} passes), theirs: the faster of "
            f"num_workers 0 and 1; {WARM}",
            num_workers_samples={"0": t["theirs0 loader"], "1": t["theirs1 loader"]},
        ),
    ]


# --------------------------------------------------------------------------------------------- compute


def _matmul_peak(dtype: torch.dtype, device: torch.device) -> Callable[[], float]:
    """A leg: GFLOP/s of repeated square matmuls in `dtype` on `device` (2048^2 on the CPU, 8192^2 on a GPU)."""
    n, reps = (8192, 20) if device.type == "cuda" else (2048, 5)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up
    return lambda: 2 * n**3 * reps / seconds(lambda: [torch.mm(a, b) for _ in range(reps)], device) / 1e9


def _plain_fp32(images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Callable[[], float]:
    """A leg: seconds of one epoch of a plain eager fp32 loop (contiguous layout, slices in order)."""
    torch.manual_seed(0)
    model = build_model(FMNIST).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_all = (images.float() / 255 - MEAN[0]) / STD[0]

    def epoch(n: int) -> None:
        for i in range(0, n, BATCH):
            loss = F.cross_entropy(model(x_all[i : i + BATCH]), labels[i : i + BATCH])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch(2 * BATCH)  # warm-up: the first steps build kernels and caches
    return lambda: seconds(lambda: epoch(labels.numel()), device)


def _our_loop(
    images: torch.Tensor, labels: torch.Tensor, amp: torch.dtype | None, dev: torch.device
) -> Callable[[], float]:
    """A leg: seconds of one epoch of our train loop (channels_last, batched preprocessing) at precision `amp`."""
    model, opt = _fresh_model(dev)
    sched = make_scheduler(opt, OptimConfig(schedule="constant"), 10**6)
    pre, g = Preprocess(MEAN, STD, dev), torch.Generator().manual_seed(0)

    def epoch(steps: int | None = None) -> None:
        train_epoch(
            model,
            images,
            labels,
            preprocess=pre,
            optimizer=opt,
            scheduler=sched,
            batch_size=BATCH,
            generator=g,
            amp_dtype=amp,
            steps=steps,
        )

    epoch(2)  # warm-up
    return lambda: seconds(epoch, dev)


def compute(s: Settings) -> list[dict[str, Any]]:
    n = 4000 if s.quick else 20000
    dev = s.torch_device
    train = subsample(load_dataset("fashion-mnist").train, n, seed=0)
    images, labels = train.images.to(dev), train.labels.to(dev)
    amp = autocast_dtype("auto", dev)
    low = [torch.bfloat16, torch.float16] if dev.type == "cuda" else [torch.bfloat16]
    legs: dict[str, Callable[[], float]] = {"ours": _our_loop(images, labels, amp, dev)}
    legs["plain"] = _plain_fp32(images, labels, dev)
    if amp is not None:
        legs["ours fp32"] = _our_loop(images, labels, None, dev)
    legs["fp32 peak"] = _matmul_peak(torch.float32, dev)
    for dtype in low:
        legs[f"{str(dtype).removeprefix('torch.')} peak"] = _matmul_peak(dtype, dev)
    t = interleave(legs, s.repeats)
    flops = estimate_memory(FMNIST, batch_size=BATCH, optimizer="adam", shard_examples=n).train_flops_per_example
    peaks = "; ".join(f"{k}: median {statistics.median(v):.0f} GFLOP/s" for k, v in t.items() if k.endswith("peak"))
    size = "8192^2 matmul" if dev.type == "cuda" else "2048^2 matmul"
    work = (
        f"training FLOPs {flops / 1e6:.1f} M/example (forward x3); peaks ({size}, interleaved with the loops) {peaks}"
    )
    threads = f"{torch.get_num_threads()} threads" if dev.type == "cpu" else "cuda"
    rows = [
        row(
            "compute, train loop vs eager fp32",
            [n / v for v in t["ours"]],
            [n / v for v in t["plain"]],
            "img/s",
            1.2,
            f"cnn-fmnist, batch {BATCH}, {n} examples per epoch, {threads}; ours: channels_last + "
            f"{'bf16 autocast' if amp else 'fp32'}, shuffled gather; plain: fp32, slices in order; {WARM}, each leg "
            "one epoch after 2 warm-up steps",
        )
    ]
    # Like with like: each precision's loop against that precision's matmul peak, never bf16 against fp32's.
    fp32_loop = t["ours"] if amp is None else t["ours fp32"]
    gflops = {k: v for k, v in t.items() if k.endswith("peak")}
    rows.append(
        row(
            "compute, fp32 train loop, share of fp32 matmul peak",
            [flops * n / v / 1e9 for v in fp32_loop],
            t["fp32 peak"],
            "GFLOP/s",
            0.45,
            work,
            peak_samples=gflops,
        )
    )
    if amp is not None:
        name = str(amp).removeprefix("torch.")
        rows.append(
            row(
                f"compute, {name} train loop, share of {name} matmul peak",
                [flops * n / v / 1e9 for v in t["ours"]],
                t[f"{name} peak"],
                "GFLOP/s",
                0.45,
                work,
                peak_samples=gflops,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------- aggregation


def aggregation(s: Settings) -> list[dict[str, Any]]:
    k, calls = (4, 3) if s.quick else (8, 3)
    dev = s.torch_device
    arch = ModelConfig(name="resnet18", num_classes=10, in_channels=3, image_size=(32, 32))
    states = []
    for i in range(k):
        torch.manual_seed(i)
        states.append({n: t.to(dev).clone() for n, t in build_model(arch).state_dict().items()})
    nbytes = sum(t.numel() * t.element_size() for s_ in states for t in s_.values())
    weights = [float(i + 1) for i in range(k)]
    flat = [torch.cat([t.reshape(-1).float() for t in s_.values()]) for s_ in states]
    weighted_average(states, weights)  # warm-up
    legs = {
        "ours": lambda: seconds(lambda: [weighted_average(states, weights) for _ in range(calls)], dev) / calls,
        "copy": lambda: seconds(lambda: [[f.clone() for f in flat] for _ in range(calls)], dev) / calls,
    }
    t = interleave(legs, s.repeats)
    return [
        row(
            "aggregation, weighted_average vs copy",
            [nbytes / v / 1e9 for v in t["ours"]],
            [nbytes / v / 1e9 for v in t["copy"]],
            "GB/s",
            0.5,
            f"{k} resnet18 micro-models on {s.device}, {nbytes / 1e6:.0f} MB read; each sample the mean of {calls} "
            f"calls; {WARM}",
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


def _in_process(arguments: dict[str, Any], tmp: Path, device: str) -> dict[str, float]:
    """The pipeline's steps called directly, in order, in this process; seconds of each."""
    from microfed.training.step_aggregate import aggregate_step
    from microfed.training.step_evaluate import evaluate_step
    from microfed.training.step_export import export_step
    from microfed.training.step_split import SplitOptions, split_step
    from microfed.training.step_train import train_step

    a = arguments
    shards, micro, model, report, exported = (tmp / d for d in ("shards", "micro", "model", "report", "exported"))
    took: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        took["split"] = seconds(
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
            optim=BENCH_OPTIM,
            strategy=round_end(),
            device=device,
        )
        took["train"] = seconds(lambda: train_step(cfg, a["workers"]))
        took["aggregate"] = seconds(lambda: aggregate_step(micro, model))
        took["evaluate"] = seconds(lambda: evaluate_step(model, shards, micro, report))
        took["export"] = seconds(lambda: export_step(model, shards, exported))
    MEASURED["micro_model_bytes"] = float((model / GLOBAL_MODEL_FILE).stat().st_size)
    return took


def orchestration(s: Settings) -> list[dict[str, Any]]:
    from microfed.pipelines.local_run import run_local

    arguments: dict[str, Any] = {
        "dataset": "fashion-mnist",
        "model": "cnn-fmnist",
        "workers": 3,
        "rounds": 2,
        "local_epochs": 1 if s.quick else 3,
        "train_limit": 6000 if s.quick else 0,
        "test_limit": 2000 if s.quick else 0,
        **ROUND_END,
    }
    direct: list[dict[str, float]] = []
    fixed: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)

        def in_process() -> float:
            direct.append(_in_process(arguments, tmp / f"direct{len(direct)}", s.device))
            return sum(direct[-1].values())

        def pipeline() -> float:
            i = len(fixed)
            start = time.perf_counter()
            result = run_local(arguments, runs_dir=tmp / "runs", name=f"bench{i}", quiet=True)
            took = time.perf_counter() - start
            walls = _task_walls(result.run_dir / "kfp.log")
            own = result.metrics["timings"]
            # fixed cost of a step: its kfp.local task's wall time minus the step's own time (export records
            # none: the same step's time in the last in-process run stands in)
            cost = {
                task: wall - (own[_TASK_STEP[task]] if task in _TASK_STEP else direct[-1].get(task, 0.0))
                for task, wall in walls.items()
            }
            # compile, kfp.local setup and collecting the run folder: pipeline time outside any task
            cost["outside tasks"] = took - sum(walls.values())
            fixed.append(cost)
            return took

        t = interleave({"in process": in_process, "pipeline": pipeline}, s.repeats)
    size = "6000/2000 examples, 2 rounds x 1 epoch" if s.quick else "60000/10000 examples, 2 rounds x 3 epochs"
    median_fixed = {k: statistics.median(f.get(k, 0.0) for f in fixed) for k in fixed[0]}
    return [
        row(
            "orchestration, microfed run vs steps in one process",
            t["pipeline"],
            t["in process"],
            "s",
            round(1 / 1.15, 2),
            f"fashion-mnist, cnn-fmnist, 3 local workers, {size}; both run split, train (worker processes), "
            f"aggregate, evaluate, export; goal: pipeline <= 1.15x the steps in one process; {WARM} (each "
            f"kfp.local step then starts its own interpreter: that is the cost measured); workers on {s.device}; "
            f"median fixed cost per step (s): " + ", ".join(f"{k} {v:.1f}" for k, v in median_fixed.items()),
            higher_is_better=False,
            fixed_cost_s=fixed,
            in_process_s=direct,
        )
    ]


# --------------------------------------------------------------------------------------------- parallel


def _train_throughput(
    shards: Path, out: Path, workers: int, examples: int, epochs: int, device: str
) -> dict[str, float]:
    """images/s of the train step (worker processes started and joined) and of the training epochs alone."""
    from microfed.training.step_train import train_step

    cfg = WorkerConfig(
        shards=str(shards),
        out=str(out),
        model="cnn-fmnist",
        rounds=1,
        local_epochs=epochs,
        seed=0,
        optim=BENCH_OPTIM,
        strategy=round_end(),
        eval_every_round=False,
        device=device,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        record = train_step(cfg, workers)
    epoch_s = max(sum(e["seconds"] for r in w["rounds"] for e in r["epochs"]) for w in record["workers"])
    return {"step": examples * epochs / record["seconds"], "epochs": examples * epochs / epoch_s}


def parallel(s: Settings) -> list[dict[str, Any]]:
    n, epochs = (8000, 2) if s.quick else (30000, 2)
    dataset = fashion_mnist(n, 500)
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 2):
            write_shards(dataset, Path(tmp) / f"shards{k}", SplitConfig(workers=k, seed=0, val_fraction=0.0))

        def leg(k: int) -> Callable[[], float]:
            def run() -> float:
                micro = Path(tmp) / f"micro{k}-{len(runs[k])}"
                runs[k].append(_train_throughput(Path(tmp) / f"shards{k}", micro, k, n, epochs, s.device))
                return runs[k][-1]["step"]

            return run

        t = interleave({"2 workers": leg(2), "1 process": leg(1)}, s.repeats)
        shard_bytes = (Path(tmp) / "shards1" / shard_files(0).tensors).stat().st_size
    MEASURED["single_img_s"] = statistics.median(r["epochs"] for r in runs[1])
    MEASURED["shard_bytes_per_example"] = shard_bytes / n
    cores = os.cpu_count() or 1
    epochs_ratio = [a["epochs"] / b["epochs"] for a, b in zip(runs[2], runs[1], strict=True)]
    return [
        row(
            "parallel efficiency, 2 workers vs 1 process",
            t["2 workers"],
            t["1 process"],
            "img/s",
            0.9,
            f"{n} examples x {epochs} epochs on {s.device}, train step wall time; {WARM}, each side's worker "
            f"processes started inside the timing; 2 workers x {max(1, cores // 2)} threads vs 1 x {cores}; training "
            f"epochs alone: median {statistics.median(r['epochs'] for r in runs[2]):.0f} vs "
            f"{MEASURED['single_img_s']:.0f} img/s (ratio median {statistics.median(epochs_ratio):.2f}, "
            f"{min(epochs_ratio):.2f}-{max(epochs_ratio):.2f})",
            epochs_only_ratio=epochs_ratio,
            epochs_img_s={"2 workers": [r["epochs"] for r in runs[2]], "1 process": [r["epochs"] for r in runs[1]]},
        )
    ]


# --------------------------------------------------------------------------------------------- cluster

# The GKE reference platform's own numbers for Fashion-MNIST: not measured here, never in ours/alternative.
GKE_SOURCE = (
    "the GKE reference project's reported Fashion-MNIST run (quoted in README.md and issue 7), not measured by "
    "this bench"
)
REFERENCE_EPOCH_S = {1: 75.4, 3: 35.1}  # seconds per epoch on 1 and on 3 nodes
REFERENCE_RUN = {"epochs": 90, "minutes": 34, "pods": 4, "test_accuracy": 0.914}
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


def cluster(s: Settings) -> list[dict[str, Any]]:
    if "single_img_s" not in MEASURED:
        parallel(s)
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
            }
        )
    return [
        {
            "row": "cluster projection",
            "kind": "projection",
            "measured": {"img_s_per_pod": img_s, "shard_bytes_per_example": bpe, "micro_model_bytes": mb},
            "assumptions": CLUSTER_ASSUMPTIONS,
            "table": table,
            "reference": {
                "epoch_s_by_nodes": [
                    reference_number(v, "s per epoch", GKE_SOURCE) | {"nodes": k} for k, v in REFERENCE_EPOCH_S.items()
                ],
                "run": REFERENCE_RUN,
                "source": GKE_SOURCE,
            },
        }
    ]


ROWS: dict[str, Callable[[Settings], list[dict[str, Any]]]] = {
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


def _projection_markdown(p: dict[str, Any]) -> str:
    a, m, ref = p["assumptions"], p["measured"], p["reference"]
    lines = [
        "",
        f"Cluster projection: {a['train_examples']} Fashion-MNIST examples, {a['rounds']} rounds x "
        f"{a['local_epochs']} local epochs, one worker per pod, each pod training at this machine's measured "
        f"{m['img_s_per_pod']:.0f} img/s. Total = the train step (pod start, shard download, epochs, in-job "
        "all-reduce, micro-model upload) + the aggregate step (pod start, micro-model downloads); the split and "
        "evaluate steps are left out.",
        "",
        "| workers | s per epoch | all-reduce s per round | total s (warm nodes) | total s (nodes from zero) |",
        "|---|---|---|---|---|",
    ]
    for t in p["table"]:
        lines.append(
            f"| {t['workers']} | {t['epoch_s']:.1f} | {t['all_reduce_s']:.3f} | {t['total_warm_s']:.0f} | "
            f"{t['total_cold_s']:.0f} |"
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
        "",
        f"Reference, not measured here (source: {ref['source']}):",
        "",
        "| reference | value |",
        "|---|---|",
    ]
    for e in ref["epoch_s_by_nodes"]:
        lines.append(f"| seconds per epoch, {e['nodes']} node{'s' if e['nodes'] > 1 else ''} | {e['value']} |")
    run = ref["run"]
    lines.append(
        f"| whole run | {100 * run['test_accuracy']:.1f}% test accuracy after {run['epochs']} epochs, "
        f"{run['minutes']} min on {run['pods']} pods |"
    )
    return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}" if abs(v) < 10 else f"{v:,.1f}"


def _leg(r: dict[str, Any], side: str) -> str:
    lo, hi = r[f"{side}_spread"]
    return f"{_num(r[side])} {r['unit']} ({_num(lo)}-{_num(hi)})"


def markdown(results: list[dict[str, Any]], info: dict[str, Any], quick: bool) -> str:
    head = (
        f"Commit `{info['commit']}`, {info['cpu']}, {info['cores']} cores ({info['capability']}), torch "
        f"{info['torch']}, device {info.get('device', 'cpu')}{' (' + info['gpu'] + ')' if 'gpu' in info else ''}"
        f"{', --quick' if quick else ''}, {info.get('repeats', '?')} interleaved repeats per timed row.\n\n"
        "Each leg: median (min-max) over the repeats; ratio: ours relative to the alternative (higher is better), "
        "the median of the per-repeat pair ratios [min-max]; verdict: met if the worst pair reaches the goal, "
        "missed if the best pair falls short, else within noise.\n\n"
    )
    lines = [
        "| row | ours | alternative | ratio [min-max] | goal | verdict | note |",
        "|---|---|---|---|---|---|---|",
    ]
    projections = [r for r in results if r.get("kind") == "projection"]
    # accuracy and strategy rows compare points, not ratios: their own tables below
    points = [r for r in results if r.get("kind") == "time-to-accuracy" or "gap_points" in r or "gain_points" in r]
    for r in results:
        if r.get("kind") == "projection" or any(r is q for q in points):
            continue
        lo, hi = r["ratio_spread"]
        verdict = r["verdict"] if r["verdict"] == "met" else f"**{r['verdict']}**"
        lines.append(
            f"| {r['row']} | {_leg(r, 'ours')} | {_leg(r, 'alternative')} | {r['ratio']:.2f}x [{lo:.2f}-{hi:.2f}] | "
            f">= {r['goal']}x | {verdict} | {r['note']} |"
        )
    refs = [r for r in results if "reference" in r and r.get("kind") != "projection"]
    if refs:
        lines += [
            "",
            "Reference numbers (not measured in this run):",
            "",
            "| row | reference | source |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['row']} | {_num(r['reference']['value'])} {r['reference']['unit']} | {r['reference']['source']} |"
            for r in refs
        ]
    extra = "\n" + accuracy_markdown(points) if points else ""
    return head + "\n".join(lines) + "\n" + extra + "".join(_projection_markdown(p) for p in projections)


def settings_from(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    """The command line as flags and Settings; an impossible combination exits with a message naming the flag."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per timed row (>= 3; 1 with --quick)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every side runs (default cpu)")
    p.add_argument("--only", nargs="*", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results.json (a full run)")
    p.add_argument("--markdown", type=Path, default=None, help="default: benchmarks/results.md (a full run)")
    a = p.parse_args(argv)
    try:
        return a, Settings(quick=a.quick, repeats=a.repeats, device=a.device)
    except SettingsError as e:
        p.error(str(e))
        raise  # p.error exits; for the type checker


def main(argv: list[str] | None = None) -> int:
    a, settings = settings_from(argv)
    if settings.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every process this starts (workers, Ray, torchrun) on the CPU
    elif torch.cuda.device_count() < MAX_LOCAL_WORKERS:
        # NCCL refuses two ranks on one GPU: our workers (and the DDP peer) all-reduce through gloo instead
        os.environ.setdefault("MICROFED_BACKEND", "gloo")
    # a partial run (--only) never overwrites the full run's results: it writes results-<rows>.json/.md
    stem = "results" if set(a.only) == set(ROWS) else "results-" + "-".join(a.only)
    a.json = a.json or Path("benchmarks") / f"{stem}.json"
    a.markdown = a.markdown or Path("benchmarks") / f"{stem}.md"
    results = []
    row_seconds: dict[str, float] = {}
    start = time.perf_counter()
    for name in a.only:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        began = time.perf_counter()
        results.extend(ROWS[name](settings))
        row_seconds[name] = round(time.perf_counter() - began, 1)
        print(f"[bench] {name}: {row_seconds[name]} s", file=sys.stderr, flush=True)
    info = machine(settings.device)
    info["seconds"] = round(time.perf_counter() - start, 1)
    info["row_seconds"] = row_seconds
    info["repeats"] = settings.repeats
    a.json.write_text(json.dumps({"machine": info, "quick": a.quick, "rows": results}, indent=2) + "\n")
    text = markdown(results, info, a.quick)
    a.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
