"""Row 7, peers: the same federated setup run by microfed, by Flower's FedAvg in simulation, and by torchrun DDP.

One set of shards (Fashion-MNIST, 3 stratified shards, seed 0) feeds all three; all use cnn-fmnist, batch 128
per worker, OptimConfig()'s Adam + warm-up/cosine schedule, bf16 autocast where this CPU has it, and one
process (or Ray actor) per shard with cores/3 threads. Wall time runs from launching the training to holding
the final global model (process and Ray start included, evaluation excluded); every final model is scored by
`microfed.training.evaluation.evaluate` on the same test set.

  ours     train_step (3 worker processes, in-job average between rounds) + aggregate_step
  Flower   flwr FedAvg through run_simulation (Ray), 3 clients, each on one of our shard files with our
           model and train loop (benchmarks/peer_flower.py, in .venv-flower, created here on first use)
  DDP      torchrun --standalone --nproc_per_node=3 benchmarks/peer_ddp.py: DistributedDataParallel over the
           whole training set with a DistributedSampler, R x E epochs (the GKE reference's method)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from microfed.training.evaluation import evaluate
from microfed.training.io import read_safetensors
from microfed.training.model_files import load_model
from microfed.training.models import ModelConfig, build_model
from microfed.training.shards import SplitConfig, load_test_set, read_dataset_manifest, write_shards
from microfed.training.train import OptimConfig, Preprocess
from microfed.training.worker import WorkerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fashion_mnist, row

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKERS = 3
FLOWER_VENV = ROOT / ".venv-flower"
# flwr 1.42 needs a certifi newer than the registry serves; 1.41 installs. torch/torchvision: the builds cached
# on the project's machines (DESIGN.md). microfed goes in without dependencies (kfp would fight flwr's pins).
FLOWER_REQUIREMENTS = (
    "flwr[simulation]>=1.41,<1.42",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "safetensors>=0.4,<1",
    "numpy>=1.26,<3",
    "pillow>=10,<13",
)


def flower_python() -> Path:
    """The interpreter of .venv-flower, created and filled on first use; a stamp file skips the reinstall."""
    python = FLOWER_VENV / "bin" / "python"
    wanted = "\n".join(FLOWER_REQUIREMENTS) + "\n" + hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    stamp = FLOWER_VENV / ".peers-installed"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"[bench] peers: installing Flower into {FLOWER_VENV} (once)", file=sys.stderr, flush=True)
    if not python.exists():
        subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *FLOWER_REQUIREMENTS], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    stamp.write_text(wanted)
    return python


def _run_logged(cmd: list[str], log: Path) -> float:
    """Run cmd with its output in `log`; its wall seconds. A failure raises with the log's tail."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}:\n{tail}")
    return seconds


def _accuracy(model: torch.nn.Module, shards: Path) -> float:
    summary = read_dataset_manifest(shards)
    test = load_test_set(shards)
    pre = Preprocess(summary["mean"], summary["std"], torch.device("cpu"))
    n_classes = len(summary["class_names"])
    return evaluate(model, test.images, test.labels, preprocess=pre, num_classes=n_classes).accuracy


def _ours(shards: Path, tmp: Path, rounds: int, epochs: int, strategy: str = "fedavg") -> dict[str, float]:
    from microfed.training.step_aggregate import aggregate_step
    from microfed.training.step_train import train_step
    from microfed.training.strategies import Strategy

    tmp = tmp / strategy
    cfg = WorkerConfig(
        strategy=Strategy(name=strategy),
        shards=str(shards),
        out=str(tmp / "micro"),
        model="cnn-fmnist",
        rounds=rounds,
        local_epochs=epochs,
        seed=0,
        optim=OptimConfig(),
        eval_every_round=False,  # Flower runs no federated evaluation either
    )
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        record = train_step(cfg, WORKERS)
        aggregate_step(tmp / "micro", tmp / "model")
    seconds = time.perf_counter() - start
    model, _ = load_model(tmp / "model")
    workers = record["workers"]
    # the workers' mean, as Flower reports its clients' (n_k-weighted, equal shards here)
    loop = sum(e["seconds"] for w in workers for r in w["rounds"] for e in r["epochs"]) / len(workers)
    # the train step's time outside the workers' own clocks: process start, imports, rendezvous, the job record
    fixed = record["seconds"] - max(w["seconds"] for w in workers)
    return {"seconds": seconds, "accuracy": _accuracy(model, shards), "loop_seconds": loop, "fixed_seconds": fixed}


def _flower(shards: Path, tmp: Path, rounds: int, epochs: int) -> dict[str, Any]:
    python = flower_python()
    out = tmp / "flower"
    cmd = [str(python), str(HERE / "peer_flower.py"), "--shards", str(shards), "--out", str(out)]
    cmd += ["--rounds", str(rounds), "--local-epochs", str(epochs)]
    process_s = _run_logged(cmd, tmp / "flower.log")
    result = json.loads((out / "result.json").read_text())
    state, _ = read_safetensors(out / "global-model.safetensors")
    model = build_model(_arch(shards))
    model.load_state_dict(state)
    # the clients' training loops: per round, Flower's n_k-weighted mean of the clients' seconds
    loop = sum(float(m.get("train-seconds", 0.0)) for m in result["train_metrics"].values())
    return {**result, "accuracy": _accuracy(model, shards), "process_seconds": process_s, "loop_seconds": loop}


