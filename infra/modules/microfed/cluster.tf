# GKE Standard: the node pools (node_pools.tf) are separate resources, so GKE's default pool is removed right
# after creation.

resource "google_container_cluster" "this" {
  #checkov:skip=CKV_GCP_66:Binary Authorization only adds protection with a signed-image policy covering every image the cluster runs (GKE, KFP, Argo, Training Operator, ours); with the default allow-all policy it would enforce nothing.
  #checkov:skip=CKV_GCP_65:Google Groups for RBAC needs a Google Workspace or Cloud Identity domain with a gke-security-groups group, which a standalone project may not have; access is granted through IAM instead.
  name     = var.name
  project  = var.project_id
  location = local.cluster_location

  network         = google_compute_network.this.id
  subnetwork      = google_compute_subnetwork.this.id
  networking_mode = "VPC_NATIVE"

  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  # GKE cannot create a cluster without a node pool: it creates a default pool from initial_node_count and
  # node_config, then Terraform deletes it. Its settings matter only for those minutes, but they must not depend on
  # the Compute Engine default service account (which hardened projects disable) and are as locked down as the
  # real pools'.
  remove_default_node_pool = true
  initial_node_count       = 1

  node_config {
    machine_type    = "e2-medium"
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    metadata = {
      disable-legacy-endpoints = "true"
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  deletion_protection = var.deletion_protection

  release_channel {
    channel = var.release_channel
  }

  # Pods authenticate to Google APIs as Google service accounts bound to their Kubernetes service account
  # (iam.tf binds pipeline-runner), never with node credentials.
  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  enable_shielded_nodes       = true
  enable_legacy_abac          = false
  enable_intranode_visibility = true

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  # NetworkPolicy enforcement (Calico); the addon must be on for the node-side setting to take effect.
  network_policy {
    enabled  = true
    provider = "CALICO"
  }

  addons_config {
    network_policy_config {
      disabled = false
    }
  }

  # The node pools' own autoscalers do the scaling; this block picks the profile they share. OPTIMIZE_UTILIZATION
  # removes unneeded nodes sooner than BALANCED, which matters when an idle GPU node costs by the hour. Node
  # auto-provisioning stays off: every pool is declared, with the taints the PyTorchJob builder expects.
  cluster_autoscaling {
    enabled             = false
    autoscaling_profile = "OPTIMIZE_UTILIZATION"
  }

  dynamic "private_cluster_config" {
    for_each = var.enable_private_nodes ? [1] : []
    content {
      enable_private_nodes    = true
      enable_private_endpoint = false
      master_ipv4_cidr_block  = var.master_ipv4_cidr_block
    }
  }

  # GKE's DNS-based control-plane endpoint, beside the IP one: requests reach the API server through Google's front
  # end after an IAM check (container.clusters.connect, in roles/container.admin), whatever their source address.
  # Terraform talks to the cluster through it (the caller configures the kubectl provider from the output
  # cluster_dns_endpoint, as infra/providers.tf does), so changing master_authorized_networks, or running from
  # another network, cannot break the refresh of the ~100 Kubeflow objects in the state.
  control_plane_endpoints_config {
    dns_endpoint_config {
      allow_external_traffic = true
    }
  }

  master_authorized_networks_config {
    gcp_public_cidrs_access_enabled = var.allow_google_cloud_ips

    dynamic "cidr_blocks" {
      for_each = var.master_authorized_networks
      content {
        cidr_block   = cidr_blocks.value.cidr_block
        display_name = cidr_blocks.value.display_name
      }
    }
  }

  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }

  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]
  }

  resource_labels = local.labels

  timeouts {
    create = "45m"
    update = "45m"
  }

  lifecycle {
    # The default pool is deleted after creation: never diff against its settings (a change would recreate the
    # cluster).
    ignore_changes = [node_config, initial_node_count]

    precondition {
      condition     = var.regional_cluster || startswith(var.zone, "${var.region}-")
      error_message = "zone ${var.zone} is not in region ${var.region}."
    }
  }

  depends_on = [google_project_service.apis, google_project_iam_member.nodes]
}
