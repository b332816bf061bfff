"""`launcher=auto`: ask the API server which training CRD it serves, and run the workers as that kind of job.

A Kubeflow platform installed today ships Kubeflow Trainer v2 (TrainJob, `trainer.kubeflow.org/v1alpha1`) and no
PyTorchJob CRD; one installed before ships the Training Operator v1 (PyTorchJob, `kubeflow.org/v1`). The API
server's discovery documents say which: `GET /apis/<group>/<version>` lists the resources a group version serves
(404 when it serves none), and every authenticated client may read them (the `system:discovery` ClusterRole), so
the train step needs no extra permission. When both are served, TrainJob wins: v1 is maintained only on
release-1.9.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from microfed.training.errors import MicrofedError

__all__ = ["CLUSTER_LAUNCHERS", "Served", "choose_launcher", "served_by"]


@dataclass(frozen=True)
class Served:
    """One training CRD: the launcher that runs it, its group, version and plural (the resource discovery lists)."""

    launcher: str
    group: str
    version: str
    plural: str

    @property
    def crd(self) -> str:
        return f"{self.plural}.{self.group}"


# In the order `auto` prefers them.
CLUSTER_LAUNCHERS = (
    Served("trainjob", "trainer.kubeflow.org", "v1alpha1", "trainjobs"),
    Served("pytorchjob", "kubeflow.org", "v1", "pytorchjobs"),
)


def served_by(custom_api: Any, *, attempts: int = 5, sleep: Callable[[float], None] = time.sleep) -> list[Served]:
    """The training CRDs the API server serves, asked through `custom_api` (a kubernetes CustomObjectsApi:
    `get_api_resources(group, version)` is the discovery request). A group version it does not serve answers 404;
    a transient error (timeout, dropped connection, 429, 5xx) is retried with doubling waits."""
    from kubernetes.client.exceptions import ApiException

    from microfed.training.job_status import is_transient

    found = []
    for crd in CLUSTER_LAUNCHERS:
        delay = 1.0
        for attempt in range(1, max(1, attempts) + 1):
            try:
                resources = custom_api.get_api_resources(crd.group, crd.version)
                break
            except Exception as e:
                if isinstance(e, ApiException) and e.status == 404:
                    resources = None
                    break
                if not is_transient(e) or attempt >= attempts:
                    raise MicrofedError(
                        f"launcher auto: cannot ask the API server whether it serves {crd.crd}: {_reason(e)}",
                        hint="pass launcher=trainjob or launcher=pytorchjob to skip the question",
                    ) from e
                sleep(delay)
                delay *= 2
        names = {r.name for r in (getattr(resources, "resources", None) or [])}
        if crd.plural in names:
            found.append(crd)
    return found


def choose_launcher(requested: str, custom_api: Any = None, *, log: Callable[[str], None] = print, **retry: Any) -> str:
    """The launcher a cluster run uses: `requested` itself unless it is `auto`, which takes the first of
    CLUSTER_LAUNCHERS the API server serves and says so in the step's log. `custom_api` None builds one from the
    in-cluster configuration (kube-config outside a pod), as the cluster info does."""
    if requested != "auto":
        return requested
    if custom_api is None:
        from kubernetes import client

        from microfed.training.cluster import load_kubernetes_config

        load_kubernetes_config()
        custom_api = client.CustomObjectsApi()
    served = served_by(custom_api, **retry)
    if not served:
        names = " nor ".join(c.crd for c in CLUSTER_LAUNCHERS)
        raise MicrofedError(
            f"launcher auto: the cluster serves neither {names}",
            hint="install Kubeflow Trainer v2 or the Training Operator v1 (infra/: variable training_operator), "
            "or run the workers in the step with launcher=local",
        )
    chosen = served[0]
    others = [c.crd for c in CLUSTER_LAUNCHERS if c not in served]
    also = f"; {', '.join(c.crd for c in served[1:])} served too" if len(served) > 1 else ""
    missing = f"; {', '.join(others)} not served" if others else ""
    log(f"launcher auto: {chosen.launcher} ({chosen.crd} served{also}{missing})")
    return chosen.launcher


def _reason(error: BaseException) -> str:
    status, reason = getattr(error, "status", None), getattr(error, "reason", None)
    if status:
        return f"HTTP {status} {reason or ''}".strip()
    return str(error).splitlines()[0] if str(error) else type(error).__name__
