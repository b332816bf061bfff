"""Datasets: decode a named dataset, an image zip or folder, or a CSV listing images into uint8 tensors, once.

Every source ends up as the same `LoadedDataset`: a train and a test `ImageData` of uint8 images
(N, C, H, W) with C in (1, 3), int64 labels (N,) and the class names the labels index. The split step
decodes through here once and writes shards; nothing downstream touches image files again.

Sources (`load_dataset`):

* ``"fashion-mnist"`` / ``"mnist"``: the original IDX files; ``"cifar10"``: the binary CIFAR-10 release. Both
  are read by our own parsers (named_datasets.py), looked up in `default_data_dirs` and, when missing and
  allowed, downloaded.
* a ``.zip`` file or a directory laid out like the uploads of the platform we replace::

      [top-folder/]train/<class>/<image>   and   [top-folder/]test/<class>/<image>

* a ``.csv`` file (a local path or a ``gs://`` URI) listing one image per row under a header: an image column
  (``image``, ``path`` or ``filename``), a ``label`` column (class names) and an optional ``split`` column
  (``train`` / ``test``). Image paths are relative to the CSV's folder, absolute, or ``gs://`` URIs. Like a
  folder without test/, a CSV without test rows is an error (csv_dataset.py).

Zips, folders and CSVs come from users and are read as hostile, under the `DatasetLimits` (dataset_limits.py):
nothing is extracted to disk, paths, links and sizes are checked as they are listed (upload_listing.py), and
each image's size and header before it is read or decoded (upload_reader.py); an unreadable image is an error
naming it, or with bad_images='skip' it is left out, warned about and recorded for the shard manifest. Images
are decoded as `predict` decodes them (image_decode.py).

This module is the public entry: it re-exports what callers import from it (the types of dataset_types.py, the
limits, the named datasets' names and `read_idx`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from microfed.training.csv_dataset import CSV_IMAGE_COLUMNS, check_csv_source, is_csv, is_gcs, load_csv
from microfed.training.dataset_limits import (
    COMPRESSION_RATIO_MIN_BYTES,
    MAX_COMPRESSION_RATIO,
    MAX_CSV_BYTES,
    MAX_DECODED_BYTES,
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_IMAGE_PIXELS,
    MAX_PIXELS_PER_BYTE,
    MAX_TOTAL_BYTES,
    MAX_TOTAL_PIXELS,
    DatasetLimits,
)
from microfed.training.dataset_types import (
    DuplicateImagesWarning,
    ImageData,
    LoadedDataset,
    SkippedFile,
    SkippedImagesWarning,
    display_name,
)
from microfed.training.errors import MicrofedError
from microfed.training.named_datasets import (
    DATASET_NAMES,
    SYSTEM_DATA_DIR,
    canonical_name,
    default_data_dirs,
    load_named,
    read_idx,
)
from microfed.training.upload_listing import LAYOUT, list_folder, list_zip
from microfed.training.upload_reader import load_image_tree

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

BAD_IMAGE_POLICIES = ("fail", "skip")


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
        dataset = load_named(str(canonical_name(str(source))), data_dir=data_dir, download=download)
        return _resized(dataset, size) if size is not None else dataset
    if kind == "csv":
        return load_csv(str(source) if is_gcs(source) else str(Path(source).expanduser()), size, limits, bad_images)
    path = Path(source).expanduser()
    shown = display_name(path.name)
    if kind == "folder":
        return load_image_tree(path.name, list_folder(shown, path, limits), size, limits, bad_images)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:  # e.g. a damaged central directory
        raise MicrofedError(
            f"{shown} is not a readable zip archive ({exc})", hint="the upload is damaged or incomplete; zip it again"
        ) from None
    with archive:
        return load_image_tree(path.name, list_zip(shown, archive, limits), size, limits, bad_images)


def check_source(source: str | Path) -> str:
    """`name`, `folder`, `zip` or `csv` for a usable source, without decoding anything; else MicrofedError.

    A gs:// CSV is checked for its form only (nothing is fetched); a local CSV must be a file.
    """
    if canonical_name(str(source)) is not None:
        return "name"
    if is_csv(source):
        check_csv_source(source)
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
        hint=f"use one of {', '.join(DATASET_NAMES)}, {LAYOUT}, or a .csv file listing images and labels",
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
