# The provider configurations of this configuration; the module (modules/microfed/) inherits them and configures none
# of its own.

provider "google" {
  project = var.project_id
  region  = var.region
}

# The caller's own credentials (gcloud auth application-default login) also authenticate to the cluster.
data "google_client_config" "current" {}

# Through the cluster's DNS-based endpoint (modules/microfed/cluster.tf, the module's output cluster_dns_endpoint):
# authorised by IAM, not by master_authorized_networks. Its front end presents a publicly trusted certificate (a
# kubeconfig from `gcloud container clusters get-credentials --dns-endpoint` carries no
# certificate-authority-data), so the cluster's own CA is not given here.
provider "kubectl" {
  host             = "https://${module.microfed.cluster_dns_endpoint}"
  token            = data.google_client_config.current.access_token
  load_config_file = false
  # The cluster is created by this same apply: build the client when it is first used, not at plan time.
  lazy_load = true
  # CRDs become usable a few seconds after they are created; custom resources applied right after them retry.
  apply_retry_count = 5
}

# Only renders kustomizations (the module's kustomization_overlay data sources), which never contact a cluster, yet
# the provider refuses a configuration without exactly one of kubeconfig_path, kubeconfig_raw, kubeconfig_incluster
# (ExactlyOneOf in kbst/terraform-provider-kustomization v0.9.8, kustomize/provider.go). A fresh machine has no
# ~/.kube/config, and the cluster does not exist at the first plan, so it gets a fixed kubeconfig of its own. The
# provider builds a client from it (client-go's clientcmd: the context must exist and its cluster have a server;
# building dials nothing), but the data sources use only the provider's mutex
# (kustomize/data_source_kustomization_overlay.go), so the server is never contacted; `.invalid` (RFC 2606) could
# not resolve if it were. `context` is set so that a KUBECONFIG_CONTEXT in the environment cannot pick another.
provider "kustomization" {
  context = "render-only"
  kubeconfig_raw = yamlencode({
    apiVersion        = "v1"
    kind              = "Config"
    clusters          = [{ name = "render-only", cluster = { server = "https://render-only.invalid" } }]
    users             = [{ name = "render-only", user = {} }]
    contexts          = [{ name = "render-only", context = { cluster = "render-only", user = "render-only" } }]
    "current-context" = "render-only"
  })
}
