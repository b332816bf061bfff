"""infra/ with `mode = "autopilot"` (GKE Autopilot) beside the default `mode = "standard"`.

Three evaluators, each where it is the real thing or the closest one available without the Google provider:
- infra/cost/model.py's (through tests/test_infra.py's `effective` / `instances`) for the cluster and the node pools:
  the attribute values, the dynamic blocks and the count / for_each of each resource for one value of `mode`;
- Terraform itself (`terraform console`, which needs no provider for a directory of variables and locals) for the
  locals the cost model cannot evaluate (for-expressions, yamlencode, jsonencode): the resource-request patches and
  the microfed-cluster ConfigMap. The locals are copied out of the module's .tf files as python-hcl2 reads them;
- `terraform plan` on a stand-in configuration (every resource replaced by the built-in terraform_data, which needs no
  provider either) for the moved blocks of infra/moved.tf and modules/microfed/moved.tf, with Terraform's own
  chaining and ambiguity rules.

The provider's rules these tests hold the cluster to are cited from its source: hashicorp/terraform-provider-google
v7.45.0 (the closest tag to the pinned 7.46.1 in the source mirror used), google/services/container/
resource_container_cluster.go, ResourceContainerCluster (the schema's ConflictsWith) and
containerClusterAutopilotCustomizeDiff; hashicorp/terraform-plugin-sdk v2.40.1, helper/schema/schema.go,
validateConflictingAttributes (any non-null value conflicts, false included).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml
from hcl2.utils import SerializationOptions

from tests.test_infra import (
    MODULE,
    PRE_SPLIT_ADDRESSES,
    Config,
    _parse,
    block,
    blocks,
    cluster,
    effective,
    infra,
    instances,
    root,
)

MANIFESTS = MODULE / "manifests"
REQUESTS: dict[str, Any] = json.loads((MODULE / "requests.json").read_text())["containers"]
# requests.json's kustomizations and the overlay (data.kustomization_overlay.*) that builds each.
OVERLAYS = {"kfp": "kfp", "training-operator": "training_operator", "trainer-v2": "trainer_v2"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# Arguments of google_container_cluster that declare ConflictsWith = ["enable_autopilot"] in the provider (the file
# and function above); a nested one is written block.argument.
CONFLICTS_WITH_AUTOPILOT = (
    "addons_config.network_policy_config",
    "addons_config.dns_cache_config",
    "addons_config.stateful_ha_config",
    "cluster_autoscaling.enabled",
    "cluster_autoscaling.resource_limits",
    "binary_authorization.enabled",
    "enable_shielded_nodes",
    "network_policy",
    "node_pool",
    "remove_default_node_pool",
    "default_max_pods_per_node",
    "enable_intranode_visibility",
)


def has(body: dict[str, Any], path: str) -> bool:
    """Whether an evaluated block sets `path` (argument or nested block, a.b for nested)."""
    head, _, rest = path.partition(".")
    if head not in body:
        return False
    return not rest or any(has(inner, rest) for inner in blocks(body, head))


# ---------------------------------------------------------------------------------------------------------------
# Terraform, run here
# ---------------------------------------------------------------------------------------------------------------


def terraform_binary() -> str:
    found = shutil.which("terraform")
    if found is None:
        pytest.fail("terraform is not installed: install Terraform >= 1.9 (https://developer.hashicorp.com/terraform)")
    return found


def run_terraform(args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CLI_CONFIG_FILE": os.devnull, "TF_IN_AUTOMATION": "1", "NO_COLOR": "1"}
    env.pop("TF_CLI_ARGS", None)
    return subprocess.run(
        [terraform_binary(), *args], cwd=cwd, input=stdin, env=env, capture_output=True, text=True, timeout=300
    )


@cache
def module_locals() -> dict[str, Any]:
    """Every local of the module as python-hcl2 reads it with quotes kept (so "text" and expressions differ)."""
    options = SerializationOptions(
        with_comments=False, explicit_blocks=False, strip_string_quotes=False, preserve_heredocs=False
    )
    found: dict[str, Any] = {}
    for path in sorted(MODULE.glob("*.tf")):
        with path.open() as f:
            for declared in hcl2.load(f, serialization_options=options).get("locals", []):
                found.update(declared)
    return found


def hcl(value: Any) -> str:
    """HCL source for a value as python-hcl2 returns it: `${expr}` is an expression, "..." a string template."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return value[2:-1] if value.startswith("${") and value.endswith("}") else value
    if isinstance(value, dict):
        return "{\n" + "\n".join(f"{k} = {hcl(v)}" for k, v in value.items()) + "\n}"
    return "[" + ", ".join(hcl(v) for v in value) + "]"


