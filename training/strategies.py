"""Training strategies: how the workers train and how their models are combined, one class per strategy.

`Strategy` is the configuration (the worker's --strategy and its settings, the pipeline parameters of the same
names); its `name` picks a class from REGISTRY, and `Strategy.build()` returns that class's object, whose hooks
the round loop (microfed.training.worker_rounds) and the aggregate step (microfed.training.step_aggregate) call. Neither
asks which strategy it runs. The hooks, with FedAvg's behaviour as the default (FederatedStrategy):

- `averaged_keys(model)`: the state_dict keys the in-job combines take (all; FedBN leaves BatchNorm's out);
- `trainer(model, ...)`: what the local epochs run, and how many steps each takes (ddp: the model wrapped in
  DistributedDataParallel, as many steps on every rank);
- `gradient_term(model, global_state)`: a per-step hook between backward and the optimizer step (FedProx adds
  its proximal gradient there);
- `combine_in_job(mine, n_k, ...)`: the combine after rounds 1..R-1 inside the job: the weighted average all-reduced
  across the ranks (weights n_k / n), then `server_step`;
- `server_step(global_state, average, state)`: the server optimizer over the pseudo-gradient average - global
  (none for FedAvg; momentum for FedAvgM; Adam or Yogi for FedAdam and FedYogi), with its state (`state`: named
  parts of tensors, kept in every round checkpoint and handed to the aggregate step);
- `combine_final(states, weights, ...)`: the aggregate step's combine of the micro-models after round R (the
  weighted average and the last server step; ddp: the job's one model, passed through).

A new strategy is a subclass decorated with `@register`: the worker's --strategy, the CLI's help and the strategies
benchmark take their names from REGISTRY. Its numbers come from Strategy's fields (`mu`, `server_momentum`,
`server_lr`), which every pipeline parameter and worker flag already carries; what the paper fixes is a class
attribute (FedAdam's beta2 and tau). Strategies in the registry:

- `fedavg` (McMahan et al. 2017): the weighted average is the next global model.
- `fedprox` (Li et al. 2020): FedAvg, and the workers add mu/2 * ||w - w_global||^2 to their local loss
  (`proximal_step` adds its gradient, mu * (w - w_global)), which keeps non-IID shards from drifting apart.
- `fedavgm` (Hsu et al. 2019): server momentum over the pseudo-gradient (`server_update`):
  d = w_global - average, v = beta * v + d, w_global' = w_global - server_lr * v. With beta = 0 and server_lr = 1
  it is FedAvg.
- `fedadam`, `fedyogi` (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2): Adam or Yogi
  on the server (`adaptive_server_update`), with beta1 = server_momentum and eta = server_lr.
- `ddp`: synchronous data parallel; the ranks hold one model, and the in-job combine only settles BatchNorm
  statistics.

`fedbn` (Li et al. 2021) is an option of the strategies that average: BatchNorm layers stay local in the in-job
combines (`batchnorm_keys`); the last combine, in the aggregate step, takes them too, so the run still ends with
one global model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import nn

from microfed.training.aggregation import (
    allreduce_average,
    batchnorm_keys,
    check_compatible,
    proximal_step,
    server_update,
    weighted_average,
)
from microfed.training.config import StrategyConfig
from microfed.training.errors import MicrofedError

__all__ = [
    "DDP",
    "REGISTRY",
    "STRATEGIES",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "FederatedStrategy",
    "ServerState",
    "Strategy",
    "adaptive_server_update",
    "pack_server_state",
    "register",
    "strategy_help",
    "unpack_server_state",
]

State = Mapping[str, torch.Tensor]
ServerState = dict[str, dict[str, torch.Tensor]]
"""A strategy's server state: named parts ("momentum"; "m" and "v"), each a state_dict-like map of tensors."""
Combined = tuple[dict[str, torch.Tensor], ServerState]
"""A server step's result: the next global model's tensors and the new server state."""

# Names `pack_server_state` gives the global model and rank 0's best round beside a strategy's parts.
GLOBAL_PART = "global"
BEST_PART = "best"


