# Explicit resource requests for the vendored containers that declare none, in both modes. requests.json maps
# "<kustomization>/<Kind>/<name>/<container>" (kustomization kfp, training-operator or trainer-v2) to {cpu, memory,
# basis}; its values are sized elsewhere (infra/cost/sizing.py), this file only turns them into kustomize patches,
# which kubeflow.tf adds to the kfp, training_operator and trainer_v2 overlays (each operator's overlay is built
# whichever training_operator installs).
#
# Why: Autopilot gives a container without requests its default requests (0.5 vCPU, 2 GiB on the general-purpose
# class) and bills the pod for them (GKE docs, "Resource requests in Autopilot"); on Standard the system node is
# sized from the same figures. Only requests are set, never limits: a container without a limit may use the node's
# spare capacity, and on Autopilot leaving limits unset is how a pod bursts above its requests (GKE docs, "Configure
# Pod bursting in GKE"). Autopilot also raises a request below its minimum to that minimum ("Resource requests in
# Autopilot"). The links are in infra/README.md, Standard or Autopilot.
#
# A patch is a strategic merge patch of the workload's pod template: `containers` is merged by container name
# (PodSpec.containers carries patchStrategy "merge", patchMergeKey "name" in k8s.io/api core/v1 types.go; the
# kubernetes/website task "Update API Objects in Place Using kubectl patch" shows it), and a container's other fields
# and any existing limits are kept. A key naming a container the workload does not have would add a container made
# only of a name and requests, so tests/test_infra_autopilot.py checks every key against the rendered manifests.
# This file holds locals only (tests evaluate them with `terraform console`, which needs no provider).

locals {
  container_requests = jsondecode(file("${path.module}/requests.json")).containers

  # The pod template of these kinds is spec.template.spec, under apps/v1. Another kind in requests.json fails the
  # plan here (no such key) instead of producing a patch that kustomize would not match.
  workload_api_versions = {
    Deployment  = "apps/v1"
    StatefulSet = "apps/v1"
  }

  # "<kustomization>/<Kind>/<name>" => that workload's containers, one element per key of requests.json.
  requests_by_workload = {
    for key, request in local.container_requests :
    join("/", slice(split("/", key), 0, 3)) => merge(request, { container = split("/", key)[3] })...
  }

  # One patch per workload, however many of its containers are listed.
  request_patches = {
    for workload, containers in local.requests_by_workload : workload => {
      kustomization = split("/", workload)[0]
      kind          = split("/", workload)[1]
      name          = split("/", workload)[2]
      patch = yamlencode({
        apiVersion = local.workload_api_versions[split("/", workload)[1]]
        kind       = split("/", workload)[1]
        metadata   = { name = split("/", workload)[2] }
        spec = {
          template = {
            spec = {
              containers = [
                for c in containers : { name = c.container, resources = { requests = { cpu = c.cpu, memory = c.memory } } }
              ]
            }
          }
        }
      })
    }
  }
}
