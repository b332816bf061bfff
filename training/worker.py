"""Worker entrypoint: one process per shard, under a PyTorchJob, torchrun, or microfed's local launcher.

It reads the variables the Kubeflow Training Operator injects (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK;
RANK 0 is the Master replica), trains on shard RANK for R rounds of E local epochs, averages the workers'
weights in-job between rounds (weights n_k / n), and after round R writes its micro-model and n_k for the
aggregate step. Run it by hand on one machine with two workers:

    torchrun --standalone --nproc_per_node=2 -m microfed.training.worker \\
        --shards SHARDS_DIR --out OUT_DIR --model cnn-fmnist --rounds 3 --local-epochs 1

Faults. Each in-job average ends with a checkpoint of the round (microfed.training.checkpoint), written by
rank 0 into OUT_DIR/checkpoints/ before any rank starts the next round. A worker group started again on the
same OUT_DIR (the PyTorchJob restarting its pods, the local launcher restarting its processes) resumes after
the last checkpointed round: rank 0 picks the round and broadcasts it, so all ranks agree. Exit codes tell a
launcher what happened: 0 done, 2 bad input or a diverged worker (MicrofedError: restarting cannot help),
200 a peer was lost in a collective or never joined the rendezvous (restart the group), and a crash or a
signal anything else.

Finishing. The last round ends without an average (the aggregate step does it), so nothing else would hold
the ranks together at the end: rank 0, the Master replica, could exit while the other ranks were still
training or uploading, and the Training Operator marks a PyTorchJob Succeeded as soon as its Master
succeeds, whatever the Workers are doing. So every rank waits in a final barrier after its outputs are
uploaded, and rank 0 exits only once all of them are durable.

Timeouts. Every collective, the rendezvous and that final barrier are bounded by `--collective-timeout-minutes`
(30 when 0): the wait of the fastest rank for the slowest in a round must fit in it.

Progress. Under microfed's local launcher each rank keeps a progress record (what it is doing, whether it is waiting
for its peers in a collective, when it last made progress: a training step, or the start of a step of its own),
rewritten atomically, at most every few seconds while it trains. The launcher warns about a rank that made no
progress for `--stall-minutes` (a third of the collective timeout when 0) and names it as the error when the
collective timeout ends the run (training/launch.py).

Models. Before the first epoch, every rank runs one batch of its shard through the model it built and refuses, with
one line that names the model or factory, a factory that raises, a model without trainable parameters, and an
output that is not (batch, num_classes) logits (microfed.training.models.check_model).

Code: the configuration and its flags (worker_config), the group and its collectives (worker_group), the round
loop (worker_rounds), checkpoints and resuming (worker_resume), the progress record (worker_progress), and the
strategies' hooks (strategies).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch.distributed as dist

from microfed.training.errors import MicrofedError
from microfed.training.launch import EXIT_PEER_LOST, EXIT_USER_ERROR
from microfed.training.worker_config import (
    DEFAULT_COLLECTIVE_TIMEOUT_MINUTES,
    WorkerConfig,
    build_parser,
    collective_timeout,
    config_to_argv,
    parse_config,
    stall_timeout,
)
from microfed.training.worker_group import DistEnv, PeerLost, finish, join_group
from microfed.training.worker_progress import Progress, progress, use
from microfed.training.worker_rounds import run_worker

__all__ = [
    "DEFAULT_COLLECTIVE_TIMEOUT_MINUTES",
    "DistEnv",
    "PeerLost",
    "WorkerConfig",
    "build_parser",
    "collective_timeout",
    "config_to_argv",
    "main",
    "parse_config",
    "run_worker",
    "stall_timeout",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, join the group, run the rounds, wait for every rank's outputs; the exit code."""
    try:
        cfg = parse_config(argv)
        env = DistEnv.from_environ()
        use(Progress.from_environ(cfg, env.rank))
        if env.world_size > 1:
            with progress().waiting_for("joining the worker group"):
                join_group(cfg, env)
        try:
            run_worker(cfg, env)
            finish(env)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except MicrofedError as e:
        print(f"[microfed worker] error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except PeerLost as e:
        print(
            f"[microfed worker] {e}; exiting with {EXIT_PEER_LOST} to have the group restarted",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_PEER_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main())
