# One cluster resource for both modes (variable mode, local.autopilot in main.tf).
#   standard   GKE Standard: the node pools (node_pools.tf) are separate resources, so GKE's default pool is removed
#              right after creation.
#   autopilot  GKE Autopilot: GKE creates, sizes and secures the nodes from the pods' requests; no pool is declared.
#
# What Autopilot refuses is left out (null, or a dynamic block with no instance) rather than set to false: in the
# pinned provider, google_container_cluster declares ConflictsWith = ["enable_autopilot"] on network_policy,
# addons_config.network_policy_config, enable_shielded_nodes, enable_intranode_visibility, remove_default_node_pool,
# default_max_pods_per_node, node_pool and cluster_autoscaling.enabled / .resource_limits
# (hashicorp/terraform-provider-google v7.45.0, the closest tag to the pinned 7.46.1 that the source mirror holds,
# google/services/container/resource_container_cluster.go, ResourceContainerCluster). The SDK reports a conflict
# whenever both keys have a non-null value, false included (hashicorp/terraform-plugin-sdk v2.40.1, the version that
# provider's go.mod requires, helper/schema/schema.go, validateConflictingAttributes). So enable_autopilot itself is
# null, not false, on Standard, or the Standard settings above would conflict with it.
#
# Neither mode is less locked down than the other: private nodes behind Cloud NAT, the DNS-based endpoint, the
# authorized networks, Workload Identity, the node service account and logging/monitoring are the same; Autopilot
# enforces shielded nodes, Dataplane V2 network policy and the GKE metadata server itself (see each setting below).
# Changing mode replaces the cluster: enable_autopilot is ForceNew in the provider (same file, same function).

