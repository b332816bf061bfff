"""Datasets: decode a named dataset, an image zip or an image folder into uint8 tensors, once.

Every source ends up as the same `LoadedDataset`: a train and a test `ImageData` of uint8 images
(N, C, H, W) with C in (1, 3), int64 labels (N,) and the class names the labels index. The split step
decodes through here once and writes shards; nothing downstream touches image files again.

Sources (`load_dataset`):

* ``"fashion-mnist"`` / ``"mnist"``: the original IDX files, plain or gzipped, read by our own parser.
* ``"cifar10"``: the *binary* CIFAR-10 release (fixed-length records). The Python release is pickled and
  pickle never runs on a data path here, so torchvision's ``CIFAR10`` class is not used.
* a ``.zip`` file or a directory laid out like the uploads of the platform we replace::

      [top-folder/]train/<class>/<image>   and   [top-folder/]test/<class>/<image>

* a ``.csv`` file (a local path or a ``gs://`` URI) listing one image per row under a header: an image column
  (``image``, ``path`` or ``filename``), a ``label`` column (class names) and an optional ``split`` column
  (``train`` / ``test``). Image paths are relative to the CSV's folder, absolute, or ``gs://`` URIs. Like a
  folder without test/, a CSV without test rows is an error. See `load_dataset`.

Named datasets are looked up in `default_data_dirs` and, when missing and allowed, downloaded.

Zips, folders and CSVs come from users and are read as hostile. Nothing is ever extracted to disk: entries are
read into memory one at a time. Entries with absolute paths or '..', symbolic links (in a zip's attributes or on
disk), special files and duplicate names are refused; so is anything over the `DatasetLimits` (file count, path
depth, what a zip expands to and each entry's compression ratio, the size of each image file and of a CSV, each
image's pixels and pixels per byte of file, all images' pixels together, the decoded tensors), each checked on
declared sizes and image headers before the bytes or pixels it bounds are read or decoded. An image listed in
both train and test (the same file however its path is spelled, or a byte-identical copy: every image's sha256 is
taken from the bytes read for its header) is refused, naming both. An image that cannot be decoded (truncated,
not an image) or breaks a per-image limit is an error naming it, or with bad_images='skip' it is left out, warned
about and recorded for the shard manifest. Class folder names are kept exactly (labels, manifests) and shown
through `display_name` in messages.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import os
import posixpath
import random
import re
import stat
import tempfile
import unicodedata
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NoReturn

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError, features

from microfed.training.errors import MicrofedError

__all__ = [
    "BAD_IMAGE_POLICIES",
    "COMPRESSION_RATIO_MIN_BYTES",
    "CSV_IMAGE_COLUMNS",
    "DATASET_NAMES",
    "DatasetLimits",
    "DuplicateImagesWarning",
    "ImageData",
    "LoadedDataset",
    "MAX_COMPRESSION_RATIO",
    "MAX_CSV_BYTES",
    "MAX_DECODED_BYTES",
    "MAX_DEPTH",
    "MAX_FILES",
    "MAX_FILE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_PIXELS_PER_BYTE",
    "MAX_TOTAL_BYTES",
    "MAX_TOTAL_PIXELS",
    "SYSTEM_DATA_DIR",
    "SkippedFile",
    "SkippedImagesWarning",
    "check_source",
    "default_data_dirs",
    "display_name",
    "load_dataset",
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

_LAYOUT = (
    "a .zip file or folder holding train/ and test/ (optionally inside one top folder), "
    "each with one sub-folder per class containing the images: train/<class>/<image>, test/<class>/<image>"
)


@dataclass(frozen=True, kw_only=True)
class SkippedFile:
    """An image file left out under bad_images='skip', and why."""

    file: str
    """Its path inside the zip or folder, exactly as stored there."""
    reason: str
    """What was wrong with it (the error it would have raised)."""


class SkippedImagesWarning(UserWarning):
    """Some images could not be read and were left out (bad_images='skip'); the manifest lists them."""


class DuplicateImagesWarning(UserWarning):
    """Some images are byte-identical copies of others in the same split: each copy is one more example.

    (A copy across train and test is an error, not a warning: it would leak the test set into training.)"""


@dataclass(frozen=True)
class ImageData:
    """One split of a dataset, fully decoded."""

    images: torch.Tensor
    """uint8, (N, C, H, W), C in (1, 3)."""
    labels: torch.Tensor
    """int64, (N,); each label indexes `class_names`."""
    class_names: tuple[str, ...]
    """Class names shared by train and test, in label order."""
    skipped: tuple[SkippedFile, ...] = ()
    """Files of this split left out because they could not be read (only with bad_images='skip')."""


@dataclass(frozen=True)
class LoadedDataset:
    """A decoded dataset: its name and its train and test splits (same classes, same image shape)."""

    name: str
    """A name from DATASET_NAMES, or the file name of the zip or folder it came from."""
    train: ImageData
    """The training split."""
    test: ImageData
    """The test split."""


BAD_IMAGE_POLICIES = ("fail", "skip")

# ---------------------------------------------------------------------------------------------- limits
# The defaults of `DatasetLimits`, one constant each so that the README's table can be checked against them
# (tests/test_hostile_inputs.py). Each is generous for real datasets (Fashion-MNIST or CIFAR as PNG files, a
# few hundred thousand ImageNet-like JPEGs) and strict for bombs. Figures measured on this project's 2-core
# machine (Pillow 12, the 70,000 Fashion-MNIST images saved as PNG):
#   pixels per byte of file: Fashion-MNIST PNGs 1.5 (median) to 4.9 (max); a 512x600 photo (matplotlib's sample
#   grace_hopper.jpg) 0.7 (PNG), 3.6-10 (JPEG q90-q50), 6.8 (lossy WebP); the photo upscaled to 2048x2400: 14
#   (JPEG), 28 (WebP); noise 0.3 (PNG);
#   one-colour images 0.1-1.7 at 8x8, 20-90 at 64x64, 35-1,100 at 224x224 (JPEG lowest, lossless WebP highest);
#   a synthetic scanned page (2550x3300, text lines on white) 13 (JPEG), 170 (PNG), 310 (1-bit PNG). The
#   decompression bomb of issue 14, a one-colour 9400x9400 lossless WebP of 3,436 bytes: 25,716.
#   decode speed on one core: 183 megapixels/s (JPEG), 128 megapixels/s (lossless WebP).

MAX_FILES = 1_000_000
"""Default of `DatasetLimits.max_files`: entries of a zip, files and folders of a folder, rows of a CSV. Room for
a few hundred thousand images with their folders (Fashion-MNIST has 70,000, CIFAR-10 60,000); the listing of a
million entries takes a few hundred MB of memory."""

MAX_DEPTH = 32
"""Default of `DatasetLimits.max_depth`: path components of an entry (`pets/train/cat/0.png` has 4). The layout
needs 4; images may sit in sub-folders of their class folder, as ImageFolder allows, and 32 leaves room for
any real tree while refusing the 10,000-level paths that only exist to exhaust a walker."""

MAX_TOTAL_BYTES = 4 * 1024**3
"""Default of `DatasetLimits.max_total_bytes` (4 GiB): what a zip expands to. Twenty times the 200 MB the
platform we replace accepted per upload; zips of PNG or JPEG files barely compress, so an honest upload expands
to little more than its own size."""

MAX_COMPRESSION_RATIO = 100.0
"""Default of `DatasetLimits.max_compression_ratio`: how many times a zip entry may expand. PNG and JPEG files
shrink by a few percent in a zip; a zip bomb's entries expand about 1000 times."""

