"""infra/: the Google APIs and roles `terraform apply` needs, enabled or documented before they are used."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_infra import INFRA, _parse, infra

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[1] / "infra" / "README.md"


def apis() -> list[str]:
    """The services in the module's main.tf `apis` local (written `toset([...])`, which the parser keeps as text)."""
    found = re.findall(r'"([a-z]+\.googleapis\.com)"', infra().locals["apis"])
    assert found, "no APIs found in locals.apis: did main.tf change shape?"
    return found


def test_project_iam_waits_for_the_resource_manager_api() -> None:
    # google_project_iam_member reads and sets the project's IAM policy through cloudresourcemanager.googleapis.com;
    # on a new project that API is off, and the member would be created before the API that serves it
    assert "cloudresourcemanager.googleapis.com" in apis()
    for name, member in infra().of_type("google_project_iam_member").items():
        assert "${google_project_service.apis}" in member.get("depends_on", []), name


def test_the_readme_lists_every_api_apply_enables_and_the_roles_it_needs() -> None:
    text = README.read_text()
    for api in apis():
        assert f"`{api.removesuffix('.googleapis.com')}`" in text, api
    # actAs on the node service account: without it a non-Owner cannot create the cluster or its pools
    for role in ("roles/iam.serviceAccountUser", "roles/container.admin", "roles/resourcemanager.projectIamAdmin"):
        assert f"`{role}`" in text, role
    assert re.search(r"serviceAccountUser.*actAs", text)


def test_terraform_reaches_the_cluster_through_the_dns_endpoint_not_the_authorized_networks() -> None:
    # After a change of master_authorized_networks (or from another network) a plan must still refresh the Kubeflow
    # objects: the kubectl provider talks to the DNS-based endpoint, which IAM guards instead of source addresses.
    (cluster,) = infra().of_type("google_container_cluster").values()
    (endpoints,) = cluster["control_plane_endpoints_config"]
    assert endpoints["dns_endpoint_config"][0]["allow_external_traffic"] is True
    # The module configures no provider: its output carries the endpoint to the root's (and the example's) kubectl
    # provider.
    output = infra().outputs["cluster_dns_endpoint"]["value"]
    assert output.endswith(".dns_endpoint_config[0].endpoint}")
    for path in (INFRA / "providers.tf", INFRA / "examples" / "basic" / "main.tf"):
        providers = [p for block in _parse(path).get("provider", []) for p in [block]]
        (kubectl,) = [p["kubectl"] for p in providers if "kubectl" in p]
        assert kubectl["host"] == "https://${module.microfed.cluster_dns_endpoint}", path.name
        assert "cluster_ca_certificate" not in kubectl  # the front end's certificate is publicly trusted


def test_autopilot_needs_no_other_api_or_role() -> None:
    # An Autopilot cluster is created through the same container API with the same node service account (actAs
    # already listed); the module enables the same APIs whatever the mode, and the README says so.
    assert "mode" not in infra().locals["apis"] and "autopilot" not in infra().locals["apis"]
    text = README.read_text()
    assert '`mode = "autopilot"` needs no other role and no other API' in text
