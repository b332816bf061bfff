"""Worker entrypoint: one process per shard, under a PyTorchJob, torchrun, or microfed's local launcher.

It reads the variables the Kubeflow Training Operator injects (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK;
RANK 0 is the Master replica), trains on shard RANK for R rounds of E local epochs, averages the workers'
weights in-job between rounds (weights n_k / n), and after round R writes its micro-model and n_k for the
aggregate step. Run it by hand on one machine with two workers:

    torchrun --standalone --nproc_per_node=2 -m microfed.training.worker \\
        --shards SHARDS_DIR --out OUT_DIR --model cnn-fmnist --rounds 3 --local-epochs 1

Faults. Each in-job average ends with a checkpoint of the round (microfed.training.checkpoint), written by
rank 0 into OUT_DIR/checkpoints/ before any rank starts the next round. A worker group started again on the
same OUT_DIR (the PyTorchJob restarting its pods, the local launcher restarting its processes) resumes after
the last checkpointed round: rank 0 picks the round and broadcasts it, so all ranks agree. Exit codes tell a
launcher what happened: 0 done, 2 bad input or a diverged worker (MicrofedError: restarting cannot help),
200 a peer was lost in a collective or never joined the rendezvous (restart the group), and a crash or a
signal anything else.

Finishing. The last round ends without an average (the aggregate step does it), so nothing else would hold
the ranks together at the end: rank 0, the Master replica, could exit while the other ranks were still
training or uploading, and the Training Operator marks a PyTorchJob Succeeded as soon as its Master
succeeds, whatever the Workers are doing. So every rank waits in a final barrier after its outputs are
uploaded, and rank 0 exits only once all of them are durable.

Timeouts. Every collective, the rendezvous and that final barrier are bounded by `--collective-timeout-minutes`
(30 when 0): the wait of the fastest rank for the slowest in a round must fit in it.

Progress. Under microfed's local launcher each rank keeps a progress record (what it is doing, whether it is waiting
for its peers in a collective, when it last made progress: a training step, or the start of a step of its own),
rewritten atomically, at most every few seconds while it trains. The launcher warns about a rank that made no
progress for `--stall-minutes` (a third of the collective timeout when 0) and names it as the error when the
collective timeout ends the run (training/launch.py).

Models. Before the first epoch, every rank runs one batch of its shard through the model it built and refuses, with
one line that names the model or factory, a factory that raises, a model without trainable parameters, and an
output that is not (batch, num_classes) logits (microfed.training.models.check_model).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from microfed.training.aggregation import (
    ARCHITECTURE_KEY,
    Strategy,
    allreduce_average,
    batchnorm_keys,
    proximal_step,
    server_update,
)
from microfed.training.checkpoint import (
    build_checkpoint,
    capture_rank_state,
    checkpoint_uri,
    decode_rank_state,
    encode_rank_state,
    gather_bytes,
    latest_round,
    read_checkpoint,
    restore_rank_state,
    write_checkpoint,
)
from microfed.training.errors import MicrofedError
from microfed.training.evaluation import evaluate
from microfed.training.io import write_json, write_safetensors
from microfed.training.launch import EXIT_PEER_LOST, EXIT_USER_ERROR, PROGRESS_DIR_ENV, progress_file, usable_cores
from microfed.training.model_files import MODEL_CONFIG_FILE, ModelCard
from microfed.training.models import ModelConfig, build_model, check_model
from microfed.training.shards import Shard, load_shard, load_val_set, read_dataset_manifest
from microfed.training.storage import exists, join, staged_input, staged_output
from microfed.training.train import (
    MAX_EXACT_INT,
    OptimConfig,
    Preprocess,
    autocast_dtype,
    make_optimizer,
    make_scheduler,
    require_float,
    require_int,
    train_epoch,
)
from microfed.training.usage import UsageMonitor

__all__ = [
    "DEFAULT_COLLECTIVE_TIMEOUT_MINUTES",
    "DistEnv",
    "PeerLost",
    "WorkerConfig",
    "collective_timeout",
    "main",
    "micro_model_name",
    "run_worker",
    "stall_timeout",
]

ROUNDS_FILE = "rounds.json"  # rank 0: the strategy, every round's validation metrics, the best round
BEST_ROUND_FILE = "best-round.safetensors"  # rank 0: the global model of the best in-job round
SERVER_STATE_FILE = "server-state.safetensors"  # rank 0, fedavgm: the global model and momentum before round R
DEFAULT_COLLECTIVE_TIMEOUT_MINUTES = 30.0  # torch's own default for gloo; what `collective_timeout_minutes=0` means
# `stall_minutes=0`: a third of the collective timeout, so that the warning comes well before the timeout ends the run
DEFAULT_STALL_FRACTION = 1 / 3
# Longer waits are typos; the bound keeps timedelta and gloo's milliseconds far from overflowing.
MAX_TIMEOUT_MINUTES = 525_600.0  # a year
# Round checkpoints and the files of shards, logs and micro-models are numbered with five digits.
MAX_ROUNDS = 99_999
MAX_THREADS = 4096
_MEMBERS_KEY = "microfed/members"  # in rank 0's TCPStore: how many processes have joined this store
_STALE_GROUP_RETRY_SECONDS = 2.0


class PeerLost(RuntimeError):
    """A collective failed: another rank died or became unreachable. The group should be restarted."""


def micro_model_name(rank: int) -> str:
    return f"micro-model-{rank:05d}.safetensors"


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Everything a worker needs besides the distributed environment."""

    shards: str
    """Folder written by the split step: a local path or a gs:// URI (on a cluster)."""
    out: str
    """Folder for micro-models and per-worker records: a local path or a gs:// URI."""
    model: str = "cnn-fmnist"
    """Model name (see microfed.training.models) or `package.module:function`."""
    rounds: int = 1
    """R: rounds of local training followed by a weighted average."""
    local_epochs: int = 1
    """E: epochs over the worker's own shard in each round."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser, schedule, augmentation and batch size."""
    seed: int = 0
    """Model initialisation seed (shared); the data order uses seed + rank."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, or `cuda`."""
    threads: int = 0
    """CPU threads; 0 = usable cores / workers on this machine (LOCAL_WORLD_SIZE)."""
    eval_every_round: bool = True
    """Evaluate the global model on the validation split (when the split step held one out) after each in-job
    average (rounds 1..R-1; the aggregate step evaluates round R) and keep the best round's model."""
    strategy: Strategy = field(default_factory=Strategy)
    """fedavg, fedprox, fedavgm or ddp, and their settings (microfed.training.aggregation)."""
    patience: int = 0
    """Stop after this many rounds without a better validation accuracy; 0 runs every round."""
    collective_timeout_minutes: float = 0.0
    """Bound on every collective (the end-of-round average waits for the slowest rank's local epochs), on the
    rendezvous and on the final barrier, minutes; 0 = DEFAULT_COLLECTIVE_TIMEOUT_MINUTES. A rank that waits
    longer exits as if its peer were lost (exit 200, restartable)."""
    stall_minutes: float = 0.0
    """Under the local launcher: a rank that has made no progress of its own (no training step, no new step) for
    this long is named in a warning line, minutes; 0 = DEFAULT_STALL_FRACTION of the collective timeout. At most
    the collective timeout, at which the run ends with that rank named as the error."""

    def __post_init__(self) -> None:
        # The Kubeflow UI starts runs without the CLI's checks: every number is checked here too (nan included).
        five_digits = "round checkpoints are numbered with five digits"
        require_int("rounds", self.rounds, low=1, high=MAX_ROUNDS, flag="--rounds", pipeline=True, why=five_digits)
        for name, value, low in (("local_epochs", self.local_epochs, 1), ("patience", self.patience, 0)):
            require_int(name, value, low=low, high=MAX_EXACT_INT, flag="--" + name.replace("_", "-"), pipeline=True)
        require_int("seed", self.seed, low=0, high=MAX_EXACT_INT, flag="--seed", pipeline=True)
        require_int("threads", self.threads, low=0, high=MAX_THREADS, flag="--threads", why="0: the machine decides")
        if self.device not in ("auto", "cpu", "cuda"):
            raise MicrofedError(f"unknown --device {self.device!r}", hint="use auto, cpu or cuda")
        require_float(
            "collective_timeout_minutes",
            self.collective_timeout_minutes,
            low=0.0,
            high=MAX_TIMEOUT_MINUTES,
            flag="--collective-timeout-minutes",
            pipeline=True,
            why=f"0: the default of {DEFAULT_COLLECTIVE_TIMEOUT_MINUTES:g}",
        )
        timeout = collective_timeout(self).total_seconds() / 60
        require_float(
            "stall_minutes",
            self.stall_minutes,
            low=0.0,
            high=timeout,
            flag="--stall-minutes",
            why=f"0: a third of the collective timeout; a stall is reported before that timeout ({timeout:g} min) "
            "ends the run",
        )


