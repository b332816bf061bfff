# Three kinds of pool, on GKE Standard only:
#   system     always on (min >= 1), untainted: kube-system, Kubeflow Pipelines, the Training Operator, step pods.
#   training   CPU, and one pool per GPU type; autoscaled from 0, tainted so only PyTorchJob replicas (which
#              tolerate the taint and select the pool by label, see training/pytorchjob.py) land there.
# Labels and taints come from training/cluster.json through local.contract (main.tf).
#
# With mode = "autopilot" there is no pool at all (count 0, an empty for_each): GKE creates nodes for the pods it
# is given, and the train step asks for Spot or GPU nodes with node selectors of its own, read from the
# microfed-cluster ConfigMap (kubeflow.tf). moved.tf carries the pools of a state from before `count` existed to
# their [0] instances.

locals {
  node_scopes = ["https://www.googleapis.com/auth/cloud-platform"]
  # Declared because GKE sets it anyway; leaving it out of `metadata` would make Terraform try to unset it.
  node_metadata = {
    disable-legacy-endpoints = "true"
  }
  # Spot capacity is wherever it is: ANY lets the autoscaler take it from any zone of the pool.
  training_location_policy = var.training_spot ? "ANY" : "BALANCED"
}

resource "google_container_node_pool" "system" {
  count = local.autopilot ? 0 : 1

  name     = "system"
  project  = var.project_id
  location = local.cluster_location
  cluster  = google_container_cluster.this.name

  initial_node_count = var.system_min_nodes

  autoscaling {
    min_node_count = var.system_min_nodes
    max_node_count = var.system_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  upgrade_settings {
    max_surge       = 1
    max_unavailable = 0
  }

  node_config {
    machine_type    = var.system_machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = 50
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_scopes
    metadata        = local.node_metadata
    resource_labels = local.labels
    labels = {
      (local.contract.pool_label_key) = "system"
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  lifecycle {
    # The autoscaler owns the size after creation.
    ignore_changes = [initial_node_count]
  }
}

resource "google_container_node_pool" "training_cpu" {
  count = local.autopilot ? 0 : 1

  name     = local.contract.cpu_pool
  project  = var.project_id
  location = local.cluster_location
  cluster  = google_container_cluster.this.name

  # Scale to zero: no node until a replica is pending, none once the autoscaler finds them unneeded.
  initial_node_count = 0

  autoscaling {
    total_min_node_count = 0
    total_max_node_count = var.cpu_max_nodes
    location_policy      = local.training_location_policy
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.cpu_machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = var.training_disk_size_gb
    spot            = var.training_spot
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_scopes
    metadata        = local.node_metadata
    resource_labels = local.labels
    labels = {
      (local.contract.pool_label_key) = local.contract.cpu_pool
    }

    taint {
      key    = local.training_taint.key
      value  = local.training_taint.value
      effect = local.training_taint.effect
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  # Created after the system pool: GKE decides at creation whether a pool is the cluster's only one.
  depends_on = [google_container_node_pool.system]
}

resource "google_container_node_pool" "training_gpu" {
  for_each = local.autopilot ? toset([]) : toset(var.gpu_types)

  name           = local.contract.gpu_pools[each.key]
  project        = var.project_id
  location       = local.cluster_location
  cluster        = google_container_cluster.this.name
  node_locations = length(var.gpu_node_locations) > 0 ? var.gpu_node_locations : null

  initial_node_count = 0

  autoscaling {
    total_min_node_count = 0
    total_max_node_count = var.gpu_max_nodes
    location_policy      = local.training_location_policy
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = local.gpu_machine_types[each.key]
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = var.training_disk_size_gb
    spot            = var.training_spot
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_scopes
    metadata        = local.node_metadata
    resource_labels = local.labels
    # GKE adds the accelerator label (local.contract.gpu_label_key = cloud.google.com/gke-accelerator) with the
    # value of guest_accelerator.type by itself; labels under cloud.google.com/ are GKE's and may not be set here.
    labels = {
      (local.contract.pool_label_key) = local.contract.gpu_pools[each.key]
    }

    guest_accelerator {
      type  = each.key
      count = local.gpus_per_node

      # GKE installs the NVIDIA driver; no driver DaemonSet to manage.
      gpu_driver_installation_config {
        gpu_driver_version = var.gpu_driver_version
      }
    }

    taint {
      key    = local.training_taint.key
      value  = local.training_taint.value
      effect = local.training_taint.effect
    }

    taint {
      key    = local.gpu_taint.key
      value  = local.gpu_taint.value
      effect = local.gpu_taint.effect
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  depends_on = [google_container_node_pool.system]
}
