# Until the split into modules/microfed/, every resource was declared in this directory. These blocks move the
# objects of such a state to their addresses inside the module at the next plan (no destroy, no create; `terraform
# plan` lists them as "has moved to"). A moved block covers a whole resource, every instance of a for_each one
# included. Keep them: removing one turns a not-yet-migrated state's object into a destroy and a create.
#
# The system and CPU pools have since got `count`: modules/microfed/moved.tf moves their no-key instance on to [0],
# and Terraform chains the two (this file moves the whole resource into the module, that one the instance inside
# it). Keep these two blocks moving whole resources: `to = module.microfed.google_container_node_pool.system[0]`
# here would give [0] two sources, which Terraform rejects as ambiguous.
# tests/test_infra.py checks that every resource this directory declared before the split has its block here.

moved {
  from = google_project_service.apis
  to   = module.microfed.google_project_service.apis
}

moved {
  from = google_compute_network.this
  to   = module.microfed.google_compute_network.this
}

moved {
  from = google_compute_subnetwork.this
  to   = module.microfed.google_compute_subnetwork.this
}

moved {
  from = google_compute_router.this
  to   = module.microfed.google_compute_router.this
}

moved {
  from = google_compute_router_nat.this
  to   = module.microfed.google_compute_router_nat.this
}

moved {
  from = google_container_cluster.this
  to   = module.microfed.google_container_cluster.this
}

moved {
  from = google_container_node_pool.system
  to   = module.microfed.google_container_node_pool.system
}

moved {
  from = google_container_node_pool.training_cpu
  to   = module.microfed.google_container_node_pool.training_cpu
}

moved {
  from = google_container_node_pool.training_gpu
  to   = module.microfed.google_container_node_pool.training_gpu
}

moved {
  from = google_storage_bucket.pipelines
  to   = module.microfed.google_storage_bucket.pipelines
}

moved {
  from = google_artifact_registry_repository.images
  to   = module.microfed.google_artifact_registry_repository.images
}

moved {
  from = google_service_account.nodes
  to   = module.microfed.google_service_account.nodes
}

moved {
  from = google_project_iam_member.nodes
  to   = module.microfed.google_project_iam_member.nodes
}

moved {
  from = google_artifact_registry_repository_iam_member.nodes_reader
  to   = module.microfed.google_artifact_registry_repository_iam_member.nodes_reader
}

moved {
  from = google_service_account.pipelines
  to   = module.microfed.google_service_account.pipelines
}

moved {
  from = google_storage_bucket_iam_member.pipelines_objects
  to   = module.microfed.google_storage_bucket_iam_member.pipelines_objects
}

moved {
  from = google_storage_bucket_iam_member.pipelines_bucket_reader
  to   = module.microfed.google_storage_bucket_iam_member.pipelines_bucket_reader
}

moved {
  from = google_artifact_registry_repository_iam_member.pipelines_reader
  to   = module.microfed.google_artifact_registry_repository_iam_member.pipelines_reader
}

moved {
  from = google_service_account_iam_member.pipeline_runner_workload_identity
  to   = module.microfed.google_service_account_iam_member.pipeline_runner_workload_identity
}

moved {
  from = google_service_account.ui
  to   = module.microfed.google_service_account.ui
}

moved {
  from = google_storage_bucket_iam_member.ui_objects
  to   = module.microfed.google_storage_bucket_iam_member.ui_objects
}

moved {
  from = google_service_account_iam_member.ui_workload_identity
  to   = module.microfed.google_service_account_iam_member.ui_workload_identity
}

moved {
  from = kubectl_manifest.namespace
  to   = module.microfed.kubectl_manifest.namespace
}

moved {
  from = kubectl_manifest.crds
  to   = module.microfed.kubectl_manifest.crds
}

moved {
  from = kubectl_manifest.resources
  to   = module.microfed.kubectl_manifest.resources
}

moved {
  from = kubectl_manifest.webhooks
  to   = module.microfed.kubectl_manifest.webhooks
}

moved {
  from = kubectl_manifest.launcher_rbac
  to   = module.microfed.kubectl_manifest.launcher_rbac
}