def collective_timeout(cfg: WorkerConfig) -> datetime.timedelta:
    """The timeout the process group is created with (it bounds every collective and the rendezvous)."""
    return datetime.timedelta(minutes=cfg.collective_timeout_minutes or DEFAULT_COLLECTIVE_TIMEOUT_MINUTES)


def stall_timeout(cfg: WorkerConfig) -> datetime.timedelta:
    """How long a rank may make no progress of its own before the local launcher warns about it."""
    return datetime.timedelta(minutes=cfg.stall_minutes) or collective_timeout(cfg) * DEFAULT_STALL_FRACTION


class _Progress:
    """This rank's progress record for the local launcher's stall watch (PROGRESS_DIR_ENV; training/launch.py).

    `doing` says what the rank does, with its round; `waiting` marks a collective, where a rank waits for its
    peers and is not the one to blame. The record is rewritten (atomically: a new file renamed over the old) when
    that changes, and on `tick` at most every `every` seconds. Without the variable (a PyTorchJob replica,
    torchrun) nothing is written; a record that cannot be written is given up, never the training.
    """

    def __init__(self, folder: str | None, rank: int, stall: float, timeout: float) -> None:
        self.path = Path(folder) / progress_file(rank) if folder else None
        self.fixed = {"pid": os.getpid(), "rank": rank, "stall_seconds": stall, "timeout_seconds": timeout}
        self.every = min(5.0, stall / 10)
        self.doing, self.waiting, self.written = "starting", False, 0.0

    @classmethod
    def from_environ(cls, cfg: WorkerConfig, rank: int) -> _Progress:
        folder = os.environ.get(PROGRESS_DIR_ENV) or None
        return cls(folder, rank, stall_timeout(cfg).total_seconds(), collective_timeout(cfg).total_seconds())

    def set(self, doing: str, *, waiting: bool = False) -> None:
        self.doing, self.waiting = doing, waiting
        self._write()

    def tick(self) -> None:
        if self.path is not None and time.monotonic() - self.written >= self.every:
            self._write()

    @contextlib.contextmanager
    def waiting_for(self, what: str) -> Iterator[None]:
        """Mark a collective; after it the rank is back at what it did before, with a fresh time (a failed one
        ends the process: the record stays as it was)."""
        before, was_waiting = self.doing, self.waiting
        self.set(what, waiting=True)
        yield
        self.set(before, waiting=was_waiting)

    def _write(self) -> None:
        if self.path is None:
            return
        record = {**self.fixed, "doing": self.doing, "waiting": self.waiting, "time": time.time()}
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        try:
            temporary.write_text(json.dumps(record), encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError:
            self.path = None
        self.written = time.monotonic()


# This process's record; main() replaces it (run_worker called directly, as tests do, writes none).
_progress = _Progress(None, 0, 1.0, 1.0)


@dataclass(frozen=True)
class DistEnv:
    """The Training Operator's contract, read from the environment."""

    rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> DistEnv:
        env = dict(os.environ if environ is None else environ)

        def integer(name: str, default: str | None) -> int:
            raw = env.get(name, default)
            if raw is None:
                raise MicrofedError(
                    f"environment variable {name} is not set",
                    hint="run under a PyTorchJob, torchrun, or microfed's launcher",
                )
            try:
                return int(raw)
            except ValueError:
                raise MicrofedError(f"environment variable {name}={raw!r} is not an integer") from None

        world = integer("WORLD_SIZE", "1")
        rank = integer("RANK", "0")
        if not (world >= 1 and 0 <= rank < world):
            raise MicrofedError(f"RANK={rank} must be in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
        return cls(
            rank=rank,
            world_size=world,
            local_world_size=integer("LOCAL_WORLD_SIZE", "1"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=integer("MASTER_PORT", "29500"),
        )


def _device(cfg: WorkerConfig, env: DistEnv) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MicrofedError("--device cuda was asked for but no CUDA device is visible")
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _log(env: DistEnv, message: str) -> None:
    if env.rank == 0:
        print(f"[microfed worker] {message}", flush=True)


@dataclass
class _Local:
    """What one worker trains with: its model, shard, optimiser state and random stream."""

    model: torch.nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    preprocess: Preprocess
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    amp: torch.dtype | None
    trainer: torch.nn.Module
    """What the epochs run: the model, or its DistributedDataParallel wrapper (ddp)."""
    steps: int | None
    """Batches per epoch when every rank must take the same number (ddp); None: one pass over the shard."""
    averaged: set[str]
    """The state_dict keys the in-job averages combine (all but BatchNorm's under fedbn)."""
    server: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Strategy state every rank holds alike: "momentum" (fedavgm), "best" (rank 0: the best round's model)."""
    best: dict[str, Any] = field(default_factory=lambda: {"round": 0, "val_accuracy": -1.0})


def run_worker(cfg: WorkerConfig, env: DistEnv) -> dict[str, Any]:
    """Train this rank's shard; return (and write) the worker's record. Assumes the process group is up.

    With gs:// URIs, the worker downloads only its own shard and the validation split, and uploads what it wrote
    when it finishes (nothing when it fails).
    """
    _progress.set("fetching its shard")
    own = [f"shard-{env.rank:05d}.safetensors", f"shard-{env.rank:05d}.json"]
    if cfg.eval_every_round and cfg.rounds > 1 and exists(join(cfg.shards, "val.json")):
        own += ["val.safetensors", "val.json"]
    with (
        staged_input(cfg.shards, only=["dataset.json", *own]) as shards,
        staged_output(cfg.out) as out,
    ):
        return _run(cfg, env, shards, out)


def _run(cfg: WorkerConfig, env: DistEnv, shards: Path, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    summary = read_dataset_manifest(shards)
    if len(summary["shards"]) != env.world_size:
        raise MicrofedError(
            f"{cfg.shards} holds {len(summary['shards'])} shards but WORLD_SIZE={env.world_size}",
            hint="start one worker per shard",
        )
    device = _device(cfg, env)
    monitor = UsageMonitor(device).start()  # peak memory, CPU and GPU use: the next plan starts from them
    torch.set_num_threads(cfg.threads or max(1, usable_cores() // max(1, env.local_world_size)))
    _progress.set("loading its shard")
    shard = load_shard(shards, env.rank)
    c, h, w = summary["image_shape"]
    arch = ModelConfig(name=cfg.model, num_classes=len(summary["class_names"]), in_channels=c, image_size=(h, w))
    if env.rank == 0:
        write_json(out / MODEL_CONFIG_FILE, ModelCard.from_manifest(arch, summary).to_dict())
    local = _prepare(cfg, env, arch, summary, shard.images, shard.labels, device)
    fingerprint = _fingerprint(cfg, env, summary)
    resumed, rounds = _resume(cfg, env, local, fingerprint)
    _progress.set("loading the validation split")
    val = load_val_set(shards) if cfg.eval_every_round and cfg.rounds > 1 else None
    last = cfg.rounds
    for r in range(resumed + 1, cfg.rounds + 1):
        record = _train_round(cfg, env, local, r)
        _check_finite(local.model.state_dict(), env, r, cfg.rounds)  # a diverged worker never enters the average
        rounds.append(record)
        if r == cfg.rounds:  # the last average is the aggregate step's (ddp: the ranks settle BatchNorm here)
            if cfg.strategy.name == "ddp" and env.world_size > 1:
                _average(cfg, env, local, shard.num_examples, None, arch.num_classes, r)
            break
        record.update(_average(cfg, env, local, shard.num_examples, val, arch.num_classes, r))
        if "val_accuracy" in record:
            _log(env, f"round {r}/{cfg.rounds}: global model validation accuracy {record['val_accuracy']:.4f}")
            _keep_best(env, local, r, record["val_accuracy"])
        _checkpoint(cfg, env, local, r, fingerprint, rounds)
        if cfg.patience and val is not None and r - local.best["round"] >= cfg.patience:
            _log(env, f"stopping early after round {r}: no better validation accuracy for {cfg.patience} rounds")
            last = r
            break
    strategy = cfg.strategy.to_metadata()
    meta = {
        "n_k": str(shard.num_examples),
        "rank": str(env.rank),
        "rounds": str(last),
        ARCHITECTURE_KEY: json.dumps(arch.to_dict(), sort_keys=True),
        **strategy,
    }
    _progress.set(f"writing its micro-model after round {last}/{cfg.rounds}")
    write_safetensors(out / micro_model_name(env.rank), local.model.state_dict(), meta)
    if env.rank == 0:
        _write_server_files(cfg, local, out, rounds, last, strategy)
    worker = {
        "rank": env.rank,
        "n_k": shard.num_examples,
        "file": micro_model_name(env.rank),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "resumed_from_round": resumed,
        "stopped_after_round": last,
        "seconds": time.perf_counter() - started,
        "usage": monitor.stop(ep["seconds"] for rec in rounds for ep in rec["epochs"]).to_dict(),
    }
    write_json(out / f"worker-{env.rank:05d}.json", worker)
    _progress.set("uploading its outputs")
    return worker


def _keep_best(env: DistEnv, local: _Local, r: int, accuracy: float) -> None:
    """Remember round r's global model when its validation accuracy beats every earlier round's (ties: the
    earlier round, as early stopping counts only improvements).
    Every rank sees the same all-reduced accuracy; only rank 0 keeps a copy of the weights."""
    if accuracy > local.best["val_accuracy"]:
        local.best = {"round": r, "val_accuracy": accuracy}
        if env.rank == 0:
            local.server["best"] = {k: t.detach().to("cpu", copy=True) for k, t in local.model.state_dict().items()}


def _write_server_files(
    cfg: WorkerConfig, local: _Local, out: Path, rounds: list[dict[str, Any]], last: int, strategy: dict[str, str]
) -> None:
    """What the aggregate step needs besides the micro-models: the validation history and the best in-job
    round's model (to select the best round), and fedavgm's server state (to apply the last server update)."""
    info: dict[str, Any] = {
        "strategy": dataclasses.asdict(cfg.strategy),
        "rounds": cfg.rounds,
        "stopped_after_round": last,
        "val": [
            {k: r[k] for k in ("round", "val_accuracy", "val_loss") if k in r} for r in rounds if "val_accuracy" in r
        ],
        "best_round": local.best["round"] or None,
        "best_val_accuracy": local.best["val_accuracy"] if local.best["round"] else None,
    }
    if "best" in local.server:
        write_safetensors(out / BEST_ROUND_FILE, local.server["best"], {"round": str(local.best["round"]), **strategy})
        info["best_file"] = BEST_ROUND_FILE
    # an early stop ends on an averaged model: the aggregate step must not apply another server update
    if cfg.strategy.name == "fedavgm" and last == cfg.rounds and "global" in local.server:
        tensors = {f"global.{k}": t for k, t in local.server["global"].items()}
        tensors.update({f"momentum.{k}": t for k, t in local.server.get("momentum", {}).items()})
        write_safetensors(out / SERVER_STATE_FILE, tensors, strategy)
        info["server_state_file"] = SERVER_STATE_FILE
    write_json(out / ROUNDS_FILE, info)


@contextlib.contextmanager
def _collective(env: DistEnv, what: str) -> Iterator[None]:
    """Turn a failed collective (gloo/NCCL raise RuntimeError when a peer's connection drops or times out)
    into PeerLost, which `main` reports with EXIT_PEER_LOST so that the group is restarted and resumes.

    The progress record marks the rank as waiting for its peers meanwhile (alone, it waits for none)."""
    try:
        with _progress.waiting_for(what) if env.world_size > 1 else _doing(what):
            yield
    except RuntimeError as e:
        if env.world_size == 1 or isinstance(e, PeerLost):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerLost(f"worker {env.rank}: {what} failed, a peer is gone ({first})") from e


@contextlib.contextmanager
def _doing(what: str) -> Iterator[None]:
    _progress.set(what)
    yield


def _fingerprint(cfg: WorkerConfig, env: DistEnv, summary: Mapping[str, Any]) -> dict[str, Any]:
    """What decides the training trajectory: a checkpoint only resumes a job with the same fingerprint."""
    return {
        "model": cfg.model,
        "rounds": cfg.rounds,
        "local_epochs": cfg.local_epochs,
        "optim": dataclasses.asdict(cfg.optim),
        "seed": cfg.seed,
        "strategy": dataclasses.asdict(cfg.strategy),
        "patience": cfg.patience,
        "world_size": env.world_size,
        "shards": [s["sha256"] for s in summary["shards"]],
    }


def _resume(
    cfg: WorkerConfig, env: DistEnv, local: _Local, fingerprint: dict[str, Any]
) -> tuple[int, list[dict[str, Any]]]:
    """The last checkpointed round (0: none) and this rank's records so far; loads the checkpoint's state.

    Rank 0 alone lists the checkpoints and broadcasts the round, so every rank resumes from the same one even
    if a later checkpoint appeared while they looked.
    """
    chosen = torch.tensor([latest_round(str(cfg.out)) if env.rank == 0 else 0], dtype=torch.int64)
    if env.world_size > 1:
        with _collective(env, "agreeing on the round to resume from"):
            chosen = chosen.to(_comm_device())
            dist.broadcast(chosen, src=0)
    resumed = int(chosen.item())
    if resumed == 0:
        return 0, []
    _progress.set(f"reading round {resumed}'s checkpoint")
    ckpt = read_checkpoint(str(cfg.out), resumed, fingerprint=fingerprint, world_size=env.world_size)
    local.model.load_state_dict(ckpt.weights)
    for key, t in ckpt.server.items():  # "momentum.<name>", "best.<name>"
        part, name = key.split(".", 1)
        local.server.setdefault(part, {})[name] = t.to(next(iter(local.model.state_dict().values())).device)
    if env.rank != 0:
        local.server.pop("best", None)
    local.best = dict(ckpt.server_info.get("best") or local.best)
    records = restore_rank_state(ckpt.ranks[env.rank], local.optimizer, local.scheduler, local.generator)
    _log(env, f"resuming after round {resumed}/{cfg.rounds} from {checkpoint_uri(str(cfg.out), resumed)}")
    return resumed, records


def _checkpoint(
    cfg: WorkerConfig, env: DistEnv, local: _Local, r: int, fingerprint: dict[str, Any], rounds: list[dict[str, Any]]
) -> None:
    """Gather every rank's state to rank 0, which commits round r's checkpoint; then all ranks wait for the
    commit, so a crash in round r+1 always finds round r's checkpoint."""
    mine = encode_rank_state(capture_rank_state(local.optimizer, local.scheduler, local.generator, rounds))
    with _collective(env, f"gathering round {r}'s checkpoint"):
        states = gather_bytes(mine, env.world_size)
    if env.rank == 0:
        server = {f"{part}.{k}": t for part, ts in local.server.items() if part != "global" for k, t in ts.items()}
        data = build_checkpoint(
            r,
            fingerprint,
            local.model.state_dict(),
            [decode_rank_state(b) for b in states],
            server=server,
            server_info={"best": local.best},
        )
        _progress.set(f"writing round {r}'s checkpoint")
        uri = write_checkpoint(str(cfg.out), r, data)
        _log(env, f"round {r}/{cfg.rounds}: checkpoint {uri} ({len(data) / 1e6:.1f} MB)")
    if env.world_size > 1:
        with _collective(env, f"waiting for round {r}'s checkpoint"):
            dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors must live for collectives: NCCL moves CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_finite(state: Mapping[str, torch.Tensor], env: DistEnv, r: int, rounds: int) -> None:
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MicrofedError(
                f"worker {env.rank} diverged in round {r}/{rounds}: its weights hold NaN or Inf (tensor {key!r})",
                hint="lower --lr or use --optimizer sgd; the job stops rather than average a diverged model",
            )


def _prepare(
    cfg: WorkerConfig,
    env: DistEnv,
    arch: ModelConfig,
    summary: dict[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
) -> _Local:
    preprocess = Preprocess(summary["mean"], summary["std"], device, cfg.optim.augment)
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights ...
    model = _build_checked(arch, device, preprocess(images[:2]))
    if env.world_size > 1:  # ... and rank 0's are broadcast anyway, so a rank-dependent factory cannot diverge
        with _collective(env, "broadcasting the initial weights"):
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
    if device.type == "cuda":
        images, labels = images.to(device), labels.to(device)
    steps = None
    trainer: torch.nn.Module = model
    if cfg.strategy.name == "ddp":
        # DDP all-reduces gradients every step, so every rank takes as many steps as the largest shard needs
        # (smaller shards wrap around, as DistributedSampler pads) and the schedules stay in step.
        steps = -(-max(s["num_examples"] for s in summary["shards"]) // cfg.optim.batch_size)
        if env.world_size > 1:
            trainer = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.index is not None else None
            )
    steps_per_epoch = steps or -(-labels.numel() // cfg.optim.batch_size)
    opt = make_optimizer(model, cfg.optim)
    keys = set(model.state_dict())
    if cfg.strategy.fedbn:
        bn = batchnorm_keys(model)
        if not bn:
            _log(env, f"fedbn: {cfg.model} has no BatchNorm layers, so every layer is averaged")
        keys -= bn
    return _Local(
        model=model,
        images=images,
        labels=labels,
        preprocess=preprocess,
        optimizer=opt,
        # one schedule over the whole job, so rounds continue it rather than restart it
        scheduler=make_scheduler(opt, cfg.optim, cfg.rounds * cfg.local_epochs * steps_per_epoch),
        generator=torch.Generator().manual_seed(cfg.seed + 1000 * (env.rank + 1)),
        amp=autocast_dtype(cfg.optim.precision, device),
        trainer=trainer,
        steps=steps,
        averaged=keys,
    )


def _build_checked(arch: ModelConfig, device: torch.device, batch: torch.Tensor) -> torch.nn.Module:
    """The model, on `device`, once it has shown that it can be trained: a factory that raises, a model without
    trainable parameters, or one whose output for `batch` is not (batch, num_classes) logits, is one MicrofedError
    line naming the factory, before the first epoch (and alike on every rank, so all of them stop with it)."""
    _progress.set("building and checking the model")
    try:
        model = build_model(arch)
    except Exception as err:  # the user's factory: whatever it raises, there is no model to train
        if isinstance(err, MicrofedError) or ":" not in arch.name:
            raise
        text = str(err).strip()
        raise MicrofedError(
            f"model factory {arch.name!r} raised {type(err).__name__}: {text.splitlines()[0] if text else '-'}",
            hint=f"it is called as {arch.name.rpartition(':')[2]}(num_classes={arch.num_classes}, "
            f"in_channels={arch.in_channels}, image_size={arch.image_size}) and must return a torch.nn.Module",
        ) from err
    model = model.to(device).to(memory_format=torch.channels_last)
    check_model(model, arch, batch)
    return model


def _train_round(cfg: WorkerConfig, env: DistEnv, local: _Local, r: int) -> dict[str, Any]:
    strategy = cfg.strategy
    if strategy.name == "fedavgm":  # the global model this round starts from: the server update's reference
        local.server["global"] = {
            k: t.detach().clone() for k, t in local.model.state_dict().items() if k in local.averaged
        }
    after_backward = None
    if strategy.name == "fedprox":
        params = [p for p in local.model.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in params]  # w_global, the model the round started from
        mu = strategy.mu

        def after_backward() -> None:
            proximal_step(params, anchor, mu)

    # ddp all-reduces the gradients inside every step: a rank that waits there for a stalled peer looks just like
    # it, so its steps count as waiting (the collective timeout still ends a stall; no rank is named)
    synchronized = strategy.name == "ddp" and env.world_size > 1
    epochs = []
    for e in range(1, cfg.local_epochs + 1):
        _progress.set(f"training round {r}/{cfg.rounds}, local epoch {e}/{cfg.local_epochs}", waiting=synchronized)
        try:
            stats = train_epoch(
                local.trainer,
                local.images,
                local.labels,
                preprocess=local.preprocess,
                optimizer=local.optimizer,
                scheduler=local.scheduler,
                batch_size=cfg.optim.batch_size,
                generator=local.generator,
                amp_dtype=local.amp,
                steps=local.steps,
                after_backward=after_backward,
                on_step=_progress.tick,
            )
        except MicrofedError as err:  # a diverged loss: say which worker and when, for every rank's log
            raise MicrofedError(
                f"worker {env.rank} diverged in round {r}/{cfg.rounds}, local epoch {e}/{cfg.local_epochs}: "
                f"{err.message}",
                hint=err.hint,
            ) from None
        epochs.append(dataclasses.asdict(stats))
        _log(
            env,
            f"round {r}/{cfg.rounds} epoch {e}/{cfg.local_epochs}: loss {stats.loss:.4f} "
            f"train acc {stats.accuracy:.4f} ({stats.examples / stats.seconds:.0f} img/s on rank 0)",
        )
    return {"round": r, "epochs": epochs}


def _average(
    cfg: WorkerConfig, env: DistEnv, local: _Local, n_k: int, val: Shard | None, num_classes: int, r: int
) -> dict[str, Any]:
    """In-job combination of all ranks' models by the strategy (the weighted average, weights n_k / n; fedavgm's
    server update; fedbn's BatchNorm layers left out), then the global model's validation metrics."""
    out: dict[str, Any] = {}
    fedavgm = cfg.strategy.name == "fedavgm"
    with _collective(env, f"averaging round {r}"):
        if env.world_size > 1 or fedavgm:
            start = time.perf_counter()
            state = local.model.state_dict()
            mine = {k: t for k, t in state.items() if k in local.averaged}
            average = allreduce_average(mine, float(n_k)) if env.world_size > 1 else mine
            if fedavgm:
                average, local.server["momentum"] = server_update(
                    local.server["global"],
                    average,
                    local.server.get("momentum"),
                    beta=cfg.strategy.server_momentum,
                    lr=cfg.strategy.server_lr,
                )
            local.model.load_state_dict({**state, **average})  # fedbn: BatchNorm keys stay this rank's
            out["average_seconds"] = time.perf_counter() - start
        if val is not None:
            lo, hi = _slice(val.num_examples, env)
            res = evaluate(
                local.model,
                val.images[lo:hi],
                val.labels[lo:hi],
                preprocess=local.preprocess,
                num_classes=num_classes,
                all_reduce=env.world_size > 1,
            )
            out["val_accuracy"], out["val_loss"] = res.accuracy, res.loss
    return out


def _slice(n: int, env: DistEnv) -> tuple[int, int]:
    """This rank's contiguous part of n test examples."""
    per = -(-n // env.world_size)
    return min(n, env.rank * per), min(n, (env.rank + 1) * per)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m microfed.training.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d, o = WorkerConfig, OptimConfig
    p.add_argument("--shards", required=True, help="folder (or gs:// URI) written by the split step")
    p.add_argument("--out", required=True, help="folder (or gs:// URI) for micro-models and records")
    p.add_argument("--model", default=d.model)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--local-epochs", type=int, default=d.local_epochs)
    p.add_argument("--batch-size", type=int, default=o.batch_size)
    p.add_argument("--optimizer", default=o.optimizer)
    p.add_argument("--lr", type=float, default=o.lr)
    p.add_argument("--weight-decay", type=float, default=o.weight_decay)
    p.add_argument("--momentum", type=float, default=o.momentum)
    p.add_argument("--schedule", default=o.schedule)
    p.add_argument("--augment", default=o.augment)
    p.add_argument("--precision", default=o.precision)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--no-eval-every-round", dest="eval_every_round", action="store_false")
    st = Strategy()
    p.add_argument("--strategy", default=st.name, help="fedavg, fedprox, fedavgm or ddp")
    p.add_argument("--mu", type=float, default=st.mu, help="fedprox: proximal term weight")
    p.add_argument("--server-momentum", type=float, default=st.server_momentum, help="fedavgm: server momentum")
    p.add_argument("--server-lr", type=float, default=st.server_lr, help="fedavgm: server learning rate")
    p.add_argument("--fedbn", action="store_true", help="keep BatchNorm layers out of the in-job averages")
    p.add_argument("--patience", type=int, default=d.patience, help="early stopping: rounds without a better val acc")
    p.add_argument(
        "--collective-timeout-minutes",
        type=float,
        default=d.collective_timeout_minutes,
        help=f"bound on every collective and the rendezvous; 0 = {DEFAULT_COLLECTIVE_TIMEOUT_MINUTES:g}",
    )
    p.add_argument(
        "--stall-minutes",
        type=float,
        default=d.stall_minutes,
        help="local launcher: warn about a worker without progress for this long; 0 = a third of the timeout",
    )
    return p


def parse_config(argv: Sequence[str] | None = None) -> WorkerConfig:
    a = build_parser().parse_args(argv)
    optim = OptimConfig(
        optimizer=a.optimizer,
        lr=a.lr,
        weight_decay=a.weight_decay,
        momentum=a.momentum,
        schedule=a.schedule,
        augment=a.augment,
        batch_size=a.batch_size,
        precision=a.precision,
    )
    return WorkerConfig(
        shards=a.shards,
        out=a.out,
        model=a.model,
        rounds=a.rounds,
        local_epochs=a.local_epochs,
        optim=optim,
        seed=a.seed,
        device=a.device,
        threads=a.threads,
        eval_every_round=a.eval_every_round,
        strategy=Strategy(
            name=a.strategy, mu=a.mu, server_momentum=a.server_momentum, server_lr=a.server_lr, fedbn=a.fedbn
        ),
        patience=a.patience,
        collective_timeout_minutes=a.collective_timeout_minutes,
        stall_minutes=a.stall_minutes,
    )


def config_to_argv(cfg: WorkerConfig) -> list[str]:
    """The command-line flags that make `parse_config` return `cfg` (used by launchers)."""
    o = cfg.optim
    argv = [
        "--shards",
        str(cfg.shards),
        "--out",
        str(cfg.out),
        "--model",
        cfg.model,
        "--rounds",
        str(cfg.rounds),
        "--local-epochs",
        str(cfg.local_epochs),
        "--batch-size",
        str(o.batch_size),
        "--optimizer",
        o.optimizer,
        "--lr",
        repr(o.lr),
        "--weight-decay",
        repr(o.weight_decay),
        "--momentum",
        repr(o.momentum),
        "--schedule",
        o.schedule,
        "--augment",
        o.augment,
        "--precision",
        o.precision,
        "--seed",
        str(cfg.seed),
        "--device",
        cfg.device,
        "--threads",
        str(cfg.threads),
        "--strategy",
        cfg.strategy.name,
        "--mu",
        repr(cfg.strategy.mu),
        "--server-momentum",
        repr(cfg.strategy.server_momentum),
        "--server-lr",
        repr(cfg.strategy.server_lr),
        "--patience",
        str(cfg.patience),
        "--collective-timeout-minutes",
        repr(cfg.collective_timeout_minutes),
        "--stall-minutes",
        repr(cfg.stall_minutes),
    ]
    if cfg.strategy.fedbn:
        argv.append("--fedbn")
    return argv if cfg.eval_every_round else [*argv, "--no-eval-every-round"]


def _join(cfg: WorkerConfig, env: DistEnv) -> None:
    """Create the process group, within the collective timeout.

    The rendezvous is rank 0's TCPStore. A replica the operator has just recreated (its pod exited 128-255) can
    find the store of the group it belonged to still up: rank 0 of that group notices the loss only at its next
    collective, up to a round later. Joining it would read that group's addresses (gloo then fails, or hangs past
    the timeout), so each process counts itself in the store first, and one that counts more than WORLD_SIZE
    members waits for that store to go away and tries again.

    A rendezvous that fails (a peer that never came, a Master not reachable) is PeerLost like a failed collective:
    the group should be restarted, not the job failed. A backend this process cannot use is the caller's error.
    """
    # The PyTorchJob builder sets MICROFED_BACKEND from the resource plan; by hand, CUDA decides.
    default = "nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo"
    backend = os.environ.get("MICROFED_BACKEND") or default
    if backend not in ("gloo", "nccl") or not dist.is_backend_available(backend):
        raise MicrofedError(
            f"MICROFED_BACKEND={backend!r} is not a process-group backend this torch has", hint="use gloo or nccl"
        )
    if backend == "nccl" and not torch.cuda.is_available():
        raise MicrofedError(
            f"the nccl backend needs a CUDA device, and this process sees none (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'})",
            hint="run the GPU plan on a GPU node with a CUDA build of torch, or plan for CPU (gloo)",
        )
    timeout = collective_timeout(cfg)
    deadline = time.monotonic() + timeout.total_seconds()
    where = f"{env.master_addr}:{env.master_port}"
    # under torchrun the elastic agent serves the store (a new one for each restart of the group), as torch's
    # own tcp:// rendezvous assumes
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        while True:
            left = datetime.timedelta(seconds=max(1.0, deadline - time.monotonic()))
            store = dist.TCPStore(
                env.master_addr,
                env.master_port,
                env.world_size,
                is_master=env.rank == 0 and not agent_store,
                timeout=left,
                wait_for_workers=False,
            )
            members = store.add(_MEMBERS_KEY, 1)
            if members <= env.world_size:
                break
            del store  # the previous group's store: wait until its rank 0 exits
            if time.monotonic() >= deadline:
                raise PeerLost(
                    f"worker {env.rank}: the group at {where} was still the previous one ({members} members for "
                    f"WORLD_SIZE={env.world_size}) after {timeout.total_seconds() / 60:g} min"
                )
            print(
                f"[microfed worker] worker {env.rank}: the group at {where} is still the previous one; "
                f"waiting for it to end",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(_STALE_GROUP_RETRY_SECONDS)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    except RuntimeError as e:  # DistStoreError / DistNetworkError (timeouts, refused), a failed gloo/NCCL connect
        if isinstance(e, PeerLost):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerLost(
            f"worker {env.rank}: joining the group at {where} failed within {timeout.total_seconds() / 60:g} min "
            f"({first})"
        ) from e


def _finish(env: DistEnv) -> None:
    """Wait until every rank's outputs are durable (run_worker returns after its uploads) before any rank, and
    so the Master, exits: the Training Operator ends the job when the Master succeeds."""
    if env.world_size > 1:
        with _collective(env, "waiting for every rank's outputs to be uploaded"):
            dist.barrier()


def main(argv: Sequence[str] | None = None) -> int:
    global _progress
    try:
        cfg = parse_config(argv)
        env = DistEnv.from_environ()
        _progress = _Progress.from_environ(cfg, env.rank)
        if env.world_size > 1:
            with _progress.waiting_for("joining the worker group"):
                _join(cfg, env)
        try:
            run_worker(cfg, env)
            _finish(env)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except MicrofedError as e:
        print(f"[microfed worker] error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except PeerLost as e:
        print(
            f"[microfed worker] {e}; exiting with {EXIT_PEER_LOST} to have the group restarted",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_PEER_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main())
