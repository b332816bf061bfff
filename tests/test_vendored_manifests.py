"""The Kubeflow manifests vendored under infra/modules/microfed/manifests/, and how infra/ uses them.

`terraform plan` must read nothing from GitHub: the module's kubeflow.tf builds the rendered files of its manifests/
folder (written by manifests/render.py from pinned upstream commits, recorded in SOURCES.json). These tests read only
files of this repository: the digests and pins, that no .tf file names a remote source, the install order (CRDs,
then the rest, then admission webhooks, as kbst/kustomization's ids_prio splits them), the Kubeflow UI's bucket
identity, and which Deployments are applied without waiting for their rollout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from functools import cache
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.test_infra import INFRA, MODULE, ROOT, all_tf_files, infra, resolve

pytestmark = pytest.mark.unit

MANIFESTS = MODULE / "manifests"
SOURCES: dict[str, Any] = json.loads((MANIFESTS / "SOURCES.json").read_text())
# kubectl_manifest keys are "<kustomization>:<id>"; kubeflow.tf names the kustomizations after these data sources.
OVERLAYS = {
    "kfp-cluster": "kfp_cluster_scoped",
    "kfp": "kfp",
    "training-operator": "training_operator",
    "trainer-v2": "trainer_v2",
    "trainer-v2-runtimes": "trainer_v2_runtimes",
}
FOLDERS = {
    "kfp_cluster_scoped": "kfp-cluster-scoped",
    "kfp": "kfp",
    "training_operator": "training-operator",
    "trainer_v2": "trainer-v2",
    "trainer_v2_runtimes": "trainer-v2-runtimes",
}
# The namespace each folder's namespaced objects land in: KFP's, except Kubeflow Trainer v2's own (its
# overlays/manager installs into kubeflow-system, as the trainer's docs install it).
TRAINER_NAMESPACE = "kubeflow-system"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the Training Operator's CRDs are 3.7 MB of YAML


@cache
def render_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("microfed_render_manifests", MANIFESTS / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@cache
def objects(folder: str) -> list[dict[str, Any]]:
    text = (MANIFESTS / folder / "rendered.yaml").read_text()
    return [doc for doc in yaml.load_all(text, Loader=_LOADER) if doc]


def provider_id(obj: dict[str, Any]) -> str:
    """kbst/kustomization's id of an object: <group>/<Kind>/<namespace>/<name>, "_" for an empty part
    (kustomize/manifest.go, kManifestId.string, at v0.9.8)."""
    group = obj["apiVersion"].rpartition("/")[0] or "_"
    return f"{group}/{obj['kind']}/{obj['metadata'].get('namespace') or '_'}/{obj['metadata']['name']}"


def priority(kind: str) -> int:
    """ids_prio's index of a kind: 0 Namespace and CustomResourceDefinition, 2 admission webhooks, 1 the rest
    (kbst/kustomization v0.9.8, kustomize/data_source_kustomization.go determinePrefix and
    structures_kustomization.go flattenKustomizationIDs, which match by prefix)."""
    if kind.startswith(("Namespace", "CustomResourceDefinition")):
        return 0
    if kind.startswith(("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")):
        return 2
    return 1


def target(patch: dict[str, Any]) -> dict[str, Any]:
    """A patch's target, written as a nested block (python-hcl2 gives a list of one) or, before that fix, a map."""
    found = patch["target"]
    return resolve(found[0] if isinstance(found, list) else found)


# ---------------------------------------------------------------------------------------------------------------
# Pins and digests
# ---------------------------------------------------------------------------------------------------------------


def _ref(entry: dict[str, Any]) -> str:
    return f"{entry['repo']}@{entry['tag']}"


