"""The pipeline root read back from artifact URIs (issue 12, defect 3) and the gs:// check (defect 10).

Backend URIs are built the way KFP 2.14.3 builds them (`_generate_output_uri` ports
backend/src/v2/metadata/client.go, `GenerateOutputURI`, as backend/src/v2/driver/driver.go, `provisionOutputs`,
and metadata/client.go, `GetPipeline`, call it); kfp.local URIs come from a real kfp.local run.
"""

# No `from __future__ import annotations`: the KFP component below needs real annotation objects.

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from kfp import dsl, local

from microfed.components import train_adapter
from microfed.training.errors import MicrofedError
from microfed.training.pipeline_root import check_replica_uris, pipeline_root_from_artifact_uri, usage_cache_uri

RUN_ID = "9b2f7c1e-55a4-4a8e-9c1d-0e3b6f1a2d44"


def _generate_output_uri(pipeline_root: str, paths: list[str], preserve_query: bool) -> str:
    """kubeflow/pipelines 2.14.3, backend/src/v2/metadata/client.go, `GenerateOutputURI`, line by line."""
    root, _, query = pipeline_root.partition("?")
    suffix = f"?{query}" if query and preserve_query else ""
    return f"{root.rstrip('/')}/{'/'.join(paths)}{suffix}"


def backend_uri(pipeline_root: str, *, task: str = "train", artifact: str = "micro_models") -> str:
    """An output artifact URI as the 2.14.3 driver makes it: the run's root is `GetPipeline`'s
    GenerateOutputURI(root, [pipelineName, runID], true); `provisionOutputs` appends [taskName,
    uuid.NewString(), name] with the query dropped."""
    run_root = _generate_output_uri(pipeline_root, ["microfed", RUN_ID], True)
    return _generate_output_uri(run_root, [task, str(uuid.uuid4()), artifact], False)


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("gs://mf-bucket/pipeline-root", "gs://mf-bucket/pipeline-root"),  # infra/: gs://<bucket>/pipeline-root
        ("gs://mf-bucket/pipeline-root/", "gs://mf-bucket/pipeline-root"),
        ("gs://mf-bucket", "gs://mf-bucket"),
        ("minio://mlpipeline/v2/artifacts", "minio://mlpipeline/v2/artifacts"),  # config/env.go's default
        ("s3://bucket/kfp?region=eu-west-1&endpoint=s3.example.com", "s3://bucket/kfp"),
    ],
)
def test_the_root_is_read_back_from_a_backend_artifact_uri(root: str, expected: str) -> None:
    uri = backend_uri(root)

    assert pipeline_root_from_artifact_uri(uri, artifact="micro_models", task_name="train", run_id=RUN_ID) == expected


def test_a_backend_uri_of_another_run_task_or_artifact_is_not_taken_for_the_layout() -> None:
    uri = backend_uri("gs://mf-bucket/pipeline-root")
    find = pipeline_root_from_artifact_uri

    assert find(uri, artifact="micro_models", task_name="train", run_id="another-run") is None
    assert find(uri, artifact="micro_models", task_name="train") is None  # no run id: the layout is unknowable
    assert find(uri, artifact="micro_models", task_name="aggregate", run_id=RUN_ID) is None
    assert find(uri, artifact="shards", task_name="train", run_id=RUN_ID) is None
    assert find("gs://mf-bucket/somewhere/micro_models", artifact="micro_models", task_name="train") is None
    no_bucket = f"gs:///microfed/{RUN_ID}/train/{uuid.uuid4()}/micro_models"
    assert find(no_bucket, artifact="micro_models", task_name="train", run_id=RUN_ID) is None


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def _probe(micro_models: dsl.Output[dsl.Model], run_id: str = "", task_name: str = "") -> str:
    """Where kfp.local puts a train-like task's output, and what the placeholders resolve to there."""
    import json

    return json.dumps({"uri": micro_models.uri, "run_id": run_id, "task_name": task_name})


@dsl.pipeline(name="microfed")
def _probe_pipeline() -> str:
    task = _probe(run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER)
    return task.outputs["Output"]


@pytest.mark.integration
def test_the_root_is_read_back_from_a_real_kfp_local_artifact_uri(tmp_path: Path) -> None:
    root = tmp_path / "kfp-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    seen = json.loads(_probe_pipeline().output)

    # <root>/microfed-<timestamp>/<task>/micro_models (kfp/local/executor_input_utils.py)
    assert seen["uri"].startswith(f"{root}/microfed-") and seen["uri"].endswith("/micro_models")
    found = pipeline_root_from_artifact_uri(
        seen["uri"], artifact="micro_models", task_name=seen["task_name"], run_id=seen["run_id"]
    )
    assert found == str(root)
    assert usage_cache_uri(
        seen["uri"], artifact="micro_models", task_name=seen["task_name"], run_id=seen["run_id"]
    ) == str(root / "usage-cache.json")


