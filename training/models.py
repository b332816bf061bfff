"""The networks a worker trains, built from a small JSON-friendly `ModelConfig`.

Builders are deterministic given torch's global RNG state: the worker seeds torch before `build_model`, so
every worker starts from the same initial weights (DESIGN.md, "Worker <-> PyTorchJob"). Nothing here downloads
weights: torchvision architectures are built with `weights=None`.

Besides the built-in names, a model can be a user factory, in one of three forms:

* ``package.module:function``: a module importable in the worker image (installed, or on PYTHONPATH);
* ``path/to/file.py:function``: a single Python file, loaded with importlib from its path. Workers receive
  the same string, so the path must be one they can read: `microfed run` makes it absolute;
* ``gs://bucket/path/file.py:function``: a single Python file fetched from GCS by every worker (the form for a
  cluster, where the file ships through the bucket rather than the image).

The function is called as ``function(num_classes=, in_channels=, image_size=)`` and returns an ``nn.Module``.
A factory file runs with the worker's privileges, like the command line that names it. A model folder names its
factory too (model_config.json), but a folder is data: `model_files.load_model` decides whether to run what it
names; `build_model` runs what it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Self

import torch
from torch import nn

# Relative, so import sorting does not depend on whether ruff knows `microfed` as first-party.
from .errors import MicrofedError

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

# Smallest side (pixels) an image may have; the two 2x2 poolings of the CNNs need at least 4, and anything
# below 8 is almost certainly a mix-up of height and channels.
MIN_IMAGE_SIDE = 8
# torchvision backbones downsample by 32; smaller inputs are upsampled so that the deepest feature map keeps
# at least one pixel (vgg16's fifth max-pool fails on a 28x28 input otherwise).
_BACKBONE_MIN_SIDE = 32
# vgg16's stock head expects a 7x7 feature map, i.e. 224-pixel inputs; below that it replicates pixels into
# 25,088 features and carries ~120M parameters for nothing.
_VGG_STOCK_HEAD_SIDE = 224
# VGG configuration "D" (16 weight layers): conv widths, "M" marks a 2x2 max-pool.
_VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
# A user factory: `package.module:function`, `path/file.py:function` or `gs://bucket/file.py:function`; dotted
# attribute paths such as `module:Class.create` work too.
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_FACTORY_FORMS = "package.module:function, path/to/file.py:function or gs://BUCKET/path/file.py:function"
_FACTORY_HINT = f"or a user factory ({_FACTORY_FORMS}) called with num_classes, in_channels, image_size"
# Prefix of the names factory files are registered under in sys.modules (plus a hash of their content).
_FACTORY_MODULE_PREFIX = "microfed_user_factory_"


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
            hint=f"write {_FACTORY_FORMS}, where function names a callable in the module (e.g. make_model); "
            f"or choose one of {', '.join(MODEL_NAMES)}",
        )
    raise MicrofedError(
        f"unknown model {name!r} (--model, ModelConfig.name)",
        hint=f"choose one of {', '.join(MODEL_NAMES)}, {_FACTORY_HINT}",
    )


def factory_file(name: str) -> str | None:
    """The Python file a `file.py:function` or `gs://.../file.py:function` factory loads, else None."""
    parts = factory_parts(name)
    return parts[0] if parts is not None and parts[0].endswith(".py") else None


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


def factory_sha256(name: str) -> str | None:
    """sha256 of the content of the file a `file.py:function` or `gs://.../file.py:function` factory loads (read
    now, nothing run); None for built-in models and `package.module:function` factories.

    Training records it in model_config.json, so that a later load can tell whether the file is still the one
    the weights were trained with.
    """
    file = factory_file(name)
    if file is None:
        return None
    with _staged_factory_file(name, file) as path:
        return hashlib.sha256(path.read_bytes()).hexdigest()


class FactoryDigestError(MicrofedError):
    """A factory file's content does not have the sha256 the caller expected; nothing of it ran."""

    def __init__(self, name: str, file: str, *, expected: str, found: str) -> None:
        super().__init__(
            f"model factory {name!r}: {file} has sha256 {found}, expected {expected}",
            hint="load the file the model was trained with",
        )
        self.file = file
        self.expected = expected
        self.found = found