def test_sources_pin_every_upstream_by_tag_and_commit() -> None:
    script = render_script()
    recorded = {_ref(u): u for u in SOURCES["upstreams"]}
    assert len(recorded) == len(SOURCES["upstreams"]) == len(script.UPSTREAMS), "one entry per repository and tag"
    assert set(recorded) == {
        "kubeflow/pipelines@2.14.3",
        "kubeflow/trainer@v1.9.4",
        "kubeflow/trainer@v2.3.0",
        "kubernetes-sigs/jobset@v0.12.0",
        "argoproj/argo-workflows@v3.6.7",
    }
    for upstream in script.UPSTREAMS:
        entry = recorded[upstream.ref]
        assert (entry["tag"], entry["commit"], tuple(entry["paths"])) == (upstream.tag, upstream.commit, upstream.paths)
        assert re.fullmatch(r"[0-9a-f]{40}", entry["commit"]), entry
        assert entry["url"] == f"https://github.com/{upstream.repo}"
    # The v1 Training Operator: the PyTorchJob API the builder targets (tests/schemas/, kubeflow-training 1.9 SDK).
    trainer_tags = sorted(u["tag"] for u in SOURCES["upstreams"] if u["repo"] == "kubeflow/trainer")
    assert len(trainer_tags) == 2 and re.fullmatch(r"v1\.9\.\d+", trainer_tags[0])
    # Trainer v2: the release whose TrainJob CRD tests/schemas/ vendors (tests/schemas/TRAINER.md).
    schemas = (ROOT / "tests" / "schemas" / "TRAINER.md").read_text()
    v2 = recorded["kubeflow/trainer@v2.3.0"]
    assert f"tag `{v2['tag']}`" in schemas and v2["commit"] in schemas
    assert "JobSet v0.12.0" in schemas, "the JobSet release the trainer installs is the one vendored here"
    assert SOURCES["renderer"]["kustomize"].startswith("v5.")


def test_rewrites_of_remote_bases_are_recorded() -> None:
    script = render_script()
    expected = [
        {"file": f"{rw.upstream}:{rw.file}", "from": rw.remote, "to": f"{rw.target}:{rw.path}"}
        | ({"note": rw.note} if rw.note else {})
        for rw in script.REWRITES
    ]
    assert SOURCES["rewrites"] == expected
    refs = {_ref(u) for u in SOURCES["upstreams"]}
    for rewrite in SOURCES["rewrites"]:
        source, target = rewrite["file"].split(":")[0], rewrite["to"].split(":")[0]
        assert {source, target} <= refs, rewrite
        # The URL and the upstream extracted in its place name the same tag: a kustomize ?ref= or a release asset.
        tag = target.split("@")[1]
        assert rewrite["from"].endswith(f"?ref={tag}") or f"/releases/download/{tag}/" in rewrite["from"], rewrite
        # A release asset (a built file) is replaced by the kustomization it is built from: the note says why.
        assert ("?ref=" in rewrite["from"]) != bool(rewrite.get("note")), rewrite
    jobset = [r for r in SOURCES["rewrites"] if r["to"].startswith("kubernetes-sigs/jobset@")]
    assert [r["file"] for r in jobset] == ["kubeflow/trainer@v2.3.0:manifests/third-party/jobset/kustomization.yaml"]


