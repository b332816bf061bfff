"""User model factories shipped as a file: `path/file.py:function` and `gs://bucket/file.py:function`; and the rule
that a model folder's factory runs only when the user names its code (`--model-code`)."""

from __future__ import annotations

import hashlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from microfed.pipelines.submit import cluster_model as _cluster_model
from microfed.training import storage
from microfed.training.errors import MicrofedError
from microfed.training.export import export_model
from microfed.training.model_files import ModelCard, load_model, save_model
from microfed.training.models import (
    FactoryDigestError,
    ModelConfig,
    absolute_factory_path,
    build_model,
    check_model_name,
    factory_file,
    factory_sha256,
)
from microfed.training.shards import SplitConfig, write_shards
from microfed.training.step_aggregate import aggregate_step
from microfed.training.step_evaluate import evaluate_step
from microfed.training.step_train import train_step
from microfed.training.train import OptimConfig
from microfed.training.worker import WorkerConfig
from tests.conftest import synthetic_dataset
from tests.gcs_emulator import GcsEmulator, gcs  # noqa: F401

FACTORY = textwrap.dedent(
    """
    from dataclasses import dataclass

    from torch import nn


    @dataclass
    class Widths:  # a dataclass needs its module in sys.modules while it is defined
        hidden: int = 8


    def make_model(num_classes: int, in_channels: int, image_size: tuple[int, int]) -> nn.Module:
        height, width = image_size
        return nn.Sequential(
            nn.Conv2d(in_channels, Widths().hidden, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(Widths().hidden * (height // 2) * (width // 2), num_classes),
        )


    class Zoo:
        @staticmethod
        def tiny(num_classes: int, in_channels: int, image_size: tuple[int, int]) -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size[0] * image_size[1], num_classes))


    def not_a_model(num_classes: int, in_channels: int, image_size: tuple[int, int]) -> str:
        return "a string"


    NUMBER = 3
    """
)


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    path = tmp_path / "nets" / "my_net.py"
    path.parent.mkdir()
    path.write_text(FACTORY)
    return path


def config(name: str) -> ModelConfig:
    return ModelConfig(name=name, num_classes=3, in_channels=1, image_size=(16, 16))


@pytest.mark.parametrize(
    "name",
    [
        "cnn-small",
        "package.module:function",
        "nets/my_net.py:make_model",
        "/abs/nets/my net.py:Zoo.tiny",
        "my_net.py:make_model",
        "gs://bucket/models/my_net.py:make_model",
    ],
)
def test_the_factory_forms_are_accepted(name: str) -> None:
    check_model_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "my_net.py",
        "my_net.py:",
        "my_net.py:1st",
        ":make_model",
        ".py:make_model",
        "nets/.py:make_model",
        "package..module:function",
        "gs://Not_A_Bucket/my_net.py:make_model",
        "gs://bucket/:make_model",
        " my_net.py:make_model",
    ],
)
def test_malformed_factories_are_refused_with_the_forms(name: str) -> None:
    with pytest.raises(MicrofedError, match="malformed model factory") as caught:
        check_model_name(name)
    assert "path/to/file.py:function" in caught.value.hint and "gs://" in caught.value.hint


def test_factory_file_names_the_file_of_file_forms_only() -> None:
    assert factory_file("a/b.py:f") == "a/b.py"
    assert factory_file("gs://bucket/b.py:C.f") == "gs://bucket/b.py"
    assert factory_file("pkg.mod:f") is None and factory_file("resnet18") is None


def test_build_model_from_a_local_file(factory: Path) -> None:
    torch.manual_seed(0)
    model = build_model(config(f"{factory}:make_model"))
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 3)
    torch.manual_seed(0)
    again = build_model(config(f"{factory}:make_model"))  # the module is reused: same seed, same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    assert build_model(config(f"{factory}:Zoo.tiny"))(torch.zeros(1, 1, 16, 16)).shape == (1, 3)


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("missing", "has no attribute 'missing'"),
        ("NUMBER", "is a int, not a callable"),
        ("not_a_model", "returned str, not a torch.nn.Module"),
    ],
)
def test_a_missing_or_wrong_function_is_named(factory: Path, attribute: str, message: str) -> None:
    with pytest.raises(MicrofedError, match=message):
        build_model(config(f"{factory}:{attribute}"))


