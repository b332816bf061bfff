# The smallest useful call: a zonal cluster in europe-west4-a with the T4 pool plus an L4 pool, reachable from the
# networks in master_authorized_networks. Copy terraform.tfvars.example to terraform.tfvars, fill it in, then
# terraform init && terraform apply.
#
# The module (infra/modules/microfed/) configures no provider: as in terraform-google-modules' examples, the caller
# configures google, kubectl (through the cluster's DNS-based endpoint, from the module's output) and kustomization
# (render-only), and the module inherits them. So the call may also use count, for_each or depends_on.

locals {
  region = "europe-west4"
}

provider "google" {
  project = var.project_id
  region  = local.region
}

# Your own credentials (gcloud auth application-default login) also authenticate to the cluster.
data "google_client_config" "current" {}

# The DNS-based endpoint is authorised by IAM and presents a publicly trusted certificate: no CA, no kubeconfig.
provider "kubectl" {
  host             = "https://${module.microfed.cluster_dns_endpoint}"
  token            = data.google_client_config.current.access_token
  load_config_file = false
  # The cluster is created by this same apply: build the client when it is first used, not at plan time.
  lazy_load         = true
  apply_retry_count = 5
}

# Only renders the module's vendored kustomizations; the provider still needs exactly one kubeconfig setting, so it
# gets a fixed one whose server (.invalid) is never contacted (see infra/providers.tf).
provider "kustomization" {
  context = "render-only"
  kubeconfig_raw = yamlencode({
    apiVersion        = "v1"
    kind              = "Config"
    clusters          = [{ name = "render-only", cluster = { server = "https://render-only.invalid" } }]
    users             = [{ name = "render-only", user = {} }]
    contexts          = [{ name = "render-only", context = { cluster = "render-only", user = "render-only" } }]
    "current-context" = "render-only"
  })
}

module "microfed" {
  source = "../../modules/microfed"

  project_id                 = var.project_id
  region                     = local.region
  zone                       = "europe-west4-a"
  master_authorized_networks = var.master_authorized_networks
  gpu_types                  = ["nvidia-tesla-t4", "nvidia-l4"]

  # A sandbox: let terraform destroy remove everything in one go.
  deletion_protection  = false
  bucket_force_destroy = true
}

variable "project_id" {
  description = "Google Cloud project to create the cluster in."
  type        = string
}

variable "master_authorized_networks" {
  description = "Networks allowed to reach the Kubernetes API, for example your public IP as a /32."
  type = list(object({
    cidr_block   = string
    display_name = string
  }))
}

output "get_credentials_command" {
  description = "Writes kubectl credentials for the new cluster."
  value       = module.microfed.get_credentials_command
}

output "image_repository" {
  description = "Where to push the microfed image."
  value       = module.microfed.image_repository
}

output "pipeline_root" {
  description = "KFP's default pipeline root (the bucket)."
  value       = module.microfed.pipeline_root
}

output "kfp_ui_port_forward_command" {
  description = "Forwards the Kubeflow Pipelines UI to http://localhost:8080."
  value       = module.microfed.kfp_ui_port_forward_command
}
