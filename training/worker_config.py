"""The worker's configuration (WorkerConfig) and its command line: `parse_config` reads the flags that
`config_to_argv` writes for a launcher (the local one, a PyTorchJob's replicas)."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from microfed.training.config import (
    ClusterConfig,
    LoopConfig,
    RunConfig,
    StrategyConfig,
    add_arguments,
    config_fields,
    to_argv,
)
from microfed.training.errors import MicrofedError
from microfed.training.strategies import Strategy, strategy_help
from microfed.training.train import OptimConfig, require_float, require_int

__all__ = [
    "DEFAULT_COLLECTIVE_TIMEOUT_MINUTES",
    "DEFAULT_STALL_FRACTION",
    "MAX_ROUNDS",
    "WorkerConfig",
    "build_parser",
    "collective_timeout",
    "config_to_argv",
    "parse_config",
    "stall_timeout",
]

DEFAULT_COLLECTIVE_TIMEOUT_MINUTES = 30.0  # torch's own default for gloo; what `collective_timeout_minutes=0` means
# `stall_minutes=0`: a third of the collective timeout, so that the warning comes well before the timeout ends the run
DEFAULT_STALL_FRACTION = 1 / 3
# Longer waits are typos; the bound keeps timedelta and gloo's milliseconds far from overflowing.
MAX_TIMEOUT_MINUTES = 525_600.0  # a year
# Round checkpoints and the files of shards, logs and micro-models are numbered with five digits.
MAX_ROUNDS = 99_999
MAX_THREADS = 4096
# Defaults shared with the pipeline come from RunConfig's sections.
_LOOP, _CLUSTER = LoopConfig(), ClusterConfig()


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Everything a worker needs besides the distributed environment."""

    shards: str
    """Folder written by the split step: a local path or a gs:// URI (on a cluster)."""
    out: str
    """Folder for micro-models and per-worker records: a local path or a gs:// URI."""
    model: str = _LOOP.model
    """Model name (see microfed.training.models) or `package.module:function`."""
    rounds: int = _LOOP.rounds
    """R: rounds of local training followed by a weighted average."""
    local_epochs: int = _LOOP.local_epochs
    """E: epochs over the worker's own shard in each round."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser, schedule, augmentation and batch size."""
    seed: int = _LOOP.seed
    """Model initialisation seed (shared); the data order uses seed + rank."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, or `cuda`."""
    threads: int = 0
    """CPU threads; 0 = usable cores / workers on this machine (LOCAL_WORLD_SIZE)."""
    eval_every_round: bool = True
    """Evaluate the global model on the validation split (when the split step held one out) after each in-job
    average (rounds 1..R-1; the aggregate step evaluates round R) and keep the best round's model."""
    strategy: Strategy = field(default_factory=Strategy)
    """The training strategy and its settings (a name in microfed.training.strategies.REGISTRY)."""
    patience: int = _LOOP.patience
    """Stop after this many rounds without a better validation accuracy; 0 runs every round."""
    collective_timeout_minutes: float = float(_CLUSTER.collective_timeout_minutes)
    """Bound on every collective (the end-of-round average waits for the slowest rank's local epochs), on the
    rendezvous and on the final barrier, minutes; 0 = DEFAULT_COLLECTIVE_TIMEOUT_MINUTES. A rank that waits
    longer exits as if its peer were lost (exit 200, restartable)."""
    stall_minutes: float = 0.0
    """Under the local launcher: a rank that has made no progress of its own (no training step, no new step) for
    this long is named in a warning line, minutes; 0 = DEFAULT_STALL_FRACTION of the collective timeout. At most
    the collective timeout, at which the run ends with that rank named as the error."""

    def __post_init__(self) -> None:
        # The Kubeflow UI starts runs without the CLI's checks: every number is checked here too (nan included),
        # with RunConfig's ranges (training/config.py).
        LoopConfig(
            model=self.model, rounds=self.rounds, local_epochs=self.local_epochs, seed=self.seed, patience=self.patience
        )
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

    @classmethod
    def from_run_config(cls, config: RunConfig, *, shards: str, out: str) -> WorkerConfig:
        """The workers' configuration from a run's: the loop, optim and strategy sections and the collective
        timeout; the worker-only settings (device, threads, ...) keep their defaults."""
        loop = config.loop
        return cls(
            shards=shards,
            out=out,
            model=loop.model,
            rounds=loop.rounds,
            local_epochs=loop.local_epochs,
            seed=loop.seed,
            patience=loop.patience,
            optim=config.optim,
            strategy=Strategy.from_config(config.strategy),
            collective_timeout_minutes=float(config.cluster.collective_timeout_minutes),
        )


def collective_timeout(cfg: WorkerConfig) -> datetime.timedelta:
    """The timeout the process group is created with (it bounds every collective and the rendezvous)."""
    return datetime.timedelta(minutes=cfg.collective_timeout_minutes or DEFAULT_COLLECTIVE_TIMEOUT_MINUTES)


def stall_timeout(cfg: WorkerConfig) -> datetime.timedelta:
    """How long a rank may make no progress of its own before the local launcher warns about it."""
    return datetime.timedelta(minutes=cfg.stall_minutes) or collective_timeout(cfg) * DEFAULT_STALL_FRACTION


def _description() -> str:
    from microfed.training import worker  # the entrypoint's docstring is its --help

    return worker.__doc__ or ""


# The flags a worker shares with the pipeline: RunConfig's fields that reach it (training/config.py).
_SHARED = [f for f in config_fields() if f.worker]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m microfed.training.worker",
        description=_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shards", required=True, help="folder (or gs:// URI) written by the split step")
    p.add_argument("--out", required=True, help="folder (or gs:// URI) for micro-models and records")
    add_arguments(
        p,
        [f.name for f in _SHARED],
        extra_help={"strategy": strategy_help},
        types={"collective_timeout_minutes": float},
    )
    d = WorkerConfig
    p.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads; 0 = usable cores / local workers")
    p.add_argument("--no-eval-every-round", dest="eval_every_round", action="store_false")
    p.add_argument(
        "--stall-minutes",
        type=float,
        default=d.stall_minutes,
        help="local launcher: warn about a worker without progress for this long; 0 = a third of the timeout",
    )
    return p


def parse_config(argv: Sequence[str] | None = None) -> WorkerConfig:
    a = vars(build_parser().parse_args(argv))
    sections: dict[str, dict[str, Any]] = {"optim": {}, "strategy": {}}
    for f in _SHARED:
        if f.section in sections:
            sections[f.section][f.name] = a.pop(f.name)
    return WorkerConfig(
        optim=OptimConfig(**sections["optim"]),
        strategy=Strategy.from_config(StrategyConfig(**sections["strategy"])),
        **a,
    )


def config_to_argv(cfg: WorkerConfig) -> list[str]:
    """The command-line flags that make `parse_config` return `cfg` (used by launchers)."""
    values: dict[str, Any] = {"shards": str(cfg.shards), "out": str(cfg.out)}
    for f in _SHARED:
        if f.section == "optim":
            values[f.name] = getattr(cfg.optim, f.name)
        elif f.section == "strategy":
            values[f.name] = cfg.strategy.name if f.name == "strategy" else getattr(cfg.strategy, f.name)
        else:
            values[f.name] = getattr(cfg, f.name)
    values.update(device=cfg.device, threads=cfg.threads, stall_minutes=cfg.stall_minutes)
    argv = to_argv(values)
    return argv if cfg.eval_every_round else [*argv, "--no-eval-every-round"]