def test_a_missing_or_broken_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(MicrofedError, match=r"file .*gone\.py not found") as caught:
        build_model(config(f"{tmp_path / 'gone.py'}:make_model"))
    assert "gs://" in caught.value.hint
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_package_anywhere\n")
    with pytest.raises(MicrofedError, match=r"running .*broken\.py failed: ModuleNotFoundError"):
        build_model(config(f"{broken}:make_model"))
    broken.write_text("def make_model(:\n")
    with pytest.raises(MicrofedError, match="SyntaxError"):
        build_model(config(f"{broken}:make_model"))


def test_a_relative_factory_path_is_made_absolute_for_the_workers(
    factory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_factory_path("nets/my_net.py:make_model") == f"{factory}:make_model"
    assert absolute_factory_path("gs://bucket/x.py:f") == "gs://bucket/x.py:f"
    assert absolute_factory_path("pkg.mod:f") == "pkg.mod:f" and absolute_factory_path("cnn-small") == "cnn-small"
    with pytest.raises(MicrofedError, match=r"file .*nets/typo\.py not found"):
        absolute_factory_path("nets/typo.py:make_model")
    with pytest.raises(MicrofedError, match="malformed model factory"):
        absolute_factory_path("nets/my_net.py")


def test_submit_refuses_a_factory_file_on_this_machine(factory: Path) -> None:
    _cluster_model("gs://bucket/my_net.py:make_model")
    _cluster_model("pkg.mod:f")
    with pytest.raises(MicrofedError, match="names a file on this machine") as caught:
        _cluster_model(f"{factory}:make_model")
    assert "gcloud storage cp" in caught.value.hint


@pytest.mark.integration
def test_two_workers_train_a_factory_model_and_it_exports(factory: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(synthetic_dataset(n_train=90, n_test=30), shards, SplitConfig(val_fraction=0.0, workers=2))
    name = f"{factory}:make_model"
    cfg = WorkerConfig(
        shards=str(shards),
        out=str(tmp_path / "micro"),
        model=name,
        rounds=2,
        local_epochs=2,
        threads=1,
        optim=OptimConfig(batch_size=16, lr=0.01),
    )
    job = train_step(cfg, workers=2)
    assert [w["n_k"] for w in job["workers"]] == [45, 45]
    aggregate_step(tmp_path / "micro", tmp_path / "model")
    metrics = evaluate_step(tmp_path / "model", shards, tmp_path / "micro", tmp_path / "eval")
    assert metrics["accuracy"] > 0.8
    _, card = load_model(tmp_path / "model", model_code=str(factory))
    assert card.architecture.name == name  # the model card records the factory ...
    assert card.factory_sha256 == sha256_of(factory)  # ... and the sha256 of the file the workers trained with
    result = export_model(tmp_path / "model", tmp_path / "export", fmt="onnx", model_code=str(factory))
    assert result["parity"]["passed"]
    # without the factory file the architecture cannot be rebuilt: the error says which file is missing
    factory.rename(factory.with_suffix(".moved"))
    with pytest.raises(MicrofedError, match=r"my_net\.py not found"):
        export_model(tmp_path / "model", tmp_path / "export2", fmt="onnx", model_code=str(factory))


@pytest.mark.integration
def test_a_gs_factory_is_fetched_and_loaded(gcs: GcsEmulator) -> None:  # noqa: F811
    uri = gcs.uri("models/remote_net.py")
    storage.write_bytes(uri, FACTORY.replace("hidden: int = 8", "hidden: int = 5").encode())
    model = build_model(config(f"{uri}:make_model"))
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.out_channels == 5 and model(torch.zeros(1, 1, 16, 16)).shape == (1, 3)
    with pytest.raises(MicrofedError, match=r"model factory 'gs://.*/models/none\.py:make_model': gs://.*: not found"):
        build_model(config(f"{gcs.uri('models/none.py')}:make_model"))
    # the digest training records is the downloaded content's, and a load can insist on it
    digest = factory_sha256(f"{uri}:make_model")
    assert digest == hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    assert isinstance(build_model(config(f"{uri}:make_model"), factory_sha256=digest), torch.nn.Module)
    with pytest.raises(FactoryDigestError, match=f"has sha256 {digest}, expected 0{{64}}"):
        build_model(config(f"{uri}:make_model"), factory_sha256="0" * 64)


def test_the_cli_makes_a_relative_factory_path_absolute(
    factory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from microfed.pipelines.cli import build_parser, pipeline_arguments

    monkeypatch.chdir(tmp_path)
    values = pipeline_arguments(build_parser().parse_args(["run", "--model", "nets/my_net.py:make_model"]))
    assert values["model"] == f"{factory}:make_model"
    with pytest.raises(MicrofedError, match="malformed model factory"):
        pipeline_arguments(build_parser().parse_args(["run", "--model", "nets/my_net.py:"]))


@pytest.mark.e2e
def test_microfed_run_on_a_csv_with_a_factory_file(
    factory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import numpy as np
    from PIL import Image

    from microfed.pipelines.cli import main
    from tests.conftest import CLASSES, pattern_images

    data = tmp_path / "data"
    data.mkdir()
    lines = ["image,label,split"]
    for split, n, seed in (("train", 30, 1), ("test", 10, 2)):
        labels = np.repeat(np.arange(len(CLASSES)), n)
        for i, (img, y) in enumerate(zip(pattern_images(labels, 16, seed), labels, strict=True)):
            Image.fromarray(img).save(data / f"{split}-{i:03d}.png")
            lines.append(f"{split}-{i:03d}.png,{CLASSES[y]},{split}")
    (data / "list.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)  # relative --dataset and --model, as a user types them
    flags = ["--dataset", "data/list.csv", "--model", "nets/my_net.py:make_model", "--workers", "2"]
    flags += ["--rounds", "2", "--local-epochs", "3", "--batch-size", "16", "--lr", "0.01", "--json"]
    assert main(["run", "--runs-dir", str(tmp_path / "runs"), "--name", "r", *flags]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["class_names"] == list(CLASSES) and len(metrics["shard_sizes"]) == 2
    assert metrics["accuracy"] > 0.9
    assert (tmp_path / "runs" / "r" / "model.onnx").exists()


# ------------------------------------------------------------------ a model folder's factory runs only when named


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hostile(marker: Path) -> str:
    """A factory whose weights fit FACTORY's, and whose import leaves `marker` behind: proof that it ran."""
    return FACTORY + f"\nimport pathlib\n\npathlib.Path({str(marker)!r}).write_text('ran')\n"


def make_run(folder: Path, name: str, *, sha256: str | None, weights_from: Path) -> Path:
    """A model folder as training writes it, whose model_config.json names the factory `name` and records
    `sha256`; the weights are built by the (harmless) factory file `weights_from`."""
    torch.manual_seed(0)
    model = build_model(config(f"{weights_from}:make_model"))
    card = ModelCard(
        architecture=config(name), class_names=("a", "b", "c"), mean=(0.5,), std=(0.25,), factory_sha256=sha256
    )
    save_model(folder, model.state_dict(), card)
    return folder


def export_cli(run: Path, *flags: str) -> int:
    from microfed.pipelines.cli import main

    return main(["export", str(run), "--out", str(run / "export"), *flags])


def test_a_run_folder_naming_a_factory_file_runs_nothing(
    factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the folder someone sent, naming their file and recording its true sha256 (they wrote both).
    marker = tmp_path / "marker"
    evil = tmp_path / "sent" / "evil.py"
    evil.parent.mkdir()
    evil.write_text(hostile(marker))
    run = make_run(tmp_path / "sent" / "run", f"{evil}:make_model", sha256=sha256_of(evil), weights_from=factory)
    field = r"run/model_config\.json: architecture\.name names the model factory '.*evil\.py:make_model'"

    # Execute / Assert: every way of loading the folder refuses before any of the file runs.
    for load in (lambda: load_model(run), lambda: export_model(run, tmp_path / "out")):
        with pytest.raises(MicrofedError, match=field) as caught:
            load()
        assert caught.value.hint.startswith(f"if you trust that code, name it yourself: --model-code {evil}")
    assert export_cli(run) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "architecture.name" in err[0] and "--model-code" in err[1]
    assert not marker.exists() and not (tmp_path / "out").exists() and not (run / "export").exists()
    assert not any(m.startswith("microfed_user_factory_") and "evil" in str(v) for m, v in sys.modules.items())


def test_a_run_folder_naming_a_module_runs_nothing_until_that_module_is_named(
    factory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    package = tmp_path / "site" / "sent_nets_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "evil.py").write_text(hostile(marker))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("sent_nets_pkg", "sent_nets_pkg.evil"):  # whatever this test imports is gone afterwards
        monkeypatch.delitem(sys.modules, name, raising=False)
    run = make_run(tmp_path / "run", "sent_nets_pkg.evil:make_model", sha256=None, weights_from=factory)

    with pytest.raises(MicrofedError, match=r"'sent_nets_pkg\.evil:make_model'; rebuilding it would run that module"):
        export_model(run, tmp_path / "out")
    with pytest.raises(MicrofedError, match=r"--model-code names the module 'other\.nets'"):
        load_model(run, model_code="other.nets")
    assert not marker.exists() and "sent_nets_pkg" not in sys.modules

    assert export_cli(run, "--model-code", "sent_nets_pkg.evil") == 0  # named: the user chose to run it
    assert "parity" in capsys.readouterr().out and marker.exists()


def test_model_code_with_the_recorded_sha256_rebuilds_the_model(
    factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Trained elsewhere: the recorded path does not exist here; the user has the same file at another path.
    run = make_run(
        tmp_path / "run", "/home/alice/nets/my_net.py:make_model", sha256=sha256_of(factory), weights_from=factory
    )

    assert export_cli(run, "--model-code", str(factory)) == 0
    assert "parity: max |logit difference|" in capsys.readouterr().out
    model, card = load_model(run, model_code=f"{factory}:make_model")  # with the function, as --model takes it
    assert card.architecture.name == "/home/alice/nets/my_net.py:make_model"  # the card as recorded
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 3)


def test_a_named_file_with_another_sha256_is_refused_unless_allowed(
    factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    edited = tmp_path / "edited.py"
    edited.write_text(hostile(marker))  # the user's factory, edited after training
    recorded = sha256_of(factory)
    run = make_run(tmp_path / "run", f"{factory}:make_model", sha256=recorded, weights_from=factory)

    with pytest.raises(MicrofedError) as caught:
        export_model(run, tmp_path / "out", model_code=str(edited))
    assert caught.value.message.endswith(
        f"model_config.json: factory_sha256 records {recorded}, but {edited} has sha256 {sha256_of(edited)}: "
        "the factory file changed since training"
    )
    assert "--allow-changed-model-code" in caught.value.hint
    assert not marker.exists() and not (tmp_path / "out").exists()

    assert export_cli(run, "--model-code", str(edited), "--allow-changed-model-code") == 0
    assert marker.exists()  # the user's explicit choice ran


def test_a_named_file_is_refused_when_no_sha256_was_recorded(factory: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", f"{factory}:make_model", sha256=None, weights_from=factory)  # an older run

    with pytest.raises(MicrofedError, match="it records no factory_sha256") as caught:
        load_model(run, model_code=str(factory))
    assert "--allow-changed-model-code" in caught.value.hint
    load_model(run, model_code=str(factory), allow_changed_model_code=True)


def test_model_code_of_the_wrong_kind_or_form_is_refused(factory: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", f"{factory}:make_model", sha256=sha256_of(factory), weights_from=factory)

    with pytest.raises(MicrofedError, match=r"file factory .* but --model-code 'pkg\.nets' is a module"):
        load_model(run, model_code="pkg.nets")
    with pytest.raises(MicrofedError, match=r"--model-code 'my net' is neither a \.py file nor a module name"):
        load_model(run, model_code="my net")


def test_built_in_models_load_without_model_code_and_refuse_it(tmp_path: Path) -> None:
    arch = ModelConfig(name="cnn-small", num_classes=3, in_channels=1, image_size=(16, 16))
    card = ModelCard.from_manifest(arch, {"class_names": ["a", "b", "c"], "mean": [0.5], "std": [0.25]})
    save_model(tmp_path, build_model(arch).state_dict(), card)

    assert card.factory_sha256 is None and load_model(tmp_path)[1] == card
    with pytest.raises(MicrofedError, match="built-in model 'cnn-small', which loads no model code") as caught:
        load_model(tmp_path, model_code="nets.py")
    assert caught.value.hint == "drop --model-code"


def test_the_pipelines_own_folders_load_the_recorded_factory_if_unchanged(factory: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", f"{factory}:make_model", sha256=sha256_of(factory), weights_from=factory)

    load_model(run, trust_recorded_code=True)
    factory.write_text(FACTORY.replace("hidden: int = 8", "hidden: int = 8  # edited"))
    with pytest.raises(MicrofedError, match="the factory file changed since training"):
        load_model(run, trust_recorded_code=True)


def test_training_records_the_factory_files_sha256(factory: Path) -> None:
    card = ModelCard.from_manifest(
        config(f"{factory}:make_model"), {"class_names": ["a", "b", "c"], "mean": [0.5], "std": [0.25]}
    )

    assert card.factory_sha256 == sha256_of(factory) == factory_sha256(f"{factory}:make_model")
    assert ModelCard.from_dict(card.to_dict()) == card
    assert factory_sha256("pkg.mod:f") is None and factory_sha256("resnet18") is None
    with pytest.raises(MicrofedError, match="factory_sha256 must be 64 lowercase hex digits or null, got 'abc'"):
        ModelCard.from_dict({**card.to_dict(), "factory_sha256": "abc"})
