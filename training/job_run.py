"""The launcher's run loop, the same for a PyTorchJob and a TrainJob: claim the job (create, adopt or replace it),
watch it until it succeeds with every replica's outputs written, fails or times out, save its logs, and delete it
whatever happens, SIGTERM included. What differs per kind is the claim (pytorchjob_launch.py, trainjob_launch.py)
and the `JobKind` the watch reads the job with (job_kinds.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microfed.training.job_kinds import JobKind
from microfed.training.job_watch import Api, JobFailed, JobTerminated, JobTimeout, Watch, WatchPolicy
from microfed.training.termination import raised_at_waits

__all__ = ["JobOutcome", "run_job"]


@dataclass
class JobOutcome:
    name: str
    adopted: bool
    seconds: float
    waiting_for_capacity_seconds: float
    restarts: dict[str, int] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)


def run_job(
    kind: JobKind,
    name: str,
    claim: Callable[[Api], bool],
    backend: Any,
    *,
    policy: WatchPolicy,
    log_dir: str | Path,
    outputs_missing: Callable[[], list[int]],
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    log: Callable[[str], None],
) -> JobOutcome:
    """`claim(api)` creates the job or adopts one of an earlier attempt, and returns whether it adopted one."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    start = clock()

    def terminated(signum: int) -> JobTerminated:
        return JobTerminated(f"the train step was terminated (signal {signum}); deleting {kind.name} {name}")

    # SIGTERM (KFP's Terminate, an eviction) as JobTerminated, so that the `finally` deletes the job; Python's
    # default would exit at once. It is raised in a wait of the loop (training/termination.py).
    with raised_at_waits(terminated, sleep) as wait:
        api = Api(backend, policy, clock, wait, log)  # its retry waits end at a SIGTERM too
        try:
            adopted = claim(api)
            watch = Watch(api, name, policy, log_dir, log, kind)
            _wait(watch, policy, start, clock, wait)
            _confirm_outputs(watch, policy, outputs_missing, clock, wait, log)
            logs = watch.save_all_logs()
            restarts = {pod: rep.restarts for pod, rep in watch.replicas.items() if rep.restarts}
            return JobOutcome(
                name=name,
                adopted=adopted,
                seconds=clock() - start,
                waiting_for_capacity_seconds=watch.capacity_waited,
                restarts=restarts,
                logs=logs,
            )
        finally:
            # with the plain sleep: the retries of the delete must not end at the SIGTERM that brought us here
            Api(backend, policy, clock, sleep, log)("delete the job", lambda: backend.delete(name))


def _wait(watch: Watch, policy: WatchPolicy, start: float, clock: Callable[[], float], sleep: Any) -> None:
    while True:
        now = clock()
        state = watch.poll(now)
        if state == "Succeeded":
            return
        if now - start > policy.timeout_seconds:
            logs = watch.save_all_logs()
            raise JobTimeout(
                f"{watch.kind.name} {watch.name} did not finish in {policy.timeout_seconds:.0f} s (state {state}, "
                f"{watch.capacity_waited:.0f} s of it waiting for capacity); logs in {watch.log_dir} "
                f"({len(logs)} pods)",
                hint="raise the step's timeout_minutes, or lower rounds/epochs",
            )
        sleep(policy.poll_seconds)


def _confirm_outputs(
    watch: Watch, policy: WatchPolicy, outputs_missing: Callable[[], list[int]], clock: Any, sleep: Any, log: Any
) -> None:
    """A PyTorchJob is Succeeded when the Master exits 0; Workers may still be writing. Wait for their records
    while any replica still runs, at most `outputs_grace_seconds`."""
    since = clock()
    while missing := outputs_missing():
        pods = watch.api("list the job's pods", lambda: watch.api.backend.pods(watch.name))
        running = [p.metadata.name for p in pods if p.status is not None and p.status.phase in ("Running", "Pending")]
        waited = clock() - since
        if not running or waited >= policy.outputs_grace_seconds:
            watch.save_all_logs()
            still = f"{len(running)} replica(s) still running after {waited:.0f} s" if running else "no replica runs"
            raise JobFailed(
                f"{watch.kind.name} {watch.name} succeeded, but the records of rank(s) {missing} are missing ({still})",
                hint="a worker exited before writing its outputs; read its log beside the micro-models",
            )
        if waited == 0:
            log(f"{watch.kind.name} {watch.name} succeeded; waiting for the records of rank(s) {missing} ({running})")
        sleep(min(policy.poll_seconds, 5.0))
