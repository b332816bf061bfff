"""Benchmark row 7 ("peers"): the GKE reference's method, DistributedDataParallel under torchrun.

Plain PyTorch as a user would write it: the whole training set (the union of microfed's shard files: the same
uint8 tensors, no PIL), a DistributedSampler, a DataLoader, DDP over gloo on CPU, a gradient all-reduce every
step. Same model, optimiser and learning-rate schedule as microfed's workers (Adam, lr 3e-3, warm-up + cosine
over all steps), batch 128 per process, bf16 autocast and channels_last where microfed uses them (so the two
differ in the method, not in the arithmetic). Rank 0 evaluates the final model on the test set.

    torchrun --standalone --nproc_per_node=3 benchmarks/peer_ddp.py --shards SHARDS --out OUT --epochs 2

Writes OUT/result.json: test accuracy, training seconds (rank 0, after the rendezvous) and evaluation seconds.
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
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from microfed.training.evaluation import evaluate
from microfed.training.models import ModelConfig, build_model
from microfed.training.shards import load_shard, load_test_set, read_dataset_manifest
from microfed.training.train import OptimConfig, Preprocess, autocast_dtype, make_optimizer, make_scheduler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="folder written by microfed's split step (write_shards)")
    p.add_argument("--out", required=True, help="folder for result.json")
    p.add_argument("--model", default="cnn-fmnist")
    p.add_argument("--epochs", type=int, required=True, help="epochs over the whole training set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process; 0 = cores / processes")
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto")
    args = p.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0)) // world))
    start = time.perf_counter()

    summary = read_dataset_manifest(args.shards)
    parts = [load_shard(args.shards, i) for i in range(len(summary["shards"]))]
    train = TensorDataset(torch.cat([s.images for s in parts]), torch.cat([s.labels for s in parts]))
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=OptimConfig().batch_size, sampler=sampler)
    mean = torch.tensor(summary["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(summary["std"]).view(1, -1, 1, 1)

    c, h, w = summary["image_shape"]
    arch = ModelConfig(name=args.model, num_classes=len(summary["class_names"]), in_channels=c, image_size=(h, w))
    torch.manual_seed(args.seed)
    model = build_model(arch).to(memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model)
    optim = OptimConfig()
    opt = make_optimizer(ddp, optim)
    sched = make_scheduler(opt, optim, args.epochs * len(loader))
    amp = autocast_dtype(optim.precision, torch.device("cpu")) if args.precision == "auto" else None

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        for images, labels in loader:
            x = ((images.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(ddp(x).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if rank == 0:
            print(f"[peer_ddp] epoch {epoch + 1}/{args.epochs}: last batch loss {loss.item():.4f}", flush=True)
    train_s = time.perf_counter() - start

    if rank == 0:
        start = time.perf_counter()
        test = load_test_set(args.shards)
        res = evaluate(
            model,
            test.images,
            test.labels,
            preprocess=Preprocess(summary["mean"], summary["std"], torch.device("cpu")),
            num_classes=arch.num_classes,
        )
        result = {
            "accuracy": res.accuracy,
            "train_seconds": train_s,
            "eval_seconds": time.perf_counter() - start,
            "processes": world,
            "threads_per_process": torch.get_num_threads(),
            "steps_per_epoch": len(loader),
            "epochs": args.epochs,
            "amp": str(amp),
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
