"""Each component through kfp.local (SubprocessRunner, this environment), chained by their artifacts."""

# No `from __future__ import annotations`: the pipelines below need real annotation objects for KFP.

import json
from pathlib import Path
from typing import NamedTuple

import pytest
from kfp import dsl, local

from microfed.components import aggregate, evaluate, split_dataset, train
from microfed.training.io import read_json, read_safetensors
from tests.conftest import CLASSES

pytestmark = pytest.mark.integration


@pytest.fixture
def kfp_local(tmp_path: Path) -> Path:
    root = tmp_path / "kfp-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    return root


# kfp.local runs a component with input artifacts only inside a pipeline: these one-step pipelines import the
# upstream artifacts (dsl.importer) and run exactly one of our components.
@dsl.pipeline(name="train-only")
def train_only(shards_uri: str, model: str) -> dsl.Model:
    shards = dsl.importer(artifact_uri=shards_uri, artifact_class=dsl.Dataset)
    task = train(shards=shards.output, model=model, rounds=2, local_epochs=3, batch_size=16, lr=0.01, launcher="local")
    return task.outputs["micro_models"]


@dsl.pipeline(name="aggregate-only")
def aggregate_only(micro_uri: str, shards_uri: str) -> dsl.Model:
    micro = dsl.importer(artifact_uri=micro_uri, artifact_class=dsl.Model)
    shards = dsl.importer(artifact_uri=shards_uri, artifact_class=dsl.Dataset)
    return aggregate(micro_models=micro.output, shards=shards.output).outputs["global_model"]


class EvalOutputs(NamedTuple):
    metrics: dsl.Metrics
    classification: dsl.ClassificationMetrics
    report: dsl.Artifact


@dsl.pipeline(name="evaluate-only")
def evaluate_only(model_uri: str, shards_uri: str, micro_uri: str) -> EvalOutputs:
    task = evaluate(
        global_model=dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model).output,
        shards=dsl.importer(artifact_uri=shards_uri, artifact_class=dsl.Dataset).output,
        micro_models=dsl.importer(artifact_uri=micro_uri, artifact_class=dsl.Model).output,
    )
    return EvalOutputs(
        metrics=task.outputs["metrics"],
        classification=task.outputs["classification"],
        report=task.outputs["report"],
    )


@pytest.mark.filterwarnings("ignore:.*non-Python base image.*")
def test_components_run_one_by_one_on_a_zip(kfp_local: Path, shapes_zip: Path) -> None:
    split = split_dataset(dataset=str(shapes_zip), workers=2, seed=3, val_fraction=0.2)
    shards = Path(split.outputs["shards"].path)
    summary = read_json(shards / "dataset.json")
    assert summary["class_names"] == list(CLASSES)
    # 90 training images: 18 held out for validation, 72 into two shards
    assert summary["num_val_examples"] == 18
    assert [s["num_examples"] for s in summary["shards"]] == [36, 36]
    assert split.outputs["shards"].metadata["workers"] == 2

    micro = Path(train_only(shards_uri=str(shards), model="cnn-small").output.path)
    assert sorted(p.name for p in micro.glob("micro-model-*.safetensors")) == [
        "micro-model-00000.safetensors",
        "micro-model-00001.safetensors",
    ]
    assert [w["n_k"] for w in read_json(micro / "job.json")["workers"]] == [36, 36]

    agg = aggregate_only(micro_uri=str(micro), shards_uri=str(shards)).output
    model_dir = Path(agg.path)
    state, meta = read_safetensors(model_dir / "model.safetensors")
    assert meta["n"] == "72" and state
    assert agg.metadata["strategy"] == "fedavg" and agg.metadata["round"] in (1, 2)
    assert json.loads((model_dir / "model_config.json").read_text())["class_names"] == list(CLASSES)

    ev = evaluate_only(model_uri=str(model_dir), shards_uri=str(shards), micro_uri=str(micro)).outputs
    metrics = ev["metrics"].metadata
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert {"round_1_val_accuracy", "round_2_val_accuracy", "accuracy_circle", "accuracy_triangle"} <= set(metrics)
    assert metrics["selected_round"] == agg.metadata["round"]
    # what the UI's scalar metrics table shows: every value a number, shard sizes and step timings among them
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert (metrics["shard_0_examples"], metrics["shard_1_examples"]) == (36, 36)
    assert {"seconds_split", "seconds_train", "seconds_aggregate", "seconds_evaluate"} <= set(metrics)
    # what the Kubeflow UI reads to draw the confusion matrix
    cm = ev["classification"].metadata["confusionMatrix"]
    assert [a["displayName"] for a in cm["annotationSpecs"]] == list(CLASSES)
    assert sum(sum(r["row"]) for r in cm["rows"]) == 30
    report = read_json(Path(ev["report"].path) / "metrics.json")
    assert report["accuracy"] == metrics["accuracy"]
    assert set(report["per_class_accuracy"]) == set(CLASSES)


@pytest.mark.filterwarnings("ignore:.*non-Python base image.*")
def test_a_failing_train_step_fails_with_the_workers_error(
    kfp_local: Path, shapes_zip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = split_dataset(dataset=str(shapes_zip), workers=2)
    with pytest.raises(RuntimeError):
        train_only(shards_uri=split.outputs["shards"].path, model="no_such_module:factory")
    out = capsys.readouterr().out
    assert "no_such_module" in out
    assert "WorkerFailed: worker 0 exited with code 2" in out
