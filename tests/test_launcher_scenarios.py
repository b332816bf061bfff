"""One scenario suite for both cluster launchers, each against its stand-in: run_pytorchjob with LocalOperator (the
Training Operator v1.9, tests/local_operator.py) and run_trainjob with LocalTrainer (Kubeflow Trainer v2.3 + JobSet +
the Job controller and kubelet, tests/trainer_standin.py). Both jobs are built by the project's builders from the
same JobConfig; only the container's command is a tiny script (its rank from either contract, rank_env.py) so that
each scenario takes a few seconds. The guarantees under test are issue 16's: success only with every rank's record;
a worker's own error (exit 1-127) fails fast with its log tail; a worker killed again and again (exit >= 128) fails
after max_restarts; pods that never start (an image no node can pull, pods the API server refuses) are reported
within start_grace_seconds; the job is deleted on the way out
and on SIGTERM; a KFP retry adopts a running job and replaces a finished one; every replica's log is kept.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from microfed.training.job_run import JobOutcome
from microfed.training.job_watch import JobFailed, JobTerminated, WatchPolicy
from microfed.training.pytorchjob import JobConfig, build_pytorchjob
from microfed.training.pytorchjob_launch import run_pytorchjob
from microfed.training.trainjob import build_trainjob
from microfed.training.trainjob_launch import run_trainjob
from tests.local_operator import LocalOperator
from tests.test_trainjob import make_config
from tests.trainer_standin import LocalTrainer

pytestmark = pytest.mark.integration

BAD_IMAGE = "europe-docker.pkg.dev/proj/microfed/missing:0.0.0"
ACCOUNT = make_config().service_account  # the one service account that exists

# The replicas' program. argv: mode, the folder for records. Each rank writes its record `record-<rank>` when it is
# done; modes make one rank misbehave.
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from microfed.training.rank_env import read_rank_env

    rank, world, addr, port = read_rank_env()
    mode, out = sys.argv[1], Path(sys.argv[2])
    print(f"rank {rank} of {world} starts ({mode})", flush=True)
    if mode == "rendezvous":
        import datetime
        import torch, torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total)
        print(f"rank {rank}: sum {total.item():g}", flush=True)
        dist.destroy_process_group()
        if rank > 0:
            time.sleep(1.0)  # rank 0 is done first: a PyTorchJob is Succeeded while the others still write
    elif mode == "slow":
        time.sleep(2.0)
    elif mode == "own-error" and rank == 1:
        print("rank 1: the shard's checksum does not match its manifest", flush=True)
        sys.exit(3)
    elif mode == "killed" and rank == 1:
        print("rank 1: about to be killed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode in ("own-error", "killed", "forever"):
        time.sleep(120)
    (out / f"record-{rank}").write_text("done")
    print(f"rank {rank}: record written", flush=True)
    """
)


@dataclass
class Launcher:
    """One launcher with its stand-in: how to build its job, run it, and read the stand-in."""

    kind: str
    backend: Any
    build: Callable[[JobConfig], Any]
    run: Callable[..., JobOutcome]
    state: Callable[[str], str]  # Running / Succeeded / Failed / Gone
    script: Path
    out: Path

    def job(self, name: str, mode: str, *, workers: int = 2, **config: Any) -> Any:
        cfg = replace(make_config(name=name, workers=workers, env={}), **config)
        job = self.build(cfg)
        command = ["python", str(self.script), mode, str(self.out)]
        if self.kind == "pytorchjob":
            for spec in job.spec.pytorch_replica_specs.values():
                spec.template.spec.containers[0].command = command
        else:
            job["spec"]["trainer"]["command"], job["spec"]["trainer"]["args"] = command, []
        return job

    def launch(self, job: Any, log_dir: Path, workers: int = 2, **policy: Any) -> JobOutcome:
        defaults: dict[str, Any] = {"timeout_seconds": 60, "poll_seconds": 0.1, "start_grace_seconds": 2.0}
        return self.run(
            job,
            self.backend,
            policy=WatchPolicy(**{**defaults, **policy}),
            log_dir=log_dir,
            outputs_missing=lambda: [r for r in range(workers) if not (self.out / f"record-{r}").exists()],
            log=lambda line: print(f"[{self.kind}] {line}"),
        )

    def pods_running(self, name: str, count: int) -> bool:
        pods = self.backend.pods(name)
        return len(pods) >= count and all(p.status.phase == "Running" for p in pods)


