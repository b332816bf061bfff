"""Files that are never half-written: write to a temporary name in the same folder, then rename.

Everything on a data or model path is safetensors or JSON; nothing here unpickles. Importing this module imports
no torch (training/layout.py reads and writes the JSON records with it, and `microfed predict` runs without
torch): the safetensors functions import it when called.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microfed.training.errors import MicrofedError

if TYPE_CHECKING:
    import torch

__all__ = [
    "atomic_write_bytes",
    "read_json",
    "read_safetensors",
    "sha256_bytes",
    "sha256_file",
    "write_json",
    "write_safetensors",
]


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any thread could create files
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; the file should read like any other the user writes (umask applies)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MicrofedError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise MicrofedError(f"{path}: not valid JSON ({e})") from None


def write_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Atomically write tensors (moved to CPU, made contiguous) and return the bytes written."""
    from safetensors.torch import save as st_save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = _sorted_header(st_save(cpu, metadata=dict(metadata) if metadata else None))
    atomic_write_bytes(path, data)
    return data


def _sorted_header(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted: safetensors writes metadata in hash order, so equal
    inputs would give different bytes (and checksums). Offsets are relative to the data, so they still hold."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keep the tensor data 8-byte aligned, as safetensors does
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata stored in a safetensors file."""
    from safetensors.torch import load as st_load

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MicrofedError(f"{path}: file not found") from None
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except Exception as e:  # safetensors raises its own error types; report them uniformly
        raise MicrofedError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, dict(header.get("__metadata__", {}))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
