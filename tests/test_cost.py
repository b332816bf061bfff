"""The cost model of infra/ (infra/cost/model.py) and the README sections it generates, for both modes.

The first test is the guard: infra/README.md's Cost block and the top-level README's summary are recomputed from
infra/'s own Terraform, the vendored manifests with infra/modules/microfed/requests.json, and infra/cost/prices.json,
and must match. The copy tests show that guard is not vacuous: changing a variable default or a requests.json value
in a copy of infra/ moves the numbers (Standard's or Autopilot's), and the copy's README then fails the same check.
Autopilot's request rules (infra/cost/autopilot.py) are checked on hand-worked pods.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MODULE = INFRA / "modules" / "microfed"  # what infra/ calls: every resource, and the vendored manifests


def _load_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("microfed_infra_cost_model", INFRA / "cost" / "model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


model = _load_model()
PRICES: dict[str, Any] = model.load_prices()


def _infra_copy(tmp_path: Path) -> Path:
    """infra/ (without Terraform's local state) and the cluster contract it reads, side by side as in the repo."""
    dest = tmp_path / "infra"
    shutil.copytree(
        INFRA, dest, ignore=shutil.ignore_patterns(".terraform", "*.tfstate*", "terraform.tfvars", "__pycache__")
    )
    (tmp_path / "training").mkdir()
    shutil.copy(ROOT / "training" / "cluster.json", tmp_path / "training" / "cluster.json")
    return dest


def _set_default(infra_dir: Path, variable: str, value: str) -> None:
    path = infra_dir / "variables.tf"
    text = path.read_text()
    pattern = re.compile(rf'(variable "{variable}" \{{.*?\n  default\s*=\s*)[^\n]+', re.S)
    new, n = pattern.subn(lambda m: m.group(1) + value, text, count=1)
    assert n == 1, f"no default for {variable} in {path}"
    path.write_text(new)


# ---------------------------------------------------------------------------------------------------------------
# The READMEs follow the model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_readmes_show_what_the_model_computes() -> None:
    cluster = model.read_cluster(INFRA, prices=PRICES)
    updates = model.readme_updates(INFRA, cluster, PRICES)
    assert INFRA / "README.md" in updates and ROOT / "README.md" in updates, "a README lost its cost markers"
    for path, expected in updates.items():
        actual = path.read_text()
        if actual != expected:
            diff = "".join(
                difflib.unified_diff(actual.splitlines(True), expected.splitlines(True), str(path), "model", n=1)
            )
            pytest.fail(
                f"{path.relative_to(ROOT)} does not show what infra/cost/model.py computes; run "
                f"`.venv/bin/python infra/cost/model.py --write`:\n{diff}"
            )
    assert model.main(["--check"]) == 0


@pytest.mark.integration
def test_a_variable_change_moves_the_numbers_and_fails_the_readme_check(tmp_path: Path) -> None:
    copy = _infra_copy(tmp_path)
    before = model.read_cluster(copy, prices=PRICES)
    assert model.readme_updates(copy, before, PRICES)[copy / "README.md"] == (copy / "README.md").read_text()
    idle_before = model.idle_monthly_cost(before, PRICES).total

    _set_default(copy, "system_min_nodes", "2")
    after = model.read_cluster(copy, prices=PRICES)
    idle_after = model.idle_monthly_cost(after, PRICES).total

    system = next(p for p in after.pools if p.idle_nodes)
    one_node = 730 * PRICES["machines"][system.machine_type]["on_demand"]
    one_disk = system.disk_size_gb * PRICES["disks_per_gb_month"][system.disk_type]["value"]
    one_nat_vm = 730 * PRICES["nat"]["per_vm_hour"]["value"]
    assert idle_after - idle_before == pytest.approx(one_node + one_disk + one_nat_vm)
    # ... and the copied README, generated for one node, no longer passes.
    assert model.readme_updates(copy, after, PRICES)[copy / "README.md"] != (copy / "README.md").read_text()
    assert model.main(["--infra", str(copy), "--check"]) == 1


@pytest.mark.integration
def test_training_spot_false_prices_the_pools_on_demand(tmp_path: Path) -> None:
    copy = _infra_copy(tmp_path)
    spot = {h.pool: h for h in model.training_hour_costs(model.read_cluster(copy, prices=PRICES), PRICES)}
    _set_default(copy, "training_spot", "false")
    on_demand = {h.pool: h for h in model.training_hour_costs(model.read_cluster(copy, prices=PRICES), PRICES)}
    assert spot.keys() == on_demand.keys() and spot
    for name, hour in on_demand.items():
        assert hour.billed_as == "on demand" and spot[name].billed_as == "Spot"
        assert hour.total == pytest.approx(spot[name].on_demand_total)
        assert hour.total > spot[name].total


@pytest.mark.integration
def test_overrides_and_tfvars_equal_an_edited_default(tmp_path: Path) -> None:
    tfvars = tmp_path / "my.tfvars"
    tfvars.write_text('system_machine_type = "e2-standard-2"\ngpu_types = ["nvidia-tesla-t4", "nvidia-l4"]\n')
    from_file = model.read_cluster(INFRA, var_files=[tfvars], prices=PRICES)
    from_overrides = model.read_cluster(
        INFRA, {"system_machine_type": "e2-standard-2", "gpu_types": ["nvidia-tesla-t4", "nvidia-l4"]}, prices=PRICES
    )
    assert from_file == from_overrides
    system = next(p for p in from_file.pools if p.idle_nodes)
    assert system.machine_type == "e2-standard-2"
    l4 = next(p for p in from_file.pools if p.gpu_type == "nvidia-l4")
    assert not l4.optional and l4.machine_type == "g2-standard-8"
    with pytest.raises(model.ModelError, match="not a variable"):
        model.read_cluster(INFRA, {"no_such_variable": 1}, prices=PRICES)


@pytest.mark.integration
def test_the_model_reads_the_module_through_the_root_call(tmp_path: Path) -> None:
    # infra/ declares no resource: it calls modules/microfed/ with its variables, and the model follows that call.
    cfg = model.load_terraform(INFRA)
    assert cfg.directory == MODULE
    assert ("google_container_cluster", "this") in cfg.resources
    # A root default reaches the module; the module's own default is what a call that passes nothing gets.
    copy = _infra_copy(tmp_path)
    _set_default(copy, "system_machine_type", '"e2-standard-2"')
    system = next(p for p in model.read_cluster(copy, prices=PRICES).pools if p.idle_nodes)
    assert system.machine_type == "e2-standard-2"


@pytest.mark.integration
def test_regional_cluster_pays_three_system_nodes_and_the_fee() -> None:
    zonal = model.read_cluster(INFRA, prices=PRICES)
    regional = model.read_cluster(INFRA, {"regional_cluster": True}, prices=PRICES)
    assert not zonal.regional and regional.regional and len(regional.zones) == 3
    assert sum(p.idle_nodes for p in regional.pools) == 3 * sum(p.idle_nodes for p in zonal.pools)
    fees = [ln for ln in model.idle_monthly_cost(regional, PRICES).lines if "GKE" in ln.item]
    assert [ln.monthly for ln in fees] == [pytest.approx(73.0)]  # no free-tier line for a regional cluster


# ---------------------------------------------------------------------------------------------------------------
# The model reads what infra/ creates
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_pools_follow_the_variables() -> None:
    cfg = model.load_terraform(INFRA)
    cluster = model.read_cluster(INFRA, prices=PRICES)
    variables = cfg.variables
    idle = [p for p in cluster.pools if p.idle_nodes]
    assert len(idle) == 1, "one always-on (system) pool"
    assert idle[0].machine_type == variables["system_machine_type"]
    assert idle[0].idle_nodes == variables["system_min_nodes"]
    training = [p for p in cluster.pools if not p.idle_nodes and not p.optional]
    assert {p.gpu_type for p in training} == {None, *variables["gpu_types"]}
    for pool in training:
        assert pool.spot is variables["training_spot"]
        assert pool.disk_size_gb == variables["training_disk_size_gb"]
    cpu = next(p for p in training if p.gpu_type is None)
    assert cpu.machine_type == variables["cpu_machine_type"]
    assert cluster.private_nodes is variables["enable_private_nodes"] and cluster.nat_gateways == 1


@pytest.mark.integration
def test_every_machine_gpu_and_disk_infra_uses_has_a_price() -> None:
    cluster = model.read_cluster(INFRA, prices=PRICES)
    assert cluster.pools and all(not p.optional or p.gpu_type for p in cluster.pools)
    for pool in cluster.pools:  # the optional GPU pools too
        assert pool.machine_type in PRICES["machines"], pool
        assert pool.disk_type in PRICES["disks_per_gb_month"], pool
    hours = model.training_hour_costs(cluster, PRICES)
    assert {h.pool for h in hours} == {p.name for p in cluster.pools if not p.idle_nodes}
    assert all(h.total > 0 for h in hours)


def test_prices_name_their_source_and_date() -> None:
    sources = PRICES["sources"]
    for key, source in sources.items():
        assert source["url"].startswith("https://"), key
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", source["read_on"]), key
    cited: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "source" in node:
                assert node["source"] in sources, f"{path}: unknown source {node['source']}"
                cited.append(node["source"])
            for key, value in node.items():
                if key != "sources":
                    walk(value, f"{path}.{key}")

    walk(PRICES, "prices")
    assert set(cited) == set(sources), "a source nobody cites, or the reverse"
    for name, machine in PRICES["machines"].items():
        assert machine["source"] and 0 < machine["spot"] < machine["on_demand"], name


def test_kfp_volumes_recorded_match_the_vendored_manifests() -> None:
    recorded = PRICES["kfp_volumes"]
    # the vendored render pins KFP (infra/modules/microfed/manifests/SOURCES.json)
    upstreams = json.loads((MODULE / "manifests" / "SOURCES.json").read_text())["upstreams"]
    kfp_version = next(u["tag"] for u in upstreams if u["repo"] == "kubeflow/pipelines")
    assert recorded["kfp_version"] == kfp_version, "prices.json records the volumes of another KFP release"
    manifests = sorted((MODULE / "manifests").rglob("*.yaml"))
    vendored = [claim for path in manifests for claim in model.pvc_claims(path.read_text())]
    assert vendored, "no PersistentVolumeClaim in the vendored manifests: did the render or its path change?"
    assert sorted((name, size) for name, size, _ in vendored) == sorted(
        (c["name"], float(c["size_gib"])) for c in recorded["claims"]
    )


def test_pvc_claims_reads_only_claims() -> None:
    text = """apiVersion: v1
kind: ConfigMap
metadata: {name: x}
data: {note: "kind: PersistentVolumeClaim"}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: a}
spec: {resources: {requests: {storage: 512Mi}}, storageClassName: premium-rwo}
"""
    assert model.pvc_claims(text) == [("a", 0.5, "premium-rwo")]


# ---------------------------------------------------------------------------------------------------------------
# The expression evaluator and the Autopilot extension point
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_evaluator_handles_the_expressions_infra_uses() -> None:
    cfg = model.load_terraform(INFRA, {"regional_cluster": True})
    assert model.evaluate("${local.cluster_location}", cfg) == cfg.variables["region"]
    assert (
        model.evaluate('${var.region}-x-${"${var.zone}"}', cfg)
        == f"{cfg.variables['region']}-x-{cfg.variables['zone']}"
    )
    assert model.evaluate("${merge({a = 1, b = 2}, {b = 3})}", cfg) == {"a": 1, "b": 3}
    assert model.evaluate("${var.enable_private_nodes ? [1] : []}", cfg) == [1]
    assert model.evaluate("${length(var.gpu_types) >= 1 && !false}", cfg) is True
    contract = json.loads((ROOT / "training" / "cluster.json").read_text())
    assert model.evaluate("${local.contract.cpu_pool}", cfg) == contract["cpu_pool"]
    assert model.evaluate("${local.gpu_machine_types[each.key]}", cfg, "nvidia-l4") == "g2-standard-8"
    with pytest.raises(model.ModelError, match="regex"):
        model.evaluate('${regex("a", "b")}', cfg)
    with pytest.raises(model.ModelError, match="not known before apply"):
        model.evaluate("${google_service_account.nodes.email}", cfg)


# ---------------------------------------------------------------------------------------------------------------
# Autopilot: the rules, by hand
# ---------------------------------------------------------------------------------------------------------------

MIB_IN_GIB = 1 / 1024
RULES = model.autopilot_rules(PRICES)
# Clusters without bursting (created before GKE 1.26): 250m / 512 MiB minimums, CPU in 250m steps.
OLD_RULES = model.AutopilotRules(
    default_vcpu=0.5,
    default_memory_gib=2,
    default_ephemeral_gib=1,
    min_vcpu=0.25,
    min_memory_gib=0.5,
    min_gib_per_vcpu=1,
    max_gib_per_vcpu=6.5,
    vcpu_step=0.25,
)


def _billed(*containers: tuple[float | None, float | None], rules: Any = RULES) -> tuple[float, float, float]:
    pod = model.billed_requests([model.ContainerRequests(cpu, mem) for cpu, mem in containers], rules)
    return pod.vcpu, pod.memory_gib, pod.ephemeral_gib


def test_the_rules_are_the_documented_ones() -> None:
    assert (RULES.default_vcpu, RULES.default_memory_gib, RULES.default_ephemeral_gib) == (0.5, 2, 1)
    assert (RULES.min_vcpu, RULES.min_memory_gib * 1024) == (0.05, pytest.approx(52))
    assert (RULES.min_gib_per_vcpu, RULES.max_gib_per_vcpu, RULES.vcpu_step) == (1, 6.5, 0)


def test_a_container_without_requests_is_billed_at_the_defaults() -> None:
    # 0.5 vCPU / 2 GiB is within 1..6.5 GiB per vCPU and above the minimums: billed as is, plus 1 GiB ephemeral.
    assert _billed((None, None)) == (0.5, 2, 1)
    # Two such containers: 1 vCPU, 4 GiB, 2 GiB of ephemeral storage.
    assert _billed((None, None), (None, None)) == (1, 4, 2)


def test_small_pods_are_raised_to_the_minimums() -> None:
    # 10m / 64 MiB: CPU raised to 50m; 64 MiB is above 52 MiB and 1.25 GiB per vCPU is within the range.
    assert _billed((0.01, 64 * MIB_IN_GIB)) == (0.05, pytest.approx(0.0625), 1)
    # 10m / 16 MiB: 50m, and memory raised to 52 MiB (above the 51.2 MiB that 1 GiB per vCPU asks of 50m).
    assert _billed((0.01, 16 * MIB_IN_GIB)) == (0.05, pytest.approx(52 / 1024), 1)
    # Without bursting: 250m, and 512 MiB (0.5 GiB, which also satisfies 1 GiB per vCPU for 0.25 vCPU).
    assert _billed((0.01, 64 * MIB_IN_GIB), rules=OLD_RULES) == (0.25, 0.5, 1)


def test_the_cpu_memory_ratio_raises_the_smaller() -> None:
    # 30m / 500 MiB (ml-pipeline-visualizationserver): 50m after the minimum, but 500 MiB is 9.77 GiB per vCPU,
    # over 6.5: CPU raised to 500/1024/6.5 = 0.07512 vCPU; memory unchanged.
    vcpu, memory, _ = _billed((0.03, 500 * MIB_IN_GIB))
    assert vcpu == pytest.approx(0.0751202, abs=1e-7) and memory == pytest.approx(0.48828125)
    # 2 vCPU / 1 GiB: 0.5 GiB per vCPU, under 1: memory raised to 2 GiB, CPU unchanged.
    assert _billed((2.0, 1.0)) == (2.0, 2.0, 1)
    # Without bursting the raised CPU also goes up to the next 250m step: 0.07512 -> 0.25 (the minimum already).
    # 2 GiB on 0.1 vCPU asks 2/6.5 = 0.3077 vCPU -> 0.5 in 250m steps.
    assert _billed((0.1, 2.0), rules=OLD_RULES) == (0.5, 2.0, 1)


def test_a_missing_request_is_filled_from_the_ratio() -> None:
    # CPU only: the smallest memory the ratio allows, 1 GiB per vCPU (assumed; the docs say "a value that fits").
    assert _billed((1.0, None)) == (1.0, 1.0, 1)
    # Memory only: the smallest CPU it allows, memory / 6.5.
    assert _billed((None, 6.5)) == (pytest.approx(1.0), 6.5, 1)
    # Per container, before the pod's sum: 0.5 vCPU + (1 GiB -> 1/6.5 vCPU).
    assert _billed((0.5, 0.5), (None, 1.0))[0] == pytest.approx(0.5 + 1 / 6.5)


def test_rules_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="CPU:memory range"):
        model.AutopilotRules(
            default_vcpu=0.5,
            default_memory_gib=2,
            default_ephemeral_gib=1,
            min_vcpu=0.05,
            min_memory_gib=0.05,
            min_gib_per_vcpu=7,
            max_gib_per_vcpu=6.5,
        )
    with pytest.raises(ValueError, match="at least one container"):
        model.billed_requests([], RULES)


