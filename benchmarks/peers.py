"""Row "peers": the same federated setup run by microfed, by Flower's FedAvg in simulation, and by torchrun DDP.

One set of shards (Fashion-MNIST, 3 stratified shards, seed 0) feeds all of them; all use cnn-fmnist, batch 128
per worker, OptimConfig's Adam + warm-up/cosine schedule, bf16 autocast where the device has it, weights averaged
at round ends only (microfed's in-round syncs off, as Flower has none), and one process (or Ray actor) per shard
with cores/3 threads, all on --device (cpu by default, or cuda).

The same start line for every side: each is a command started from a fresh interpreter, timed from spawn to
exit (interpreter start, imports, worker processes or Ray, rendezvous, training, writing the final model);
evaluation is excluded on every side: none of the commands evaluates, and each final model is scored here,
after its timing, by `microfed.training.evaluation.evaluate` on the same test set.

  ours     `python -c OURS_SCRIPT`: train_step (3 worker processes, in-job average between rounds) + aggregate_step,
           with --strategy fedavg and (a third side) ddp
  Flower   flwr FedAvg through run_simulation (Ray), 3 clients, each on one of our shard files with our
           model and train loop (benchmarks/peer_flower.py, in .venv-flower, created here on first use)
  DDP      torchrun --standalone --nproc_per_node=3 benchmarks/peer_ddp.py: DDP over the whole training set with
           our batched gather and DistributedSampler's split of the indices, R x E epochs (the GKE reference's
           method)

The sides run interleaved (ours, Flower, DDP, ours ddp; again; ...) `repeats` times.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from microfed.training.evaluation import evaluate
from microfed.training.io import read_safetensors
from microfed.training.model_files import load_model
from microfed.training.models import ModelConfig, build_model
from microfed.training.shards import SplitConfig, load_test_set, read_dataset_manifest, write_shards
from microfed.training.train import Preprocess

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Settings, fashion_mnist, interleave, row

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
START_LINE = (
    "start line: every side a command from a fresh interpreter, timed from spawn to exit (imports, worker "
    "processes or Ray, rendezvous, training, writing the final model); evaluation excluded on every side (each "
    "final model scored afterwards, outside the timing)"
)
# Our side, as a user's script would call it: the train step (which starts the worker processes) and the
# aggregate step; the job record goes to OUT/job.json for the training loops' own seconds.
OURS_SCRIPT = """\
import json, sys
from pathlib import Path
from microfed.training.step_aggregate import aggregate_step
from microfed.training.step_train import train_step
from microfed.training.strategies import Strategy
from microfed.training.train import OptimConfig
from microfed.training.worker import WorkerConfig
a = json.loads(sys.argv[1])
out = Path(a["out"])
cfg = WorkerConfig(strategy=Strategy(name=a["strategy"], sync_every_steps=0), shards=a["shards"],
                   out=str(out / "micro"), model="cnn-fmnist", rounds=a["rounds"], local_epochs=a["epochs"], seed=0,
                   optim=OptimConfig(batch_size=128), eval_every_round=False, device=a["device"])
