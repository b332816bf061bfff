"""training/layout.py: the typed records read back as written, a bad record is refused with its file and key named,
and no other module of the packages spells one of its file names."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from microfed.training import layout
from microfed.training.errors import MicrofedError
from microfed.training.layout import (
    TEST_FILES,
    DatasetManifest,
    JobRecord,
    PartManifest,
    RunArtifacts,
    WorkerRecord,
)
from microfed.training.shards import SplitConfig, write_shards
from tests.conftest import synthetic_dataset

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "components", "pipelines")


def manifest() -> DatasetManifest:
    return {
        "dataset": "shapes",
        "class_names": ["a", "b"],
        "image_shape": [1, 4, 4],
        "mean": [0.5],
        "std": [0.25],
        "split": {"split": "iid", "seed": 3, "alpha": 0.5, "ratios": None, "workers": 1, "val_fraction": 0.0},
        "num_skipped_files": 0,
        "num_train_examples": 2,
        "num_val_examples": 0,
        "num_test_examples": 1,
        "shards": [{"file": "shard-00000.safetensors", "num_examples": 2, "class_histogram": [1, 1], "sha256": "0"}],
        "skipped_files": [],
    }


def worker(rank: int) -> WorkerRecord:
    return {
        "rank": rank,
        "n_k": 2,
        "file": layout.micro_model_file(rank),
        "device": "cpu",
        "threads": 1,
        "rounds": [],
        "resumed_from_round": 0,
        "stopped_after_round": 1,
        "seconds": 0.5,
        "usage": {},
    }


def test_a_written_dataset_manifest_reads_back_typed_with_the_bytes_of_plain_json(tmp_path: Path) -> None:
    layout.write_dataset_manifest(tmp_path, manifest())
    path = tmp_path / layout.DATASET_FILE
    assert path.read_text() == json.dumps(manifest(), indent=2, sort_keys=True) + "\n"
    back = layout.read_dataset_manifest(tmp_path)
    assert back == manifest() and back["split"]["workers"] == 1 and back["split"]["split"] == "iid"


def test_job_worker_metrics_and_artifact_records_read_back(tmp_path: Path) -> None:
    job: JobRecord = {"config": {"rounds": 1}, "workers": [worker(0), worker(1)], "plan": None, "usage": None,
                      "seconds": 1.0}  # fmt: skip
    layout.write_job_record(tmp_path, job)
    assert layout.read_job_record(tmp_path) == job
    layout.write_worker_record(tmp_path, worker(1))
    path = tmp_path / layout.worker_record_file(1)
    assert layout.parse_worker_record(json.loads(path.read_text()), path) == worker(1)
    artifacts: RunArtifacts = {
        "shards": "kfp/a/shards",
        "micro_models": "kfp/b/micro_models",
        "global_model": "kfp/c/global_model",
        "report": "kfp/d/report",
        "exported": "kfp/e/exported",
    }
    layout.write_run_artifacts(tmp_path, artifacts)
    assert layout.read_run_artifacts(tmp_path) == artifacts


def test_a_dataset_manifest_without_a_required_key_is_refused_naming_the_file_and_the_key(tmp_path: Path) -> None:
    incomplete = {k: v for k, v in manifest().items() if k != "shards"}
    (tmp_path / layout.DATASET_FILE).write_text(json.dumps(incomplete))
    with pytest.raises(MicrofedError, match=rf"{re.escape(str(tmp_path / layout.DATASET_FILE))}: missing key 'shards'"):
        layout.read_dataset_manifest(tmp_path)


def test_a_record_that_is_not_an_object_or_no_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / layout.JOB_FILE).write_text("[1, 2]")
    with pytest.raises(MicrofedError, match=r"job\.json: expected a JSON object, got list"):
        layout.read_job_record(tmp_path)
    with pytest.raises(MicrofedError, match=r"metrics\.json: file not found"):
        layout.read_metrics(tmp_path)
    with pytest.raises(MicrofedError, match=r"worker-00002\.json: missing key 'device' \(and 1 more\)"):
        record = {k: v for k, v in worker(2).items() if k not in ("device", "usage")}
        layout.parse_worker_record(record, layout.worker_record_file(2))


def test_the_split_writes_the_records_layout_describes(tmp_path: Path) -> None:
    data = synthetic_dataset(n_train=24, n_test=6)
    summary = write_shards(data, tmp_path, SplitConfig(workers=2, split="iid", val_fraction=0.25))
    assert set(summary) == DatasetManifest.__required_keys__  # `seconds` is the split step's
    assert set(summary["split"]) == {"split", "seed", "alpha", "ratios", "workers", "val_fraction"}
    assert summary["split"]["workers"] == 2 and summary["split"]["split"] == "iid"
    for files in (layout.shard_files(0), layout.shard_files(1), TEST_FILES, layout.VAL_FILES):
        assert (tmp_path / files.tensors).is_file()
        part = layout.read_part_manifest(tmp_path / files.manifest)
        assert set(part) == PartManifest.__required_keys__ and part["file"] == files.tensors


def test_file_names_of_numbered_files() -> None:
    assert layout.shard_files(3) == ("shard-00003.safetensors", "shard-00003.json")
    assert layout.worker_log_file(12) == "worker-00012.log"
    assert layout.round_of_checkpoint(layout.round_checkpoint_file(42)) == 42
    assert layout.round_of_checkpoint("round-42.safetensors") is None
    assert layout.round_of_checkpoint(layout.BEST_ROUND_FILE) is None
    # the two model files a run folder holds have two names
    assert layout.GLOBAL_MODEL_FILE != layout.ONNX_MODEL_FILE


def test_the_recorded_test_set_of_a_run_folder_or_none(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert layout.recorded_test_set(run) is None  # no record: a run folder of an older microfed
    shards = run / "kfp" / "x" / "shards"
    layout.write_run_artifacts(
        run,
        {"shards": "kfp/x/shards", "micro_models": "m", "global_model": "g", "report": "r", "exported": "e"},
    )
    assert layout.recorded_test_set(run) is None  # the record, but its shards are gone
    shards.mkdir(parents=True)
    (shards / TEST_FILES.tensors).write_bytes(b"")
    assert layout.recorded_test_set(run) == shards / TEST_FILES.tensors
    moved = tmp_path / "moved"
    run.rename(moved)  # the record holds paths relative to the run folder
    assert layout.recorded_test_set(moved) == moved / "kfp" / "x" / "shards" / TEST_FILES.tensors


# ------------------------------------------------------------------------------- one place for the names

# A file name: something, a dot and one of the extensions the packages write; `{}` stands for an f-string's field.
_FILE_NAME = re.compile(r"[\w{}.-]*[\w}]\.(json|jsonl|safetensors|log|onnx|pt|html|yaml)")


def _template(node: ast.JoinedStr) -> str:
    """An f-string with each field as `{}`: f"worker-{rank:05d}.json" → "worker-{}.json"."""
    return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)


def _file_names(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr):
            text = _template(node)
        else:
            continue
        if _FILE_NAME.fullmatch(text):
            found.append((node.lineno, text))
    return found


def test_no_module_but_layout_spells_a_layout_file_name() -> None:
    names = {text for _, text in _file_names(ast.parse((REPO / "training" / "layout.py").read_text()))}
    assert {"dataset.json", "job.json", "worker-{}.json", "model.safetensors", "model.onnx", "artifacts.json"} <= names
    spelled = set()
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel == "training/layout.py":
                continue
            for line, text in _file_names(ast.parse(path.read_text(encoding="utf-8"))):
                if text in names:
                    spelled.add((rel, text, line))
    assert not spelled, f"use training/layout.py's names instead of {sorted(spelled)}"