# ---------------------------------------------------------------------------------------------------------------
# Autopilot: the cluster
# ---------------------------------------------------------------------------------------------------------------


def _autopilot(infra_dir: Path = INFRA, **overrides: Any) -> Any:
    return model.read_cluster(infra_dir, {"mode": "autopilot", **overrides}, prices=PRICES)


@pytest.mark.integration
def test_autopilot_idle_cost_is_the_pods_volumes_nat_and_no_fee() -> None:
    cluster = _autopilot()
    assert cluster.mode == "autopilot" and cluster.pools == ()
    cost = model.idle_monthly_cost(cluster, PRICES)
    assert cost == model.autopilot_idle_monthly_cost(cluster, PRICES)
    assert cluster.training_operator == "trainer-v2"
    pods = model.autopilot_pods(cluster.module_dir, PRICES, cluster.training_operator)
    # Every workload of KFP's renders and the default operator's (Trainer v2 with JobSet), once per replica; none of
    # the Training Operator v1's; nothing of kube-system.
    renders = [
        r for r in sorted((MODULE / "manifests").glob("*/rendered.yaml")) if r.parent.name != "training-operator"
    ]
    workloads = [w for r in renders for w in _workloads(r)]
    assert sorted(p.name.split("/")[-1] for p in pods) == sorted(workloads)
    assert {"jobset-controller-manager", "kubeflow-trainer-controller-manager"} <= set(workloads)
    gp = PRICES["autopilot"]["general_purpose"]
    vcpu = sum(p.billed.vcpu * p.replicas for p in pods)
    memory = sum(p.billed.memory_gib * p.replicas for p in pods)
    ephemeral = sum(p.billed.ephemeral_gib * p.replicas for p in pods)
    assert ephemeral == sum(p.replicas for p in pods)  # 1 GiB per single-container pod: requests.json sets none
    compute = 730 * (vcpu * gp["vcpu_hour"]["value"] + memory * gp["memory_gib_hour"]["value"])
    storage = 730 * ephemeral * PRICES["autopilot"]["ephemeral_gib_hour"]["value"]
    volumes = sum(v.size_gib for v in cluster.volumes) * PRICES["disks_per_gb_month"]["pd-balanced"]["value"]
    nodes = PRICES["autopilot"]["idle_nodes"]["value"]
    nat = 730 * (nodes * PRICES["nat"]["per_vm_hour"]["value"] + PRICES["nat"]["per_ip_hour"]["value"])
    assert cost.total == pytest.approx(compute + storage + volumes + nat)  # the fee is covered by the free tier
    fee = [ln.monthly for ln in cost.lines if "GKE" in ln.item]
    assert fee == [pytest.approx(73.0), pytest.approx(-73.0)]