def _ddp(shards: Path, tmp: Path, rounds: int, epochs: int) -> dict[str, Any]:
    out = tmp / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORKERS}"]
    cmd += [str(HERE / "peer_ddp.py"), "--shards", str(shards), "--out", str(out), "--epochs", str(rounds * epochs)]
    process_s = _run_logged(cmd, tmp / "ddp.log")
    result = json.loads((out / "result.json").read_text())
    # rank 0 evaluates before the processes exit: that part is not training
    return {**result, "seconds": process_s - result["eval_seconds"], "process_seconds": process_s}


def _arch(shards: Path) -> ModelConfig:
    summary = read_dataset_manifest(shards)
    c, h, w = summary["image_shape"]
    return ModelConfig(name="cnn-fmnist", num_classes=len(summary["class_names"]), in_channels=c, image_size=(h, w))


def peers(quick: bool) -> list[dict[str, Any]]:
    n_train, n_test, rounds, epochs = (6000, 2000, 2, 1) if quick else (0, 0, 2, 2)
    flower_python()  # before any timing: the first run installs
    dataset = fashion_mnist(n_train, n_test)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards = tmp / "shards"
        write_shards(dataset, shards, SplitConfig(workers=WORKERS, split="stratified", seed=0, val_fraction=0.0))
        # one pass, in this order; the 1-minute load average at the start of each leg tells how much other
        # work shared the cores with it (on a shared machine it moves more than the methods differ)
        load: dict[str, float] = {}
        load["ours"] = os.getloadavg()[0]
        ours = _ours(shards, tmp, rounds, epochs)
        load["Flower"] = os.getloadavg()[0]
        flower = _flower(shards, tmp, rounds, epochs)
        load["DDP"] = os.getloadavg()[0]
        ddp = _ddp(shards, tmp, rounds, epochs)
        load["ours ddp"] = os.getloadavg()[0]
        ours_ddp = _ours(shards, tmp, rounds, epochs, strategy="ddp")
    n = int(dataset.train.labels.numel())
    loads = "load average at the start of each leg: " + ", ".join(f"{k} {v:.1f}" for k, v in load.items())
    setup = (
        f"cnn-fmnist, {n} Fashion-MNIST examples in {WORKERS} stratified shards, {rounds} rounds x {epochs} local "
        f"epochs, batch 128, Adam 3e-3 warm-up + cosine, {int(dataset.test.labels.numel())} test examples"
    )
    flower_note = (
        f"test acc {ours['accuracy']:.4f} vs {flower['accuracy']:.4f}; Flower {flower['flwr']} FedAvg via "
        f"run_simulation (Ray), {WORKERS} clients x {flower['threads_per_client']} thread on our shard files, our "
        f"model and train loop, client state ({flower['client_state']}: Adam moments, schedule step, shuffling) "
        f"kept in context.state; {setup}; training loops alone {ours['loop_seconds']:.1f} s vs "
        f"{flower['loop_seconds']:.1f} s; {loads}"
    )
    ddp_note = (
        f"test acc {ours['accuracy']:.4f} vs {ddp['accuracy']:.4f}; DDP (gloo) of the same model on all {n} "
        f"examples with a DistributedSampler, {rounds * epochs} epochs, {WORKERS} processes x "
        f"{ddp['threads_per_process']} thread, a gradient all-reduce every step (global batch {128 * WORKERS}); "
        f"{setup}; torchrun's launcher and rendezvous included; training loops alone {ours['loop_seconds']:.1f} s "
        f"vs {ddp['train_seconds']:.1f} s (DDP's: after the rendezvous, shard loading included); {loads}"
    )
    return [
        row(
            "peers, microfed vs Flower FedAvg (simulation)",
            ours["seconds"],
            flower["seconds"],
            "s",
            1.0,
            flower_note,
            higher_is_better=False,
            ours_accuracy=ours["accuracy"],
            alternative_accuracy=flower["accuracy"],
            flwr_version=flower["flwr"],
            alternative_process_seconds=flower["process_seconds"],
            ours_loop_seconds=ours["loop_seconds"],
            alternative_loop_seconds=flower["loop_seconds"],
            ours_fixed_seconds=ours["fixed_seconds"],
            load_average=load,
        ),
        row(
            "peers, microfed vs torchrun DDP",
            ours["seconds"],
            ddp["seconds"],
            "s",
            1.0,
            ddp_note,
            higher_is_better=False,
            ours_accuracy=ours["accuracy"],
            alternative_accuracy=ddp["accuracy"],
            alternative_train_seconds=ddp["train_seconds"],
            alternative_process_seconds=ddp["process_seconds"],
            ours_loop_seconds=ours["loop_seconds"],
            ours_fixed_seconds=ours["fixed_seconds"],
            load_average=load,
        ),
        row(
            "peers, microfed --strategy ddp vs torchrun DDP",
            ours_ddp["seconds"],
            ddp["seconds"],
            "s",
            1.0,
            f"test acc {ours_ddp['accuracy']:.4f} vs {ddp['accuracy']:.4f}; the same method through our components: "
            f"DistributedDataParallel across the {WORKERS} shards (each rank its own shard, gradients all-reduced "
            f"every step); {setup}; training loops alone {ours_ddp['loop_seconds']:.1f} s vs "
            f"{ddp['train_seconds']:.1f} s; {loads}",
            higher_is_better=False,
            ours_accuracy=ours_ddp["accuracy"],
            alternative_accuracy=ddp["accuracy"],
            ours_loop_seconds=ours_ddp["loop_seconds"],
            ours_fixed_seconds=ours_ddp["fixed_seconds"],
            load_average=load,
        ),
    ]


if __name__ == "__main__":
    print(json.dumps(peers("--quick" in sys.argv), indent=1, default=str))