def console(expression: str, tmp_path: Path, **variables: Any) -> Any:
    """What Terraform computes for `expression` (HCL source) in the module, with these variables.

    The directory holds the module's variables.tf unchanged and the locals the expression needs (transitively),
    copied from the module with `path.module` made absolute; `local.contract` always, since variable validations
    read it. The expression is wrapped in jsonencode() and the answer decoded."""
    work = tmp_path / f"console-{len(list(tmp_path.glob('console-*')))}"
    work.mkdir()
    shutil.copyfile(MODULE / "variables.tf", work / "variables.tf")
    source = module_locals()
    needed, pending = set(), ["contract", *re.findall(r"\blocal\.(\w+)", expression)]
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending += re.findall(r"\blocal\.(\w+)", hcl(source[name]))
    text = "locals {\n" + "\n".join(f"{n} = {hcl(source[n])}" for n in sorted(needed)) + "\n}\n"
    (work / "locals.tf").write_text(text.replace("${path.module}", str(MODULE)))
    required = {
        "project_id": "my-project-123",
        "master_authorized_networks": [{"cidr_block": "203.0.113.7/32", "display_name": "x"}],
    }
    (work / "terraform.tfvars.json").write_text(json.dumps({**required, **variables}))
    proc = run_terraform(["console", "-no-color"], work, f"jsonencode({expression})\n")
    # console reports an invalid variable value as an error on stderr but still prints a value and exits 0
    if proc.returncode != 0 or "Error: " in proc.stderr:
        raise TerraformError(proc.stdout + proc.stderr)
    return json.loads(json.loads(proc.stdout.strip().splitlines()[-1]))


class TerraformError(Exception):
    """terraform exited with an error; the message is its output."""


# ---------------------------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------------------------


def test_mode_is_a_validated_variable_passed_to_the_module() -> None:
    for cfg in (infra(), root()):
        mode = cfg.variables["mode"]
        assert mode["default"] == "standard" and mode["type"] == "string"
        assert 'contains(["standard", "autopilot"], var.mode)' in mode["validation"][0]["condition"]
    assert root().modules["microfed"]["mode"] == "${var.mode}"
    assert infra().locals["autopilot"] == '${var.mode == "autopilot"}'


def test_autopilot_cluster_leaves_out_what_autopilot_refuses() -> None:
    c = effective(cluster(), "autopilot")
    assert c["enable_autopilot"] is True
    assert "node_config" not in c, "GKE creates Autopilot nodes itself: no default pool to configure"
    assert "initial_node_count" not in c
    for path in CONFLICTS_WITH_AUTOPILOT:
        assert not has(c, path), f"{path} conflicts with enable_autopilot in the provider"
    # Autopilot runs Dataplane V2, whose NetworkPolicy enforcement is always on; said explicitly.
    assert c["datapath_provider"] == "ADVANCED_DATAPATH"
    # The profile is GKE's on Autopilot (the provider suppresses its diff): left unset rather than forced.
    assert "autoscaling_profile" not in block(c, "cluster_autoscaling")


def test_autopilot_nodes_run_as_the_same_least_privilege_service_account() -> None:
    defaults = block(block(effective(cluster(), "autopilot"), "cluster_autoscaling"), "auto_provisioning_defaults")
    assert defaults == {
        "service_account": "${google_service_account.nodes.email}",
        "oauth_scopes": ["https://www.googleapis.com/auth/cloud-platform"],
    }
    # The account's roles do not depend on the mode (iam.tf): GKE's node role and pulls from our registry only.
    assert (
        infra().resources["google_project_iam_member", "nodes"]["role"] == "roles/container.defaultNodeServiceAccount"
    )
    reader = infra().resources["google_artifact_registry_repository_iam_member", "nodes_reader"]
    assert reader["member"] == "serviceAccount:${google_service_account.nodes.email}"
    for body in (*infra().of_type("google_project_iam_member").values(), reader):
        assert "count" not in body and "for_each" not in body