def _workloads(render: Path) -> list[str]:
    return [
        doc["metadata"]["name"]
        for doc in yaml.safe_load_all(render.read_text())
        if isinstance(doc, dict) and doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet")
    ]


@pytest.mark.integration
def test_the_training_operator_moves_autopilot_only() -> None:
    # Standard bills the system node, which holds either operator (tests/test_system_sizing.py); Autopilot bills
    # the pods: Trainer v2's two controllers (JobSet's asks for 500m itself) instead of the Training Operator's one.
    v2, v1 = _autopilot(), _autopilot(training_operator="training-operator-v1")
    assert (v2.training_operator, v1.training_operator) == ("trainer-v2", "training-operator-v1")
    names = {
        c.training_operator: {p.name for p in model.autopilot_pods(c.module_dir, PRICES, c.training_operator)}
        for c in (v1, v2)
    }
    assert names["trainer-v2"] - names["training-operator-v1"] == {
        "trainer-v2: Deployment kubeflow-system/jobset-controller-manager",
        "trainer-v2: Deployment kubeflow-system/kubeflow-trainer-controller-manager",
    }
    assert names["training-operator-v1"] - names["trainer-v2"] == {
        "training-operator: Deployment kubeflow/training-operator"
    }
    assert model.idle_monthly_cost(v2, PRICES).total > model.idle_monthly_cost(v1, PRICES).total
    standard = [
        model.read_cluster(INFRA, {"training_operator": op}, prices=PRICES)
        for op in ("trainer-v2", "training-operator-v1")
    ]
    assert model.idle_monthly_cost(standard[0], PRICES) == model.idle_monthly_cost(standard[1], PRICES)
    # infra/README.md states the other operator's Autopilot figure next to the default's.
    v1_total = model.idle_monthly_cost(v1, PRICES).total
    assert '`training_operator = "training-operator-v1"`' in (INFRA / "README.md").read_text()
    assert f"${v1_total:,.2f} per month idle" in (INFRA / "README.md").read_text()
    with pytest.raises(model.ModelError, match="training_operator"):
        model.read_cluster(INFRA, {"mode": "autopilot", "training_operator": "mpi"}, prices=PRICES)