def factory_parts(name: str) -> tuple[str, str] | None:
    """(module or .py file, attribute path) of a well-formed factory name, else None."""
    where, colon, attribute = name.rpartition(":")
    if not colon or not _DOTTED.fullmatch(attribute):
        return None
    if not where.endswith(".py"):  # `model.py:make` is a file, not a submodule `py` of a package `model`
        return (where, attribute) if _DOTTED.fullmatch(where) else None
    if where.strip() != where or any(ord(ch) < 32 for ch in where) or Path(where).name == ".py":
        return None
    if where.startswith("gs://"):
        from .storage import split_gcs

        try:
            _, key = split_gcs(where)
        except MicrofedError:
            return None
        if PurePosixPath(key).name == ".py":
            return None
    return where, attribute


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
        return _build_from_factory(config, factory_sha256)
    builder = _BUILDERS.get(config.name)
    if builder is None:  # Only reachable by bypassing ModelConfig's checks; keep the message helpful anyway.
        raise MicrofedError(
            f"unknown model {config.name!r}", hint=f"choose one of {', '.join(MODEL_NAMES)}, {_FACTORY_HINT}"
        )
    return builder(config)


def _cnn_small(config: ModelConfig) -> nn.Module:
    height, width = config.image_size
    return nn.Sequential(
        nn.Conv2d(config.in_channels, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        # Two floor-halving pools: odd sides lose their last row/column, as MaxPool2d does.
        nn.Linear(32 * (height // 4) * (width // 4), config.num_classes),
    )


def _cnn_fmnist(config: ModelConfig) -> nn.Module:
    height, width = config.image_size
    return nn.Sequential(
        nn.Conv2d(config.in_channels, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 4) * (width // 4), 128),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(128, config.num_classes),
    )


def _resnet18(config: ModelConfig) -> nn.Module:
    return _adapt(_torchvision().resnet18(weights=None, num_classes=config.num_classes), config)


def _squeezenet(config: ModelConfig) -> nn.Module:
    return _adapt(_torchvision().squeezenet1_1(weights=None, num_classes=config.num_classes), config)


def _efficientnet_v2_s(config: ModelConfig) -> nn.Module:
    return _adapt(_torchvision().efficientnet_v2_s(weights=None, num_classes=config.num_classes), config)


def _mobilenet_v3_small(config: ModelConfig) -> nn.Module:
    return _adapt(_torchvision().mobilenet_v3_small(weights=None, num_classes=config.num_classes), config)


def _vgg16(config: ModelConfig) -> nn.Module:
    if min(_backbone_size(config.image_size)) >= _VGG_STOCK_HEAD_SIDE:
        return _adapt(_torchvision().vgg16(weights=None, num_classes=config.num_classes), config)
    # Built directly rather than by trimming tvm.vgg16: initialising the stock 25,088x4,096 layer only to
    # discard it costs seconds and half a gigabyte per worker.
    compact = nn.Sequential(
        OrderedDict(
            features=_vgg16_features(config.in_channels),
            avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            classifier=nn.Sequential(
                nn.Linear(512, 512),
                nn.ReLU(inplace=True),
                nn.Dropout(0.5),
                nn.Linear(512, config.num_classes),
            ),
        )
    )
    _init_like_torchvision_vgg(compact)
    return _upsample_if_small(compact, config.image_size)


def _vgg16_features(in_channels: int) -> nn.Sequential:
    # Module order of torchvision's vgg16().features, so state_dict keys (features.0.weight, ...) match.
    layers: list[nn.Module] = []
    channels = in_channels
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(item, int)  # Internal constant, not user input.
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


def _init_like_torchvision_vgg(model: nn.Module) -> None:
    # torchvision's VGG initialisation, so the compact head trains like the stock model would.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


def _torchvision() -> Any:
    """torchvision.models, imported on first use: it pulls in torch._dynamo (about a second per process), which
    the steps and workers of the small CNNs never need."""
    from torchvision import models

    return models


def _adapt(net: nn.Module, config: ModelConfig) -> nn.Module:
    """Fit a stock 3-channel torchvision network to the dataset's channels and image size."""
    if config.in_channels != 3:
        _replace_first_conv(net, config.in_channels)
    return _upsample_if_small(net, config.image_size)


def _replace_first_conv(net: nn.Module, in_channels: int) -> None:
    name, old = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    # Conv2d stores its geometry as variable-length tuples; the first conv of these models is 2-D.
    padding = old.padding if isinstance(old.padding, str) else _pair(old.padding)
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=_pair(old.kernel_size),
        stride=_pair(old.stride),
        padding=padding,
        dilation=_pair(old.dilation),
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    # He initialisation, as the torchvision builders use for their stems (fan_out keeps the scale of the
    # activations independent of the channel count we changed).
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent, _, attribute = name.rpartition(".")
    setattr(net.get_submodule(parent), attribute, new)


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    return value[0], value[1]


def _backbone_size(image_size: tuple[int, int]) -> tuple[int, int]:
    height, width = image_size
    return max(height, _BACKBONE_MIN_SIDE), max(width, _BACKBONE_MIN_SIDE)


def _upsample_if_small(net: nn.Module, image_size: tuple[int, int]) -> nn.Module:
    target = _backbone_size(image_size)
    if target == image_size:
        return net
    resize = nn.Upsample(size=target, mode="bilinear", align_corners=False)
    return nn.Sequential(OrderedDict(resize=resize, net=net))


def _build_from_factory(config: ModelConfig, sha256: str | None) -> nn.Module:
    parts = factory_parts(config.name)
    assert parts is not None  # ModelConfig checked the name (internal invariant)
    module_name, attribute_path = parts
    if module_name.endswith(".py"):
        module = _load_factory_file(config.name, module_name, sha256)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise MicrofedError(
                f"model factory {config.name!r}: cannot import module {module_name!r} ({err})",
                hint="install the package in the worker image or put its folder on PYTHONPATH",
            ) from err
    factory: object = module
    for attribute in attribute_path.split("."):
        if not hasattr(factory, attribute):
            raise MicrofedError(
                f"model factory {config.name!r}: {module_name!r} has no attribute {attribute_path!r}",
                hint="check the spelling after the ':'",
            )
        factory = getattr(factory, attribute)
    if not callable(factory):
        raise MicrofedError(
            f"model factory {config.name!r} is a {type(factory).__name__}, not a callable",
            hint="point at a function that returns a torch.nn.Module",
        )
    model = factory(num_classes=config.num_classes, in_channels=config.in_channels, image_size=config.image_size)
    if not isinstance(model, nn.Module):
        raise MicrofedError(
            f"model factory {config.name!r} returned {type(model).__name__}, not a torch.nn.Module",
            hint="return the model instance itself",
        )
    return model


def _load_factory_file(name: str, file: str, sha256: str | None) -> ModuleType:
    """The module of a factory file (local or gs://), executed once per process and content.

    It is registered in sys.modules under a name derived from its content's hash, so loading the same file again
    (every build_model call of a worker) reuses it, and a changed file is a new module. With `sha256`, content
    with another digest raises FactoryDigestError before it runs: the bytes compared are the bytes executed.
    """
    with _staged_factory_file(name, file) as path:
        source = path.read_bytes()
        digest = hashlib.sha256(source).hexdigest()
        if sha256 is not None and digest != sha256:
            raise FactoryDigestError(name, file, expected=sha256, found=digest)
        module_name = _FACTORY_MODULE_PREFIX + digest[:24]
        loaded = sys.modules.get(module_name)
        if loaded is not None:
            return loaded
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None:  # a .py path always gets a spec; be explicit anyway
            raise MicrofedError(f"model factory {name!r}: {file} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before running it, as `import` does (dataclasses look it up)
        try:
            # What the loader's exec_module would do, but on the bytes hashed above rather than a second read.
            exec(compile(source, str(path), "exec"), module.__dict__)
        except Exception as err:  # the user's code: any error in it means the factory is unusable
            del sys.modules[module_name]
            raise MicrofedError(
                f"model factory {name!r}: running {file} failed: {type(err).__name__}: {err}",
                hint="fix the file; it runs as a module of its own and can import installed packages only",
            ) from err
        return module


@contextlib.contextmanager
def _staged_factory_file(name: str, file: str) -> Iterator[Path]:
    """A local path to a factory file: the file itself, or a download of a gs:// one (removed afterwards)."""
    from .storage import staged_file  # google-cloud-storage is imported only when a factory file is used

    if not file.startswith("gs://") and not Path(file).expanduser().is_file():
        raise MicrofedError(
            f"model factory {name!r}: file {file} not found",
            hint="a local factory file must exist on the machine that builds the model; "
            "on a cluster copy it to a bucket and pass gs://BUCKET/path/file.py:function",
        )
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(staged_file(file if file.startswith("gs://") else Path(file).expanduser()))
        except MicrofedError as err:  # storage's errors name the URI (not found, access denied); add the flag's
            raise MicrofedError(f"model factory {name!r}: {err.message}", hint=err.hint) from None
        yield path


_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "cnn-small": _cnn_small,
    "cnn-fmnist": _cnn_fmnist,
    "resnet18": _resnet18,
    "vgg16": _vgg16,
    "squeezenet": _squeezenet,
    "efficientnet_v2_s": _efficientnet_v2_s,
    "mobilenet_v3_small": _mobilenet_v3_small,
}
