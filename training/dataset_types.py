"""What every dataset source decodes to, and how names from users' files are shown.

Every source ends up as the same `LoadedDataset`: a train and a test `ImageData` of uint8 images
(N, C, H, W) with C in (1, 3), int64 labels (N,) and the class names the labels index. An image left out
under bad_images='skip' is recorded as a `SkippedFile` for the shard manifest. Class folder names are kept
exactly (labels, manifests) and shown through `display_name` in messages.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch

__all__ = [
    "DuplicateImagesWarning",
    "ImageData",
    "LoadedDataset",
    "SkippedFile",
    "SkippedImagesWarning",
    "display_name",
]


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
