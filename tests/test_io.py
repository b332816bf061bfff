"""Files on the model path are byte-for-byte reproducible and never half-written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from microfed.training.io import read_safetensors, write_safetensors

pytestmark = pytest.mark.unit


def test_same_tensors_and_metadata_give_the_same_bytes_whatever_the_order(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6.0).view(2, 3), "num_batches_tracked": torch.tensor(7)}
    a = write_safetensors(tmp_path / "a.safetensors", tensors, {"n_k": "3", "rank": "1", "rounds": "2"})
    b = write_safetensors(
        tmp_path / "b.safetensors", dict(reversed(tensors.items())), {"rounds": "2", "rank": "1", "n_k": "3"}
    )
    assert a == b == (tmp_path / "a.safetensors").read_bytes()
    # still a valid safetensors file for the library itself, tensors and metadata intact
    loaded = load_file(tmp_path / "a.safetensors")
    assert torch.equal(loaded["w"], tensors["w"]) and int(loaded["num_batches_tracked"]) == 7
    assert read_safetensors(tmp_path / "b.safetensors")[1] == {"n_k": "3", "rank": "1", "rounds": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    write_safetensors(tmp_path / "m.safetensors", {"w": torch.zeros(2)})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
