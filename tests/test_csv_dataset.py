"""CSV datasets: a table of image paths (relative, absolute or gs://), labels and an optional split column.

The images are decoded by the same code as zips and folders, so a CSV listing a folder's images must load to the
same tensors as the folder itself; errors name the CSV, the row and the column.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microfed.training import storage
from microfed.training.datasets import (
    DatasetLimits,
    DuplicateImagesWarning,
    SkippedImagesWarning,
    check_source,
    load_dataset,
)
from microfed.training.errors import MicrofedError
from microfed.training.shards import SplitConfig
from microfed.training.step_split import SplitOptions, split_step
from tests.conftest import CLASSES, pattern_images, sparse_file
from tests.gcs_emulator import GcsEmulator, gcs  # noqa: F401


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def image_tree(root: Path, per_class: dict[str, int], side: int = 16) -> list[tuple[str, str, str]]:
    """Images in the folder layout (root/split/class/i.png); returns (relative path, label, split) rows."""
    rows = []
    for split, n in per_class.items():
        labels = np.repeat(np.arange(len(CLASSES)), n)
        for i, (img, y) in enumerate(zip(pattern_images(labels, side, seed=len(split)), labels, strict=True)):
            rel = f"{split}/{CLASSES[y]}/{i:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(png(img))
            rows.append((rel, CLASSES[y], split))
    return rows


def write_csv(path: Path, header: str, lines: list[str], *, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([header, *lines]) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    root = tmp_path / "images"
    return root, image_tree(root, {"train": 4, "test": 2})


def test_without_a_split_column_a_seventh_of_each_class_becomes_the_test_set(tmp_path: Path) -> None:
    root = tmp_path / "images"
    rows = image_tree(root, {"train": 14})  # 14 images per class
    csv_path = write_csv(root / "list.csv", "image,label", [f"{path},{label}" for path, label, _ in rows])
    first, again = load_dataset(csv_path), load_dataset(csv_path)
    n = len(CLASSES)
    assert first.test.labels.numel() == 2 * n and first.train.labels.numel() == 12 * n
    assert first.test.labels.bincount().tolist() == [2] * n  # stratified
    # the same CSV gives the same test set every time, and no image is in both
    assert torch.equal(first.test.images, again.test.images)
    train = {x.numpy().tobytes() for x in first.train.images}
    assert not any(x.numpy().tobytes() in train for x in first.test.images)


def test_a_csv_loads_exactly_like_the_folder_it_lists(tree: tuple[Path, list[tuple[str, str, str]]]) -> None:
    root, rows = tree
    # a colour image of another size in train/: both loaders switch to RGB and keep the most common size
    Image.new("RGB", (20, 12), (200, 10, 10)).save(root / "train" / "circle" / "zz-colour.png")
    rows.append(("train/circle/zz-colour.png", "circle", "train"))
    csv_path = write_csv(root / "list.csv", "image,label,split", [",".join(r) for r in reversed(rows)])
    from_csv = load_dataset(csv_path)
    from_folder = load_dataset(root)
    assert from_csv.name == "list.csv"
    for split in ("train", "test"):
        a, b = getattr(from_csv, split), getattr(from_folder, split)
        assert a.class_names == b.class_names == tuple(sorted(CLASSES))
        assert a.images.shape == b.images.shape and a.images.shape[1:] == (3, 16, 16)
        # row order differs from the folder's file order: compare as sets of (label, image) pairs
        key = [(int(y), x.numpy().tobytes()) for x, y in zip(a.images, a.labels, strict=True)]
        expected = [(int(y), x.numpy().tobytes()) for x, y in zip(b.images, b.labels, strict=True)]
        assert sorted(key) == sorted(expected)


def test_path_column_absolute_paths_bom_extra_columns_and_image_size(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rows = image_tree(root, {"train": 2, "test": 1}, side=10)
    lines = [f"{root / rel},{label}, {split.upper()} ,note" for rel, label, split in rows]
    csv_path = write_csv(tmp_path / "elsewhere" / "abs.csv", " Path ,LABEL,Split,comment", lines, bom=True)
    data = load_dataset(csv_path, image_size=(12, 8))
    assert data.train.images.shape == (6, 1, 12, 8) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (3, 1, 12, 8)
    assert data.train.class_names == ("circle", "square", "triangle")
    assert sorted(data.train.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_labels_are_class_names_sorted_like_class_folders(tmp_path: Path) -> None:
    for value, name in enumerate(("b.png", "a.png", "c.png", "d.png")):
        Image.new("L", (8, 8), 100 + value).save(tmp_path / name)  # distinct: a copy across splits is refused
    csv_path = write_csv(
        tmp_path / "l.csv", "filename,label,split", ["b.png,zebra,train", "a.png,ant,train", "c.png,zebra,test"]
    )
    data = load_dataset(csv_path)
    assert data.train.class_names == ("ant", "zebra")
    assert data.train.labels.tolist() == [1, 0] and data.test.labels.tolist() == [1]


def test_check_source_and_split_step_take_a_csv(tree: tuple[Path, list[tuple[str, str, str]]], tmp_path: Path) -> None:
    root, rows = tree
    csv_path = write_csv(root / "list.csv", "image,label,split", [",".join(r) for r in rows])
    assert check_source(csv_path) == "csv" and check_source(str(csv_path)) == "csv"
    assert check_source("gs://bucket/data/list.csv") == "csv"  # only its form is checked: nothing is fetched
    summary = split_step(
        SplitOptions(source=str(csv_path)), SplitConfig(val_fraction=0.0, workers=2), tmp_path / "shards"
    )
    assert summary["num_train_examples"] == 12 and summary["num_test_examples"] == 6
    assert summary["class_names"] == list(CLASSES)


@pytest.mark.parametrize(
    ("source", "message"),
    [("missing.csv", "does not exist"), ("folder.csv", "is a folder"), ("gs://Bad_Bucket/x.csv", "bucket name")],
)
def test_check_source_refuses_a_csv_that_is_not_there(tmp_path: Path, source: str, message: str) -> None:
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(MicrofedError, match=message):
        check_source(source if source.startswith("gs://") else tmp_path / source)


# (header, rows, expected message); rows name images a.png (train) and b.png (test), which exist
BAD_TABLES = [
    ("label,split", ["circle,train"], r"no image column in the header row \(found: label, split\)"),
    ("image,path,label", ["a.png,a.png,circle"], r"2 image columns \(image, path\)"),
    ("image,split", ["a.png,train"], "no label column"),
    ("image,label,label", ["a.png,circle,circle"], "column 'label' appears twice"),
    ("image,label,split", ["a.png,circle,train", "b.png,,test"], r"row 3, column 'label': the field is empty"),
    ("image,label,split", ["a.png,circle,train", ",circle,test"], r"row 3, column 'image': the field is empty"),
    ("image,label,split", ["a.png,circle,train", "b.png,circle,"], r"row 3, column 'split': the field is empty"),
    (
        "image,label,split",
        ["a.png,circle,train", "b.png,circle,valid"],
        r"row 3, column 'split': unknown split 'valid'",
    ),
    (
        "image,label,split",
        ["a.png,circle,train", "c.png,circle,test"],
        r"row 3, column 'image': image c.png .* not found",
    ),
    ("image,label,split", ["a.png,circle,train", "sub,circle,test"], r"row 3, column 'image': .*is a folder"),
    ("image,label,split", ["a.png,circle,train", "a.png,circle,test"], "row 3, column 'image': .*also listed in row 2"),
    ("image,label,split", ["a.png,circle,train", "b.png,square,test"], r"row 3, column 'label': test class 'square'"),
    ("image,label,split", ["a.png,circle,train", "b.png,circle,train"], "no rows with split 'test'"),
    ("image,label,split", ["a.png,circle,test"], "no rows with split 'train'"),
    ("image,label,split", [], "a header but no rows"),
    ("image,label,split", ["a.png,circle,train,extra"], "row 2: 4 fields, but the header names 3 columns"),
    ("image,label,split", ['a.png,"circle,train'], "not a readable CSV"),
]


@pytest.mark.parametrize(("header", "rows", "message"), BAD_TABLES)
def test_a_malformed_csv_names_the_file_row_and_column(
    tmp_path: Path, header: str, rows: list[str], message: str
) -> None:
    Image.new("L", (8, 8), 10).save(tmp_path / "a.png")
    Image.new("L", (8, 8), 200).save(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    csv_path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(MicrofedError, match=message) as caught:
        load_dataset(csv_path)
    assert caught.value.message.startswith("bad.csv")


def test_an_empty_or_non_utf8_csv_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(MicrofedError, match=r"empty\.csv: the CSV is empty"):
        load_dataset(tmp_path / "empty.csv")
    (tmp_path / "latin.csv").write_bytes("image,label\nä.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(MicrofedError, match=r"latin\.csv line 2: not UTF-8"):
        load_dataset(tmp_path / "latin.csv")


def test_blank_lines_are_skipped_and_row_numbers_still_count_them(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 10).save(tmp_path / "a.png")
    csv_path = write_csv(tmp_path / "gaps.csv", "image,label,split", ["a.png,circle,train", "", "b.png,circle,test"])
    with pytest.raises(MicrofedError, match=r"gaps.csv row 4, column 'image': image b.png"):
        load_dataset(csv_path)


def test_relative_paths_start_from_the_csv_folder_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data" / "img").mkdir(parents=True)
    Image.new("L", (8, 8), 10).save(tmp_path / "data" / "img" / "a.png")
    Image.new("L", (8, 8), 20).save(tmp_path / "data" / "img" / "b.png")
    write_csv(tmp_path / "data" / "list.csv", "image,label,split", ["img/a.png,x,train", "img/b.png,x,test"])
    monkeypatch.chdir(tmp_path)
    assert load_dataset("data/list.csv").train.images.shape == (1, 1, 8, 8)


def test_an_undecodable_image_fails_with_its_row_or_is_skipped(tmp_path: Path) -> None:
    for i in range(2):
        Image.new("L", (8, 8), 10 * i).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("L", (8, 8), 99).save(tmp_path / "t.png")
    csv_path = write_csv(
        tmp_path / "l.csv",
        "image,label,split",
        ["ok0.png,a,train", "broken.png,a,train", "ok1.png,b,train", "t.png,a,test"],
    )
    with pytest.raises(MicrofedError, match=r"l.csv: cannot decode image broken.png \(row 3\)"):
        load_dataset(csv_path)
    with pytest.warns(SkippedImagesWarning, match="broken.png"):
        data = load_dataset(csv_path, bad_images="skip")
    assert len(data.train.labels) == 2
    assert [(f.file, "row 3" in f.reason) for f in data.train.skipped] == [("broken.png", True)]


def test_dataset_limits_apply_to_a_csv(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        Image.new("L", (8, 8), 10).save(tmp_path / name)
    csv_path = write_csv(tmp_path / "l.csv", "image,label,split", ["a.png,x,train", "b.png,x,train", "c.png,x,test"])
    with pytest.raises(MicrofedError, match="more than 2 files"):
        load_dataset(csv_path, limits=DatasetLimits(max_files=2))
    with pytest.raises(MicrofedError, match="over the limit of 10"):
        load_dataset(csv_path, limits=DatasetLimits(max_image_pixels=10))


def test_the_same_image_spelled_two_ways_cannot_be_in_train_and_test(tmp_path: Path) -> None:
    """Issue 14: train/a/../a/3.png as a test row beside train/a/3.png as a training row was accepted, and the
    reported test accuracy was 0.83 against 0.38 on the real test set."""
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(4):
        Image.new("L", (8, 8), 10 * i).save(tmp_path / "train" / "a" / f"{i}.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "train" / "a" / "3.png")
    rows = ["train/a/3.png,a,train", "train/a/0.png,a,train"]

    for spelled in ("train/a/../a/3.png", "./train//a/3.png", "link.png", str(tmp_path / "train/a/3.png")):
        csv_path = write_csv(tmp_path / "l.csv", "image,label,split", [*rows, f"{spelled},a,test"])
        with pytest.raises(MicrofedError) as caught:
            load_dataset(csv_path)
        assert caught.value.message == (
            f"l.csv row 4, column 'image': image {spelled} is also listed in row 2 (as train/a/3.png), as test here "
            "and train there"
        )
        assert "leaks the test set" in caught.value.hint

    shutil.copy(tmp_path / "train" / "a" / "3.png", tmp_path / "copy.png")  # a copy: caught by its content
    csv_path = write_csv(tmp_path / "l.csv", "image,label,split", [*rows, "copy.png,a,test"])
    with pytest.raises(
        MicrofedError,
        match=r"^l\.csv: test image copy\.png \(row 4\) has the same content as training image train/a/3\.png "
        r"\(row 2\) \(an image in both train and test leaks the test set",
    ):
        load_dataset(csv_path)

    # within one split: the same file twice is refused, a copy is kept with a warning
    csv_path = write_csv(tmp_path / "l.csv", "image,label,split", [*rows, "link.png,a,train", "train/a/1.png,a,test"])
    with pytest.raises(MicrofedError, match=r"row 4, column 'image': image link\.png is also listed in row 2 "):
        load_dataset(csv_path)
    csv_path = write_csv(tmp_path / "l.csv", "image,label,split", [*rows, "copy.png,a,train", "train/a/1.png,a,test"])
    with pytest.warns(DuplicateImagesWarning, match=r"copy\.png \(row 4\) of train/a/3\.png \(row 2\)"):
        assert len(load_dataset(csv_path).train.labels) == 3


def test_a_csv_or_a_listed_image_over_the_size_limits_is_refused_before_it_is_read(tmp_path: Path) -> None:
    huge_csv = sparse_file(tmp_path / "huge.csv", 300 << 20)
    with pytest.raises(MicrofedError) as caught:
        load_dataset(huge_csv)
    assert str(caught.value) == (
        "huge.csv: the CSV is 300.0 MiB, over the limit of 256.0 MiB (a CSV may be at most 256.0 MiB "
        "(DatasetLimits.max_csv_bytes); split the list, or leave out columns it does not need)"
    )

    Image.new("L", (8, 8), 10).save(tmp_path / "a.png")
    Image.new("L", (8, 8), 20).save(tmp_path / "b.png")
    sparse_file(tmp_path / "huge.png", 3 * 10**9)
    csv_path = write_csv(tmp_path / "l.csv", "image,label,split", ["a.png,x,train", "huge.png,x,train", "b.png,x,test"])
    with pytest.raises(
        MicrofedError,
        match=r"^l\.csv: image file huge\.png \(row 3\) is 2\.8 GiB, over the limit of 256\.0 MiB per image file "
        r"\(image files may be at most 256\.0 MiB \(DatasetLimits\.max_file_bytes\)",
    ):
        load_dataset(csv_path)
    with pytest.warns(SkippedImagesWarning, match="huge.png"):
        assert len(load_dataset(csv_path, bad_images="skip").train.labels) == 1
    with pytest.raises(
        MicrofedError, match=rf"l\.csv: the CSV is {csv_path.stat().st_size} bytes, over the limit of 20 "
    ):
        load_dataset(csv_path, limits=DatasetLimits(max_csv_bytes=20))


@pytest.mark.integration
def test_gs_csvs_and_images_are_held_to_the_same_limits_and_spellings(
    gcs: GcsEmulator,  # noqa: F811
) -> None:
    storage.write_bytes(gcs.uri("d/a.png"), png(np.full((8, 8), 10, np.uint8)))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    storage.write_bytes(gcs.uri("d/b.png"), png(noise))
    table = b"image,label,split\na.png,x,train\nb.png,x,test\n"
    storage.write_bytes(gcs.uri("d/l.csv"), table)

    with pytest.raises(
        MicrofedError, match=r"^l\.csv: image file b\.png \(row 3\) is 4\.\d KiB, over the limit of 1000 bytes"
    ):
        load_dataset(gcs.uri("d/l.csv"), limits=DatasetLimits(max_file_bytes=1000))
    with pytest.raises(MicrofedError, match=rf"^l\.csv: the CSV is {len(table)} bytes, over the limit of 20 bytes"):
        load_dataset(gcs.uri("d/l.csv"), limits=DatasetLimits(max_csv_bytes=20))

    twice = f"image,label,split\na.png,x,train\n{gcs.uri('d/sub/../a.png')},x,test\n"
    storage.write_bytes(gcs.uri("d/twice.csv"), twice.encode())
    with pytest.raises(MicrofedError, match=r"row 3, column 'image': image gs://.*/d/sub/\.\./a\.png is also listed"):
        load_dataset(gcs.uri("d/twice.csv"))


@pytest.mark.integration
def test_gs_csv_with_relative_paths_and_gs_uris(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    root = tmp_path / "images"
    rows = image_tree(root, {"train": 2, "test": 1})
    for rel, _, _ in rows:
        storage.write_bytes(gcs.uri(f"data/{rel}"), (root / rel).read_bytes())
    # a CSV in the bucket: relative paths (one with '..'), and a gs:// URI in its own right
    lines = [f"{rel},{label},{split}" for rel, label, split in rows[1:-1]]
    lines.append(f"../data/{rows[0][0]},{rows[0][1]},{rows[0][2]}")
    lines.append(f"{gcs.uri('data/' + rows[-1][0])},{rows[-1][1]},{rows[-1][2]}")
    storage.write_bytes(gcs.uri("data/list.csv"), ("image,label,split\n" + "\n".join(lines) + "\n").encode())
    expected = load_dataset(write_csv(root / "list.csv", "image,label,split", [",".join(r) for r in rows]))

    data = load_dataset(gcs.uri("data/list.csv"))
    assert data.name == "list.csv"
    for split in ("train", "test"):
        got, want = getattr(data, split), getattr(expected, split)
        assert sorted(got.images.flatten(1).sum(1).tolist()) == sorted(want.images.flatten(1).sum(1).tolist())
    # the split step reads a gs:// CSV in place (no folder download)
    summary = split_step(
        SplitOptions(source=gcs.uri("data/list.csv")), SplitConfig(val_fraction=0.0, workers=2), tmp_path / "shards"
    )
    assert summary["num_train_examples"] == 6

    # a local CSV listing a gs:// image that is not there: the row and column are named
    missing = write_csv(
        tmp_path / "m.csv", "image,label,split", [f"{root / rows[0][0]},a,train", f"{gcs.uri('nope.png')},a,test"]
    )
    with pytest.raises(MicrofedError, match=r"m.csv row 3, column 'image': image gs://.*/nope.png: not found"):
        load_dataset(missing)
    outside = gcs.uri("data/out.csv")
    storage.write_bytes(outside, b"image,label,split\n../../x.png,a,train\n")
    with pytest.raises(MicrofedError, match=r"row 2, column 'image': \.\./\.\./x\.png points outside the CSV's bucket"):
        load_dataset(outside)


def test_the_cli_gives_the_steps_an_absolute_csv_path_and_keeps_gs_uris(
    tree: tuple[Path, list[tuple[str, str, str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from microfed.pipelines.cli import build_parser, pipeline_arguments

    root, rows = tree
    csv_path = write_csv(root / "list.csv", "image,label,split", [",".join(r) for r in rows])
    monkeypatch.chdir(tmp_path)
    values = pipeline_arguments(build_parser().parse_args(["run", "--dataset", "images/list.csv"]))
    assert values["dataset"] == str(csv_path)
    values = pipeline_arguments(build_parser().parse_args(["run", "--dataset", "gs://bucket/data/list.csv"]))
    assert values["dataset"] == "gs://bucket/data/list.csv"
    with pytest.raises(MicrofedError, match="the CSV file does not exist"):
        pipeline_arguments(build_parser().parse_args(["run", "--dataset", "images/typo.csv"]))