# The defaults are RunConfig strategy section's (training/config.py), the one place they change.
_DEFAULTS = StrategyConfig()


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """How the workers train and how their models are combined: a name from REGISTRY and its settings."""

    name: str = _DEFAULTS.strategy
    """A name in REGISTRY (fedavg, fedprox, fedavgm, fedadam, fedyogi, ddp)."""
    mu: float = _DEFAULTS.mu
    """fedprox: weight of the proximal term mu/2 * ||w - w_global||^2."""
    server_momentum: float = _DEFAULTS.server_momentum
    """The server optimizer's momentum: fedavgm's beta, fedadam's and fedyogi's beta1."""
    server_lr: float = _DEFAULTS.server_lr
    """The server optimizer's learning rate (eta); 0 = the strategy's own `default_server_lr` (fedavgm 1,
    fedadam and fedyogi 0.01), which replaces the 0 here."""
    fedbn: bool = _DEFAULTS.fedbn
    """Keep BatchNorm layers out of the in-job combines (the strategies that average: not ddp)."""
    sync_every_steps: int = _DEFAULTS.sync_every_steps
    """Also average the weights inside each round every this many optimizer steps (local SGD; 0: at round ends
    only). The strategies that average; ddp (synchronous) sets it to 0. See microfed.training.local_sgd."""
    sync_optimizer: str = _DEFAULTS.sync_optimizer
    """The optimizer's state at each in-job average: "local" (kept per worker), "average" or "reset"."""

    def __post_init__(self) -> None:
        rule = REGISTRY.get(self.name)
        if rule is None:
            raise MicrofedError(f"unknown strategy {self.name!r}", hint=f"use one of {', '.join(REGISTRY)}")
        # the ranges are RunConfig's (training/config.py); then 0 becomes the strategy's own learning rate
        StrategyConfig(
            strategy=self.name,
            mu=self.mu,
            server_momentum=self.server_momentum,
            server_lr=self.server_lr,
            fedbn=self.fedbn,
            sync_every_steps=self.sync_every_steps,
            sync_optimizer=self.sync_optimizer,
        )
        if self.server_lr == 0:
            object.__setattr__(self, "server_lr", rule.default_server_lr)
        if rule.synchronous:
            # its ranks average the gradients in every step and hold one model: an in-round average of the weights
            # would change nothing, so the default --sync-every-steps does not make `--strategy ddp` an error
            object.__setattr__(self, "sync_every_steps", 0)
        rule.check(self)

    @classmethod
    def from_config(cls, section: StrategyConfig) -> Strategy:
        """The strategy of RunConfig's strategy section."""
        return cls(
            name=section.strategy,
            mu=section.mu,
            server_momentum=section.server_momentum,
            server_lr=section.server_lr,
            fedbn=section.fedbn,
            sync_every_steps=section.sync_every_steps,
            sync_optimizer=section.sync_optimizer,
        )

    def build(self) -> FederatedStrategy:
        """The strategy's object, whose hooks act on these settings."""
        return REGISTRY[self.name](self)

    def to_metadata(self) -> dict[str, str]:
        return {"strategy": self.name, "strategy_config": json.dumps(self.__dict__, sort_keys=True)}


