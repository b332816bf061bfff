# The Kubeflow UI's identity: read-only access to the pipeline bucket, so the UI shows the gs:// artifacts under the
# pipeline root (the run report and the metrics among them).
#
# KFP 2.14.3's UI server reads a gs:// artifact with `new Storage(storageOptions)` of @google-cloud/storage, where
# storageOptions stays undefined unless the request names a Kubernetes Secret to read a key from (kubeflow/pipelines
# 2.14.3, frontend/server/handlers/artifacts.ts, getGCSArtifactHandler and parseGCSProviderInfo). Undefined options
# mean Application Default Credentials: on GKE with Workload Identity, the Google service account that the pod's
# Kubernetes service account is annotated with. The UI's pods run as ml-pipeline-ui (the ml-pipeline-ui Deployment
# in manifests/kfp/rendered.yaml); its annotation is a patch in kubeflow.tf. The handler lists the objects under
# the key (bucket.getFiles) and streams them (file.createReadStream): storage.objects.list and storage.objects.get,
# both in roles/storage.objectViewer. The UI only reads artifacts.

locals {
  ui_ksa = "ml-pipeline-ui"
  # Known before apply, like the pipelines account's: the kustomize patch is rendered at plan time.
  ui_gsa_id    = "${var.name}-kfp-ui"
  ui_gsa_email = "${local.ui_gsa_id}@${var.project_id}.iam.gserviceaccount.com"
}

resource "google_service_account" "ui" {
  project      = var.project_id
  account_id   = local.ui_gsa_id
  display_name = "microfed Kubeflow Pipelines UI (KFP ml-pipeline-ui, read-only)"

  depends_on = [google_project_service.apis]
}

# Read objects of the pipeline bucket only (list and get); no write, no bucket metadata.
resource "google_storage_bucket_iam_member" "ui_objects" {
  bucket = google_storage_bucket.pipelines.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.ui.email}"
}

# Workload Identity: the ml-pipeline-ui Kubernetes service account may act as the UI Google service account. The
# workload pool exists once the cluster does.
resource "google_service_account_iam_member" "ui_workload_identity" {
  service_account_id = google_service_account.ui.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${local.kfp_namespace}/${local.ui_ksa}]"

  depends_on = [google_container_cluster.this]
}
