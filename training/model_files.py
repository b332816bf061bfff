"""The global model on disk: `model.safetensors` (weights) and `model_config.json` (architecture + preprocessing).

The JSON says everything needed to use the weights without this training code's defaults: the architecture
(ModelConfig), class names, and the normalisation applied to uint8 pixels (x / 255 - mean) / std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microfed.training.errors import MicrofedError
from microfed.training.io import read_json, read_safetensors, write_json, write_safetensors
from microfed.training.models import ModelConfig, build_model

__all__ = ["MODEL_CONFIG_FILE", "MODEL_FILE", "ModelCard", "load_model", "save_model"]

MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """What a user of the weights needs besides the tensors."""

    architecture: ModelConfig
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "microfed.model/v1",
            "architecture": self.architecture.to_dict(),
            "class_names": list(self.class_names),
            "preprocessing": {
                "input": "uint8 NCHW",
                "scale": 1 / 255,
                "mean": list(self.mean),
                "std": list(self.std),
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model config") -> ModelCard:
        try:
            return cls(
                architecture=ModelConfig.from_dict(d["architecture"]),
                class_names=tuple(d["class_names"]),
                mean=tuple(float(v) for v in d["preprocessing"]["mean"]),
                std=tuple(float(v) for v in d["preprocessing"]["std"]),
            )
        except (KeyError, TypeError) as e:
            raise MicrofedError(f"{source}: missing or malformed field {e}") from None

    @classmethod
    def from_manifest(cls, architecture: ModelConfig, manifest: dict[str, Any]) -> ModelCard:
        return cls(
            architecture=architecture,
            class_names=tuple(manifest["class_names"]),
            mean=tuple(manifest["mean"]),
            std=tuple(manifest["std"]),
        )


def save_model(
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    card: ModelCard,
    metadata: dict[str, str] | None = None,
    filename: str = MODEL_FILE,
) -> Path:
    out = Path(out_dir)
    path = out / filename
    write_safetensors(path, state, metadata)
    write_json(out / MODEL_CONFIG_FILE, card.to_dict())
    return path


def load_model(model_dir: str | Path, filename: str = MODEL_FILE) -> tuple[nn.Module, ModelCard]:
    """Build the architecture from the JSON and load the weights strictly (every key, every shape)."""
    model_dir = Path(model_dir)
    card = ModelCard.from_dict(read_json(model_dir / MODEL_CONFIG_FILE), str(model_dir / MODEL_CONFIG_FILE))
    state, _ = read_safetensors(model_dir / filename)
    model = build_model(card.architecture)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MicrofedError(f"{model_dir / filename}: weights do not fit {card.architecture.name}: {e}") from None
    return model, card