class FederatedStrategy:
    """The hooks of a strategy, with FedAvg's behaviour: see the module docstring. Subclasses set `name` (and
    `summary`, the line --help shows) and override what differs."""

    name: ClassVar[str]
    summary: ClassVar[str]
    settings: ClassVar[tuple[str, ...]] = ()
    """The Strategy fields the strategy reads (for help text and labels)."""
    default_server_lr: ClassVar[float] = 1.0
    """What `server_lr=0` means for this strategy."""
    server_optimizer: ClassVar[bool] = False
    """`server_step` does something: the in-job combine runs even for one worker, and the job hands the global
    model and the server state of round R to the aggregate step."""
    needs_global_state: ClassVar[bool] = False
    """The round loop keeps a copy of the model each round starts from (`gradient_term`, `server_step` use it)."""
    synchronous: ClassVar[bool] = False
    """The ranks step together (gradients all-reduced every step): they wait for each other while they train, and
    they combine after round R too, inside the job (BatchNorm statistics); the aggregate step gets one model."""

    def __init__(self, config: Strategy) -> None:
        self.config = config

    @classmethod
    def check(cls, config: Strategy) -> None:
        """Refuse settings this strategy cannot use (Strategy checks the ranges of the numbers)."""

    def label(self) -> str:
        """The name and the settings it reads, e.g. `fedprox mu=0.01` (benchmark rows, logs)."""
        names = {"mu": "mu", "server_momentum": "beta", "server_lr": "lr"}
        words = [self.name, *(f"{names[s]}={getattr(self.config, s):g}" for s in self.settings)]
        if self.config.sync_every_steps:
            words.append(f"sync={self.config.sync_every_steps}")
        if self.config.sync_optimizer != _DEFAULTS.sync_optimizer:
            words.append(f"optimizer-state={self.config.sync_optimizer}")
        return " ".join(words)

    def averaged_keys(self, model: nn.Module) -> set[str]:
        """The state_dict keys the in-job combines take: all, or with fedbn all but BatchNorm's."""
        keys = set(model.state_dict())
        return keys - batchnorm_keys(model) if self.config.fedbn else keys

    def trainer(
        self, model: nn.Module, *, device: torch.device, world_size: int, largest_shard: int, batch_size: int
    ) -> tuple[nn.Module, int | None]:
        """What the local epochs run, and the steps per epoch when every rank must take as many (None: one pass
        over its own shard)."""
        return model, None

    def gradient_term(self, model: nn.Module, global_state: State | None) -> Callable[[], None] | None:
        """Called after each backward, before the optimizer step, to add to the gradients; None: nothing.
        `global_state` is the state_dict the round started from (with `needs_global_state`)."""
        return None

    def server_step(self, global_state: State, average: State, state: ServerState) -> Combined:
        """The next global model (for `global_state`'s keys) from the round's average, and the new server state.
        Pure: the inputs are not modified. FedAvg: the average itself."""
        return {k: average[k] for k in global_state}, state

    def combine_in_job(
        self, mine: State, n_k: int, *, world_size: int, global_state: State | None, state: ServerState
    ) -> Combined:
        """Rounds 1..R-1: every rank passes its averaged tensors and n_k, and gets the next global model's (the
        weighted average across the ranks, then `server_step` from the round's start) and the new server state."""
        average = allreduce_average(mine, float(n_k)) if world_size > 1 else dict(mine)
        if not self.server_optimizer or global_state is None:
            return average, state
        return self.server_step(global_state, average, state)

    def combine_final(
        self,
        states: Sequence[State],
        weights: Sequence[float],
        *,
        names: Sequence[str] | None = None,
        server: ServerState | None = None,
    ) -> tuple[dict[str, torch.Tensor], str]:
        """The aggregate step: the global model from the micro-models of round R and their n_k, and a line saying
        how. `server`: the job's global model of round R's start (part "global") and server state, when it left
        them (`server_optimizer`, and the job ran every round: an early stop ends on a combined model)."""
        average = weighted_average(states, weights, names=names)
        total = math.fsum(weights)
        how = f"weighted average of {len(states)} micro-models, weights {[round(w / total, 4) for w in weights]}"
        if server is None or not self.server_optimizer or GLOBAL_PART not in server:
            return average, how
        global_state = server[GLOBAL_PART]
        rest = {part: tensors for part, tensors in server.items() if part != GLOBAL_PART}
        updated, _ = self.server_step(global_state, {k: average[k] for k in global_state}, rest)
        return {**average, **updated}, f"{self.label()}: {how}, then the server step"


REGISTRY: dict[str, type[FederatedStrategy]] = {}
_S = TypeVar("_S", bound=type[FederatedStrategy])


