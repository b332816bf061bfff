"""The networks a worker trains, built from a small JSON-friendly `ModelConfig`.

Builders are deterministic given torch's global RNG state: the worker seeds torch before `build_model`, so
every worker starts from the same initial weights (DESIGN.md, "Worker <-> PyTorchJob"). Nothing here downloads
weights: torchvision architectures are built with `weights=None`.

Besides the built-in names (`microfed.training.models_builtin`), a model can be a user factory: a function named
as ``package.module:function``, ``path/to/file.py:function`` or ``gs://bucket/path/file.py:function`` and called
as ``function(num_classes=, in_channels=, image_size=)`` (`microfed.training.models_factory`, whose names are
re-exported here, says where each form is loaded from and what running one means).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

# Relative, so import sorting does not depend on whether ruff knows `microfed` as first-party.
from .config_checks import MIN_IMAGE_SIDE
from .errors import MicrofedError
from .models_builtin import BUILDERS
from .models_factory import (
    FACTORY_FORMS,
    FACTORY_HINT,
    FactoryDigestError,
    build_from_factory,
    factory_file,
    factory_parts,
    factory_sha256,
)

__all__ = [
    "MODEL_NAMES",
    "FactoryDigestError",
    "ModelConfig",
    "absolute_factory_path",
    "build_model",
    "check_model",
    "check_model_name",
    "count_parameters",
    "factory_file",
    "factory_parts",
    "factory_sha256",
]

MODEL_NAMES: tuple[str, ...] = (
    "cnn-small",
    "cnn-fmnist",
    "resnet18",
    "vgg16",
    "squeezenet",
    "efficientnet_v2_s",
    "mobilenet_v3_small",
)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which network to build and the shape of the data it sees."""

    name: str
    """One of `MODEL_NAMES`, or a user factory (`package.module:function`, `file.py:function`,
    `gs://bucket/file.py:function`)."""
    num_classes: int
    """Number of output logits: the classes in the dataset (at least 2)."""
    in_channels: int
    """Image channels: 1 (grayscale, e.g. Fashion-MNIST) or 3 (RGB)."""
    image_size: tuple[int, int]
    """Input (height, width) in pixels, each at least 8. Stored as a tuple, written to JSON as a list."""

    def __post_init__(self) -> None:
        check_model_name(self.name)
        if not _is_int(self.num_classes) or self.num_classes < 2:
            raise MicrofedError(
                f"ModelConfig.num_classes must be an integer >= 2, got {self.num_classes!r}",
                hint="set it to the number of classes in the dataset",
            )
        if not _is_int(self.in_channels) or self.in_channels not in (1, 3):
            raise MicrofedError(
                f"ModelConfig.in_channels must be 1 (grayscale) or 3 (RGB), got {self.in_channels!r}",
                hint="use the channel count from the shard manifest's image shape",
            )
        # Frozen: normalise a JSON list to the declared tuple through object.__setattr__.
        object.__setattr__(self, "image_size", _check_image_size(self.image_size))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: `image_size` becomes a list."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": list(self.image_size),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Self:
        """Inverse of `to_dict`. Unknown or missing keys are errors: a typo must not become a default."""
        if not isinstance(data, Mapping):
            raise MicrofedError(f"ModelConfig must be a JSON object, got {type(data).__name__}")
        expected = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(expected))
        missing = [key for key in expected if key not in data]
        if unknown or missing:
            raise MicrofedError(
                f"ModelConfig: unknown keys {unknown}, missing keys {missing}",
                hint=f"expected exactly the keys {expected}",
            )
        # Values are checked by __post_init__; Any lets JSON values through the type checker to get there.
        values: dict[str, Any] = dict(data)
        return cls(**values)


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `True` classes is a mistake, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def check_model_name(name: object) -> None:
    """Raise MicrofedError unless `name` is a known model or a well-formed user factory (see the module docstring).

    Only the form is checked: whether a factory's module or file exists is for `build_model` to find out, on the
    machine that builds the model.
    """
    if isinstance(name, str) and (name in MODEL_NAMES or factory_parts(name) is not None):
        return
    if isinstance(name, str) and (":" in name or name.strip().endswith(".py")):
        raise MicrofedError(
            f"unknown model {name!r}: a malformed model factory (--model, ModelConfig.name)",
            hint=f"write {FACTORY_FORMS}, where function names a callable in the module (e.g. make_model); "
            f"or choose one of {', '.join(MODEL_NAMES)}",
        )
    raise MicrofedError(
        f"unknown model {name!r} (--model, ModelConfig.name)",
        hint=f"choose one of {', '.join(MODEL_NAMES)}, {FACTORY_HINT}",
    )


def absolute_factory_path(name: str) -> str:
    """`name` with a local factory file's path made absolute (other names as they are), for processes that run
    elsewhere (the pipeline's steps and workers) and so do not share this one's working directory.

    Raises MicrofedError when that file does not exist.
    """
    check_model_name(name)
    file = factory_file(name)
    if file is None or file.startswith("gs://"):
        return name
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise MicrofedError(
            f"model factory {name!r}: file {path} not found", hint="check the path before the ':' (--model)"
        )
    return f"{path}:{name.rpartition(':')[2]}"


