"""Listing an uploaded image zip or folder, read as hostile: its entries, checked before anything is read.

A dataset upload is laid out like the uploads of the platform we replace::

    [top-folder/]train/<class>/<image>   and   [top-folder/]test/<class>/<image>

Nothing is ever extracted to disk: entries are read into memory one at a time, later, by the reader
(upload_reader.py). Entries with absolute paths or '..', symbolic links (in a zip's attributes or on disk),
special files and duplicate names are refused here; so is anything over the `DatasetLimits` on file count, path
depth, what a zip expands to and each entry's compression ratio, each checked on the sizes the zip headers or
the file system declare. macOS resource forks (__MACOSX/) and hidden files are not data and are left out.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from microfed.training.dataset_limits import COMPRESSION_RATIO_MIN_BYTES, DatasetLimits, format_size
from microfed.training.dataset_types import display_name
from microfed.training.errors import MicrofedError

__all__ = ["LAYOUT", "Entry", "check_count", "list_folder", "list_zip", "read_file"]

LAYOUT = (
    "a .zip file or folder holding train/ and test/ (optionally inside one top folder), "
    "each with one sub-folder per class containing the images: train/<class>/<image>, test/<class>/<image>"
)

_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: cheap keys for the reader's digests
class Entry:
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
            hint=f"paths may have at most {limits.max_depth} components (DatasetLimits.max_depth); expected {LAYOUT}",
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
            f"{source}: the archive expands to more than {format_size(limits.max_total_bytes)} (at entry {shown})",
            hint=f"archives may expand to at most {format_size(limits.max_total_bytes)} "
            "(DatasetLimits.max_total_bytes); split the dataset or use smaller images",
        )
    ratio = info.file_size / max(1, info.compress_size)
    if info.file_size > COMPRESSION_RATIO_MIN_BYTES and ratio > limits.max_compression_ratio:
        raise MicrofedError(
            f"{source}: entry {shown} expands {ratio:.0f} times ({format_size(info.compress_size)} to "
            f"{format_size(info.file_size)}), a zip bomb's ratio",
            hint=f"entries over {format_size(COMPRESSION_RATIO_MIN_BYTES)} may expand at most "
            f"{limits.max_compression_ratio:g} times (DatasetLimits.max_compression_ratio); "
            "store images as PNG or JPEG",
        )


def list_zip(source: str, archive: zipfile.ZipFile, limits: DatasetLimits) -> list[Entry]:
    """Every file and folder of the zip, from its headers: nothing is read or extracted here."""
    infos = archive.infolist()
    check_count(source, len(infos), limits)
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
        entries.append(Entry(parts, name, reader, size=info.file_size))
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


def list_folder(source: str, root: Path, limits: DatasetLimits) -> list[Entry]:
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
                entries.append(Entry(parts, "/".join(parts), None))
            elif stat.S_ISREG(status.st_mode):
                read = functools.partial(read_file, path, limits.max_file_bytes)
                entries.append(Entry(parts, "/".join(parts), read, size=status.st_size))
            else:
                raise MicrofedError(
                    f"{source}: {display_name('/'.join(parts))} is not a regular file", hint=f"expected {LAYOUT}"
                )
            check_count(source, len(entries), limits)
        dirnames[:] = sorted(d for d in dirnames if not _ignored((d,)))  # walked in a stable order
    return entries


def check_count(source: str, count: int, limits: DatasetLimits) -> None:
    """Refuse more than `DatasetLimits.max_files` entries (zip entries, files and folders, CSV rows)."""
    if count > limits.max_files:
        raise MicrofedError(
            f"{source}: more than {limits.max_files:,} files",
            hint=f"a dataset may hold at most {limits.max_files:,} files (DatasetLimits.max_files)",
        )


def read_file(path: str | Path, limit: int) -> bytes:
    """The file's bytes, but never more than limit + 1 of them (enough to tell that it is over the limit)."""
    with open(path, "rb") as file:
        # read(n) allocates n bytes up front: ask for the size the file has, not for the limit.
        expected = min(os.fstat(file.fileno()).st_size, limit)
        data = file.read(expected + 1)
        if len(data) > expected:  # it grew since: read on, up to the limit
            data += file.read(limit + 1 - len(data))
        return data
