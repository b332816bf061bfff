"""The built-in networks `build_model` knows by name (`MODEL_NAMES`): two small CNNs and torchvision architectures
fitted to the dataset's channels and image size.

Nothing here downloads weights: torchvision architectures are built with `weights=None`. Each builder draws its
initial weights from torch's global RNG, which the worker seeds (`microfed.training.models`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .models import ModelConfig

__all__ = ["BUILDERS"]

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


BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "cnn-small": _cnn_small,
    "cnn-fmnist": _cnn_fmnist,
    "resnet18": _resnet18,
    "vgg16": _vgg16,
    "squeezenet": _squeezenet,
    "efficientnet_v2_s": _efficientnet_v2_s,
    "mobilenet_v3_small": _mobilenet_v3_small,
}
