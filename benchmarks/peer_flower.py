"""Benchmark row 7 ("peers"): microfed's federated setup run with Flower's FedAvg in simulation.

Runs in its own virtual environment (`.venv-flower`, made by `peers.py`: flwr[simulation] pins versions that
would fight kfp's in `.venv`), with microfed installed without dependencies so that the clients use the same
shards, model and train loop as microfed's workers; what differs is the federated framework around them:

    .venv-flower/bin/python benchmarks/peer_flower.py --shards SHARDS --out OUT --rounds 2 --local-epochs 1 \
        [--device cpu|cuda]

One simulated client (SuperNode) per shard file, FedAvg over all of them every round (fraction_train 1, weights
n_k / n, no federated evaluation). Writes OUT/global-model.safetensors (the final global model) and
OUT/result.json. The bench times this script from outside, from spawn to exit, like every other side;
result.json's `seconds` (run_simulation's start to the final global model in the ServerApp, Flower's imports
and Ray's shutdown left out) is reported beside it only. `--device cuda`: the clients train on the GPU (Ray
gives each client an equal share of the GPUs), with the shard on the GPU as in microfed's workers.

Flower's ClientApp holds no state between rounds. With `--client-state carry` (the default) each client keeps
what a microfed worker keeps from one round to the next (Adam moments, its place in the one learning-rate
schedule over all rounds, its shuffling generator) in `context.state`, so both run the same algorithm and the
comparison measures the framework; `--client-state fresh` starts a new optimiser and schedule every round, as
Flower's examples do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from microfed.training.io import write_safetensors
from microfed.training.layout import DatasetManifest
from microfed.training.models import ModelConfig, build_model
from microfed.training.shards import load_shard, read_dataset_manifest
from microfed.training.train import (
    OptimConfig,
    Preprocess,
    autocast_dtype,
    make_optimizer,
    make_scheduler,
    train_epoch,
)


def _arch(summary: DatasetManifest, model: str) -> ModelConfig:
    c, h, w = summary["image_shape"]
    return ModelConfig(name=model, num_classes=len(summary["class_names"]), in_channels=c, image_size=(h, w))


def _save_local_state(
    context: Context, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, gen: torch.Generator
) -> None:
    """What a microfed worker keeps between rounds, in the node's context (Flower keeps it across rounds)."""
    tensors = {"generator": gen.get_state()}
    for index, slots in opt.state_dict()["state"].items():
        for name, value in slots.items():
            tensors[f"{index}/{name}"] = torch.as_tensor(value).detach().cpu().clone()
    context.state["local-state"] = ArrayRecord(torch_state_dict=tensors)
    context.state["local-step"] = ConfigRecord({"step": int(sched.last_epoch)})


