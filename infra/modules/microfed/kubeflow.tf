# Kubeflow Pipelines (standalone) and a training operator, from manifests vendored under manifests/:
#   1. manifests/render.py rendered the pinned upstream kustomizations once (kubeflow/pipelines, kubeflow/trainer at
#      v1.9.4 and at v2.3.0, and the argo-workflows and JobSet manifests those name by URL; tags and commits in
#      manifests/SOURCES.json), so a plan reads only files of this module and never fetches from GitHub; the
#      kustomization data sources build those rendered files with our patches: KFP's default pipeline root is the
#      bucket, pipeline-runner and ml-pipeline-ui are bound to their Google service accounts (iam.tf,
#      ui_identity.tf);
#   2. var.training_operator picks the operator: trainer-v2 (Kubeflow Trainer v2: its controller manager with JobSet,
#      then its ClusterTrainingRuntimes) or training-operator-v1 (the Training Operator v1.9.4). Every data source
#      is built (they only render files); only KFP's and the chosen operator's objects are applied;
#   3. kubectl_manifest applies every object server-side, in kustomize's priority order: CRDs (and namespaces)
#      first, then the rest, then admission webhooks;
#   4. the launcher's RBAC for that operator (rbac-trainer-v2.yaml or rbac.yaml) goes into the KFP namespace, with
#      the microfed-cluster ConfigMap that tells the train step what cluster it runs on and which operator.
# Every container of KFP and the operators gets explicit resource requests (requests.tf) in both modes.
# KFP and the Training Operator v1 also declare the kubeflow Namespace; it is created once, here, and filtered out
# of both. Trainer v2 runs in a namespace of its own, kubeflow-system, which its manifests declare and apply.
# Moving a version: change it in manifests/render.py, re-render, review the diff (see infra/README.md).

locals {
  # What was vendored (upstream repositories, tags, commits, digests of the rendered files).
  vendored_sources = jsondecode(file("${path.module}/manifests/SOURCES.json"))

  # The kustomizations (keys of local.kustomizations, the "<kustomization>:" of every kubectl_manifest key) and the
  # vendored folder each builds (manifests/<folder>, SOURCES.json's manifests).
  kustomization_folders = {
    kfp-cluster         = "kfp-cluster-scoped"
    kfp                 = "kfp"
    training-operator   = "training-operator"
    trainer-v2          = "trainer-v2"
    trainer-v2-runtimes = "trainer-v2-runtimes"
  }
  # What each value of var.training_operator installs besides KFP.
  operator_kustomizations = {
    trainer-v2           = ["trainer-v2", "trainer-v2-runtimes"]
    training-operator-v1 = ["training-operator"]
  }
  installed_kustomizations = concat(["kfp-cluster", "kfp"], local.operator_kustomizations[var.training_operator])

  # "<repo>@<tag>" of every upstream installed: those of the installed folders, and those their remote resources
  # were rewritten to (argo-workflows for KFP, JobSet for Trainer v2). One kubeflow/trainer tag at a time.
  installed_folder_releases = distinct([
    for k in local.installed_kustomizations :
    "${local.vendored_sources.manifests[local.kustomization_folders[k]].repo}@${local.vendored_sources.manifests[local.kustomization_folders[k]].tag}"
  ])
  installed_releases = distinct(concat(local.installed_folder_releases, [
    for rw in local.vendored_sources.rewrites : split(":", rw.to)[0]
    if contains(local.installed_folder_releases, split(":", rw.file)[0])
  ]))
  # The launcher's Role and RoleBinding for each operator.
  launcher_rbac_files = {
    trainer-v2           = "rbac-trainer-v2.yaml"
    training-operator-v1 = "rbac.yaml"
  }
}

data "kustomization_overlay" "kfp_cluster_scoped" {
  resources = ["${path.module}/manifests/kfp-cluster-scoped"]
}

