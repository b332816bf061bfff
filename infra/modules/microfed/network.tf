# A dedicated VPC with one subnet. The secondary ranges make the cluster VPC-native (Pod and Service IPs are alias
# IPs of the subnet); Cloud NAT gives private nodes outbound access (image pulls from ghcr.io, pip, datasets).

resource "google_compute_network" "this" {
  #checkov:skip=CKV2_GCP_18:GKE creates and maintains the firewall rules the cluster needs on this network (control plane to nodes, node to node); all other ingress meets the VPC's implied deny rule.
  project                 = var.project_id
  name                    = var.name
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"

  depends_on = [google_project_service.apis]
}

resource "google_compute_subnetwork" "this" {
  project       = var.project_id
  name          = "${var.name}-nodes"
  region        = var.region
  network       = google_compute_network.this.id
  ip_cidr_range = var.subnet_cidr

  # Private nodes reach Google APIs (GCS, Artifact Registry) without external IPs.
  private_ip_google_access = true

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = var.pods_cidr
  }

  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = var.services_cidr
  }

  # Sampled flow logs: enough to debug connectivity, cheap at this cluster's traffic.
  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.1
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_router" "this" {
  project = var.project_id
  name    = "${var.name}-router"
  region  = var.region
  network = google_compute_network.this.id
}

resource "google_compute_router_nat" "this" {
  project                            = var.project_id
  name                               = "${var.name}-nat"
  router                             = google_compute_router.this.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}
