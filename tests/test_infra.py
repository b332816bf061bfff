"""Static checks of infra/ (Terraform for GKE), none of which needs the Google provider.

infra/ is the root configuration users apply: its providers, variables and outputs, and one call of the module
infra/modules/microfed/, which declares every resource and configures no provider; infra/examples/basic/ calls the
same module with providers of its own. python-hcl2 reads the .tf files; a small resolver follows `local.*` /
`var.*` references (with training/cluster.json bound to `local.contract`, after checking Terraform reads exactly that
file) so the tests compare the values the pools will get, not just the presence of attributes. `make infra-check`
runs terraform fmt and checkov as well.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml
from hcl2.utils import SerializationOptions

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MODULE = INFRA / "modules" / "microfed"
EXAMPLE = INFRA / "examples" / "basic"
CONTRACT: dict[str, Any] = json.loads((ROOT / "training" / "cluster.json").read_text())
TAINT_EFFECTS = {"NoSchedule": "NO_SCHEDULE", "PreferNoSchedule": "PREFER_NO_SCHEDULE", "NoExecute": "NO_EXECUTE"}
_OPTIONS = SerializationOptions(
    with_comments=False, explicit_blocks=False, strip_string_quotes=True, preserve_heredocs=False
)


def _parse(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return hcl2.load(f, serialization_options=_OPTIONS)


class Config:
    """The blocks of every .tf file in one directory, indexed by kind and name."""

    def __init__(self, directory: Path) -> None:
        self.files = sorted(directory.glob("*.tf"))
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.data: dict[tuple[str, str], dict[str, Any]] = {}
        self.variables: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.locals: dict[str, Any] = {}
        self.terraform: list[dict[str, Any]] = []
        self.providers: list[dict[str, Any]] = []  # {local name: body} of every provider block
        self.modules: dict[str, dict[str, Any]] = {}
        self.moved: list[dict[str, Any]] = []
        for path in self.files:
            doc = _parse(path)
            for block in doc.get("resource", []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        self.resources[rtype, name] = body
            for block in doc.get("data", []):
                for dtype, named in block.items():
                    for name, body in named.items():
                        self.data[dtype, name] = body
            for block in doc.get("variable", []):
                self.variables.update(block)
            for block in doc.get("output", []):
                self.outputs.update(block)
            for block in doc.get("locals", []):
                self.locals.update(block)
            self.terraform += doc.get("terraform", [])
            self.providers += doc.get("provider", [])
            for block in doc.get("module", []):
                self.modules.update(block)
            self.moved += doc.get("moved", [])

    def of_type(self, rtype: str) -> dict[str, dict[str, Any]]:
        return {name: body for (t, name), body in self.resources.items() if t == rtype}


@cache
def infra() -> Config:
    """The module that declares every resource (infra/modules/microfed/)."""
    return Config(MODULE)


@cache
def root() -> Config:
    """The root configuration users apply (infra/): providers, variables, outputs, the module call."""
    return Config(INFRA)


@cache
def example() -> Config:
    return Config(EXAMPLE)


# ---------------------------------------------------------------------------------------------------------------
# A resolver for the simple references the pools use: local.a.b[c], var.x (its default), each.key, literals.
# ---------------------------------------------------------------------------------------------------------------

_WHOLE = re.compile(r"^\$\{(.*)\}$", re.S)
_TOKEN = re.compile(r'\s*(?:(?P<name>[A-Za-z_][\w-]*)|(?P<dot>\.)|(?P<open>\[)|(?P<close>\])|"(?P<str>[^"]*)")')


class Unresolvable(Exception):
    """The expression is more than a reference path; the caller compares its text instead."""


def resolve(value: Any, cfg: Config | None = None, each_key: str | None = None) -> Any:
    """The value Terraform would compute for `value`, for plain references and literals."""
    cfg = cfg or infra()
    if isinstance(value, dict):
        return {resolve(k, cfg, each_key): resolve(v, cfg, each_key) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, cfg, each_key) for v in value]
    if not isinstance(value, str):
        return value
    match = _WHOLE.match(value)
    if not match:
        return value
    expr = match.group(1).strip()
    if expr.startswith("(") and expr.endswith(")"):  # `(local.x) = ...` map keys
        expr = expr[1:-1]
    return _evaluate(expr, cfg, each_key)


_CONDITIONAL = re.compile(r"^([^?:]+)\?([^?:]+):([^?:]+)$")


def _evaluate(expr: str, cfg: Config, each_key: str | None) -> Any:
    conditional = _CONDITIONAL.match(expr)
    if conditional:
        test, yes, no = (part.strip() for part in conditional.groups())
        return _evaluate(yes if _evaluate(test, cfg, each_key) else no, cfg, each_key)
    tokens = _tokens(expr)
    value, rest = _path(tokens, cfg, each_key)
    if rest:
        raise Unresolvable(expr)
    return value


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise Unresolvable(expr)
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _path(tokens: list[tuple[str, str]], cfg: Config, each_key: str | None) -> tuple[Any, list[tuple[str, str]]]:
    if not tokens:
        raise Unresolvable("empty")
    kind, root = tokens[0]
    if kind == "str":
        return root, tokens[1:]
    if kind != "name" or len(tokens) < 3 or tokens[1][0] != "dot":
        raise Unresolvable(root)
    attr = tokens[2][1]
    rest = tokens[3:]
    if root == "each" and attr == "key":
        if each_key is None:
            raise Unresolvable("each.key outside for_each")
        value: Any = each_key
    elif root == "local":
        value = _local(attr, cfg, each_key)
    elif root == "var":
        value = resolve(cfg.variables[attr].get("default"), cfg, each_key)
    else:
        raise Unresolvable(root)
    while rest:
        kind = rest[0][0]
        if kind == "dot" and len(rest) > 1 and rest[1][0] == "name":
            value, rest = value[rest[1][1]], rest[2:]
        elif kind == "open":
            index, rest = _path(rest[1:], cfg, each_key)
            if not rest or rest[0][0] != "close":
                raise Unresolvable("unclosed index")
            value, rest = value[index], rest[1:]
        else:
            break
    return value, rest


def _local(name: str, cfg: Config, each_key: str | None) -> Any:
    if name == "contract":
        return CONTRACT  # test_terraform_reads_the_cluster_contract checks that this is what Terraform loads
    return resolve(cfg.locals[name], cfg, each_key)


def blocks(body: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The nested blocks `name` of a body (python-hcl2 gives a list of dicts)."""
    found = body.get(name, [])
    return found if isinstance(found, list) else [found]