data "kustomization_overlay" "kfp" {
  resources = ["${path.module}/manifests/kfp"]

  # The launcher of every step reads its default pipeline root from this ConfigMap.
  patches {
    target {
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

  # Workload Identity: the Kubeflow UI's server runs as ml-pipeline-ui and reads gs:// artifacts (the run report
  # among them) with the UI Google service account's credentials, read-only (ui_identity.tf).
  patches {
    target {
      kind = "ServiceAccount"
      name = local.ui_ksa
    }
    patch = yamlencode({
      apiVersion = "v1"
      kind       = "ServiceAccount"
      metadata = {
        name        = local.ui_ksa
        annotations = { "iam.gke.io/gcp-service-account" = local.ui_gsa_email }
      }
    })
  }

  # Workload Identity: pods running as pipeline-runner get the pipelines Google service account's credentials.
  patches {
    target {
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

  # Resource requests for the containers that declare none (requests.tf): one patch per workload.
  dynamic "patches" {
    for_each = { for workload, p in local.request_patches : workload => p if p.kustomization == "kfp" }
    content {
      target {
        kind = patches.value.kind
        name = patches.value.name
      }
      patch = patches.value.patch
    }
  }
}

data "kustomization_overlay" "training_operator" {
  resources = ["${path.module}/manifests/training-operator"]

  # Resource requests for the containers that declare none (requests.tf): one patch per workload.
  dynamic "patches" {
    for_each = { for workload, p in local.request_patches : workload => p if p.kustomization == "training-operator" }
    content {
      target {
        kind = patches.value.kind
        name = patches.value.name
      }
      patch = patches.value.patch
    }
  }
}

# Kubeflow Trainer v2: the controller manager, its CRDs and webhooks, and JobSet (trainer's overlays/manager).
data "kustomization_overlay" "trainer_v2" {
  resources = ["${path.module}/manifests/trainer-v2"]

  # Resource requests for the containers that declare none (requests.tf): one patch per workload.
  dynamic "patches" {
    for_each = { for workload, p in local.request_patches : workload => p if p.kustomization == "trainer-v2" }
    content {
      target {
        kind = patches.value.kind
        name = patches.value.name
      }
      patch = patches.value.patch
    }
  }
}

# Its built-in ClusterTrainingRuntimes (trainer's overlays/runtimes), torch-distributed among them: no workload.
data "kustomization_overlay" "trainer_v2_runtimes" {
  resources = ["${path.module}/manifests/trainer-v2-runtimes"]
}

locals {
  # KFP's and the chosen operator's (local.installed_kustomizations).
  kustomizations = {
    for source, overlay in {
      kfp-cluster         = data.kustomization_overlay.kfp_cluster_scoped
      kfp                 = data.kustomization_overlay.kfp
      training-operator   = data.kustomization_overlay.training_operator
      trainer-v2          = data.kustomization_overlay.trainer_v2
      trainer-v2-runtimes = data.kustomization_overlay.trainer_v2_runtimes
    } : source => { ids_prio = overlay.ids_prio, manifests = overlay.manifests }
    if contains(local.installed_kustomizations, source)
  }
  # manifests[priority] = { "<kustomization>:<group>/<Kind>/<namespace>/<name>" = JSON manifest }; priority 0 holds
  # namespaces and CRDs, 1 everything else, 2 admission webhooks (kbst/kustomization's ids_prio). The KFP namespace
  # is left out (kubectl_manifest.namespace creates it); Trainer v2's kubeflow-system is applied with the CRDs.
  manifests = [
    for priority in [0, 1, 2] : merge([
      for source, overlay in local.kustomizations : {
        for id in overlay.ids_prio[priority] :
        "${source}:${id}" => overlay.manifests[id]
        if id != "_/Namespace/_/${local.kfp_namespace}"
      }
    ]...)
  ]

  # Deployments applied without waiting for their rollout. alekc/kubectl waits for every Deployment it applies to
  # roll out (wait_for_rollout defaults to true; kubernetes/resource_kubectl_manifest.go at v2.4.1,
  # resourceKubectlManifestApply -> waitForDeploymentRollout, bounded by the 10-minute create/update timeout), and
  # a wait that times out fails the apply and taints the object. These two can wait on something no manifest
  # declares (kubeflow/pipelines 2.14.3):
  #   cache-server mounts the Secret webhook-server-tls (manifests/kustomize/base/cache/cache-deployment.yaml),
  #     which cache-deployer creates at run time from a CertificateSigningRequest for the
  #     kubernetes.io/kubelet-serving signer (backend/src/cache/deployer/webhook-create-signed-cert.sh); until it
  #     exists, or forever where that CSR is not signed, the pod stays ContainerCreating (kubeflow/pipelines#3815,
  #     #5924);
  #   cache-deployer runs that script, which exits 1 when no certificate appears, so its pod can crash-loop.
  # Neither is needed by microfed: the cache webhook skips KFP v2 pods (backend/src/cache/server/mutation.go,
  # MutatePodIfCached: "KFP v2 handles caching by its driver") and fails open (failurePolicy: Ignore in
  # backend/src/cache/deployer/cache-webhook-config.v1.yaml.template). Every other Deployment is waited for, so the
  # admission webhooks are applied once the servers behind them are up.
  unwaited_rollouts = toset([
    "kfp:apps/Deployment/kubeflow/cache-server",
    "kfp:apps/Deployment/kubeflow/cache-deployer-deployment",
  ])

  # The RBAC files name the KFP namespace literally; pin it to the one installed here.
  rbac_documents = [
    for doc in split("\n---\n", file("${path.module}/${local.launcher_rbac_files[var.training_operator]}")) :
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

  # On Standard, after the system pool (whose node every Kubeflow Deployment below is scheduled on, and whose
  # rollout they wait for); on Autopilot, which has no pool and creates nodes for pending pods, after the cluster.
  depends_on = [google_container_cluster.this, google_container_node_pool.system]
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
  wait_for_rollout  = !contains(local.unwaited_rollouts, each.key)

  depends_on = [
    kubectl_manifest.crds,
    google_service_account_iam_member.pipeline_runner_workload_identity,
    google_service_account_iam_member.ui_workload_identity,
  ]
}

resource "kubectl_manifest" "webhooks" {
  for_each = local.manifests[2]

  yaml_body         = each.value
  server_side_apply = true
  force_conflicts   = true

  depends_on = [kubectl_manifest.resources]
}

# Role + RoleBinding that let pipeline-runner create, watch and delete TrainJobs (trainer-v2) or PyTorchJobs
# (training-operator-v1) and read their pods' logs. Changing training_operator replaces one Role with the other.
resource "kubectl_manifest" "launcher_rbac" {
  for_each = { for doc in local.rbac_documents : "${yamldecode(doc).kind}/${yamldecode(doc).metadata.name}" => doc }

  yaml_body         = each.value
  server_side_apply = true

  depends_on = [kubectl_manifest.crds, kubectl_manifest.resources]
}

# What the train step needs to know about the cluster it runs on, read at run time (the launcher's Role may get this
# one ConfigMap, rbac.yaml): on Standard it selects the declared pools; on Autopilot, which has no pools, it asks for
# Spot and GPU nodes with node selectors of its own. The keys and their types are a contract with that reader
# (tests/test_infra_autopilot.py pins them): mode (string), training_spot (bool), cpu_machine_type (string),
# cpu_max_nodes (number), gpu_types (list of strings), gpu_machine_types (accelerator => machine type, for the types
# in gpu_types only), gpu_max_nodes (number), training_operator (string: "trainer-v2" or "training-operator-v1",
# the operator installed here).
locals {
  cluster_info = {
    mode              = var.mode
    training_spot     = var.training_spot
    cpu_machine_type  = var.cpu_machine_type
    cpu_max_nodes     = var.cpu_max_nodes
    gpu_types         = var.gpu_types
    gpu_machine_types = { for type in var.gpu_types : type => local.gpu_machine_types[type] }
    gpu_max_nodes     = var.gpu_max_nodes
    training_operator = var.training_operator
  }
}

resource "kubectl_manifest" "cluster_info" {
  yaml_body = yamlencode({
    apiVersion = "v1"
    kind       = "ConfigMap"
    metadata = {
      name      = "microfed-cluster"
      namespace = local.kfp_namespace
      labels    = { "app.kubernetes.io/name" = "microfed" }
    }
    data = { "cluster.json" = jsonencode(local.cluster_info) }
  })
  server_side_apply = true

  depends_on = [kubectl_manifest.namespace]
}
