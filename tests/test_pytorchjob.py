"""The PyTorchJob builder against the Training Operator's CRD schema, job names, and the launcher's RBAC.

Validation is strict the way the API server is: a structural schema prunes unknown fields silently, so a
misplaced field (`ttlSecondsAfterFinished` under `spec` instead of `spec.runPolicy`) would be accepted and
dropped. Here every object schema that lists `properties` rejects anything else, turning that into an error.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes.utils.quantity import parse_quantity

from microfed.training.cluster import autopilot_placement, cluster_contract
from microfed.training.errors import MicrofedError
from microfed.training.pytorchjob import (
    MAX_JOB_NAME,
    JobConfig,
    Placement,
    build_pytorchjob,
    job_name,
    pytorchjob_to_dict,
)
from microfed.training.resources import ResourcePlan
from microfed.training.worker import WorkerConfig, config_to_argv

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
CRD = Path(__file__).with_name("schemas") / "kubeflow.org_pytorchjobs.yaml"  # source and licence: schemas/README.md
RBAC = REPO / "infra" / "modules" / "microfed" / "rbac.yaml"
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")

CPU_PLAN = ResourcePlan(cpu_request=1.5, cpu_limit=2.0, memory_request=1536 * 1024**2, memory_limit=3 * 1024**3)
GPU_PLAN = ResourcePlan(
    accelerator="nvidia-tesla-t4",
    gpus=1,
    cpu_request=3.25,
    cpu_limit=4.0,
    memory_request=6 * 1024**3 + 12345,  # not a whole number of Mi: must still round-trip exactly
    memory_limit=8 * 1024**3,
)
PLANS = {"cpu": CPU_PLAN, "gpu": GPU_PLAN}


# --- strict CRD validation ---------------------------------------------------------------------------------


def _close_objects(schema: dict[str, Any]) -> None:
    """Forbid unlisted fields in every object schema that lists its properties and keeps no unknown fields."""
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and schema.get("x-kubernetes-preserve-unknown-fields") is not True
    ):
        schema["additionalProperties"] = False
    children: list[Any] = list(schema.get("properties", {}).values())
    for key in ("additionalProperties", "items", "not"):
        if isinstance(schema.get(key), dict):
            children.append(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        children.extend(schema.get(key, []))
    for child in children:
        _close_objects(child)


@cache
def strict_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    schema = copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    _close_objects(schema)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in strict_validator().iter_errors(manifest)]


def make_config(workers: int = 3, plan: ResourcePlan = CPU_PLAN, **overrides: Any) -> JobConfig:
    worker = WorkerConfig(shards=Path("/data/shards"), out=Path("/data/out"), rounds=3, local_epochs=2)
    fields: dict[str, Any] = {
        "name": job_name("3f2a1b2c-1234-4abc-8def-0123456789ab", "train"),
        "namespace": "kubeflow-user",
        "image": "europe-docker.pkg.dev/proj/microfed/microfed:0.1.0",
        "workers": workers,
        "worker_args": config_to_argv(worker),
        "plan": plan,
        "service_account": "microfed-worker",
        "labels": {"pipelines.kubeflow.org/run-id": "3f2a1b2c-1234-4abc-8def-0123456789ab"},
        "env": {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023"},
        **overrides,
    }
    return JobConfig(**fields)


def manifest(workers: int = 3, plan: ResourcePlan = CPU_PLAN, **overrides: Any) -> dict[str, Any]:
    return pytorchjob_to_dict(build_pytorchjob(make_config(workers, plan, **overrides)))


def test_strict_validator_rejects_misplaced_fields_and_wrong_types() -> None:
    good = manifest()
    assert schema_errors(good) == []

    misplaced = copy.deepcopy(good)
    misplaced["spec"]["ttlSecondsAfterFinished"] = misplaced["spec"]["runPolicy"].pop("ttlSecondsAfterFinished")
    assert any("ttlSecondsAfterFinished" in e for e in schema_errors(misplaced))
    # Plain validation would have let it through: exactly the silent pruning we guard against.
    crd = yaml.safe_load(CRD.read_text())
    assert jsonschema.Draft7Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]).is_valid(misplaced)

    deep = copy.deepcopy(good)
    deep["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["cmd"] = ["python"]
    assert any("cmd" in e for e in schema_errors(deep))

    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "1"
    assert any("replicas" in e for e in schema_errors(wrong_type))


# --- the manifest ------------------------------------------------------------------------------------------


def _containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["template"]["spec"]["containers"][0] for spec in job["spec"]["pytorchReplicaSpecs"].values()]


def _pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["template"] for spec in job["spec"]["pytorchReplicaSpecs"].values()]


@pytest.mark.parametrize("workers", [1, 3, 8])
@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_manifest_is_valid_and_has_the_contract_fields(kind: str, workers: int) -> None:
    plan = PLANS[kind]
    cfg = make_config(workers, plan)
    job = pytorchjob_to_dict(build_pytorchjob(cfg))

    assert schema_errors(job) == []
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["metadata"]["name"] == cfg.name and job["metadata"]["namespace"] == cfg.namespace
    assert job["metadata"]["labels"]["app.kubernetes.io/name"] == "microfed"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    if workers == 1:
        assert set(replicas) == {"Master"}
    else:
        assert set(replicas) == {"Master", "Worker"} and replicas["Worker"]["replicas"] == workers - 1
    assert {r["restartPolicy"] for r in replicas.values()} == {"ExitCode"}

    run_policy = job["spec"]["runPolicy"]
    assert run_policy == {
        "cleanPodPolicy": "None",
        "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
        "activeDeadlineSeconds": cfg.active_deadline_seconds,
        "backoffLimit": cfg.backoff_limit,
    }
    assert set(job["spec"]) == {"pytorchReplicaSpecs", "runPolicy"}

    for pod in _pods(job):
        assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert pod["metadata"]["labels"] == {**cfg.labels, "app.kubernetes.io/name": "microfed"}
        assert pod["spec"]["serviceAccountName"] == "microfed-worker"
        assert len(pod["spec"]["containers"]) == 1
    for container in _containers(job):
        assert container["name"] == "pytorch"
        assert container["image"] == cfg.image
        assert container["command"] == ["python", "-m", "microfed.training.worker", *cfg.worker_args]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["PYTHONUNBUFFERED"] == "1"
        assert env["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:9023"
        _assert_resources_match_plan(container["resources"], plan)
    _assert_placement(job, plan, kind)


def _assert_resources_match_plan(resources: dict[str, Any], plan: ResourcePlan) -> None:
    requests, limits = resources["requests"], resources["limits"]
    assert parse_quantity(requests["cpu"]) == parse_quantity(str(plan.cpu_request))
    assert parse_quantity(limits["cpu"]) == parse_quantity(str(plan.cpu_limit))
    assert parse_quantity(requests["memory"]) == plan.memory_request
    assert parse_quantity(limits["memory"]) == plan.memory_limit


def _assert_placement(job: dict[str, Any], plan: ResourcePlan, kind: str) -> None:
    contract = cluster_contract()
    training = {"key": "microfed.dev/training", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    gpu = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}
    assert training["key"] == contract.training_taint.key and gpu["key"] == contract.gpu_taint.key
    for pod, container in zip(_pods(job), _containers(job), strict=True):
        env = {e["name"]: e["value"] for e in container["env"]}
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        if kind == "gpu":
            assert parse_quantity(limits["nvidia.com/gpu"]) == 1 and "nvidia.com/gpu" not in requests
            assert pod["spec"]["tolerations"] == [training, gpu]
            assert pod["spec"]["nodeSelector"] == {
                "microfed.dev/pool": "training-t4",
                "cloud.google.com/gke-accelerator": "nvidia-tesla-t4",
            }
            assert env["MICROFED_BACKEND"] == "nccl"
        else:
            assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests
            assert pod["spec"]["tolerations"] == [training]
            assert pod["spec"]["nodeSelector"] == {"microfed.dev/pool": "training-cpu"}
            assert env["MICROFED_BACKEND"] == "gloo"


def test_build_is_pure_and_replicas_do_not_share_objects() -> None:
    cfg = make_config(4, GPU_PLAN)
    first = build_pytorchjob(cfg)
    assert pytorchjob_to_dict(first) == pytorchjob_to_dict(build_pytorchjob(cfg))
    specs = first.spec.pytorch_replica_specs
    assert specs["Master"].template is not specs["Worker"].template
    specs["Master"].template.spec.containers[0].command.append("--mutated")
    assert "--mutated" not in cfg.worker_args
    assert "--mutated" not in specs["Worker"].template.spec.containers[0].command


def test_optional_fields_are_left_out_and_worker_args_pass_through_verbatim() -> None:
    args = ["--shards", "gs://bucket/run/shards", "--out", "gs://bucket/run/micro", "--device", "cuda"]
    job = manifest(2, CPU_PLAN, service_account=None, labels={}, env={}, worker_args=args, clean_pod_policy="All")
    assert schema_errors(job) == []
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "All"
    for pod, container in zip(_pods(job), _containers(job), strict=True):
        assert "serviceAccountName" not in pod["spec"]
        assert pod["metadata"]["labels"] == {"app.kubernetes.io/name": "microfed"}
        assert container["command"][3:] == args
        assert [e["name"] for e in container["env"]] == ["MICROFED_BACKEND", "PYTHONUNBUFFERED"]


# --- placement on GKE Autopilot (issue 13; sources in training/cluster.json, key autopilot) -----------------

AUTOPILOT_SPOT = Placement(mode="autopilot", spot=True)
AUTOPILOT_ON_DEMAND = Placement(mode="autopilot", spot=False)
L4_PLAN = ResourcePlan(
    accelerator="nvidia-l4",
    gpus=1,
    cpu_request=4.0,
    cpu_limit=4.0,
    memory_request=16 * 1024**3,
    memory_limit=16 * 1024**3,
)


@pytest.mark.parametrize(
    ("plan", "placement", "selector"),
    [
        (CPU_PLAN, AUTOPILOT_SPOT, {"cloud.google.com/gke-spot": "true"}),
        (CPU_PLAN, AUTOPILOT_ON_DEMAND, None),
        (
            GPU_PLAN,
            AUTOPILOT_SPOT,
            {"cloud.google.com/gke-spot": "true", "cloud.google.com/gke-accelerator": "nvidia-tesla-t4"},
        ),
        (GPU_PLAN, AUTOPILOT_ON_DEMAND, {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}),
        (
            L4_PLAN,
            AUTOPILOT_SPOT,
            {"cloud.google.com/gke-spot": "true", "cloud.google.com/gke-accelerator": "nvidia-l4"},
        ),
    ],
)
def test_autopilot_pods_select_spot_and_their_gpu_and_carry_no_pool_label_or_taint(
    plan: ResourcePlan, placement: Placement, selector: dict[str, str] | None
) -> None:
    job = manifest(3, plan, placement=placement)
    assert schema_errors(job) == []
    for pod, container in zip(_pods(job), _containers(job), strict=True):
        assert pod["spec"].get("nodeSelector") == selector
        # GKE adds the Spot toleration itself; Autopilot refuses our custom label and taint keys
        assert "tolerations" not in pod["spec"]
        limits = container["resources"]["limits"]
        if plan.gpus:
            assert parse_quantity(limits["nvidia.com/gpu"]) == 1
            assert {e["name"]: e["value"] for e in container["env"]}["MICROFED_BACKEND"] == "nccl"
        else:
            assert "nvidia.com/gpu" not in limits
        _assert_resources_match_plan(container["resources"], plan)
    assert "microfed.dev" not in repr(job["spec"])  # no pool label or training taint anywhere


def test_standard_is_the_default_placement_and_ignores_spot() -> None:
    default = manifest(3, GPU_PLAN)
    assert manifest(3, GPU_PLAN, placement=Placement(mode="standard", spot=True)) == default
    _assert_placement(default, GPU_PLAN, "gpu")


@pytest.mark.parametrize(
    ("placement", "asked", "written"),
    [
        (AUTOPILOT_SPOT, 120, 25),  # a preempted Spot Pod gets at most 25 s, whatever it asks
        (AUTOPILOT_SPOT, 10, 10),
        (AUTOPILOT_ON_DEMAND, 120, 120),
        (Placement(), 120, 120),
        (AUTOPILOT_SPOT, None, None),  # Kubernetes' default (30 s) stays unwritten
    ],
)
def test_grace_period_stays_within_what_an_autopilot_spot_pod_gets(
    placement: Placement, asked: int | None, written: int | None
) -> None:
    job = manifest(2, CPU_PLAN, placement=placement, termination_grace_period_seconds=asked)
    assert schema_errors(job) == []
    for pod in _pods(job):
        assert pod["spec"].get("terminationGracePeriodSeconds") == written


def test_autopilot_data_covers_every_accelerator_the_builder_knows() -> None:
    auto = autopilot_placement()
    assert set(auto.pod_limits) == {"none", *cluster_contract().gpu_pools}
    assert auto.spot_selector == ("cloud.google.com/gke-spot", "true")
    assert auto.gpu_selector_key == cluster_contract().gpu_label_key == "cloud.google.com/gke-accelerator"
    assert auto.spot_max_grace_seconds == 25
    for accelerator, limit in auto.pod_limits.items():
        assert limit.compute_class == ("General-purpose" if accelerator == "none" else "Accelerator")
        assert limit.max_cpu > 0 and limit.max_memory_bytes > 0 and limit.source


# --- job names ---------------------------------------------------------------------------------------------

WEIRD_INPUTS = [
    ("3f2a1b2c-1234-4abc-8def-0123456789ab", "train"),
    ("Run_With_UPPER_and_under_scores", "Train_Step"),
    ("x" * 200, "train"),
    ("R" * 200, "t" * 200),
    ("0123-starts-with-digit", "7task"),
    ("--__--", "--"),
    ("run.with.dots/and/slashes", "tâche-ünïcode"),
]


@pytest.mark.parametrize(("run_id", "task"), WEIRD_INPUTS)
def test_job_name_is_a_short_dns1035_label(run_id: str, task: str) -> None:
    name = job_name(run_id, task)
    assert DNS1035.fullmatch(name), name
    assert len(name) <= MAX_JOB_NAME
    # The operator's longest derived names must stay within the 63-character limit.
    assert len(f"{name}-worker-{99999}") <= 63
    assert job_name(run_id, task) == name


def test_job_name_depends_on_run_and_task_only_and_separates_lookalikes() -> None:
    run = "3f2a1b2c-1234-4abc-8def-0123456789ab"
    # a KFP retry runs in a new pod with a new HOSTNAME: the name must not depend on it
    assert job_name(run, "train") == f"train-{run}"
    assert job_name(run, "train") != job_name(run, "train-2")
    long_names = {job_name("r" * 200 + str(i), "train") for i in range(50)}
    assert len(long_names) == 50
    assert all(n.startswith("train-rrrr") for n in long_names)
    # Inputs that sanitise to the same text still get different names (no adopting someone else's job).
    assert job_name("Run_1", "train") != job_name("run-1", "train")
    assert job_name("a" * 100 + "b", "train") != job_name("a" * 100 + "c", "train")


@pytest.mark.parametrize(("run_id", "task"), [("", "train"), ("run", "")])
def test_job_name_rejects_empty_inputs(run_id: str, task: str) -> None:
    with pytest.raises(MicrofedError, match="job_name"):
        job_name(run_id, task)


# --- configuration errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": "Train_Job"}, "name"),
        ({"name": "a" * (MAX_JOB_NAME + 1)}, "name"),
        ({"namespace": "Kube Flow"}, "namespace"),
        ({"image": ""}, "image"),
        ({"workers": 0}, "workers"),
        ({"worker_args": ["--rounds", 3]}, "worker_args"),
        ({"service_account": "Bad_Account"}, "service_account"),
        ({"active_deadline_seconds": 0}, "active_deadline_seconds"),
        ({"backoff_limit": -1}, "backoff_limit"),
        ({"ttl_seconds_after_finished": -5}, "ttl_seconds_after_finished"),
        ({"clean_pod_policy": "Failed"}, "clean_pod_policy"),
        ({"labels": {"bad key!": "x"}}, "labels"),
        ({"labels": {"ok": "v" * 64}}, "labels"),
        ({"env": {"RANK": "0"}}, "env"),
        ({"env": {"MICROFED_BACKEND": "nccl"}}, "env"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"plan": ResourcePlan(accelerator="nvidia-tesla-t4", gpus=0)}, "plan"),
        ({"plan": ResourcePlan(accelerator="none", gpus=1)}, "plan"),
        ({"plan": ResourcePlan(accelerator="nvidia-h100", gpus=1)}, "plan.accelerator"),
        ({"plan": ResourcePlan(cpu_request=4.0, cpu_limit=2.0)}, "plan.cpu_request"),
        ({"plan": ResourcePlan(memory_request=0)}, "plan.memory_request"),
        ({"placement": Placement(mode="serverless")}, "placement.mode"),
        ({"termination_grace_period_seconds": -1}, "termination_grace_period_seconds"),
    ],
)
def test_config_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(MicrofedError, match=rf"JobConfig\.{re.escape(field)}\b"):
        make_config(**overrides)


# --- RBAC --------------------------------------------------------------------------------------------------


def test_rbac_lets_pipeline_runner_manage_pytorchjobs_and_read_pods() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(RBAC.read_text()) if d}
    role, binding = docs["Role"], docs["RoleBinding"]
    assert role["apiVersion"] == binding["apiVersion"] == "rbac.authorization.k8s.io/v1"
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert {"create", "get", "list", "watch", "delete", "patch"} <= granted[("kubeflow.org", "pytorchjobs")]
    assert "get" in granted[("kubeflow.org", "pytorchjobs/status")]
    assert {"get", "list", "watch"} <= granted[("", "pods")]
    assert "get" in granted[("", "pods/log")]
    assert {"get", "list"} <= granted[("", "events")]
    assert not any("*" in verbs for verbs in granted.values()), "no wildcard verbs"

    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"]
