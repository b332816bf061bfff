"""The cost model of infra/ (infra/cost/model.py) and the README sections it generates.

The first test is the guard: infra/README.md's Cost block and the top-level README's summary are recomputed from
infra/'s own Terraform and infra/cost/prices.json and must match. The copy tests show that guard is not vacuous:
changing a variable default in a copy of infra/ moves the numbers, and the copy's README then fails the same check.
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


def test_autopilot_is_an_explicit_extension_point() -> None:
    cluster = model.read_cluster(INFRA, prices=PRICES)
    requests = model.PodRequests(vcpu=2.0, memory_gib=8.0)
    with pytest.raises(model.ModelError, match="autopilot"):
        model.autopilot_idle_monthly_cost(requests, cluster, PRICES)
    with_prices = {**PRICES, "autopilot": {"vcpu_hour": 0.05, "memory_gib_hour": 0.005, "ephemeral_gib_hour": 0.0}}
    cost = model.autopilot_idle_monthly_cost(requests, cluster, with_prices)
    pods = 730 * (2.0 * 0.05 + 8.0 * 0.005)
    volumes = sum(v.size_gib for v in cluster.volumes) * PRICES["disks_per_gb_month"]["pd-balanced"]["value"]
    assert cost.total == pytest.approx(pods + volumes)  # the fee is covered by the free tier
