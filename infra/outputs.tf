# Every output of the module (modules/microfed/outputs.tf), under the same name.

output "mode" {
  description = "GKE mode of the cluster: standard (node pools declared here) or autopilot (GKE manages the nodes). The train step reads the same value from the microfed-cluster ConfigMap."
  value       = module.microfed.mode
}

output "cluster_name" {
  description = "Name of the GKE cluster."
  value       = module.microfed.cluster_name
}

output "cluster_location" {
  description = "Location of the cluster: a zone (zonal cluster) or a region (regional cluster)."
  value       = module.microfed.cluster_location
}

output "cluster_dns_endpoint" {
  description = "Host name of the cluster's DNS-based control-plane endpoint (gke-....gke.goog), authorised by IAM rather than by source address: the caller's kubectl provider reaches the cluster at this host over HTTPS, with the caller's own access token."
  value       = module.microfed.cluster_dns_endpoint
}

output "get_credentials_command" {
  description = "Writes kubectl credentials for the cluster's DNS-based endpoint into ~/.kube/config (needs gcloud and gke-gcloud-auth-plugin; works from any network, authorised by IAM)."
  value       = module.microfed.get_credentials_command
}

output "bucket_url" {
  description = "The bucket for datasets (upload them under data/) and pipeline artifacts."
  value       = module.microfed.bucket_url
}

output "pipeline_root" {
  description = "KFP's default pipeline root, set in the kfp-launcher ConfigMap: every run's artifacts land under it."
  value       = module.microfed.pipeline_root
}

output "image_repository" {
  description = "Artifact Registry path for the microfed image: make image IMAGE=<this>/microfed:TAG, then docker push."
  value       = module.microfed.image_repository
}

output "docker_auth_command" {
  description = "Lets docker push to the repository with your gcloud credentials."
  value       = module.microfed.docker_auth_command
}

output "kfp_ui_port_forward_command" {
  description = "Forwards the Kubeflow Pipelines UI (which also serves the API used by microfed submit) to http://localhost:8080."
  value       = module.microfed.kfp_ui_port_forward_command
}

output "kfp_namespace" {
  description = "Namespace of Kubeflow Pipelines, the Training Operator and the PyTorchJobs the train step creates."
  value       = module.microfed.kfp_namespace
}

output "pipeline_service_account" {
  description = "Google service account the KFP pipeline-runner Kubernetes service account acts as (Workload Identity)."
  value       = module.microfed.pipeline_service_account
}

output "training_node_pools" {
  description = "Training node pools by accelerator (none = CPU): the value of the node label training/cluster.json names, which the PyTorchJob builder selects. Empty with mode = autopilot (no node pools)."
  value       = module.microfed.training_node_pools
}

output "ui_service_account" {
  description = "Google service account the Kubeflow UI (ml-pipeline-ui Kubernetes service account) acts as through Workload Identity: it reads the pipeline bucket's objects."
  value       = module.microfed.ui_service_account
}

output "kubeflow_versions" {
  description = "The releases installed, as vendored under manifests/: KFP, the training operator training_operator chooses, and what their manifests name by URL (repository => tag; manifests/SOURCES.json also records the commits)."
  value       = module.microfed.kubeflow_versions
}

output "training_operator" {
  description = "The training operator installed (trainer-v2 or training-operator-v1), as the microfed-cluster ConfigMap's training_operator says."
  value       = module.microfed.training_operator
}
