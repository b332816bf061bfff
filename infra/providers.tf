provider "google" {
  project = var.project_id
  region  = var.region
}

# The caller's own credentials (gcloud auth application-default login) also authenticate to the cluster.
data "google_client_config" "current" {}

provider "kubectl" {
  host                   = "https://${google_container_cluster.this.endpoint}"
  token                  = data.google_client_config.current.access_token
  cluster_ca_certificate = base64decode(google_container_cluster.this.master_auth[0].cluster_ca_certificate)
  load_config_file       = false
  # The cluster is created by this same apply: build the client when it is first used, not at plan time.
  lazy_load = true
  # CRDs become usable a few seconds after they are created; custom resources applied right after them retry.
  apply_retry_count = 5
}

# Only renders kustomizations (data sources); with no kubeconfig it never contacts a cluster.
provider "kustomization" {}
