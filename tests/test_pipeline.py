"""The whole pipeline: compiled YAML, `microfed run` through kfp.local, and bad input failing early."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from kfp import components

from microfed.pipelines.cli import main
from microfed.pipelines.pipeline import compile_pipeline
from tests.conftest import CLASSES, write_zip

STEPS = {"split-dataset", "train", "aggregate", "evaluate", "export"}
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_compiled_yaml_loads_back_with_four_chained_steps(tmp_path: Path) -> None:
    path = compile_pipeline(tmp_path / "pipeline.yaml")
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "microfed"
    assert {"dataset", "model", "workers", "rounds", "local_epochs", "split", "seed"} <= set(
        loaded.component_spec.inputs
    )
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == STEPS
    assert tasks["train"]["dependentTasks"] == ["split-dataset"]
    assert tasks["aggregate"]["dependentTasks"] == ["split-dataset", "train"]  # the validation split
    assert set(tasks["evaluate"]["dependentTasks"]) == {"aggregate", "split-dataset", "train"}
    assert set(tasks["export"]["dependentTasks"]) == {"aggregate", "split-dataset"}
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["dataset"] == "fashion-mnist" and defaults["workers"] == 3 and defaults["split"] == "stratified"


def test_compile_command_writes_the_yaml(tmp_path: Path) -> None:
    assert main(["compile", "-o", str(tmp_path / "p.yaml")]) == 0
    assert set(yaml.safe_load((tmp_path / "p.yaml").read_text())["root"]["dag"]["tasks"]) == STEPS


def run(tmp_path: Path, *flags: str) -> int:
    return main(["run", "--runs-dir", str(tmp_path / "runs"), "--name", "r", *flags])


@pytest.mark.e2e
def test_run_on_a_zip_reports_per_class_results_by_the_zips_class_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zip_path = write_zip(tmp_path / "shapes.zip")
    code = run(
        tmp_path,
        "--dataset",
        str(zip_path),
        "--model",
        "cnn-small",
        "--workers",
        "2",
        "--rounds",
        "2",
        "--local-epochs",
        "3",
        "--batch-size",
        "16",
        "--lr",
        "0.01",
        "--val-fraction",
        "0.2",
        "--json",
    )
    assert code == 0
    # --json prints exactly the metrics (no progress lines), for scripts
    printed = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / "runs" / "r"
    assert {"model.safetensors", "model_config.json", "pipeline.yaml", "metrics.json"} <= {
        p.name for p in run_dir.iterdir()
    }
    m = json.loads((run_dir / "metrics.json").read_text())
    assert printed == m
    assert list(m["per_class_accuracy"]) == sorted(CLASSES)
    assert m["class_names"] == list(CLASSES)
    assert len(m["confusion_matrix"]) == 3 and len(m["round_accuracy"]) == 2
    # 90 training images: 18 held out to validate each round, 72 in two shards
    assert m["round_split"] == "validation" and m["selected_round"] in (1, 2)
    assert m["shard_sizes"] == [36, 36]
    assert m["accuracy"] > 0.9  # the bands are easy to learn
    assert {"split", "train", "aggregate", "evaluate", "total"} <= set(m["timings"])
    assert m["config"]["workers"] == 2 and m["config"]["model"] == "cnn-small"
    # the run's report: the same numbers, and the run's own total time
    report = (run_dir / "report.html").read_text()
    assert f"{m['accuracy']:.4f}" in report and "orchestration" in report
    # the export step left an ONNX model a user can run without torch
    assert {"model.onnx", "model.json"} <= {p.name for p in run_dir.iterdir()}
    import zipfile

    image = tmp_path / "square.png"
    image.write_bytes(zipfile.ZipFile(zip_path).read("shapes/test/square/0010.png"))
    assert main(["predict", str(run_dir / "model.onnx"), str(image)]) == 0
    path, label, probability = capsys.readouterr().out.strip().split("\t")
    assert path == str(image) and label == "square" and 0.5 < float(probability) <= 1.0
    # and `microfed export` writes TorchScript too, checked against PyTorch on the run's test images, which the
    # run's artifacts record locates in kfp.local's pipeline root
    artifacts = json.loads((run_dir / "artifacts.json").read_text())
    assert set(artifacts) == {"shards", "micro_models", "global_model", "report", "exported"}
    assert (run_dir / artifacts["shards"] / "test.safetensors").is_file() and artifacts["shards"].startswith("kfp/")
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    assert "parity" in capsys.readouterr().out and (run_dir / "export" / "model.torchscript.pt").exists()


@pytest.mark.e2e
@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (make data)")
def test_run_on_fashion_mnist_subset_learns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(tmp_path, "--train-limit", "3000", "--test-limit", "1000", "--rounds", "2", "--local-epochs", "1")
    assert code == 0
    m = json.loads((tmp_path / "runs" / "r" / "metrics.json").read_text())
    assert m["shard_sizes"] == [950, 950, 950]  # 3000 less the 5% validation split
    assert m["accuracy"] > 0.6 and len(m["round_accuracy"]) == 2
    out = capsys.readouterr().out
    assert "test accuracy" in out and str(tmp_path / "runs" / "r" / "model.safetensors") in out


def error_of(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


def test_unknown_dataset_and_model_fail_before_any_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, "--dataset", "imagenet-22k") == 2
    err = error_of(capsys)
    assert "imagenet-22k" in err and "fashion-mnist" in err
    assert run(tmp_path, "--model", "resnet9000") == 2
    assert "resnet9000" in error_of(capsys)
    assert run(tmp_path, "--split", "random") == 2
    assert "stratified" in error_of(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_zip_without_test_folder_fails_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zip_path = write_zip(tmp_path / "no-test.zip", with_test=False)
    assert run(tmp_path, "--dataset", str(zip_path), "--workers", "2") == 2
    err = error_of(capsys)
    assert "test/" in err and "no-test.zip" in err


@pytest.mark.e2e
def test_more_workers_than_a_class_can_feed_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zip_path = write_zip(tmp_path / "small.zip", per_class_train=4)
    assert run(tmp_path, "--dataset", str(zip_path), "--workers", "5") == 2
    err = error_of(capsys)
    assert "circle" in err and "workers" in err


def zip_without_test_images_of(source: Path, path: Path, cls: str, extra: dict[str, bytes]) -> Path:
    """A copy of `source` (a write_zip zip) without test images of class `cls`, plus the `extra` entries."""
    import zipfile

    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            if not info.filename.startswith(f"shapes/test/{cls}/"):
                out.writestr(info, src.read(info))
        for name, data in extra.items():
            out.writestr(name, data)
    return path


@pytest.mark.e2e
def test_undecodable_image_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # one unreadable image in train/, one in test/, and no test images at all for "triangle"
    zip_path = zip_without_test_images_of(
        write_zip(tmp_path / "shapes.zip"),
        tmp_path / "broken.zip",
        "triangle",
        {"shapes/train/circle/broken.png": b"\x89PNG not really", "shapes/test/square/bad.png": b"GIF89a nope"},
    )
    assert run(tmp_path, "--dataset", str(zip_path), "--workers", "2") == 2
    assert "broken.png" in error_of(capsys)
    # asked to, the run skips them and says so: in the shards' manifest, the summary, metrics.json and the report
    assert (
        main(
            [
                "run",
                "--runs-dir",
                str(tmp_path / "runs"),
                "--name",
                "skip",
                "--dataset",
                str(zip_path),
                "--workers",
                "2",
                "--model",
                "cnn-small",
                "--rounds",
                "1",
                "--local-epochs",
                "1",
                "--bad-images",
                "skip",
            ]
        )
        == 0
    )
    summary = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "skip"
    (manifest,) = (run_dir / "kfp").glob("*/split-dataset/shards/dataset.json")
    assert json.loads(manifest.read_text())["num_skipped_files"] == 2
    m = json.loads((run_dir / "metrics.json").read_text())
    skipped = m["skipped_images"]
    assert (skipped["total"], skipped["train"], skipped["test"]) == (2, 1, 1)
    assert [(e["split"], e["file"]) for e in skipped["examples"]] == [
        ("train", "shapes/train/circle/broken.png"),
        ("test", "shapes/test/square/bad.png"),
    ]
    assert "skipped images  2 unreadable, left out (--bad-images skip; train 1, test 1): " in summary
    assert "shapes/train/circle/broken.png, shapes/test/square/bad.png" in summary
    # the class without test images has no accuracy (null), not 0.0, and is left out of the class mean
    assert m["per_class_accuracy"]["triangle"] is None and m["classes_without_test_images"] == ["triangle"]
    assert m["macro_accuracy"] == pytest.approx(
        (m["per_class_accuracy"]["circle"] + m["per_class_accuracy"]["square"]) / 2
    )
    assert re.search(r"^ +triangle +no test images$", summary, re.MULTILINE)
    assert "(leaving out 1 class without test images)" in summary
    report = (run_dir / "report.html").read_text()
    assert "Skipped images" in report and "shapes/test/square/bad.png" in report and "train 1, test 1" in report
    assert "No test images for 1 of 3 classes: triangle" in report
    assert re.search(r">triangle</td>(<td[^>]*>[^<]*</td>){2}<td[^>]*>no test images</td>", report)


def test_the_summary_shows_skipped_images_and_classes_without_test_images_escaped() -> None:
    from microfed.pipelines.cli import _summary
    from microfed.pipelines.local_run import RunResult

    names = ["cat", "dog\x1b[2J", "emu"]
    metrics = {
        "accuracy": 0.75,
        "loss": 0.5,
        "num_test_examples": 8,
        "round_split": "test",
        "round_numbers": [1],
        "round_accuracy": [0.75],
        "shard_sizes": [10, 10],
        "class_names": names,
        "per_class_accuracy": {"cat": 1.0, "dog\x1b[2J": 0.5, "emu": None},
        "macro_accuracy": 0.75,
        "skipped_images": {
            "total": 7,
            "train": 6,
            "test": 1,
            "examples": [
                {"split": "train", "file": "train/cat/1.png", "reason": "cannot decode image train/cat/1.png"}
            ],
        },
        "timings": {"split": 1.0, "total": 2.0},
    }
    text = _summary(RunResult(run_dir=Path("runs/r"), metrics=metrics))
    assert "\x1b" not in text  # a name from the data cannot clear the terminal
    assert "dog\\x1b[2J  0.5000" in text and "emu         no test images" in text
    assert "class mean      0.7500  (leaving out 1 class without test images)" in text
    assert (
        "skipped images  7 unreadable, left out (--bad-images skip; train 6, test 1): train/cat/1.png and 6 more"
        in text
    )
    # a run that skipped nothing and has every class in its test set shows neither line's caveat
    clean = {**metrics, "per_class_accuracy": {n: 0.75 for n in names}, "skipped_images": {"total": 0}}
    text = _summary(RunResult(run_dir=Path("runs/r"), metrics=clean))
    assert "skipped images" not in text and "leaving out" not in text and "class mean      0.7500" in text


def test_compile_with_an_image_bakes_it_into_every_step_and_the_workers(tmp_path: Path) -> None:
    assert main(["compile", "--image", "europe-docker.pkg.dev/p/r/microfed:1.2", "-o", str(tmp_path / "p.yaml")]) == 0
    spec = yaml.safe_load((tmp_path / "p.yaml").read_text())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"europe-docker.pkg.dev/p/r/microfed:1.2"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["worker_image"]["defaultValue"] == "europe-docker.pkg.dev/p/r/microfed:1.2"
    # uploaded to Kubeflow, the train step launches the job kind the cluster serves unless told otherwise
    assert params["launcher"]["defaultValue"] == "auto"
    # and the result still loads as the same four-step pipeline
    assert set(components.load_component_from_file(str(tmp_path / "p.yaml")).component_spec.inputs) >= {"dataset"}
    assert set(spec["root"]["dag"]["tasks"]) == STEPS
