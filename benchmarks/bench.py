"""`make bench`: microfed measured side by side with what people use instead, in one run, as ratios.

These machines are noisy and have no GPU, so every row runs ours and the alternative in the same process,
back to back, and reports the ratio; absolute numbers only describe this machine. Rows:

  data-path     training images/s from our uint8 shards vs torchvision ImageFolder + DataLoader on the same
                PNGs (same model, batch and compute), end to end (our one-time decode included) and loader alone
  compute       our train loop (channels_last, bf16 autocast where the CPU has it) vs a plain eager fp32 loop;
                achieved GFLOP/s against a matrix-multiply peak measured in the same run
  aggregation   GB/s of weighted_average vs a tensor copy of the same bytes

    python benchmarks/bench.py [--quick] [--only ROW ...] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from microfed.training.aggregation import weighted_average
from microfed.training.datasets import load_dataset
from microfed.training.models import ModelConfig, build_model
from microfed.training.resources import estimate_memory
from microfed.training.shards import SplitConfig, load_shard, subsample, write_shards
from microfed.training.train import OptimConfig, Preprocess, autocast_dtype, make_optimizer, make_scheduler, train_epoch

FMNIST = ModelConfig(name="cnn-fmnist", num_classes=10, in_channels=1, image_size=(28, 28))
BATCH = 128


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Best of `repeat` wall times of fn() (best, not mean: noise on a shared machine only adds time)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def row(name: str, ours: float, alternative: float, unit: str, goal: float, note: str, **extra: Any) -> dict[str, Any]:
    ratio = ours / alternative
    return {
        "row": name,
        "ours": ours,
        "alternative": alternative,
        "unit": unit,
        "ratio": ratio,
        "goal": goal,
        "met": ratio >= goal,
        "note": note,
        **extra,
    }


# --------------------------------------------------------------------------------------------- data path


def _png_folder(data: Any, root: Path) -> Path:
    """The images as PNG files in ImageFolder's layout (class folders), as a user would have them."""
    from PIL import Image

    for i, (img, y) in enumerate(zip(data.images, data.labels, strict=True)):
        folder = root / "train" / data.class_names[int(y)].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i:06d}.png")
    # the layout needs a test/ split; one image per class keeps it from costing anything
    for name in data.class_names:
        folder = root / "test" / name.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[0][0].numpy(), mode="L").save(folder / "0.png")
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
            lambda: write_shards(load_dataset(str(folder)), Path(tmp) / "shards", SplitConfig(num_shards=1))
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


def compute(quick: bool) -> list[dict[str, Any]]:
    n = 4000 if quick else 20000
    train = subsample(load_dataset("fashion-mnist").train, n, seed=0)
    cpu = torch.device("cpu")
    amp = autocast_dtype("auto", cpu)
    model, opt = _fresh_model()
    sched = make_scheduler(opt, OptimConfig(schedule="constant"), 10**6)
    pre = Preprocess([0.286], [0.353], cpu)
    g = torch.Generator().manual_seed(0)
    ours = timed(
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
    plain = _plain_fp32_epoch(train.images, train.labels)
    flops = estimate_memory(FMNIST, batch_size=BATCH, optimizer="adam", shard_examples=n).train_flops_per_example
    fp32_peak, bf16_peak = _matmul_peak(torch.float32), _matmul_peak(torch.bfloat16)
    achieved = flops * n / ours / 1e9
    return [
        row(
            "compute, train loop vs eager fp32",
            n / ours,
            n / plain,
            "img/s",
            1.2,
            f"cnn-fmnist, batch {BATCH}, {torch.get_num_threads()} threads; ours: channels_last + "
            f"{'bf16 autocast' if amp else 'fp32'}",
        ),
        row(
            "compute, share of matmul peak",
            achieved,
            fp32_peak,
            "GFLOP/s",
            0.45,
            f"training FLOPs {flops / 1e6:.1f} M/example (forward x3); peaks: fp32 {fp32_peak:.0f}, "
            f"bf16 {bf16_peak:.0f} GFLOP/s (2048^2 matmul)",
            bf16_peak=bf16_peak,
        ),
    ]


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


ROWS: dict[str, Callable[[bool], list[dict[str, Any]]]] = {
    "data-path": data_path,
    "compute": compute,
    "aggregation": aggregation,
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


def markdown(results: list[dict[str, Any]], info: dict[str, Any], quick: bool) -> str:
    head = (
        f"Commit `{info['commit']}`, {info['cpu']}, {info['cores']} cores ({info['capability']}), torch "
        f"{info['torch']}{', --quick' if quick else ''}.\n\n"
    )
    lines = ["| row | ours | alternative | ratio | goal | met | note |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['ours']:.1f} {r['unit']} | {r['alternative']:.1f} {r['unit']} | "
            f"{r['ratio']:.2f}x | >= {r['goal']}x | {'yes' if r['met'] else '**missed**'} | {r['note']} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes")
    p.add_argument("--only", nargs="*", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--json", type=Path, default=Path("benchmarks/results.json"))
    p.add_argument("--markdown", type=Path, default=Path("benchmarks/results.md"))
    a = p.parse_args(argv)
    results = []
    for name in a.only:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results.extend(ROWS[name](a.quick))
    info = machine()
    a.json.write_text(json.dumps({"machine": info, "quick": a.quick, "rows": results}, indent=2) + "\n")
    text = markdown(results, info, a.quick)
    a.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