def test_autopilot_is_as_locked_down_as_standard() -> None:
    standard, autopilot = effective(cluster(), "standard"), effective(cluster(), "autopilot")
    same = (
        "private_cluster_config",
        "control_plane_endpoints_config",
        "master_authorized_networks_config",
        "workload_identity_config",
        "master_auth",
        "enable_legacy_abac",
        "logging_config",
        "monitoring_config",
        "release_channel",
        "deletion_protection",
        "ip_allocation_policy",
        "networking_mode",
        "network",
        "subnetwork",
        "resource_labels",
    )
    for key in same:
        assert autopilot[key] == standard[key], key
    assert block(autopilot, "private_cluster_config")["enable_private_nodes"] is True


@pytest.mark.integration
def test_autopilot_cluster_is_regional(tmp_path: Path) -> None:
    # GKE creates Autopilot clusters in a region only; zone and regional_cluster do not apply.
    assert effective(cluster(), "autopilot")["location"] == infra().variables["region"]["default"]
    assert effective(cluster(), "standard")["location"] == infra().variables["zone"]["default"]
    # The same with Terraform's own operator precedence (|| before ? :).
    assert cluster()["location"] == "${local.cluster_location}"
    assert console("local.cluster_location", tmp_path, mode="autopilot") == "europe-west4"
    assert console("local.cluster_location", tmp_path) == "europe-west4-a"
    assert console("local.cluster_location", tmp_path, regional_cluster=True) == "europe-west4"


def test_standard_cluster_is_unchanged() -> None:
    # The Standard cluster as it was before `mode` existed, setting by setting (references to other resources are
    # compared as text).
    c = effective(cluster(), "standard")
    node_config = block(c, "node_config")
    expected = {
        "name": "microfed",
        "location": "europe-west4-a",
        "networking_mode": "VPC_NATIVE",
        "remove_default_node_pool": True,
        "initial_node_count": 1,
        "enable_shielded_nodes": True,
        "enable_legacy_abac": False,
        "enable_intranode_visibility": True,
        "deletion_protection": True,
        "network_policy": [{"enabled": True, "provider": "CALICO"}],
        "addons_config": [{"network_policy_config": [{"disabled": False}]}],
        "cluster_autoscaling": [{"enabled": False, "autoscaling_profile": "OPTIMIZE_UTILIZATION"}],
        "release_channel": [{"channel": "REGULAR"}],
        "logging_config": [{"enable_components": ["SYSTEM_COMPONENTS", "WORKLOADS"]}],
        "monitoring_config": [{"enable_components": ["SYSTEM_COMPONENTS"]}],
    }
    for key, value in expected.items():
        assert c[key] == value, key
    # Nothing added on Standard: the same arguments and blocks as before (the Autopilot-only ones evaluate to null
    # or to no dynamic block).
    assert set(c) == {
        *expected,
        *("project", "network", "subnetwork", "ip_allocation_policy", "node_config", "workload_identity_config"),
        *("master_auth", "private_cluster_config", "control_plane_endpoints_config"),
        *("master_authorized_networks_config", "resource_labels", "timeouts", "lifecycle", "depends_on"),
    }
    assert node_config["machine_type"] == "e2-medium"
    assert node_config["service_account"] == "${google_service_account.nodes.email}"
    assert block(node_config, "shielded_instance_config") == {
        "enable_secure_boot": True,
        "enable_integrity_monitoring": True,
    }


# ---------------------------------------------------------------------------------------------------------------
# Node pools
# ---------------------------------------------------------------------------------------------------------------


def test_autopilot_creates_no_node_pool() -> None:
    pools = infra().of_type("google_container_node_pool")
    assert set(pools) == {"system", "training_cpu", "training_gpu"}
    for name, body in pools.items():
        assert instances(body, "autopilot") == [], name


def test_standard_creates_every_node_pool() -> None:
    pools = infra().of_type("google_container_node_pool")
    assert instances(pools["system"]) == [0]
    assert instances(pools["training_cpu"]) == [0]
    assert instances(pools["training_gpu"]) == ["nvidia-tesla-t4"]


