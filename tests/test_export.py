"""Export (ONNX, TorchScript) with its parity check, and torch-free prediction on image files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from microfed.training import export as export_module
from microfed.training.errors import MicrofedError
from microfed.training.export import EXPORT_FILES, SIDECAR_FILE, export_model, parity_images_from_shards
from microfed.training.model_files import ModelCard, load_model, save_model
from microfed.training.models import ModelConfig, build_model
from microfed.training.predict import Prediction, main, predict
from microfed.training.shards import SplitConfig, write_shards
from tests.conftest import CLASSES, synthetic_dataset

GRAY = ModelConfig(name="cnn-fmnist", num_classes=3, in_channels=1, image_size=(16, 16))
# Not square: a height/width mix-up anywhere (resize, graph input, sidecar) changes the result or fails.
RGB = ModelConfig(name="cnn-small", num_classes=4, in_channels=3, image_size=(12, 20))
RGB_CLASSES = ("cat", "dog", "bird", "fish")


def make_model_dir(path: Path, arch: ModelConfig, class_names: tuple[str, ...], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(arch)
    # Non-trivial BatchNorm statistics: an export in training mode (batch statistics) would not match.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    channels = arch.in_channels
    mean, std = (0.3, 0.5, 0.4)[:channels], (0.2, 0.25, 0.3)[:channels]
    card = ModelCard(architecture=arch, class_names=class_names, mean=mean, std=std)
    save_model(path, model.state_dict(), card)
    return path


def eager_logits(model_dir: Path, images: torch.Tensor) -> torch.Tensor:
    """The reference, written out by hand: (x / 255 - mean) / std, then the network in eval mode."""
    model, card = load_model(model_dir)
    mean = torch.tensor(card.mean).view(1, -1, 1, 1)
    std = torch.tensor(card.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return model.eval()((images.float() / 255 - mean) / std)


def random_images(arch: ModelConfig, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, arch.in_channels, *arch.image_size), dtype=torch.uint8, generator=g)


def write_pngs(folder: Path, images: torch.Tensor) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images.numpy()):
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        path = folder / f"image-{i}.png"
        Image.fromarray(pixels, mode="L" if image.shape[0] == 1 else "RGB").save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def gray_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("gray"), GRAY, CLASSES)


@pytest.fixture(scope="module")
def rgb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("rgb"), RGB, RGB_CLASSES)


@pytest.fixture(scope="module")
def gray_onnx(gray_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gray-export")
    export_model(gray_dir, out, fmt="onnx")
    return out / "model.onnx"


@pytest.fixture(scope="module")
def rgb_onnx(rgb_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rgb-export")
    export_model(rgb_dir, out, fmt="onnx")
    return out / "model.onnx"


# ----------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("which", ["gray", "rgb"])
def test_onnx_export_records_passing_parity_and_preprocessing(which: str, request: pytest.FixtureRequest) -> None:
    arch, classes = (GRAY, CLASSES) if which == "gray" else (RGB, RGB_CLASSES)
    model_dir: Path = request.getfixturevalue(f"{which}_dir")
    out = model_dir / "export"
    images = random_images(arch, 20)

    result = export_model(model_dir, out, fmt="onnx", parity_images=images)

    sidecar = json.loads((out / SIDECAR_FILE).read_text())
    entry = sidecar["exports"]["onnx"]
    assert result["path"] == str(out / "model.onnx") and (out / "model.onnx").is_file()
    assert entry["parity"]["passed"] is True and entry["parity"]["images"] == 20
    assert 0 <= entry["parity"]["max_abs_diff"] <= 1e-4
    assert entry["opset"] >= 17 and entry["bytes"] == (out / "model.onnx").stat().st_size
    assert sidecar["class_names"] == list(classes)
    height, width = arch.image_size
    described = sidecar["input"]
    assert (described["channels"], described["height"], described["width"]) == (arch.in_channels, height, width)
    assert (described["dtype"], described["layout"]) == ("uint8", "NCHW")
    assert sidecar["preprocessing"]["mean"] == [0.3, 0.5, 0.4][: arch.in_channels]
    # The file describes itself too: a lone model.onnx still knows its classes and input.
    proto = onnx.load(str(out / "model.onnx"))
    embedded = json.loads({p.key: p.value for p in proto.metadata_props}["microfed"])
    assert embedded["class_names"] == list(classes)
    graph_input = proto.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["batch", arch.in_channels, height, width]


def test_onnx_runtime_logits_equal_eager_pytorch(gray_dir: Path, gray_onnx: Path) -> None:
    import onnxruntime as ort

    images = random_images(GRAY, 7, seed=5)
    session = ort.InferenceSession(str(gray_onnx), providers=["CPUExecutionProvider"])

    logits = session.run(None, {"images": images.numpy()})[0]

    np.testing.assert_allclose(logits, eager_logits(gray_dir, images).numpy(), atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_takes_uint8_and_matches_eager(rgb_dir: Path, tmp_path: Path) -> None:
    result = export_model(rgb_dir, tmp_path, fmt="torchscript")

    assert result["parity"]["passed"] and result["parity"]["max_abs_diff"] <= 1e-4
    # The fixed random batch when no test images are given.
    assert result["parity"]["images"] == 32 and result["parity"]["data"].startswith("random")
    loaded = torch.jit.load(str(tmp_path / EXPORT_FILES["torchscript"]))
    images = random_images(RGB, 3, seed=9)
    torch.testing.assert_close(loaded(images), eager_logits(rgb_dir, images), atol=1e-4, rtol=0)


def test_resnet18_with_batchnorm_exports_in_eval_mode(tmp_path: Path) -> None:
    arch = ModelConfig(name="resnet18", num_classes=3, in_channels=1, image_size=(16, 16))
    model_dir = make_model_dir(tmp_path / "model", arch, CLASSES)

    result = export_model(model_dir, tmp_path / "out", fmt="onnx", parity_images=random_images(arch, 8))

    assert result["parity"]["passed"] and result["parity"]["max_abs_diff"] <= 1e-4


def test_parity_uses_the_test_images_of_a_shards_folder(gray_dir: Path, tmp_path: Path) -> None:
    write_shards(
        synthetic_dataset(n_train=30, n_test=12), tmp_path / "shards", SplitConfig(val_fraction=0.0, workers=2)
    )
    images = parity_images_from_shards(tmp_path / "shards", limit=10)

    result = export_model(gray_dir, tmp_path / "out", parity_images=images)

    assert images.shape == (10, 1, 16, 16) and result["parity"]["images"] == 10
    assert result["parity"]["data"] == "given images"


def test_both_formats_share_the_sidecar_until_the_weights_change(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "model", GRAY, CLASSES)
    out = tmp_path / "out"
    export_model(model_dir, out, fmt="onnx")
    export_model(model_dir, out, fmt="torchscript")
    assert sorted(json.loads((out / SIDECAR_FILE).read_text())["exports"]) == ["onnx", "torchscript"]

    make_model_dir(model_dir, GRAY, CLASSES, seed=1)  # retrained: the old ONNX entry no longer describes it
    export_model(model_dir, out, fmt="torchscript")

    assert sorted(json.loads((out / SIDECAR_FILE).read_text())["exports"]) == ["torchscript"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_failed_parity_raises_and_writes_nothing(
    fmt: str, gray_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = "_run_onnx" if fmt == "onnx" else "_run_torchscript"
    real = getattr(export_module, runner)
    # A runtime that drifts by 1e-3 on one logit, ten times the tolerance.
    monkeypatch.setattr(export_module, runner, lambda data, images: real(data, images) + np.eye(1, 3, 1) * 1e-3)

    with pytest.raises(MicrofedError, match=r"disagrees with eager PyTorch.*0\.001.*tolerance 0\.0001"):
        export_model(gray_dir, tmp_path, fmt=fmt)

    assert list(tmp_path.iterdir()) == []


def test_one_parity_image_is_enough_and_the_batch_axis_stays_dynamic(gray_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    result = export_model(gray_dir, tmp_path, parity_images=random_images(GRAY, 1))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])

    assert result["parity"]["passed"] and result["parity"]["images"] == 1
    assert session.run(None, {"images": random_images(GRAY, 5).numpy()})[0].shape == (5, 3)


def test_a_model_with_nan_weights_is_not_exported(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "model", GRAY, CLASSES)
    model, card = load_model(model_dir)
    state = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    save_model(model_dir, state, card)

    with pytest.raises(MicrofedError, match=r"logits are not finite.*lower --lr"):
        export_model(model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_format_lists_the_formats(gray_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MicrofedError, match=r"unknown export format 'tflite'.*onnx, torchscript"):
        export_model(gray_dir, tmp_path, fmt="tflite")


def test_parity_images_of_the_wrong_shape_are_rejected(gray_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MicrofedError, match=r"uint8 \(N, 1, 16, 16\).*\(4, 3, 16, 16\)"):
        export_model(gray_dir, tmp_path, parity_images=torch.zeros(4, 3, 16, 16, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- predict


@pytest.mark.parametrize("which", ["gray", "rgb"])
def test_predict_returns_the_eager_models_class(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    arch, classes = (GRAY, CLASSES) if which == "gray" else (RGB, RGB_CLASSES)
    model_dir: Path = request.getfixturevalue(f"{which}_dir")
    onnx_path: Path = request.getfixturevalue(f"{which}_onnx")
    images = random_images(arch, 40, seed=3)  # more than one ONNX Runtime batch (32)
    paths = write_pngs(tmp_path, images)

    predictions = predict(onnx_path, paths, top_k=2)

    expected = torch.softmax(eager_logits(model_dir, images), dim=1)
    assert [p.path for p in predictions] == [str(p) for p in paths]
    assert [p.label for p in predictions] == [classes[i] for i in expected.argmax(1).tolist()]
    for p, probs in zip(predictions, expected, strict=True):
        assert 0 < p.probability <= 1 and p.probability == pytest.approx(float(probs.max()), abs=1e-5)
        assert p.top[0] == (p.label, p.probability) and len(p.top) == 2 and p.top[1][1] <= p.probability


def test_predict_converts_and_resizes_like_the_training_data(rgb_onnx: Path, tmp_path: Path) -> None:
    # A grayscale-with-alpha image of another size, for the RGB model: converted to RGB, resized to 20x12.
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 50, 2), dtype=np.uint8), mode="LA").save(tmp_path / "la.png")
    expected = Image.open(tmp_path / "la.png").convert("RGB").resize((20, 12), Image.Resampling.BILINEAR)
    Image.fromarray(np.asarray(expected)).save(tmp_path / "same.png")

    resized, same = predict(rgb_onnx, [tmp_path / "la.png", tmp_path / "same.png"])

    assert (resized.label, resized.probability) == pytest.approx((same.label, same.probability), abs=1e-6)


@pytest.mark.integration
def test_predict_needs_no_torch(gray_onnx: Path, tmp_path: Path) -> None:
    paths = write_pngs(tmp_path, random_images(GRAY, 2))
    code = (
        "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "from microfed.training.predict import main\n"
        "code = main(sys.argv[1:])\n"
        "assert sys.modules['torch'] is None\n"
        "sys.exit(code)\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", code, str(gray_onnx), *map(str, paths)], capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert [line[0] for line in lines] == [str(p) for p in paths]
    assert all(len(line) == 3 and line[1] in CLASSES and 0 < float(line[2]) <= 1 for line in lines)


def test_predict_names_the_image_it_cannot_decode(gray_onnx: Path, tmp_path: Path) -> None:
    good = write_pngs(tmp_path, random_images(GRAY, 1))[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")

    with pytest.raises(MicrofedError, match=r"broken\.png: cannot decode image"):
        predict(gray_onnx, [good, bad])
    with pytest.raises(MicrofedError, match=r"missing\.png: image file not found"):
        predict(gray_onnx, [tmp_path / "missing.png"])


def test_predict_main_prints_tab_separated_lines_and_one_line_errors(
    gray_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_pngs(tmp_path, random_images(GRAY, 1))[0]

    assert main([str(gray_onnx.parent), str(path)]) == 0  # a folder holding model.onnx works too
    name, label, probability = capsys.readouterr().out.strip().split("\t")
    assert (name, label in CLASSES, 0 < float(probability) <= 1) == (str(path), True, True)

    assert main([str(tmp_path / "model.torchscript.pt"), str(path)]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_predict_rejects_torchscript_with_a_hint(gray_dir: Path, tmp_path: Path) -> None:
    export_model(gray_dir, tmp_path, fmt="torchscript")
    path = write_pngs(tmp_path / "images", random_images(GRAY, 1))[0]

    with pytest.raises(MicrofedError, match=r"not TorchScript.*--format onnx"):
        predict(tmp_path / EXPORT_FILES["torchscript"], [path])


def test_predict_falls_back_to_the_sidecar(gray_onnx: Path, tmp_path: Path) -> None:
    # An ONNX file without the embedded description (e.g. rewritten by another tool) beside the sidecar.
    proto = onnx.load(str(gray_onnx))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "model.onnx"))
    path = write_pngs(tmp_path / "images", random_images(GRAY, 1))[0]

    with pytest.raises(MicrofedError, match="no class names"):
        predict(tmp_path / "model.onnx", [path])
    (tmp_path / SIDECAR_FILE).write_bytes((gray_onnx.parent / SIDECAR_FILE).read_bytes())
    [prediction] = predict(tmp_path / "model.onnx", [path])

    assert isinstance(prediction, Prediction) and prediction.label in CLASSES


def test_predict_runs_no_factory_a_run_folder_names(gray_onnx: Path, tmp_path: Path) -> None:
    # A run folder someone sent: a good model.onnx beside a model_config.json naming a file that would run code.
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\ndef make(**kw): ...\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.onnx").write_bytes(gray_onnx.read_bytes())
    card = ModelCard(
        architecture=ModelConfig(name=f"{evil}:make", num_classes=3, in_channels=1, image_size=(16, 16)),
        class_names=CLASSES,
        mean=(0.5,),
        std=(0.25,),
    )
    (run / "model_config.json").write_text(json.dumps(card.to_dict()))
    path = write_pngs(tmp_path / "images", random_images(GRAY, 1))[0]

    [prediction] = predict(run, [path])

    assert prediction.label in CLASSES and not marker.exists()
