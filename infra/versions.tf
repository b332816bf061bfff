# Terraform 1.9 is the first release whose variable validations may refer to other variables and locals: the
# GPU types are checked against training/cluster.json and the zone against the region.
terraform {
  required_version = ">= 1.9"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 7.0"
    }
    # Applies the Kubeflow manifests with server-side apply (the Training Operator's CRDs are too large for the
    # last-applied annotation of a client-side apply). 2.4.1 added `lazy_load`, which lets the provider be
    # configured from a cluster created in the same apply.
    kubectl = {
      source  = "alekc/kubectl"
      version = ">= 2.4.1, < 3.0.0"
    }
    # Renders the pinned upstream kustomizations (kustomize build, with our patches); it never talks to the
    # cluster.
    kustomization = {
      source  = "kbst/kustomization"
      version = "~> 0.9"
    }
  }
}
