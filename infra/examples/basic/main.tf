# The smallest useful call: a zonal cluster in europe-west4-a with the T4 pool plus an L4 pool, reachable from the
# networks in master_authorized_networks. Copy terraform.tfvars.example to terraform.tfvars, fill it in, then
# terraform init && terraform apply.
#
# infra/ configures its own providers (so it can also be applied directly), which makes it a module that cannot be
# called with count, for_each or depends_on.

module "microfed" {
  source = "../.."

  project_id                 = var.project_id
  region                     = "europe-west4"
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