def block(body: dict[str, Any], name: str) -> dict[str, Any]:
    found = blocks(body, name)
    assert len(found) == 1, f"expected one {name} block, found {len(found)}"
    return found[0]


def taints(pool: dict[str, Any], each_key: str | None = None) -> list[dict[str, Any]]:
    return [resolve(t, each_key=each_key) for t in blocks(block(pool, "node_config"), "taint")]


def expected_taint(raw: dict[str, str]) -> dict[str, str]:
    return {"key": raw["key"], "value": raw["value"], "effect": TAINT_EFFECTS[raw["effect"]]}


def all_tf_files() -> list[Path]:
    return sorted(INFRA.rglob("*.tf"))


# ---------------------------------------------------------------------------------------------------------------
# What a block becomes for one value of `mode`: infra/cost/model.py's evaluator (python-hcl2 plus the expressions
# infra/ uses: variables through the module call, locals, conditionals, merge, ...) evaluates each attribute and each
# dynamic block's for_each. A value that depends on another resource (known only at apply) stays as its text.
# ---------------------------------------------------------------------------------------------------------------


@cache
def cost_model() -> Any:
    """infra/cost/model.py, loaded as test_cost.py loads it (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("microfed_infra_cost_model", INFRA / "cost" / "model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@cache
def terraform(mode: str = "standard") -> Any:
    """infra/ read through its module call, with `mode` set (every other variable at its default)."""
    return cost_model().load_terraform(INFRA, {"mode": mode})


def evaluated(value: Any, mode: str = "standard", each_key: Any = None) -> Any:
    """The value Terraform computes, or the expression's text when it depends on something known only at apply."""
    try:
        return cost_model().evaluate(value, terraform(mode), each_key, each_key)
    except cost_model().ModelError:
        return value


def instances(body: dict[str, Any], mode: str = "standard") -> list[Any]:
    """The instance keys a resource block creates: None for a single resource, indexes for count, keys for for_each."""
    if "for_each" in body:
        keys = evaluated(body["for_each"], mode)
        assert not isinstance(keys, str), f"for_each {keys} cannot be evaluated before apply"
        return sorted(keys)
    if "count" in body:
        return list(range(int(evaluated(body["count"], mode))))
    return [None]


