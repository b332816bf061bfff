"""The split → train (local launcher) → aggregate → evaluate path with every folder a gs:// URI.

Storage is a real GCS-compatible HTTP server (gcp-storage-emulator) on loopback; the worker processes reach it
through STORAGE_EMULATOR_HOST like a PyTorchJob replica reaches GCS through Workload Identity.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from microfed.training import storage
from microfed.training.shards import SplitConfig
from microfed.training.step_aggregate import aggregate_step
from microfed.training.step_evaluate import evaluate_step
from microfed.training.step_split import SplitOptions, split_step
from microfed.training.step_train import train_step
from microfed.training.train import OptimConfig
from microfed.training.worker import WorkerConfig
from tests.conftest import CLASSES, write_zip
from tests.gcs_emulator import GcsEmulator, gcs  # noqa: F401

pytestmark = pytest.mark.integration


def test_steps_run_end_to_end_on_gs_uris(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    zip_uri = gcs.uri("uploads/shapes.zip")
    storage.write_bytes(zip_uri, write_zip(tmp_path / "shapes.zip").read_bytes())
    shards, micro, model, report = (gcs.uri(f"run/{name}") for name in ("shards", "micro", "model", "report"))

    summary = split_step(SplitOptions(source=zip_uri), SplitConfig(workers=2, val_fraction=0.2), shards)
    assert summary["class_names"] == list(CLASSES)
    assert {"dataset.json", "shard-00000.safetensors", "shard-00001.json", "test.safetensors"} <= set(
        storage.list_files(shards)
    )

    cfg = WorkerConfig(
        shards=shards,
        out=micro,
        model="cnn-small",
        rounds=2,
        local_epochs=3,
        threads=1,
        optim=OptimConfig(batch_size=16, lr=0.01),
    )
    job = train_step(cfg, workers=2)
    assert [w["n_k"] for w in job["workers"]] == [36, 36]
    written = set(storage.list_files(micro))
    assert {
        "micro-model-00000.safetensors",
        "micro-model-00001.safetensors",
        "job.json",
        "model_config.json",
        "logs/worker-00000.log",
    } <= written

    agg = aggregate_step(micro, model, shards)  # validates the last round on the bucket's validation split
    assert agg["num_examples"] == 72 and [h["round"] for h in agg["val_history"]] == [1, 2]
    assert {"model.safetensors", "model_config.json", "aggregate.json"} <= set(storage.list_files(model))

    metrics = evaluate_step(model, shards, micro, report)
    assert metrics["accuracy"] > 0.9 and len(metrics["round_accuracy"]) == 2
    assert storage.exists(storage.join(report, "metrics.json"))
    # nothing was written next to the test: every output went to the bucket
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes.zip"]