def test_the_namespace_waits_for_the_cluster_in_both_modes() -> None:
    # Standard: the system pool (the Deployments' rollouts need its node); Autopilot: the cluster (no pool).
    namespace = infra().resources["kubectl_manifest", "namespace"]
    assert namespace["depends_on"] == ["${google_container_cluster.this}", "${google_container_node_pool.system}"]


def test_training_node_pools_output_has_no_pool_on_autopilot() -> None:
    value = infra().outputs["training_node_pools"]["value"]
    assert "google_container_node_pool.training_cpu :" in value  # a for over the instances: empty with count 0
    assert "Empty with mode = autopilot" in infra().outputs["training_node_pools"]["description"]


def test_mode_is_an_output_of_the_module_and_the_root() -> None:
    assert infra().outputs["mode"]["value"] == "${var.mode}"
    assert root().outputs["mode"]["value"] == "${module.microfed.mode}"


@pytest.mark.integration
def test_variables_that_autopilot_ignores_say_so(tmp_path: Path) -> None:
    variables = infra().variables
    for name in (
        "system_machine_type",
        "system_min_nodes",
        "system_max_nodes",
        "gpu_driver_version",
        "training_disk_size_gb",
        "gpu_node_locations",
    ):
        assert "Standard only: unused with mode = autopilot" in variables[name]["description"], name
    for name in ("zone", "regional_cluster"):
        assert "autopilot" in variables[name]["description"], name
    # gpu_node_locations is refused rather than ignored: Autopilot places GPU nodes itself.
    with pytest.raises(TerraformError, match=r"leave\s+gpu_node_locations\s+empty"):
        console("var.gpu_node_locations", tmp_path, mode="autopilot", gpu_node_locations=["europe-west4-b"])
    assert console("var.gpu_node_locations", tmp_path, gpu_node_locations=["europe-west4-b"]) == ["europe-west4-b"]
    assert console("var.mode", tmp_path, mode="autopilot") == "autopilot"


# ---------------------------------------------------------------------------------------------------------------
# Resource requests on the vendored containers (both modes)
# ---------------------------------------------------------------------------------------------------------------


@cache
def rendered(kustomization: str) -> tuple[dict[str, Any], ...]:
    text = (MANIFESTS / kustomization / "rendered.yaml").read_text()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where present: the operator's render is 3.7 MB
    return tuple(doc for doc in yaml.load_all(text, Loader=loader) if doc)


def pod_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def strategic_merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A strategic merge patch as the API server and kustomize apply it to the fields used here: maps merge key by
    key, and a pod spec's `containers` / `initContainers` merge by container name (patchStrategy "merge",
    patchMergeKey "name" on PodSpec in k8s.io/api core/v1; kubernetes/website, "Update API Objects in Place Using
    kubectl patch"). An element whose name the target lacks is appended, as the real merge does: the test below
    fails on it, since a container made of a name and requests is not a container. Other lists are replaced."""
    merged = copy.deepcopy(target)
    for key, value in patch.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            existing = {c["name"]: c for c in merged.setdefault(key, [])}
            for element in value:
                if element["name"] in existing:
                    existing[element["name"]].update(strategic_merge(existing[element["name"]], element))
                else:
                    merged[key].append(copy.deepcopy(element))
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = strategic_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def overlay_patches(overlay: str, tmp_path: Path) -> list[dict[str, Any]]:
    """The request patches Terraform gives data.kustomization_overlay.<overlay>: its dynamic "patches" block's
    for_each, evaluated by Terraform, and the content's target and patch taken from each element."""
    (dynamic,) = [spec for d in blocks(infra().data["kustomization_overlay", overlay], "dynamic") for spec in [d]]
    spec = dynamic["patches"]
    content = block(spec, "content")
    assert block(content, "target") == {"kind": "${patches.value.kind}", "name": "${patches.value.name}"}
    assert content["patch"] == "${patches.value.patch}"
    elements = console(spec["for_each"][2:-1], tmp_path)
    return [{"kind": e["kind"], "name": e["name"], "patch": yaml.safe_load(e["patch"])} for e in elements.values()]