def _pytorchjob_state(op: LocalOperator) -> Callable[[str], str]:
    def state(name: str) -> str:
        job = op.get(name)
        if job is None:
            return "Gone"
        true = [c.type for c in (job.status.conditions or []) if c.status == "True"]
        return next((s for s in ("Succeeded", "Failed") if s in true), "Running")

    return state


def _trainjob_state(trainer: LocalTrainer) -> Callable[[str], str]:
    names = {"Complete": "Succeeded", "Failed": "Failed", "Running": "Running", "Gone": "Gone"}
    return lambda name: names[trainer.state(name)]


@pytest.fixture(params=["pytorchjob", "trainjob"])
def launcher(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Launcher]:
    script, out = tmp_path / "replica.py", tmp_path / "out"
    script.write_text(SCRIPT)
    out.mkdir()
    if request.param == "pytorchjob":
        with LocalOperator(tmp_path / "pods", unpullable_images=[BAD_IMAGE], service_accounts=[ACCOUNT]) as op:
            yield Launcher("pytorchjob", op, build_pytorchjob, run_pytorchjob, _pytorchjob_state(op), script, out)
    else:
        # the kubelet's crash-loop back-off at 1/20 (10 s becomes 0.5 s): a Job reaches its backoffLimit of 6 in
        # about 15 s, which fail-fast must beat; the garbage collector takes 1 s
        with LocalTrainer(
            tmp_path / "pods",
            backoff_scale=0.05,
            gc_seconds=1.0,
            unpullable_images=(BAD_IMAGE,),
            service_accounts=(ACCOUNT,),
        ) as trainer:
            yield Launcher("trainjob", trainer, build_trainjob, run_trainjob, _trainjob_state(trainer), script, out)


def _deleted(launcher: Launcher, name: str) -> None:
    """The job was deleted, and its pods go with it."""
    assert name in launcher.backend.deleted
    deadline = time.monotonic() + 15
    while launcher.state(name) != "Gone" or launcher.backend.pods(name):
        assert time.monotonic() < deadline, f"{name} or its pods outlived the step"
        time.sleep(0.05)


# --- the scenarios ------------------------------------------------------------------------------------------------


def test_success_waits_for_every_ranks_record_and_keeps_the_logs(launcher: Launcher, tmp_path: Path) -> None:
    outcome = launcher.launch(launcher.job("scn-ok", "rendezvous"), tmp_path / "logs")
    assert sorted(p.name for p in launcher.out.iterdir()) == ["record-0", "record-1"]
    assert not outcome.adopted and outcome.restarts == {}
    assert len(outcome.logs) == 2  # one per replica, under log_dir
    texts = sorted(path.read_text() for path in outcome.logs.values())
    assert all(path.parent == tmp_path / "logs" for path in outcome.logs.values())
    assert "rank 0: sum 3" in texts[0] and "rank 1: sum 3" in texts[1]
    _deleted(launcher, "scn-ok")


