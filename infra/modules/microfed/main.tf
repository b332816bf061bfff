# microfed on GKE: a VPC-native cluster whose training pools scale to zero, Kubeflow Pipelines and the Training
# Operator, a bucket for the pipeline root and an Artifact Registry repository for the image. One file per concern:
# network.tf, cluster.tf, node_pools.tf, storage.tf, iam.tf, ui_identity.tf, kubeflow.tf.
#
# A module without provider blocks: its caller configures google, kubectl (the cluster's DNS endpoint from the
# output cluster_dns_endpoint) and kustomization (render-only), as infra/providers.tf and infra/examples/basic/ do.
# It can therefore be called with count, for_each and depends_on, and removing the call destroys what it created.

locals {
  # Node labels and taints shared with the PyTorchJob builder (training/pytorchjob.py reads the same file), so the
  # pools and the pods' tolerations / node selectors cannot drift apart.
  contract = jsondecode(file("${path.module}/../../../training/cluster.json"))

  # cluster.json spells taint effects the Kubernetes way; the GKE API wants its enum.
  taint_effects = {
    NoSchedule       = "NO_SCHEDULE"
    PreferNoSchedule = "PREFER_NO_SCHEDULE"
    NoExecute        = "NO_EXECUTE"
  }
  training_taint = {
    key    = local.contract.training_taint.key
    value  = local.contract.training_taint.value
    effect = local.taint_effects[local.contract.training_taint.effect]
  }
  # GKE puts this taint on GPU nodes itself only while the cluster also has non-GPU pools; declaring it makes it
  # certain (and tells the autoscaler about it when a pool is at zero nodes).
  gpu_taint = {
    key    = local.contract.gpu_taint.key
    value  = local.contract.gpu_taint.value
    effect = local.taint_effects[local.contract.gpu_taint.effect]
  }

  # One GPU per node: a PyTorchJob replica asks for at most one, and a one-GPU machine is the cheapest that fits.
  gpus_per_node = 1
  default_gpu_machine_types = {
    "nvidia-tesla-t4"   = "n1-standard-8"
    "nvidia-l4"         = "g2-standard-8"
    "nvidia-tesla-a100" = "a2-highgpu-1g"
  }
  gpu_machine_types = merge(local.default_gpu_machine_types, var.gpu_machine_types)

  # GKE's mode of operation (variable mode). Standard: this module declares the node pools (node_pools.tf).
  # Autopilot: GKE creates and sizes the nodes from the pods' requests, so there is no node pool here, and the
  # cluster is always regional (location availability "Pre-configured: Regional" in GKE's "Compare features in
  # Autopilot and Standard clusters"; links in infra/README.md, Standard or Autopilot).
  autopilot        = var.mode == "autopilot"
  cluster_location = var.regional_cluster || local.autopilot ? var.region : var.zone
  labels           = merge({ app = "microfed" }, var.labels)

  bucket_name = coalesce(var.bucket_name, "${var.project_id}-${var.name}-pipelines")
  # KFP writes every run under the pipeline root; the lifecycle rule for old run artifacts targets this prefix.
  pipeline_root_prefix = "pipeline-root"
  pipeline_root        = "gs://${local.bucket_name}/${local.pipeline_root_prefix}"
  image_repository     = "${var.region}-docker.pkg.dev/${var.project_id}/${var.repository_id}"

  # The standalone KFP manifests install into this namespace; the pipeline's pods (and the PyTorchJobs the train
  # step creates) run there as the pipeline-runner service account.
  kfp_namespace       = "kubeflow"
  pipeline_runner_ksa = "pipeline-runner"
  # Known before apply (the kustomize overlay that annotates pipeline-runner is rendered at plan time).
  pipeline_gsa_id    = "${var.name}-pipelines"
  pipeline_gsa_email = "${local.pipeline_gsa_id}@${var.project_id}.iam.gserviceaccount.com"

  apis = toset([
    "artifactregistry.googleapis.com",
    # project IAM members (google_project_iam_member) go through the Resource Manager API
    "cloudresourcemanager.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "iam.googleapis.com",
    "storage.googleapis.com",
  ])
}

resource "google_project_service" "apis" {
  for_each = var.enable_apis ? local.apis : toset([])

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}
