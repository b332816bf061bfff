"""Round checkpoints: what a restarted worker group needs to continue after the last completed round.

After the in-job average of round r (rounds 1..R-1), rank 0 writes `checkpoints/round-<r>.safetensors` into
the workers' output folder (a local folder or a gs:// prefix, written directly, not staged, so it survives
the crash it is for). One file holds everything, so one atomic write commits the round:

- `model.<key>`: the averaged weights every rank holds after round r;
- `rank.<RANK>.optimizer.<i>.<name>` and `rank.<RANK>.rng.<generator|torch|cuda>`: each rank's own optimizer
  state (Adam's moments stay local to a worker between rounds) and random generator states (data order,
  augmentation, dropout), gathered to rank 0 over the process group;
- the `microfed` metadata entry (JSON): format, round, world size, the training configuration's fingerprint,
  and per rank the optimizer's parameter groups, the learning-rate schedule's position and the round records.

With all of it restored, a resumed job on CPU computes exactly what an uninterrupted one would have.

Writes are atomic: a local file is written under a temporary name and renamed; a GCS object is created with
`if_generation_match=0`, so a round's checkpoint is written once and never replaced (a second writer, such as
the zombie of a restarted rank 0, fails instead of overwriting). Nothing here unpickles: safetensors and JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from microfed.training.errors import MicrofedError
from microfed.training.layout import CHECKPOINT_DIR, round_checkpoint_file, round_of_checkpoint
from microfed.training.storage import join, list_files, read_bytes, write_bytes

__all__ = [
    "CHECKPOINT_DIR",
    "Checkpoint",
    "RankState",
    "build_checkpoint",
    "capture_rank_state",
    "checkpoint_uri",
    "decode_rank_state",
    "encode_rank_state",
    "gather_bytes",
    "latest_round",
    "parse_checkpoint",
    "read_checkpoint",
    "restore_rank_state",
    "write_checkpoint",
]

FORMAT = "microfed.checkpoint/v1"
_META_KEY = "microfed"


@dataclass
class RankState:
    """One rank's resumable state besides the (shared) weights."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Optimizer state tensors (`optimizer.<param index>.<name>`) and generator states (`rng.<which>`)."""
    info: dict[str, Any] = field(default_factory=dict)
    """JSON: optimizer parameter groups and non-tensor state, scheduler state, the round records so far."""


@dataclass(frozen=True)
class Checkpoint:
    """A parsed checkpoint file."""

    round: int
    world_size: int
    fingerprint: dict[str, Any]
    weights: dict[str, torch.Tensor]
    ranks: list[RankState]
    server: dict[str, torch.Tensor] = field(default_factory=dict)
    """The strategy's state shared by all ranks: FedAvgM's momentum, the best round's model."""
    server_info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- one rank's state


def capture_rank_state(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    records: Sequence[Mapping[str, Any]],
) -> RankState:
    """Copy (to CPU) what this rank needs to continue: optimizer, schedule position, RNG states, records."""
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in opt["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu").clone().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    info = {
        "optimizer_param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "records": [dict(r) for r in records],
    }
    return RankState(tensors=tensors, info=info)


def restore_rank_state(
    state: RankState,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> list[dict[str, Any]]:
    """Load `state` into freshly built objects; returns the round records it carried."""
    per_param: dict[int, dict[str, Any]] = {}
    for key, tensor in state.tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = tensor
    for index, values in state.info["optimizer_scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": state.info["optimizer_param_groups"]})
    scheduler.load_state_dict(state.info["scheduler"])
    generator.set_state(state.tensors["rng.generator"])
    torch.set_rng_state(state.tensors["rng.torch"])
    if "rng.cuda" in state.tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(state.tensors["rng.cuda"])
    return [dict(r) for r in state.info["records"]]


def encode_rank_state(state: RankState) -> bytes:
    """A rank's state as safetensors bytes (what travels to rank 0)."""
    return bytes(st_save(state.tensors, metadata={_META_KEY: json.dumps(state.info)}))


def decode_rank_state(data: bytes) -> RankState:
    tensors = st_load(data)
    return RankState(tensors=dict(tensors), info=json.loads(_metadata(data)[_META_KEY]))


def gather_bytes(data: bytes, world_size: int) -> list[bytes]:
    """Every rank's `data`, in rank order, on rank 0 (other ranks get []). Needs the process group when
    world_size > 1; NCCL moves CUDA tensors only, so the bytes travel on the current CUDA device there."""
    if world_size == 1:
        return [data]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device))
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    rank = dist.get_rank()
    parts = [torch.empty_like(mine) for _ in range(world_size)] if rank == 0 else None
    dist.gather(mine, gather_list=parts, dst=0)
    if parts is None:
        return []
    return [bytes(p[: int(s.item())].cpu().numpy().tobytes()) for p, s in zip(parts, sizes, strict=True)]