@pytest.mark.integration
def test_autopilot_reads_no_node_pool(tmp_path: Path) -> None:
    # Autopilot has no pools: removing every node pool resource changes nothing of its figures.
    copy = _infra_copy(tmp_path)
    before = _autopilot(copy)
    (copy / "modules" / "microfed" / "node_pools.tf").unlink()
    after = _autopilot(copy)
    assert model.idle_monthly_cost(after, PRICES) == model.idle_monthly_cost(before, PRICES)
    assert model.autopilot_training_hour_costs(after, PRICES) == model.autopilot_training_hour_costs(before, PRICES)


@pytest.mark.integration
def test_a_requests_json_change_moves_autopilot_and_fails_the_readme_check(tmp_path: Path) -> None:
    copy = _infra_copy(tmp_path)
    assert model.main(["--infra", str(copy), "--check"]) == 0
    before = model.idle_monthly_cost(_autopilot(copy), PRICES).total
    path = copy / "modules" / "microfed" / "requests.json"
    doc = json.loads(path.read_text())
    key = "kfp/Deployment/metadata-grpc-deployment/container"
    old = doc["containers"][key]
    assert (old["cpu"], old["memory"]) == ("10m", "256Mi"), "the hand-worked figures below assume these"
    doc["containers"][key] = {**old, "memory": "1Gi"}
    path.write_text(json.dumps(doc))
    after = model.idle_monthly_cost(_autopilot(copy), PRICES).total
    # Billed before: 50m / 0.25 GiB. After: 1 GiB is over 6.5 GiB per vCPU of 50m, so CPU rises to 1/6.5 vCPU.
    gp = PRICES["autopilot"]["general_purpose"]
    delta = 730 * ((1 / 6.5 - 0.05) * gp["vcpu_hour"]["value"] + 0.75 * gp["memory_gib_hour"]["value"])
    assert after - before == pytest.approx(delta)
    assert model.main(["--infra", str(copy), "--check"]) == 1


