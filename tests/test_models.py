"""Model zoo: shapes, parameter counts, determinism, user factories and ModelConfig validation."""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn

from microfed.training.errors import MicrofedError
from microfed.training.models import MODEL_NAMES, ModelConfig, build_model, count_parameters

pytestmark = pytest.mark.unit

# (in_channels, height, width): Fashion-MNIST-like and CIFAR-like inputs.
SHAPES = [(1, 28, 28), (3, 32, 32)]


def config(name: str, shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> ModelConfig:
    channels, height, width = shape
    return ModelConfig(name=name, num_classes=num_classes, in_channels=channels, image_size=(height, width))


def test_cnn_fmnist_has_the_reference_parameter_count() -> None:
    # conv 1->32: 320, conv 32->64: 18,496, linear 3136->128: 401,536, linear 128->10: 1,290.
    model = build_model(config("cnn-fmnist"))

    assert count_parameters(model) == 421_642


def test_count_parameters_skips_frozen_parameters() -> None:
    model = build_model(config("cnn-small"))
    first_conv = model.get_submodule("0")
    assert isinstance(first_conv, nn.Conv2d)
    assert first_conv.bias is not None
    first_conv.requires_grad_(False)

    frozen = first_conv.weight.numel() + first_conv.bias.numel()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) - frozen


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_gives_logits(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(config(name, shape, num_classes=7)).eval()

    with torch.no_grad():
        logits = model(torch.randn(2, *shape))

    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    # The aggregation contract: float tensors, plus BatchNorm's int64 counters.
    for key, value in model.state_dict().items():
        assert value.is_floating_point() or (key.endswith("num_batches_tracked") and value.dtype == torch.int64)


def test_vgg16_uses_a_compact_head_on_small_images() -> None:
    model = build_model(config("vgg16", (3, 32, 32)))

    # 13 convolutions (14.7M) plus 512-512-10; the stock 25,088-wide head would add ~120M.
    assert count_parameters(model) < 16_000_000
    assert "features.0.weight" in model.state_dict()


def test_first_conv_takes_the_configured_channels() -> None:
    model = build_model(config("resnet18", (1, 28, 28)))

    assert model.state_dict()["net.conv1.weight"].shape[1] == 1


@pytest.mark.parametrize("name", ["cnn-fmnist", "resnet18", "mobilenet_v3_small"])
def test_same_seed_gives_identical_weights(name: str) -> None:
    torch.manual_seed(1234)
    first = build_model(config(name)).state_dict()
    torch.manual_seed(1234)
    second = build_model(config(name)).state_dict()
    torch.manual_seed(4321)
    other = build_model(config(name)).state_dict()

    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


@pytest.mark.parametrize("name", ["mlp", "resnet", "", "pkg.mod:", ":fn", "a:b:c", "pkg mod:fn", "1pkg:fn"])
def test_unknown_names_are_rejected_with_the_choices(name: str) -> None:
    with pytest.raises(MicrofedError, match="unknown model") as err:
        build_model(config(name))

    assert "cnn-fmnist" in str(err.value)
    assert "package.module:function" in str(err.value)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A throwaway module on sys.path with good and bad factories; yields its (unique) import name."""
    name = f"user_models_{uuid.uuid4().hex}"
    source = """
        from torch import nn

        NOT_CALLABLE = 42

        def tiny(*, num_classes, in_channels, image_size):
            height, width = image_size
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * height * width, num_classes))

        def not_a_module(**kwargs):
            return "a string"

        class Zoo:
            @staticmethod
            def tiny(**kwargs):
                return tiny(**kwargs)
    """
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_factory_builds_with_the_dataset_shape(user_module: str) -> None:
    model = build_model(config(f"{user_module}:tiny", (3, 32, 32), num_classes=5))

    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert count_parameters(model) == 3 * 32 * 32 * 5 + 5


def test_user_factory_may_be_a_dotted_attribute(user_module: str) -> None:
    model = build_model(config(f"{user_module}:Zoo.tiny"))

    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("missing", "has no attribute 'missing'"),
        ("NOT_CALLABLE", "not a callable"),
        ("not_a_module", "returned str, not a torch.nn.Module"),
    ],
)
def test_bad_user_factories_are_named(user_module: str, attribute: str, message: str) -> None:
    factory = f"{user_module}:{attribute}"

    with pytest.raises(MicrofedError, match=message) as err:
        build_model(config(factory))

    assert factory in str(err.value)


def test_unimportable_factory_module_is_named() -> None:
    with pytest.raises(MicrofedError, match=r"cannot import module 'no_such_pkg_microfed\.models'") as err:
        build_model(config("no_such_pkg_microfed.models:make"))

    assert "PYTHONPATH" in str(err.value)


def test_config_round_trips_through_json() -> None:
    original = config("resnet18", (3, 32, 40), num_classes=100)

    data = json.loads(json.dumps(original.to_dict()))

    assert data["image_size"] == [32, 40]
    assert ModelConfig.from_dict(data) == original


def test_config_accepts_a_list_image_size() -> None:
    built = ModelConfig(name="cnn-small", num_classes=2, in_channels=1, image_size=cast(Any, [8, 9]))

    assert built.image_size == (8, 9)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"num_classes": 10.0}, "num_classes"),
        ({"in_channels": 2}, "in_channels"),
        ({"in_channels": 4}, "in_channels"),
        ({"image_size": [7, 28]}, "image_size"),
        ({"image_size": [28]}, "image_size"),
        ({"image_size": [28, 28, 1]}, "image_size"),
        ({"image_size": "28x28"}, "image_size"),
        ({"name": 3}, "name"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(changes: dict[str, object], field: str) -> None:
    data = config("cnn-small").to_dict() | changes

    with pytest.raises(MicrofedError, match=f"ModelConfig.{field}"):
        ModelConfig.from_dict(data)


def test_config_rejects_unknown_and_missing_keys() -> None:
    data = config("cnn-small").to_dict()
    del data["in_channels"]
    data["num_clases"] = 10

    with pytest.raises(MicrofedError, match=r"unknown keys \['num_clases'\], missing keys \['in_channels'\]"):
        ModelConfig.from_dict(data)


def test_config_rejects_a_non_object() -> None:
    with pytest.raises(MicrofedError, match="JSON object"):
        ModelConfig.from_dict(cast(Any, [1, 2]))
