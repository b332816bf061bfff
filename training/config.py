"""RunConfig: every parameter of a run, its default, its one-line help and its range, in one place.

A run's parameters are grouped by concern, one frozen dataclass each (data, split, optim, strategy, loop, cluster);
a field's name is the pipeline parameter's, the CLI's option (`--local-epochs`) and the worker's flag. The pipeline
signature (pipelines/pipeline.py), the CLI's options (pipelines/cli.py), the worker's flags
(training/worker_config.py) and the dataclasses that use a section (OptimConfig is the optim section; Strategy,
SplitConfig and WorkerConfig take their defaults from here) are all generated from or defaulted to these fields.
The components (components/steps.py) repeat the defaults as literals, because KFP ships a component's source on
its own: tests/test_config.py checks that every copy is equal.

No torch here: the CLI reads this module before it imports anything heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from microfed.training.errors import MicrofedError

__all__ = [
    "AUGMENTATIONS",
    "FLOAT32_MAX",
    "LAUNCHERS",
    "MAX_EXACT_INT",
    "MAX_NUMBERED",
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "SPLITS",
    "SYNC_OPTIMIZER",
    "ClusterConfig",
    "ConfigField",
    "DataConfig",
    "LoopConfig",
    "OptimConfig",
    "RunConfig",
    "SplitSection",
    "StrategyConfig",
    "add_arguments",
    "check_ranges",
    "config_fields",
    "defaults",
    "require_float",
    "require_int",
    "to_argv",
]

from microfed.training.config_checks import (
    _KFP_EXACT,
    AUGMENTATIONS,
    BAD_IMAGES,
    FLOAT32_MAX,
    LAUNCHERS,
    MAX_EXACT_INT,
    MAX_NUMBERED,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    SPLIT,
    SPLITS,
    SUBMIT,
    SYNC_OPTIMIZER,
    TRAIN,
    check_choice,
    check_image_size,
    check_ranges,
    param,
    parse_ratios,
    require_float,
    require_int,
)

_ANY_INT = (0, MAX_EXACT_INT, _KFP_EXACT)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What the split step reads."""

    dataset: str = param(
        "fashion-mnist",
        "fashion-mnist, mnist, cifar10, a .zip / folder with train/ and test/ class folders, "
        "or a .csv listing image,label[,split]",
        steps=(SPLIT,),
    )
    image_size: int = param(0, "resize images to this square side (0 keeps their size)", steps=(SPLIT,))
    train_limit: int = param(
        0,
        "use at most this many training examples (0 = all)",
        steps=(SPLIT,),
        ints=(0, MAX_EXACT_INT, f"0 uses every example; {_KFP_EXACT}"),
    )
    test_limit: int = param(
        0,
        "use at most this many test examples (0 = all)",
        steps=(SPLIT,),
        ints=(0, MAX_EXACT_INT, f"0 uses every example; {_KFP_EXACT}"),
    )
    bad_images: str = param(
        "fail", "fail on an image that cannot be decoded, or skip it (counted in the manifest)", steps=(SPLIT,)
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.dataset.strip():
            raise MicrofedError("dataset is empty", hint="`microfed run --help` lists what --dataset accepts")
        check_choice("bad_images", self.bad_images, BAD_IMAGES)
        check_image_size(self.image_size)


@dataclass(frozen=True, kw_only=True)
class SplitSection:
    """How the training examples are divided into shards (training/shards.py's SplitConfig takes its defaults
    from here)."""

    workers: int = param(
        3,
        "shards = workers (PyTorchJob replicas; local processes here)",
        steps=(SPLIT,),
        ints=(1, MAX_NUMBERED, "one shard per worker; shard, log and model files are numbered with five digits"),
    )
    split: str = param("stratified", "stratified, iid or dirichlet", steps=(SPLIT,))
    split_ratios: str = param(
        "", "relative shard sizes for stratified/iid, comma-separated, e.g. 1,2,1 (empty = equal)", steps=(SPLIT,)
    )
    alpha: float = param(
        0.5,
        "Dirichlet concentration (with --split dirichlet)",
        steps=(SPLIT,),
        floats=(0.0, False, sys.float_info.max, True),
    )
    val_fraction: float = param(
        0.05,
        "share of the training set held out to validate each round and keep the best (0 = none)",
        steps=(SPLIT,),
        floats=(0.0, True, 0.5, False),
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        check_choice("split", self.split, SPLITS)
        ratios = self.ratios()
        if ratios is not None:
            if len(ratios) != self.workers:
                raise MicrofedError(
                    f"split_ratios has {len(ratios)} values but there are {self.workers} workers",
                    hint="give one ratio per worker (--split-ratios)",
                )
            if not all(math.isfinite(r) and r > 0 for r in ratios):
                raise MicrofedError(f"split_ratios must be positive numbers, got {list(ratios)}")
            if self.split == "dirichlet":
                raise MicrofedError("split_ratios apply to stratified and iid splits, not dirichlet")

    def ratios(self) -> tuple[float, ...] | None:
        """The relative shard sizes `split_ratios` gives; None for equal sizes."""
        return parse_ratios(self.split_ratios)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimiser, schedule and augmentation of the local train loop (the optim section of RunConfig)."""

    optimizer: str = param("adam", "adam, adamw or sgd", steps=(TRAIN,), worker=True)
    lr: float = param(3e-3, "peak learning rate", steps=(TRAIN,), worker=True, floats=(0.0, False, FLOAT32_MAX, True))
    weight_decay: float = param(0.0, "weight decay", steps=(TRAIN,), worker=True, floats=(0.0, True, FLOAT32_MAX, True))
    momentum: float = param(
        0.9,
        "SGD's (Nesterov) momentum; ignored by adam and adamw",
        steps=(TRAIN,),
        worker=True,
        floats=(0.0, True, 1.0, False),
    )
    schedule: str = param(
        "cosine", "cosine (warm-up, then decay over all rounds) or constant", steps=(TRAIN,), worker=True
    )
    """`cosine`: linear warm-up then cosine decay to 0 over all rounds; `constant`: fixed lr."""
    warmup_fraction: float = param(
        0.02,
        "share of all steps spent warming up (cosine only)",
        steps=(TRAIN,),
        worker=True,
        floats=(0.0, True, 1.0, False),
    )
    augment: str = param("none", "none, flip, crop or crop-flip", steps=(TRAIN,), worker=True)
    batch_size: int = param(
        0,
        "examples per step on each worker; 0 = ceil(--global-batch-size / workers)",
        steps=(TRAIN,),
        worker=True,
        ints=(0, MAX_EXACT_INT, f"0 takes each worker's share of --global-batch-size; {_KFP_EXACT}"),
    )
    global_batch_size: int = param(
        128,
        "examples per step across all workers: each worker takes ceil(this / workers), so an epoch has as many "
        "sequential steps whatever the worker count (a --batch-size above 0 replaces it)",
        steps=(TRAIN,),
        worker=True,
        ints=(0, MAX_EXACT_INT, f"0 needs a --batch-size per worker; {_KFP_EXACT}"),
    )
    precision: str = param("auto", "auto (bf16 where the hardware has it), fp32 or bf16", steps=(TRAIN,), worker=True)
    """`bf16` autocast, `fp32`, or `auto`: bf16 where the hardware computes it natively (CPUs with
    AVX512-BF16/AMX, CUDA GPUs that support bf16), else fp32. Evaluation always runs in fp32."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("augment", AUGMENTATIONS),
            ("precision", PRECISIONS),
        ):
            check_choice(name, getattr(self, name), allowed)
        check_ranges(self, names=("lr", "weight_decay"))
        # from 1 up no gradient is ever forgotten (the steps grow); torch's Nesterov SGD refuses 0
        sgd = self.optimizer == "sgd"
        why = "sgd uses Nesterov momentum, which needs one" if sgd else ""
        require_float(
            "momentum",
            self.momentum,
            low=0.0,
            low_ok=not sgd,
            high=1.0,
            high_ok=False,
            flag="--momentum",
            pipeline=True,
            why=why,
        )
        check_ranges(self, names=("warmup_fraction", "batch_size", "global_batch_size"))
        if not self.batch_size and not self.global_batch_size:
            raise MicrofedError(
                "batch_size and global_batch_size are both 0: there is no batch size",
                hint="set --global-batch-size (examples per step across all workers) or --batch-size (per worker)",
            )

    def for_workers(self, workers: int) -> OptimConfig:
        """These settings as each of `workers` workers trains with them: `batch_size` resolved (a set one is kept,
        0 becomes the worker's share of the global batch)."""
        if self.batch_size:
            return self
        return dataclasses.replace(self, batch_size=-(-self.global_batch_size // workers))


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """The training strategy and its settings (training/strategies.py's Strategy, which checks them against the
    registry, takes its defaults from here)."""

    strategy: str = param("fedavg", "how the workers train and their models are combined", steps=(TRAIN,), worker=True)
    mu: float = param(
        0.01, "fedprox: weight of the proximal term", steps=(TRAIN,), worker=True, floats=(0.0, True, FLOAT32_MAX, True)
    )
    server_momentum: float = param(
        0.9,
        "the server optimizer's momentum (beta, or an adaptive optimizer's beta1)",
        steps=(TRAIN,),
        worker=True,
        floats=(0.0, True, 1.0, False),
    )
    server_lr: float = param(
        0.0,
        "the server optimizer's learning rate; 0 = the strategy's own default",
        steps=(TRAIN,),
        worker=True,
        floats=(0.0, True, FLOAT32_MAX, True),
    )
    fedbn: bool = param(False, "keep BatchNorm layers out of the in-job averages (FedBN)", steps=(TRAIN,), worker=True)
    sync_every_steps: int = param(
        4,
        "also average the weights inside each round, every this many optimizer steps (local SGD; 0 = at round ends "
        "only; ddp averages gradients every step and ignores it)",
        steps=(TRAIN,),
        worker=True,
        ints=(0, MAX_EXACT_INT, f"0 averages at round ends only; {_KFP_EXACT}"),
    )
    sync_optimizer: str = param(
        "local",
        "the optimizer's state (Adam's moments, SGD's momentum) at each in-job average: local (each worker keeps its "
        "own), average (averaged with the weights) or reset",
        steps=(TRAIN,),
        worker=True,
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        check_choice("sync_optimizer", self.sync_optimizer, SYNC_OPTIMIZER)


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """The model and the rounds."""

    model: str = param(
        "cnn-fmnist",
        "cnn-small, cnn-fmnist, resnet18, vgg16, squeezenet, efficientnet_v2_s, mobilenet_v3_small, "
        "or a factory package.module:function, path/file.py:function, gs://.../file.py:function",
        steps=(TRAIN,),
        worker=True,
    )
    rounds: int = param(
        3,
        "rounds of local training followed by a weighted average",
        steps=(TRAIN,),
        worker=True,
        ints=(1, MAX_NUMBERED, "round checkpoints are numbered with five digits"),
    )
    local_epochs: int = param(
        3, "epochs over each worker's shard per round", steps=(TRAIN,), worker=True, ints=(1, MAX_EXACT_INT, _KFP_EXACT)
    )
    seed: int = param(
        0,
        "seed of the split, the initial weights and the data order",
        steps=(SPLIT, TRAIN),
        worker=True,
        ints=(0, MAX_EXACT_INT, f"numpy takes no negative seed; {_KFP_EXACT}"),
    )
    patience: int = param(
        0,
        "stop after this many rounds without a better validation accuracy (0 = run every round)",
        steps=(TRAIN,),
        worker=True,
        ints=(0, MAX_EXACT_INT, f"0 runs every round; {_KFP_EXACT}"),
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.model.strip():
            raise MicrofedError("model is empty", hint="`microfed run --help` lists what --model accepts")


# `microfed run` always runs its workers as local processes: the cluster settings are options of `submit` only.
@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Where the train step runs its workers, and the measured-usage cache its plans start from."""

    launcher: str = param(
        "auto",
        "auto (the job kind the cluster serves: trainjob, else pytorchjob), trainjob (Kubeflow Trainer v2), "
        "pytorchjob (Training Operator v1) or local (processes in the train step)",
        steps=(TRAIN,),
        cli=(SUBMIT,),
    )
    job_namespace: str = param(
        "",
        "namespace of the TrainJob or PyTorchJob; empty = the train step's own (the profile's on a multi-user "
        "installation)",
        steps=(TRAIN,),
        cli=(SUBMIT,),
    )
    accelerators: str = param(
        "none,nvidia-tesla-t4",
        "accelerators the resource plan may choose from, comma-separated",
        steps=(TRAIN,),
        cli=(SUBMIT,),
    )
    timeout_minutes: int = param(
        720,
        "overall wait for the job, capacity waits included",
        steps=(TRAIN,),
        cli=(SUBMIT,),
        ints=(1, MAX_EXACT_INT, _KFP_EXACT),
    )
    service_account: str = param(
        "pipeline-runner",
        "Kubernetes service account of the replicas (Workload Identity)",
        steps=(TRAIN,),
        cli=(SUBMIT,),
    )
    pool_max_nodes: int = param(
        0,
        "the training pool's maximum node count (0 = the cluster's own)",
        steps=(TRAIN,),
        cli=(SUBMIT,),
        ints=(0, MAX_EXACT_INT, f"0: the cluster's own; {_KFP_EXACT}"),
    )
    collective_timeout_minutes: int = param(
        0,
        "bound on every collective and the rendezvous, minutes; 0 = from the plan's round time",
        steps=(TRAIN,),
        worker=True,
        ints=(0, MAX_EXACT_INT, f"0: from the plan's round time; {_KFP_EXACT}"),
    )
    usage_cache: str = param(
        "",
        "measured-usage cache (folder or .json, local or gs://) that later resource plans start from; "
        "empty: next to the pipeline root (runs/ for `run`), off: none",
        steps=(TRAIN,),
    )

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise MicrofedError(f"unknown launcher {self.launcher!r}", hint=f"use one of {', '.join(LAUNCHERS)}")
        check_ranges(self)


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "split": SplitSection,
    "optim": OptimConfig,
    "strategy": StrategyConfig,
    "loop": LoopConfig,
    "cluster": ClusterConfig,
}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every parameter of a run, one section per concern; each field's name is the pipeline parameter's."""

    data: DataConfig = field(default_factory=DataConfig)
    split: SplitSection = field(default_factory=SplitSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def flat(self) -> dict[str, Any]:
        """{parameter name: value} over every section (the pipeline's arguments)."""
        return {f.name: getattr(getattr(self, f.section), f.name) for f in config_fields()}

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> RunConfig:
        """The config from {parameter name: value}; a missing name keeps its default, an unknown one is an error."""
        known = {f.name: f.section for f in config_fields()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise MicrofedError(f"unknown parameters {unknown}", hint=f"use {', '.join(known)}")
        parts: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        for name, value in values.items():
            parts[known[name]][name] = value
        return cls(**{s: _SECTIONS[s](**parts[s]) for s in _SECTIONS})

    def to_argv(self) -> list[str]:
        """The flags that make `from_argv` return this config."""
        return to_argv(self.flat())

    @classmethod
    def from_argv(cls, argv: Iterable[str]) -> RunConfig:
        parser = argparse.ArgumentParser(prog="microfed-config")
        add_arguments(parser)
        return cls.from_flat(vars(parser.parse_args(list(argv))))


@dataclass(frozen=True)
class ConfigField:
    """One parameter: its section, name, type, default, help and where it goes (see `param`)."""

    section: str
    name: str
    type: type
    default: Any
    help: str
    steps: tuple[str, ...]
    cli: tuple[str, ...]
    worker: bool
    ints: tuple[int, int, str] | None
    floats: tuple[float, bool, float, bool] | None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def config_fields() -> list[ConfigField]:
    """Every RunConfig field, section by section."""
    out = []
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            m = f.metadata
            out.append(
                ConfigField(
                    section,
                    f.name,
                    hints[f.name],
                    f.default,
                    m["help"],
                    m["steps"],
                    m["cli"],
                    m["worker"],
                    m["ints"],
                    m["floats"],
                )
            )
    return out


def defaults() -> dict[str, Any]:
    """{parameter name: default}: what the pipeline's signature and the CLI's options start from."""
    return {f.name: f.default for f in config_fields()}


def add_arguments(
    parser: argparse.ArgumentParser,
    names: Iterable[str] | None = None,
    *,
    extra_help: Mapping[str, Callable[[], str]] | None = None,
    types: Mapping[str, type] | None = None,
    show_default: bool = True,
) -> None:
    """One option per field (all, or `names`): `--local-epochs`, typed, with the field's default and help; a bool
    as --name / --no-name. `extra_help[name]()` is appended to a field's help (e.g. the strategies' registry);
    `types[name]` replaces a field's type (the worker takes fractions of a minute)."""
    chosen = None if names is None else set(names)
    for f in config_fields():
        if chosen is not None and f.name not in chosen:
            continue
        text = f.help
        if extra_help and f.name in extra_help:
            text = f"{text}: {extra_help[f.name]()}"
        if show_default:
            text = f"{text} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(
                f.flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=text
            )
        else:
            kind = (types or {}).get(f.name, f.type)
            parser.add_argument(f.flag, dest=f.name, type=kind, default=kind(f.default), help=text)


def to_argv(values: Mapping[str, Any]) -> list[str]:
    """The flags `add_arguments`' options read back as `values`: floats by repr (exact), bools as --x / --no-x."""
    argv: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv
