# ---------------------------------------------------------------------------------------------------------------
# Project and location
# ---------------------------------------------------------------------------------------------------------------

variable "project_id" {
  description = "Google Cloud project that holds everything (the cluster, the bucket, the registry, the service accounts)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a project ID (6-30 characters: lowercase letters, digits, hyphens), not its name or number."
  }
}

variable "region" {
  description = "Region of the network, the bucket and the Artifact Registry repository (and of the cluster when regional_cluster is true)."
  type        = string
  default     = "europe-west4"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must look like europe-west4 or us-central1 (a region, not a zone)."
  }
}

variable "zone" {
  description = "Zone of a zonal cluster's control plane and nodes (ignored when regional_cluster is true, and with mode = autopilot, whose clusters are always regional). It must lie in region and offer the GPU types in gpu_types."
  type        = string
  default     = "europe-west4-a"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+-[a-z]$", var.zone)) && startswith(var.zone, "${var.region}-")
    error_message = "zone must be a zone of region (for example europe-west4-a when region is europe-west4)."
  }
}

variable "regional_cluster" {
  description = "Create a regional cluster (control plane and nodes in three zones) instead of a zonal one. Regional costs more: the system pool keeps system_min_nodes nodes in every zone, and GKE's free tier covers one zonal cluster only. With mode = autopilot the cluster is regional whatever this says (GKE creates Autopilot clusters in a region only)."
  type        = bool
  default     = false
}

variable "name" {
  description = "Prefix of every resource name (cluster, network, service accounts, default bucket name)."
  type        = string
  default     = "microfed"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters: lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "labels" {
  description = "Extra Google Cloud labels on the cluster, its nodes, the bucket and the registry (added to app = microfed)."
  type        = map(string)
  default     = {}
}

variable "enable_apis" {
  description = "Enable the Google Cloud APIs this configuration uses (artifactregistry, cloudresourcemanager, compute, container, iam, storage). Turn off when the project's APIs are managed elsewhere."
  type        = bool
  default     = true
}

variable "mode" {
  description = "GKE mode of operation. standard (the default): the node pools declared here, a system node always on, training pools that scale to zero. autopilot: no node pools; GKE creates nodes for the pods it is given and bills their requests, the cluster is regional, and training replicas ask for Spot or GPU nodes through node selectors that the train step sets from the microfed-cluster ConfigMap. Fixed at creation: changing it replaces the cluster (and everything on it)."
  type        = string
  default     = "standard"

  validation {
    condition     = contains(["standard", "autopilot"], var.mode)
    error_message = "mode must be standard or autopilot."
  }
}

# ---------------------------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------------------------

variable "subnet_cidr" {
  description = "Primary range of the cluster subnet (node IPs)."
  type        = string
  default     = "10.10.0.0/20"

  validation {
    condition     = can(cidrnetmask(var.subnet_cidr))
    error_message = "subnet_cidr must be an IPv4 CIDR block such as 10.10.0.0/20."
  }
}

variable "pods_cidr" {
  description = "Secondary range of the subnet for Pod IPs (VPC-native cluster)."
  type        = string
  default     = "10.20.0.0/14"

  validation {
    condition     = can(cidrnetmask(var.pods_cidr))
    error_message = "pods_cidr must be an IPv4 CIDR block such as 10.20.0.0/14."
  }
}

variable "services_cidr" {
  description = "Secondary range of the subnet for Service ClusterIPs."
  type        = string
  default     = "10.24.0.0/20"

  validation {
    condition     = can(cidrnetmask(var.services_cidr))
    error_message = "services_cidr must be an IPv4 CIDR block such as 10.24.0.0/20."
  }
}

# ---------------------------------------------------------------------------------------------------------------
# Cluster
# ---------------------------------------------------------------------------------------------------------------

variable "release_channel" {
  description = "GKE release channel; GKE upgrades the control plane and the nodes along it."
  type        = string
  default     = "REGULAR"

  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE", "EXTENDED"], var.release_channel)
    error_message = "release_channel must be one of RAPID, REGULAR, STABLE, EXTENDED."
  }
}

variable "deletion_protection" {
  description = "Refuse to delete the cluster. Set to false and apply once before terraform destroy."
  type        = bool
  default     = true
}

variable "enable_private_nodes" {
  description = "Give nodes internal IPs only (they reach the internet through Cloud NAT). The control plane keeps a public endpoint restricted to master_authorized_networks."
  type        = bool
  default     = true
}

variable "master_ipv4_cidr_block" {
  description = "The /28 range GKE uses for the control plane's private endpoint when enable_private_nodes is true; it must not overlap the subnet ranges."
  type        = string
  default     = "172.16.0.16/28"

  validation {
    condition     = can(cidrnetmask(var.master_ipv4_cidr_block)) && endswith(var.master_ipv4_cidr_block, "/28")
    error_message = "master_ipv4_cidr_block must be a /28 CIDR block such as 172.16.0.16/28."
  }
}

variable "master_authorized_networks" {
  description = "Networks allowed on the cluster's IP endpoint (kubectl without --dns-endpoint), for example your laptop's public IP as a /32. Terraform itself installs Kubeflow through the DNS-based endpoint, authorised by IAM, so its address need not be listed."
  type = list(object({
    cidr_block   = string
    display_name = string
  }))

  validation {
    condition     = length(var.master_authorized_networks) > 0 && alltrue([for n in var.master_authorized_networks : can(cidrnetmask(n.cidr_block))])
    error_message = "master_authorized_networks needs at least one entry, each with an IPv4 cidr_block (for example {cidr_block = \"203.0.113.7/32\", display_name = \"laptop\"})."
  }
}

variable "allow_google_cloud_ips" {
  description = "Also let Google Cloud public IPs (Cloud Shell, Cloud Build) reach the Kubernetes API. Any Google Cloud customer's VM has such an IP, so this widens access; authentication still applies."
  type        = bool
  default     = false
}

# ---------------------------------------------------------------------------------------------------------------
# Node pools
# ---------------------------------------------------------------------------------------------------------------

variable "system_machine_type" {
  description = "Machine type of the system pool (kube-system, Kubeflow Pipelines, the Training Operator and the pipeline's own step pods). The default is the cheapest priced type whose allocatable holds their summed requests with 10% CPU and 20% memory headroom (infra/cost/sizing.py; tests/test_system_sizing.py keeps it so). Standard only: unused with mode = autopilot, which has no node pools."
  type        = string
  default     = "e2-standard-4"
}

variable "system_min_nodes" {
  description = "Minimum nodes of the system pool (per zone for a regional cluster). At least 1: Kubeflow's control plane lives there. Standard only: unused with mode = autopilot, which has no node pools."
  type        = number
  default     = 1

  validation {
    condition     = var.system_min_nodes >= 1 && floor(var.system_min_nodes) == var.system_min_nodes
    error_message = "system_min_nodes must be a whole number of at least 1."
  }
}

variable "system_max_nodes" {
  description = "Maximum nodes of the system pool (per zone for a regional cluster). Standard only: unused with mode = autopilot, which has no node pools."
  type        = number
  default     = 3

  validation {
    condition     = var.system_max_nodes >= var.system_min_nodes
    error_message = "system_max_nodes must be at least system_min_nodes."
  }
}

variable "cpu_machine_type" {
  description = "Machine type of the CPU training pool (PyTorchJob replicas that need no GPU). Standard only: with mode = autopilot there is no pool; Autopilot sizes a node for each replica's requests, and the train step checks a replica against Autopilot's per-pod maximum instead."
  type        = string
  default     = "e2-standard-8"
}

variable "cpu_max_nodes" {
  description = "Maximum nodes of the CPU training pool, summed over its zones. The pool scales to zero when no replica needs it. Standard only: with mode = autopilot there is no pool; Autopilot sizes a node for each replica's requests, and the train step checks a replica against Autopilot's per-pod maximum instead."
  type        = number
  default     = 8

  validation {
    condition     = var.cpu_max_nodes >= 1 && floor(var.cpu_max_nodes) == var.cpu_max_nodes
    error_message = "cpu_max_nodes must be a whole number of at least 1."
  }
}

variable "gpu_types" {
  description = "Accelerator types (GKE names) that get a training pool with one GPU per node. nvidia-tesla-t4 is always present; add nvidia-l4 and/or nvidia-tesla-a100 (the types training/cluster.json knows). Check that zone (or gpu_node_locations) offers them and that the project has GPU quota. With mode = autopilot: the GPU types the train step may ask Autopilot for (it refuses the others before creating a job)."
  type        = list(string)
  default     = ["nvidia-tesla-t4"]

  validation {
    condition     = contains(var.gpu_types, "nvidia-tesla-t4")
    error_message = "gpu_types must include nvidia-tesla-t4 (the default accelerator of the train step)."
  }

  validation {
    condition     = alltrue([for t in var.gpu_types : contains(keys(local.contract.gpu_pools), t)])
    error_message = "Every entry of gpu_types must be a key of gpu_pools in training/cluster.json (nvidia-tesla-t4, nvidia-l4, nvidia-tesla-a100)."
  }
}

variable "gpu_machine_types" {
  description = "Machine type per accelerator type, overriding the defaults (nvidia-tesla-t4: n1-standard-8, nvidia-l4: g2-standard-8, nvidia-tesla-a100: a2-highgpu-1g). Standard only: with mode = autopilot there is no pool; Autopilot sizes a node for each replica's requests, and the train step checks a replica against Autopilot's per-pod maximum instead."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for t in keys(var.gpu_machine_types) : contains(keys(local.contract.gpu_pools), t)])
    error_message = "gpu_machine_types keys must be accelerator types from training/cluster.json (nvidia-tesla-t4, nvidia-l4, nvidia-tesla-a100)."
  }
}