def test_a_workers_own_error_fails_fast_with_its_log_tail(launcher: Launcher, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(JobFailed) as info:
        launcher.launch(launcher.job("scn-error", "own-error"), tmp_path / "logs")
    text = str(info.value)
    assert "exit code 3" in text and "the shard's checksum does not match its manifest" in text
    # the TrainJob's Job would restart the node in place for ~15 s here before failing (backoffLimit 6)
    assert time.monotonic() - start < 8
    saved = "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert "checksum does not match" in saved  # the failed container's log was kept
    _deleted(launcher, "scn-error")


def test_a_worker_killed_again_and_again_fails_after_max_restarts(launcher: Launcher, tmp_path: Path) -> None:
    with pytest.raises(JobFailed, match=r"restarted 3 times \(limit 2") as info:
        launcher.launch(launcher.job("scn-killed", "killed"), tmp_path / "logs", max_restarts=2)
    text = str(info.value)
    assert "exit code 137" in text
    if launcher.kind == "trainjob":
        # restarted in place: each killed container's log is read (kubectl logs -p) and kept as it is seen
        assert "about to be killed" in text
        restarts = [p.name for p in (tmp_path / "logs").iterdir() if ".restart-" in p.name]
        assert len(restarts) >= 2
    else:
        # the operator deletes a killed pod at once (common/pod.go ReconcilePods): its log is only in the
        # cluster's log store, and the message says where
        assert "Cloud Logging" in text
    _deleted(launcher, "scn-killed")


def test_pods_that_never_start_are_reported_within_the_grace(launcher: Launcher, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(JobFailed, match=r"cannot start: (ErrImagePull|ImagePullBackOff)") as info:
        launcher.launch(launcher.job("scn-image", "ok", image=BAD_IMAGE), tmp_path / "logs", start_grace_seconds=1.0)
    assert 1.0 <= time.monotonic() - start < 6
    assert "worker_image" in str(info.value.hint)
    _deleted(launcher, "scn-image")


def test_pods_the_api_server_rejects_are_reported_within_the_grace(launcher: Launcher, tmp_path: Path) -> None:
    start = time.monotonic()
    job = launcher.job("scn-sa", "ok", service_account="pipeline-runnr")  # a typo: no such service account
    with pytest.raises(JobFailed, match=r"cannot create its pods: Error creating: pods .* is forbidden") as info:
        launcher.launch(job, tmp_path / "logs", start_grace_seconds=1.0)
    assert 'serviceaccount "pipeline-runnr" not found' in str(info.value)
    assert 1.0 <= time.monotonic() - start < 6
    _deleted(launcher, "scn-sa")


def test_sigterm_deletes_the_job(launcher: Launcher, tmp_path: Path) -> None:
    name = "scn-term"

    def terminate() -> None:  # KFP's Terminate, once the replicas run
        deadline = time.monotonic() + 30
        while not launcher.pods_running(name, 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate, daemon=True).start()
    with pytest.raises(JobTerminated):
        launcher.launch(launcher.job(name, "forever"), tmp_path / "logs")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    _deleted(launcher, name)


def test_a_kfp_retry_adopts_the_running_job(launcher: Launcher, tmp_path: Path) -> None:
    name = "scn-adopt"
    job = launcher.job(name, "slow")
    assert launcher.backend.create(job)  # the earlier attempt's, still running when the step is retried
    deadline = time.monotonic() + 30
    while not launcher.pods_running(name, 2):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    outcome = launcher.launch(launcher.job(name, "slow"), tmp_path / "logs")
    assert outcome.adopted
    assert len(launcher.backend.created) == 1  # nothing was created again
    assert sorted(p.name for p in launcher.out.iterdir()) == ["record-0", "record-1"]
    _deleted(launcher, name)


def test_a_kfp_retry_replaces_a_finished_job(launcher: Launcher, tmp_path: Path) -> None:
    name = "scn-replace"
    if launcher.kind == "trainjob":  # the earlier attempt's node fails through its Job's backoffLimit: quicker here
        launcher.backend.backoff_scale = 0.005
    assert launcher.backend.create(launcher.job(name, "own-error"))  # the earlier attempt's job failed
    deadline = time.monotonic() + 60
    while launcher.state(name) != "Failed":
        assert time.monotonic() < deadline, "the earlier attempt's job did not fail"
        time.sleep(0.05)
    outcome = launcher.launch(launcher.job(name, "ok"), tmp_path / "logs")
    # a new job ran (a TrainJob created before the old JobSet was collected would show the old Failed)
    assert not outcome.adopted and len(launcher.backend.created) == 2
    assert sorted(p.name for p in launcher.out.iterdir()) == ["record-0", "record-1"]
    _deleted(launcher, name)
