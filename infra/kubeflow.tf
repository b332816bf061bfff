# Kubeflow Pipelines (standalone) and the Training Operator, from their pinned upstream kustomizations:
#   1. the kustomization data sources render them at plan time (kustomize build; remote bases need git on PATH),
#      with our patches: KFP's default pipeline root is the bucket, pipeline-runner is bound to the pipelines
#      Google service account;
#   2. kubectl_manifest applies every object server-side, in kustomize's priority order: CRDs first, then the
#      rest, then admission webhooks;
#   3. the launcher's RBAC (rbac.yaml) goes into the KFP namespace.
# Both upstreams also declare the kubeflow Namespace; it is created once, here, and filtered out of both.

locals {
  kfp_base               = "github.com/kubeflow/pipelines/manifests/kustomize"
  training_operator_base = "github.com/kubeflow/trainer/manifests/overlays/standalone"
}

data "kustomization_overlay" "kfp_cluster_scoped" {
  resources = ["${local.kfp_base}/cluster-scoped-resources?ref=${var.kfp_version}"]
}

data "kustomization_overlay" "kfp" {
  resources = ["${local.kfp_base}/env/platform-agnostic?ref=${var.kfp_version}"]

  # The launcher of every step reads its default pipeline root from this ConfigMap.
  patches {
    target = {
      kind = "ConfigMap"
      name = "kfp-launcher"
    }
    patch = yamlencode({
      apiVersion = "v1"
      kind       = "ConfigMap"
      metadata   = { name = "kfp-launcher" }
      data       = { defaultPipelineRoot = local.pipeline_root }
    })
  }

  # Workload Identity: pods running as pipeline-runner get the pipelines Google service account's credentials.
  patches {
    target = {
      kind = "ServiceAccount"
      name = local.pipeline_runner_ksa
    }
    patch = yamlencode({
      apiVersion = "v1"
      kind       = "ServiceAccount"
      metadata = {
        name        = local.pipeline_runner_ksa
        annotations = { "iam.gke.io/gcp-service-account" = local.pipeline_gsa_email }
      }
    })
  }
}

data "kustomization_overlay" "training_operator" {
  resources = ["${local.training_operator_base}?ref=${var.training_operator_version}"]
}

locals {
  kustomizations = {
    for source, overlay in {
      kfp-cluster       = data.kustomization_overlay.kfp_cluster_scoped
      kfp               = data.kustomization_overlay.kfp
      training-operator = data.kustomization_overlay.training_operator
    } : source => { ids_prio = overlay.ids_prio, manifests = overlay.manifests }
  }
  # manifests[priority] = { "<kustomization>:<group>/<Kind>/<namespace>/<name>" = JSON manifest }; priority 0 holds
  # CRDs, 1 everything else, 2 admission webhooks (kbst/kustomization's ids_prio).
  manifests = [
    for priority in [0, 1, 2] : merge([
      for source, overlay in local.kustomizations : {
        for id in overlay.ids_prio[priority] :
        "${source}:${id}" => overlay.manifests[id]
        if !startswith(id, "_/Namespace/")
      }
    ]...)
  ]

  # rbac.yaml names the KFP namespace literally; pin it to the one installed here.
  rbac_documents = [
    for doc in split("\n---\n", file("${path.module}/rbac.yaml")) :
    replace(doc, "namespace: kubeflow", "namespace: ${local.kfp_namespace}")
    if trimspace(doc) != ""
  ]
}

resource "kubectl_manifest" "namespace" {
  yaml_body = yamlencode({
    apiVersion = "v1"
    kind       = "Namespace"
    metadata   = { name = local.kfp_namespace }
  })
  server_side_apply = true

  depends_on = [google_container_node_pool.system]
}

resource "kubectl_manifest" "crds" {
  for_each = local.manifests[0]

  yaml_body         = each.value
  server_side_apply = true
  force_conflicts   = true

  depends_on = [kubectl_manifest.namespace]
}

resource "kubectl_manifest" "resources" {
  for_each = local.manifests[1]

  yaml_body         = each.value
  server_side_apply = true
  force_conflicts   = true

  depends_on = [kubectl_manifest.crds, google_service_account_iam_member.pipeline_runner_workload_identity]
}

resource "kubectl_manifest" "webhooks" {
  for_each = local.manifests[2]

  yaml_body         = each.value
  server_side_apply = true
  force_conflicts   = true

  depends_on = [kubectl_manifest.resources]
}

# Role + RoleBinding that let pipeline-runner create, watch and delete PyTorchJobs and read their pods' logs.
resource "kubectl_manifest" "launcher_rbac" {
  for_each = { for doc in local.rbac_documents : "${yamldecode(doc).kind}/${yamldecode(doc).metadata.name}" => doc }

  yaml_body         = each.value
  server_side_apply = true

  depends_on = [kubectl_manifest.crds, kubectl_manifest.resources]
}