variable "gpu_max_nodes" {
  description = "Maximum nodes of each GPU training pool, summed over its zones. The pools scale to zero when no replica needs them. Standard only: with mode = autopilot there is no pool; Autopilot sizes a node for each replica's requests, and the train step checks a replica against Autopilot's per-pod maximum instead."
  type        = number
  default     = 4

  validation {
    condition     = var.gpu_max_nodes >= 1 && floor(var.gpu_max_nodes) == var.gpu_max_nodes
    error_message = "gpu_max_nodes must be a whole number of at least 1."
  }
}

variable "gpu_node_locations" {
  description = "Zones of the GPU pools when they differ from the cluster's (for example the zones of a regional cluster that offer the accelerator). Empty: the cluster's zones. Standard only: unused with mode = autopilot, which has no node pools."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for z in var.gpu_node_locations : startswith(z, "${var.region}-")])
    error_message = "gpu_node_locations must be zones of region."
  }

  # Autopilot has no GPU pool to place; GKE picks the zone of a GPU node itself. Refused rather than ignored, so that
  # nobody believes their GPUs are pinned to these zones.
  validation {
    condition     = var.mode != "autopilot" || length(var.gpu_node_locations) == 0
    error_message = "gpu_node_locations places the GPU node pools of mode = standard; with mode = autopilot there are none (GKE chooses the zone of each GPU node): leave gpu_node_locations empty."
  }
}

variable "gpu_driver_version" {
  description = "NVIDIA driver GKE installs on GPU nodes: LATEST or DEFAULT for the node's GKE version. The CUDA 12.8 image (TORCH_VARIANT=cu128) needs a recent driver, hence LATEST. Standard only: unused with mode = autopilot, which has no node pools."
  type        = string
  default     = "LATEST"

  validation {
    condition     = contains(["LATEST", "DEFAULT"], var.gpu_driver_version)
    error_message = "gpu_driver_version must be LATEST or DEFAULT."
  }
}

variable "training_spot" {
  description = "Run training on Spot capacity (60-90% cheaper; GKE may reclaim a node at any time, and the PyTorchJob restarts replicas on preemption). Standard: the training pools are Spot, and the autoscaler uses location_policy ANY to find capacity in any zone. Autopilot: the train step reads this from the microfed-cluster ConfigMap and asks for Spot Pods (node selector cloud.google.com/gke-spot)."
  type        = bool
  default     = true
}

variable "training_disk_size_gb" {
  description = "Boot disk of a training node in GB (the CUDA image alone is several GB). Standard only: unused with mode = autopilot, which has no node pools."
  type        = number
  default     = 100

  validation {
    condition     = var.training_disk_size_gb >= 30
    error_message = "training_disk_size_gb must be at least 30."
  }
}

# ---------------------------------------------------------------------------------------------------------------
# Storage and images
# ---------------------------------------------------------------------------------------------------------------

variable "bucket_name" {
  description = "Name of the bucket for the pipeline root and datasets. Null: <project_id>-<name>-pipelines."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits, hyphens, underscores and dots."
  }
}

variable "bucket_force_destroy" {
  description = "Let terraform destroy delete the bucket with its objects (datasets, every run's artifacts). Off by default so a destroy keeps the data."
  type        = bool
  default     = false
}

variable "artifact_retention_days" {
  description = "Days after which run artifacts under the pipeline root are deleted (datasets under data/ are kept)."
  type        = number
  default     = 30

  validation {
    condition     = var.artifact_retention_days >= 1
    error_message = "artifact_retention_days must be at least 1."
  }
}

variable "noncurrent_retention_days" {
  description = "Days a replaced or deleted object version is kept (versioning) before it is removed for good."
  type        = number
  default     = 7

  validation {
    condition     = var.noncurrent_retention_days >= 1
    error_message = "noncurrent_retention_days must be at least 1."
  }
}

variable "repository_id" {
  description = "ID of the Artifact Registry Docker repository for the microfed image."
  type        = string
  default     = "microfed"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,61}[a-z0-9]$", var.repository_id))
    error_message = "repository_id must be lowercase letters, digits and hyphens, starting with a letter."
  }
}

# ---------------------------------------------------------------------------------------------------------------
# Kubeflow
# ---------------------------------------------------------------------------------------------------------------

variable "training_operator" {
  description = "What runs the train step's distributed jobs, installed from the vendored manifests. trainer-v2 (the default): Kubeflow Trainer v2.3.0 (TrainJob, trainer.kubeflow.org/v1alpha1) with JobSet v0.12.0 and its built-in ClusterTrainingRuntimes, torch-distributed among them, in the kubeflow-system namespace. training-operator-v1: the Kubeflow Training Operator v1.9.4 (PyTorchJob, kubeflow.org/v1) in the KFP namespace. Changing it uninstalls the other, with any job it still runs."
  type        = string
  default     = "trainer-v2"

  validation {
    condition     = contains(["trainer-v2", "training-operator-v1"], var.training_operator)
    error_message = "training_operator must be trainer-v2 or training-operator-v1."
  }
}