@pytest.mark.integration
def test_training_spot_false_prices_autopilot_pods_on_demand(tmp_path: Path) -> None:
    copy = _infra_copy(tmp_path)
    spot = {h.replica: h for h in model.autopilot_training_hour_costs(_autopilot(copy), PRICES)}
    _set_default(copy, "training_spot", "false")
    on_demand = {h.replica: h for h in model.autopilot_training_hour_costs(_autopilot(copy), PRICES)}
    assert spot.keys() == on_demand.keys() and spot
    for name, hour in on_demand.items():
        assert hour.billed_as == "on demand" and spot[name].billed_as == "Spot"
        assert hour.total == pytest.approx(spot[name].on_demand_total)
        assert hour.total > spot[name].total
    assert model.main(["--infra", str(copy), "--check"]) == 1


@pytest.mark.integration
def test_autopilot_training_pods_are_the_size_of_the_standard_nodes() -> None:
    standard = model.read_cluster(INFRA, prices=PRICES)
    nodes = {h.pool: h for h in model.training_hour_costs(standard, PRICES)}
    pods = {h.replica: h for h in model.autopilot_training_hour_costs(_autopilot(), PRICES)}
    assert pods.keys() == nodes.keys()  # the same replica kinds, optional GPU types included
    cpu = standard.training[0]
    machine = PRICES["machines"][cpu.machine_type]
    gp = PRICES["autopilot"]["general_purpose"]
    # A general-purpose Spot pod of the machine's vCPUs and memory (8 / 32 GiB is within Autopilot's range).
    expected = (
        machine["vcpus"] * gp["spot_vcpu_hour"]["value"] + machine["memory_gb"] * gp["spot_memory_gib_hour"]["value"]
    )
    hour = pods[cpu.name]
    assert hour.compute == pytest.approx(expected) and not hour.lower_bound
    assert hour.total == pytest.approx(
        expected + PRICES["autopilot"]["ephemeral_gib_hour"]["value"] + PRICES["nat"]["per_vm_hour"]["value"]
    )
    # A GPU pod (Accelerator class, billed per node) costs at least the node's machine and GPU, minus its boot disk.
    for name, pod in pods.items():
        if name == cpu.name:
            continue
        assert pod.lower_bound and pod.total == pytest.approx(nodes[name].total - nodes[name].disk)


