# The same pins as infra/versions.tf: each is the one version whose schema infra/schemas/ holds (infra/schema_check.py
# checks this example too). kubectl and kustomization are not hashicorp/ providers, so a configuration that calls
# the module must name their sources here for its provider blocks to configure the ones the module uses.
terraform {
  required_version = ">= 1.9"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "= 7.46.1"
    }
    kubectl = {
      source  = "alekc/kubectl"
      version = "= 2.4.1"
    }
    kustomization = {
      source  = "kbst/kustomization"
      version = "= 0.9.8"
    }
  }
}
