"""Node labels and taints of the training node pools, and their default sizes, read from `cluster.json`.

One file holds the names so the Terraform in infra/ (which reads the same JSON) and the PyTorchJob builder
cannot drift apart. The pools' default machine types and node limits live there too, for the capacity check
(`microfed.training.capacity`); Terraform cannot take a variable's default from a file, so a test keeps them equal
to infra/modules/microfed/variables.tf and main.tf.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["CLUSTER_FILE", "ClusterContract", "PoolDefaults", "Taint", "cluster_contract", "pool_defaults"]

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


@dataclass(frozen=True, kw_only=True)
class PoolDefaults:
    """The training pools as infra/ creates them when terraform.tfvars leaves them alone."""

    cpu_machine_type: str
    """Default of the `cpu_machine_type` variable."""
    cpu_max_nodes: int
    """Default of the `cpu_max_nodes` variable (nodes summed over the pool's zones)."""
    gpu_machine_types: dict[str, str]
    """Accelerator type → machine type of its pool: main.tf's `default_gpu_machine_types` (the
    `gpu_machine_types` variable overrides entries)."""
    gpu_max_nodes: int
    """Default of the `gpu_max_nodes` variable (per GPU pool, summed over its zones)."""
    gpus_per_node: int
    """main.tf's `gpus_per_node`: GPUs attached to each node of a GPU pool."""


@cache
def pool_defaults() -> PoolDefaults:
    raw: dict[str, Any] = json.loads(CLUSTER_FILE.read_text())["pool_defaults"]
    return PoolDefaults(
        cpu_machine_type=raw["cpu"]["machine_type"],
        cpu_max_nodes=raw["cpu"]["max_nodes"],
        gpu_machine_types=dict(raw["gpu"]["machine_types"]),
        gpu_max_nodes=raw["gpu"]["max_nodes"],
        gpus_per_node=raw["gpu"]["gpus_per_node"],
    )
