"""The size of the system pool (infra/cost/sizing.py): the requests of what runs while nothing trains, summed from
the vendored manifests, the explicit requests infra/ sets on the containers that declare none
(infra/modules/microfed/requests.json) and GKE's kube-system, against each machine type's allocatable.

The first tests are the guards: the default `system_machine_type` (the same in infra/ and its module) must be the
cheapest machine type of prices.json that holds the sum with its headroom, and every container of the vendored
manifests must have requests (declared, or from requests.json), so a re-render of the manifests or a price change
that makes another type right, or that adds a container without requests, fails here. The rest check the summation
on small hand-made manifests whose numbers can be worked by hand.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import hcl2
import pytest
import yaml
from hcl2.utils import SerializationOptions

from microfed.training.capacity import DAEMONSET_CPU, DAEMONSET_MEMORY, MACHINE_TYPES

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MODULE = INFRA / "modules" / "microfed"
MIB = 1024**2
_HCL = SerializationOptions(
    with_comments=False, explicit_blocks=False, strip_string_quotes=True, preserve_heredocs=False
)


def _load_sizing() -> ModuleType:
    spec = importlib.util.spec_from_file_location("microfed_infra_cost_sizing", INFRA / "cost" / "sizing.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sizing = _load_sizing()
PRICES: dict[str, Any] = json.loads((INFRA / "cost" / "prices.json").read_text())


def _default(variables_tf: Path, name: str) -> Any:
    with variables_tf.open() as f:
        doc = hcl2.load(f, serialization_options=_HCL)
    for block in doc.get("variable", []):
        if name in block:
            return block[name]["default"]
    raise AssertionError(f"{variables_tf} has no variable {name}")


# ---------------------------------------------------------------------------------------------------------------
# The guard: the default is the cheapest machine type that fits
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_the_default_system_machine_type_is_the_cheapest_that_fits() -> None:
    root_default = _default(INFRA / "variables.tf", "system_machine_type")
    module_default = _default(MODULE / "variables.tf", "system_machine_type")
    assert root_default == module_default
    chosen = sizing.cheapest_fitting(sizing.system_load(), PRICES)
    assert chosen.fits
    assert root_default == chosen.machine_type, (
        f"the system pool's requests now fit {chosen.machine_type} best (`.venv/bin/python infra/cost/sizing.py`): "
        "make it the default of system_machine_type in infra/variables.tf and the module's, then run "
        "`.venv/bin/python infra/cost/model.py --write`"
    )
    # Every cheaper candidate falls short, by the figures.
    for name, hourly in sizing.candidate_machine_types(PRICES):
        if hourly >= chosen.on_demand_hour:
            break
        assert not sizing.fit(sizing.system_load(), name, hourly).fits, name


@pytest.mark.integration
@pytest.mark.parametrize("operator", ["trainer-v2", "training-operator-v1"])
def test_the_system_pool_holds_either_operator(operator: str) -> None:
    # The default is sized for the default operator; the other must fit the same machine type.
    load = sizing.system_load(operator=operator)
    assert sizing.fit(load, _default(INFRA / "variables.tf", "system_machine_type")).fits, operator
    installed = {w.source for w in load.workloads}
    assert set(sizing.OPERATOR_KUSTOMIZATIONS[operator]) & installed
    other = {k for name, ks in sizing.OPERATOR_KUSTOMIZATIONS.items() if name != operator for k in ks}
    assert not other & installed, "only the installed operator's pods run"
    with pytest.raises(sizing.SizingError, match="training_operator"):
        sizing.system_load(operator="volcano")


def test_the_operators_folders_are_those_terraform_installs() -> None:
    # sizing.py's copy of kubeflow.tf's local.operator_kustomizations (kustomization names; for the operators they
    # are the vendored folders' names too) and of the variable's default.
    with (MODULE / "kubeflow.tf").open() as f:
        doc = hcl2.load(f, serialization_options=_HCL)
    found = {}
    for block in doc.get("locals", []):
        found.update(block)
    assert found["operator_kustomizations"] == {k: list(v) for k, v in sizing.OPERATOR_KUSTOMIZATIONS.items()}
    assert {found["kustomization_folders"][k] for ks in sizing.OPERATOR_KUSTOMIZATIONS.values() for k in ks} == {
        k for ks in sizing.OPERATOR_KUSTOMIZATIONS.values() for k in ks
    }
    assert _default(MODULE / "variables.tf", "training_operator") == sizing.DEFAULT_OPERATOR
    assert _default(INFRA / "variables.tf", "training_operator") == sizing.DEFAULT_OPERATOR


@pytest.mark.integration
def test_the_sum_is_recomputed_from_the_vendored_manifests() -> None:
    # An independent walk over the renders: replicas x the sum of the app containers' requests (none of these
    # pods has init containers, so the effective request is that sum), and the containers without requests, which
    # must be exactly the ones requests.json covers (in every folder, both operators'). The sum is that of KFP's
    # folders and the default operator's.
    cpu_m = memory = 0
    without: list[str] = []
    installed: list[str] = []
    renders = sorted((MODULE / "manifests").glob("*/rendered.yaml"))
    assert renders
    not_installed = {
        k for name, ks in sizing.OPERATOR_KUSTOMIZATIONS.items() if name != sizing.DEFAULT_OPERATOR for k in ks
    }
    for render in renders:
        counted = render.parent.name not in not_installed
        # libyaml's parser where present (as infra/cost/sizing.py): the operator's render is 3.7 MB
        for doc in yaml.load_all(render.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if not isinstance(doc, dict) or doc.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet"):
                continue
            pod = doc["spec"]["template"]["spec"]
            assert not pod.get("initContainers"), "an init container: recompute with the effective-request rule"
            replicas = 1 if doc["kind"] == "DaemonSet" else doc["spec"].get("replicas", 1)
            for c in pod["containers"]:
                requests = (c.get("resources") or {}).get("requests") or {}
                key = f"{render.parent.name}/{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
                if counted:
                    cpu_m += replicas * round(sizing.parse_cpu(requests.get("cpu", "0")) * 1000)
                    memory += replicas * sizing.parse_memory(requests.get("memory", "0"))
                if "cpu" not in requests or "memory" not in requests:
                    without.append(key)
                    if counted:
                        installed.append(key)
    every = json.loads((MODULE / "requests.json").read_text())["containers"]
    assert sorted(without) == sorted(every), "requests.json must cover exactly the containers without requests"
    entries = {key: every[key] for key in installed}
    assert set(every) - set(entries), "the other operator's entries are not summed"
    load = sizing.system_load()
    assert round(load.manifests.cpu * 1000) == cpu_m
    assert load.manifests.memory == memory
    # Every such container has no request of either kind here, so requests.json adds its entries whole.
    assert round(load.requests_json.cpu * 1000) == sum(
        round(sizing.parse_cpu(e["cpu"]) * 1000) for e in entries.values()
    )
    assert load.requests_json.memory == sum(sizing.parse_memory(e["memory"]) for e in entries.values())
    assert sorted(key for key, _ in load.explicit) == sorted(entries)
    assert load.total == load.manifests + load.requests_json + load.daemonsets + load.cluster_pods


@pytest.mark.integration
def test_every_container_without_requests_needs_an_entry(tmp_path: Path) -> None:
    # A re-render that adds a container without requests: the sizing (and so this test file) fails, naming it.
    manifests = tmp_path / "manifests"
    shutil.copytree(MODULE / "manifests", manifests, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    render = manifests / "kfp" / "rendered.yaml"
    render.write_text(render.read_text() + _pod("Deployment", "new-sidecar-thing", _c("agent")))
    workloads = sizing.vendored_workloads(manifests)
    with pytest.raises(sizing.SizingError, match=r"kfp/Deployment/new-sidecar-thing/agent") as failure:
        sizing.system_load(workloads, requests=sizing.load_explicit_requests())
    assert "requests.json" in str(failure.value)


def test_request_entries_parse_and_say_on_what_they_rest() -> None:
    entries = sizing.load_explicit_requests()
    assert entries, "requests.json is empty"
    raw = json.loads((MODULE / "requests.json").read_text())["containers"]
    for key, entry in entries.items():
        assert set(raw[key]) == {"cpu", "memory", "basis"}, key  # the structure the Terraform reads
        assert entry.cpu > 0 and entry.memory > 0, key
        # A basis cites its source (an issue, a repository path or commit) or says it is an estimate.
        assert entry.basis.startswith("estimate:") or any(mark in entry.basis for mark in ("#", "@", "/")), key


@pytest.mark.integration
def test_kube_system_figures_name_a_source_or_say_they_are_estimates() -> None:
    for pod in (*sizing.GKE_DAEMONSETS, *sizing.GKE_CLUSTER_PODS):
        assert pod.source in sizing.SOURCES or (not pod.source and pod.estimate), pod.name
    # The per-node figure the sizing (and the training pools' capacity check) uses holds the itemized DaemonSets.
    itemized = sizing.Resources.total(p.requests for p in sizing.GKE_DAEMONSETS)
    assert itemized.cpu <= DAEMONSET_CPU and itemized.memory <= DAEMONSET_MEMORY
    assert sizing.system_load().daemonsets == sizing.Resources(DAEMONSET_CPU, DAEMONSET_MEMORY)


def test_every_priced_machine_without_gpus_has_a_size() -> None:
    names = [name for name, _ in sizing.candidate_machine_types(PRICES)]
    assert names and set(names) <= set(MACHINE_TYPES)
    for name in names:
        entry = PRICES["machines"][name]
        machine = MACHINE_TYPES[name]
        assert machine.memory_bytes == entry["memory_gb"] * 1024**3, name
        # prices.json counts e2-medium's sustained vCPU (1); Kubernetes sees its 2 (shared-core).
        assert machine.vcpus == (2 if name == "e2-medium" else entry["vcpus"]), name


@pytest.mark.integration
def test_a_price_change_that_makes_another_type_right_moves_the_answer() -> None:
    prices = json.loads(json.dumps(PRICES))
    current = sizing.cheapest_fitting(sizing.system_load(), prices).machine_type
    # Make a bigger type that also fits the cheapest: the answer follows, and the guard above would fail.
    prices["machines"]["e2-highmem-4"]["on_demand"] = prices["machines"][current]["on_demand"] / 2
    assert sizing.cheapest_fitting(sizing.system_load(), prices).machine_type == "e2-highmem-4"


# ---------------------------------------------------------------------------------------------------------------
# The summation, by hand
# ---------------------------------------------------------------------------------------------------------------


def test_quantities() -> None:
    assert sizing.parse_cpu("250m") == 0.25
    assert sizing.parse_cpu("1") == 1.0 and sizing.parse_cpu(2) == 2.0 and sizing.parse_cpu("0.5") == 0.5
    assert sizing.parse_memory("500Mi") == 500 * MIB
    assert sizing.parse_memory("1Gi") == 1024 * MIB
    assert sizing.parse_memory("10M") == 10_000_000 and sizing.parse_memory("1k") == 1000
    assert sizing.parse_memory("128974848") == 128974848
    with pytest.raises(sizing.SizingError):
        sizing.parse_cpu("lots")


def _pod(kind: str, name: str, containers: str, init: str = "", replicas: int | None = None) -> str:
    spec = f"replicas: {replicas}\n  " if replicas is not None else ""
    init_block = f"\n      initContainers:\n{init}" if init else ""
    return f"""