@pytest.fixture(scope="module")
def patched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each kustomization's rendered objects after the request patches of its overlay."""
    tmp_path = tmp_path_factory.mktemp("requests")
    out = {}
    for kustomization, overlay in OVERLAYS.items():
        objects = [copy.deepcopy(o) for o in rendered(kustomization)]
        for p in overlay_patches(overlay, tmp_path):
            (index,) = [
                i for i, o in enumerate(objects) if o["kind"] == p["kind"] and o["metadata"]["name"] == p["name"]
            ]
            objects[index] = strategic_merge(objects[index], p["patch"])
        out[kustomization] = objects
    return out


@pytest.mark.integration
def test_every_vendored_container_has_cpu_and_memory_requests_after_the_patches(
    patched: dict[str, list[dict[str, Any]]],
) -> None:
    checked = 0
    for kustomization, objects in patched.items():
        for obj in objects:
            if obj["kind"] not in WORKLOAD_KINDS:
                continue
            for container in pod_containers(obj):
                requests = container.get("resources", {}).get("requests", {})
                where = f"{kustomization}/{obj['kind']}/{obj['metadata']['name']}/{container['name']}"
                assert {"cpu", "memory"} <= set(requests), f"{where} has no CPU and memory requests"
                assert "image" in container, f"{where}: a patch added a container that the workload does not have"
                checked += 1
    assert checked >= len(REQUESTS)


def test_every_key_of_requests_json_names_a_container_without_requests() -> None:
    assert REQUESTS, "requests.json lists no container"
    for key, request in REQUESTS.items():
        kustomization, kind, name, container = key.split("/")  # four parts, or this raises
        assert kustomization in OVERLAYS, key
        assert kind in WORKLOAD_KINDS, key
        assert {"cpu", "memory"} <= set(request), key
        (workload,) = [o for o in rendered(kustomization) if o["kind"] == kind and o["metadata"]["name"] == name]
        (found,) = [c for c in pod_containers(workload) if c["name"] == container]
        assert "requests" not in found.get("resources", {}), f"{key} already has requests in the vendored manifest"


@pytest.mark.integration
def test_patches_set_exactly_the_requests_of_requests_json(tmp_path: Path) -> None:
    seen = {}
    for kustomization, overlay in OVERLAYS.items():
        for p in overlay_patches(overlay, tmp_path):
            patch = p["patch"]
            assert patch["apiVersion"] == "apps/v1" and patch["kind"] == p["kind"]
            assert patch["metadata"] == {"name": p["name"]}
            assert set(patch["spec"]) == {"template"} and set(patch["spec"]["template"]) == {"spec"}
            assert set(patch["spec"]["template"]["spec"]) == {"containers"}
            for container in patch["spec"]["template"]["spec"]["containers"]:
                assert set(container) == {"name", "resources"}
                assert set(container["resources"]) == {"requests"}, "requests only: no limits (bursting)"
                key = f"{kustomization}/{p['kind']}/{p['name']}/{container['name']}"
                assert key not in seen, f"{key} patched twice"
                seen[key] = container["resources"]["requests"]
    assert seen == {key: {"cpu": r["cpu"], "memory": r["memory"]} for key, r in REQUESTS.items()}


@pytest.mark.integration
def test_one_patch_per_workload(tmp_path: Path) -> None:
    workloads = {key.rsplit("/", 1)[0] for key in REQUESTS}
    patches = console("local.request_patches", tmp_path)
    assert set(patches) == workloads
    # A workload with several listed containers gets them in one patch (shown on a copy with a second container).
    two = {
        "containers": {
            "kfp/Deployment/ml-pipeline/a": {"cpu": "1m", "memory": "1Mi", "basis": "x"},
            "kfp/Deployment/ml-pipeline/b": {"cpu": "2m", "memory": "2Mi", "basis": "x"},
        }
    }
    other = tmp_path / "two.json"
    other.write_text(json.dumps(two))
    expression = (
        module_locals()["request_patches"][2:-1]
        .replace(
            "local.requests_by_workload",
            "(" + module_locals()["requests_by_workload"][2:-1] + ")",
        )
        .replace("local.container_requests", f'jsondecode(file("{other}")).containers')
    )
    grouped = console(expression, tmp_path)
    assert list(grouped) == ["kfp/Deployment/ml-pipeline"]
    containers = yaml.safe_load(grouped["kfp/Deployment/ml-pipeline"]["patch"])["spec"]["template"]["spec"]
    assert containers == {
        "containers": [
            {"name": "a", "resources": {"requests": {"cpu": "1m", "memory": "1Mi"}}},
            {"name": "b", "resources": {"requests": {"cpu": "2m", "memory": "2Mi"}}},
        ]
    }


