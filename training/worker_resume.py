"""Resuming a worker group: the round checkpoints a restarted group continues from (microfed.training.checkpoint).

Each in-job combine ends with a checkpoint of the round, written by rank 0 into OUT_DIR/checkpoints/ before any
rank starts the next round: the combined weights, every rank's optimizer, schedule and random state, the strategy's
server state (FedAvgM's momentum, FedAdam's and FedYogi's moments) and rank 0's best round. A worker group started
again on the same OUT_DIR (the PyTorchJob restarting its pods, the local launcher restarting its processes)
resumes after the last checkpointed round: rank 0 picks the round and broadcasts it, so all ranks agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

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
from microfed.training.strategies import BEST_PART, pack_server_state, unpack_server_state
from microfed.training.worker_config import WorkerConfig
from microfed.training.worker_group import DistEnv, collective, comm_device, log
from microfed.training.worker_progress import progress

if TYPE_CHECKING:
    from microfed.training.worker_rounds import Local

__all__ = ["checkpoint", "fingerprint_of", "resume"]


def fingerprint_of(cfg: WorkerConfig, env: DistEnv, summary: Mapping[str, Any]) -> dict[str, Any]:
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


def resume(
    cfg: WorkerConfig, env: DistEnv, local: Local, fingerprint: dict[str, Any]
) -> tuple[int, list[dict[str, Any]]]:
    """The last checkpointed round (0: none) and this rank's records so far; loads the checkpoint's state.

    Rank 0 alone lists the checkpoints and broadcasts the round, so every rank resumes from the same one even
    if a later checkpoint appeared while they looked.
    """
    chosen = torch.tensor([latest_round(str(cfg.out)) if env.rank == 0 else 0], dtype=torch.int64)
    if env.world_size > 1:
        with collective(env, "agreeing on the round to resume from"):
            chosen = chosen.to(comm_device())
            dist.broadcast(chosen, src=0)
    resumed = int(chosen.item())
    if resumed == 0:
        return 0, []
    progress().set(f"reading round {resumed}'s checkpoint")
    ckpt = read_checkpoint(str(cfg.out), resumed, fingerprint=fingerprint, world_size=env.world_size)
    local.model.load_state_dict(ckpt.weights)
    device = next(iter(local.model.state_dict().values())).device
    # "<part>.<name>": the strategy's server state, and rank 0's best round ("best")
    parts = unpack_server_state({k: t.to(device) for k, t in ckpt.server.items()})
    best = parts.pop(BEST_PART, None)
    local.server = parts
    if env.rank == 0 and best is not None:
        local.best_state = best
    local.best = dict(ckpt.server_info.get("best") or local.best)
    records = restore_rank_state(ckpt.ranks[env.rank], local.optimizer, local.scheduler, local.generator)
    log(env, f"resuming after round {resumed}/{cfg.rounds} from {checkpoint_uri(str(cfg.out), resumed)}")
    return resumed, records


def checkpoint(
    cfg: WorkerConfig, env: DistEnv, local: Local, r: int, fingerprint: dict[str, Any], rounds: list[dict[str, Any]]
) -> None:
    """Gather every rank's state to rank 0, which commits round r's checkpoint; then all ranks wait for the
    commit, so a crash in round r+1 always finds round r's checkpoint."""
    mine = encode_rank_state(capture_rank_state(local.optimizer, local.scheduler, local.generator, rounds))
    with collective(env, f"gathering round {r}'s checkpoint"):
        states = gather_bytes(mine, env.world_size)
    if env.rank == 0:
        server = dict(local.server)
        if local.best_state is not None:
            server[BEST_PART] = local.best_state
        data = build_checkpoint(
            r,
            fingerprint,
            local.model.state_dict(),
            [decode_rank_state(b) for b in states],
            server=pack_server_state(server),
            server_info={"best": local.best},
        )
        progress().set(f"writing round {r}'s checkpoint")
        uri = write_checkpoint(str(cfg.out), r, data)
        log(env, f"round {r}/{cfg.rounds}: checkpoint {uri} ({len(data) / 1e6:.1f} MB)")
    if env.world_size > 1:
        with collective(env, f"waiting for round {r}'s checkpoint"):
            dist.barrier()
