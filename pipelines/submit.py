"""Upload the pipeline to Kubeflow Pipelines and start a run: what `microfed submit` does.

Thin on purpose: the pipeline is compiled exactly as `microfed compile` writes it, and everything that talks to
the server goes through `kfp.Client`, so authentication is KFP's own (a bearer token, or the credentials
`kfp.Client` finds itself). What this module adds is the upload policy (a new *version* of an existing pipeline,
so runs stay grouped under one name in the UI) and errors that say how to reach the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kfp
import kfp_server_api
import urllib3

from microfed.pipelines.pipeline import PIPELINE_NAME, compile_pipeline
from microfed.training.config import RunConfig
from microfed.training.errors import MicrofedError
from microfed.training.layout import PIPELINE_FILE

__all__ = [
    "DEFAULT_EXPERIMENT",
    "PORT_FORWARD_HINT",
    "SubmitResult",
    "cluster_arguments",
    "cluster_dataset",
    "cluster_model",
    "run_url",
    "submit",
]

DEFAULT_EXPERIMENT = "microfed"
# Pipeline parameters that are not run settings: the workers' image (`compile --image`).
_NOT_RUN_SETTINGS = ("worker_image",)

PORT_FORWARD_HINT = (
    "check the URL; without an ingress, forward the Kubeflow Pipelines UI with "
    "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` and pass --host http://localhost:8080"
)
_AUTH_HINT = (
    "pass a token with --token (or KF_PIPELINES_TOKEN), and on a multi-user installation your profile's "
    "namespace with --namespace"
)
# kfp.Client reads this to build its own links; ours follow it so both point at the same UI.
_UI_ENDPOINT_ENV = "KF_PIPELINES_UI_ENDPOINT"
# kfp's filter protocol: operation 1 is EQUALS (the value kfp.Client.get_pipeline_id sends).
_EQUALS = 1


@dataclass(frozen=True, kw_only=True)
class SubmitResult:
    """What a submission created on the server."""

    pipeline_id: str
    """The pipeline the run belongs to (created by the first submission with its name)."""
    version_id: str
    """The pipeline version uploaded by this submission, which the run executes."""
    run_id: str
    """The run's id in Kubeflow Pipelines."""
    run_url: str
    """The run's page in the Kubeflow Pipelines UI."""


def submit(
    host: str,
    arguments: dict[str, Any],
    *,
    namespace: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    pipeline_name: str = PIPELINE_NAME,
    image: str | None = None,
    existing_token: str | None = None,
    client: kfp.Client | None = None,
) -> SubmitResult:
    """Compile the pipeline, upload it (a new version when `pipeline_name` exists) and run it with `arguments`.

    `host` is the Kubeflow Pipelines endpoint (the UI's address serves the API too). `namespace` is the
    profile namespace of a multi-user installation: the pipeline and the experiment are created there; without
    it the pipeline is shared. `client` replaces the `kfp.Client` built from host, namespace and token, for
    authentication that needs more options (IAP client ids, cookies, credentials objects).
    """
    host = _check_host(host)
    arguments = cluster_arguments(arguments)
    with tempfile.TemporaryDirectory() as tmp:
        package = str(compile_pipeline(Path(tmp) / PIPELINE_FILE, image=image))
        # kfp prints a "... details: URL" line per call; on stderr they stay visible without mixing into
        # what a caller reads from stdout (the CLI prints only the run URL there).
        with _server_errors(host), contextlib.redirect_stdout(sys.stderr):
            kfp_client = client or _connect(host, namespace, existing_token)
            pipeline_id, version_id = _upload(kfp_client, package, pipeline_name, namespace)
            experiment_id = kfp_client.create_experiment(experiment, namespace=namespace).experiment_id
            run = kfp_client.run_pipeline(
                experiment_id=experiment_id,
                job_name=f"{pipeline_name} {_utc_now():%Y-%m-%d %H:%M:%S} UTC",
                pipeline_id=pipeline_id,
                version_id=version_id,
                params=arguments,
            )
    return SubmitResult(
        pipeline_id=pipeline_id, version_id=version_id, run_id=run.run_id, run_url=run_url(host, run.run_id)
    )


def cluster_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The run's arguments checked before anything is uploaded: as RunConfig checks them (training/config.py), and
    for what the cluster can read. The dataset must be a built-in name or a gs:// URI, a model factory a gs:// file
    or an installed package: paths on this machine mean nothing in a pod."""
    values = dict(arguments)
    RunConfig.from_flat({k: v for k, v in values.items() if k not in _NOT_RUN_SETTINGS})
    if "dataset" in values:
        values["dataset"] = cluster_dataset(values["dataset"])
    if "model" in values:
        cluster_model(values["model"])
    return values


def cluster_dataset(dataset: str) -> str:
    """The dataset as the cluster reads it: a built-in name or a gs:// URI, never a path on this machine."""
    from microfed.training.datasets import DATASET_NAMES

    if dataset.startswith("gs://"):
        return dataset
    name = dataset.strip().lower().replace("_", "-")
    if name in DATASET_NAMES:
        return name
    raise MicrofedError(
        f"--dataset {dataset!r} is not a dataset name or a gs:// URI; the cluster cannot read paths on this machine",
        hint=f"copy it to a bucket (gcloud storage cp -r {dataset} gs://BUCKET/) and pass --dataset gs://BUCKET/..., "
        f"or use one of {', '.join(DATASET_NAMES)}",
    )