def _load_local_state(
    context: Context, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, gen: torch.Generator
) -> bool:
    if "local-state" not in context.state:
        return False
    tensors = context.state.array_records["local-state"].to_torch_state_dict()
    gen.set_state(tensors.pop("generator"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    step = int(context.state.config_records["local-step"]["step"])
    sched.last_epoch = step
    for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["lr"] = base * factor(step)
    return True


def client_train(msg: Message, context: Context) -> Message:
    """One round on this node's shard: E local epochs of microfed's train loop from the global weights."""
    cfg = msg.content.config_records["config"]
    rank = int(context.node_config["partition-id"])
    torch.set_num_threads(int(cfg["threads"]))
    shards = str(cfg["shards"])
    summary = read_dataset_manifest(shards)
    shard = load_shard(shards, rank)
    optim = OptimConfig(batch_size=128)  # per client, as microfed's side in peers.py
    device = torch.device(str(cfg["device"]))
    images, labels = shard.images, shard.labels
    if device.type == "cuda":  # as microfed's worker does: the uint8 shard on the GPU, gathered there
        images, labels = images.to(device), labels.to(device)
    torch.manual_seed(int(cfg["seed"]) + 1000 * (rank + 1) + int(cfg["server-round"]))  # dropout masks
    model = build_model(_arch(summary, str(cfg["model"]))).to(device).to(memory_format=torch.channels_last)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    opt = make_optimizer(model, optim)
    steps_per_epoch = -(-shard.num_examples // optim.batch_size)
    local_epochs = int(cfg["local-epochs"])
    carry = str(cfg["client-state"]) == "carry"
    # carry: one schedule over all rounds, as in microfed's workers; fresh: a new schedule every round
    total_steps = (int(cfg["rounds"]) if carry else 1) * local_epochs * steps_per_epoch
    sched = make_scheduler(opt, optim, total_steps)
    gen = torch.Generator().manual_seed(int(cfg["seed"]) + 1000 * (rank + 1))
    restored = carry and _load_local_state(context, opt, sched, gen)
    pre = Preprocess(summary["mean"], summary["std"], device, optim.augment)
    amp = autocast_dtype(optim.precision, device)
    stats = None
    seconds = 0.0
    for _ in range(local_epochs):
        stats = train_epoch(
            model,
            images,
            labels,
            preprocess=pre,
            optimizer=opt,
            scheduler=sched,
            batch_size=optim.batch_size,
            generator=gen,
            amp_dtype=amp,
        )
        seconds += stats.seconds
    if carry:
        _save_local_state(context, opt, sched, gen)
    assert stats is not None
    metrics = MetricRecord(
        {
            "num-examples": shard.num_examples,
            "train-loss": stats.loss,
            "train-seconds": seconds,
            "state-restored": int(restored),
        }
    )
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=weights), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def make_apps(
    args: argparse.Namespace, clock: dict[str, float], metrics: dict[str, Any]
) -> tuple[ServerApp, ClientApp]:
    client = ClientApp()
    client.train()(client_train)
    server = ServerApp()
    summary = read_dataset_manifest(args.shards)
    workers = len(summary["shards"])

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(args.seed)  # the same initial weights as microfed's workers
        initial = build_model(_arch(summary, args.model)).state_dict()
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=workers,
            min_evaluate_nodes=0,
            min_available_nodes=workers,
        )
        config = ConfigRecord(
            {
                "shards": str(Path(args.shards).resolve()),
                "model": args.model,
                "rounds": args.rounds,
                "local-epochs": args.local_epochs,
                "seed": args.seed,
                "threads": args.threads,
                "client-state": args.client_state,
                "device": args.device,
            }
        )
        result = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(torch_state_dict=initial), num_rounds=args.rounds, train_config=config
        )
        clock["final_model"] = time.perf_counter()
        metrics.update({str(r): dict(m) for r, m in result.train_metrics_clientapp.items()})
        write_safetensors(Path(args.out) / "global-model.safetensors", result.arrays.to_torch_state_dict(), {})

    return server, client


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="folder written by microfed's split step (write_shards)")
    p.add_argument("--out", required=True, help="folder for global-model.safetensors and result.json")
    p.add_argument("--model", default="cnn-fmnist")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per client; 0 = cores / clients")
    p.add_argument("--client-state", choices=("carry", "fresh"), default="carry")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args(argv)
    workers = len(read_dataset_manifest(args.shards)["shards"])
    cores = len(os.sched_getaffinity(0))
    args.threads = args.threads or max(1, cores // workers)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    clock: dict[str, float] = {}
    metrics: dict[str, Any] = {}  # per round: Flower's aggregate (n_k-weighted mean) of the clients' metrics
    server, client = make_apps(args, clock, metrics)
    # one Ray CPU per client, so all of them train at once as microfed's worker processes do; on cuda an equal
    # share of the GPUs each (all clients on one GPU when there is one), as microfed's workers share them
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and gpus == 0:
        print("peer_flower: --device cuda, but no CUDA device is visible", file=sys.stderr)
        return 2
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus / workers},
        "init_args": {"num_cpus": workers, "num_gpus": gpus},
    }
    start = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=workers, backend_config=backend)
    end = time.perf_counter()
    if "final_model" not in clock:
        print("peer_flower: the simulation ended without a global model (see the log above)", file=sys.stderr)
        return 1
    result = {
        "flwr": flwr.__version__,
        "seconds": clock["final_model"] - start,
        "seconds_with_shutdown": end - start,
        "clients": workers,
        "threads_per_client": args.threads,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "client_state": args.client_state,
        "device": args.device,
        "train_metrics": metrics,
    }
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