def _check_image_size(size: object) -> tuple[int, int]:
    if (
        isinstance(size, tuple | list)
        and len(size) == 2
        and all(_is_int(side) and side >= MIN_IMAGE_SIDE for side in size)
    ):
        return (size[0], size[1])
    raise MicrofedError(
        f"ModelConfig.image_size must be (height, width) with each side an integer >= {MIN_IMAGE_SIDE}, got {size!r}",
        hint="use the image shape from the shard manifest, without the channel dimension",
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (frozen ones are not what a worker updates or averages)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_model(model: nn.Module, config: ModelConfig, batch: torch.Tensor) -> None:
    """Refuse, before any training, a model the train loop cannot use: one without trainable parameters, or one
    whose output for `batch` (a float batch shaped as the data: (N, in_channels, H, W)) is not logits of shape
    (N, num_classes). One line names the model (or factory) and what is wrong.

    The forward pass runs in eval mode, without gradients, and with torch's random state put back afterwards, so
    the check changes neither the model nor the training that follows.
    """
    what = f"model factory {config.name!r}" if ":" in config.name else f"model {config.name!r}"
    if count_parameters(model) == 0:
        raise MicrofedError(
            f"{what} returned {type(model).__name__}, a model with no trainable parameters: nothing to train "
            "or average",
            hint="return a model with layers that have weights (requires_grad=True)",
        )
    expected = (batch.shape[0], config.num_classes)
    shape = "x".join(str(side) for side in batch.shape)
    was_training = model.training
    devices = [batch.device.index or 0] if batch.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            output = model(batch)
    except MicrofedError:
        raise
    except Exception as err:  # the user's forward: whatever it raises, the model cannot be trained
        raise MicrofedError(
            f"{what} fails on a batch of shape {shape} (batch, channels, height, width): "
            f"{type(err).__name__}: {_first_line(err)}",
            hint=f"the model must take {config.in_channels}-channel images of {config.image_size[0]}x"
            f"{config.image_size[1]} pixels and return logits of shape (batch, {config.num_classes})",
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor):
        raise MicrofedError(
            f"{what} returns a {type(output).__name__} for a batch of shape {shape}, not a tensor of logits of "
            f"shape (batch, num_classes) = {expected}",
            hint="return the logits tensor itself from forward",
        )
    if tuple(output.shape) != expected or not output.is_floating_point():
        found = f"{tuple(output.shape)}" + ("" if output.is_floating_point() else f" of {output.dtype}")
        raise MicrofedError(
            f"{what} returns the wrong output for a batch of shape {shape}: expected float logits of shape "
            f"(batch, num_classes) = {expected}, found {found}",
            hint=f"the dataset has {config.num_classes} classes: end the model with one logit per class, "
            f"e.g. nn.Flatten() then nn.Linear(features, {config.num_classes})",
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def build_model(config: ModelConfig, *, factory_sha256: str | None = None) -> nn.Module:
    """Build the network `config` names, with freshly initialised weights drawn from torch's global RNG.

    `factory_sha256`: for a factory file, the sha256 its content must have. It is compared on the bytes that
    then run, so a file that differs (or changes between a check and the load) raises FactoryDigestError before
    any of it runs. Ignored for built-in models and module factories.

    Every model maps a float batch (N, in_channels, H, W) to logits (N, num_classes).

    - `cnn-small`: conv3x3(16)-ReLU-pool, conv3x3(32)-ReLU-pool, linear; the reference platform's simple CNN.
    - `cnn-fmnist`: conv3x3(32)-ReLU-pool, conv3x3(64)-ReLU-pool, linear(128)-ReLU-dropout(0.25), linear
      (421,642 parameters on 1x28x28 with 10 classes).
    - `resnet18`, `squeezenet` (1.1), `efficientnet_v2_s`, `mobilenet_v3_small`: the torchvision
      architectures, untrained, with `num_classes` outputs. For `in_channels` other than 3 the first
      convolution is replaced by one with the same geometry over `in_channels` (He-initialised).
      squeezenet keeps torchvision's ReLU before its global pool, so its logits are non-negative.
    - `vgg16`: below 224 pixels the feature map is smaller than the stock head's 7x7, so the 7x7 pool and
      25,088-wide classifier (~120M parameters) become a global average pool and a 512-512-classes classifier
      (~15M parameters in all); the 13 convolutions and their keys (`features.*`) match torchvision's vgg16.
      At 224 pixels and above the stock torchvision model is used.
    - Any torchvision model gets an `nn.Upsample` (bilinear) in front when a side is below 32 pixels, because
      the backbones downsample by 32; the network then sits under `net.` in the state_dict (`resize` holds no
      weights).
    - a user factory (`package.module:function`, `path/file.py:function`, `gs://bucket/file.py:function`):
      the function is called as `function(num_classes=, in_channels=, image_size=)` and must return an
      `nn.Module`.
    """
    if ":" in config.name:
        return build_from_factory(config, factory_sha256)
    builder = BUILDERS.get(config.name)
    if builder is None:  # Only reachable by bypassing ModelConfig's checks; keep the message helpful anyway.
        raise MicrofedError(
            f"unknown model {config.name!r}", hint=f"choose one of {', '.join(MODEL_NAMES)}, {FACTORY_HINT}"
        )
    return builder(config)
