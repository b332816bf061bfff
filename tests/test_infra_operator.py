"""infra/ with either value of `training_operator`: Kubeflow Trainer v2 (`trainer-v2`, the default) or the Training
Operator v1 (`training-operator-v1`).

Terraform itself evaluates the module's expressions here (`terraform console`, through tests/test_infra_autopilot.py's
`console`, which needs no provider): the variable's validation, which kustomizations are installed, the objects
`local.manifests` hands to kubectl_manifest (with each kustomization_overlay data source replaced by a stand-in built
from the vendored rendered.yaml: the ids kbst/kustomization would give each object, split by its priorities), the
launcher's RBAC documents, the `microfed-cluster` ConfigMap's `training_operator` and the `kubeflow_versions` output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_infra import MODULE, infra
from tests.test_infra_autopilot import TerraformError, console, module_locals
from tests.test_vendored_manifests import OVERLAYS, objects, priority, provider_id

pytestmark = pytest.mark.integration

OPERATORS = ("trainer-v2", "training-operator-v1")
TRAINJOB_CRD = "apiextensions.k8s.io/CustomResourceDefinition/_/trainjobs.trainer.kubeflow.org"
RUNTIME_CRD = "apiextensions.k8s.io/CustomResourceDefinition/_/clustertrainingruntimes.trainer.kubeflow.org"
JOBSET_CRD = "apiextensions.k8s.io/CustomResourceDefinition/_/jobsets.jobset.x-k8s.io"
PYTORCHJOB_CRD = "apiextensions.k8s.io/CustomResourceDefinition/_/pytorchjobs.kubeflow.org"
TORCH_RUNTIME = "trainer.kubeflow.org/ClusterTrainingRuntime/_/torch-distributed"


def _stand_in(folder: str, tmp: Path) -> Path:
    """What data.kustomization_overlay.<folder>'s ids_prio and manifests hold, as far as local.manifests reads them:
    every object's id in its priority list, and the id as the manifest (the JSON body does not matter here)."""
    ids_prio: list[list[str]] = [[], [], []]
    for obj in objects(folder):
        ids_prio[priority(obj["kind"])].append(provider_id(obj))
    path = tmp / f"{folder}.json"
    path.write_text(json.dumps({"ids_prio": ids_prio, "manifests": {i: i for ids in ids_prio for i in ids}}))
    return path


def applied(operator: str, tmp_path: Path) -> list[dict[str, str]]:
    """local.manifests for `training_operator = operator`: [priority 0, 1, 2] of {"<kustomization>:<id>": ...}."""
    kustomizations = module_locals()["kustomizations"][2:-1]
    for source, overlay in OVERLAYS.items():
        reference = f"data.kustomization_overlay.{overlay}"
        assert reference in kustomizations, reference
        folder = resolve_folder(source)
        kustomizations = re.sub(
            rf"{re.escape(reference)}\b", f'jsondecode(file("{_stand_in(folder, tmp_path)}"))', kustomizations
        )
    expression = module_locals()["manifests"][2:-1].replace("local.kustomizations", f"({kustomizations})")
    result: list[dict[str, str]] = console(expression, tmp_path, training_operator=operator)
    return result


def resolve_folder(source: str) -> str:
    folders = {k: v.strip('"') for k, v in module_locals()["kustomization_folders"].items()}
    return folders[source]


# ---------------------------------------------------------------------------------------------------------------
# The variable
# ---------------------------------------------------------------------------------------------------------------


def test_the_variable_defaults_to_trainer_v2_and_is_validated(tmp_path: Path) -> None:
    assert infra().variables["training_operator"]["default"] == "trainer-v2"
    assert console("var.training_operator", tmp_path) == "trainer-v2"
    assert console("var.training_operator", tmp_path, training_operator="training-operator-v1") == (
        "training-operator-v1"
    )
    with pytest.raises(TerraformError, match="training_operator must be trainer-v2 or training-operator-v1"):
        console("var.training_operator", tmp_path, training_operator="pytorchjob")


@pytest.mark.parametrize(
    ("operator", "expected"),
    [
        ("trainer-v2", ["kfp-cluster", "kfp", "trainer-v2", "trainer-v2-runtimes"]),
        ("training-operator-v1", ["kfp-cluster", "kfp", "training-operator"]),
    ],
)
def test_each_value_installs_kfp_and_one_operator(operator: str, expected: list[str], tmp_path: Path) -> None:
    assert console("local.installed_kustomizations", tmp_path, training_operator=operator) == expected


# ---------------------------------------------------------------------------------------------------------------
# What kubectl_manifest applies
# ---------------------------------------------------------------------------------------------------------------


def _ids(manifests: dict[str, str]) -> set[str]:
    return {key.split(":", 1)[1] for key in manifests}


