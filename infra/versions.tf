# Terraform 1.9 is the first release whose variable validations may refer to other variables and locals: the
# GPU types are checked against training/cluster.json and the zone against the region.
terraform {
  required_version = ">= 1.9"

  required_providers {
    # Each provider is pinned to the one version whose schema infra/schemas/ holds: `make test` checks every block
    # of infra/ against it (infra/schema_check.py). Moving a version: change it here, in modules/microfed/versions.tf
    # and in examples/basic/versions.tf, run `python infra/schemas/regenerate.py`, fix what the check then reports.
    google = {
      source  = "hashicorp/google"
      version = "= 7.46.1"
    }
    # Applies the Kubeflow manifests with server-side apply (the Training Operator's CRDs are too large for the
    # last-applied annotation of a client-side apply). 2.4.0 added `lazy_load`, which lets the provider be
    # configured from a cluster created in the same apply; 2.4.1 only updates dependencies (CVE fixes).
    kubectl = {
      source  = "alekc/kubectl"
      version = "= 2.4.1"
    }
    # Builds the vendored Kubeflow manifests (manifests/) with our patches (kustomize build); it never talks to
    # the cluster.
    kustomization = {
      source  = "kbst/kustomization"
      version = "= 0.9.8"
    }
  }
}
