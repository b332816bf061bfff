"""Averages inside a round (--sync-every-steps K): local SGD, between ddp (gradients averaged in every step) and
FedAvg (weights averaged once a round), and what happens to the optimizer's state at each in-job average
(--sync-optimizer).

When. Every rank passes over its own shard once per epoch, as in FedAvg, so ranks whose shards differ in size take
different numbers of steps S_k per epoch. The collectives must pair up, so every rank places its syncs at the same
fractions of the epoch: J = ceil(S_max / K) syncs per epoch (S_max: the largest shard's steps), the j-th after local
step ceil(j * S_k / J). The largest shard syncs every K steps or a little more often; equal shards sync every K
steps exactly; a smaller shard takes fewer steps between syncs, in proportion, and its weight stays n_k / n. At the
end of a round's last epoch the J-th sync is left out: the round's combine comes there (the strategy's, with its
server step), or after the last round the aggregate step's.

What. One SUM all-reduce of one flat float32 buffer: every rank's averaged tensors (all of the state_dict, or all but
BatchNorm's under fedbn), each scaled by n_k / n (n from the dataset manifest, so no collective is needed to learn
it). Integer buffers (BatchNorm's num_batches_tracked) take the maximum, in a second, small all-reduce. For
cnn-fmnist that is 1.7 MB per sync.

The optimizer's state at each in-job average, inside the round and at its end (`settle_optimizer`):
- `local`: each worker keeps its own (Adam's moments, SGD's momentum): FedAvg's usual choice, and the default;
- `average`: the per-parameter state tensors (Adam's exp_avg and exp_avg_sq, SGD's momentum_buffer) are averaged
  with the same weights, in the same buffer;
- `reset`: they are dropped, and the optimizer starts them afresh (Adam's step count and bias correction too).
One worker has nobody to average with: nothing happens then.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from microfed.training.errors import MicrofedError
from microfed.training.worker_group import PeerLost
from microfed.training.worker_progress import progress

__all__ = ["InRoundSync", "sync_points", "settle_optimizer"]


def sync_points(steps: int, per_epoch: int) -> list[int]:
    """How many syncs follow each of an epoch's `steps` local steps (index 0: after step 1), when the epoch holds
    `per_epoch` syncs placed at the same fractions on every rank: the j-th after step ceil(j * steps / per_epoch).
    A shard with fewer steps than syncs syncs more than once after some steps, so the collectives still pair up."""
    counts = [0] * steps
    for j in range(1, per_epoch + 1):
        counts[-(-j * steps // per_epoch) - 1] += 1
    return counts


def _optimizer_tensors(optimizer: torch.optim.Optimizer, params: Collection[nn.Parameter]) -> Iterator[torch.Tensor]:
    """The per-parameter state tensors (shaped like their parameter) of `params`, in the optimizer's order: the
    same order on every rank."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in params:
                continue
            state = optimizer.state.get(p, {})
            for name in sorted(state):
                t = state[name]
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == p.shape:
                    yield t


def _averaged_params(model: nn.Module, keys: Collection[str]) -> set[nn.Parameter]:
    return {p for name, p in model.named_parameters() if name in keys}


@torch.no_grad()
def _allreduce_in_place(tensors: list[torch.Tensor], share: float) -> int:
    """Replace every rank's `tensors` by their sum over the ranks of share * tensor (floats; the maximum for
    integers): the weighted average when the shares add up to 1. One flat buffer per kind. Returns the bytes sent."""
    sent = 0
    for floating in (True, False):
        group = [t for t in tensors if t.is_floating_point() == floating]
        if not group:
            continue
        dtype = torch.float32 if floating else torch.int64
        flat = torch.cat([t.reshape(-1).to(dtype) for t in group])
        if floating:
            flat.mul_(share)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM if floating else dist.ReduceOp.MAX)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        sent += flat.numel() * flat.element_size()
    return sent


def settle_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module, keys: Collection[str], share: float, policy: str
) -> int:
    """Apply --sync-optimizer after an in-job average of the weights (`keys`; this rank's weight `share` = n_k / n).
    Returns the bytes this rank sent (0 unless `average`). Call it on every rank of a group of more than one."""
    if policy == "average":
        return _allreduce_in_place(list(_optimizer_tensors(optimizer, _averaged_params(model, keys))), share)
    if policy == "reset":
        optimizer.state.clear()
    return 0


@dataclass
class InRoundSync:
    """This rank's syncs inside the rounds: `on_step(last_of_round)` gives train_epoch's per-step callback."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    keys: Collection[str]
    """The state_dict keys averaged (the strategy's `averaged_keys`)."""
    share: float
    """This rank's weight, n_k / n."""
    steps: int
    """This rank's steps per epoch, S_k."""
    per_epoch: int
    """Syncs per epoch, J = ceil(S_max / K), alike on every rank."""
    policy: str
    """--sync-optimizer."""
    rank: int
    syncs: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0

    @classmethod
    def plan(
        cls,
        *,
        every: int,
        n_k: int,
        shard_sizes: list[int],
        batch_size: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        keys: Collection[str],
        policy: str,
        rank: int,
    ) -> InRoundSync:
        largest = -(-max(shard_sizes) // batch_size)
        return cls(
            model=model,
            optimizer=optimizer,
            keys=keys,
            share=n_k / sum(shard_sizes),
            steps=-(-n_k // batch_size),
            per_epoch=-(-largest // every),
            policy=policy,
            rank=rank,
        )

    def on_step(self, last_of_round: bool, tick: Callable[[], None]) -> Callable[[], None]:
        """train_epoch's `on_step` for one epoch: `tick` (the heartbeat), then the syncs due after this step."""
        counts = sync_points(self.steps, self.per_epoch)
        if last_of_round:
            counts[-1] -= 1  # the round's combine averages there
        step = 0

        def after_step() -> None:
            nonlocal step
            tick()
            due = counts[step] if step < len(counts) else 0
            step += 1
            for _ in range(due):
                self.sync()

        return after_step

    def sync(self) -> None:
        """Average the weights (and, by the policy, the optimizer's state) across the ranks now."""
        start = time.perf_counter()
        state = self.model.state_dict()
        for key, t in state.items():  # a diverged rank never enters an average: it would poison every rank's model
            if key in self.keys and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MicrofedError(
                    f"its weights hold NaN or Inf (tensor {key!r}) at an average inside the round",
                    hint="lower --lr or use --optimizer sgd; the job stops rather than average a diverged model",
                )
        # as worker_group.collective: the progress record marks the wait (a rank stalled in its own steps is the
        # one the local launcher names), and a dropped or timed-out peer becomes PeerLost
        try:
            with progress().waiting_for("averaging inside a round"):
                sent = _allreduce_in_place([t for k, t in state.items() if k in self.keys], self.share)
                sent += settle_optimizer(self.optimizer, self.model, self.keys, self.share, self.policy)
        except RuntimeError as e:
            raise PeerLost.during(self.rank, "averaging inside a round", e) from e
        self.syncs += 1
        self.bytes_sent += sent
        self.seconds += time.perf_counter() - start

    def take_counts(self) -> dict[str, float]:
        """The syncs, bytes and seconds since the last call (one round's, for the round record)."""
        out = {"in_round_syncs": self.syncs, "sync_bytes": self.bytes_sent, "sync_seconds": round(self.seconds, 4)}
        self.syncs, self.bytes_sent, self.seconds = 0, 0, 0.0
        return out
