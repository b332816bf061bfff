"""Untrusted files: hostile dataset archives and folders, damaged images, and micro-models that must not be averaged.

Every hostile input is generated here, small: the limits that stop them are checked on headers and declared
sizes, so a test never has to expand a bomb to see it refused. Each case must give its own clear error (naming
the entry and what is allowed) and leave nothing behind in the output location.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import os
import pickle
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microfed.training import datasets, image_decode, upload_listing
from microfed.training.aggregation import ARCHITECTURE_KEY, check_same_architecture
from microfed.training.datasets import (
    COMPRESSION_RATIO_MIN_BYTES,
    DatasetLimits,
    DuplicateImagesWarning,
    SkippedImagesWarning,
    display_name,
    load_dataset,
)
from microfed.training.errors import MicrofedError
from microfed.training.io import write_json, write_safetensors
from microfed.training.layout import MODEL_CONFIG_FILE
from microfed.training.model_files import ModelCard
from microfed.training.models import ModelConfig, build_model
from microfed.training.shards import SplitConfig, read_dataset_manifest, subsample, write_shards
from microfed.training.step_aggregate import aggregate_step
from microfed.training.step_split import SplitOptions, split_step
from tests.conftest import sparse_file, write_tree

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------- builders


def png(side: int = 8, value: int = 100, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (side, side), value).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(side: int = 64) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header declares width x height 1-bit pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")
    )


def webp_bomb(side: int) -> bytes:
    """A lossless WebP of one colour: a few hundred bytes to a few KB for side x side pixels. Issue 14's is 9400²
    (3.4 KB); 30 copies in a 15 KB zip cost 38 s of CPU and 265 MB per image in the split step."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (0, 0, 0)).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def good_files(top: str = "pets/") -> dict[str, bytes]:
    return {
        f"{top}train/cat/0.png": png(value=10),
        f"{top}train/cat/1.png": png(value=20),
        f"{top}train/dog/2.png": png(value=200),
        f"{top}train/dog/3.png": png(value=210),
        f"{top}test/cat/4.png": png(value=15),
        f"{top}test/dog/5.png": png(value=205),
    }


