"""The worker's round loop: R rounds of E local epochs on this rank's shard, each followed (rounds 1..R-1) by the
strategy's in-job combine, the global model's validation metrics, and a round checkpoint; after round R the
micro-model, n_k and the records the aggregate step reads.

What differs between strategies is asked of the strategy's hooks (microfed.training.strategies): the keys it
combines, what the epochs run, a per-step gradient term, the in-job combine and its server state.

Models. Before the first epoch, every rank runs one batch of its shard through the model it built and refuses, with
one line that names the model or factory, a factory that raises, a model without trainable parameters, and an
output that is not (batch, num_classes) logits (microfed.training.models.check_model).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from microfed.training.aggregation import ARCHITECTURE_KEY
from microfed.training.errors import MicrofedError
from microfed.training.evaluation import evaluate
from microfed.training.io import write_json, write_safetensors
from microfed.training.launch import usable_cores
from microfed.training.layout import (
    BEST_ROUND_FILE,
    DATASET_FILE,
    MODEL_CONFIG_FILE,
    ROUNDS_FILE,
    SERVER_STATE_FILE,
    VAL_FILES,
    DatasetManifest,
    WorkerRecord,
    micro_model_file,
    shard_files,
    write_worker_record,
)
from microfed.training.local_sgd import InRoundSync, settle_optimizer
from microfed.training.model_files import ModelCard
from microfed.training.models import ModelConfig, build_model, check_model
from microfed.training.shards import Shard, load_shard, load_val_set, read_dataset_manifest
from microfed.training.step_log import event
from microfed.training.storage import exists, join, staged_input, staged_output
from microfed.training.strategies import GLOBAL_PART, FederatedStrategy, ServerState, pack_server_state
from microfed.training.train import (
    Preprocess,
    autocast_dtype,
    make_optimizer,
    make_scheduler,
    train_epoch,
)
from microfed.training.usage import UsageMonitor
from microfed.training.worker_config import WorkerConfig
from microfed.training.worker_group import DistEnv, collective, device_for, log
from microfed.training.worker_progress import progress
from microfed.training.worker_resume import checkpoint, fingerprint_of, resume

__all__ = ["Local", "run_worker"]


@dataclass
class Local:
    """What one worker trains with: its model, shard, optimiser state and random stream."""

    model: torch.nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    preprocess: Preprocess
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    amp: torch.dtype | None
    strategy: FederatedStrategy
    trainer: torch.nn.Module
    """What the epochs run: the model, or a wrapper of it (ddp: DistributedDataParallel)."""
    steps: int | None
    """Batches per epoch when every rank must take the same number (ddp); None: one pass over the shard."""
    averaged: set[str]
    """The state_dict keys the in-job combines take (all but BatchNorm's under fedbn)."""
    share: float
    """This rank's weight in the averages, n_k / n."""
    in_round: InRoundSync | None = None
    """The averages inside the rounds (--sync-every-steps, more than one worker)."""
    server: ServerState = field(default_factory=dict)
    """The strategy's server state, alike on every rank (FedAvgM's "momentum"; FedAdam's "m" and "v")."""
    global_state: dict[str, torch.Tensor] | None = None
    """The model this round started from (strategies that need it: FedProx's anchor, the server step's reference)."""
    best_state: dict[str, torch.Tensor] | None = None
    """Rank 0: the best in-job round's model."""
    best: dict[str, Any] = field(default_factory=lambda: {"round": 0, "val_accuracy": -1.0})


def run_worker(cfg: WorkerConfig, env: DistEnv) -> WorkerRecord:
    """Train this rank's shard; return (and write) the worker's record. Assumes the process group is up.

    With gs:// URIs, the worker downloads only its own shard and the validation split, and uploads what it wrote
    when it finishes (nothing when it fails).
    """
    progress().set("fetching its shard")
    own = [*shard_files(env.rank)]
    if cfg.eval_every_round and cfg.rounds > 1 and exists(join(cfg.shards, VAL_FILES.manifest)):
        own += VAL_FILES
    with (
        staged_input(cfg.shards, only=[DATASET_FILE, *own]) as shards,
        staged_output(cfg.out) as out,
    ):
        return _run(cfg, env, shards, out)


def _run(cfg: WorkerConfig, env: DistEnv, shards: Path, out: Path) -> WorkerRecord:
    started = time.perf_counter()
    summary = read_dataset_manifest(shards)
    if len(summary["shards"]) != env.world_size:
        raise MicrofedError(
            f"{cfg.shards} holds {len(summary['shards'])} shards but WORLD_SIZE={env.world_size}",
            hint="start one worker per shard",
        )
    cfg = dataclasses.replace(cfg, optim=cfg.optim.for_workers(env.world_size))  # --global-batch-size's share
    device = device_for(cfg, env)
    monitor = UsageMonitor(device).start()  # peak memory, CPU and GPU use: the next plan starts from them
    torch.set_num_threads(cfg.threads or max(1, usable_cores() // max(1, env.local_world_size)))
    progress().set("loading its shard")
    shard = load_shard(shards, env.rank)
    c, h, w = summary["image_shape"]
    arch = ModelConfig(name=cfg.model, num_classes=len(summary["class_names"]), in_channels=c, image_size=(h, w))
    if env.rank == 0:
        write_json(out / MODEL_CONFIG_FILE, ModelCard.from_manifest(arch, summary).to_dict())
    local = _prepare(cfg, env, arch, summary, shard.images, shard.labels, device)
    fingerprint = fingerprint_of(cfg, env, summary)
    resumed, rounds = resume(cfg, env, local, fingerprint)
    progress().set("loading the validation split")
    val = load_val_set(shards) if cfg.eval_every_round and cfg.rounds > 1 else None
    last = cfg.rounds
    for r in range(resumed + 1, cfg.rounds + 1):
        record = _train_round(cfg, env, local, r)
        _check_finite(local.model.state_dict(), env, r, cfg.rounds)  # a diverged worker never enters the average
        rounds.append(record)
        if r == cfg.rounds:  # the last combine is the aggregate step's (synchronous ranks settle BatchNorm here)
            if local.strategy.synchronous and env.world_size > 1:
                _combine(cfg, env, local, shard.num_examples, None, arch.num_classes, r)
            break
        record.update(_combine(cfg, env, local, shard.num_examples, val, arch.num_classes, r))
        if "val_accuracy" in record:
            log(env, f"round {r}/{cfg.rounds}: global model validation accuracy {record['val_accuracy']:.4f}")
            if env.rank == 0:  # the same all-reduced numbers on every rank
                event(
                    "validation", round=r, rounds=cfg.rounds, accuracy=record["val_accuracy"], loss=record["val_loss"]
                )
            _keep_best(env, local, r, record["val_accuracy"])
        checkpoint(cfg, env, local, r, fingerprint, rounds)
        if cfg.patience and val is not None and r - local.best["round"] >= cfg.patience:
            log(env, f"stopping early after round {r}: no better validation accuracy for {cfg.patience} rounds")
            if env.rank == 0:
                event(
                    "stopped_early", round=r, rounds=cfg.rounds, best_round=local.best["round"], patience=cfg.patience
                )
            last = r
            break
    _write_outputs(cfg, env, local, out, shard.num_examples, arch, rounds, last)
    worker: WorkerRecord = {
        "rank": env.rank,
        "n_k": shard.num_examples,
        "file": micro_model_file(env.rank),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "resumed_from_round": resumed,
        "stopped_after_round": last,
        "seconds": time.perf_counter() - started,
        "usage": monitor.stop(ep["seconds"] for rec in rounds for ep in rec["epochs"]).to_dict(),
    }
    write_worker_record(out, worker)
    progress().set("uploading its outputs")
    return worker


def _write_outputs(
    cfg: WorkerConfig,
    env: DistEnv,
    local: Local,
    out: Path,
    n_k: int,
    arch: ModelConfig,
    rounds: list[dict[str, Any]],
    last: int,
) -> None:
    """This rank's micro-model with n_k and its architecture; rank 0's files for the aggregate step."""
    strategy = cfg.strategy.to_metadata()
    meta = {
        "n_k": str(n_k),
        "rank": str(env.rank),
        "rounds": str(last),
        ARCHITECTURE_KEY: json.dumps(arch.to_dict(), sort_keys=True),
        **strategy,
    }
    progress().set(f"writing its micro-model after round {last}/{cfg.rounds}")
    write_safetensors(out / micro_model_file(env.rank), local.model.state_dict(), meta)
    if env.rank == 0:
        _write_server_files(cfg, local, out, rounds, last, strategy)


def _keep_best(env: DistEnv, local: Local, r: int, accuracy: float) -> None:
    """Remember round r's global model when its validation accuracy beats every earlier round's (ties: the
    earlier round, as early stopping counts only improvements).
    Every rank sees the same all-reduced accuracy; only rank 0 keeps a copy of the weights."""
    if accuracy > local.best["val_accuracy"]:
        local.best = {"round": r, "val_accuracy": accuracy}
        if env.rank == 0:
            local.best_state = {k: t.detach().to("cpu", copy=True) for k, t in local.model.state_dict().items()}


def _write_server_files(
    cfg: WorkerConfig, local: Local, out: Path, rounds: list[dict[str, Any]], last: int, strategy: dict[str, str]
) -> None:
    """What the aggregate step needs besides the micro-models: the validation history and the best in-job
    round's model (to select the best round), and a server optimizer's state (to apply the last server step)."""
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
    if local.best_state is not None:
        write_safetensors(out / BEST_ROUND_FILE, local.best_state, {"round": str(local.best["round"]), **strategy})
        info["best_file"] = BEST_ROUND_FILE
    # an early stop ends on a combined model: the aggregate step must not apply another server step
    if local.strategy.server_optimizer and last == cfg.rounds and local.global_state is not None:
        start = {k: t for k, t in local.global_state.items() if k in local.averaged}
        write_safetensors(out / SERVER_STATE_FILE, pack_server_state({GLOBAL_PART: start, **local.server}), strategy)
        info["server_state_file"] = SERVER_STATE_FILE
    write_json(out / ROUNDS_FILE, info)


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
    summary: DatasetManifest,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
) -> Local:
    preprocess = Preprocess(summary["mean"], summary["std"], device, cfg.optim.augment)
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights ...
    model = _build_checked(arch, device, preprocess(images[:2]))
    if env.world_size > 1:  # ... and rank 0's are broadcast anyway, so a rank-dependent factory cannot diverge
        with collective(env, "broadcasting the initial weights"):
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
    if device.type == "cuda":
        images, labels = images.to(device), labels.to(device)
    strategy = cfg.strategy.build()
    trainer, steps = strategy.trainer(
        model,
        device=device,
        world_size=env.world_size,
        largest_shard=max(s["num_examples"] for s in summary["shards"]),
        batch_size=cfg.optim.batch_size,
    )
    steps_per_epoch = steps or -(-labels.numel() // cfg.optim.batch_size)
    opt = make_optimizer(model, cfg.optim)
    averaged = strategy.averaged_keys(model)
    if cfg.strategy.fedbn and averaged == set(model.state_dict()):
        log(env, f"fedbn: {cfg.model} has no BatchNorm layers, so every layer is averaged")
    sizes = [s["num_examples"] for s in summary["shards"]]
    in_round = None
    if cfg.strategy.sync_every_steps and env.world_size > 1:
        in_round = InRoundSync.plan(
            every=cfg.strategy.sync_every_steps,
            n_k=labels.numel(),
            shard_sizes=sizes,
            batch_size=cfg.optim.batch_size,
            model=model,
            optimizer=opt,
            keys=averaged,
            policy=cfg.strategy.sync_optimizer,
            rank=env.rank,
        )
    return Local(
        model=model,
        images=images,
        labels=labels,
        preprocess=preprocess,
        optimizer=opt,
        # one schedule over the whole job, so rounds continue it rather than restart it
        scheduler=make_scheduler(opt, cfg.optim, cfg.rounds * cfg.local_epochs * steps_per_epoch),
        generator=torch.Generator().manual_seed(cfg.seed + 1000 * (env.rank + 1)),
        amp=autocast_dtype(cfg.optim.precision, device),
        strategy=strategy,
        trainer=trainer,
        steps=steps,
        averaged=averaged,
        share=labels.numel() / sum(sizes),
        in_round=in_round,
    )


def _build_checked(arch: ModelConfig, device: torch.device, batch: torch.Tensor) -> torch.nn.Module:
    """The model, on `device`, once it has shown that it can be trained: a factory that raises, a model without
    trainable parameters, or one whose output for `batch` is not (batch, num_classes) logits, is one MicrofedError
    line naming the factory, before the first epoch (and alike on every rank, so all of them stop with it)."""
    progress().set("building and checking the model")
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


def _train_round(cfg: WorkerConfig, env: DistEnv, local: Local, r: int) -> dict[str, Any]:
    strategy = local.strategy
    if strategy.needs_global_state:  # the model this round starts from: FedProx's anchor, the server step's origin
        local.global_state = {k: t.detach().clone() for k, t in local.model.state_dict().items()}
    after_backward = strategy.gradient_term(local.model, local.global_state)
    # synchronous ranks all-reduce the gradients inside every step: a rank that waits there for a stalled peer looks
    # just like it, so its steps count as waiting (the collective timeout still ends a stall; no rank is named). The
    # in-round averages of local SGD are calls of their own, marked as waits (local_sgd.py): a stalled rank is named.
    synchronized = strategy.synchronous and env.world_size > 1
    epochs = []
    for e in range(1, cfg.local_epochs + 1):
        progress().set(f"training round {r}/{cfg.rounds}, local epoch {e}/{cfg.local_epochs}", waiting=synchronized)
        on_step = progress().tick
        if local.in_round is not None:
            on_step = local.in_round.on_step(e == cfg.local_epochs, on_step)
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
                on_step=on_step,
            )
        except MicrofedError as err:  # a diverged loss: say which worker and when, for every rank's log
            raise MicrofedError(
                f"worker {env.rank} diverged in round {r}/{cfg.rounds}, local epoch {e}/{cfg.local_epochs}: "
                f"{err.message}",
                hint=err.hint,
            ) from None
        epochs.append(dataclasses.asdict(stats))
        event(
            "epoch",
            rank=env.rank,
            round=r,
            rounds=cfg.rounds,
            epoch=e,
            epochs=cfg.local_epochs,
            loss=stats.loss,
            accuracy=stats.accuracy,
            examples=stats.examples,
            seconds=round(stats.seconds, 3),
        )
        log(
            env,
            f"round {r}/{cfg.rounds} epoch {e}/{cfg.local_epochs}: loss {stats.loss:.4f} "
            f"train acc {stats.accuracy:.4f} ({stats.examples / stats.seconds:.0f} img/s on rank 0)",
        )
    record: dict[str, Any] = {"round": r, "epochs": epochs}
    if local.in_round is not None:
        record.update(local.in_round.take_counts())
    return record


def _combine(
    cfg: WorkerConfig, env: DistEnv, local: Local, n_k: int, val: Shard | None, num_classes: int, r: int
) -> dict[str, Any]:
    """The strategy's in-job combine of all ranks' models (the weighted average, weights n_k / n, and its server
    step; fedbn's BatchNorm layers left out), then the global model's validation metrics."""
    out: dict[str, Any] = {}
    strategy = local.strategy
    with collective(env, f"averaging round {r}"):
        if env.world_size > 1 or strategy.server_optimizer:
            start = time.perf_counter()
            state = local.model.state_dict()
            mine = {k: t for k, t in state.items() if k in local.averaged}
            origin = None
            if local.global_state is not None:
                origin = {k: t for k, t in local.global_state.items() if k in local.averaged}
            combined, local.server = strategy.combine_in_job(
                mine, n_k, world_size=env.world_size, global_state=origin, state=local.server
            )
            local.model.load_state_dict({**state, **combined})  # fedbn: BatchNorm keys stay this rank's
            if env.world_size > 1:
                settle_optimizer(local.optimizer, local.model, local.averaged, local.share, cfg.strategy.sync_optimizer)
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
