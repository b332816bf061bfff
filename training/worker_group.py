"""The worker group: the Training Operator's environment (DistEnv), the process group's rendezvous (`join_group`)
and final barrier (`finish`), and collectives whose failure means a lost peer (PeerLost, exit 200: restart the
group). Why the final barrier and how the timeouts bound each wait: the worker's docstring (microfed.training.worker,
its --help), sections Finishing and Timeouts.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from microfed.training.errors import MicrofedError
from microfed.training.rank_env import rank_contract, read_rank_env
from microfed.training.worker_config import WorkerConfig, collective_timeout
from microfed.training.worker_progress import progress

__all__ = ["DistEnv", "PeerLost", "collective", "comm_device", "device_for", "finish", "join_group", "log"]

_MEMBERS_KEY = "microfed/members"  # in rank 0's TCPStore: how many processes have joined this store
_STALE_GROUP_RETRY_SECONDS = 2.0


class PeerLost(RuntimeError):
    """A collective failed: another rank died or became unreachable. The group should be restarted."""

    @classmethod
    def during(cls, rank: int, what: str, error: BaseException) -> PeerLost:
        """`worker R: <what> failed, a peer is gone (<the error's first line>)`."""
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        return cls(f"worker {rank}: {what} failed, a peer is gone ({first})")


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
        """The group from the launcher's variables: a PyTorchJob's (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
        or a TrainJob's (PET_NODE_RANK, PET_NNODES, PET_MASTER_ADDR, PET_MASTER_PORT); see training/rank_env.py.
        Without either, a single process: rank 0 of 1."""
        env = dict(os.environ if environ is None else environ)
        if rank_contract(env) != "trainjob":
            # the PyTorchJob contract; a worker started by hand may leave out what a single process needs not
            for name, default in (
                ("RANK", "0"),
                ("WORLD_SIZE", "1"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "29500"),
            ):
                env.setdefault(name, default)
        rank, world, addr, port = read_rank_env(env)
        raw = env.get("LOCAL_WORLD_SIZE", "1")
        try:
            local = int(raw)
        except ValueError:
            raise MicrofedError(f"environment variable LOCAL_WORLD_SIZE={raw!r} is not an integer") from None
        return cls(rank=rank, world_size=world, local_world_size=local, master_addr=addr, master_port=port)


def device_for(cfg: WorkerConfig, env: DistEnv) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MicrofedError("--device cuda was asked for but no CUDA device is visible")
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def log(env: DistEnv, message: str) -> None:
    if env.rank == 0:
        print(f"[microfed worker] {message}", flush=True)


@contextlib.contextmanager
def collective(env: DistEnv, what: str) -> Iterator[None]:
    """Turn a failed collective (gloo/NCCL raise RuntimeError when a peer's connection drops or times out)
    into PeerLost, which `main` reports with EXIT_PEER_LOST so that the group is restarted and resumes.

    The progress record marks the rank as waiting for its peers meanwhile (alone, it waits for none)."""
    try:
        with progress().waiting_for(what) if env.world_size > 1 else _doing(what):
            yield
    except RuntimeError as e:
        if env.world_size == 1 or isinstance(e, PeerLost):
            raise
        raise PeerLost.during(env.rank, what, e) from e


@contextlib.contextmanager
def _doing(what: str) -> Iterator[None]:
    progress().set(what)
    yield


def comm_device() -> torch.device:
    """Where tensors must live for collectives: NCCL moves CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def join_group(cfg: WorkerConfig, env: DistEnv) -> None:
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


def finish(env: DistEnv) -> None:
    """Wait until every rank's outputs are durable (run_worker returns after its uploads) before any rank, and
    so the Master, exits: the Training Operator ends the job when the Master succeeds."""
    if env.world_size > 1:
        with collective(env, "waiting for every rank's outputs to be uploaded"):
            dist.barrier()
