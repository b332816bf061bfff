"""A tiny stand-in for the Training Operator: it runs a built PyTorchJob's replicas as local processes.

It reads the manifest the way the operator does: the `pytorch` container's command and env from each
replica template, `replicas` per type, and injects MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK (Master is
RANK 0, Worker i is RANK i + 1). Job conditions and pod states are reported as the operator reports them,
as the SDK's own models. So a test exercises the real manifest → the real worker command → the real launcher.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from kubeflow.training import KubeflowOrgV1JobCondition, KubeflowOrgV1JobStatus, KubeflowOrgV1PyTorchJob
from kubernetes.client import (
    V1ContainerState,
    V1ContainerStateRunning,
    V1ContainerStateTerminated,
    V1ContainerStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodStatus,
)

from microfed.training.launch import free_port


class LocalOperator:
    """JobBackend whose 'pods' are subprocesses on this machine."""

    def __init__(self, log_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.jobs: dict[str, KubeflowOrgV1PyTorchJob] = {}
        self.procs: dict[str, dict[str, subprocess.Popen[bytes]]] = {}
        self.deleted: list[str] = []
        self.created: list[KubeflowOrgV1PyTorchJob] = []

    def create(self, job: KubeflowOrgV1PyTorchJob) -> bool:
        name = job.metadata.name
        if name in self.jobs:
            return False
        self.jobs[name] = job
        self.created.append(job)
        specs = job.spec.pytorch_replica_specs
        world = sum(spec.replicas for spec in specs.values())
        port = free_port()
        self.procs[name] = {}
        rank = 0
        for replica_type in ("Master", "Worker"):
            if replica_type not in specs:
                continue
            spec = specs[replica_type]
            (container,) = [c for c in spec.template.spec.containers if c.name == "pytorch"]
            for index in range(spec.replicas):
                pod = f"{name}-{replica_type.lower()}-{index}"
                env = {e.name: e.value for e in container.env or []}
                env.update(self.extra_env)
                env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
                command = [sys.executable if c == "python" else c for c in container.command] + list(
                    container.args or []
                )
                log = open(self.log_dir / f"{pod}.log", "wb")  # noqa: SIM115 - closed when the process is reaped
                self.procs[name][pod] = subprocess.Popen(
                    command, env={**_base_env(), **env}, stdout=log, stderr=subprocess.STDOUT
                )
                rank += 1
        return True

    def get(self, name: str) -> KubeflowOrgV1PyTorchJob | None:
        if name not in self.jobs:
            return None
        codes = [p.poll() for p in self.procs[name].values()]
        conditions = [KubeflowOrgV1JobCondition(type="Created", status="True")]
        # restartPolicy ExitCode: 1-127 fail the job at once; a replica killed or told to restart (128-255) does not
        # by itself (the operator would restart it; this fake fails the job once every replica has exited)
        finished = all(c is not None for c in codes)
        if any(c is not None and 0 < c < 128 for c in codes) or (finished and any(c != 0 for c in codes)):
            conditions.append(KubeflowOrgV1JobCondition(type="Failed", status="True", message="a replica failed"))
        elif all(c == 0 for c in codes):
            conditions.append(KubeflowOrgV1JobCondition(type="Succeeded", status="True"))
        else:
            conditions.append(KubeflowOrgV1JobCondition(type="Running", status="True"))
        job = self.jobs[name]
        job.status = KubeflowOrgV1JobStatus(conditions=conditions)
        return job

    def pods(self, name: str) -> list[V1Pod]:
        return [_pod(pod, proc) for pod, proc in self.procs.get(name, {}).items()]

    def pod_log(self, pod: str) -> str:
        return (self.log_dir / f"{pod}.log").read_text(errors="replace")

    def pod_events(self, pod: str) -> list[tuple[str, str]]:
        return []

    def delete(self, name: str) -> None:
        for proc in self.procs.pop(name, {}).values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if self.jobs.pop(name, None) is not None:
            self.deleted.append(name)


def _pod(name: str, proc: subprocess.Popen[bytes]) -> V1Pod:
    code = proc.poll()
    if code is None:
        state = V1ContainerState(running=V1ContainerStateRunning())
        phase = "Running"
    else:
        state = V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=code))
        phase = "Succeeded" if code == 0 else "Failed"
    status = V1ContainerStatus(name="pytorch", image="", image_id="", ready=code is None, restart_count=0, state=state)
    return V1Pod(metadata=V1ObjectMeta(name=name), status=V1PodStatus(phase=phase, container_statuses=[status]))


def _base_env() -> dict[str, Any]:
    import os

    return dict(os.environ)