# ---------------------------------------------------------------------------------------------------------------
# The microfed-cluster ConfigMap and the Role that reads it
# ---------------------------------------------------------------------------------------------------------------

# The contract with the train step's reader: these keys, these JSON types.
CLUSTER_INFO_TYPES = {
    "mode": str,
    "training_spot": bool,
    "cpu_machine_type": str,
    "cpu_max_nodes": int,
    "gpu_types": list,
    "gpu_machine_types": dict,
    "gpu_max_nodes": int,
    "training_operator": str,
}


def configmap(tmp_path: Path, **variables: Any) -> dict[str, Any]:
    body = infra().resources["kubectl_manifest", "cluster_info"]["yaml_body"]
    return console(f"yamldecode({body[2:-1]})", tmp_path, **variables)


@pytest.mark.integration
def test_cluster_info_configmap_defaults(tmp_path: Path) -> None:
    manifest = configmap(tmp_path)
    assert manifest["apiVersion"] == "v1" and manifest["kind"] == "ConfigMap"
    assert manifest["metadata"]["name"] == "microfed-cluster"
    assert manifest["metadata"]["namespace"] == "kubeflow"
    assert set(manifest["data"]) == {"cluster.json"}
    info = json.loads(manifest["data"]["cluster.json"])
    assert info == {
        "mode": "standard",
        "training_spot": True,
        "cpu_machine_type": "e2-standard-8",
        "cpu_max_nodes": 8,
        "gpu_types": ["nvidia-tesla-t4"],
        "gpu_machine_types": {"nvidia-tesla-t4": "n1-standard-8"},
        "gpu_max_nodes": 4,
        "training_operator": "trainer-v2",
    }
    assert {k: type(v) for k, v in info.items()} == CLUSTER_INFO_TYPES


@pytest.mark.integration
def test_cluster_info_configmap_on_autopilot(tmp_path: Path) -> None:
    manifest = configmap(
        tmp_path,
        mode="autopilot",
        training_spot=False,
        gpu_types=["nvidia-tesla-t4", "nvidia-l4"],
        gpu_machine_types={"nvidia-l4": "g2-standard-16", "nvidia-tesla-a100": "a2-highgpu-2g"},
        cpu_max_nodes=3,
        training_operator="training-operator-v1",
    )
    info = json.loads(manifest["data"]["cluster.json"])
    assert info == {
        "mode": "autopilot",
        "training_spot": False,
        "cpu_machine_type": "e2-standard-8",
        "cpu_max_nodes": 3,
        "gpu_types": ["nvidia-tesla-t4", "nvidia-l4"],
        # the merged map, for the types in gpu_types only (an override of another type is not a pool)
        "gpu_machine_types": {"nvidia-tesla-t4": "n1-standard-8", "nvidia-l4": "g2-standard-16"},
        "gpu_max_nodes": 4,
        "training_operator": "training-operator-v1",
    }
    assert {k: type(v) for k, v in info.items()} == CLUSTER_INFO_TYPES


def test_cluster_info_configmap_is_applied_after_the_namespace() -> None:
    resource = infra().resources["kubectl_manifest", "cluster_info"]
    assert resource["server_side_apply"] is True
    assert resource["depends_on"] == ["${kubectl_manifest.namespace}"]
    assert "count" not in resource  # both modes


