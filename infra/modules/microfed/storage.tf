# The bucket holds the KFP pipeline root (every run's artifacts: shards, micro-models, the global model, metrics)
# and the datasets users upload under data/. The registry holds the one image every step and replica runs.

resource "google_storage_bucket" "pipelines" {
  #checkov:skip=CKV_GCP_62:Usage logs would need a second bucket (itself without access logs); Cloud Audit Logs record access instead (turn on Data Access logs for storage.googleapis.com where required).
  name          = local.bucket_name
  project       = var.project_id
  location      = var.region
  storage_class = "STANDARD"
  force_destroy = var.bucket_force_destroy
  labels        = local.labels

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = true
  }

  # Old run artifacts go first (they become noncurrent versions) ...
  lifecycle_rule {
    condition {
      age            = var.artifact_retention_days
      matches_prefix = ["${local.pipeline_root_prefix}/"]
      with_state     = "LIVE"
    }
    action {
      type = "Delete"
    }
  }

  # ... and every noncurrent version, anywhere in the bucket, is removed after a grace period.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Images are built from public sources and encrypted at rest with Google-managed keys; a customer-managed Cloud KMS key would add a key ring to operate (and a key whose loss makes the images unreadable) for no confidentiality gain.
  project       = var.project_id
  location      = var.region
  repository_id = var.repository_id
  description   = "microfed component and PyTorchJob worker images"
  format        = "DOCKER"
  labels        = local.labels

  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 10
    }
  }

  cleanup_policies {
    id     = "delete-old-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "2592000s"
    }
  }

  depends_on = [google_project_service.apis]
}
