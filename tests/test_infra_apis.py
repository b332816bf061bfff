"""infra/: the Google APIs and roles `terraform apply` needs, enabled or documented before they are used."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_infra import infra

README = Path(__file__).resolve().parents[1] / "infra" / "README.md"


def apis() -> list[str]:
    """The services in main.tf's `apis` local (written `toset([...])`, which the parser keeps as text)."""
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
