# Two Google service accounts, each with the least it needs:
#   nodes      the node VMs: GKE's node role (logs, metrics) and image pulls from our repository.
#   pipelines  the pipeline's pods through Workload Identity: objects of our bucket, pulls from our repository.
# No role is granted at project level except GKE's node role, and none is editor or owner.

resource "google_service_account" "nodes" {
  project      = var.project_id
  account_id   = "${var.name}-nodes"
  display_name = "microfed GKE nodes"

  depends_on = [google_project_service.apis]
}

resource "google_project_iam_member" "nodes" {
  project = var.project_id
  role    = "roles/container.defaultNodeServiceAccount"
  member  = "serviceAccount:${google_service_account.nodes.email}"

  # setIamPolicy on the project is a Cloud Resource Manager call: that API must be on first
  depends_on = [google_project_service.apis]
}

# The kubelet pulls images with the node's identity, not the pod's.
resource "google_artifact_registry_repository_iam_member" "nodes_reader" {
  project    = var.project_id
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_service_account" "pipelines" {
  project      = var.project_id
  account_id   = local.pipeline_gsa_id
  display_name = "microfed pipelines (KFP pipeline-runner)"

  depends_on = [google_project_service.apis]
}

# Read, write and delete objects in the pipeline bucket only.
resource "google_storage_bucket_iam_member" "pipelines_objects" {
  bucket = google_storage_bucket.pipelines.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.pipelines.email}"
}

# Bucket metadata of that bucket only: storage.exists("gs://BUCKET") asks whether the bucket itself exists.
resource "google_storage_bucket_iam_member" "pipelines_bucket_reader" {
  bucket = google_storage_bucket.pipelines.name
  role   = "roles/storage.legacyBucketReader"
  member = "serviceAccount:${google_service_account.pipelines.email}"
}

resource "google_artifact_registry_repository_iam_member" "pipelines_reader" {
  project    = var.project_id
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.pipelines.email}"
}

# Workload Identity: the KFP pipeline-runner Kubernetes service account (annotated in kubeflow.tf) may act as the
# pipelines Google service account. The workload pool exists once the cluster does.
resource "google_service_account_iam_member" "pipeline_runner_workload_identity" {
  service_account_id = google_service_account.pipelines.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${local.kfp_namespace}/${local.pipeline_runner_ksa}]"

  depends_on = [google_container_cluster.this]
}
