"""The KFP pipeline root, recovered from an output artifact's URI, and the storage the PyTorchJob replicas need.

KFP 2.14's backend does not resolve `{{$.pipeline_root}}` (kubeflow/pipelines 2.14.3,
backend/src/v2/driver/resolve.go, `resolveInputParameter`: a runtime-value constant is replaced only when it
is one of `{{$.pipeline_job_name}}`, `{{$.pipeline_job_resource_name}}`, `{{$.pipeline_job_uuid}}`,
`{{$.pipeline_task_name}}`, `{{$.pipeline_task_uuid}}`; any other string is passed on verbatim). The root is
therefore read back from where an output artifact was placed. Two layouts exist:

KFP 2.14 backend   `<root>/<pipeline name>/<run id>/<task name>/<uuid>/<artifact>`
    backend/src/v2/driver/driver.go, `provisionOutputs`: `GenerateOutputURI(pipelineRoot, [taskName, salt,
    name], false)`, the salt a fresh `uuid.NewString()` (driver/container.go, `Container`); pipelineRoot is the
    run's root, `GenerateOutputURI(root, [pipelineName, runID], true)` (metadata/client.go, `GetPipeline`).
    `GenerateOutputURI` trims trailing '/' off the root and drops its query string (`?...`) from output URIs,
    so a root recovered here never has either. The run id and task name are the values the driver gives
    `{{$.pipeline_job_uuid}}` and `{{$.pipeline_task_name}}` (opts.RunID, opts.TaskName in resolve.go).
kfp.local (SDK 2.16.1 and 2.17.0)   `<root>/<pipeline name>-<%Y-%m-%d-%H-%M-%S-%f>/<task name>/<artifact>`
    sdk/python/kfp/local/executor_input_utils.py, `get_local_pipeline_resource_name`,
    `construct_local_task_root`, `artifact_type_schema_to_artifact_list`; `{{$.pipeline_task_name}}` resolves
    to the same task resource name (placeholder_utils.py, `resolve_individual_placeholder`), the run id to a
    random number that is not part of the path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath

from microfed.training.errors import MicrofedError
from microfed.training.layout import USAGE_CACHE_FILE
from microfed.training.storage import SCHEME, is_gcs, join

__all__ = [
    "PIPELINE_ROOT_HINT",
    "check_replica_uris",
    "pipeline_root_from_artifact_uri",
    "usage_cache_uri",
]

# The driver's output URI salt: uuid.NewString(), the canonical 36-character form.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# kfp.local's pipeline resource name: f"{pipeline_name}-{datetime.now():%Y-%m-%d-%H-%M-%S-%f}".
_LOCAL_RUN = re.compile(r".+-\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}-\d{6}")

PIPELINE_ROOT_HINT = (
    "set the Kubeflow Pipelines pipeline root to a gs:// bucket: `defaultPipelineRoot` in the `kfp-launcher` "
    "ConfigMap of the namespace the run executes in (infra/ sets it to the bucket: terraform output "
    "pipeline_root), or the run's pipeline_root when it is submitted "
    "(kfp.Client().create_run_from_pipeline_package(..., pipeline_root=...)); "
    "stock KFP uses minio://mlpipeline/v2/artifacts"
)


def pipeline_root_from_artifact_uri(uri: str, *, artifact: str, task_name: str, run_id: str = "") -> str | None:
    """The pipeline root under which KFP placed the output artifact `artifact` of task `task_name` at `uri`.

    Recognises the KFP 2.14 backend's layout (which needs the run's `run_id`, `{{$.pipeline_job_uuid}}`) and
    kfp.local's (see the module docstring); None when `uri` follows neither.
    """
    parts = uri.rstrip("/").split("/")
    if len(parts) > 5 and _backend_layout(parts[-5:], artifact=artifact, task_name=task_name, run_id=run_id):
        return _joined(parts[:-5])
    if len(parts) > 3 and _local_layout(parts[-3:], artifact=artifact, task_name=task_name):
        return _joined(parts[:-3])
    return None


def _backend_layout(tail: list[str], *, artifact: str, task_name: str, run_id: str) -> bool:
    """`<pipeline name>/<run id>/<task name>/<uuid>/<artifact>` (driver.go, `provisionOutputs`)."""
    pipeline, run, task, salt, name = tail
    return (
        bool(pipeline and run_id) and (run, task, name) == (run_id, task_name, artifact) and bool(_UUID.fullmatch(salt))
    )


def _local_layout(tail: list[str], *, artifact: str, task_name: str) -> bool:
    """`<pipeline name>-<timestamp>/<task name>/<artifact>` (kfp/local/executor_input_utils.py)."""
    run, task, name = tail
    return (task, name) == (task_name, artifact) and bool(_LOCAL_RUN.fullmatch(run))


def _joined(parts: list[str]) -> str | None:
    root = "/".join(parts)
    if root.endswith("://"):  # "gs://" alone: no bucket
        return None
    return root or "/"


def usage_cache_uri(artifact_uri: str, *, artifact: str, task_name: str, run_id: str = "") -> str:
    """`<pipeline root>/usage-cache.json`, or "" (no cache) when the root is unknown or not storage this code
    reads: a gs:// URI or an absolute local path (a minio:// or s3:// root would be taken for a relative path)."""
    root = pipeline_root_from_artifact_uri(artifact_uri, artifact=artifact, task_name=task_name, run_id=run_id)
    if root is None or not (is_gcs(root) or PurePosixPath(root).is_absolute()):
        return ""
    return join(root, USAGE_CACHE_FILE)


def check_replica_uris(uris: Mapping[str, str]) -> None:
    """Refuse, before any job exists, URIs that PyTorchJob replicas cannot reach: only gs:// is remote storage to
    training/storage.py, so minio://, s3:// or a path would be read as a folder in the replica's own file system.

    `uris` maps what each URI is (e.g. "shards") to the URI.
    """
    for what, uri in uris.items():
        if not is_gcs(uri):
            raise MicrofedError(
                f"the {what} artifact is at {uri}, which PyTorchJob replicas cannot reach: "
                f"they read and write {SCHEME} URIs only (the pipeline root is not a {SCHEME} bucket)",
                hint=PIPELINE_ROOT_HINT,
            )