record = train_step(cfg, a["workers"])
aggregate_step(out / "micro", out / "model")
(out / "job.json").write_text(json.dumps(record, default=str))
"""


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


def backend_for(device: str) -> str:
    """The collective backend of both DDP sides (and of our workers): MICROFED_BACKEND when set (bench.py sets
    it on cuda), else nccl when every rank has a GPU of its own (NCCL refuses two ranks on one GPU), else gloo
    (which also all-reduces CUDA tensors)."""
    if device != "cuda":
        return "gloo"
    return os.environ.get("MICROFED_BACKEND") or ("nccl" if torch.cuda.device_count() >= WORKERS else "gloo")


def spawn_to_exit(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run cmd with its output in `log`; wall seconds from spawn to exit. A failure raises with the log's tail."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}:\n{tail}")
    return seconds


def _arch(shards: Path) -> ModelConfig:
    summary = read_dataset_manifest(shards)
    c, h, w = summary["image_shape"]
    return ModelConfig(name="cnn-fmnist", num_classes=len(summary["class_names"]), in_channels=c, image_size=(h, w))


def _accuracy(model: torch.nn.Module, shards: Path) -> float:
    summary = read_dataset_manifest(shards)
    test = load_test_set(shards)
    pre = Preprocess(summary["mean"], summary["std"], torch.device("cpu"))
    n_classes = len(summary["class_names"])
    return evaluate(model.cpu(), test.images, test.labels, preprocess=pre, num_classes=n_classes).accuracy


def _weights_accuracy(path: Path, shards: Path) -> float:
    state, _ = read_safetensors(path)
    model = build_model(_arch(shards))
    model.load_state_dict(state)
    return _accuracy(model, shards)


class Peers:
    """The sides as legs for `interleave`: each call runs one side once and returns its wall seconds; what
    else it measured (accuracy, the loops' own seconds) is appended to `details[side]`."""

    def __init__(self, shards: Path, tmp: Path, rounds: int, epochs: int, device: str) -> None:
        self.shards, self.tmp, self.rounds, self.epochs, self.device = shards, tmp, rounds, epochs, device
        self.backend = backend_for(device)
        self.details: dict[str, list[dict[str, Any]]] = {}

    def _out(self, side: str) -> Path:
        """A new folder for this run of `side`; its record starts with the 1-minute load average now."""
        runs = self.details.setdefault(side, [])
        runs.append({"load_average": os.getloadavg()[0]})
        out = self.tmp / f"{side}-{len(runs)}"
        out.mkdir(parents=True)
        return out

    def ours(self, strategy: str) -> Callable[[], float]:
        def leg() -> float:
            side = f"ours-{strategy}"
            out = self._out(side)
            args = {"out": str(out), "shards": str(self.shards), "rounds": self.rounds, "epochs": self.epochs}
            args.update(strategy=strategy, device=self.device, workers=WORKERS)
            env = {**os.environ, "MICROFED_BACKEND": self.backend}
            s = spawn_to_exit([sys.executable, "-c", OURS_SCRIPT, json.dumps(args)], out / "log.txt", env)
            record = json.loads((out / "job.json").read_text())
            workers = record["workers"]
            model, _ = load_model(out / "model")
            self.details[side][-1].update(
                {
                    "seconds": s,
                    "accuracy": _accuracy(model, self.shards),
                    # the workers' mean, as Flower reports its clients' (n_k-weighted, equal shards here)
                    "loop_seconds": sum(e["seconds"] for w in workers for r in w["rounds"] for e in r["epochs"])
                    / len(workers),
                    # the train step's time outside the workers' own clocks: process start, imports, rendezvous
                    "fixed_seconds": record["seconds"] - max(w["seconds"] for w in workers),
                    "train_step_seconds": record["seconds"],
                }
            )
            return s

        return leg

    def flower(self) -> float:
        out = self._out("flower")
        cmd = [str(flower_python()), str(HERE / "peer_flower.py"), "--shards", str(self.shards), "--out", str(out)]
        cmd += ["--rounds", str(self.rounds), "--local-epochs", str(self.epochs), "--device", self.device]
        s = spawn_to_exit(cmd, out / "log.txt")
        result = json.loads((out / "result.json").read_text())
        self.details["flower"][-1].update(
            {
                "seconds": s,
                "accuracy": _weights_accuracy(out / "global-model.safetensors", self.shards),
                # per round, Flower's n_k-weighted mean of the clients' seconds
                "loop_seconds": sum(float(m.get("train-seconds", 0.0)) for m in result["train_metrics"].values()),
                "simulation_seconds": result["seconds"],
                "flwr": result["flwr"],
                "threads_per_client": result["threads_per_client"],
                "client_state": result["client_state"],
            }
        )
        return s

    def ddp(self) -> float:
        out = self._out("ddp")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORKERS}"]
        cmd += [str(HERE / "peer_ddp.py"), "--shards", str(self.shards), "--out", str(out)]
        cmd += ["--epochs", str(self.rounds * self.epochs), "--device", self.device, "--backend", self.backend]
        s = spawn_to_exit(cmd, out / "log.txt")
        result = json.loads((out / "result.json").read_text())
        self.details["ddp"][-1].update(
            {
                "seconds": s,
                "accuracy": _weights_accuracy(out / "global-model.safetensors", self.shards),
                "loop_seconds": result["train_seconds"],
                "threads_per_process": result["threads_per_process"],
            }
        )
        return s


def _median(details: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(d[key] for d in details))


