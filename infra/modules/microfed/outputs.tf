output "mode" {
  description = "GKE mode of the cluster: standard (node pools declared here) or autopilot (GKE manages the nodes). The train step reads the same value from the microfed-cluster ConfigMap."
  value       = var.mode
}

output "cluster_name" {
  description = "Name of the GKE cluster."
  value       = google_container_cluster.this.name
}

output "cluster_location" {
  description = "Location of the cluster: a zone (zonal cluster) or a region (regional cluster)."
  value       = google_container_cluster.this.location
}

output "cluster_dns_endpoint" {
  description = "Host name of the cluster's DNS-based control-plane endpoint (gke-....gke.goog), authorised by IAM rather than by source address: the caller's kubectl provider reaches the cluster at this host over HTTPS, with the caller's own access token."
  value       = google_container_cluster.this.control_plane_endpoints_config[0].dns_endpoint_config[0].endpoint
}

output "get_credentials_command" {
  description = "Writes kubectl credentials for the cluster's DNS-based endpoint into ~/.kube/config (needs gcloud and gke-gcloud-auth-plugin; works from any network, authorised by IAM)."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.this.name} --location ${google_container_cluster.this.location} --project ${var.project_id} --dns-endpoint"
}

output "bucket_url" {
  description = "The bucket for datasets (upload them under data/) and pipeline artifacts."
  value       = google_storage_bucket.pipelines.url
}

output "pipeline_root" {
  description = "KFP's default pipeline root, set in the kfp-launcher ConfigMap: every run's artifacts land under it."
  value       = local.pipeline_root
}

output "image_repository" {
  description = "Artifact Registry path for the microfed image: make image IMAGE=<this>/microfed:TAG, then docker push."
  value       = "${google_artifact_registry_repository.images.location}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "docker_auth_command" {
  description = "Lets docker push to the repository with your gcloud credentials."
  value       = "gcloud auth configure-docker ${google_artifact_registry_repository.images.location}-docker.pkg.dev"
}

output "kfp_ui_port_forward_command" {
  description = "Forwards the Kubeflow Pipelines UI (which also serves the API used by microfed submit) to http://localhost:8080."
  value       = "kubectl port-forward -n ${local.kfp_namespace} svc/ml-pipeline-ui 8080:80"
}

output "kfp_namespace" {
  description = "Namespace of Kubeflow Pipelines, the Training Operator and the PyTorchJobs the train step creates."
  value       = local.kfp_namespace
}

output "pipeline_service_account" {
  description = "Google service account the KFP pipeline-runner Kubernetes service account acts as (Workload Identity)."
  value       = google_service_account.pipelines.email
}

output "training_node_pools" {
  description = "Training node pools by accelerator (none = CPU): the value of the node label training/cluster.json names, which the PyTorchJob builder selects. Empty with mode = autopilot (no node pools)."
  value = merge(
    { for pool in google_container_node_pool.training_cpu : "none" => pool.name },
    { for type, pool in google_container_node_pool.training_gpu : type => pool.name },
  )
}

output "ui_service_account" {
  description = "Google service account the Kubeflow UI (ml-pipeline-ui Kubernetes service account) acts as through Workload Identity: it reads the pipeline bucket's objects."
  value       = google_service_account.ui.email
}

output "kubeflow_versions" {
  description = "The releases installed, as vendored under manifests/: KFP, the training operator training_operator chooses, and what their manifests name by URL (repository => tag; manifests/SOURCES.json also records the commits)."
  value       = { for release in local.installed_releases : split("@", release)[0] => split("@", release)[1] }
}

output "training_operator" {
  description = "The training operator installed (trainer-v2 or training-operator-v1), as the microfed-cluster ConfigMap's training_operator says."
  value       = var.training_operator
}
