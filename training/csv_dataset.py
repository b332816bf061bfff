"""CSV datasets: a ``.csv`` file (a local path or a ``gs://`` URI) listing one image per row under a header.

The header names an image column (``image``, ``path`` or ``filename``), a ``label`` column (class names) and
an optional ``split`` column (``train`` / ``test``). Image paths are relative to the CSV's folder, absolute, or
``gs://`` URIs. Like a folder without test/, a CSV without test rows is an error. See `datasets.load_dataset`.

A CSV comes from users and is read as hostile, like a zip or folder: its size is checked before it is read
(`DatasetLimits.max_csv_bytes`), its rows are counted (`max_files`), and the images it lists are read and
decoded by the same reader (upload_reader.py) under the same limits and bad_images policy. An image listed in
two rows (the same file however its path is spelled) is refused, naming both rows.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
import posixpath
import random
import stat
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NoReturn

from microfed.training.dataset_limits import DatasetLimits, format_size
from microfed.training.dataset_types import LoadedDataset, display_name
from microfed.training.errors import MicrofedError
from microfed.training.upload_listing import Entry, check_count, read_file
from microfed.training.upload_reader import TreeReader, decode_splits

__all__ = ["CSV_IMAGE_COLUMNS", "CSV_TEST_FRACTION", "check_csv_source", "is_csv", "is_gcs", "load_csv"]

CSV_IMAGE_COLUMNS = ("image", "path", "filename")
"""Accepted names of a CSV's image column (exactly one of them)."""
_CSV_SPLITS = ("train", "test")
_CSV_FORMAT = (
    "a CSV with a header row: an image column (image, path or filename), a label column, and optionally a "
    "split column (train or test), e.g. 'image,label,split' then 'cats/1.png,cat,train'"
)
# Concurrent downloads of gs:// images listed in a CSV (latency-bound, as storage's own transfers are).
_CSV_FETCH_THREADS = 8


def is_gcs(source: str | Path) -> bool:
    """Whether `source` is a gs:// URI."""
    return str(source).startswith("gs://")


def is_csv(source: str | Path) -> bool:
    """Whether `source` names a CSV file (by its suffix)."""
    return str(source).strip().lower().endswith(".csv")


def check_csv_source(source: str | Path) -> None:
    """A gs:// CSV must be a well-formed URI (nothing is fetched); a local CSV must be a file."""
    if is_gcs(source):
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


def load_csv(source: str, image_size: tuple[int, int] | None, limits: DatasetLimits, bad_images: str) -> LoadedDataset:
    """Read and check the CSV, fetch its gs:// images into a temporary folder, and decode every image it lists."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    reader = TreeReader(name, limits, bad_images)
    table = _read_csv_table(source, reader.source, limits)
    if not table.has_split:
        table = _hold_out_test(table)
    class_names = _csv_class_names(reader.source, table)
    index = {class_name: label for label, class_name in enumerate(class_names)}
    with tempfile.TemporaryDirectory(prefix="microfed-csv-") as tmp:
        local = _fetch_gcs_images(reader.source, table, Path(tmp), limits.max_file_bytes)
        files = [(_csv_entry(row, local, limits.max_file_bytes), index[row.label]) for row in table.rows]
        return decode_splits(reader, name, files, class_names, image_size)


def _csv_entry(row: _CsvRow, local: dict[str, tuple[Path, int]], limit: int) -> Entry:
    """The image of a CSV row as an entry of its split and class: its file (for a gs:// image, the downloaded
    copy) and the size declared for it."""
    path, size = local.get(row.location) or (row.location, row.size or 0)
    read = functools.partial(read_file, path, limit)
    return Entry((row.split, row.label), row.written, read, size=size, row=row.row)


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
            check_count(shown, len(rows), limits)
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
    if is_gcs(source):
        buffer = io.BytesIO()
        size = _download_gcs(source, buffer, limit)
        data = buffer.getvalue()
    else:
        try:
            size = Path(source).stat().st_size
            data = read_file(Path(source), limit) if size <= limit else b""
        except OSError as exc:
            raise MicrofedError(f"{shown}: cannot read the CSV ({exc.strerror or exc})") from None
        size = max(size, len(data))
    if size > limit:
        found = (
            format_size(size) if size > limit + 1 else f"more than {format_size(limit)}"
        )  # limit + 1: all that was read
        raise MicrofedError(
            f"{shown}: the CSV is {found}, over the limit of {format_size(limit)}",
            hint=f"a CSV may be at most {format_size(limit)} (DatasetLimits.max_csv_bytes); split the list, or leave "
            "out columns it does not need",
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
    if is_gcs(source):
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
    if is_gcs(written):
        from microfed.training.storage import split_gcs

        try:
            bucket, key = split_gcs(written)
        except MicrofedError as exc:
            raise MicrofedError(f"{where}: {exc.message}", hint=exc.hint) from None
        return _gcs_object(where, written, f"gs://{bucket}", key, "its bucket"), None
    if is_gcs(base) and not written.startswith("/"):  # a relative path next to a gs:// CSV
        bucket_root = "gs://" + base[len("gs://") :].split("/", 1)[0]
        key = posixpath.join(base[len(bucket_root) :].strip("/"), written)
        return _gcs_object(where, written, bucket_root, key, "the CSV's bucket"), None
    # A local path: relative to a local CSV's folder, or absolute (also next to a gs:// CSV).
    # (os.path, not pathlib: this runs once per row, and a CSV may have a million rows)
    path = written if is_gcs(base) else os.path.join(base, os.path.expanduser(written))
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
    remote = [row for row in table.rows if is_gcs(row.location)]
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