# ------------------------------------------------------------------------------------- the round's file


def build_checkpoint(
    round_: int,
    fingerprint: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    ranks: Sequence[RankState],
    server: Mapping[str, torch.Tensor] | None = None,
    server_info: Mapping[str, Any] | None = None,
) -> bytes:
    """The checkpoint file's bytes: averaged weights plus every rank's state, the strategy's shared state, and
    the JSON header."""
    tensors = {f"model.{key}": t.detach().to("cpu").contiguous() for key, t in weights.items()}
    tensors.update({f"server.{key}": t.detach().to("cpu").contiguous() for key, t in (server or {}).items()})
    for rank, state in enumerate(ranks):
        tensors.update({f"rank.{rank:05d}.{key}": t for key, t in state.tensors.items()})
    header = {
        "format": FORMAT,
        "round": round_,
        "world_size": len(ranks),
        "fingerprint": dict(fingerprint),
        "ranks": [state.info for state in ranks],
        "server": dict(server_info or {}),
    }
    return bytes(st_save(tensors, metadata={_META_KEY: json.dumps(header, sort_keys=True)}))


def parse_checkpoint(data: bytes, name: str) -> Checkpoint:
    """Parse checkpoint bytes; `name` (its path or URI) is used in errors."""
    try:
        tensors = st_load(data)
        header = json.loads(_metadata(data)[_META_KEY])
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
        world_size = int(header["world_size"])
        ranks = [RankState(info=info) for info in header["ranks"]]
        round_, fingerprint = int(header["round"]), dict(header["fingerprint"])
        server_info = dict(header.get("server") or {})
    except Exception as e:  # safetensors, JSON and key errors all mean the same: not a checkpoint of ours
        raise MicrofedError(
            f"{name}: not a readable microfed checkpoint ({e})",
            hint="delete it (and any later round) to resume from the round before, or start in a new folder",
        ) from None
    weights, server = {}, {}
    for key, tensor in tensors.items():
        if key.startswith("model."):
            weights[key.removeprefix("model.")] = tensor
        elif key.startswith("server."):
            server[key.removeprefix("server.")] = tensor
        elif key.startswith("rank."):
            _, rank, rest = key.split(".", 2)
            ranks[int(rank)].tensors[rest] = tensor
    return Checkpoint(
        round=round_,
        world_size=world_size,
        fingerprint=fingerprint,
        weights=weights,
        ranks=ranks,
        server=server,
        server_info=server_info,
    )


def checkpoint_uri(out: str, round_: int) -> str:
    return join(out, CHECKPOINT_DIR, round_checkpoint_file(round_))


def write_checkpoint(out: str, round_: int, data: bytes) -> str:
    """Commit round `round_`'s checkpoint (once: an existing one is never replaced); returns its URI."""
    uri = checkpoint_uri(out, round_)
    write_bytes(uri, data, if_generation_match=0)
    return uri


def latest_round(out: str) -> int:
    """The highest round with a committed checkpoint under `out`, or 0 when there is none."""
    rounds = [r for name in list_files(join(out, CHECKPOINT_DIR)) if (r := round_of_checkpoint(name)) is not None]
    return max(rounds, default=0)


def read_checkpoint(out: str, round_: int, *, fingerprint: Mapping[str, Any], world_size: int) -> Checkpoint:
    """Round `round_`'s checkpoint, checked against this job's configuration and size."""
    uri = checkpoint_uri(out, round_)
    ckpt = parse_checkpoint(read_bytes(uri), uri)
    if ckpt.round != round_ or ckpt.world_size != world_size or len(ckpt.ranks) != world_size:
        raise MicrofedError(
            f"{uri}: holds round {ckpt.round} of {ckpt.world_size} workers, expected round {round_} of {world_size}",
            hint="resume with as many workers as the checkpoint was written by, or start in a new folder",
        )
    changed = sorted(k for k in {*ckpt.fingerprint, *fingerprint} if ckpt.fingerprint.get(k) != fingerprint.get(k))
    if changed:
        key = changed[0]
        raise MicrofedError(
            f"{uri} was written by a different training configuration ({key}: {ckpt.fingerprint.get(key)!r} "
            f"there, {fingerprint.get(key)!r} now)",
            hint=f"use a new output folder, or delete {join(out, CHECKPOINT_DIR)} to start from scratch",
        )
    return ckpt


def _metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__") or {})