COMPRESSION_RATIO_MIN_BYTES = 1 << 20
"""Zip entries up to this size (1 MiB) are not held to the compression ratio: a small file of flat colour
compresses well and harms no one, and the total (`max_total_bytes`) bounds what many of them expand to."""

MAX_FILE_BYTES = 256 * 1024**2
"""Default of `DatasetLimits.max_file_bytes` (256 MiB): one image file, in a folder, a zip or a bucket, checked
before it is read. An image within the pixel limit needs at most this much even uncompressed (89,478,485
pixels x 3 bytes of RGB is 2^28 - 1 bytes); real photos are a few MiB. A larger file is not an image worth
reading (issue 14: a sparse 3 GB ".png" took 3.7 GB of memory)."""

MAX_CSV_BYTES = 256 * 1024**2
"""Default of `DatasetLimits.max_csv_bytes` (256 MiB): a CSV listing images, checked before it is read. The
`max_files` rows at 268 bytes each (long gs:// paths and a few extra columns included)."""

MAX_IMAGE_PIXELS = 89_478_485
"""Default of `DatasetLimits.max_image_pixels`: width x height of one image, from its header. Pillow's own
default (a quarter gigabyte of RGB); a 12,000 x 7,400 panorama passes."""

MAX_PIXELS_PER_BYTE = 1024
"""Default of `DatasetLimits.max_pixels_per_byte`: an image's pixels per byte of its file, for every image.
Real images stay far below (Fashion-MNIST PNGs at most 4.9, photos under 30, scanned pages up to about 300;
see the figures above); images of one flat colour reach it from about 210x210 as lossless WebP and 2000x2000 as
GIF, and not even at the pixel limit as PNG (815 at 9000x9000), JPEG (64) or lossy WebP (561). Decompression
bombs are far above (25,716 for issue 14's WebP). So a hostile upload buys at most 1024 decoded pixels with each
byte it sends."""

MAX_TOTAL_PIXELS = 100_000_000_000
"""Default of `DatasetLimits.max_total_pixels`: the pixels of all images together (train and test), summed from
their headers before any is decoded: the decoding work of the split step, each pixel being decoded once (about
10 minutes on one core at the speeds above). Holds 500,000 photos of 0.2 megapixels (ImageNet's average is
about 0.18) before resizing; a hostile upload needs about 100 MB of image files to reach it (see
`MAX_PIXELS_PER_BYTE`), no less than an honest dataset of the same cost."""

MAX_DECODED_BYTES = 4 * 1024**3
"""Default of `DatasetLimits.max_decoded_bytes` (4 GiB): the decoded uint8 tensors (N x C x H x W, train and
test, after resizing) that the split step holds in memory and writes as shards. Fashion-MNIST needs 55 MB,
CIFAR-10 184 MB, 300,000 RGB images at 64x64 3.7 GB."""


