"""Pre-creation checks of the cluster path (issue 12): pool capacity (defect 6), the collective timeout (defect 8)
and the image's torch variant against the plan's accelerators (defect 9); the pools of the cluster infra/ describes
and GKE Autopilot's per-pod maximum (issue 13). Numbers are worked by hand in comments.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2.utils import SerializationOptions

from microfed.training import image, step_train
from microfed.training.capacity import (
    DEFAULT_COLLECTIVE_TIMEOUT_MINUTES,
    MACHINE_TYPES,
    MachineType,
    autopilot_requests,
    check_autopilot_pod,
    check_pool_capacity,
    collective_timeout_minutes,
    gke_allocatable,
    node_room,
    pool_limits,
    pool_limits_of,
)
from microfed.training.cluster import ClusterInfo, autopilot_placement, pool_defaults
from microfed.training.errors import MicrofedError
from microfed.training.models import ModelConfig
from microfed.training.resources import MAX_REPLICA_MEMORY, ResourcePlan, plan_resources
from microfed.training.worker import WorkerConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
MIB, GIB = 1024**2, 1024**3
_HCL = SerializationOptions(
    with_comments=False, explicit_blocks=False, strip_string_quotes=True, preserve_heredocs=False
)


def cpu_plan(cores: float, memory_gib: float) -> ResourcePlan:
    return ResourcePlan(accelerator="none", cpu_request=cores, memory_request=int(memory_gib * GIB))


def t4_plan(memory_gib: float = 4) -> ResourcePlan:
    return ResourcePlan(accelerator="nvidia-tesla-t4", gpus=1, cpu_request=1.0, memory_request=int(memory_gib * GIB))


# ---------------------------------------------------------------------------------------------------------------
# Pool limits: one source shared with infra/
# ---------------------------------------------------------------------------------------------------------------


def _hcl_blocks(path: Path, kind: str) -> dict[str, Any]:
    with path.open() as f:
        doc = hcl2.load(f, serialization_options=_HCL)
    merged: dict[str, Any] = {}
    for block in doc.get(kind, []):
        merged.update(block)
    return merged


def test_cluster_json_pool_defaults_equal_the_terraform_defaults() -> None:
    variables = _hcl_blocks(ROOT / "infra" / "modules" / "microfed" / "variables.tf", "variable")
    locals_ = _hcl_blocks(ROOT / "infra" / "modules" / "microfed" / "main.tf", "locals")
    d = pool_defaults()
    assert d.cpu_machine_type == variables["cpu_machine_type"]["default"]
    assert d.cpu_max_nodes == variables["cpu_max_nodes"]["default"]
    assert d.gpu_max_nodes == variables["gpu_max_nodes"]["default"]
    assert d.gpu_machine_types == locals_["default_gpu_machine_types"]
    assert variables["gpu_machine_types"]["default"] == {}  # no override of main.tf's map by default
    assert d.gpus_per_node == locals_["gpus_per_node"]


def test_machine_table_knows_every_machine_type_infra_defaults_to() -> None:
    variables = _hcl_blocks(ROOT / "infra" / "modules" / "microfed" / "variables.tf", "variable")
    d = pool_defaults()
    needed = {variables["system_machine_type"]["default"], d.cpu_machine_type, *d.gpu_machine_types.values()}
    assert needed <= set(MACHINE_TYPES)


def test_pool_limits_default_to_infra_and_take_the_callers_overrides() -> None:
    cpu = pool_limits("none")
    assert (cpu.machine_type, cpu.max_nodes, cpu.gpus_per_node) == ("e2-standard-8", 8, 0)
    assert (cpu.max_nodes_variable, cpu.machine_type_variable) == ("cpu_max_nodes", "cpu_machine_type")
    t4 = pool_limits("nvidia-tesla-t4")
    assert (t4.machine_type, t4.max_nodes, t4.gpus_per_node) == ("n1-standard-8", 4, 1)
    assert (t4.max_nodes_variable, t4.machine_type_variable) == (
        "gpu_max_nodes",
        'gpu_machine_types["nvidia-tesla-t4"]',
    )
    custom = pool_limits("none", machine_type="e2-standard-4", max_nodes=20)
    assert (custom.machine_type, custom.max_nodes) == ("e2-standard-4", 20)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_pool_limits_refuse_a_bad_maximum(bad: Any) -> None:
    with pytest.raises(MicrofedError, match="cpu_max_nodes"):
        pool_limits("none", max_nodes=bad)


def test_pool_limits_refuse_an_unknown_accelerator() -> None:
    with pytest.raises(MicrofedError, match="nvidia-h100"):
        pool_limits("nvidia-h100")


# ---------------------------------------------------------------------------------------------------------------
# GKE allocatable (https://cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes)
# ---------------------------------------------------------------------------------------------------------------


def test_allocatable_of_e2_standard_8() -> None:
    cpu, memory = gke_allocatable(MACHINE_TYPES["e2-standard-8"])
    # CPU: 8 - (6% of 1 + 1% of 1 + 0.5% of 2 + 0.25% of 4) = 8 - 0.09.
    assert cpu == pytest.approx(7.91)
    # Memory: 32 GiB - (25% of 4 + 20% of 4 + 10% of 8 + 6% of 16 = 3.56 GiB) - 100 MiB eviction threshold.
    assert memory == pytest.approx(32 * GIB - 3.56 * GIB - 100 * MIB, abs=1)


def test_allocatable_of_a2_highgpu_1g() -> None:
    cpu, memory = gke_allocatable(MACHINE_TYPES["a2-highgpu-1g"])
    assert cpu == pytest.approx(12 - (0.06 + 0.01 + 0.01 + 0.0025 * 8))  # 11.9
    assert memory == pytest.approx(85 * GIB - (1 + 0.8 + 0.8 + 0.06 * 69) * GIB - 100 * MIB, abs=1)


def test_allocatable_above_128_gib_matches_the_published_calculator() -> None:
    # hatemosphere/gke-node-allocatable-memory-calculator's README: 150 GiB -> 9.8577 GiB reserved (incl. eviction).
    _, memory = gke_allocatable(MachineType("big", 32, 150 * GIB))
    assert (150 * GIB - memory) / GIB == pytest.approx(9.8577, abs=1e-4)


def test_allocatable_of_a_machine_under_1_gib() -> None:
    _, memory = gke_allocatable(MachineType("tiny", 1, 768 * MIB))
    assert memory == 768 * MIB - 255 * MIB - 100 * MIB


def test_node_room_subtracts_the_system_daemonsets() -> None:
    room = node_room(MACHINE_TYPES["e2-standard-8"])
    assert room.cpu == pytest.approx(7.91 - 0.5)
    assert room.memory_bytes == pytest.approx((32 - 3.56) * GIB - 100 * MIB - 640 * MIB, abs=1)  # ~27.72 GiB
    gpu_room = node_room(MACHINE_TYPES["n1-standard-8"], gpus=1)
    assert gpu_room.cpu == pytest.approx(7.91 - 0.5 - 0.2)
    assert gpu_room.gpus == 1


# ---------------------------------------------------------------------------------------------------------------
# check_pool_capacity (defect 6)
# ---------------------------------------------------------------------------------------------------------------


def test_cpu_bound_replicas_one_per_node_fill_the_default_pool() -> None:
    # 4 cores of 7.41 per e2-standard-8 node: 1 replica per node; 8 replicas need the pool's 8 nodes.
    assert check_pool_capacity(cpu_plan(4, 8), 8) == 8


def test_one_replica_too_many_names_the_variable_and_the_difference() -> None:
    with pytest.raises(MicrofedError) as e:
        check_pool_capacity(cpu_plan(4, 8), 9)
    assert "9 replicas need 9 nodes" in e.value.message
    assert "limited by cpu" in e.value.message
    assert "raise cpu_max_nodes by 1 to 9" in e.value.hint
    assert "at most 8 shards" in e.value.hint


def test_small_replicas_pack_several_per_node() -> None:
    # 1 core / 2 GiB: CPU allows 7410 // 1000 = 7, memory 27.72 // 2 = 13 per node: 7, so 56 replicas fit 8 nodes.
    assert check_pool_capacity(cpu_plan(1, 2), 56) == 8
    with pytest.raises(MicrofedError, match="57 replicas need 9 nodes"):
        check_pool_capacity(cpu_plan(1, 2), 57)


def test_memory_bound_replicas() -> None:
    # 1 core / 10 GiB: memory allows 27.72 // 10 = 2 per node, CPU 7: 2 per node, 16 replicas on 8 nodes.
    assert check_pool_capacity(cpu_plan(1, 10), 16) == 8
    with pytest.raises(MicrofedError, match="limited by memory"):
        check_pool_capacity(cpu_plan(1, 10), 17)


def test_a_replica_larger_than_a_node_names_the_machine_type_variable() -> None:
    with pytest.raises(MicrofedError) as e:
        check_pool_capacity(cpu_plan(1, 30), 1)
    assert "short of memory" in e.value.message
    assert "cpu_machine_type" in e.value.hint


def test_gpu_replicas_need_one_node_each_and_name_gpu_max_nodes() -> None:
    assert check_pool_capacity(t4_plan(), 4) == 4
    with pytest.raises(MicrofedError) as e:
        check_pool_capacity(t4_plan(), 6)
    assert "limited by gpu" in e.value.message
    assert "raise gpu_max_nodes by 2 to 6" in e.value.hint
    assert "GPU quota for 6 nvidia-tesla-t4" in e.value.hint
    assert "gpu_machine_types" not in e.value.hint  # a larger machine still has one GPU


def test_gpu_replica_whose_host_memory_exceeds_the_node_names_the_gpu_machine_type() -> None:
    # n1-standard-8: 30 - 3.44 GiB reserved - 100 MiB - 640 MiB - 128 MiB = 25.7 GiB for pods.
    with pytest.raises(MicrofedError) as e:
        check_pool_capacity(t4_plan(memory_gib=26), 1)
    assert 'gpu_machine_types["nvidia-tesla-t4"]' in e.value.hint


def test_caller_limits_replace_the_defaults() -> None:
    assert check_pool_capacity(cpu_plan(4, 8), 9, pool_limits("none", max_nodes=12)) == 9
    # e2-standard-4: 4 - 0.08 - 0.5 = 3.42 cores, so a 4-core replica fits no node.
    with pytest.raises(MicrofedError, match="cpu_machine_type"):
        check_pool_capacity(cpu_plan(4, 8), 1, pool_limits("none", machine_type="e2-standard-4"))


def test_unknown_machine_type_skips_the_check_with_a_note() -> None:
    notes: list[str] = []
    limits = pool_limits("none", machine_type="n2-standard-32", max_nodes=1)
    assert check_pool_capacity(cpu_plan(4, 8), 100, limits, log=notes.append) is None
    assert len(notes) == 1
    assert "n2-standard-32" in notes[0]
    assert "skipped" in notes[0]


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_replica_count_must_be_positive(bad: Any) -> None:
    with pytest.raises(MicrofedError, match="replicas"):
        check_pool_capacity(cpu_plan(1, 2), bad)


# ---------------------------------------------------------------------------------------------------------------
# The pools of the cluster infra/ describes (ConfigMap microfed-cluster, issue 13)
# ---------------------------------------------------------------------------------------------------------------


def standard_cluster(**changes: Any) -> ClusterInfo:
    fields: dict[str, Any] = {
        "mode": "standard",
        "training_spot": True,
        "cpu_machine_type": "e2-standard-16",
        "cpu_max_nodes": 3,
        "gpu_types": ("nvidia-tesla-t4",),
        "gpu_machine_types": {"nvidia-tesla-t4": "n1-standard-4"},
        "gpu_max_nodes": 2,
        "source": "ConfigMap kubeflow/microfed-cluster",
        **changes,
    }
    return ClusterInfo(**fields)


def test_the_configmaps_machine_types_and_node_limits_replace_infras_defaults() -> None:
    cpu = pool_limits_of(standard_cluster(), "none")
    assert (cpu.machine_type, cpu.max_nodes) == ("e2-standard-16", 3)
    t4 = pool_limits_of(standard_cluster(), "nvidia-tesla-t4")
    assert (t4.machine_type, t4.max_nodes, t4.gpus_per_node) == ("n1-standard-4", 2, 1)
    # the train step's pool_max_nodes, when given, still wins
    assert pool_limits_of(standard_cluster(), "none", max_nodes=20).max_nodes == 20


def test_capacity_is_checked_against_the_configmaps_pool() -> None:
    # e2-standard-16: 16 - 0.11 reserved - 0.5 DaemonSets = 15.39 cores, 3 replicas of 4 cores per node; the
    # ConfigMap's 3 nodes hold 9 replicas, where infra's default e2-standard-8 x 8 would have held 8.
    assert check_pool_capacity(cpu_plan(4, 8), 9, pool_limits_of(standard_cluster(), "none")) == 3
    with pytest.raises(MicrofedError, match="10 replicas need 4 nodes"):
        check_pool_capacity(cpu_plan(4, 8), 10, pool_limits_of(standard_cluster(), "none"))


def test_a_gpu_type_the_cluster_has_no_pool_for_is_refused_naming_gpu_types() -> None:
    with pytest.raises(MicrofedError) as e:
        pool_limits_of(standard_cluster(), "nvidia-l4")
    assert "nvidia-l4: the cluster has no training pool for it" in e.value.message
    assert "gpu_types: nvidia-tesla-t4" in e.value.message
    assert "add nvidia-l4 to gpu_types in infra/terraform.tfvars" in e.value.hint


def test_on_autopilot_gpu_types_are_the_gpu_types_the_train_step_may_ask_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoJobs:
        def create(self, job: Any) -> bool:
            pytest.fail("a job was created")

    monkeypatch.setattr(step_train, "_plan", lambda *args, **kwargs: gpu_plan("nvidia-l4", 4, 16))
    options = step_train.ClusterOptions(
        image="microfed:test",
        namespace="team-a",
        accelerators=("nvidia-l4",),
        timeout_seconds=60,
        run_id="run-13",
        task="train",
        backend=NoJobs(),  # type: ignore[arg-type]
        cluster_info=standard_cluster(mode="autopilot"),
    )
    cfg = WorkerConfig(rounds=1, local_epochs=1, shards=tmp_path / "shards", out=tmp_path / "out")
    with pytest.raises(MicrofedError) as e:
        step_train.train_step(cfg, 2, cluster=options)
    assert "nvidia-l4: the cluster does not allow it (gpu_types: nvidia-tesla-t4" in e.value.message
    assert "add nvidia-l4 to gpu_types" in e.value.hint


def test_without_a_configmap_every_known_gpu_type_and_infras_defaults_hold() -> None:
    info = ClusterInfo.infra_defaults()
    for accelerator in ("none", *pool_defaults().gpu_machine_types):
        assert pool_limits_of(info, accelerator) == pool_limits(accelerator)


# ---------------------------------------------------------------------------------------------------------------
# GKE Autopilot's per-pod maximum (issue 13; figures and sources in training/cluster.json, key autopilot)
# ---------------------------------------------------------------------------------------------------------------


def gpu_plan(accelerator: str, cores: float, memory_gib: float) -> ResourcePlan:
    memory = int(memory_gib * GIB)
    return ResourcePlan(
        accelerator=accelerator, gpus=1, cpu_request=cores, cpu_limit=cores, memory_request=memory, memory_limit=memory
    )


def test_a_replica_within_the_general_purpose_maximum_passes_silently() -> None:
    limit = check_autopilot_pod(cpu_plan(4, 8), log=pytest.fail)  # 2 GiB per core: inside 1 to 6.5
    assert (limit.compute_class, limit.max_cpu, limit.max_memory_bytes) == ("General-purpose", 30, 110 * GIB)


def test_autopilot_raises_the_smaller_request_to_its_cpu_memory_range_and_says_so() -> None:
    notes: list[str] = []
    # 1 core, 10 GiB: 10 GiB per core is above 6.5, so Autopilot raises the CPU to 10 / 6.5 = 1.54 cores
    check_autopilot_pod(cpu_plan(1, 10), log=notes.append)
    assert len(notes) == 1 and "1.54 cores and 10.0 GiB" in notes[0] and "billed" in notes[0]
    # 2 cores, 1 GiB: below 1 GiB per core, so memory is raised to 2 GiB
    limit = autopilot_placement().pod_limits["none"]
    assert autopilot_requests(cpu_plan(2, 1), limit) == (2.0, 2 * GIB)


def test_the_largest_replica_the_planner_makes_fits_an_autopilot_pod() -> None:
    # 4 cores (the planner's cap) and 48 GiB: CPU raised to 48 / 6.5 = 7.38 cores, under 30; 48 GiB under 110
    check_autopilot_pod(cpu_plan(4, MAX_REPLICA_MEMORY / GIB), log=lambda m: None)


@pytest.mark.parametrize(("cores", "memory_gib"), [(31, 64), (16, 112)])
def test_a_replica_larger_than_any_general_purpose_pod_is_refused_naming_the_limit(
    cores: float, memory_gib: float
) -> None:
    with pytest.raises(MicrofedError) as e:
        check_autopilot_pod(cpu_plan(cores, memory_gib), log=pytest.fail)
    assert "GKE Autopilot accepts at most 30 CPU cores and 110 GiB memory for a pod" in e.value.message
    assert "General-purpose class" in e.value.message
    assert "--batch-size" in e.value.hint and "GPU type" not in e.value.hint


def test_a_gpu_replica_over_its_gpu_types_maximum_is_refused_naming_larger_gpu_types() -> None:
    # one A100 (40 GB): Autopilot's maximum is 11 cores and 74 GiB (GKE Warden's own message, see cluster.json)
    check_autopilot_pod(gpu_plan("nvidia-tesla-a100", 8, 60), log=pytest.fail)  # no CPU:memory rule for GPU pods
    with pytest.raises(MicrofedError) as e:
        check_autopilot_pod(gpu_plan("nvidia-tesla-a100", 12, 40), log=pytest.fail)
    assert "at most 11 CPU cores and 74 GiB memory for a pod with one nvidia-tesla-a100" in e.value.message
    assert "nvidia-l4: 31 cores, 115 GiB" in e.value.hint


def test_the_train_step_refuses_a_too_large_replica_before_any_job_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoJobs:
        def create(self, job: Any) -> bool:
            pytest.fail("a job was created")

    big = ResourcePlan(cpu_request=8, cpu_limit=8, memory_request=120 * GIB, memory_limit=120 * GIB)
    monkeypatch.setattr(step_train, "_plan", lambda *args, **kwargs: big)
    autopilot = standard_cluster(mode="autopilot")
    options = step_train.ClusterOptions(
        image="microfed:test",
        namespace="team-a",
        accelerators=("none",),
        timeout_seconds=60,
        run_id="run-13",
        task="train",
        backend=NoJobs(),  # type: ignore[arg-type]
        cluster_info=autopilot,
    )
    cfg = WorkerConfig(rounds=1, local_epochs=1, shards=tmp_path / "shards", out=tmp_path / "out")
    with pytest.raises(MicrofedError, match="at most 30 CPU cores and 110 GiB memory"):
        step_train.train_step(cfg, 2, cluster=options)


# ---------------------------------------------------------------------------------------------------------------
# collective_timeout_minutes (defect 8)
# ---------------------------------------------------------------------------------------------------------------


def estimated(seconds_per_epoch: float, shard_examples: int = 10_000, **extra: Any) -> ResourcePlan:
    return ResourcePlan(estimate={"seconds_per_epoch": seconds_per_epoch, "shard_examples": shard_examples, **extra})


def test_timeout_is_a_round_of_the_largest_shard_times_the_margin() -> None:
    # 600 s/epoch x 2 epochs x margin 4 = 4800 s = 80 min.
    assert collective_timeout_minutes(estimated(600), local_epochs=2, largest_shard=10_000) == 80


def test_timeout_rescales_to_the_largest_shard() -> None:
    # The plan was made for 10,000 examples; the largest shard holds 20,000: 1200 s/epoch x 2 x 4 = 160 min.
    assert collective_timeout_minutes(estimated(600), local_epochs=2, largest_shard=20_000) == 160


def test_timeout_rounds_up_and_never_falls_under_30_minutes() -> None:
    assert collective_timeout_minutes(estimated(60), local_epochs=1, largest_shard=10_000) == 30  # 4 min
    assert collective_timeout_minutes(estimated(451), local_epochs=1, largest_shard=10_000) == 31  # 30.07 min
    assert collective_timeout_minutes(estimated(600), local_epochs=1, largest_shard=10_000, margin=1.5) == 30


def test_timeout_without_an_estimate_is_the_default() -> None:
    assert collective_timeout_minutes(None, local_epochs=5, largest_shard=60_000) == DEFAULT_COLLECTIVE_TIMEOUT_MINUTES
    assert collective_timeout_minutes(ResourcePlan(), local_epochs=5, largest_shard=60_000) == 30


def test_timeout_of_a_measured_cpu_plan_uses_the_cores_it_requests() -> None:
    # Estimated for 4 cores, requests 2 (measured): the epoch takes twice the estimate, 600 x 2 x 1 x 4 = 80 min.
    plan = ResourcePlan(
        cpu_request=2.0, estimate={"seconds_per_epoch": 600, "estimated_requests": {"cpu_request": 4.0}}
    )
    assert collective_timeout_minutes(plan, local_epochs=1, largest_shard=10_000) == 80


def test_timeout_of_a_real_plan() -> None:
    arch = ModelConfig(name="cnn-fmnist", num_classes=10, in_channels=1, image_size=(28, 28))
    plan = plan_resources(arch, batch_size=64, optimizer="adam", shard_examples=30_000)
    seconds = plan.estimate["seconds_per_epoch"]
    expected = max(30, math.ceil(seconds * 3 * 4 / 60))
    assert collective_timeout_minutes(plan, local_epochs=3, largest_shard=30_000) == expected


@pytest.mark.parametrize(("epochs", "largest", "margin"), [(0, 1, 4.0), (1, 0, 4.0), (1, 1, 0.5), (1, 1, float("nan"))])
def test_timeout_refuses_bad_arguments(epochs: int, largest: int, margin: float) -> None:
    with pytest.raises(MicrofedError):
        collective_timeout_minutes(estimated(60), local_epochs=epochs, largest_shard=largest, margin=margin)


# ---------------------------------------------------------------------------------------------------------------
# The image's torch variant (defect 9)
# ---------------------------------------------------------------------------------------------------------------


def test_the_dockerfile_states_its_variant_from_the_build_argument() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    arg = next(i for i, line in enumerate(lines) if re.fullmatch(r"ARG TORCH_VARIANT=cpu", line))
    env = next(i for i, line in enumerate(lines) if line.startswith("ENV ") and image.TORCH_VARIANT_ENV in line)
    # The ARG is declared in the final stage (an ARG before FROM is not visible after it), before the ENV using it.
    assert last_from < arg < env
    assert re.search(rf"\b{image.TORCH_VARIANT_ENV}=\$\{{TORCH_VARIANT\}}(\s|$)", lines[env])
    # And the same argument picks the wheels the variable describes.
    assert any("download.pytorch.org/whl/${TORCH_VARIANT}" in line for line in lines)


@pytest.mark.parametrize(("cuda", "variant"), [(None, "cpu"), ("12.8", "cu128"), ("12.6", "cu126"), ("13.0", "cu130")])
def test_variant_from_the_installed_torch(cuda: str | None, variant: str) -> None:
    assert image.variant_from_cuda_version(cuda) == variant


def test_the_stated_variant_wins_and_torch_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert image.image_torch_variant({image.TORCH_VARIANT_ENV: "cpu"}) == "cpu"
    assert image.image_torch_variant({image.TORCH_VARIANT_ENV: " CU128 "}) == "cu128"
    monkeypatch.setattr(image.torch.version, "cuda", None)
    assert image.image_torch_variant({}) == "cpu"
    monkeypatch.setattr(image.torch.version, "cuda", "12.8")
    assert image.image_torch_variant({}) == "cu128"
    monkeypatch.setenv(image.TORCH_VARIANT_ENV, "cpu")
    assert image.image_torch_variant() == "cpu"


def test_a_cpu_image_drops_gpus_with_a_note() -> None:
    notes: list[str] = []
    requested = ("nvidia-tesla-t4", "none", "nvidia-l4")
    assert image.usable_accelerators(requested, "cpu", log=notes.append) == ("none",)
    assert len(notes) == 1
    assert "nvidia-tesla-t4, nvidia-l4" in notes[0]
    assert "TORCH_VARIANT=cu128" in notes[0]


def test_a_cpu_image_with_only_gpus_requested_fails_naming_the_parameter_and_the_build() -> None:
    with pytest.raises(MicrofedError) as e:
        image.usable_accelerators(("nvidia-tesla-t4",), "cpu", log=pytest.fail)
    assert "`accelerators` pipeline parameter" in e.value.hint
    assert "make image IMAGE=... TORCH_VARIANT=cu128" in e.value.hint


def test_a_cuda_image_keeps_every_accelerator_and_cpu_requests_pass_silently() -> None:
    requested = ("none", "nvidia-tesla-t4")
    assert image.usable_accelerators(requested, "cu128", log=pytest.fail) == requested
    assert image.usable_accelerators(("none",), "cpu", log=pytest.fail) == ("none",)
    assert image.usable_accelerators("none", "cpu", log=pytest.fail) == ("none",)