def make_zip(path: Path, files: dict[str, bytes], extra: Callable[[zipfile.ZipFile], None] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        if extra is not None:
            extra(archive)
    return path


def add_symlink(archive: zipfile.ZipFile) -> None:
    info = zipfile.ZipInfo("pets/train/cat/link.png")
    info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive.writestr(info, "/etc/passwd")


def add_bomb(archive: zipfile.ZipFile) -> None:
    # 32 MiB of zeros deflate to about 32 KiB: a ratio of about 1000, as in a classic zip bomb.
    archive.writestr("pets/train/cat/bomb.png", bytes(32 << 20), compress_type=zipfile.ZIP_DEFLATED)


def add_empty_class(archive: zipfile.ZipFile) -> None:
    archive.writestr(zipfile.ZipInfo("pets/train/empty/"), b"")


def truncated_jpeg() -> bytes:
    whole = jpeg()
    return whole[: len(whole) // 2]


# name -> (files, extra writer, limits, expected error pattern). Each is also run through the split step.
HOSTILE: dict[str, tuple[dict[str, bytes], Callable[[zipfile.ZipFile], None] | None, DatasetLimits | None, str]] = {
    "zip-slip": (
        {**good_files(), "pets/train/cat/../../../../evil.png": png()},
        None,
        None,
        r"entry pets/train/cat/\.\./\.\./\.\./\.\./evil\.png points outside the archive with '\.\.'.*relative paths",
    ),
    "absolute path": (
        {**good_files(), "/tmp/pets/train/cat/abs.png": png()},
        None,
        None,
        r"entry /tmp/pets/train/cat/abs\.png has an absolute path.*relative paths",
    ),
    "windows drive path": (
        {**good_files(), "C:\\pets\\train\\cat\\x.png": png()},
        None,
        None,
        r"has an absolute path",
    ),
    "symlink": (
        good_files(),
        add_symlink,
        None,
        r"entry pets/train/cat/link\.png is a symbolic link.*only regular files and folders",
    ),
    "zip bomb (ratio)": (
        good_files(),
        add_bomb,
        None,
        r"entry pets/train/cat/bomb\.png expands 1\d\d\d times .* a zip bomb's ratio.*at most 100 times",
    ),
    "zip bomb (total size)": (
        {
            **good_files(),
            **{f"pets/train/cat/big{i}.png": np.random.default_rng(i).bytes(300_000) for i in range(4)},
        },
        None,
        DatasetLimits(max_total_bytes=1 << 20),
        r"the archive expands to more than 1\.0 MiB \(at entry pets/train/cat/big3\.png\).*at most 1\.0 MiB",
    ),
    "too many files": (good_files(), None, DatasetLimits(max_files=3), r"more than 3 files.*at most 3 files"),
    "decompression-bomb PNG": (
        {**good_files(), "pets/train/dog/bomb.png": png_declaring(100_000, 100_000)},
        None,
        None,
        r"image pets/train/dog/bomb\.png declares 10,000,000,000 pixels, over the limit of 89,478,485.*"
        r"at most 89,478,485 pixels",
    ),
    "over the pixel limit": (
        {**good_files(), "pets/train/dog/large.png": png(side=40)},
        None,
        DatasetLimits(max_image_pixels=1000),
        r"image pets/train/dog/large\.png declares 40x40 = 1,600 pixels, over the limit of 1,000",
    ),
    "truncated JPEG": (
        {**good_files(), "pets/train/dog/cut.jpg": truncated_jpeg()},
        None,
        None,
        r"cannot decode image pets/train/dog/cut\.jpg \(image file is truncated",
    ),
    "not an image": (
        {**good_files(), "pets/test/cat/fake.png": b"<html>not a png</html>"},
        None,
        None,
        r"cannot decode image pets/test/cat/fake\.png \(not an image format Pillow can read\)",
    ),
    "empty class folder": (
        good_files(),
        add_empty_class,
        None,
        r"class folder train/empty/ contains no images",
    ),
    "no test folder": (
        {k: v for k, v in good_files().items() if "/test/" not in k},
        None,
        None,
        r"no test/ folder \(found at the top: train/\)",
    ),
    "duplicate entry": (
        good_files(),
        lambda archive: archive.writestr("pets/train/cat/0.png", png(value=99)),
        None,
        r"entry pets/train/cat/0\.png appears twice",
    ),
    "too large decoded": (
        good_files(),
        None,
        DatasetLimits(max_decoded_bytes=300),
        r"6 images of 1x8x8 need 384 bytes decoded, over the limit of 300 bytes.*smaller image_size",
    ),
    "too deep": (
        {**good_files(), "pets/train/cat/" + "d/" * 40 + "x.png": png()},
        None,
        None,
        r"entry pets/train/cat/(d/){40}x\.png is 44 levels deep, over the limit of 32.*at most 32 components",
    ),
    "image file over the size limit": (
        {**good_files(), "pets/train/dog/big.jpg": jpeg()},
        None,
        DatasetLimits(max_file_bytes=1000),
        r"image file pets/train/dog/big\.jpg is \d+\.\d KiB, over the limit of 1000 bytes per image file.*"
        r"at most 1000 bytes \(DatasetLimits\.max_file_bytes\)",
    ),
    "WebP bomb (pixels per byte)": (
        {**good_files(), **{f"pets/train/dog/bomb{i}.webp": webp_bomb(2000) for i in range(3)}},
        None,
        None,
        r"image pets/train/dog/bomb0\.webp declares 2000x2000 = 4,000,000 pixels in a file of [\d,]+ bytes, "
        r"[\d,]+ pixels per byte, over the limit of 1,024 \(a decompression bomb\?\).*"
        r"at most 1,024 pixels per byte of file \(DatasetLimits\.max_pixels_per_byte",
    ),
    "over the total pixel budget": (
        good_files(),
        None,
        DatasetLimits(max_total_pixels=300),
        r"the images declare more than 300 pixels in all \(320 by image 5 of 6, pets/test/cat/4\.png\).*"
        r"at most 300 pixels before resizing \(DatasetLimits\.max_total_pixels\)",
    ),
    "copy across splits": (
        {**good_files(), "pets/test/dog/6.png": png(value=210)},
        None,
        None,
        r"test image pets/test/dog/6\.png has the same content as training image pets/train/dog/3\.png.*"
        r"leaks the test set into training",
    ),
}


@pytest.fixture
def hostile_zip(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, DatasetLimits | None, str]:
    files, extra, limits, pattern = HOSTILE[request.param]
    # zipfile itself warns when it writes a second entry of the same name
    with pytest.warns(UserWarning) if request.param == "duplicate entry" else contextlib.nullcontext():
        path = make_zip(tmp_path / "upload.zip", files, extra)
    return path, limits, pattern


@pytest.mark.parametrize("hostile_zip", list(HOSTILE), indirect=True)
def test_a_hostile_zip_gives_its_own_error(hostile_zip: tuple[Path, DatasetLimits | None, str]) -> None:
    path, limits, pattern = hostile_zip

    with pytest.raises(MicrofedError, match=re.compile(pattern, re.DOTALL)) as caught:
        load_dataset(str(path), limits=limits)

    assert str(caught.value).startswith("upload.zip: ")  # every message names the archive ...
    assert caught.value.hint  # ... and says what is allowed or what to do
    assert "\n" not in str(caught.value)  # on one line


@pytest.mark.parametrize("hostile_zip", list(HOSTILE), indirect=True)
def test_a_hostile_zip_leaves_nothing_behind(
    hostile_zip: tuple[Path, DatasetLimits | None, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, limits, pattern = hostile_zip
    if limits is not None:  # the split step takes the default limits; apply the case's own here
        from microfed.training import step_split

        monkeypatch.setattr(step_split, "load_dataset", lambda *a, **k: load_dataset(*a, **{**k, "limits": limits}))
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "shards"

    with pytest.raises(MicrofedError, match=re.compile(pattern, re.DOTALL)):
        split_step(SplitOptions(source=str(path)), SplitConfig(val_fraction=0.0, workers=2), out)

    assert not [p for p in out.rglob("*")]  # no shard, manifest or temporary file
    assert sorted(p for p in tmp_path.rglob("*") if p != out) == before  # nothing extracted anywhere near
    assert not any((parent / "evil.png").exists() for parent in tmp_path.parents)


def test_an_entry_whose_header_understates_its_size_is_refused(tmp_path: Path) -> None:
    data = png(side=32, value=7)
    path = make_zip(tmp_path / "upload.zip", good_files())
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("pets/train/cat/liar.png", data)
    raw = bytearray(path.read_bytes())
    # Rewrite the uncompressed size (offset 24 in the central directory record) of the last entry to 10 bytes.
    central = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, 10)
    path.write_bytes(bytes(raw))

    with pytest.raises(MicrofedError, match=r"pets/train/cat/liar\.png"):
        load_dataset(str(path))


def test_issue_14s_webp_bomb_is_refused_from_its_header_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = webp_bomb(9400)
    files = {**good_files(), **{f"pets/train/dog/bomb{i:02d}.webp": bomb for i in range(30)}}
    path = make_zip(tmp_path / "upload.zip", files)
    assert len(bomb) < 5000 and path.stat().st_size < 30_000  # the issue's 3.4 KB image and 15 KB zip
    decoded: list[tuple[int, int]] = []
    to_mode = image_decode.to_mode
    monkeypatch.setattr(
        image_decode, "to_mode", lambda image, channels: decoded.append(image.size) or to_mode(image, channels)
    )

    with pytest.raises(MicrofedError) as caught:
        load_dataset(str(path))
    assert re.fullmatch(
        r"upload\.zip: image pets/train/dog/bomb00\.webp declares 9400x9400 = 88,360,000 pixels in a file of "
        r"[\d,]+ bytes, [\d,]+ pixels per byte, over the limit of 1,024 \(a decompression bomb\?\) \(images may "
        r"hold at most 1,024 pixels per byte of file .*; or pass bad_images='skip' .*\)",
        str(caught.value),
    )
    with pytest.warns(SkippedImagesWarning, match=r"skipped 30 unreadable image\(s\): pets/train/dog/bomb00\.webp"):
        data = load_dataset(str(path), bad_images="skip")
    assert len(data.train.labels) == 4
    assert decoded == [(8, 8)] * 6  # the good images only: not one pixel of a bomb was decoded


# --------------------------------------------------------------------------------------------- folders


def test_a_symlink_in_a_folder_dataset_is_refused_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(value=1))
    root = write_tree(tmp_path / "upload", good_files(top=""))
    (root / "train" / "cat" / "link.png").symlink_to(secret)

    with pytest.raises(MicrofedError, match=r"upload: train/cat/link\.png is a symbolic link"):
        load_dataset(root)


def test_a_symlinked_class_folder_is_refused(tmp_path: Path) -> None:
    elsewhere = write_tree(tmp_path / "elsewhere", {"x.png": png()})
    root = write_tree(tmp_path / "upload", good_files(top=""))
    (root / "train" / "bird").symlink_to(elsewhere, target_is_directory=True)

    with pytest.raises(MicrofedError, match=r"train/bird is a symbolic link"):
        load_dataset(root)


def test_a_fifo_in_a_folder_dataset_is_refused_without_blocking(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "upload", good_files(top=""))
    os.mkfifo(root / "train" / "cat" / "pipe.png")

    with pytest.raises(MicrofedError, match=r"train/cat/pipe\.png is not a regular file"):
        load_dataset(root)


def test_a_sparse_3_gb_png_is_refused_by_its_size_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_tree(tmp_path / "upload", good_files(top=""))
    huge = sparse_file(root / "train" / "cat" / "huge.png", 3 * 10**9)
    read = []
    real_read = upload_listing.read_file
    monkeypatch.setattr(
        upload_listing, "read_file", lambda path, limit: read.append(str(path)) or real_read(path, limit)
    )
    message = (
        r"upload: image file train/cat/huge\.png is 2\.8 GiB, over the limit of 256\.0 MiB per image file "
        r"\(image files may be at most 256\.0 MiB \(DatasetLimits\.max_file_bytes\); .*\)"
    )

    with pytest.raises(MicrofedError) as caught:
        load_dataset(root)
    assert re.fullmatch(message, str(caught.value))
    out = tmp_path / "shards"
    with pytest.raises(MicrofedError, match=message):  # the split step fails with the same line, not MemoryError
        split_step(SplitOptions(source=str(root)), SplitConfig(val_fraction=0.0, workers=2), out)
    assert not list(out.rglob("*"))
    with pytest.warns(SkippedImagesWarning, match="huge.png"):
        data = load_dataset(root, bad_images="skip")
    assert [f.file for f in data.train.skipped] == ["train/cat/huge.png"]
    assert str(huge) not in read  # not one byte of it was read


def test_a_file_that_grows_past_the_limit_after_listing_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_tree(tmp_path / "upload", good_files(top=""))
    listed = upload_listing.list_folder

    def list_then_grow(source: str, folder: Path, limits: DatasetLimits) -> list:
        entries = listed(source, folder, limits)
        with (folder / "train" / "cat" / "0.png").open("ab") as file:
            file.write(bytes(2000))
        return entries

    monkeypatch.setattr(datasets, "list_folder", list_then_grow)  # where load_dataset looks it up
    with pytest.raises(MicrofedError, match=r"image file train/cat/0\.png is more than 1000 bytes, over the limit"):
        load_dataset(root, limits=DatasetLimits(max_file_bytes=1000))


def test_a_hard_link_from_test_to_train_is_refused_naming_both(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "upload", good_files(top=""))
    os.link(root / "train" / "dog" / "3.png", root / "test" / "dog" / "6.png")

    with pytest.raises(
        MicrofedError,
        match=r"^upload: test image test/dog/6\.png has the same content as training image train/dog/3\.png "
        r"\(an image in both train and test leaks the test set into training and inflates the test accuracy",
    ):
        load_dataset(root)


def test_copies_within_one_split_are_kept_with_a_warning(tmp_path: Path) -> None:
    files = {**good_files(), "pets/train/cat/copy.png": png(value=10), "pets/test/dog/copy.png": png(value=205)}

    with pytest.warns(
        DuplicateImagesWarning,
        match=r"2 image\(s\) are byte-identical copies of another image of the same split, e\.g\. "
        r"pets/train/cat/copy\.png of pets/train/cat/0\.png",
    ):
        data = load_dataset(str(make_zip(tmp_path / "upload.zip", files)))
    assert len(data.train.labels) == 5 and len(data.test.labels) == 3


def test_an_image_that_changes_between_check_and_decode_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_tree(tmp_path / "upload", good_files(top=""))
    reads: dict[str, int] = {}
    real_read = upload_listing.read_file

    def swapped_on_second_read(path: str, limit: int) -> bytes:
        reads[path] = reads.get(path, 0) + 1
        return png(value=210) if path.endswith("4.png") and reads[path] == 2 else real_read(path, limit)

    monkeypatch.setattr(upload_listing, "read_file", swapped_on_second_read)
    with pytest.raises(MicrofedError, match=r"image test/cat/4\.png changed while the dataset was being read"):
        load_dataset(root)


def test_a_deep_folder_is_refused_before_it_is_walked_further(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "upload", good_files(top=""))
    deep = root.joinpath("train", "cat", *["d"] * 40)
    deep.mkdir(parents=True)
    (deep / "x.png").write_bytes(png())

    with pytest.raises(
        MicrofedError, match=r"upload: path train/cat/(d/){30}d is 33 levels deep, over the limit of 32"
    ):
        load_dataset(root)


def test_the_readme_lists_every_limit_with_its_default() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("**Untrusted uploads**") : text.index("**Faults**")]
    table = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", section, flags=re.MULTILINE))

    def figure(shown: str) -> float:
        number, _, unit = shown.partition(" ")
        return float(number.replace(",", "")) * {"": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]

    assert sorted(table) == sorted(field.name for field in dataclasses.fields(DatasetLimits))
    defaults = DatasetLimits()
    assert {name: figure(shown) for name, shown in table.items()} == {name: getattr(defaults, name) for name in table}
    assert f"over {COMPRESSION_RATIO_MIN_BYTES // 1024**2} MiB" in section


# ------------------------------------------------------------------------------- skipping bad images


def test_skipping_bad_images_warns_counts_them_and_the_manifest_names_them(tmp_path: Path) -> None:
    files = {
        **good_files(),
        "pets/train/dog/cut.jpg": truncated_jpeg(),
        "pets/test/cat/fake.png": b"not an image",
        "pets/train/cat/bomb.png": png_declaring(100_000, 100_000),
    }
    path = make_zip(tmp_path / "upload.zip", files)

    with pytest.warns(SkippedImagesWarning, match=r"skipped 3 unreadable image\(s\)"):
        data = load_dataset(str(path), bad_images="skip")
    summary = write_shards(data, tmp_path / "shards", SplitConfig(val_fraction=0.0, workers=2, split="iid"))

    assert len(data.train.labels) == 4 and len(data.test.labels) == 2  # the good ones, all of them
    assert {f.file for f in data.train.skipped} == {"pets/train/dog/cut.jpg", "pets/train/cat/bomb.png"}
    assert [f.file for f in data.test.skipped] == ["pets/test/cat/fake.png"]
    assert summary["num_skipped_files"] == 3
    listed = read_dataset_manifest(tmp_path / "shards")["skipped_files"]
    assert {(f["split"], f["file"]) for f in listed} == {
        ("train", "pets/train/dog/cut.jpg"),
        ("train", "pets/train/cat/bomb.png"),
        ("test", "pets/test/cat/fake.png"),
    }
    assert any("truncated" in f["reason"] for f in listed)
    shard0 = json.loads((tmp_path / "shards" / "shard-00000.json").read_text())
    assert shard0["num_skipped_files"] == 3
    assert subsample(data.train, 2, seed=0).skipped == data.train.skipped  # a quick run keeps the record


def test_skipping_every_image_of_a_class_is_still_an_error(tmp_path: Path) -> None:
    files = {**good_files(), "pets/train/bird/a.png": b"junk", "pets/train/bird/b.jpg": truncated_jpeg()}

    with pytest.raises(MicrofedError, match=r"no readable images left in train/bird/ after skipping 2"):
        load_dataset(str(make_zip(tmp_path / "upload.zip", files)), bad_images="skip")


def test_an_unknown_bad_image_policy_lists_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(MicrofedError, match=r"bad_images 'ignore'.*fail, skip"):
        load_dataset(str(make_zip(tmp_path / "upload.zip", good_files())), bad_images="ignore")


def test_archive_level_problems_are_not_skipped(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "upload.zip", good_files(), add_symlink)

    with pytest.raises(MicrofedError, match="symbolic link"):
        load_dataset(str(path), bad_images="skip")


def test_limits_must_be_positive() -> None:
    with pytest.raises(MicrofedError, match=r"DatasetLimits\.max_image_pixels must be a positive number"):
        DatasetLimits(max_image_pixels=0)
    with pytest.raises(MicrofedError, match=r"DatasetLimits\.max_depth must be a positive number, got True"):
        DatasetLimits(max_depth=True)


# ------------------------------------------------------------------------------------ class folder names

ESCAPE = "\x1b[31m"  # a terminal colour escape: printed raw, it would restyle the user's terminal
BIDI = "\u202e"  # right-to-left override: printed raw, it reverses what follows


def test_display_name_escapes_control_and_bidi_characters_and_shortens() -> None:
    assert display_name(f"cat{ESCAPE}red") == "cat\\x1b[31mred"
    assert display_name(f"gnp.{BIDI}exe") == "gnp.\\u202eexe"
    assert display_name("line\nbreak\ttab") == "line\\nbreak\\ttab"
    assert display_name("T-shirt top é 猫") == "T-shirt top é 猫"  # ordinary text, spaces included, unchanged
    long = display_name("a" * 100 + "b" * 100, max_chars=41)
    assert len(long) == 41 and long.startswith("a" * 20) and long.endswith("b" * 20)


def test_class_names_are_exact_in_the_manifest_and_escaped_in_messages(tmp_path: Path) -> None:
    weird = f"cat{ESCAPE}{BIDI}"
    files = {f"train/{weird}/0.png": png(value=5), "train/dog/1.png": png(value=250), "test/dog/2.png": png()}
    data = load_dataset(str(make_zip(tmp_path / "weird.zip", files)))
    summary = write_shards(data, tmp_path / "shards", SplitConfig(val_fraction=0.0, workers=1))

    assert summary["class_names"] == [weird, "dog"]
    assert json.loads((tmp_path / "shards" / "dataset.json").read_text())["class_names"][0] == weird

    empty = {**files, f"train/{weird}x/": b""}
    with pytest.raises(MicrofedError) as caught:
        load_dataset(str(make_zip(tmp_path / "empty.zip", empty)))
    message = str(caught.value)
    assert "cat\\x1b[31m\\u202ex/ contains no images" in message
    assert "\x1b" not in message and BIDI not in message


# ------------------------------------------------------------------------------- untrusted model files


def micro_folder(tmp_path: Path, states: list[dict[str, torch.Tensor]], archs: list[ModelConfig]) -> Path:
    """A train step's output: one micro-model per worker, job.json and model_config.json."""
    micro = tmp_path / "micro"
    workers = []
    for rank, (state, arch) in enumerate(zip(states, archs, strict=True)):
        name = f"micro-model-{rank:05d}.safetensors"
        meta = {"n_k": "10", "rank": str(rank), ARCHITECTURE_KEY: json.dumps(arch.to_dict(), sort_keys=True)}
        write_safetensors(micro / name, state, meta)
        workers.append({"rank": rank, "n_k": 10, "file": name})
    write_json(micro / "job.json", {"config": {}, "workers": workers, "plan": None, "usage": None, "seconds": 0.0})
    card = ModelCard(architecture=archs[0], class_names=("a", "b", "c"), mean=(0.5,), std=(0.25,))
    write_json(micro / MODEL_CONFIG_FILE, card.to_dict())
    return micro


SMALL = ModelConfig(name="cnn-small", num_classes=3, in_channels=1, image_size=(16, 16))
FMNIST = ModelConfig(name="cnn-fmnist", num_classes=3, in_channels=1, image_size=(16, 16))


def state_of(arch: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return dict(build_model(arch).state_dict())


def test_aggregate_rejects_a_micro_model_with_nan_naming_the_worker(tmp_path: Path) -> None:
    poisoned = state_of(SMALL, 1)
    poisoned["3.weight"][0, 0, 0, 0] = float("nan")
    micro = micro_folder(tmp_path, [state_of(SMALL), poisoned], [SMALL, SMALL])

    with pytest.raises(MicrofedError, match=r"worker 1 \(micro-model-00001\.safetensors\): tensor '3\.weight' .*NaN"):
        aggregate_step(micro, tmp_path / "model")
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_aggregate_rejects_a_micro_model_of_another_architecture_naming_the_worker(tmp_path: Path) -> None:
    micro = micro_folder(tmp_path, [state_of(SMALL), state_of(FMNIST)], [SMALL, FMNIST])

    with pytest.raises(MicrofedError, match=r"worker 1 \(micro-model-00001\.safetensors\).*(keys|tensor)"):
        aggregate_step(micro, tmp_path / "model")
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_recorded_architectures_that_differ_are_rejected_even_with_equal_tensors() -> None:
    other = ModelConfig(name="cnn-small", num_classes=3, in_channels=1, image_size=(16, 17))
    metas = [{ARCHITECTURE_KEY: json.dumps(a.to_dict())} for a in (SMALL, SMALL, other)]
    names = [f"micro-model of worker {r}" for r in range(3)]

    check_same_architecture(metas[:2], names[:2])
    with pytest.raises(MicrofedError, match=r"worker 2 was trained as a different architecture.*image_size"):
        check_same_architecture(metas, names)
    with pytest.raises(MicrofedError, match="worker 1 was trained as a different architecture"):
        check_same_architecture([metas[0], {}], names[:2])


def test_a_pickled_micro_model_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
            return (os.mkdir, (str(marker),))

    micro = micro_folder(tmp_path, [state_of(SMALL), state_of(SMALL, 1)], [SMALL, SMALL])
    (micro / "micro-model-00001.safetensors").write_bytes(pickle.dumps(Payload()))

    with pytest.raises(MicrofedError, match=r"micro-model-00001\.safetensors: not a readable safetensors file"):
        aggregate_step(micro, tmp_path / "model")
    assert not marker.exists()


def test_no_data_or_model_path_can_unpickle() -> None:
    """A static check over the packages: no pickle, no torch.load (a pickle) unless weights_only=True, no numpy
    loading with allow_pickle. (torch.jit.load is not pickle; export.py uses it on the bytes it just wrote.)"""
    offenders = []
    for folder in ("training", "components", "pipelines"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    offenders += [f"{path.name}: import {m}" for m in modules if m.split(".")[0] in {"pickle", "dill"}]
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    call = ast.unparse(node.func)
                    if call == "torch.load" and not _weights_only(node):
                        offenders.append(f"{path.name}:{node.lineno}: {call} without weights_only=True")
                    if any(k.arg == "allow_pickle" for k in node.keywords):
                        offenders.append(f"{path.name}:{node.lineno}: allow_pickle")
    assert offenders == []


def _weights_only(node: ast.Call) -> bool:
    return any(
        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords
    )