def test_no_usage_cache_where_the_root_is_not_storage_this_code_reads() -> None:
    minio = backend_uri("minio://mlpipeline/v2/artifacts")

    assert usage_cache_uri(minio, artifact="micro_models", task_name="train", run_id=RUN_ID) == ""
    assert usage_cache_uri("relative/micro_models", artifact="micro_models", task_name="train") == ""


def test_only_gs_uris_pass_the_replica_check() -> None:
    check_replica_uris({"shards": "gs://b/pipeline-root/x/shards", "micro_models": "gs://b/y/micro_models"})

    for bad in ("minio://mlpipeline/v2/artifacts/x/shards", "s3://b/x/shards", "/tmp/x/shards"):
        with pytest.raises(MicrofedError, match="PyTorchJob replicas cannot reach") as caught:
            check_replica_uris({"shards": bad})
        assert "defaultPipelineRoot" in caught.value.hint and "kfp-launcher" in caught.value.hint


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The train step's arguments; no worker or job is started."""
    seen: dict[str, Any] = {}

    def fake_train_step(cfg: Any, workers: int, **kwargs: Any) -> dict[str, Any]:
        seen.update(cfg=cfg, workers=workers, **kwargs)
        return {"config": {}, "workers": [], "plan": None, "usage": None, "seconds": 0.0}

    monkeypatch.setattr(train_adapter, "train_step", fake_train_step)
    return seen


def _component_step(tmp_path: Path, launcher: str, shards_uri: str, out_uri: str, **kwargs: Any) -> None:
    shards = tmp_path / "shards"
    shards.mkdir(exist_ok=True)
    manifest = {
        "dataset": "d",
        "class_names": ["a"],
        "image_shape": [1, 2, 2],
        "mean": [0.5],
        "std": [0.25],
        "split": {"split": "iid", "seed": 0, "alpha": 0.5, "ratios": None, "workers": 2, "val_fraction": 0.0},
        "num_skipped_files": 0,
        "num_train_examples": 2,
        "num_val_examples": 0,
        "num_test_examples": 0,
        "shards": [{}, {}],  # two workers: all the component step reads
        "skipped_files": [],
    }
    (shards / "dataset.json").write_text(json.dumps(manifest))
    train_adapter.train_component_step(
        shards=(str(shards), shards_uri),
        out=(str(tmp_path / "micro_models"), out_uri),
        params={
            "launcher": launcher,
            "model": "cnn-small",
            "rounds": 1,
            "local_epochs": 1,
            "worker_image": "img",
            "job_namespace": "ns",
            "accelerators": "none",
            "timeout_minutes": 10,
            **kwargs,
        },
        run_id=RUN_ID,
        task_name="train",
    )


@pytest.mark.parametrize("launcher", ["local", "pytorchjob"])
def test_the_train_step_keeps_its_usage_cache_beside_the_backend_pipeline_root(
    tmp_path: Path, captured: dict[str, Any], launcher: str
) -> None:
    root = "gs://mf-bucket/pipeline-root"
    _component_step(tmp_path, launcher, backend_uri(root, task="split-dataset", artifact="shards"), backend_uri(root))

    assert captured["usage_cache"] == f"{root}/usage-cache.json"
    assert (captured["cluster"] is not None) == (launcher == "pytorchjob")


def test_an_explicit_usage_cache_or_off_wins(tmp_path: Path, captured: dict[str, Any]) -> None:
    uris = (backend_uri("gs://b/r", artifact="shards"), backend_uri("gs://b/r"))
    _component_step(tmp_path, "local", *uris, usage_cache="gs://elsewhere/cache.json")
    assert captured["usage_cache"] == "gs://elsewhere/cache.json"

    _component_step(tmp_path, "local", *uris, usage_cache="off")
    assert captured["usage_cache"] == ""


@pytest.mark.parametrize("root", ["minio://mlpipeline/v2/artifacts", "s3://kfp-bucket/artifacts"])
def test_a_cluster_run_under_a_non_gs_pipeline_root_fails_before_any_job(
    tmp_path: Path, captured: dict[str, Any], root: str
) -> None:
    shards, out = backend_uri(root, task="split-dataset", artifact="shards"), backend_uri(root)

    with pytest.raises(MicrofedError, match="PyTorchJob replicas cannot reach") as caught:
        _component_step(tmp_path, "pytorchjob", shards, out)

    assert root in str(caught.value) and "defaultPipelineRoot" in caught.value.hint
    assert captured == {}  # no train step, so no job


def test_a_local_launcher_under_a_minio_root_still_runs_without_a_usage_cache(
    tmp_path: Path, captured: dict[str, Any]
) -> None:
    root = "minio://mlpipeline/v2/artifacts"
    _component_step(tmp_path, "local", backend_uri(root, artifact="shards"), backend_uri(root))

    assert captured["usage_cache"] == ""  # not a relative "minio:/..." folder in the pod's working directory
