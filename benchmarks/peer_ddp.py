"""Benchmark row "peers": the GKE reference's method, DistributedDataParallel under torchrun.

Only the method differs from microfed's workers: a gradient all-reduce every step (DDP) instead of FedAvg's
average of weights. Everything else is microfed's: the whole training set (the union of microfed's shard
files: the same uint8 tensors, held in memory), the same batched gather as microfed.training.train.train_epoch
(each epoch a permutation of the indices, then `images[idx]` per batch through the same Preprocess; no
DataLoader, no per-example __getitem__), the same model, optimiser and learning-rate schedule (Adam, lr 3e-3,
warm-up + cosine over all steps), batch 128 per process, bf16 autocast and channels_last where microfed uses
them. The indices are split across ranks exactly as DistributedSampler(shuffle=True, seed) does: one
permutation seeded with seed + epoch on every rank, padded by wrapping around to a multiple of the world size,
rank r taking every world-th index from r. Backend: gloo on the CPU, nccl on CUDA (`--backend` overrides: the
bench passes gloo when the GPUs are fewer than the ranks, as it does to microfed's workers).

    torchrun --standalone --nproc_per_node=3 benchmarks/peer_ddp.py --shards SHARDS --out OUT --epochs 2

Rank 0 writes OUT/global-model.safetensors (the final weights) and OUT/result.json (training seconds after the
rendezvous, steps, threads). It evaluates nothing: the bench scores every side's final model after the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from microfed.training.io import write_safetensors
from microfed.training.models import ModelConfig, build_model
from microfed.training.shards import load_shard, read_dataset_manifest
from microfed.training.train import OptimConfig, Preprocess, autocast_dtype, make_optimizer, make_scheduler


def rank_indices(n: int, world: int, rank: int, seed: int, epoch: int) -> torch.Tensor:
    """DistributedSampler(shuffle=True, drop_last=False)'s indices for `rank` in `epoch`, as one tensor."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g)
    total = -(-n // world) * world
    if total > n:  # pad by wrapping around, as DistributedSampler does
        order = torch.cat([order, order.repeat(-(-(total - n) // n))[: total - n]])
    return order[rank:total:world]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="folder written by microfed's split step (write_shards)")
    p.add_argument("--out", required=True, help="folder for global-model.safetensors and result.json")
    p.add_argument("--model", default="cnn-fmnist")
    p.add_argument("--epochs", type=int, required=True, help="epochs over the whole training set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process; 0 = cores / processes")
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: nccl on cuda, gloo on cpu")
    args = p.parse_args(argv)

    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend or ("nccl" if device.type == "cuda" else "gloo"))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0)) // world))
    start = time.perf_counter()

    summary = read_dataset_manifest(args.shards)
    parts = [load_shard(args.shards, i) for i in range(len(summary["shards"]))]
    images, labels = torch.cat([s.images for s in parts]), torch.cat([s.labels for s in parts])
    if device.type == "cuda":  # as microfed's worker does: the uint8 set on the GPU, gathered there
        images, labels = images.to(device), labels.to(device)
    n = labels.numel()
    batch = 128  # per process, as microfed's side in peers.py
    per_rank = -(-n // world)  # ceil: DistributedSampler pads every rank to this
    steps_per_epoch = -(-per_rank // batch)
    pre = Preprocess(summary["mean"], summary["std"], device)

    c, h, w = summary["image_shape"]
    arch = ModelConfig(name=args.model, num_classes=len(summary["class_names"]), in_channels=c, image_size=(h, w))
    torch.manual_seed(args.seed)
    model = build_model(arch).to(device).to(memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optim = OptimConfig(batch_size=batch)
    opt = make_optimizer(ddp, optim)
    sched = make_scheduler(opt, optim, args.epochs * steps_per_epoch)
    amp = autocast_dtype(optim.precision, device) if args.precision == "auto" else None

    for epoch in range(args.epochs):
        ddp.train()
        mine = rank_indices(n, world, rank, args.seed, epoch)
        for begin in range(0, mine.numel(), batch):
            idx = mine[begin : begin + batch]
            x = pre(images[idx])
            y = labels[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(ddp(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if rank == 0:
            print(f"[peer_ddp] epoch {epoch + 1}/{args.epochs}: last batch loss {loss.item():.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - start

    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_safetensors(out / "global-model.safetensors", {k: v.cpu() for k, v in model.state_dict().items()}, {})
        result = {
            "train_seconds": train_s,
            "processes": world,
            "threads_per_process": torch.get_num_threads(),
            "steps_per_epoch": steps_per_epoch,
            "epochs": args.epochs,
            "amp": str(amp),
            "device": str(device),
            "backend": dist.get_backend(),
        }
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
