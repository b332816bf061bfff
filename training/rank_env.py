"""Where this process stands in its group, from whichever launcher started it: the PyTorchJob contract (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT: the Training Operator v1, torchrun, microfed's local launcher) or the Kubeflow
Trainer v2 torch plugin's (PET_NODE_RANK, PET_NNODES, PET_MASTER_ADDR, PET_MASTER_PORT; kubeflow/trainer v2.3.0,
pkg/runtime/framework/plugins/torch/torch.go :: EnforceMLPolicy). training/worker_group.py reads it."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Literal, NamedTuple

from microfed.training.errors import MicrofedError

__all__ = ["RankEnv", "rank_contract", "read_rank_env"]

_PYTORCHJOB_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_TRAINJOB_VARS = ("PET_NODE_RANK", "PET_NNODES", "PET_MASTER_ADDR", "PET_MASTER_PORT")
_HOST = re.compile(r"[A-Za-z0-9_.:\[\]-]+")


class RankEnv(NamedTuple):
    """Where this process stands in the group, from whichever launcher started it."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int


def rank_contract(environ: Mapping[str, str] | None = None) -> Literal["pytorchjob", "trainjob"] | None:
    """Which contract `environ` follows: `pytorchjob` when RANK is set (the Training Operator v1, torchrun and
    microfed's local launcher set it per process), else `trainjob` when PET_NODE_RANK is set (the Trainer's torch
    plugin sets it per node), else None (no launcher: a single process).

    RANK wins because the v1 operator sets PET_NODE_RANK too, and because torchrun run inside a TrainJob node gives
    each of its processes a RANK while PET_NODE_RANK stays the node's."""
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return "pytorchjob"
    if "PET_NODE_RANK" in env:
        return "trainjob"
    return None


def read_rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """(rank, world_size, master_addr, master_port) from the PyTorchJob contract (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) or the TrainJob torch plugin's (PET_NODE_RANK, PET_NNODES, PET_MASTER_ADDR, PET_MASTER_PORT);
    see `rank_contract` for which. Raises MicrofedError naming the variable that is missing or malformed."""
    env = os.environ if environ is None else environ
    contract = rank_contract(env)
    if contract is None:
        raise MicrofedError(
            "neither RANK nor PET_NODE_RANK is set: this process was not started by a launcher",
            hint="run under a PyTorchJob, a TrainJob, torchrun or microfed's launcher",
        )
    names = _PYTORCHJOB_VARS if contract == "pytorchjob" else _TRAINJOB_VARS
    if contract == "trainjob":
        _check_one_process_per_node(env)
    rank_name, world_name, addr_name, port_name = names
    rank = _integer(env, rank_name, contract)
    world = _integer(env, world_name, contract)
    if world < 1:
        raise MicrofedError(f"environment variable {world_name}={world} must be >= 1")
    if not 0 <= rank < world:
        raise MicrofedError(f"environment variable {rank_name}={rank} must be in 0..{world_name}-1 ({world - 1})")
    addr = _required(env, addr_name, contract).strip()
    if not _HOST.fullmatch(addr):
        raise MicrofedError(f"environment variable {addr_name}={addr!r} is not a host name or address")
    port = _integer(env, port_name, contract)
    if not 1 <= port <= 65535:
        raise MicrofedError(f"environment variable {port_name}={port} is not a TCP port (1..65535)")
    return RankEnv(rank=rank, world_size=world, master_addr=addr, master_port=port)


def _check_one_process_per_node(env: Mapping[str, str]) -> None:
    """PET_NODE_RANK numbers nodes; it is the process rank only when each node runs one process."""
    nproc = env.get("PET_NPROC_PER_NODE")
    if nproc is not None and nproc.strip() != "1":
        raise MicrofedError(
            f"environment variable PET_NPROC_PER_NODE={nproc!r}: the worker runs one process per node",
            hint="set trainer.numProcPerNode: 1 in the TrainJob (build_trainjob does), or start it under torchrun",
        )


def _required(env: Mapping[str, str], name: str, contract: str) -> str:
    value = env.get(name)
    if value is None or not value.strip():
        launcher = "a PyTorchJob (Training Operator v1)" if contract == "pytorchjob" else "a TrainJob (Trainer v2)"
        raise MicrofedError(
            f"environment variable {name} is {'empty' if value is not None else 'not set'}",
            hint=f"{launcher} sets it; the other variables of this process follow that contract",
        )
    return value


def _integer(env: Mapping[str, str], name: str, contract: str) -> int:
    raw = _required(env, name, contract)
    try:
        return int(raw.strip())
    except ValueError:
        raise MicrofedError(f"environment variable {name}={raw!r} is not an integer") from None