def test_vendored_files_match_their_digests() -> None:
    script = render_script()
    names = [r.name for r in script.RENDERS]
    assert set(SOURCES["manifests"]) == set(names) == set(FOLDERS.values())
    folders = {p.name for p in MANIFESTS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(names), "infra/modules/microfed/manifests/ holds only the rendered folders"
    for name, entry in SOURCES["manifests"].items():
        files = {p.name for p in (MANIFESTS / name).iterdir()}
        assert files == set(entry["sha256"]) == {"kustomization.yaml", "rendered.yaml"}, name
        for file, digest in entry["sha256"].items():
            actual = hashlib.sha256((MANIFESTS / name / file).read_bytes()).hexdigest()
            assert actual == digest, (
                f"infra/modules/microfed/manifests/{name}/{file} changed: re-render with render.py, do not edit"
            )
        assert len(objects(name)) == entry["objects"], name
        render = next(r for r in script.RENDERS if r.name == name)
        assert (_ref(entry), entry["path"]) == (render.upstream, render.path)
        assert any(_ref(u) == render.upstream for u in SOURCES["upstreams"]), name
    # Kubeflow Trainer v2 as its docs install it (docs/operator-guides/installation.md at v2.3.0): the controller
    # manager with JobSet, then the runtimes.
    assert SOURCES["manifests"]["trainer-v2"]["path"] == "manifests/overlays/manager"
    assert SOURCES["manifests"]["trainer-v2-runtimes"]["path"] == "manifests/overlays/runtimes"
    assert SOURCES["manifests"]["training-operator"]["path"] == "manifests/overlays/standalone"


@pytest.mark.parametrize("folder", sorted(FOLDERS.values()))
def test_each_vendored_kustomization_lists_only_its_rendered_file(folder: str) -> None:
    kustomization = yaml.safe_load((MANIFESTS / folder / "kustomization.yaml").read_text())
    assert kustomization == {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["rendered.yaml"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Plans read nothing remote
# ---------------------------------------------------------------------------------------------------------------

# URLs a .tf file may hold: none of them is fetched by Terraform or kustomize.
_ALLOWED_URLS = (
    "https://www.googleapis.com/auth/",  # OAuth scopes of the node pools
    "https://${module.microfed.cluster_dns_endpoint}",
    # the cluster's API server through its DNS-based endpoint (the kubectl provider of infra/ and of the example)
    "http://localhost",  # the port-forward an output describes
)


def test_no_tf_file_names_a_remote_source() -> None:
    files = all_tf_files()
    assert any(p.name == "kubeflow.tf" for p in files)
    for path in files:
        text = path.read_text()
        for pattern in ("github.com", "?ref=", "git::", "git@", "raw.githubusercontent"):
            assert pattern not in text, f"{path.relative_to(INFRA)} names a remote source ({pattern})"
        for url in re.findall(r"https?://[^\s\"']+", text):
            host = re.sub(r"^https?://", "", url).split("/")[0]
            # .invalid never resolves (RFC 2606): the kustomization provider's placeholder kubeconfig server
            assert url.startswith(_ALLOWED_URLS) or host.endswith(".invalid"), f"{path.relative_to(INFRA)}: {url}"
    cfg = infra()
    assert {kind for kind, _ in cfg.data} <= {"kustomization_overlay", "google_client_config"}, "a remote data source?"


def test_kustomizations_build_the_vendored_folders() -> None:
    overlays = {name: body for (kind, name), body in infra().data.items() if kind == "kustomization_overlay"}
    assert set(overlays) == set(FOLDERS)
    for name, body in overlays.items():
        assert body["resources"] == [f"${{path.module}}/manifests/{FOLDERS[name]}"], name
        assert (MANIFESTS / FOLDERS[name] / "kustomization.yaml").is_file()
    assert set(OVERLAYS.values()) == set(FOLDERS)
    for source, overlay in OVERLAYS.items():
        assert f"{source} = data.kustomization_overlay.{overlay}" in infra().locals["kustomizations"]


def test_kubeflow_versions_come_from_the_vendored_sources() -> None:
    cfg = infra()
    assert not {"kfp_version", "training_operator_version"} & set(cfg.variables), "versions live in render.py"
    assert cfg.locals["vendored_sources"] == '${jsondecode(file("${path.module}/manifests/SOURCES.json"))}'
    assert "local.installed_releases" in cfg.outputs["kubeflow_versions"]["value"]
    assert "local.vendored_sources.manifests" in cfg.locals["installed_folder_releases"]
    assert "local.vendored_sources.rewrites" in cfg.locals["installed_releases"]


# ---------------------------------------------------------------------------------------------------------------
# Install order: CRDs, then everything else, then admission webhooks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", sorted(FOLDERS.values()))
def test_rendered_objects_keep_the_install_order(folder: str) -> None:
    order = [priority(obj["kind"]) for obj in objects(folder)]
    assert order == sorted(order), f"{folder}: kustomize's output is no longer CRDs -> resources -> webhooks"
    ids = [provider_id(obj) for obj in objects(folder)]
    assert len(ids) == len(set(ids)), f"{folder}: two objects share a kbst id"


def test_custom_resources_follow_their_definitions() -> None:
    defined = set()
    every = [obj for folder in FOLDERS.values() for obj in objects(folder)]
    for obj in every:
        if obj["kind"] == "CustomResourceDefinition":
            defined.add((obj["spec"]["group"], obj["spec"]["names"]["kind"]))
    assert ("kubeflow.org", "PyTorchJob") in defined
    assert {("trainer.kubeflow.org", "TrainJob"), ("jobset.x-k8s.io", "JobSet")} <= defined
    for obj in every:
        group = obj["apiVersion"].rpartition("/")[0]
        if (group, obj["kind"]) in defined:
            assert priority(obj["kind"]) > 0, provider_id(obj)


def test_terraform_applies_the_priorities_in_order() -> None:
    cfg = infra()
    assert "for priority in [0, 1, 2]" in cfg.locals["manifests"]
    assert "overlay.ids_prio[priority]" in cfg.locals["manifests"]
    manifests = cfg.of_type("kubectl_manifest")
    assert manifests["crds"]["for_each"] == "${local.manifests[0]}"
    assert manifests["resources"]["for_each"] == "${local.manifests[1]}"
    assert manifests["webhooks"]["for_each"] == "${local.manifests[2]}"
    assert "${kubectl_manifest.crds}" in manifests["resources"]["depends_on"]
    assert "${kubectl_manifest.resources}" in manifests["webhooks"]["depends_on"]
    # KFP's cluster-scoped resources and the Training Operator v1 declare the KFP namespace; Terraform creates it
    # once, before the CRDs, and leaves it out of what it applies. Trainer v2's own namespace is applied with the
    # CRDs (priority 0), before the objects in it (priority 1).
    assert 'if id != "_/Namespace/_/${local.kfp_namespace}"' in cfg.locals["manifests"]
    assert "${kubectl_manifest.namespace}" in manifests["crds"]["depends_on"]
    kfp_namespace = f"_/Namespace/_/{resolve('${local.kfp_namespace}')}"
    namespaces = {(f, provider_id(o)) for f in FOLDERS.values() for o in objects(f) if o["kind"] == "Namespace"}
    assert namespaces == {
        ("kfp-cluster-scoped", kfp_namespace),
        ("training-operator", kfp_namespace),
        ("trainer-v2", f"_/Namespace/_/{TRAINER_NAMESPACE}"),
    }
    assert all(priority(o["kind"]) == 0 for o in objects("trainer-v2") if o["kind"] == "Namespace")


@pytest.mark.parametrize("folder", sorted(FOLDERS.values()))
def test_every_namespaced_object_lands_in_the_namespace_of_its_folder(folder: str) -> None:
    namespace = TRAINER_NAMESPACE if folder.startswith("trainer-v2") else resolve("${local.kfp_namespace}")
    for obj in objects(folder):
        assert obj["metadata"].get("namespace", namespace) == namespace, provider_id(obj)


# ---------------------------------------------------------------------------------------------------------------
# Patches, the UI's identity, rollouts
# ---------------------------------------------------------------------------------------------------------------


def find(folder: str, kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects(folder) if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name} is not in infra/modules/microfed/manifests/{folder}"
    return found[0]


def test_every_patch_targets_a_vendored_object() -> None:
    for (kind, name), body in infra().data.items():
        if kind != "kustomization_overlay":
            continue
        for patch in body.get("patches", []):
            t = target(patch)
            find(FOLDERS[name], t["kind"], t["name"])


def test_the_ui_service_account_reads_the_pipeline_bucket() -> None:
    cfg = infra()
    ksa = resolve("${local.ui_ksa}")
    namespace = resolve("${local.kfp_namespace}")
    ui = find("kfp", "Deployment", "ml-pipeline-ui")
    assert ui["spec"]["template"]["spec"]["serviceAccountName"] == ksa == "ml-pipeline-ui"
    find("kfp", "ServiceAccount", ksa)

    # The annotation: a patch of that ServiceAccount naming the UI Google service account.
    patches = [p for p in cfg.data["kustomization_overlay", "kfp"]["patches"] if target(p)["name"] == ksa]
    assert len(patches) == 1
    assert target(patches[0])["kind"] == "ServiceAccount"
    assert isinstance(patches[0]["target"], list), "write target as a nested block: target { ... }"
    assert '"iam.gke.io/gcp-service-account" = local.ui_gsa_email' in patches[0]["patch"]
    assert cfg.resources["google_service_account", "ui"]["account_id"] == "${local.ui_gsa_id}"
    assert cfg.locals["ui_gsa_email"] == "${local.ui_gsa_id}@${var.project_id}.iam.gserviceaccount.com"
    # account_id: 6-30 characters for every allowed `name` (3-20 characters).
    assert len(cfg.locals["ui_gsa_id"].replace("${var.name}", "abc")) >= 6
    assert len(cfg.locals["ui_gsa_id"].replace("${var.name}", "a" * 20)) <= 30

    # Workload Identity: ml-pipeline-ui may act as the UI account ...
    binding = cfg.resources["google_service_account_iam_member", "ui_workload_identity"]
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    assert binding["service_account_id"] == "${google_service_account.ui.name}"
    member = binding["member"].replace("${local.kfp_namespace}", namespace).replace("${local.ui_ksa}", ksa)
    assert member == "serviceAccount:${var.project_id}.svc.id.goog[kubeflow/ml-pipeline-ui]"
    assert "${google_container_cluster.this}" in binding["depends_on"]
    # ... which reads the objects of the pipeline bucket, and nothing else.
    gsa = "serviceAccount:${google_service_account.ui.email}"
    grants = [(rtype, g) for (rtype, _), g in cfg.resources.items() if rtype.endswith(("_iam_member", "_iam_binding"))]
    mine = [(rtype, g) for rtype, g in grants if g.get("member") == gsa or gsa in g.get("members", [])]
    assert [(rtype, g["role"], g["bucket"]) for rtype, g in mine] == [
        ("google_storage_bucket_iam_member", "roles/storage.objectViewer", "${google_storage_bucket.pipelines.name}")
    ]
    # The KFP objects are applied once the binding exists, so the UI's first artifact read is authorised.
    depends = cfg.resources["kubectl_manifest", "resources"]["depends_on"]
    assert "${google_service_account_iam_member.ui_workload_identity}" in depends


def _mounted_secrets(deployment: dict[str, Any]) -> set[str]:
    pod = deployment["spec"]["template"]["spec"]
    return {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}


def test_rollout_waits_skip_only_deployments_that_wait_on_runtime_objects() -> None:
    cfg = infra()
    resources = cfg.of_type("kubectl_manifest")["resources"]
    assert resources["wait_for_rollout"] == "${!contains(local.unwaited_rollouts, each.key)}"
    unwaited = set(re.findall(r'"([^"]+)"', cfg.locals["unwaited_rollouts"]))
    assert unwaited == {
        "kfp:apps/Deployment/kubeflow/cache-server",
        "kfp:apps/Deployment/kubeflow/cache-deployer-deployment",
    }
    keys = {f"{source}:{provider_id(o)}" for source, d in OVERLAYS.items() for o in objects(FOLDERS[d])}
    assert unwaited <= keys, "every unwaited rollout names a vendored Deployment, as kubeflow.tf keys it"
    # cache-server mounts a Secret that no vendored manifest declares (cache-deployer creates it at run time):
    # waiting for it could fail the apply. Every other Deployment's Secrets are applied with it.
    declared = {o["metadata"]["name"] for f in FOLDERS.values() for o in objects(f) if o["kind"] == "Secret"}
    for source, overlay in OVERLAYS.items():
        for obj in objects(FOLDERS[overlay]):
            if obj["kind"] == "Deployment" and _mounted_secrets(obj) - declared:
                assert f"{source}:{provider_id(obj)}" in unwaited, provider_id(obj)
    assert _mounted_secrets(find("kfp", "Deployment", "cache-server")) == {"webhook-server-tls"}
    assert "webhook-server-tls" not in declared


# ---------------------------------------------------------------------------------------------------------------
# Kubeflow Trainer v2 (training_operator = "trainer-v2")
# ---------------------------------------------------------------------------------------------------------------


def test_trainer_v2_runs_the_pinned_images() -> None:
    # The trainer's overlays/manager sets its controller's tag; its third-party/jobset renames JobSet's image to the
    # release's (the rewrite's note in SOURCES.json: config/default names the staging registry's image).
    images = {
        d["metadata"]["name"]: [c["image"] for c in d["spec"]["template"]["spec"]["containers"]]
        for d in objects("trainer-v2")
        if d["kind"] == "Deployment"
    }
    assert images == {
        "kubeflow-trainer-controller-manager": ["ghcr.io/kubeflow/trainer/trainer-controller-manager:v2.3.0"],
        "jobset-controller-manager": ["registry.k8s.io/jobset/jobset:v0.12.0"],
    }
    public = find("trainer-v2", "ConfigMap", "kubeflow-trainer-public")
    assert public["data"] == {"kubeflow_trainer_version": "v2.3.0"}


def test_the_torch_distributed_runtime_is_the_one_the_tests_render_against() -> None:
    # tests/schemas/torch_distributed.yaml (the stand-in's runtime, tests/schemas/TRAINER.md) is the vendored
    # runtime's spec; overlays/runtimes only adds the label that exempts built-in runtimes from the webhook.
    runtime = find("trainer-v2-runtimes", "ClusterTrainingRuntime", "torch-distributed")
    schema = yaml.safe_load((ROOT / "tests" / "schemas" / "torch_distributed.yaml").read_text())
    assert runtime["spec"] == schema["spec"]
    assert runtime["metadata"]["labels"] == {
        **schema["metadata"]["labels"],
        "trainer.kubeflow.org/webhook-validation": "disabled",
    }
    # The TrainJob CRD the tests validate against is the one installed.
    crd = find("trainer-v2", "CustomResourceDefinition", "trainjobs.trainer.kubeflow.org")
    vendored = yaml.safe_load((ROOT / "tests" / "schemas" / "trainer.kubeflow.org_trainjobs.yaml").read_text())
    assert crd["spec"] == vendored["spec"]
