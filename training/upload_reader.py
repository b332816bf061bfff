"""Reading the images of an uploaded zip, folder or CSV, read as hostile: checked from headers, then decoded once.

The listing (upload_listing.py, csv_dataset.py) says which files there are and how large each declares itself.
Here each image file's declared size is checked before it is read, each image's pixels and pixels per byte of
file from its header before it is decoded, and all images' pixels together and the decoded tensors before any
is decoded (`DatasetLimits`). An image listed in both train and test (the same file however its path is
spelled, or a byte-identical copy: every image's sha256 is taken from the bytes read for its header) is refused,
naming both; what is decoded is checked to be what was planned. An image that cannot be decoded (truncated, not
an image) or breaks a per-image limit is an error naming it, or with bad_images='skip' it is left out, warned
about and recorded for the shard manifest. Decoding itself is image_decode.py's, shared with predict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

import numpy as np
import torch
from PIL import Image

from microfed.training.dataset_limits import DatasetLimits, format_size
from microfed.training.dataset_types import (
    DuplicateImagesWarning,
    ImageData,
    LoadedDataset,
    SkippedFile,
    SkippedImagesWarning,
    display_name,
)
from microfed.training.errors import MicrofedError
from microfed.training.image_decode import DECODE_ERRORS, GRAY_MODES, IMAGE_SUFFIXES, decode_chw, decode_reason
from microfed.training.upload_listing import LAYOUT, Entry

__all__ = ["TreeReader", "decode_splits", "load_image_tree"]

# Reading a file or a zip entry fails in more ways than Pillow's decoding alone.
_DECODE_ERRORS = (
    *DECODE_ERRORS,
    zlib.error,
    zipfile.BadZipFile,
    RuntimeError,  # zipfile: encrypted member, or a compression method it lacks (Windows' Deflate64)
)
_READABLE = "readable formats: " + ", ".join(sorted(IMAGE_SUFFIXES))
_SKIP_HINT = "or pass bad_images='skip' to leave unreadable images out (they are counted in the manifest)"


def _folders(entries: list[Entry]) -> set[str]:
    """Top-level folder names: from explicit folder entries and from the paths of files below them."""
    return {entry.parts[0] for entry in entries if len(entry.parts) > 1 or entry.read is None}


def _strip_top_folder(entries: list[Entry]) -> list[Entry]:
    """Drop one enclosing folder (zips made by 'compress folder' have one) when train/ test/ are inside."""
    top_folders = _folders(entries)
    if top_folders & {"train", "test"} or len(top_folders) != 1:
        return entries
    return [dataclasses.replace(entry, parts=entry.parts[1:]) for entry in entries if len(entry.parts) > 1]


def _is_image(entry: Entry) -> bool:
    return entry.read is not None and PurePosixPath(entry.parts[-1]).suffix.lower() in IMAGE_SUFFIXES


def _labelled(classes: dict[str, list[Entry]], class_names: tuple[str, ...]) -> list[tuple[Entry, int]]:
    return [(entry, label) for label, name in enumerate(class_names) for entry in classes.get(name, [])]


class TreeReader:
    """Decodes the images of one zip, folder or CSV under `limits`; per-image failures follow `bad_images`."""

    def __init__(self, source: str, limits: DatasetLimits, bad_images: str) -> None:
        self.source = display_name(source)
        self.limits = limits
        self.skip = bad_images == "skip"
        self.skipped: list[tuple[str, SkippedFile]] = []  # (split, file)
        self.digests: dict[Entry, bytes] = {}  # sha256 of each planned file's bytes
        self.copies: list[tuple[Entry, Entry]] = []  # (first, copy): byte-identical images in one split

    def bad(self, entry: Entry, problem: str, hint: str) -> None:
        """Fail naming the file, or (bad_images='skip') remember it and go on."""
        if not self.skip:
            raise MicrofedError(f"{self.source}: {problem}", hint=f"{hint}; {_SKIP_HINT}")
        self.skipped.append((entry.parts[0], SkippedFile(file=entry.name, reason=problem)))

    def class_files(self, split: str, entries: list[Entry]) -> dict[str, list[Entry]]:
        """Images of one split grouped by class folder; every class folder must hold at least one image."""
        classes: dict[str, list[Entry]] = {}
        for entry in entries:
            if entry.parts[0] != split or len(entry.parts) < 2:
                continue
            if len(entry.parts) == 2 and entry.read is not None:
                if _is_image(entry):  # an image outside any class folder would otherwise be dropped silently
                    raise MicrofedError(
                        f"{self.source}: {display_name(entry.name)} is not inside a class folder",
                        hint=f"move it into {split}/<class>/; expected {LAYOUT}",
                    )
                continue  # stray non-image files (README, Thumbs.db) are not data
            images = classes.setdefault(entry.parts[1], [])
            if _is_image(entry):  # images in nested folders count for their class, as in ImageFolder
                images.append(entry)
        if not classes:
            raise MicrofedError(f"{self.source}: {split}/ has no class folders", hint=f"expected {LAYOUT}")
        for class_name, images in classes.items():
            if not images:
                raise MicrofedError(
                    f"{self.source}: class folder {split}/{display_name(class_name)}/ contains no images",
                    hint=f"add images ({', '.join(sorted(IMAGE_SUFFIXES))}) or remove the folder",
                )
            images.sort(key=lambda entry: entry.parts)  # zip order is arbitrary; labels must not depend on it
        return classes

    def read(self, entry: Entry) -> bytes | None:
        """The file's bytes, or None when it was skipped; its declared size is checked before it is read, and
        the read itself stops one byte past the limit (a file that grew since it was listed)."""
        assert entry.read is not None  # only files reach here (internal invariant, not user input)
        limit = self.limits.max_file_bytes
        try:
            data = entry.read() if entry.size <= limit else None
        except _DECODE_ERRORS as exc:  # unreadable (permissions), or a zip entry that is not what it declares
            self.bad(entry, f"cannot read image {entry.shown()} ({decode_reason(exc)})", hint="replace or remove it")
            return None
        if data is not None and len(data) <= limit:
            return data
        found = format_size(entry.size) if data is None else f"more than {format_size(limit)}"
        self.bad(
            entry,
            f"image file {entry.shown()} is {found}, over the limit of {format_size(limit)} per image file",
            hint=f"image files may be at most {format_size(limit)} (DatasetLimits.max_file_bytes); store the image "
            "compressed (PNG, JPEG) or smaller, or remove it",
        )
        return None

    def open(self, entry: Entry, data: bytes) -> Image.Image | None:
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
                f"cannot decode image {entry.shown()} ({decode_reason(exc)})",
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
        self, files: Sequence[tuple[Entry, int]], image_size: tuple[int, int] | None
    ) -> tuple[list[tuple[Entry, int]], int, tuple[int, int]]:
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
                all_gray = all_gray and image.mode in GRAY_MODES
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
                f"{self.source}: {len(kept):,} images of {channels}x{height}x{width} need {format_size(needed)} "
                f"decoded, over the limit of {format_size(self.limits.max_decoded_bytes)}",
                hint="pass a smaller image_size (--image-size), use fewer images, or raise "
                "DatasetLimits.max_decoded_bytes",
            )
        return kept, channels, (height, width)

    def _check_total_pixels(self, total: int, entry: Entry, number: int, count: int) -> None:
        if total > self.limits.max_total_pixels:
            raise MicrofedError(
                f"{self.source}: the images declare more than {self.limits.max_total_pixels:,} pixels in all "
                f"({total:,} by image {number:,} of {count:,}, {entry.shown()})",
                hint=f"a dataset may hold at most {self.limits.max_total_pixels:,} pixels before resizing "
                "(DatasetLimits.max_total_pixels), the decoding work of the split step; use fewer images, or "
                "store them at a smaller size",
            )

    def _check_copies(self, entries: Sequence[Entry]) -> None:
        """Refuse byte-identical images in train and test, naming both; remember copies within one split."""
        first: dict[bytes, dict[str, Entry]] = {}  # digest -> split -> the first image of that content there
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
        self, files: Sequence[tuple[Entry, int]], channels: int, size: tuple[int, int], class_names: tuple[str, ...]
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
            images[index] = array
        labels = torch.tensor([label for _, label in files], dtype=torch.int64)
        if not keep.all():
            images, labels = images[keep], labels[torch.from_numpy(keep)]
        return ImageData(images=torch.from_numpy(images), labels=labels, class_names=class_names)

    def _pixels(self, entry: Entry, channels: int, size: tuple[int, int]) -> np.ndarray | None:
        """The image's pixels, uint8 (C, H, W), or None when it was skipped."""
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
        try:
            with image:
                return decode_chw(image, channels, size)
        except _DECODE_ERRORS as exc:  # the header was fine but the pixel data is not (truncated files)
            self.bad(entry, f"cannot decode image {entry.shown()} ({decode_reason(exc)})", "replace or remove it")
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


def load_image_tree(
    source: str,
    entries: list[Entry],
    image_size: tuple[int, int] | None,
    limits: DatasetLimits,
    bad_images: str,
) -> LoadedDataset:
    """Check the train/ test/ layout of a listed zip or folder and decode its images (`source`: its file name)."""
    reader = TreeReader(source, limits, bad_images)
    entries = _strip_top_folder(entries)
    present = _folders(entries)
    missing = [f"{split}/" for split in ("train", "test") if split not in present]
    if missing:
        found = ", ".join(f"{display_name(folder)}/" for folder in sorted(present)) or "nothing"
        raise MicrofedError(
            f"{reader.source}: no {' and no '.join(missing)} folder (found at the top: {found})",
            hint=f"expected {LAYOUT}",
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
    return decode_splits(reader, source, files, class_names, image_size)


def decode_splits(
    reader: TreeReader,
    source: str,
    files: list[tuple[Entry, int]],
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