resource "google_container_cluster" "this" {
  #checkov:skip=CKV_GCP_66:Binary Authorization only adds protection with a signed-image policy covering every image the cluster runs (GKE, KFP, Argo, Training Operator, ours); with the default allow-all policy it would enforce nothing.
  #checkov:skip=CKV_GCP_65:Google Groups for RBAC needs a Google Workspace or Cloud Identity domain with a gke-security-groups group, which a standalone project may not have; access is granted through IAM instead.
  name     = var.name
  project  = var.project_id
  location = local.cluster_location

  enable_autopilot = local.autopilot ? true : null

  network         = google_compute_network.this.id
  subnetwork      = google_compute_subnetwork.this.id
  networking_mode = "VPC_NATIVE"

  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  # Standard only. GKE cannot create a Standard cluster without a node pool: it creates a default pool from
  # initial_node_count and node_config, then Terraform deletes it. Its settings matter only for those minutes, but
  # they must not depend on the Compute Engine default service account (which hardened projects disable) and are as
  # locked down as the real pools'. An Autopilot cluster has no pool to remove (remove_default_node_pool conflicts
  # with enable_autopilot) and takes its node settings from cluster_autoscaling below.
  remove_default_node_pool = local.autopilot ? null : true
  initial_node_count       = local.autopilot ? null : 1

  dynamic "node_config" {
    for_each = local.autopilot ? [] : [1]
    content {
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
  }

  deletion_protection = var.deletion_protection

  release_channel {
    channel = var.release_channel
  }

  # Pods authenticate to Google APIs as Google service accounts bound to their Kubernetes service account
  # (iam.tf binds pipeline-runner), never with node credentials. Set in both modes: on Autopilot, Workload Identity
  # Federation for GKE is always enabled (GKE docs, "Authenticate to Google Cloud APIs from GKE workloads"; the
  # links are in infra/README.md, Standard or Autopilot), with this same project pool; the provider's own acceptance
  # test sets it on an Autopilot cluster (resource_container_cluster_test.go at v7.45.0,
  # testAccContainerCluster_withWorkloadIdentityConfigEnabledAutopilot).
  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  # Autopilot nodes are always Shielded GKE Nodes, and the provider's CustomizeDiff sets enable_intranode_visibility
  # to true for an Autopilot cluster (resource_container_cluster.go, containerClusterAutopilotCustomizeDiff); both
  # attributes conflict with enable_autopilot, so they are only written for Standard. The provider still sends
  # ShieldedNodes.Enabled = true on Autopilot: enable_shielded_nodes defaults to true and is sent as it is
  # (resourceContainerClusterCreate). These two compare var.mode themselves, not local.autopilot: checkov 3.3.30
  # (make infra-check) cannot resolve a condition read from a boolean local and would then skip its shielded-nodes
  # and intranode-visibility checks (CKV_GCP_71, CKV_GCP_61) without a word.
  enable_shielded_nodes       = var.mode == "autopilot" ? null : true
  enable_legacy_abac          = false
  enable_intranode_visibility = var.mode == "autopilot" ? null : true

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  # Standard: NetworkPolicy enforcement (Calico); the addon must be on for the node-side setting to take effect.
  # Autopilot: GKE Dataplane V2, on by default in every new Autopilot cluster, and in a Dataplane V2 cluster
  # Kubernetes NetworkPolicy is always enforced (GKE docs, "About GKE Dataplane V2"). network_policy and
  # addons_config.network_policy_config conflict with enable_autopilot; datapath_provider = ADVANCED_DATAPATH makes
  # Dataplane V2 explicit rather than a default, as the provider's acceptance test of Autopilot with Cilium policies
  # does (testAccContainerCluster_enableCiliumPolicies_withAutopilot at v7.45.0).
  datapath_provider = local.autopilot ? "ADVANCED_DATAPATH" : null

  dynamic "network_policy" {
    for_each = local.autopilot ? [] : [1]
    content {
      enabled  = true
      provider = "CALICO"
    }
  }

  dynamic "addons_config" {
    for_each = local.autopilot ? [] : [1]
    content {
      network_policy_config {
        disabled = false
      }
    }
  }

  # Standard: the node pools' own autoscalers do the scaling; this block picks the profile they share.
  # OPTIMIZE_UTILIZATION removes unneeded nodes sooner than BALANCED, which matters when an idle GPU node costs by the
  # hour. Node auto-provisioning stays off: every pool is declared, with the taints the PyTorchJob builder expects.
  # Autopilot: `enabled` conflicts with enable_autopilot ("true is implied for autopilot clusters", the provider's
  # docs, website/docs/r/container_cluster.html.markdown at v7.45.0) and the profile is GKE's (its diff is suppressed
  # on Autopilot: suppressDiffForAutopilot), so both are left unset. What remains is the identity of the nodes GKE
  # creates: the same least-privilege service account as the Standard pools (iam.tf), with the cloud-platform scope
  # (IAM decides). Passing them in auto_provisioning_defaults is how the provider sets an Autopilot cluster's node
  # service account (hashicorp/terraform-provider-google#13024, "Allow passing node service_account when autopilot
  # enabled"; acceptance test testAccContainerCluster_withAutopilot at v7.45.0 does exactly this).
  cluster_autoscaling {
    enabled             = local.autopilot ? null : false
    autoscaling_profile = local.autopilot ? null : "OPTIMIZE_UTILIZATION"

    dynamic "auto_provisioning_defaults" {
      for_each = local.autopilot ? [1] : []
      content {
        service_account = google_service_account.nodes.email
        oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
      }
    }
  }

  # Private nodes in both modes; the provider's acceptance test of Autopilot secondary pod ranges creates a private
  # Autopilot cluster with this block (testAccContainerCluster_additional_pod_ranges_config at v7.45.0). Autopilot
  # nodes reach the internet through the same Cloud NAT (network.tf: every subnet range is translated).
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
    # Standard's default pool is deleted after creation: never diff against its settings (a change would recreate
    # the cluster).
    ignore_changes = [node_config, initial_node_count]

    precondition {
      condition     = var.regional_cluster || local.autopilot || startswith(var.zone, "${var.region}-")
      error_message = "zone ${var.zone} is not in region ${var.region}."
    }
  }

  depends_on = [google_project_service.apis, google_project_iam_member.nodes]
}
