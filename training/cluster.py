"""Node labels and taints of the training node pools, read from `cluster.json`.

One file holds the names so the Terraform in infra/ (which reads the same JSON) and the PyTorchJob builder
cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["CLUSTER_FILE", "ClusterContract", "Taint", "cluster_contract"]

CLUSTER_FILE = Path(__file__).with_name("cluster.json")


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass(frozen=True)
class ClusterContract:
    training_taint: Taint
    """Taint on every training pool: only pods that tolerate it (our PyTorchJob replicas) land there."""
    pool_label_key: str
    """Node label naming the pool; the builder selects pools by it."""
    cpu_pool: str
    """Value of `pool_label_key` on the CPU training pool."""
    gpu_pools: dict[str, str]
    """Accelerator type (GKE name) → value of `pool_label_key` on its pool."""
    gpu_label_key: str
    """The label GKE puts on GPU nodes with the accelerator type."""
    gpu_taint: Taint
    """The taint GKE puts on GPU nodes."""
    gpu_resource: str
    """The extended resource name of a GPU."""


@cache
def cluster_contract() -> ClusterContract:
    raw: dict[str, Any] = json.loads(CLUSTER_FILE.read_text())
    return ClusterContract(
        training_taint=Taint(**raw["training_taint"]),
        pool_label_key=raw["pool_label_key"],
        cpu_pool=raw["cpu_pool"],
        gpu_pools=dict(raw["gpu_pools"]),
        gpu_label_key=raw["gpu_label_key"],
        gpu_taint=Taint(**raw["gpu_taint"]),
        gpu_resource=raw["gpu_resource"],
    )