def register(cls: _S) -> _S:
    """Add a strategy class to REGISTRY under its `name`."""
    if cls.name in REGISTRY:
        raise ValueError(f"strategy {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def strategy_help() -> str:
    """The strategies and what each does, for --help texts: `fedavg: ...; fedprox: ...; ...`."""
    return "; ".join(f"{name}: {cls.summary}" for name, cls in REGISTRY.items())


@register
class FedAvg(FederatedStrategy):
    name = "fedavg"
    summary = "the weighted average (n_k / n) of the workers' models"


@register
class FedProx(FedAvg):
    """Li et al. 2020: a proximal term mu/2 * ||w - w_global||^2 in every worker's loss."""

    name = "fedprox"
    summary = "fedavg, with the proximal term mu/2 ||w - w_global||^2 in the local loss"
    settings = ("mu",)
    needs_global_state = True

    def gradient_term(self, model: nn.Module, global_state: State | None) -> Callable[[], None] | None:
        if global_state is None:
            raise ValueError("fedprox needs the state its round started from")
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        anchor = [global_state[name] for name, _ in named]  # w_global: the model the round started from
        mu = self.config.mu
        return lambda: proximal_step(params, anchor, mu)


@register
class FedAvgM(FedAvg):
    """Hsu et al. 2019: server momentum over the pseudo-gradient."""

    name = "fedavgm"
    summary = "fedavg with server momentum (server_momentum, server_lr)"
    settings = ("server_momentum",)
    server_optimizer = True
    needs_global_state = True

    def server_step(self, global_state: State, average: State, state: ServerState) -> Combined:
        new, momentum = server_update(
            global_state,
            average,
            state.get("momentum") or None,
            beta=self.config.server_momentum,
            lr=self.config.server_lr,
        )
        return new, {"momentum": momentum}


SecondMoment = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def adaptive_server_update(
    global_state: State,
    average: State,
    state: ServerState,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
    second_moment: SecondMoment,
) -> Combined:
    """One server step of Reddi et al. 2021, Algorithm 2: returns (new global state, {"m": ..., "v": ...}).

    Floating tensors, in float64 and cast back (m and v kept in float32, as FedAvgM's momentum):
    d = average - global (the pseudo-gradient), m = beta1 * m + (1 - beta1) * d, v = second_moment(v, d^2, beta2),
    global' = global + lr * m / (sqrt(v) + tau). Before the first step m = 0 and v = tau^2 (the paper's
    v_{-1} >= tau^2); no bias correction (the paper has none). Other tensors (counters such as BatchNorm's
    num_batches_tracked) are not optimised: they take the average's value, as in FedAvgM. Inputs are not modified.
    """
    check_compatible([global_state, average], ["the global model", "the average"], finite=True)
    m_old, v_old = state.get("m", {}), state.get("v", {})
    new_global: dict[str, torch.Tensor] = {}
    m_new: dict[str, torch.Tensor] = {}
    v_new: dict[str, torch.Tensor] = {}
    for key, g in global_state.items():
        a = average[key]
        if not g.is_floating_point():
            new_global[key] = a.detach().clone()
            continue
        g64 = g.detach().to(torch.float64)
        d = a.detach().to(device=g64.device, dtype=torch.float64) - g64
        m = (1 - beta1) * d
        if key in m_old:
            m.add_(m_old[key].detach().to(device=d.device, dtype=torch.float64), alpha=beta1)
        v_prev = (
            v_old[key].detach().to(device=d.device, dtype=torch.float64)
            if key in v_old
            else torch.full_like(d, tau * tau)
        )
        v = second_moment(v_prev, d * d, beta2)
        new_global[key] = (g64 + lr * m / (v.sqrt() + tau)).to(g.dtype)
        m_new[key], v_new[key] = m.to(torch.float32), v.to(torch.float32)
    return new_global, {"m": m_new, "v": v_new}


class _AdaptiveServer(FedAvg):
    """Reddi et al. 2021 (FedOpt), Algorithm 2: the server runs an adaptive optimizer over the pseudo-gradient.

    eta = server_lr (0: 0.01 here; the paper tunes it per task on a grid of powers of ten), beta1 =
    server_momentum (0.9, the paper's), beta2 = 0.99 and tau = 1e-3 (the paper's defaults; it tunes tau over
    1e-1 .. 1e-5: the smaller, the more adaptive). A subclass gives the second-moment rule."""

    settings = ("server_momentum", "server_lr")
    server_optimizer = True
    needs_global_state = True
    default_server_lr = 1e-2
    beta2: ClassVar[float] = 0.99
    tau: ClassVar[float] = 1e-3

    @staticmethod
    def second_moment(v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
        raise NotImplementedError

    def server_step(self, global_state: State, average: State, state: ServerState) -> Combined:
        return adaptive_server_update(
            global_state,
            average,
            state,
            lr=self.config.server_lr,
            beta1=self.config.server_momentum,
            beta2=self.beta2,
            tau=self.tau,
            second_moment=self.second_moment,
        )


@register
class FedAdam(_AdaptiveServer):
    """Adam on the server: v = beta2 * v + (1 - beta2) * d^2."""

    name = "fedadam"
    summary = "Adam on the server over the pseudo-gradient (beta1 = server_momentum, eta = server_lr)"

    @staticmethod
    def second_moment(v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
        return beta2 * v + (1 - beta2) * d2


@register
class FedYogi(_AdaptiveServer):
    """Yogi on the server: v = v - (1 - beta2) * d^2 * sign(v - d^2), an additive change that cannot make v
    forget a large earlier step as fast as Adam's does."""

    name = "fedyogi"
    summary = "Yogi on the server over the pseudo-gradient (beta1 = server_momentum, eta = server_lr)"

    @staticmethod
    def second_moment(v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
        return v - (1 - beta2) * d2 * torch.sign(v - d2)


@register
class DDP(FederatedStrategy):
    """Synchronous data parallel: DistributedDataParallel all-reduces the gradients in every step, so the ranks
    hold one model; every rank takes as many steps as the largest shard needs."""

    name = "ddp"
    summary = "DistributedDataParallel across the shards: one model, gradients averaged every step"
    synchronous = True

    @classmethod
    def check(cls, config: Strategy) -> None:
        averaging = ", ".join(n for n, c in REGISTRY.items() if not c.synchronous)
        if config.fedbn:
            raise MicrofedError(f"--fedbn applies to {averaging}, not {cls.name} (one model, no averages)")
        if config.sync_optimizer != _DEFAULTS.sync_optimizer:
            raise MicrofedError(
                f"--sync-optimizer applies to {averaging}, not {cls.name}: its ranks hold one model and one "
                "optimizer state",
                hint=f"leave --sync-optimizer at {_DEFAULTS.sync_optimizer} with --strategy ddp",
            )

    def trainer(
        self, model: nn.Module, *, device: torch.device, world_size: int, largest_shard: int, batch_size: int
    ) -> tuple[nn.Module, int | None]:
        # every rank takes as many steps as the largest shard needs (smaller shards wrap around, as
        # DistributedSampler pads), so that the gradient all-reduces pair up and the schedules stay in step
        steps = -(-largest_shard // batch_size)
        if world_size == 1:
            return model, steps
        ids = [device.index] if device.index is not None else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids), steps

    def combine_final(
        self,
        states: Sequence[State],
        weights: Sequence[float],
        *,
        names: Sequence[str] | None = None,
        server: ServerState | None = None,
    ) -> tuple[dict[str, torch.Tensor], str]:
        # the ranks trained one model and settled its BatchNorm statistics in-job
        check_compatible(states, names)
        return dict(states[0]), "ddp: the job's single model, passed through"


STRATEGIES = tuple(REGISTRY)


def pack_server_state(parts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Named parts of tensors as one flat map, `<part>.<key>`, for a safetensors file (part names hold no dot)."""
    return {f"{part}.{key}": t for part, tensors in parts.items() for key, t in tensors.items()}


def unpack_server_state(tensors: Mapping[str, torch.Tensor]) -> ServerState:
    """The inverse of `pack_server_state`."""
    parts: ServerState = {}
    for name, t in tensors.items():
        part, key = name.split(".", 1)
        parts.setdefault(part, {})[key] = t
    return parts