def test_the_launcher_may_read_only_that_configmap() -> None:
    # The Training Operator v1's launcher (rbac.yaml): that one ConfigMap.
    docs = {d["kind"]: d for d in yaml.safe_load_all((MODULE / "rbac.yaml").read_text()) if d}
    rules = [r for r in docs["Role"]["rules"] if "configmaps" in r["resources"]]
    assert rules == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["microfed-cluster"], "verbs": ["get"]}
    ]
    # Trainer v2's also reads the runtime snapshot the trainer writes per TrainJob, `<trainjob>-runtime-snapshot`
    # (kubeflow/trainer v2.3.0, pkg/runtime/core/snapshot.go), whose names RBAC cannot list: get on ConfigMaps of
    # the KFP namespace, which KFP's own pipeline-runner Role already grants (with list and watch).
    docs = {d["kind"]: d for d in yaml.safe_load_all((MODULE / "rbac-trainer-v2.yaml").read_text()) if d}
    rules = [r for r in docs["Role"]["rules"] if "configmaps" in r["resources"]]
    assert rules == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]
    kfp = yaml.safe_load_all((MODULE / "manifests" / "kfp" / "rendered.yaml").read_text())
    (runner,) = [d for d in kfp if d and d["kind"] == "Role" and d["metadata"]["name"] == "pipeline-runner"]
    assert any("configmaps" in r["resources"] and "get" in r["verbs"] for r in runner["rules"])


# ---------------------------------------------------------------------------------------------------------------
# moved blocks: infra/moved.tf (before the module split) chained with modules/microfed/moved.tf (before `count`)
# ---------------------------------------------------------------------------------------------------------------


def stand_in(address: str) -> str:
    """google_container_node_pool.system[0] -> terraform_data.google_container_node_pool__system[0]."""
    return re.sub(r"\b((?:google|kubectl)_\w+)\.(\w+)", r"terraform_data.\1__\2", address)


def moved_blocks(cfg: Config) -> str:
    return "".join(
        f"moved {{\n  from = {stand_in(m['from'][2:-1])}\n  to = {stand_in(m['to'][2:-1])}\n}}\n" for m in cfg.moved
    )


def stand_in_keys(body: dict[str, Any], mode: str) -> list[Any]:
    """The instance keys of a resource for `mode`; one key, "k", for a for_each known only at apply."""
    try:
        return instances(body, mode)
    except AssertionError:
        return ["k"]


def stand_in_configuration(directory: Path, mode: str, root_moved: str | None = None) -> None:
    """infra/ with every resource of the module replaced by terraform_data, with the count / for_each it gets for
    `mode`, and both files of moved blocks."""
    module = directory / "m"
    module.mkdir(parents=True)
    lines = []
    for (rtype, name), body in infra().resources.items():
        lines.append(f'resource "terraform_data" "{rtype}__{name}" {{')
        if "count" in body:
            lines.append(f"  count = {len(stand_in_keys(body, mode))}")
        elif "for_each" in body:
            lines.append(f"  for_each = toset({json.dumps(stand_in_keys(body, mode))})")
        lines.append("}")
    (module / "main.tf").write_text("\n".join(lines) + "\n" + moved_blocks(infra()))
    root_text = root_moved if root_moved is not None else moved_blocks(root())
    (directory / "main.tf").write_text('module "microfed" {\n  source = "./m"\n}\n' + root_text)


def state(resources: list[tuple[str | None, str, list[Any]]]) -> dict[str, Any]:
    """A Terraform state (format 4) of terraform_data objects: (module or None, name, instance keys)."""
    out = []
    for n, (module, name, keys) in enumerate(resources):
        entry: dict[str, Any] = {
            "mode": "managed",
            "type": "terraform_data",
            "name": name,
            "provider": 'provider["terraform.io/builtin/terraform"]',
            "instances": [],
        }
        if module:
            entry["module"] = module
        for i, key in enumerate(keys):
            attributes = {"id": f"id-{n}-{i}", "input": None, "output": None, "triggers_replace": None}
            instance: dict[str, Any] = {"schema_version": 0, "attributes": attributes, "sensitive_attributes": []}
            if key is not None:
                instance["index_key"] = key
            entry["instances"].append(instance)
        out.append(entry)
    return {
        "version": 4,
        "terraform_version": "1.9.0",
        "serial": 1,
        "lineage": "microfed-test",
        "outputs": {},
        "resources": out,
    }


