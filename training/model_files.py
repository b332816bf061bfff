"""The global model on disk: `model.safetensors` (weights) and `model_config.json` (architecture + preprocessing).

The JSON says everything needed to use the weights without this training code's defaults: the architecture
(ModelConfig), class names, and the normalisation applied to uint8 pixels (x / 255 - mean) / std.

A model folder is data, but rebuilding a user factory's architecture runs code (the file or module
`architecture.name` names). So `load_model` runs a factory only when its caller names the code (`--model-code`):
a run folder someone sends cannot make it run anything. A factory file must then also have the sha256 that
training recorded (`factory_sha256`), unless the caller allows changed code (`--allow-changed-model-code`).
Built-in models run no code from files and load as they are.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microfed.training.errors import MicrofedError
from microfed.training.io import read_json, read_safetensors, write_json, write_safetensors
from microfed.training.layout import GLOBAL_MODEL_FILE, MODEL_CONFIG_FILE, DatasetInfo
from microfed.training.models import (
    FactoryDigestError,
    ModelConfig,
    build_model,
    factory_file,
    factory_parts,
    factory_sha256,
)

__all__ = ["ModelCard", "load_model", "save_model"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHANGED_FLAG = "--allow-changed-model-code"


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """What a user of the weights needs besides the tensors."""

    architecture: ModelConfig
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    factory_sha256: str | None = None
    """sha256 of the factory file's content when training built the model (file factories); None for built-in
    models, module factories, and folders written before microfed recorded it."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "microfed.model/v1",
            "architecture": self.architecture.to_dict(),
            "factory_sha256": self.factory_sha256,
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
            card = cls(
                architecture=ModelConfig.from_dict(d["architecture"]),
                class_names=tuple(d["class_names"]),
                mean=tuple(float(v) for v in d["preprocessing"]["mean"]),
                std=tuple(float(v) for v in d["preprocessing"]["std"]),
                factory_sha256=d.get("factory_sha256"),  # absent in folders written before it was recorded
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise MicrofedError(f"{source}: missing or malformed field {e}") from None
        digest = card.factory_sha256
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise MicrofedError(f"{source}: factory_sha256 must be 64 lowercase hex digits or null, got {digest!r}")
        return card

    @classmethod
    def from_manifest(cls, architecture: ModelConfig, manifest: DatasetInfo) -> ModelCard:
        """The card of a model about to be trained; a factory file's sha256 is read now, before training."""
        return cls(
            architecture=architecture,
            class_names=tuple(manifest["class_names"]),
            mean=tuple(manifest["mean"]),
            std=tuple(manifest["std"]),
            factory_sha256=factory_sha256(architecture.name),
        )


def save_model(
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    card: ModelCard,
    metadata: dict[str, str] | None = None,
    filename: str = GLOBAL_MODEL_FILE,
) -> Path:
    out = Path(out_dir)
    path = out / filename
    write_safetensors(path, state, metadata)
    write_json(out / MODEL_CONFIG_FILE, card.to_dict())
    return path


def load_model(
    model_dir: str | Path,
    filename: str = GLOBAL_MODEL_FILE,
    *,
    model_code: str | None = None,
    allow_changed_model_code: bool = False,
    trust_recorded_code: bool = False,
) -> tuple[nn.Module, ModelCard]:
    """Build the architecture from the JSON and load the weights strictly (every key, every shape).

    A user factory runs only when the caller vouches for its code; the card's JSON alone never makes code run:

    - `model_code` (`--model-code`): the factory file (`path/file.py`, `gs://.../file.py`) or module
      (`package.module`) to build the architecture with, optionally with `:function` (default: the recorded
      function). A file must have the sha256 recorded at training time, a module must be the one recorded,
      unless `allow_changed_model_code` (`--allow-changed-model-code`).
    - `trust_recorded_code`: run the factory the folder names (the pipeline's own steps, whose folders this
      run wrote from its `--model`); a file whose recorded sha256 differs is still refused.

    Without either, a folder naming a factory raises MicrofedError before anything runs. Built-in models need
    neither. The card returned is the folder's, as recorded.
    """
    model_dir = Path(model_dir)
    source = str(model_dir / MODEL_CONFIG_FILE)
    card = ModelCard.from_dict(read_json(model_dir / MODEL_CONFIG_FILE), source)
    arch, sha256 = _code_to_run(card, source, model_code, allow_changed_model_code, trust_recorded_code)
    state, _ = read_safetensors(model_dir / filename)
    try:
        model = build_model(arch, factory_sha256=sha256)
    except FactoryDigestError as e:
        raise MicrofedError(
            f"{source}: factory_sha256 records {e.expected}, but {e.file} has sha256 {e.found}: "
            "the factory file changed since training",
            hint=f"name the file the model was trained with, or add {_CHANGED_FLAG} to load this one anyway",
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MicrofedError(f"{model_dir / filename}: weights do not fit {arch.name}: {e}") from None
    return model, card


def _code_to_run(
    card: ModelCard, source: str, model_code: str | None, allow_changed: bool, trust_recorded: bool
) -> tuple[ModelConfig, str | None]:
    """The architecture to build (its factory replaced by `model_code`) and the sha256 its file must have."""
    arch = card.architecture
    recorded = factory_parts(arch.name)
    if recorded is None:  # a built-in model: nothing from a file runs
        if model_code is not None:
            raise MicrofedError(
                f"{source}: architecture.name is the built-in model {arch.name!r}, which loads no model code",
                hint="drop --model-code",
            )
        return arch, None
    code, function = recorded
    kind = "file" if factory_file(arch.name) else "module"
    if model_code is None and not trust_recorded:
        digest = f" (the folder records sha256 {card.factory_sha256} for it)" if card.factory_sha256 else ""
        raise MicrofedError(
            f"{source}: architecture.name names the model factory {arch.name!r}; rebuilding it would run that "
            f"{kind}'s code, and code named by a model folder runs only when you name it too",
            hint=f"if you trust that code, name it yourself: --model-code {code}{digest}",
        )
    if model_code is None:
        return arch, None if allow_changed else card.factory_sha256
    named = _named_code(model_code, function)
    named_code = named.rpartition(":")[0]
    changed = None
    if named_code.endswith(".py") != (kind == "file"):
        changed = f"--model-code {model_code!r} is a {'file' if named_code.endswith('.py') else 'module'}"
    elif kind == "file" and card.factory_sha256 is None:
        changed = "it records no factory_sha256 to compare --model-code's file with"
    elif kind == "module" and named_code != code:
        changed = f"--model-code names the module {named_code!r}"
    if changed and not allow_changed:
        raise MicrofedError(
            f"{source}: architecture.name names the {kind} factory {arch.name!r}, but {changed}",
            hint=f"name the {kind} the model was trained with, or add {_CHANGED_FLAG} to load {named_code!r} anyway",
        )
    sha256 = None if allow_changed or kind == "module" else card.factory_sha256
    return dataclasses.replace(arch, name=named), sha256


def _named_code(model_code: str, function: str) -> str:
    """`model_code` as a factory name: `FILE`, `MODULE` (with the recorded function) or `FILE|MODULE:function`."""
    name = model_code if factory_parts(model_code) is not None else f"{model_code}:{function}"
    if factory_parts(name) is None:
        raise MicrofedError(
            f"--model-code {model_code!r} is neither a .py file nor a module name",
            hint="pass path/to/file.py, gs://BUCKET/path/file.py or package.module, optionally with :function",
        )
    return name