def test_autopilot_prices_follow_their_stated_derivation() -> None:
    gp = PRICES["autopilot"]["general_purpose"]
    scale = gp["scale"]
    assert scale["value"] == pytest.approx(scale["europe_west4"] / scale["asia_southeast1"], abs=1e-7)
    assert scale["europe_west4"] == PRICES["machines"]["e2-standard-8"]["on_demand"]
    for key in ("vcpu_hour", "memory_gib_hour", "spot_vcpu_hour", "spot_memory_gib_hour"):
        entry = gp[key]
        # Recorded to 7 decimals: within half of the last one.
        assert entry["value"] == pytest.approx(entry["asia_southeast1"] * scale["value"], abs=5e-8), key
    assert gp["spot_vcpu_hour"]["value"] < gp["vcpu_hour"]["value"]
    assert gp["spot_memory_gib_hour"]["value"] < gp["memory_gib_hour"]["value"]


@pytest.mark.integration
def test_both_modes_are_in_the_readmes() -> None:
    text = (INFRA / "README.md").read_text()
    block = text[text.index(model.README_BEGIN) : text.index(model.README_END)]
    standard = model.read_cluster(INFRA, prices=PRICES)
    autopilot = _autopilot()
    for cluster in (standard, autopilot):
        assert f'`mode = "{cluster.mode}"`' in block
        assert f"**Idle: {model._money(model.idle_monthly_cost(cluster, PRICES).total)} per month**" in block
    assert "per node-hour" in block and "per pod-hour" in block
    summary = (ROOT / "README.md").read_text()
    summary = summary[summary.index(model.SUMMARY_BEGIN) : summary.index(model.SUMMARY_END)]
    assert '`mode = "standard"`' in summary and '`mode = "autopilot"`' in summary and "pod-hour" in summary


@pytest.mark.integration
def test_a_missing_autopilot_section_says_what_to_add() -> None:
    without = {k: v for k, v in PRICES.items() if k != "autopilot"}
    with pytest.raises(model.ModelError, match="'autopilot' section"):
        model.idle_monthly_cost(_autopilot(), without)