def plan(directory: Path, current: dict[str, Any]) -> str:
    (directory / "terraform.tfstate").write_text(json.dumps(current))
    init = run_terraform(["init", "-input=false", "-no-color", "-backend=false"], directory)
    assert init.returncode == 0, init.stdout + init.stderr
    proc = run_terraform(["plan", "-refresh=false", "-input=false", "-no-color", "-lock=false"], directory)
    if proc.returncode != 0:
        raise TerraformError(proc.stdout + proc.stderr)
    return proc.stdout


def pre_split_state() -> dict[str, Any]:
    """Every resource at its address from before the module split, as a Standard apply left it: single resources
    without an instance key (the pools had no count then), for_each ones with the keys they have now."""
    resources = []
    for address in sorted(PRE_SPLIT_ADDRESSES):
        rtype, name = address.split(".")
        body = infra().resources[rtype, name]
        keys = stand_in_keys(body, "standard") if "for_each" in body else [None]
        resources.append((None, f"{rtype}__{name}", keys))
    return state(resources)


@pytest.mark.integration
def test_a_pre_split_standard_state_moves_without_replacing_anything(tmp_path: Path) -> None:
    stand_in_configuration(tmp_path, "standard")
    output = plan(tmp_path, pre_split_state())
    # Only what was added to the module since then is created; nothing is destroyed or replaced.
    created = set(re.findall(r"# module\.microfed\.terraform_data\.(\w+) will be created", output))
    added_since = {f"{t}__{n}" for t, n in infra().resources if f"{t}.{n}" not in PRE_SPLIT_ADDRESSES}
    assert created == added_since, output
    assert f"Plan: {len(added_since)} to add, 0 to change, 0 to destroy." in output, output
    for pool in ("system", "training_cpu"):
        moved = f"terraform_data.google_container_node_pool__{pool} has moved to"
        assert f"{moved} module.microfed.terraform_data.google_container_node_pool__{pool}[0]" in output, output


@pytest.mark.integration
def test_a_module_state_from_before_count_moves_to_the_first_instance(tmp_path: Path) -> None:
    stand_in_configuration(tmp_path, "standard")
    module = "module.microfed"
    current = state(
        [
            (module, "google_container_node_pool__system", [None]),
            (module, "google_container_node_pool__training_cpu", [None]),
            (module, "google_container_node_pool__training_gpu", ["nvidia-tesla-t4"]),
        ]
    )
    output = plan(tmp_path, current)
    assert "0 to add, 0 to change, 0 to destroy" in output, output
    for pool in ("system", "training_cpu"):
        address = f"module.microfed.terraform_data.google_container_node_pool__{pool}"
        assert f"# {address} has moved to {address}[0]" in output, output
    assert "will be destroyed" not in output, output


@pytest.mark.integration
def test_moved_blocks_are_valid_on_autopilot(tmp_path: Path) -> None:
    # With count 0 the [0] targets are not declared; Terraform still accepts the blocks (a fresh plan).
    stand_in_configuration(tmp_path, "autopilot")
    output = plan(tmp_path, state([]))
    assert "google_container_node_pool" not in output


@pytest.mark.integration
def test_moving_the_root_block_to_the_instance_would_be_ambiguous(tmp_path: Path) -> None:
    # Why infra/moved.tf keeps moving whole resources: [0] would then have two sources.
    root_moved = moved_blocks(root()).replace(
        "to = module.microfed.terraform_data.google_container_node_pool__system\n",
        "to = module.microfed.terraform_data.google_container_node_pool__system[0]\n",
    )
    assert root_moved != moved_blocks(root())
    stand_in_configuration(tmp_path, "standard", root_moved)
    with pytest.raises(TerraformError, match="Ambiguous move statements"):
        plan(tmp_path, pre_split_state())


def test_every_module_moved_block_targets_a_counted_pool() -> None:
    moved = {(m["from"], m["to"]) for m in infra().moved}
    assert moved == {
        ("${google_container_node_pool.system}", "${google_container_node_pool.system[0]}"),
        ("${google_container_node_pool.training_cpu}", "${google_container_node_pool.training_cpu[0]}"),
    }
    for pool in ("system", "training_cpu"):
        assert "count" in infra().resources["google_container_node_pool", pool]
    assert _parse(MODULE / "moved.tf")["moved"], "modules/microfed/moved.tf holds the blocks"
