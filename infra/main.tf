# The configuration users apply (`cd infra && terraform init && terraform apply`): it configures the providers
# (providers.tf) and calls the module that holds everything else, modules/microfed/, with every variable of this
# directory. The module has no provider blocks of its own, so it can also be called from another configuration
# (examples/basic/ shows how), with count, for_each or depends_on. moved.tf carries a state created before the
# split (when these resources were declared here) into the module instead of destroying it.

locals {
  # The variables' validations (variables.tf, the same as the module's) check the GPU types against the node
  # contract shared with the PyTorchJob builder.
  contract = jsondecode(file("${path.module}/../training/cluster.json"))
}

module "microfed" {
  source = "./modules/microfed"

  project_id                 = var.project_id
  region                     = var.region
  zone                       = var.zone
  regional_cluster           = var.regional_cluster
  mode                       = var.mode
  name                       = var.name
  labels                     = var.labels
  enable_apis                = var.enable_apis
  subnet_cidr                = var.subnet_cidr
  pods_cidr                  = var.pods_cidr
  services_cidr              = var.services_cidr
  release_channel            = var.release_channel
  deletion_protection        = var.deletion_protection
  enable_private_nodes       = var.enable_private_nodes
  master_ipv4_cidr_block     = var.master_ipv4_cidr_block
  master_authorized_networks = var.master_authorized_networks
  allow_google_cloud_ips     = var.allow_google_cloud_ips
  system_machine_type        = var.system_machine_type
  system_min_nodes           = var.system_min_nodes
  system_max_nodes           = var.system_max_nodes
  cpu_machine_type           = var.cpu_machine_type
  cpu_max_nodes              = var.cpu_max_nodes
  gpu_types                  = var.gpu_types
  gpu_machine_types          = var.gpu_machine_types
  gpu_max_nodes              = var.gpu_max_nodes
  gpu_node_locations         = var.gpu_node_locations
  gpu_driver_version         = var.gpu_driver_version
  training_spot              = var.training_spot
  training_disk_size_gb      = var.training_disk_size_gb
  bucket_name                = var.bucket_name
  bucket_force_destroy       = var.bucket_force_destroy
  artifact_retention_days    = var.artifact_retention_days
  noncurrent_retention_days  = var.noncurrent_retention_days
  repository_id              = var.repository_id
  training_operator          = var.training_operator
}
