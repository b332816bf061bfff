# The two single pools got `count` (0 with mode = "autopilot", 1 with the default "standard"), which turns the
# address of their one object from google_container_node_pool.system into google_container_node_pool.system[0].
# These blocks carry a Standard state from before that change to the new addresses (no destroy, no create);
# training_gpu already used for_each, so its instances keep their keys.
#
# They chain with infra/moved.tf, which moves a state from before the split into the module: that file moves the
# whole resource (google_container_node_pool.system -> module.microfed.google_container_node_pool.system), these
# move its no-key instance on to [0]. Terraform orders the two (the instance here is nested in the resource that the
# root block moves: statementDependsOn in internal/refactoring/move_execute.go) and accepts them together, since no
# two blocks share a source or a destination (ValidateMoves in internal/refactoring/move_validate.go, "Ambiguous move
# statements"; hashicorp/terraform v1.11.4). The root block must therefore keep moving the whole resource: moving it
# to ...system[0] directly would give [0] two sources.

moved {
  from = google_container_node_pool.system
  to   = google_container_node_pool.system[0]
}

moved {
  from = google_container_node_pool.training_cpu
  to   = google_container_node_pool.training_cpu[0]
}