def test_trainer_v2_installs_trainjob_jobset_and_the_torch_runtime(tmp_path: Path) -> None:
    crds, resources, webhooks = applied("trainer-v2", tmp_path)
    assert {TRAINJOB_CRD, RUNTIME_CRD, JOBSET_CRD} <= _ids(crds)
    # None of the Training Operator v1's job CRDs (pytorchjobs, tfjobs, mpijobs, ... .kubeflow.org); KFP's own
    # kubeflow.org CRDs (scheduledworkflows, viewers) stay.
    assert PYTORCHJOB_CRD not in _ids(crds)
    assert not [key for key in crds if key.endswith("jobs.kubeflow.org")]
    assert f"trainer-v2-runtimes:{TORCH_RUNTIME}" in resources
    assert "trainer-v2:apps/Deployment/kubeflow-system/kubeflow-trainer-controller-manager" in resources
    assert "trainer-v2:apps/Deployment/kubeflow-system/jobset-controller-manager" in resources
    assert not [key for key in (*crds, *resources, *webhooks) if key.startswith("training-operator:")]
    # Trainer v2's namespace is applied with the CRDs, before the objects in it; the KFP namespace is not (it is
    # kubectl_manifest.namespace).
    assert "trainer-v2:_/Namespace/_/kubeflow-system" in crds
    assert not [key for key in crds if key.endswith("/Namespace/_/kubeflow")]
    assert {k.split(":", 1)[1].split("/")[1] for k in webhooks} == {
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    }
    assert (
        "trainer-v2:admissionregistration.k8s.io/ValidatingWebhookConfiguration/_/validator.trainer.kubeflow.org"
        in (webhooks)
    )


def test_training_operator_v1_installs_pytorchjob_and_no_trainer(tmp_path: Path) -> None:
    crds, resources, webhooks = applied("training-operator-v1", tmp_path)
    assert PYTORCHJOB_CRD in _ids(crds)
    assert not {TRAINJOB_CRD, RUNTIME_CRD, JOBSET_CRD} & _ids(crds)
    assert "training-operator:apps/Deployment/kubeflow/training-operator" in resources
    assert not [key for key in (*crds, *resources, *webhooks) if key.startswith("trainer-v2")]
    assert not [key for key in (*crds, *resources) if "/Namespace/" in key]


def test_kfp_is_the_same_with_either_operator(tmp_path: Path) -> None:
    by_operator = [applied(operator, tmp_path) for operator in OPERATORS]
    kfp = [
        [{k for k in group if k.split(":", 1)[0] in ("kfp", "kfp-cluster")} for group in manifests]
        for manifests in by_operator
    ]
    assert kfp[0] == kfp[1]
    assert "kfp:apps/Deployment/kubeflow/ml-pipeline" in kfp[0][1]


# ---------------------------------------------------------------------------------------------------------------
# The launcher's RBAC, the ConfigMap, the versions output
# ---------------------------------------------------------------------------------------------------------------


def _granted(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def rbac(operator: str, tmp_path: Path) -> dict[str, dict[str, Any]]:
    documents = console("local.rbac_documents", tmp_path, training_operator=operator)
    docs = {d["kind"]: d for d in map(yaml.safe_load, documents)}
    assert set(docs) == {"Role", "RoleBinding"}
    binding = docs["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert docs["Role"]["metadata"]["namespace"] == binding["metadata"]["namespace"] == "kubeflow"
    return docs


def test_trainer_v2_launcher_may_run_trainjobs_and_read_their_jobsets(tmp_path: Path) -> None:
    docs = rbac("trainer-v2", tmp_path)
    assert docs["Role"]["metadata"]["name"] == "microfed-trainjob-launcher"
    assert _granted(docs["Role"]) == {
        ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch", "delete"},
        ("jobset.x-k8s.io", "jobsets"): {"get", "list"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"get", "list"},
        # microfed-cluster and each TrainJob's <name>-runtime-snapshot, whose names RBAC cannot list in advance
        ("", "configmaps"): {"get"},
    }


def test_training_operator_v1_launcher_keeps_its_role(tmp_path: Path) -> None:
    docs = rbac("training-operator-v1", tmp_path)
    assert docs["Role"]["metadata"]["name"] == "microfed-pytorchjob-launcher"
    granted = _granted(docs["Role"])
    assert granted[("kubeflow.org", "pytorchjobs")] == {"create", "get", "list", "watch", "delete", "patch"}
    assert not [group for group, _ in granted if group in ("trainer.kubeflow.org", "jobset.x-k8s.io")]
    # The same file as before the variable existed: rbac.yaml, unchanged in name.
    assert (MODULE / "rbac.yaml").is_file()


@pytest.mark.parametrize("operator", OPERATORS)
def test_the_configmap_says_which_operator_is_installed(operator: str, tmp_path: Path) -> None:
    body = infra().resources["kubectl_manifest", "cluster_info"]["yaml_body"]
    manifest = console(f"yamldecode({body[2:-1]})", tmp_path, training_operator=operator)
    info = json.loads(manifest["data"]["cluster.json"])
    assert info["training_operator"] == operator
    assert infra().outputs["training_operator"]["value"] == "${var.training_operator}"


@pytest.mark.parametrize(
    ("operator", "expected"),
    [
        (
            "trainer-v2",
            {
                "kubeflow/pipelines": "2.14.3",
                "argoproj/argo-workflows": "v3.6.7",
                "kubeflow/trainer": "v2.3.0",
                "kubernetes-sigs/jobset": "v0.12.0",
            },
        ),
        (
            "training-operator-v1",
            {"kubeflow/pipelines": "2.14.3", "argoproj/argo-workflows": "v3.6.7", "kubeflow/trainer": "v1.9.4"},
        ),
    ],
)
def test_kubeflow_versions_name_what_is_installed(operator: str, expected: dict[str, str], tmp_path: Path) -> None:
    value = infra().outputs["kubeflow_versions"]["value"]
    assert console(value[2:-1], tmp_path, training_operator=operator) == expected