def effective(body: dict[str, Any], mode: str = "standard") -> dict[str, Any]:
    """A block as Terraform sees it for `mode`: dynamic blocks expanded (one content per for_each element, its
    iterator left as text), null arguments dropped (null means "not set"), every other value evaluated."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key == "dynamic":
            for spec in (s for d in value for s in d.items()):
                label, dynamic = spec
                elements = evaluated(dynamic["for_each"], mode)
                assert not isinstance(elements, str) or label == "cidr_blocks", f"dynamic {label}: {elements}"
                count = len(elements) if not isinstance(elements, str) else 1
                content = effective(block(dynamic, "content"), mode)
                out.setdefault(label, []).extend(content for _ in range(count))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out[key] = [effective(v, mode) for v in value]  # nested blocks
        else:
            result = evaluated(value, mode)
            if result is not None:
                out[key] = result
    return {k: v for k, v in out.items() if v != []}


# ---------------------------------------------------------------------------------------------------------------
# The node contract shared with the PyTorchJob builder
# ---------------------------------------------------------------------------------------------------------------


def test_terraform_reads_the_cluster_contract() -> None:
    assert infra().locals["contract"] == '${jsondecode(file("${path.module}/../../../training/cluster.json"))}'
    assert (MODULE / ".." / ".." / ".." / "training" / "cluster.json").resolve() == ROOT / "training" / "cluster.json"
    # The root's copy of the variables validates gpu_types against the same file.
    assert root().locals["contract"] == '${jsondecode(file("${path.module}/../training/cluster.json"))}'
    assert (INFRA / ".." / "training" / "cluster.json").resolve() == ROOT / "training" / "cluster.json"
    assert resolve("${local.taint_effects}") == TAINT_EFFECTS


def test_training_pools_scale_from_zero() -> None:
    cfg = infra()
    pools = [cfg.resources["google_container_node_pool", "training_cpu"]]
    pools.append(cfg.resources["google_container_node_pool", "training_gpu"])
    for pool in pools:
        assert pool["initial_node_count"] == 0
        autoscaling = block(pool, "autoscaling")
        assert autoscaling["total_min_node_count"] == 0
        assert resolve(autoscaling["total_max_node_count"]) >= 1
        assert resolve(autoscaling["location_policy"]) == "ANY"  # training_spot defaults to true
        assert "min_node_count" not in autoscaling


def test_spot_is_a_variable_and_switches_the_location_policy() -> None:
    cfg = infra()
    assert cfg.variables["training_spot"]["type"] == "bool"
    assert cfg.locals["training_location_policy"] == '${var.training_spot ? "ANY" : "BALANCED"}'
    for name in ("training_cpu", "training_gpu"):
        pool = cfg.resources["google_container_node_pool", name]
        assert block(pool, "node_config")["spot"] == "${var.training_spot}"
        assert block(pool, "autoscaling")["location_policy"] == "${local.training_location_policy}"


def test_cpu_pool_matches_the_contract() -> None:
    pool = infra().resources["google_container_node_pool", "training_cpu"]
    assert resolve(pool["name"]) == CONTRACT["cpu_pool"]
    assert resolve(block(pool, "node_config")["labels"]) == {CONTRACT["pool_label_key"]: CONTRACT["cpu_pool"]}
    assert taints(pool) == [expected_taint(CONTRACT["training_taint"])]


@pytest.mark.parametrize("accelerator", sorted(CONTRACT["gpu_pools"]))
def test_gpu_pools_match_the_contract(accelerator: str) -> None:
    pool = infra().resources["google_container_node_pool", "training_gpu"]
    # One pool per GPU type on Standard, none on Autopilot (tests/test_infra_autopilot.py).
    assert pool["for_each"] == "${local.autopilot ? toset([]) : toset(var.gpu_types)}"
    assert instances(pool) == sorted(infra().variables["gpu_types"]["default"])
    node = block(pool, "node_config")
    assert resolve(pool["name"], each_key=accelerator) == CONTRACT["gpu_pools"][accelerator]
    labels = resolve(node["labels"], each_key=accelerator)
    assert labels == {CONTRACT["pool_label_key"]: CONTRACT["gpu_pools"][accelerator]}
    # GKE sets <gpu_label_key>=<guest_accelerator.type> itself; its cloud.google.com/ labels cannot be set by hand.
    assert CONTRACT["gpu_label_key"] == "cloud.google.com/gke-accelerator"
    assert not any(key.startswith("cloud.google.com/") for key in labels)
    accel = block(node, "guest_accelerator")
    assert resolve(accel["type"], each_key=accelerator) == accelerator
    assert resolve(accel["count"]) == 1
    assert taints(pool, accelerator) == [
        expected_taint(CONTRACT["training_taint"]),
        expected_taint(CONTRACT["gpu_taint"]),
    ]
    machine_types = resolve("${local.default_gpu_machine_types}")
    assert set(machine_types) == set(CONTRACT["gpu_pools"])


def test_gpu_drivers_are_installed_by_gke() -> None:
    pool = infra().resources["google_container_node_pool", "training_gpu"]
    config = block(block(block(pool, "node_config"), "guest_accelerator"), "gpu_driver_installation_config")
    assert resolve(config["gpu_driver_version"]) in {"LATEST", "DEFAULT"}


def test_gpu_types_default_to_t4_and_are_checked_against_the_contract() -> None:
    var = infra().variables["gpu_types"]
    assert var["default"] == ["nvidia-tesla-t4"]
    conditions = " ".join(v["condition"] for v in var["validation"])
    assert 'contains(var.gpu_types, "nvidia-tesla-t4")' in conditions
    assert "keys(local.contract.gpu_pools)" in conditions


def test_system_pool_is_always_on_and_untainted() -> None:
    cfg = infra()
    pool = cfg.resources["google_container_node_pool", "system"]
    assert resolve(block(pool, "autoscaling")["min_node_count"]) >= 1
    assert "taint" not in block(pool, "node_config")
    assert cfg.variables["system_min_nodes"]["default"] >= 1
    assert any(">= 1" in v["condition"] for v in cfg.variables["system_min_nodes"]["validation"])
    assert "spot" not in block(pool, "node_config")


def test_training_pools_are_created_after_the_system_pool() -> None:
    # GKE leaves out its GPU taint when a GPU pool is created while it would be the only pool.
    for name in ("training_cpu", "training_gpu"):
        pool = infra().resources["google_container_node_pool", name]
        assert "${google_container_node_pool.system}" in pool["depends_on"]


# ---------------------------------------------------------------------------------------------------------------
# Cluster and node hardening
# ---------------------------------------------------------------------------------------------------------------


def cluster() -> dict[str, Any]:
    return infra().resources["google_container_cluster", "this"]


def standard_cluster() -> dict[str, Any]:
    """The cluster block with the default mode (standard), dynamic blocks expanded and conditionals evaluated."""
    return effective(cluster(), "standard")


def test_cluster_security_settings() -> None:
    c = standard_cluster()
    assert "enable_autopilot" not in c  # null on Standard: false would conflict with the Standard-only settings
    assert c["remove_default_node_pool"] is True
    assert block(c, "workload_identity_config")["workload_pool"] == "${var.project_id}.svc.id.goog"
    assert c["enable_shielded_nodes"] is True
    assert c["enable_legacy_abac"] is False
    assert block(block(c, "master_auth"), "client_certificate_config")["issue_client_certificate"] is False
    assert block(c, "network_policy") == {"enabled": True, "provider": "CALICO"}
    assert block(block(c, "addons_config"), "network_policy_config")["disabled"] is False
    assert cluster()["deletion_protection"] == "${var.deletion_protection}"
    assert infra().variables["deletion_protection"]["default"] is True
    assert block(c, "release_channel")["channel"] == "REGULAR"
    assert block(c, "ip_allocation_policy")["cluster_secondary_range_name"] == "pods"


def test_cluster_autoscaling_profile() -> None:
    autoscaling = block(standard_cluster(), "cluster_autoscaling")
    assert autoscaling["autoscaling_profile"] == "OPTIMIZE_UTILIZATION"
    assert autoscaling["enabled"] is False  # no node auto-provisioning: every pool carries the contract's taints
    assert "auto_provisioning_defaults" not in autoscaling  # Autopilot's node identity (test_infra_autopilot.py)


def test_private_nodes_by_default_with_authorized_networks() -> None:
    c, cfg = cluster(), infra()
    dynamic = {name: spec for d in blocks(c, "dynamic") for name, spec in d.items()}
    private = dynamic["private_cluster_config"]
    assert private["for_each"] == "${var.enable_private_nodes ? [1] : []}"
    assert cfg.variables["enable_private_nodes"]["default"] is True
    assert block(private, "content")["enable_private_nodes"] is True
    authorized = block(c, "master_authorized_networks_config")
    inner = {name: spec for d in blocks(authorized, "dynamic") for name, spec in d.items()}
    assert inner["cidr_blocks"]["for_each"] == "${var.master_authorized_networks}"
    assert "default" not in cfg.variables["master_authorized_networks"]  # the user must choose


def node_configs() -> dict[str, dict[str, Any]]:
    configs = {"cluster default pool": block(standard_cluster(), "node_config")}
    for name, pool in infra().of_type("google_container_node_pool").items():
        configs[name] = block(pool, "node_config")
    return configs


def test_every_node_config_is_hardened() -> None:
    configs = node_configs()
    assert set(configs) == {"cluster default pool", "system", "training_cpu", "training_gpu"}
    for name, node in configs.items():
        assert block(node, "workload_metadata_config")["mode"] == "GKE_METADATA", name
        shielded = block(node, "shielded_instance_config")
        assert shielded["enable_secure_boot"] is True, name
        assert shielded["enable_integrity_monitoring"] is True, name
        assert node["image_type"] == "COS_CONTAINERD", name
        assert node["service_account"] == "${google_service_account.nodes.email}", name
        assert resolve(node["metadata"]) == {"disable-legacy-endpoints": "true"}, name


def test_node_pools_repair_and_upgrade_themselves() -> None:
    for name, pool in infra().of_type("google_container_node_pool").items():
        management = block(pool, "management")
        assert management["auto_repair"] is True, name
        assert management["auto_upgrade"] is True, name


def test_network_has_secondary_ranges_and_nat() -> None:
    cfg = infra()
    subnet = cfg.resources["google_compute_subnetwork", "this"]
    assert {r["range_name"] for r in blocks(subnet, "secondary_ip_range")} == {"pods", "services"}
    assert subnet["private_ip_google_access"] is True
    nat = cfg.resources["google_compute_router_nat", "this"]
    assert nat["source_subnetwork_ip_ranges_to_nat"] == "ALL_SUBNETWORKS_ALL_IP_RANGES"


# ---------------------------------------------------------------------------------------------------------------
# Storage, registry, IAM
# ---------------------------------------------------------------------------------------------------------------


def test_bucket_hardening_and_lifecycle() -> None:
    bucket = infra().resources["google_storage_bucket", "pipelines"]
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert block(bucket, "versioning")["enabled"] is True
    rules = [(block(r, "condition"), block(r, "action")["type"]) for r in blocks(bucket, "lifecycle_rule")]
    old_runs = [c for c, action in rules if action == "Delete" and "matches_prefix" in c]
    assert len(old_runs) == 1
    assert resolve(old_runs[0]["matches_prefix"]) == ["${local.pipeline_root_prefix}/"]
    assert resolve("${local.pipeline_root_prefix}") == "pipeline-root"
    assert resolve(old_runs[0]["age"]) == 30
    assert any(c.get("with_state") == "ARCHIVED" for c, action in rules if action == "Delete")
    assert infra().locals["pipeline_root"] == "gs://${local.bucket_name}/${local.pipeline_root_prefix}"


def test_registry_is_a_docker_repository() -> None:
    repo = infra().resources["google_artifact_registry_repository", "images"]
    assert repo["format"] == "DOCKER"
    assert repo["location"] == "${var.region}"


def roles() -> list[tuple[Path, str]]:
    found = []
    for path in all_tf_files():
        found += [(path, m) for m in re.findall(r"roles/[\w.]+", path.read_text())]
    return found


def test_no_primitive_roles_anywhere() -> None:
    assert roles(), "no IAM roles found: did the parser or the file set change?"
    for path, role in roles():
        assert role not in {"roles/editor", "roles/owner", "roles/viewer"}, f"{path}: {role}"


def test_project_level_grants_are_limited_to_the_node_role() -> None:
    grants = infra().of_type("google_project_iam_member")
    assert {g["role"] for g in grants.values()} == {"roles/container.defaultNodeServiceAccount"}
    assert not infra().of_type("google_project_iam_binding")
    assert not infra().of_type("google_project_iam_policy")


def test_pipeline_identity_reaches_only_its_bucket_and_registry() -> None:
    cfg = infra()
    gsa = "serviceAccount:${google_service_account.pipelines.email}"
    bucket_grants = [g for g in cfg.of_type("google_storage_bucket_iam_member").values() if g["member"] == gsa]
    assert {g["role"] for g in bucket_grants} == {"roles/storage.objectUser", "roles/storage.legacyBucketReader"}
    assert all(g["bucket"] == "${google_storage_bucket.pipelines.name}" for g in bucket_grants)
    registry = [g for g in cfg.of_type("google_artifact_registry_repository_iam_member").values() if g["member"] == gsa]
    assert [g["role"] for g in registry] == ["roles/artifactregistry.reader"]
    assert registry[0]["repository"] == "${google_artifact_registry_repository.images.name}"


def test_workload_identity_binds_pipeline_runner() -> None:
    cfg = infra()
    binding = cfg.resources["google_service_account_iam_member", "pipeline_runner_workload_identity"]
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    assert binding["service_account_id"] == "${google_service_account.pipelines.name}"
    member = binding["member"].replace("${local.kfp_namespace}", resolve("${local.kfp_namespace}"))
    member = member.replace("${local.pipeline_runner_ksa}", resolve("${local.pipeline_runner_ksa}"))
    assert member == "serviceAccount:${var.project_id}.svc.id.goog[kubeflow/pipeline-runner]"
    # The KSA annotation is rendered at plan time from locals: they must name the same Google service account.
    assert cfg.resources["google_service_account", "pipelines"]["account_id"] == "${local.pipeline_gsa_id}"
    assert cfg.locals["pipeline_gsa_email"] == "${local.pipeline_gsa_id}@${var.project_id}.iam.gserviceaccount.com"


# ---------------------------------------------------------------------------------------------------------------
# Kubeflow
# ---------------------------------------------------------------------------------------------------------------


def test_kubeflow_manifests_are_vendored() -> None:
    # Plans read the manifests rendered under infra/manifests/ (pinned by tag and commit in SOURCES.json, checked by
    # tests/test_vendored_manifests.py), never a remote kustomization: no version variable, no ?ref=.
    cfg = infra()
    assert not {"kfp_version", "training_operator_version"} & set(cfg.variables)
    sources = {name: body["resources"] for (kind, name), body in cfg.data.items() if kind == "kustomization_overlay"}
    assert sources == {
        "kfp_cluster_scoped": ["${path.module}/manifests/kfp-cluster-scoped"],
        "kfp": ["${path.module}/manifests/kfp"],
        "training_operator": ["${path.module}/manifests/training-operator"],
        "trainer_v2": ["${path.module}/manifests/trainer-v2"],
        "trainer_v2_runtimes": ["${path.module}/manifests/trainer-v2-runtimes"],
    }


def test_manifests_are_applied_server_side() -> None:
    manifests = infra().of_type("kubectl_manifest")
    assert {"namespace", "crds", "resources", "webhooks", "launcher_rbac"} <= set(manifests)
    for name, body in manifests.items():
        assert body["server_side_apply"] is True, name


def test_launcher_default_pipeline_root_is_the_bucket() -> None:
    kfp = infra().data["kustomization_overlay", "kfp"]
    # A patch's `target` is a nested block in kbst/kustomization (data_source_kustomization_overlay.go): python-hcl2
    # reads `target { ... }` as a list of one dict, `target = { ... }` (which Terraform rejects) as a bare dict.
    for patch in kfp["patches"]:
        assert isinstance(patch["target"], list), "write the patch target as a block: target { ... }"
    patches = {(t["kind"], resolve(t["name"])): p for p in kfp["patches"] for t in [block(p, "target")]}
    launcher = patches["ConfigMap", "kfp-launcher"]
    assert "defaultPipelineRoot = local.pipeline_root" in launcher["patch"]
    sa = patches["ServiceAccount", "pipeline-runner"]
    assert '"iam.gke.io/gcp-service-account" = local.pipeline_gsa_email' in sa["patch"]


@pytest.mark.parametrize(
    ("operator", "file"), [("trainer-v2", "rbac-trainer-v2.yaml"), ("training-operator-v1", "rbac.yaml")]
)
def test_launcher_rbac_is_applied_in_the_kfp_namespace(operator: str, file: str) -> None:
    cfg = infra()
    rbac = cfg.resources["kubectl_manifest", "launcher_rbac"]
    assert rbac["for_each"].startswith("${{for doc in local.rbac_documents")
    # The file of the operator training_operator installs (tests/test_infra_operator.py evaluates it per value).
    assert 'file("${path.module}/${local.launcher_rbac_files[var.training_operator]}")' in cfg.locals["rbac_documents"]
    assert resolve("${local.launcher_rbac_files}")[operator] == file
    # Mirror the replace() Terraform applies, then check what lands in the cluster.
    namespace = resolve("${local.kfp_namespace}")
    text = (MODULE / file).read_text().replace("namespace: kubeflow", f"namespace: {namespace}")
    docs = {d["kind"]: d for d in yaml.safe_load_all(text) if d}
    assert set(docs) == {"Role", "RoleBinding"}
    assert docs["Role"]["metadata"]["namespace"] == namespace
    assert docs["RoleBinding"]["metadata"]["namespace"] == namespace
    assert docs["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": resolve("${local.pipeline_runner_ksa}"), "namespace": namespace}
    ]
    assert docs["RoleBinding"]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": docs["Role"]["metadata"]["name"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Conventions: descriptions, types, validations, provider pins, outputs, formatting, checkov gate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [INFRA, MODULE, EXAMPLE], ids=["infra", "modules/microfed", "examples/basic"])
def test_every_variable_and_output_is_described(directory: Path) -> None:
    cfg = Config(directory)
    assert cfg.variables or cfg.outputs
    for name, var in cfg.variables.items():
        assert len(var.get("description", "")) >= 15, f"variable {name} needs a description"
        assert "type" in var, f"variable {name} needs a type"
    for name, out in cfg.outputs.items():
        assert len(out.get("description", "")) >= 15, f"output {name} needs a description"


@pytest.mark.parametrize("directory", [INFRA, MODULE], ids=["infra", "modules/microfed"])
def test_fixed_value_variables_are_validated(directory: Path) -> None:
    cfg = Config(directory)
    for name in ("region", "zone", "release_channel", "gpu_types", "gpu_driver_version", "training_operator"):
        assert cfg.variables[name].get("validation"), f"variable {name} needs a validation block"


def test_every_variable_is_documented_in_the_readme() -> None:
    readme = (INFRA / "README.md").read_text()
    for name in infra().variables:
        assert f"`{name}`" in readme, f"infra/README.md does not document variable {name}"


def test_outputs_tell_how_to_use_the_cluster() -> None:
    outputs = infra().outputs
    for name in ("cluster_name", "cluster_location", "bucket_url", "pipeline_root", "image_repository"):
        assert name in outputs
    assert "gcloud container clusters get-credentials" in outputs["get_credentials_command"]["value"]
    forward = outputs["kfp_ui_port_forward_command"]["value"]
    assert "kubectl port-forward" in forward and "svc/ml-pipeline-ui" in forward
    assert outputs["pipeline_root"]["value"] == "${local.pipeline_root}"


@pytest.mark.parametrize("directory", [INFRA, MODULE, EXAMPLE], ids=["infra", "modules/microfed", "examples/basic"])
def test_providers_are_pinned_to_the_versions_of_their_schemas(directory: Path) -> None:
    # One exact version per provider, the one whose schema infra/schemas/ holds and infra/schema_check.py checks
    # every block against (tests/test_infra_schema.py); a range would let `terraform init` pick another schema.
    terraform = Config(directory).terraform
    assert len(terraform) == 1
    assert terraform[0]["required_version"] == ">= 1.9"
    providers = block(terraform[0], "required_providers")
    assert providers["google"] == {"source": "hashicorp/google", "version": "= 7.46.1"}
    assert set(providers) == {"google", "kubectl", "kustomization"}
    for name, spec in providers.items():
        schema = json.loads((INFRA / "schemas" / f"{name}.json").read_text())
        assert spec == {"source": schema["provider"], "version": f"= {schema['version']}"}, name


def test_references_resolve() -> None:
    # No `terraform validate` without the providers: at least every var., local. and resource reference must exist.
    cfg = infra()
    text = "\n".join(path.read_text() for path in cfg.files)
    for name in set(re.findall(r"\bvar\.(\w+)", text)):
        assert name in cfg.variables, f"var.{name} is not declared"
    for name in set(re.findall(r"\blocal\.(\w+)", text)):
        assert name in cfg.locals, f"local.{name} is not defined"
    for rtype, name in set(re.findall(r"(?<![.\w])((?:google|kubectl)_\w+)\.(\w+)", text)):
        assert (rtype, name) in cfg.resources, f"{rtype}.{name} is not a resource"
    for dtype, name in set(re.findall(r"\bdata\.(\w+)\.(\w+)", text)):
        assert (dtype, name) in cfg.data, f"data.{dtype}.{name} is not a data source"


def test_example_calls_the_module_with_its_variables() -> None:
    doc = _parse(EXAMPLE / "main.tf")
    (call,) = [body for m in doc["module"] for body in m.values()]
    assert call["source"] == "../../modules/microfed"
    assert (EXAMPLE / call["source"]).resolve() == MODULE
    arguments = set(call) - {"source"}
    variables = infra().variables
    assert arguments <= set(variables), f"unknown module arguments: {arguments - set(variables)}"
    required = {name for name, var in variables.items() if "default" not in var}
    assert required <= arguments, f"the example misses required variables {required - arguments}"
    assert (EXAMPLE / "terraform.tfvars.example").is_file()


# ---------------------------------------------------------------------------------------------------------------
# The layout: a module without providers, a root (and an example) that configure them
# ---------------------------------------------------------------------------------------------------------------

# Every resource infra/ declared at its top level before the split into modules/microfed/ (commit 17614ec): a state
# created then holds these addresses, and moved.tf must carry each to the module.
PRE_SPLIT_ADDRESSES = {
    "google_project_service.apis",
    "google_compute_network.this",
    "google_compute_subnetwork.this",
    "google_compute_router.this",
    "google_compute_router_nat.this",
    "google_container_cluster.this",
    "google_container_node_pool.system",
    "google_container_node_pool.training_cpu",
    "google_container_node_pool.training_gpu",
    "google_storage_bucket.pipelines",
    "google_artifact_registry_repository.images",
    "google_service_account.nodes",
    "google_project_iam_member.nodes",
    "google_artifact_registry_repository_iam_member.nodes_reader",
    "google_service_account.pipelines",
    "google_storage_bucket_iam_member.pipelines_objects",
    "google_storage_bucket_iam_member.pipelines_bucket_reader",
    "google_artifact_registry_repository_iam_member.pipelines_reader",
    "google_service_account_iam_member.pipeline_runner_workload_identity",
    "google_service_account.ui",
    "google_storage_bucket_iam_member.ui_objects",
    "google_service_account_iam_member.ui_workload_identity",
    "kubectl_manifest.namespace",
    "kubectl_manifest.crds",
    "kubectl_manifest.resources",
    "kubectl_manifest.webhooks",
    "kubectl_manifest.launcher_rbac",
}
PROVIDERS = {"google", "kubectl", "kustomization"}


def _configured(cfg: Config) -> dict[str, dict[str, Any]]:
    """{local name: body} of the provider blocks without alias."""
    out: dict[str, dict[str, Any]] = {}
    for block in cfg.providers:
        for local, body in block.items():
            if "alias" not in body:
                assert local not in out, f"two default configurations of provider {local}"
                out[local] = body
    return out


def test_the_module_configures_no_provider() -> None:
    # Terraform, "Providers Within Modules": a module intended to be called by other modules must not contain provider
    # blocks; one that does is a legacy module, whose calls may not use count, for_each or depends_on, and whose
    # resources cannot be destroyed once its call is removed (the configuration that would destroy them went with it).
    cfg = infra()
    assert cfg.resources, "the module declares the resources"
    assert cfg.providers == []
    for path in sorted(MODULE.rglob("*.tf")):
        assert not re.search(r'^\s*provider\s+"', path.read_text(), re.M), (
            f"{path.relative_to(INFRA)} configures a provider"
        )
    # It needs no aliased configurations either: every provider is inherited as the default one.
    for spec in block(cfg.terraform[0], "required_providers").values():
        assert "configuration_aliases" not in spec


def test_the_root_declares_no_resource_of_its_own() -> None:
    cfg = root()
    assert cfg.resources == {}, "a resource of the root cannot be used by a caller of the module: declare it there"
    assert set(cfg.data) == {("google_client_config", "current")}  # the access token of the kubectl provider


@pytest.mark.parametrize("directory", [INFRA, EXAMPLE], ids=["infra", "examples/basic"])
def test_root_and_example_configure_every_provider_the_module_uses(directory: Path) -> None:
    cfg = Config(directory)
    module_providers = block(infra().terraform[0], "required_providers")
    assert set(module_providers) == PROVIDERS
    # Same local names and sources as the module's, or the module would get an unconfigured provider.
    assert block(cfg.terraform[0], "required_providers") == module_providers
    configured = _configured(cfg)
    assert set(configured) == PROVIDERS
    assert configured["google"]["project"] == "${var.project_id}"
    kubectl = configured["kubectl"]
    assert kubectl["host"] == "https://${module.microfed.cluster_dns_endpoint}"
    assert kubectl["token"] == "${data.google_client_config.current.access_token}"
    assert kubectl["load_config_file"] is False and kubectl["lazy_load"] is True
    kustomization = configured["kustomization"]
    assert {"kubeconfig_raw", "context"} <= set(kustomization)
    assert "render-only.invalid" in kustomization["kubeconfig_raw"]
    (call,) = cfg.modules.values()
    assert (directory / call["source"]).resolve() == MODULE
    assert "providers" not in call  # inherited: the default configurations above


def test_the_module_exposes_the_dns_endpoint_its_caller_needs() -> None:
    value = infra().outputs["cluster_dns_endpoint"]["value"]
    assert value == "${google_container_cluster.this.control_plane_endpoints_config[0].dns_endpoint_config[0].endpoint}"


def test_the_root_passes_every_variable_to_the_module() -> None:
    # The same variables, descriptions, types, defaults and validations as the module's, so a terraform.tfvars
    # written for either works for both, each handed to the module unchanged.
    assert root().variables == infra().variables
    call = root().modules["microfed"]
    assert call["source"] == "./modules/microfed"
    assert {k: v for k, v in call.items() if k != "source"} == {name: f"${{var.{name}}}" for name in root().variables}


def test_the_root_exports_every_output_of_the_module() -> None:
    outputs = infra().outputs
    assert set(root().outputs) == set(outputs)
    for name, output in root().outputs.items():
        assert output["value"] == f"${{module.microfed.{name}}}", name
        assert output["description"] == outputs[name]["description"], name


def test_every_resource_declared_before_the_split_has_a_moved_block() -> None:
    # An existing state is migrated into the module, not destroyed and recreated: Terraform moves each object whose
    # address a moved block names. A block covers a whole resource, every for_each instance included.
    moved = [(m["from"], m["to"]) for m in root().moved]
    assert len({source for source, _ in moved}) == len(moved), "two moved blocks from the same address"
    assert {source for source, _ in moved} == {f"${{{address}}}" for address in PRE_SPLIT_ADDRESSES}
    for source, target in moved:
        address = source[2:-1]
        assert target == f"${{module.microfed.{address}}}", source
        rtype, name = address.split(".")
        assert (rtype, name) in infra().resources, f"{target} is not a resource of the module"


def test_root_references_resolve() -> None:
    cfg = root()
    text = "\n".join(path.read_text() for path in cfg.files)
    for name in set(re.findall(r"\bvar\.(\w+)", text)):
        assert name in cfg.variables, f"var.{name} is not declared"
    for name in set(re.findall(r"\blocal\.(\w+)", text)):
        assert name in cfg.locals, f"local.{name} is not defined"
    for name in set(re.findall(r"\bmodule\.microfed\.(\w+)", text)):
        assert name in infra().outputs or (any(t == name for t, _ in infra().resources)), name


@pytest.mark.integration
def test_terraform_fmt() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.fail("terraform is not installed: install Terraform >= 1.9 (https://developer.hashicorp.com/terraform)")
    proc = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(INFRA)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"run `terraform fmt -recursive infra/`:\n{proc.stdout}"


@cache
def _gate() -> Any:
    """infra/checkov_gate.py, which make infra-check runs with checkov's own virtualenv."""
    spec = importlib.util.spec_from_file_location("checkov_gate", INFRA / "checkov_gate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _report(**results: Any) -> dict[str, Any]:
    summary = {
        "passed": len(results.get("passed_checks", [])),
        "failed": len(results.get("failed_checks", [])),
        "skipped": len(results.get("skipped_checks", [])),
        "parsing_errors": len(results.get("parsing_errors", [])),
        "resource_count": 3,
    }
    return {"check_type": "terraform", "results": results, "summary": summary}


PASSED = {"check_id": "CKV_GCP_12", "resource": "google_container_cluster.this"}
SKIPPED = {
    "check_id": "CKV_GCP_66",
    "resource": "google_container_cluster.this",
    "check_result": {"result": "SKIPPED", "suppress_comment": "no signed-image policy to enforce here"},
}


def test_checkov_gate_passes_a_clean_report() -> None:
    verdict = _gate().evaluate(_report(passed_checks=[PASSED], skipped_checks=[SKIPPED]), "| CKV_GCP_66 | ... |")
    assert verdict.ok, verdict.problems
    assert (verdict.passed, verdict.skipped) == (1, 1)


@pytest.mark.parametrize(
    ("report", "readme", "problem"),
    [
        (_report(passed_checks=[PASSED], parsing_errors=["/infra/cluster.tf"]), "", "could not parse"),
        (_report(passed_checks=[PASSED], failed_checks=[dict(PASSED, check_name="x")]), "", "FAILED CKV_GCP_12"),
        (_report(), "", "checked nothing"),
        ({"passed": 0, "failed": 0, "skipped": 0, "parsing_errors": 0}, "", "checked nothing"),
        (_report(passed_checks=[PASSED], skipped_checks=[SKIPPED]), "CKV_GCP_6", "not listed in infra/README.md"),
        (
            _report(passed_checks=[PASSED], skipped_checks=[dict(SKIPPED, check_result={"suppress_comment": ""})]),
            "CKV_GCP_66",
            "without a real reason",
        ),
    ],
    ids=["parse-error", "failed-check", "nothing-checked", "bare-summary", "skip-not-in-readme", "skip-no-reason"],
)
def test_checkov_gate_fails(report: Any, readme: str, problem: str) -> None:
    verdict = _gate().evaluate(report, readme)
    assert not verdict.ok
    assert any(problem in p for p in verdict.problems), verdict.problems


def test_every_checkov_skip_is_inline_with_a_reason_and_in_the_readme() -> None:
    readme = (INFRA / "README.md").read_text()
    skips = []
    for path in all_tf_files():
        for line in path.read_text().splitlines():
            if "checkov:skip" in line:
                match = re.fullmatch(r"\s*#checkov:skip=([A-Z0-9_]+):(.{20,})", line)
                assert match, f"{path.name}: malformed skip (want #checkov:skip=ID:reason): {line.strip()}"
                skips.append(match.group(1))
                assert re.search(rf"\b{match.group(1)}\b", readme), f"{match.group(1)} missing from infra/README.md"
    assert skips, "expected the skips documented in infra/README.md"
    documented = set(re.findall(r"^\| (CKV2?_\w+)", readme, re.M))
    assert documented == set(skips), "infra/README.md lists skips that are not in the .tf files (or the reverse)"