apiVersion: apps/v1
kind: {kind}
metadata: {{name: {name}, namespace: ns}}
spec:
  {spec}template:
    spec:
      containers:
{containers}{init_block}
---"""


def _c(name: str, cpu: str | None = None, memory: str | None = None, sidecar: bool = False) -> str:
    requests = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
    body: dict[str, Any] = {"name": name}
    if requests:
        body["resources"] = {"requests": requests}
    if sidecar:
        body["restartPolicy"] = "Always"
    return f"      - {json.dumps(body)}\n"


def test_init_containers_count_as_the_max_not_the_sum() -> None:
    # App containers 100m + 200m = 300m, 64Mi + 64Mi = 128Mi. Init containers 500m/32Mi and 50m/256Mi run one at a
    # time: CPU max(300m, 500m, 50m) = 500m, memory max(128Mi, 32Mi, 256Mi) = 256Mi (the sum would be 550m/288Mi).
    text = _pod(
        "Deployment",
        "web",
        _c("a", "100m", "64Mi") + _c("b", "200m", "64Mi"),
        init=_c("migrate", "500m", "32Mi") + _c("fetch", "50m", "256Mi"),
    )
    (w,) = sizing.read_workloads(text)
    assert (w.pod.cpu, w.pod.memory) == (pytest.approx(0.5), 256 * MIB)
    # And when the app containers are the larger, they decide.
    (w2,) = sizing.read_workloads(_pod("Deployment", "w", _c("a", "1", "1Gi"), init=_c("i", "500m", "512Mi")))
    assert (w2.pod.cpu, w2.pod.memory) == (1.0, 1024 * MIB)


def test_sidecar_init_containers_add_to_the_app_containers() -> None:
    # A restartable init container (sidecar, 50m/100Mi) runs beside the app (200m/200Mi): 250m/300Mi. An ordinary
    # init container after it (300m/10Mi) peaks at 50m + 300m = 350m while the app has not started.
    init = _c("proxy", "50m", "100Mi", sidecar=True) + _c("setup", "300m", "10Mi")
    (w,) = sizing.read_workloads(_pod("Deployment", "w", _c("app", "200m", "200Mi"), init=init))
    assert w.pod.cpu == pytest.approx(0.35) and w.pod.memory == 300 * MIB


def test_replicas_and_daemonsets() -> None:
    text = (
        _pod("Deployment", "three", _c("a", "100m", "100Mi"), replicas=3)
        + _pod("StatefulSet", "db", _c("a", "250m", "1Gi"))  # replicas unset: 1
        + _pod("DaemonSet", "agent", _c("a", "10m", "20Mi"))  # once per node: once on the one system node
    )
    load = sizing.system_load(sizing.read_workloads(text), cluster_pods=(), daemonsets=sizing.Resources())
    # 3 x 100m + 250m + 10m = 560m; 3 x 100Mi + 1024Mi + 20Mi = 1344Mi.
    assert load.manifests.cpu == pytest.approx(0.56) and load.manifests.memory == 1344 * MIB
    assert load.explicit == () and load.patched == load.manifests


def _entry(key: str, cpu: str, memory: str) -> Any:
    return sizing.ExplicitRequest(key, sizing.parse_cpu(cpu), sizing.parse_memory(memory), "estimate: a test")


def test_explicit_requests_fill_the_containers_that_declare_none() -> None:
    text = _pod("Deployment", "ctl", _c("manager") + _c("half", cpu="100m"), replicas=2) + _pod(
        "Deployment", "db", _c("server", "250m", "1Gi")
    )
    workloads = sizing.read_workloads(text, "kfp")
    requests = {
        "kfp/Deployment/ctl/manager": _entry("kfp/Deployment/ctl/manager", "10m", "64Mi"),
        "kfp/Deployment/ctl/half": _entry("kfp/Deployment/ctl/half", "20m", "32Mi"),
    }
    load = sizing.system_load(workloads, cluster_pods=(), daemonsets=sizing.Resources(), requests=requests)
    # The scheduler counts the unset ones as 0: 2 x 100m of `half` and the db, 250m / 1Gi.
    assert load.manifests == sizing.Resources(0.45, 1024 * MIB)
    # Patched, per replica: manager 10m/64Mi + half 20m/32Mi (its own 100m replaced by the entry, as the kustomize
    # patch replaces it): 30m/96Mi x 2 = 60m/192Mi, so requests.json adds 60m - 200m = -140m and 192 MiB.
    assert load.patched == sizing.Resources(0.31, 1216 * MIB)
    assert load.requests_json.cpu == pytest.approx(-0.14) and load.requests_json.memory == 192 * MIB
    assert [key for key, _ in load.explicit] == [
        "kfp/Deployment/ctl/manager",
        "kfp/Deployment/ctl/manager",
        "kfp/Deployment/ctl/half",
        "kfp/Deployment/ctl/half",
    ]
    assert load.total == load.patched


def test_stale_or_overriding_entries_are_refused() -> None:
    workloads = sizing.read_workloads(_pod("Deployment", "db", _c("server", "250m", "1Gi")), "kfp")
    gone = {"kfp/Deployment/renamed/server": _entry("kfp/Deployment/renamed/server", "10m", "64Mi")}
    with pytest.raises(sizing.SizingError, match="renamed/server match"):
        sizing.patched_workloads(workloads, gone)
    declared = {"kfp/Deployment/db/server": _entry("kfp/Deployment/db/server", "10m", "64Mi")}
    with pytest.raises(sizing.SizingError, match="declares its own requests"):
        sizing.patched_workloads(workloads, declared)


def test_malformed_request_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "requests.json"
    path.write_text(json.dumps({"containers": {"kfp/Deployment/x/y": {"cpu": "10m", "memory": "64Mi"}}}))
    with pytest.raises(sizing.SizingError, match="lacks basis"):
        sizing.load_explicit_requests(path)
    path.write_text(json.dumps({"containers": {"x/y": {"cpu": "10m", "memory": "64Mi", "basis": "b"}}}))
    with pytest.raises(sizing.SizingError, match="<kustomization>/<Kind>/<name>/<container>"):
        sizing.load_explicit_requests(path)


def test_headroom_decides_at_the_boundary() -> None:
    cpu, memory = sizing.node_allocatable("e2-standard-4").cpu, sizing.node_allocatable("e2-standard-4").memory
    # e2-standard-4: 4 - (0.06 + 0.01 + 2 x 0.005) = 3.92 cores; 16 GiB - (1 + 0.8 + 0.8) GiB - 100 MiB.
    assert cpu == pytest.approx(3.92)
    assert memory == pytest.approx((16 * 1024 - 2.6 * 1024 - 100) * MIB, abs=1)
    exactly = sizing.Resources(cpu / 1.1, int(memory / 1.2))
    assert sizing.fit(exactly, "e2-standard-4").fits
    assert not sizing.fit(sizing.Resources(cpu / 1.1 + 0.01, 0), "e2-standard-4").fits
    assert not sizing.fit(sizing.Resources(0, int(memory / 1.2) + MIB), "e2-standard-4").fits


def test_shared_core_machines_keep_their_own_cpu_reservation() -> None:
    # GKE keeps 1060m of e2-medium's 2 vCPUs: 940m allocatable, not the 1.93 cores of the tiered formula.
    assert sizing.node_allocatable("e2-medium").cpu == pytest.approx(0.94)
    assert sizing.node_allocatable("e2-standard-2").cpu == pytest.approx(1.93)
    with pytest.raises(sizing.SizingError, match="MACHINE_TYPES"):
        sizing.node_allocatable("c4-standard-2")


@pytest.mark.integration
def test_the_report_runs() -> None:
    text = sizing.render_text(sizing.system_load(), PRICES)
    assert "Cheapest that fits:" in text and "metadata-grpc-deployment/container" in text


@pytest.mark.integration
def test_the_readme_states_the_current_sums() -> None:
    # infra/README.md's "Sizing the system node" is written by hand: its figures must follow a re-render.
    load = sizing.system_load()
    text = (INFRA / "README.md").read_text()
    default = _default(INFRA / "variables.tf", "system_machine_type")
    for figure in (
        f"**{round(load.manifests.cpu * 1000)}m CPU, {load.manifests.memory // MIB} MiB**",
        f"**{round(load.requests_json.cpu * 1000)}m, {load.requests_json.memory // MIB} MiB**",
        f"**{round(load.kube_system.cpu * 1000)}m, {load.kube_system.memory // MIB} MiB**",
        f"**Total {round(load.total.cpu * 1000)}m CPU, {load.total.memory // MIB} MiB**",
        f"**{default}**",
    ):
        assert figure in text, f"infra/README.md (Sizing the system node) should say {figure}"