def peers(settings: Settings) -> list[dict[str, Any]]:
    quick = settings.quick
    n_train, n_test, rounds, epochs = (6000, 2000, 2, 1) if quick else (0, 0, 2, 2)
    flower_python()  # before any timing: the first run installs
    dataset = fashion_mnist(n_train, n_test)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards = tmp / "shards"
        write_shards(dataset, shards, SplitConfig(workers=WORKERS, split="stratified", seed=0, val_fraction=0.0))
        p = Peers(shards, tmp, rounds, epochs, settings.device)
        legs = {"ours": p.ours("fedavg"), "flower": p.flower, "ddp": p.ddp, "ours ddp": p.ours("ddp")}
        t = interleave(legs, settings.repeats)
    d = p.details
    ours, flower, ddp, ours_ddp = d["ours-fedavg"], d["flower"], d["ddp"], d["ours-ddp"]
    n = int(dataset.train.labels.numel())
    setup = (
        f"cnn-fmnist, {n} Fashion-MNIST examples in {WORKERS} stratified shards, {rounds} rounds x {epochs} local "
        f"epochs, batch 128, Adam 3e-3 warm-up + cosine, {int(dataset.test.labels.numel())} test examples, "
        f"device {settings.device}, collective backend {p.backend}; {START_LINE}; {settings.repeats} interleaved "
        f"repeats (ours, Flower, DDP, ours ddp), 1-minute load average at each run's start "
        + "; ".join(f"{k} " + ", ".join(f"{r['load_average']:.1f}" for r in v) for k, v in d.items())
    )

    def acc(side: list[dict[str, Any]]) -> str:
        return f"{_median(side, 'accuracy'):.4f}"

    f0 = flower[0]
    flower_note = (
        f"median test acc {acc(ours)} vs {acc(flower)}; Flower {f0['flwr']} FedAvg via run_simulation (Ray), "
        f"{WORKERS} clients x {f0['threads_per_client']} thread on our shard files, our model and train loop, client "
        f"state ({f0['client_state']}: Adam moments, schedule step, shuffling) kept in context.state; {setup}; "
        f"median training loops alone {_median(ours, 'loop_seconds'):.1f} s vs {_median(flower, 'loop_seconds'):.1f} "
        f"s; Flower's own clock (run_simulation to final model) {_median(flower, 'simulation_seconds'):.1f} s"
    )
    ddp_note = (
        f"median test acc {acc(ours)} vs {acc(ddp)}; DDP of the same model on all {n} examples (our batched gather, "
        f"DistributedSampler's split of the indices, no DataLoader), {rounds * epochs} epochs, {WORKERS} processes x "
        f"{ddp[0]['threads_per_process']} thread, a gradient all-reduce every step (global batch {128 * WORKERS}); "
        f"{setup}; median training loops alone {_median(ours, 'loop_seconds'):.1f} s vs "
        f"{_median(ddp, 'loop_seconds'):.1f} s (DDP's: after the rendezvous, shard loading included)"
    )
    common: dict[str, Any] = {"higher_is_better": False}
    return [
        row(
            "peers, microfed vs Flower FedAvg (simulation), spawn to exit",
            t["ours"],
            t["flower"],
            "s",
            1.0,
            flower_note,
            **common,
            ours_runs=ours,
            alternative_runs=flower,
        ),
        row(
            "peers, microfed vs torchrun DDP, spawn to exit",
            t["ours"],
            t["ddp"],
            "s",
            1.0,
            ddp_note,
            **common,
            ours_runs=ours,
            alternative_runs=ddp,
        ),
        row(
            "peers, microfed --strategy ddp vs torchrun DDP, spawn to exit",
            t["ours ddp"],
            t["ddp"],
            "s",
            1.0,
            f"median test acc {acc(ours_ddp)} vs {acc(ddp)}; the same method through our components: "
            f"DistributedDataParallel across the {WORKERS} shards (each rank its own shard, gradients all-reduced "
            f"every step); {setup}; median training loops alone {_median(ours_ddp, 'loop_seconds'):.1f} s vs "
            f"{_median(ddp, 'loop_seconds'):.1f} s",
            **common,
            ours_runs=ours_ddp,
            alternative_runs=ddp,
        ),
    ]


if __name__ == "__main__":
    print(json.dumps(peers(Settings(quick="--quick" in sys.argv)), indent=1, default=str))
