"""The worker's configuration (WorkerConfig) and its command line: `parse_config` reads the flags that
`config_to_argv` writes for a launcher (the local one, a PyTorchJob's replicas)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

from microfed.training.errors import MicrofedError
from microfed.training.strategies import Strategy, strategy_help
from microfed.training.train import MAX_EXACT_INT, OptimConfig, require_float, require_int

__all__ = [
    "BEST_ROUND_FILE",
    "DEFAULT_COLLECTIVE_TIMEOUT_MINUTES",
    "DEFAULT_STALL_FRACTION",
    "MAX_ROUNDS",
    "ROUNDS_FILE",
    "SERVER_STATE_FILE",
    "WorkerConfig",
    "build_parser",
    "collective_timeout",
    "config_to_argv",
    "micro_model_name",
    "parse_config",
    "stall_timeout",
]

ROUNDS_FILE = "rounds.json"  # rank 0: the strategy, every round's validation metrics, the best round
BEST_ROUND_FILE = "best-round.safetensors"  # rank 0: the global model of the best in-job round
# rank 0, a strategy with a server optimizer: the global model round R started from and the server state
SERVER_STATE_FILE = "server-state.safetensors"
DEFAULT_COLLECTIVE_TIMEOUT_MINUTES = 30.0  # torch's own default for gloo; what `collective_timeout_minutes=0` means
# `stall_minutes=0`: a third of the collective timeout, so that the warning comes well before the timeout ends the run
DEFAULT_STALL_FRACTION = 1 / 3
# Longer waits are typos; the bound keeps timedelta and gloo's milliseconds far from overflowing.
MAX_TIMEOUT_MINUTES = 525_600.0  # a year
# Round checkpoints and the files of shards, logs and micro-models are numbered with five digits.
MAX_ROUNDS = 99_999
MAX_THREADS = 4096


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
    """The training strategy and its settings (a name in microfed.training.strategies.REGISTRY)."""
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


def _description() -> str:
    from microfed.training import worker  # the entrypoint's docstring is its --help

    return worker.__doc__ or ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m microfed.training.worker",
        description=_description(),
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
    st = {f.name: f.default for f in dataclasses.fields(Strategy)}  # server_lr: 0, the strategy's own default
    p.add_argument("--strategy", default=st["name"], help=strategy_help())
    p.add_argument("--mu", type=float, default=st["mu"], help="fedprox: proximal term weight")
    p.add_argument("--server-momentum", type=float, default=st["server_momentum"], help="server optimizer momentum")
    p.add_argument(
        "--server-lr", type=float, default=st["server_lr"], help="server learning rate; 0 = the strategy's default"
    )
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