@dataclass(frozen=True, kw_only=True)
class DatasetLimits:
    """Limits on an image zip, folder or CSV, which come from users and are read as hostile input.

    Every limit is checked on what headers, the file system or the bucket declare, before the bytes or pixels
    it bounds are read or decoded, and a refusal names the file, what it holds and the limit. The defaults are
    the MAX_* constants of this module (each says why its value). Named datasets (our own parsers over known
    files) are not subject to them.
    """

    max_files: int = MAX_FILES
    """Entries of a zip, files and folders of a folder, rows of a CSV."""
    max_depth: int = MAX_DEPTH
    """Path components of a zip entry or of a file or folder under a dataset folder."""
    max_total_bytes: int = MAX_TOTAL_BYTES
    """Zip archives: the sum of the entries' uncompressed sizes, i.e. what the archive expands to."""
    max_compression_ratio: float = MAX_COMPRESSION_RATIO
    """Zip archives: uncompressed over compressed size of any entry larger than COMPRESSION_RATIO_MIN_BYTES."""
    max_file_bytes: int = MAX_FILE_BYTES
    """Size of one image file (a file of a folder, a zip entry, an image a CSV lists)."""
    max_csv_bytes: int = MAX_CSV_BYTES
    """Size of a CSV file."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Width x height of one image, read from its header before any pixel is decoded."""
    max_pixels_per_byte: float = MAX_PIXELS_PER_BYTE
    """Width x height of one image over the size of its file: how much decoding each byte of input may cost."""
    max_total_pixels: int = MAX_TOTAL_PIXELS
    """Width x height summed over all images, train and test, before resizing: the split step's decoding work."""
    max_decoded_bytes: int = MAX_DECODED_BYTES
    """The decoded uint8 tensors (N x C x H x W, train and test together) the split step holds in memory."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and value > 0):
                raise MicrofedError(f"DatasetLimits.{field.name} must be a positive number, got {value!r}")


def display_name(name: str, max_chars: int = 120) -> str:
    """`name` (a file or class folder name from a user's archive) made safe to print in a message or log.

    Control characters (terminal escapes, newlines that would forge log lines), format characters such as
    bidirectional overrides, and unassigned or private code points are shown as escapes; names longer than
    `max_chars` keep their start and end. Manifests keep the exact name: this is for display only.
    """
    shown = "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch)[0] in "CZ" and ch != " " else ch
        for ch in name
    )
    if len(shown) <= max_chars:
        return shown
    half = (max_chars - 1) // 2
    return f"{shown[:half]}…{shown[-half:]}"


# --------------------------------------------------------------------------------------------- sources


def _canonical_name(name: str) -> str | None:
    """`name` as it appears in DATASET_NAMES, or None: case-insensitive, '_' accepted for '-'."""
    normalized = name.strip().lower().replace("_", "-")
    return normalized if normalized in DATASET_NAMES else None


def default_data_dirs(name: str) -> list[Path]:
    """Folders searched for a named dataset, in order.

    $MICROFED_DATA_DIR/<name> (when the variable is set; read at call time so tests and the CLI can
    change it), then Debian's /usr/share/datasets/<name>, then ~/.cache/microfed/<name>.
    """
    canonical = _canonical_name(name)
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


def load_dataset(
    source: str | Path,
    *,
    data_dir: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
    download: bool = True,
    limits: DatasetLimits | None = None,
    bad_images: str = "fail",
) -> LoadedDataset:
    """Decode `source` into uint8 tensors.

    source: a name from DATASET_NAMES (case-insensitive; 'fashion_mnist' works too), the path of a
        .zip file or folder (see the module docstring for the layout), or a .csv file (local or gs://, see
        below). Names win over same-named paths.
    data_dir: for a named dataset, the only folder to look in (instead of `default_data_dirs`), and
        where a download goes. Ignored for zips and folders.
    image_size: (height, width) to resize every image to (bilinear). Without it a named dataset keeps
        its native size and a zip/folder uses the size all its images share, or else the most common one.
    download: fetch a named dataset that is not found locally (needs network access).
    limits: what a zip, folder or CSV may hold (`DatasetLimits()` when None). Zip entries with absolute paths
        or '..', symbolic links, and anything over a limit are errors that name the entry and the limit.
    bad_images: `fail` (default): an image that cannot be decoded (truncated, not an image, over the file size,
        pixel or pixels-per-byte limit) is an error naming it; `skip`: it is left out with a
        SkippedImagesWarning and recorded in `ImageData.skipped`, which the shard manifest lists.

    A CSV source is UTF-8 text (a byte-order mark is allowed) with a header row naming its columns
    (case-insensitive; other columns are ignored):

    * the image: exactly one of ``image``, ``path``, ``filename``. A relative path is relative to the CSV's own
      folder (or gs:// prefix); absolute paths and ``gs://`` URIs are read as they are. Each image is listed
      once.
    * ``label``: the class name, as text. Classes are sorted by name, as class folders are.
    * ``split`` (optional): ``train`` or ``test`` on every row. Without it every row is a training row and,
      as for a folder without test/, the dataset is refused for lack of a test set.

    The CSV names what is read, like a command line; the images themselves are decoded under the same
    limits and `bad_images` policy as a zip or folder. A malformed CSV (missing column, empty field, unknown
    split, missing image file, a test class with no training row) is an error naming the CSV, the row
    (the header is row 1) and the column.
    """
    size = _check_image_size(image_size)
    if bad_images not in BAD_IMAGE_POLICIES:
        raise MicrofedError(f"unknown bad_images {bad_images!r}", hint=f"use one of {', '.join(BAD_IMAGE_POLICIES)}")
    limits = limits or DatasetLimits()
    kind = check_source(source)
    if kind == "name":
        dataset = _load_named(str(_canonical_name(str(source))), data_dir=data_dir, download=download)
        return _resized(dataset, size) if size is not None else dataset
    if kind == "csv":
        return _load_csv(str(source) if _is_gcs(source) else str(Path(source).expanduser()), size, limits, bad_images)
    path = Path(source).expanduser()
    shown = display_name(path.name)
    if kind == "folder":
        return _load_image_tree(path.name, _list_folder(shown, path, limits), size, limits, bad_images)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:  # e.g. a damaged central directory
        raise MicrofedError(
            f"{shown} is not a readable zip archive ({exc})", hint="the upload is damaged or incomplete; zip it again"
        ) from None
    with archive:
        return _load_image_tree(path.name, _list_zip(shown, archive, limits), size, limits, bad_images)


def check_source(source: str | Path) -> str:
    """`name`, `folder`, `zip` or `csv` for a usable source, without decoding anything; else MicrofedError.

    A gs:// CSV is checked for its form only (nothing is fetched); a local CSV must be a file.
    """
    if _canonical_name(str(source)) is not None:
        return "name"
    if _is_csv(source):
        _check_csv_source(source)
        return "csv"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file() and zipfile.is_zipfile(path):
        return "zip"
    if not path.exists():
        what = "is not a dataset name or an existing path"
    elif path.suffix.lower() == ".zip":
        what = "is not a readable zip archive (damaged or incomplete upload?)"
    else:
        what = "is neither a .zip file nor a folder"
    raise MicrofedError(
        f"dataset source {str(source)!r} {what}",
        hint=f"use one of {', '.join(DATASET_NAMES)}, {_LAYOUT}, or a .csv file listing images and labels",
    )


def _check_image_size(image_size: tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if (
        len(image_size) != 2
        or not all(isinstance(side, int) and not isinstance(side, bool) for side in image_size)
        or min(image_size) < 1
    ):
        raise MicrofedError(
            f"image_size must be (height, width) with two positive integers, got {image_size!r}",
            hint="for example image_size=(28, 28), or leave it unset to keep the images' own size",
        )
    return (image_size[0], image_size[1])


def _load_named(name: str, *, data_dir: str | Path | None, download: bool) -> LoadedDataset:
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


# ------------------------------------------------------------------------------- image zips / folders

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# Formats every Pillow build reads, plus those that depend on optional libraries when present.
_IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif"} | ({".webp"} if features.check("webp") else set())
)
_DECODE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zlib.error,
    zipfile.BadZipFile,
    RuntimeError,  # zipfile: encrypted member, or a compression method it lacks (Windows' Deflate64)
)
_READABLE = "readable formats: " + ", ".join(sorted(_IMAGE_SUFFIXES))
_SKIP_HINT = "or pass bad_images='skip' to leave unreadable images out (they are counted in the manifest)"
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: cheap keys for the reader's digests
class _Entry:
    """A file or folder inside a zip or directory tree."""

    parts: tuple[str, ...]
    """Its path split on '/', relative to the layout root (after any top folder is stripped)."""
    name: str
    """Its path as the user sees it in the zip or folder, for messages and the manifest."""
    read: Callable[[], bytes] | None
    """Returns the file's bytes (at most `DatasetLimits.max_file_bytes` + 1 of them); None for a folder."""
    size: int = 0
    """The file's size as its file system, zip header or bucket declares it, checked before it is read."""
    row: int | None = None
    """For an image listed in a CSV: the CSV row that names it (the header is row 1), shown in messages."""

    def shown(self) -> str:
        """Its name made safe for a message, with the CSV row when it came from one."""
        return display_name(self.name) + (f" (row {self.row})" if self.row is not None else "")


def _ignored(parts: tuple[str, ...]) -> bool:
    # macOS zips carry __MACOSX/ resource forks and .DS_Store files; neither is data.
    return any(part == "__MACOSX" or part.startswith(".") for part in parts)


def _zip_parts(source: str, raw: str) -> tuple[str, ...]:
    """The parts of a zip entry's path. Absolute paths and '..' are refused although nothing is ever
    extracted to disk here: an archive that holds them was made to attack whoever extracts it."""
    # Some Windows tools write backslashes; the zip format itself only knows '/'.
    name = raw.replace("\\", "/")
    layout = "entries must be relative paths inside the archive, such as train/<class>/<image>"
    if name.startswith("/") or _WINDOWS_DRIVE.match(name):
        raise MicrofedError(f"{source}: entry {display_name(raw)} has an absolute path", hint=layout)
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise MicrofedError(f"{source}: entry {display_name(raw)} points outside the archive with '..'", hint=layout)
    return parts


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    # Unix zip tools keep st_mode in the high 16 bits of the external attributes.
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_depth(source: str, what: str, parts: tuple[str, ...], limits: DatasetLimits) -> None:
    if len(parts) > limits.max_depth:
        raise MicrofedError(
            f"{source}: {what} {display_name('/'.join(parts))} is {len(parts)} levels deep, over the limit of "
            f"{limits.max_depth}",
            hint=f"paths may have at most {limits.max_depth} components (DatasetLimits.max_depth); expected {_LAYOUT}",
        )


def _check_zip_entry(source: str, info: zipfile.ZipInfo, total: int, limits: DatasetLimits) -> None:
    shown = display_name(info.filename)
    if _is_symlink(info):
        raise MicrofedError(
            f"{source}: entry {shown} is a symbolic link",
            hint="an archive may hold only regular files and folders; zip the files themselves, not links to them",
        )
    if total > limits.max_total_bytes:
        raise MicrofedError(
            f"{source}: the archive expands to more than {_size(limits.max_total_bytes)} (at entry {shown})",
            hint=f"archives may expand to at most {_size(limits.max_total_bytes)} "
            "(DatasetLimits.max_total_bytes); split the dataset or use smaller images",
        )
    ratio = info.file_size / max(1, info.compress_size)
    if info.file_size > COMPRESSION_RATIO_MIN_BYTES and ratio > limits.max_compression_ratio:
        raise MicrofedError(
            f"{source}: entry {shown} expands {ratio:.0f} times ({_size(info.compress_size)} to "
            f"{_size(info.file_size)}), a zip bomb's ratio",
            hint=f"entries over {_size(COMPRESSION_RATIO_MIN_BYTES)} may expand at most "
            f"{limits.max_compression_ratio:g} times (DatasetLimits.max_compression_ratio); "
            "store images as PNG or JPEG",
        )


def _list_zip(source: str, archive: zipfile.ZipFile, limits: DatasetLimits) -> list[_Entry]:
    infos = archive.infolist()
    _check_count(source, len(infos), limits)
    entries, seen, total = [], set(), 0
    for info in infos:
        parts = _zip_parts(source, info.filename)
        _check_depth(source, "entry", parts, limits)
        total += info.file_size
        _check_zip_entry(source, info, total, limits)
        if not parts or _ignored(parts):
            continue
        name = "/".join(parts)
        if not info.is_dir():
            if name in seen:  # which of two same-named entries is "the" file is up to the tool that extracts
                raise MicrofedError(
                    f"{source}: entry {display_name(name)} appears twice", hint="every path may appear once"
                )
            seen.add(name)
        reader = None if info.is_dir() else functools.partial(_read_member, archive, info)
        entries.append(_Entry(parts, name, reader, size=info.file_size))
    return entries


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The entry's bytes, never more than its header declares (the totals above were checked on those)."""
    with archive.open(info) as member:
        data = member.read(info.file_size + 1)
    if len(data) > info.file_size:
        raise zipfile.BadZipFile(f"the entry holds more than the {info.file_size} bytes its header declares")
    if len(data) < info.file_size:
        raise zipfile.BadZipFile(f"the entry holds {len(data)} bytes where its header declares {info.file_size}")
    return data


def _list_folder(source: str, root: Path, limits: DatasetLimits) -> list[_Entry]:
    """Every file and folder under root; links and special files are refused, not followed."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        folder = Path(dirpath).relative_to(root).parts
        for name in sorted([*dirnames, *filenames]):
            parts = (*folder, name)
            if _ignored(parts):
                continue
            _check_depth(source, "path", parts, limits)
            path = os.path.join(dirpath, name)
            status = os.lstat(path)
            if stat.S_ISLNK(status.st_mode):
                raise MicrofedError(
                    f"{source}: {display_name('/'.join(parts))} is a symbolic link",
                    hint="a dataset folder may hold only regular files and folders; copy the files in instead",
                )
            if stat.S_ISDIR(status.st_mode):
                entries.append(_Entry(parts, "/".join(parts), None))
            elif stat.S_ISREG(status.st_mode):
                read = functools.partial(_read_file, path, limits.max_file_bytes)
                entries.append(_Entry(parts, "/".join(parts), read, size=status.st_size))
            else:
                raise MicrofedError(
                    f"{source}: {display_name('/'.join(parts))} is not a regular file", hint=f"expected {_LAYOUT}"
                )
            _check_count(source, len(entries), limits)
        dirnames[:] = sorted(d for d in dirnames if not _ignored((d,)))  # walked in a stable order
    return entries


def _check_count(source: str, count: int, limits: DatasetLimits) -> None:
    if count > limits.max_files:
        raise MicrofedError(
            f"{source}: more than {limits.max_files:,} files",
            hint=f"a dataset may hold at most {limits.max_files:,} files (DatasetLimits.max_files)",
        )


def _folders(entries: list[_Entry]) -> set[str]:
    """Top-level folder names: from explicit folder entries and from the paths of files below them."""
    return {entry.parts[0] for entry in entries if len(entry.parts) > 1 or entry.read is None}


def _strip_top_folder(entries: list[_Entry]) -> list[_Entry]:
    """Drop one enclosing folder (zips made by 'compress folder' have one) when train/ test/ are inside."""
    top_folders = _folders(entries)
    if top_folders & {"train", "test"} or len(top_folders) != 1:
        return entries
    return [dataclasses.replace(entry, parts=entry.parts[1:]) for entry in entries if len(entry.parts) > 1]


def _is_image(entry: _Entry) -> bool:
    return entry.read is not None and PurePosixPath(entry.parts[-1]).suffix.lower() in _IMAGE_SUFFIXES


def _labelled(classes: dict[str, list[_Entry]], class_names: tuple[str, ...]) -> list[tuple[_Entry, int]]:
    return [(entry, label) for label, name in enumerate(class_names) for entry in classes.get(name, [])]


def _reason(exc: Exception) -> str:
    # Pillow's UnidentifiedImageError text shows a BytesIO repr, which tells the user nothing.
    return "not an image format Pillow can read" if isinstance(exc, UnidentifiedImageError) else str(exc)


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class _TreeReader:
    """Decodes the images of one zip or folder under `limits`; per-image failures follow `bad_images`."""

    def __init__(self, source: str, limits: DatasetLimits, bad_images: str) -> None:
        self.source = display_name(source)
        self.limits = limits
        self.skip = bad_images == "skip"
        self.skipped: list[tuple[str, SkippedFile]] = []  # (split, file)
        self.digests: dict[_Entry, bytes] = {}  # sha256 of each planned file's bytes
        self.copies: list[tuple[_Entry, _Entry]] = []  # (first, copy): byte-identical images in one split

    def bad(self, entry: _Entry, problem: str, hint: str) -> None:
        """Fail naming the file, or (bad_images='skip') remember it and go on."""
        if not self.skip:
            raise MicrofedError(f"{self.source}: {problem}", hint=f"{hint}; {_SKIP_HINT}")
        self.skipped.append((entry.parts[0], SkippedFile(file=entry.name, reason=problem)))

    def class_files(self, split: str, entries: list[_Entry]) -> dict[str, list[_Entry]]:
        """Images of one split grouped by class folder; every class folder must hold at least one image."""
        classes: dict[str, list[_Entry]] = {}
        for entry in entries:
            if entry.parts[0] != split or len(entry.parts) < 2:
                continue
            if len(entry.parts) == 2 and entry.read is not None:
                if _is_image(entry):  # an image outside any class folder would otherwise be dropped silently
                    raise MicrofedError(
                        f"{self.source}: {display_name(entry.name)} is not inside a class folder",
                        hint=f"move it into {split}/<class>/; expected {_LAYOUT}",
                    )
                continue  # stray non-image files (README, Thumbs.db) are not data
            images = classes.setdefault(entry.parts[1], [])
            if _is_image(entry):  # images in nested folders count for their class, as in ImageFolder
                images.append(entry)
        if not classes:
            raise MicrofedError(f"{self.source}: {split}/ has no class folders", hint=f"expected {_LAYOUT}")
        for class_name, images in classes.items():
            if not images:
                raise MicrofedError(
                    f"{self.source}: class folder {split}/{display_name(class_name)}/ contains no images",
                    hint=f"add images ({', '.join(sorted(_IMAGE_SUFFIXES))}) or remove the folder",
                )
            images.sort(key=lambda entry: entry.parts)  # zip order is arbitrary; labels must not depend on it
        return classes

    def read(self, entry: _Entry) -> bytes | None:
        """The file's bytes, or None when it was skipped; its declared size is checked before it is read, and
        the read itself stops one byte past the limit (a file that grew since it was listed)."""
        assert entry.read is not None  # only files reach here (internal invariant, not user input)
        limit = self.limits.max_file_bytes
        try:
            data = entry.read() if entry.size <= limit else None
        except _DECODE_ERRORS as exc:  # unreadable (permissions), or a zip entry that is not what it declares
            self.bad(entry, f"cannot read image {entry.shown()} ({_reason(exc)})", hint="replace or remove it")
            return None
        if data is not None and len(data) <= limit:
            return data
        found = _size(entry.size) if data is None else f"more than {_size(limit)}"
        self.bad(
            entry,
            f"image file {entry.shown()} is {found}, over the limit of {_size(limit)} per image file",
            hint=f"image files may be at most {_size(limit)} (DatasetLimits.max_file_bytes); store the image "
            "compressed (PNG, JPEG) or smaller, or remove it",
        )
        return None

    def open(self, entry: _Entry, data: bytes) -> Image.Image | None:
        """The image with only its header read, or None when it was skipped; the per-image pixel limits are
        checked here, before anything is decoded."""
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:  # Pillow's own check, at twice its MAX_IMAGE_PIXELS
            found = re.search(r"\((\d+) pixels\)", str(exc))
            declared = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow opens"
            self.bad(
                entry,
                f"image {entry.shown()} declares {declared}, over the limit of {self.limits.max_image_pixels:,} "
                "(a decompression bomb?)",
                hint=self._pixels_hint(),
            )
            return None
        except _DECODE_ERRORS as exc:
            self.bad(
                entry,
                f"cannot decode image {entry.shown()} ({_reason(exc)})",
                hint=f"replace or remove it; {_READABLE}",
            )
            return None
        pixels = image.width * image.height
        if pixels > self.limits.max_image_pixels:
            image.close()
            self.bad(
                entry,
                f"image {entry.shown()} declares {image.width}x{image.height} = {pixels:,} pixels, over the limit "
                f"of {self.limits.max_image_pixels:,} (a decompression bomb?)",
                hint=self._pixels_hint(),
            )
            return None
        per_byte = pixels / max(1, len(data))
        if per_byte > self.limits.max_pixels_per_byte:
            image.close()
            self.bad(
                entry,
                f"image {entry.shown()} declares {image.width}x{image.height} = {pixels:,} pixels in a file of "
                f"{len(data):,} bytes, {per_byte:,.0f} pixels per byte, over the limit of "
                f"{self.limits.max_pixels_per_byte:,g} (a decompression bomb?)",
                hint=f"images may hold at most {self.limits.max_pixels_per_byte:,g} pixels per byte of file "
                "(DatasetLimits.max_pixels_per_byte; photos hold under 30): an image this compressible is almost "
                "all one colour; resize or remove it",
            )
            return None
        return image

    def _pixels_hint(self) -> str:
        return (
            f"images may have at most {self.limits.max_image_pixels:,} pixels (DatasetLimits.max_image_pixels); "
            "resize or remove the image"
        )

    def plan(
        self, files: Sequence[tuple[_Entry, int]], image_size: tuple[int, int] | None
    ) -> tuple[list[tuple[_Entry, int]], int, tuple[int, int]]:
        """The files whose headers read, and channels and (height, width) for the whole dataset.

        C=1 only when every image is grayscale, so no colour is thrown away (palette images count as
        colour: telling a grey palette apart would mean decoding them here). Without `image_size`, the size
        every image shares, else the most common one (ties: the larger area, then the larger height), so
        that the fewest images are resampled. Train and test are planned together: one model sees both.
        Each file's sha256 is taken here, from the bytes read for its header, to find copies across splits.
        """
        sizes: Counter[tuple[int, int]] = Counter()
        all_gray = True
        kept = []
        total_pixels = 0
        for number, (entry, label) in enumerate(files, start=1):
            data = self.read(entry)
            image = None if data is None else self.open(entry, data)
            if data is None or image is None:
                continue
            with image:
                all_gray = all_gray and image.mode in _GRAY_MODES
                sizes[(image.height, image.width)] += 1
                total_pixels += image.width * image.height
            self._check_total_pixels(total_pixels, entry, number, len(files))
            self.digests[entry] = hashlib.sha256(data).digest()
            kept.append((entry, label))
        self._check_copies([entry for entry, _ in kept])
        if image_size is None and sizes:
            image_size = max(sizes, key=lambda hw: (sizes[hw], hw[0] * hw[1], hw))
        channels = 1 if all_gray else 3
        height, width = image_size or (1, 1)
        needed = len(kept) * channels * height * width
        if needed > self.limits.max_decoded_bytes:
            raise MicrofedError(
                f"{self.source}: {len(kept):,} images of {channels}x{height}x{width} need {_size(needed)} decoded, "
                f"over the limit of {_size(self.limits.max_decoded_bytes)}",
                hint="pass a smaller image_size (--image-size), use fewer images, or raise "
                "DatasetLimits.max_decoded_bytes",
            )
        return kept, channels, (height, width)

    def _check_total_pixels(self, total: int, entry: _Entry, number: int, count: int) -> None:
        if total > self.limits.max_total_pixels:
            raise MicrofedError(
                f"{self.source}: the images declare more than {self.limits.max_total_pixels:,} pixels in all "
                f"({total:,} by image {number:,} of {count:,}, {entry.shown()})",
                hint=f"a dataset may hold at most {self.limits.max_total_pixels:,} pixels before resizing "
                "(DatasetLimits.max_total_pixels), the decoding work of the split step; use fewer images, or "
                "store them at a smaller size",
            )

    def _check_copies(self, entries: Sequence[_Entry]) -> None:
        """Refuse byte-identical images in train and test, naming both; remember copies within one split."""
        first: dict[bytes, dict[str, _Entry]] = {}  # digest -> split -> the first image of that content there
        for entry in entries:
            seen = first.setdefault(self.digests[entry], {})
            if entry.parts[0] in seen:
                self.copies.append((seen[entry.parts[0]], entry))
            else:
                seen[entry.parts[0]] = entry
        leaks = [(seen["test"], seen["train"]) for seen in first.values() if len(seen) == 2]
        if leaks:
            test, train = leaks[0]
            more = f"; {len(leaks) - 1:,} more test image(s) are copies of training images" if len(leaks) > 1 else ""
            raise MicrofedError(
                f"{self.source}: test image {test.shown()} has the same content as training image "
                f"{train.shown()}{more}",
                hint="an image in both train and test leaks the test set into training and inflates the test "
                "accuracy; remove one of the copies",
            )

    def decode(
        self, files: Sequence[tuple[_Entry, int]], channels: int, size: tuple[int, int], class_names: tuple[str, ...]
    ) -> ImageData:
        """Decode into one preallocated (N, C, H, W) array: no per-image tensors to stack afterwards."""
        height, width = size
        images = np.empty((len(files), channels, height, width), dtype=np.uint8)
        keep = np.ones(len(files), dtype=bool)
        for index, (entry, _) in enumerate(files):
            array = self._pixels(entry, channels, size)
            if array is None:
                keep[index] = False
                continue
            images[index] = array[None] if channels == 1 else array.transpose(2, 0, 1)
        labels = torch.tensor([label for _, label in files], dtype=torch.int64)
        if not keep.all():
            images, labels = images[keep], labels[torch.from_numpy(keep)]
        return ImageData(images=torch.from_numpy(images), labels=labels, class_names=class_names)

    def _pixels(self, entry: _Entry, channels: int, size: tuple[int, int]) -> np.ndarray | None:
        data = self.read(entry)
        if data is None:
            return None
        if hashlib.sha256(data).digest() != self.digests[entry]:  # what was checked is what gets decoded
            raise MicrofedError(
                f"{self.source}: image {entry.shown()} changed while the dataset was being read",
                hint="leave the dataset unchanged while the split step runs, and run it again",
            )
        image = self.open(entry, data)
        if image is None:
            return None
        height, width = size
        try:
            with image:
                pixels = _to_mode(image, channels)
                if pixels.size != (width, height):
                    pixels = pixels.resize((width, height), Image.Resampling.BILINEAR)
                return np.asarray(pixels)
        except _DECODE_ERRORS as exc:  # the header was fine but the pixel data is not (truncated files)
            self.bad(entry, f"cannot decode image {entry.shown()} ({_reason(exc)})", "replace or remove it")
            return None

    def require_images(self, labels: Iterable[int], class_names: tuple[str, ...], split: str) -> None:
        """After skipping: every training class keeps an image, and the test set is not empty."""
        have = set(labels)
        lost = [name for label, name in enumerate(class_names) if label not in have]
        after = f"after skipping {len(self.skipped)} unreadable file(s)"
        if split == "train" and lost:
            raise MicrofedError(
                f"{self.source}: no readable images left in train/{display_name(lost[0])}/ {after}",
                hint="every class needs at least one readable training image",
            )
        if not have:
            raise MicrofedError(
                f"{self.source}: no readable images left in {split}/ {after}", hint=f"add readable images; {_READABLE}"
            )

    def skipped_in(self, split: str) -> tuple[SkippedFile, ...]:
        return tuple(file for where, file in self.skipped if where == split)


def _load_image_tree(
    source: str,
    entries: list[_Entry],
    image_size: tuple[int, int] | None,
    limits: DatasetLimits,
    bad_images: str,
) -> LoadedDataset:
    reader = _TreeReader(source, limits, bad_images)
    entries = _strip_top_folder(entries)
    present = _folders(entries)
    missing = [f"{split}/" for split in ("train", "test") if split not in present]
    if missing:
        found = ", ".join(f"{display_name(folder)}/" for folder in sorted(present)) or "nothing"
        raise MicrofedError(
            f"{reader.source}: no {' and no '.join(missing)} folder (found at the top: {found})",
            hint=f"expected {_LAYOUT}",
        )
    train = reader.class_files("train", entries)
    test = reader.class_files("test", entries)
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise MicrofedError(
            f"{reader.source}: test/ has classes that train/ lacks: {', '.join(map(display_name, unknown))}",
            hint="every test class needs training images under train/<class>/ (names are case-sensitive)",
        )
    class_names = tuple(sorted(train))  # exact names: the manifest keeps them; messages show display_name
    files = _labelled(train, class_names) + _labelled(test, class_names)
    return _decode_splits(reader, source, files, class_names, image_size)


def _decode_splits(
    reader: _TreeReader,
    source: str,
    files: list[tuple[_Entry, int]],
    class_names: tuple[str, ...],
    image_size: tuple[int, int] | None,
) -> LoadedDataset:
    """Plan and decode labelled files whose `parts[0]` is their split (train or test) into a LoadedDataset."""
    files, channels, size = reader.plan(files, image_size)
    splits = {}
    for split in ("train", "test"):
        part = [(entry, label) for entry, label in files if entry.parts[0] == split]
        reader.require_images((label for _, label in part), class_names, split)
        data = reader.decode(part, channels, size, class_names)
        reader.require_images(data.labels.tolist(), class_names, split)
        splits[split] = dataclasses.replace(data, skipped=reader.skipped_in(split))
    if reader.skipped:
        names = ", ".join(display_name(file.file) for _, file in reader.skipped[:5])
        more = f" and {len(reader.skipped) - 5} more" if len(reader.skipped) > 5 else ""
        warnings.warn(
            f"{reader.source}: skipped {len(reader.skipped)} unreadable image(s): {names}{more}",
            SkippedImagesWarning,
            stacklevel=4,  # the caller of load_dataset
        )
    if reader.copies:
        first, copy = reader.copies[0]
        warnings.warn(
            f"{reader.source}: {len(reader.copies)} image(s) are byte-identical copies of another image of the same "
            f"split, e.g. {copy.shown()} of {first.shown()}; each copy counts as one more example",
            DuplicateImagesWarning,
            stacklevel=4,
        )
    return LoadedDataset(name=source, train=splits["train"], test=splits["test"])


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to 'L' (channels=1) or 'RGB' (channels=3); alpha is dropped."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert('L') clips 16-bit values at 255 instead of scaling them; scale by hand.
        wide = np.clip(np.asarray(image, dtype=np.int32), 0, 65535)  # 255 * 65535 fits; 4 bytes a pixel, not 8
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the direct P -> RGB conversion warns about the transparency
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)  # convert() would copy anyway


# ------------------------------------------------------------------------------------------ CSV lists

CSV_IMAGE_COLUMNS = ("image", "path", "filename")
"""Accepted names of a CSV's image column (exactly one of them)."""
_CSV_SPLITS = ("train", "test")
_CSV_FORMAT = (
    "a CSV with a header row: an image column (image, path or filename), a label column, and optionally a "
    "split column (train or test), e.g. 'image,label,split' then 'cats/1.png,cat,train'"
)
# Concurrent downloads of gs:// images listed in a CSV (latency-bound, as storage's own transfers are).
_CSV_FETCH_THREADS = 8


def _is_gcs(source: str | Path) -> bool:
    return str(source).startswith("gs://")


def _is_csv(source: str | Path) -> bool:
    return str(source).strip().lower().endswith(".csv")


def _check_csv_source(source: str | Path) -> None:
    if _is_gcs(source):
        from microfed.training.storage import split_gcs  # google-cloud-storage only where gs:// is used

        split_gcs(source)
        return
    path = Path(source).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise MicrofedError(f"dataset source {str(source)!r}: the CSV file {what}", hint=f"expected {_CSV_FORMAT}")


@dataclass(frozen=True)
class _CsvRow:
    """One image listed in a CSV."""

    row: int
    """Row number in the CSV, the header being row 1."""
    written: str
    """The image field as written (messages and the manifest's skipped files show this)."""
    location: str
    """Where the image is: the real path of a local file, or a gs:// URI (see `_csv_location`)."""
    label: str
    split: str
    size: int | None = None
    """A local file's size when the CSV was read; None for a gs:// image (known once it is downloaded)."""


@dataclass(frozen=True)
class _CsvTable:
    """A CSV's rows, checked, and the columns they came from."""

    rows: list[_CsvRow]
    image_column: str
    has_split: bool


def _load_csv(source: str, image_size: tuple[int, int] | None, limits: DatasetLimits, bad_images: str) -> LoadedDataset:
    name = source.rstrip("/").rsplit("/", 1)[-1]
    reader = _TreeReader(name, limits, bad_images)
    table = _read_csv_table(source, reader.source, limits)
    if not table.has_split:
        table = _hold_out_test(table)
    class_names = _csv_class_names(reader.source, table)
    index = {class_name: label for label, class_name in enumerate(class_names)}
    with tempfile.TemporaryDirectory(prefix="microfed-csv-") as tmp:
        local = _fetch_gcs_images(reader.source, table, Path(tmp), limits.max_file_bytes)
        files = [(_csv_entry(row, local, limits.max_file_bytes), index[row.label]) for row in table.rows]
        return _decode_splits(reader, name, files, class_names, image_size)


def _csv_entry(row: _CsvRow, local: dict[str, tuple[Path, int]], limit: int) -> _Entry:
    """The image of a CSV row as an entry of its split and class: its file (for a gs:// image, the downloaded
    copy) and the size declared for it."""
    path, size = local.get(row.location) or (row.location, row.size or 0)
    read = functools.partial(_read_file, path, limit)
    return _Entry((row.split, row.label), row.written, read, size=size, row=row.row)


def _read_csv_table(source: str, shown: str, limits: DatasetLimits) -> _CsvTable:
    """Parse and check the CSV: columns, fields, splits, duplicates, and that local images exist."""
    text = _csv_text(source, shown, limits.max_csv_bytes)
    lines = csv.reader(io.StringIO(text, newline=""), strict=True)  # an unclosed quote is an error, not data
    try:
        header = next(lines, None)
        if header is None or not any(field.strip() for field in header):
            raise MicrofedError(f"{shown}: the CSV is empty (no header row)", hint=f"expected {_CSV_FORMAT}")
        columns = _csv_columns(shown, [field.strip().lower() for field in header])
        base = _csv_base(source)
        rows: list[_CsvRow] = []
        first: dict[str, _CsvRow] = {}  # resolved location -> the first row that lists it
        folders: dict[str, str] = {}  # real paths of the folders of local images
        for number, fields in enumerate(lines, start=2):
            if not any(field.strip() for field in fields):
                continue  # blank lines (a trailing newline, spacing) are not rows
            if len(fields) > len(header):
                raise MicrofedError(
                    f"{shown} row {number}: {len(fields)} fields, but the header names {len(header)} columns",
                    hint="quote fields that contain commas",
                )
            values = {column: fields[i].strip() if i < len(fields) else "" for column, i in columns.items()}
            row = _csv_row(shown, number, values, base, folders)
            if row.location in first:
                _listed_twice(f"{shown} row {number}, column {_image_column(columns)!r}", row, first[row.location])
            first[row.location] = row
            rows.append(row)
            _check_count(shown, len(rows), limits)
    except csv.Error as exc:
        raise MicrofedError(
            f"{shown} line {lines.line_num}: not a readable CSV ({exc})", hint=f"expected {_CSV_FORMAT}"
        ) from None
    if not rows:
        raise MicrofedError(f"{shown}: the CSV has a header but no rows", hint=f"expected {_CSV_FORMAT}")
    return _CsvTable(rows=rows, image_column=_image_column(columns), has_split="split" in columns)


def _listed_twice(where: str, row: _CsvRow, earlier: _CsvRow) -> NoReturn:
    """Refuse a CSV row naming a file an earlier row names (paths are compared once resolved)."""
    spelled = f" (as {display_name(earlier.written)})" if earlier.written != row.written else ""
    if earlier.split == row.split:
        raise MicrofedError(
            f"{where}: image {display_name(row.written)} is also listed in row {earlier.row}{spelled}",
            hint="list every image once",
        )
    raise MicrofedError(
        f"{where}: image {display_name(row.written)} is also listed in row {earlier.row}{spelled}, as {row.split} "
        f"here and {earlier.split} there",
        hint="an image in both train and test leaks the test set into training and inflates the test accuracy; "
        "list every image once, in one split",
    )


def _image_column(columns: Iterable[str]) -> str:
    """The image column's name among the checked columns."""
    return next(column for column in columns if column in CSV_IMAGE_COLUMNS)


def _csv_text(source: str, shown: str, limit: int) -> str:
    """The CSV's text; its size is checked before it is read (and the read stops one byte past the limit)."""
    if _is_gcs(source):
        buffer = io.BytesIO()
        size = _download_gcs(source, buffer, limit)
        data = buffer.getvalue()
    else:
        try:
            size = Path(source).stat().st_size
            data = _read_file(Path(source), limit) if size <= limit else b""
        except OSError as exc:
            raise MicrofedError(f"{shown}: cannot read the CSV ({exc.strerror or exc})") from None
        size = max(size, len(data))
    if size > limit:
        found = _size(size) if size > limit + 1 else f"more than {_size(limit)}"  # limit + 1: all that was read
        raise MicrofedError(
            f"{shown}: the CSV is {found}, over the limit of {_size(limit)}",
            hint=f"a CSV may be at most {_size(limit)} (DatasetLimits.max_csv_bytes); split the list, or leave out "
            "columns it does not need",
        )
    try:
        return data.decode("utf-8-sig")  # spreadsheet programs write a byte-order mark
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MicrofedError(
            f"{shown} line {line}: not UTF-8 text (byte {exc.start})", hint="save the CSV as UTF-8"
        ) from None


def _csv_columns(shown: str, names: list[str]) -> dict[str, int]:
    """Column name -> index for the image, label and (when present) split columns."""
    found = ", ".join(display_name(name) or "''" for name in names)
    duplicated = sorted({name for name in names if name and names.count(name) > 1})
    if duplicated:
        raise MicrofedError(f"{shown}: column {display_name(duplicated[0])!r} appears twice in the header row")
    images = [name for name in names if name in CSV_IMAGE_COLUMNS]
    if not images:
        raise MicrofedError(
            f"{shown}: no image column in the header row (found: {found})",
            hint=f"name the column of image paths one of {', '.join(CSV_IMAGE_COLUMNS)}; expected {_CSV_FORMAT}",
        )
    if len(images) > 1:
        raise MicrofedError(
            f"{shown}: the header row has {len(images)} image columns ({', '.join(images)})",
            hint=f"keep exactly one of {', '.join(CSV_IMAGE_COLUMNS)}, or rename the others",
        )
    if "label" not in names:
        raise MicrofedError(
            f"{shown}: no label column in the header row (found: {found})", hint=f"expected {_CSV_FORMAT}"
        )
    wanted = [images[0], "label", *(["split"] if "split" in names else [])]
    return {name: names.index(name) for name in wanted}


def _csv_base(source: str) -> str:
    """The folder (or gs:// prefix) relative image paths start from: the CSV's own."""
    if _is_gcs(source):
        return source.rsplit("/", 1)[0]
    return str(Path(source).expanduser().absolute().parent)


def _csv_row(shown: str, number: int, values: dict[str, str], base: str, folders: dict[str, str]) -> _CsvRow:
    column = _image_column(values)
    where = f"{shown} row {number}"
    for name, value in values.items():
        if not value:
            hint = "every row needs train or test" if name == "split" else f"expected {_CSV_FORMAT}"
            raise MicrofedError(f"{where}, column {name!r}: the field is empty", hint=hint)
    split = values.get("split", "train").lower()
    if split not in _CSV_SPLITS:
        raise MicrofedError(
            f"{where}, column 'split': unknown split {display_name(values['split'])!r}",
            hint="use train or test (a validation set is taken from train by the training itself)",
        )
    written = values[column]
    location, size = _csv_location(f"{where}, column {column!r}", written, base, folders)
    return _CsvRow(row=number, written=written, location=location, label=values["label"], split=split, size=size)


def _csv_location(where: str, written: str, base: str, folders: dict[str, str]) -> tuple[str, int | None]:
    """The image a CSV field names, spelled one way per file so that two rows naming the same file are found,
    and its size: a gs:// URI with '.' and '..' resolved (size None), or the real path of a local file (links
    and '..' resolved; it must exist). `folders` caches the real paths of the folders seen so far."""
    if _is_gcs(written):
        from microfed.training.storage import split_gcs

        try:
            bucket, key = split_gcs(written)
        except MicrofedError as exc:
            raise MicrofedError(f"{where}: {exc.message}", hint=exc.hint) from None
        return _gcs_object(where, written, f"gs://{bucket}", key, "its bucket"), None
    if _is_gcs(base) and not written.startswith("/"):  # a relative path next to a gs:// CSV
        bucket_root = "gs://" + base[len("gs://") :].split("/", 1)[0]
        key = posixpath.join(base[len(bucket_root) :].strip("/"), written)
        return _gcs_object(where, written, bucket_root, key, "the CSV's bucket"), None
    # A local path: relative to a local CSV's folder, or absolute (also next to a gs:// CSV).
    # (os.path, not pathlib: this runs once per row, and a CSV may have a million rows)
    path = written if _is_gcs(base) else os.path.join(base, os.path.expanduser(written))
    try:
        status = os.lstat(path)
        if stat.S_ISLNK(status.st_mode):
            real = os.path.realpath(path)
            status = os.stat(real)
        else:  # os.path.realpath walks every component: resolve each folder once, not once per image
            folder, name = os.path.split(path)
            if folder not in folders:
                folders[folder] = os.path.realpath(folder)
            real = os.path.join(folders[folder], name)
    except OSError:
        _missing(where, written, Path(path))
    if not stat.S_ISREG(status.st_mode):
        _missing(where, written, Path(path))
    return real, status.st_size


def _gcs_object(where: str, written: str, bucket_root: str, key: str, bucket: str) -> str:
    """gs://bucket/key with '.' and '..' resolved as a path would be (as relative CSV paths always were)."""
    key = posixpath.normpath(key)
    if key == "." or key == ".." or key.startswith("../"):
        what = "names no object" if key == "." else f"points outside {bucket}"
        raise MicrofedError(f"{where}: {display_name(written)} {what}", hint="expected gs://BUCKET/PATH/IMAGE")
    return f"{bucket_root}/{key}"


def _missing(where: str, written: str, path: Path) -> NoReturn:
    at = f" ({path})" if str(path) != written else ""
    what = "is a folder, not an image file" if path.is_dir() else "not found"
    raise MicrofedError(
        f"{where}: image {display_name(written)}{at} {what}",
        hint="relative paths start from the CSV's folder; fix the path or remove the row",
    )


CSV_TEST_FRACTION = 1 / 7
"""Without a split column, this share of each class's rows (Fashion-MNIST's 10,000 of 70,000) becomes the test
set: drawn with a fixed seed, so the same CSV always gives the same test set."""


def _hold_out_test(table: _CsvTable) -> _CsvTable:
    """Mark CSV_TEST_FRACTION of each class's rows (classes with at least 2 rows) as test."""
    rng = random.Random(0)
    by_class: dict[str, list[int]] = {}
    for i, row in enumerate(table.rows):
        by_class.setdefault(row.label, []).append(i)
    test: set[int] = set()
    for label in sorted(by_class):
        rows = by_class[label]
        if len(rows) >= 2:
            test.update(rng.sample(rows, max(1, round(CSV_TEST_FRACTION * len(rows)))))
    marked = [dataclasses.replace(r, split="test" if i in test else "train") for i, r in enumerate(table.rows)]
    return dataclasses.replace(table, rows=marked)


def _csv_class_names(shown: str, table: _CsvTable) -> tuple[str, ...]:
    """Sorted training classes, once the CSV is known to hold train and test rows of known classes."""
    train = {row.label for row in table.rows if row.split == "train"}
    if not train:
        raise MicrofedError(f"{shown}: no rows with split 'train'", hint="mark the training images' rows train")
    if not any(row.split == "test" for row in table.rows):
        problem = "no rows with split 'test'" if table.has_split else "no split column, so no test set"
        raise MicrofedError(
            f"{shown}: {problem}",
            hint="add a split column with train or test on every row: a CSV, like a folder with train/ and test/, "
            "brings its own test set",
        )
    for row in table.rows:
        if row.split == "test" and row.label not in train:
            raise MicrofedError(
                f"{shown} row {row.row}, column 'label': test class {display_name(row.label)!r} has no training rows",
                hint="every test class needs training images (class names are case-sensitive)",
            )
    return tuple(sorted(train))  # the order class folders get


def _fetch_gcs_images(shown: str, table: _CsvTable, folder: Path, limit: int) -> dict[str, tuple[Path, int]]:
    """Download the gs:// images of the CSV into `folder` (concurrently); returns URI -> (local file, size).

    No download goes more than one byte past `limit`; an object over it is not kept (the size returned is the
    bucket's, so that the refusal, when the image is read, can say how large it is)."""
    remote = [row for row in table.rows if _is_gcs(row.location)]
    if not remote:
        return {}

    def fetch(item: tuple[int, _CsvRow]) -> tuple[str, tuple[Path, int]]:
        index, row = item
        dest = folder / f"{index:08d}"
        # A scratch copy in a private temporary folder, read back and deleted within this call: not an output,
        # so no atomic rename and no fsync per image.
        try:
            with dest.open("wb") as out:
                size = _download_gcs(row.location, out, limit)
        except MicrofedError as exc:
            raise MicrofedError(
                f"{shown} row {row.row}, column {table.image_column!r}: image {exc.message}", hint=exc.hint
            ) from None
        if size > limit:
            dest.unlink()
        return row.location, (dest, size)

    with ThreadPoolExecutor(max_workers=_CSV_FETCH_THREADS) as pool:
        return dict(pool.map(fetch, enumerate(remote)))


def _download_gcs(uri: str, out: BinaryIO, limit: int) -> int:
    """Copy the gs:// object into `out`, stopping one byte past `limit`; returns the object's size (asked of the
    bucket when the copy stopped short)."""
    # storage.py has no bounded read; its private helpers give the same object checks and error messages as
    # its read_bytes.
    from microfed.training.storage import _blob, _gcs_errors

    with _gcs_errors(uri):
        blob = _blob(uri)
        blob.download_to_file(out, start=0, end=limit)  # `end` is inclusive: at most limit + 1 bytes
        if out.tell() <= limit:
            return out.tell()
        blob.reload()
        return max(int(blob.size or 0), out.tell())


def _read_file(path: str | Path, limit: int) -> bytes:
    """The file's bytes, but never more than limit + 1 of them (enough to tell that it is over the limit)."""
    with open(path, "rb") as file:
        # read(n) allocates n bytes up front: ask for the size the file has, not for the limit.
        expected = min(os.fstat(file.fileno()).st_size, limit)
        data = file.read(expected + 1)
        if len(data) > expected:  # it grew since: read on, up to the limit
            data += file.read(limit + 1 - len(data))
        return data


# ------------------------------------------------------------------------------------------- resizing


def _resized(dataset: LoadedDataset, size: tuple[int, int]) -> LoadedDataset:
    return LoadedDataset(
        name=dataset.name, train=_resize_split(dataset.train, size), test=_resize_split(dataset.test, size)
    )


def _resize_split(data: ImageData, size: tuple[int, int], chunk: int = 4096) -> ImageData:
    """Bilinear resize of decoded tensors (antialiased, like PIL's), in chunks to bound float memory."""
    if tuple(data.images.shape[-2:]) == size:
        return data
    out = torch.empty((len(data.images), data.images.shape[1], *size), dtype=torch.uint8)
    for start in range(0, len(data.images), chunk):
        block = data.images[start : start + chunk].float()
        scaled = torch.nn.functional.interpolate(block, size=size, mode="bilinear", antialias=True)
        out[start : start + chunk] = scaled.round_().clamp_(0, 255).to(torch.uint8)
    return ImageData(images=out, labels=data.labels, class_names=data.class_names, skipped=data.skipped)