def cluster_model(model: str) -> None:
    """Refuse a factory file on this machine: the cluster's workers cannot read it."""
    from microfed.training.models import factory_file

    file = factory_file(model)
    if file is not None and not file.startswith("gs://"):
        raise MicrofedError(
            f"--model {model!r} names a file on this machine; the cluster's workers cannot read it",
            hint=f"copy it to a bucket (gcloud storage cp {file} gs://BUCKET/) and pass "
            "--model gs://BUCKET/FILE.py:FUNCTION, or install its package in the image and pass "
            "package.module:function",
        )


def run_url(host: str, run_id: str) -> str:
    """The run's page in the UI, in the form `kfp.Client` prints (`KF_PIPELINES_UI_ENDPOINT` wins over host)."""
    ui = os.environ.get(_UI_ENDPOINT_ENV) or host
    if not ui.startswith(("http://", "https://")):
        ui = f"http://{ui}"
    return f"{ui.rstrip('/')}/#/runs/details/{run_id}"


def _check_host(host: str) -> str:
    # kfp.Client would silently prefix https://, which fails with a TLS error against a port-forward.
    host = host.strip().rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise MicrofedError(
            f"--host {host!r} needs a scheme", hint="write http://HOST:PORT or https://HOST, e.g. http://localhost:8080"
        )
    return host


def _connect(host: str, namespace: str | None, existing_token: str | None) -> kfp.Client:
    options: dict[str, Any] = {"host": host, "existing_token": existing_token}
    # kfp.Client treats any namespace other than its default "kubeflow" as an explicit choice, so None is left
    # out rather than passed: the namespace saved by `kfp` in ~/.config/kfp/context.json then still applies.
    if namespace:
        options["namespace"] = namespace
    with warnings.catch_warnings():
        # A FutureWarning on every construction about server versions older than any we support.
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(**options)


def _upload(client: kfp.Client, package: str, name: str, namespace: str | None) -> tuple[str, str]:
    """(pipeline id, version id) of `package` uploaded as `name`: a new pipeline, or a new version of it."""
    pipeline_id = _find_pipeline(client, name, namespace)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(package, pipeline_name=name, namespace=namespace).pipeline_id
        # The upload creates the pipeline's first version but answers with the pipeline only.
        versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
        if not versions.pipeline_versions:
            raise MicrofedError(f"Kubeflow Pipelines created pipeline {name!r} ({pipeline_id}) without a version")
        return pipeline_id, versions.pipeline_versions[0].pipeline_version_id
    # Version names must be unique within a pipeline; milliseconds keep quick resubmissions apart.
    version_name = f"{name}-{_utc_now():%Y%m%d-%H%M%S-%f}"[:-3]
    version = client.upload_pipeline_version(package, pipeline_version_name=version_name, pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id


def _find_pipeline(client: kfp.Client, name: str, namespace: str | None) -> str | None:
    # kfp.Client.get_pipeline_id cannot look inside a namespace; this is the same query with one.
    name_filter = json.dumps({"predicates": [{"operation": _EQUALS, "key": "display_name", "stringValue": name}]})
    found = client.list_pipelines(filter=name_filter, namespace=namespace, page_size=2).pipelines or []
    if len(found) > 1:
        raise MicrofedError(
            f"Kubeflow Pipelines has several pipelines named {name!r}",
            hint="delete the extra ones in the UI, or submit under another name with --pipeline-name",
        )
    return found[0].pipeline_id if found else None


@contextlib.contextmanager
def _server_errors(host: str) -> Iterator[None]:
    """Turn kfp's transport and HTTP errors into MicrofedError that names the host and what to do."""
    try:
        yield
    except MicrofedError:
        raise
    except urllib3.exceptions.HTTPError as e:
        # Connection refused, unknown name, reset: raised straight through kfp_server_api by urllib3.
        reason = getattr(e, "reason", None) or e
        raise MicrofedError(f"cannot reach Kubeflow Pipelines at {host}: {reason}", hint=PORT_FORWARD_HINT) from e
    except kfp_server_api.ApiException as e:
        raise _api_error(host, e) from e
    except TimeoutError as e:
        # kfp.Client's health check gives up after several refused attempts.
        raise MicrofedError(f"Kubeflow Pipelines at {host} did not pass its health check: {e}", hint=_AUTH_HINT) from e
    except ValueError as e:
        # kfp's own checks, e.g. several experiments with the requested name.
        raise MicrofedError(f"Kubeflow Pipelines at {host}: {e}", hint="pick another --experiment") from e


def _api_error(host: str, e: kfp_server_api.ApiException) -> MicrofedError:
    if not e.status:  # kfp_server_api reports TLS failures with status 0
        return MicrofedError(f"cannot reach Kubeflow Pipelines at {host}: {e.reason}", hint=PORT_FORWARD_HINT)
    detail = _server_message(e.body) or e.reason
    message = f"Kubeflow Pipelines at {host} answered HTTP {e.status}: {detail}"
    if e.status in (401, 403):
        return MicrofedError(message, hint=_AUTH_HINT)
    if e.status == 404:
        return MicrofedError(message, hint=f"is {host} the Kubeflow Pipelines endpoint? {PORT_FORWARD_HINT}")
    return MicrofedError(message)


def _server_message(body: Any) -> str:
    # The API server answers errors as a JSON google.rpc.Status ({"error"|"message": ...}); proxies in front of
    # it may answer HTML, which is not worth repeating.
    try:
        status = json.loads(body)
    except (TypeError, ValueError):
        return ""
    if not isinstance(status, dict):
        return ""
    return str(status.get("message") or status.get("error") or "")


def _utc_now() -> datetime:
    return datetime.now(UTC)
