"""Named datasets: Fashion-MNIST, MNIST and CIFAR-10, read by our own parsers into uint8 tensors.

* ``"fashion-mnist"`` / ``"mnist"``: the original IDX files, plain or gzipped, read by our own parser.
* ``"cifar10"``: the *binary* CIFAR-10 release (fixed-length records). The Python release is pickled and
  pickle never runs on a data path here, so torchvision's ``CIFAR10`` class is not used.

Named datasets are looked up in `default_data_dirs` and, when missing and allowed, downloaded. Every field of
a file is checked, so a damaged file fails here, naming it, instead of as a shape error deep inside training.
They are not subject to the `DatasetLimits` of uploads: these are known files read by our own parsers.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from microfed.training.dataset_types import ImageData, LoadedDataset
from microfed.training.errors import MicrofedError

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "SYSTEM_DATA_DIR",
    "canonical_name",
    "default_data_dirs",
    "load_named",
    "read_idx",
]

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10")

# Where Debian's dataset packages (e.g. dataset-fashion-mnist) install their files.
SYSTEM_DATA_DIR = Path("/usr/share/datasets")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
# Used only when batches.meta.txt is absent; the official archive ships it in this order.
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published on the dataset's page
_CIFAR_FOLDER = "cifar-10-batches-bin"
_CIFAR_SIDE = 32
_CIFAR_RECORD = 1 + 3 * _CIFAR_SIDE * _CIFAR_SIDE  # one label byte, then the image in CHW order

# torchvision's class per IDX dataset: its download puts the raw files in <root>/<class>/raw/.
_TORCHVISION_CLASS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
# Besides each data folder itself, the sub-folder a download leaves the files in is searched too, so a
# torchvision root or the folder the CIFAR archive was extracted in works as data_dir.
_SUBFOLDER = {"fashion-mnist": "FashionMNIST/raw", "mnist": "MNIST/raw", "cifar10": _CIFAR_FOLDER}


def canonical_name(name: str) -> str | None:
    """`name` as it appears in DATASET_NAMES, or None: case-insensitive, '_' accepted for '-'."""
    normalized = name.strip().lower().replace("_", "-")
    return normalized if normalized in DATASET_NAMES else None


def default_data_dirs(name: str) -> list[Path]:
    """Folders searched for a named dataset, in order.

    $MICROFED_DATA_DIR/<name> (when the variable is set; read at call time so tests and the CLI can
    change it), then Debian's /usr/share/datasets/<name>, then ~/.cache/microfed/<name>.
    """
    canonical = canonical_name(name)
    if canonical is None:
        raise MicrofedError(f"unknown dataset name {name!r}", hint=f"use one of {', '.join(DATASET_NAMES)}")
    dirs = []
    env_dir = os.environ.get("MICROFED_DATA_DIR", "").strip()
    if env_dir:
        dirs.append(Path(env_dir).expanduser() / canonical)
    dirs.append(SYSTEM_DATA_DIR / canonical)
    dirs.append(_cache_root() / canonical)
    return dirs


def _cache_root() -> Path:
    return Path.home() / ".cache" / "microfed"


def load_named(name: str, *, data_dir: str | Path | None, download: bool) -> LoadedDataset:
    """Read the named dataset `name` (as in DATASET_NAMES) from data_dir or `default_data_dirs`, downloading it
    when it is missing and `download` allows."""
    if name == "cifar10":
        return _load_cifar10(data_dir=data_dir, download=download)
    return _load_idx_dataset(name, data_dir=data_dir, download=download)


def _candidates(name: str, bases: Sequence[Path]) -> list[Path]:
    return [folder for base in bases for folder in (base, base / _SUBFOLDER[name])]


def _not_found(name: str, bases: Sequence[Path], *, reason: str) -> MicrofedError:
    options = []
    if name == "fashion-mnist":
        options.append("install it with `apt-get install dataset-fashion-mnist`")
    options.append(f"put the files in $MICROFED_DATA_DIR/{name} (or pass data_dir)")
    options.append("allow the download (download=True) on a machine with network access")
    where = ", ".join(str(path) for path in bases)
    return MicrofedError(
        f"{name}: {reason}; looked in {where} (each also under {_SUBFOLDER[name]}/)",
        hint="; or ".join(options),
    )


# ------------------------------------------------------------------------------------ IDX (MNIST-like)


def _read_bytes(path: Path) -> bytearray:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its suffix says).

    A bytearray rather than bytes so the numpy views built on it are writable and torch.from_numpy
    can share the memory without a copy or a warning.
    """
    try:
        data = path.read_bytes()
        return _gunzip(data) if data[:2] == b"\x1f\x8b" else bytearray(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise MicrofedError(
            f"cannot read {path}: {exc}", hint="the file is damaged or truncated; fetch it again"
        ) from exc


def _gunzip(data: bytes) -> bytearray:
    # zlib directly is about twice as fast as the gzip module's streaming reader on these files.
    out = bytearray()
    while any(data):  # gzip allows several members, and zero padding after the last one
        member = zlib.decompressobj(wbits=31)
        out += member.decompress(data)
        if not member.eof:
            raise EOFError("compressed data ends before the end-of-stream marker")
        data = member.unused_data
    return out


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzipped) of unsigned bytes into an array of its declared shape.

    IDX: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, one big-endian
    uint32 per dimension, then the data. Every field is checked so a damaged file fails here, naming
    the file, instead of as a shape error deep inside training.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise MicrofedError(
            f"{path} is not an unsigned-byte IDX file (bad magic number {bytes(raw[:4]).hex() or 'none'})",
            hint="expected the original MNIST/Fashion-MNIST files, e.g. train-images-idx3-ubyte[.gz]",
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise MicrofedError(f"{path}: truncated IDX header", hint="fetch the file again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise MicrofedError(
            f"{path}: IDX header declares shape {dims} ({expected} bytes) but the file has {len(raw)} bytes",
            hint="the file is truncated or damaged; fetch it again",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_split_files(folder: Path) -> dict[str, tuple[Path, Path]] | None:
    """{'train': (images, labels), 'test': (...)} when `folder` holds all four IDX files, else None."""
    found: dict[str, tuple[Path, Path]] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
        labels = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
        if images is None or labels is None:
            return None
        found[split] = (images, labels)
    return found


def _read_idx_split(images_path: Path, labels_path: Path, class_names: tuple[str, ...]) -> ImageData:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise MicrofedError(f"{images_path}: expected 3 dimensions (N, H, W), found shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise MicrofedError(
            f"{labels_path} holds {labels.shape} labels for {len(images)} images in {images_path}",
            hint="the two files must come from the same release",
        )
    if len(labels) and int(labels.max()) >= len(class_names):
        raise MicrofedError(f"{labels_path}: label {int(labels.max())} out of range 0..{len(class_names) - 1}")
    return ImageData(
        images=torch.from_numpy(images).unsqueeze(1),  # (N, H, W) -> (N, 1, H, W), no copy
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=class_names,
    )


def _load_idx_dataset(name: str, *, data_dir: str | Path | None, download: bool) -> LoadedDataset:
    download_root = Path(data_dir).expanduser() if data_dir is not None else _cache_root() / f"{name}-torchvision"
    bases = [download_root] if data_dir is not None else [*default_data_dirs(name), download_root]
    folders = _candidates(name, bases)
    files = next((found for folder in folders if (found := _idx_split_files(folder)) is not None), None)
    if files is None:
        if not download:
            raise _not_found(name, bases, reason="IDX files not found and download=False")
        _download_idx(name, download_root, bases)
        files = _idx_split_files(download_root / _SUBFOLDER[name])
        if files is None:
            raise _not_found(name, bases, reason="the download finished but the IDX files are missing")
    class_names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    return LoadedDataset(
        name=name,
        train=_read_idx_split(*files["train"], class_names),
        test=_read_idx_split(*files["test"], class_names),
    )


def _download_idx(name: str, root: Path, bases: Sequence[Path]) -> None:
    """Fetch the raw IDX files into <root>/<TorchvisionClass>/raw/ through torchvision's mirrors."""
    # Imported here: torchvision takes a while to import and almost every run finds the files locally.
    from torchvision import datasets as tv_datasets

    dataset_class = getattr(tv_datasets, _TORCHVISION_CLASS[name])
    try:
        dataset_class(root=str(root), train=True, download=True)
    # torchvision raises RuntimeError, URLError, OSError or others depending on where it failed; all
    # of them mean the same thing to the user: the data is not here and could not be fetched.
    except Exception as exc:
        raise _not_found(name, bases, reason=f"IDX files not found and the download failed ({exc})") from exc


# ------------------------------------------------------------------------------------ CIFAR-10 binary


def _cifar_files(folder: Path) -> tuple[list[Path], Path] | None:
    train = [folder / f"data_batch_{i}.bin" for i in range(1, 6)]
    test = folder / "test_batch.bin"
    return (train, test) if all(path.is_file() for path in [*train, test]) else None


def _read_cifar_batches(paths: Sequence[Path], class_names: tuple[str, ...]) -> ImageData:
    """Concatenate binary batches: each record is one label byte followed by 3x32x32 bytes (CHW)."""
    records = []
    for path in paths:
        raw = _read_bytes(path)
        if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
            raise MicrofedError(
                f"{path}: {len(raw)} bytes is not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 records",
                hint="the file is truncated or not from cifar-10-binary.tar.gz; fetch it again",
            )
        batch = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
        if int(batch[:, 0].max()) >= len(class_names):
            raise MicrofedError(f"{path}: label {int(batch[:, 0].max())} out of range 0..{len(class_names) - 1}")
        records.append(batch)
    images = np.concatenate([batch[:, 1:] for batch in records]).reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE)
    return ImageData(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(np.concatenate([batch[:, 0] for batch in records]).astype(np.int64)),
        class_names=class_names,
    )


def _cifar_class_names(folder: Path) -> tuple[str, ...]:
    meta = folder / "batches.meta.txt"
    if not meta.is_file():
        return CIFAR10_CLASSES
    names = tuple(line.strip() for line in meta.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise MicrofedError(f"{meta} lists no class names", hint="expected one class name per line")
    return names


def _load_cifar10(*, data_dir: str | Path | None, download: bool) -> LoadedDataset:
    bases = [Path(data_dir).expanduser()] if data_dir is not None else default_data_dirs("cifar10")
    folder = next((found for found in _candidates("cifar10", bases) if _cifar_files(found) is not None), None)
    if folder is None:
        if not download:
            raise _not_found("cifar10", bases, reason="binary batch files not found and download=False")
        download_root = bases[0] if data_dir is not None else _cache_root() / "cifar10"
        _download_cifar10(download_root, bases)
        folder = download_root / _CIFAR_FOLDER
    files = _cifar_files(folder)
    if files is None:
        raise _not_found("cifar10", bases, reason="the download finished but the batch files are missing")
    class_names = _cifar_class_names(folder)
    train_paths, test_path = files
    return LoadedDataset(
        name="cifar10",
        train=_read_cifar_batches(train_paths, class_names),
        test=_read_cifar_batches([test_path], class_names),
    )


def _download_cifar10(root: Path, bases: Sequence[Path]) -> None:
    # Imported here for the same reason as in _download_idx.
    from torchvision.datasets import utils as tv_utils

    try:
        tv_utils.download_and_extract_archive(
            CIFAR10_URL, download_root=str(root), md5=CIFAR10_MD5, remove_finished=True
        )
    except Exception as exc:  # see _download_idx: any failure means "not available"
        raise _not_found(
            "cifar10", bases, reason=f"binary batch files not found and the download failed ({exc})"
        ) from exc
