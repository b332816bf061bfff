"""Shards: the split is a partition with the promised class proportions, and shards round-trip through disk.

All data is synthetic (tiny uint8 images, int64 labels); each test follows Prepare / Execute / Assert.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from microfed.training.datasets import ImageData, LoadedDataset
from microfed.training.errors import MicrofedError
from microfed.training.shards import (
    SPLITS,
    SplitConfig,
    assign_shards,
    load_shard,
    load_test_set,
    normalisation_stats,
    read_dataset_manifest,
    subsample,
    write_shards,
)

pytestmark = pytest.mark.unit

# ------------------------------------------------------------------------------------------- helpers


def make_labels(per_class: Sequence[int]) -> torch.Tensor:
    """Labels 0,0,..,1,1,.. with `per_class[c]` examples of class c, shuffled deterministically."""
    labels = torch.repeat_interleave(torch.arange(len(per_class)), torch.tensor(per_class))
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


def names(num_classes: int) -> tuple[str, ...]:
    return tuple(f"class{c}" for c in range(num_classes))


def make_images(labels: torch.Tensor, channels: int = 1, height: int = 4, width: int = 5) -> ImageData:
    """Random images, each one unique: its index is written into its first two pixels."""
    n = len(labels)
    gen = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, channels, height, width), dtype=torch.uint8, generator=gen)
    flat = images.view(n, -1)
    flat[:, 0] = torch.arange(n) % 256
    flat[:, 1] = torch.arange(n) // 256
    num_classes = int(labels.max()) + 1
    return ImageData(images=images, labels=labels.to(torch.int64), class_names=names(num_classes))


def histogram(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def assert_partition(parts: Sequence[torch.Tensor], n: int) -> None:
    """Every index 0..n-1 appears in exactly one part."""
    assert all(p.dtype == torch.int64 for p in parts)
    every = torch.cat(list(parts))
    assert len(every) == n
    assert torch.equal(torch.sort(every).values, torch.arange(n))


def examples(images: torch.Tensor, labels: torch.Tensor) -> Counter[tuple[bytes, int]]:
    """The examples as a multiset of (image bytes, label)."""
    return Counter((img.numpy().tobytes(), int(lab)) for img, lab in zip(images, labels, strict=True))


BALANCED_10 = [30] * 10  # 300 examples, 10 classes
UNEVEN_4 = [23, 41, 7, 12]  # 83 examples, 4 classes, no count divisible by the shard counts below

# ----------------------------------------------------------------------------------- assign_shards


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("workers", [1, 2, 3, 7])
@pytest.mark.parametrize("per_class", [BALANCED_10, UNEVEN_4])
def test_every_example_lands_in_exactly_one_shard(split: str, workers: int, per_class: list[int]) -> None:
    # Prepare
    labels = make_labels(per_class)

    # Execute
    parts = assign_shards(labels, names(len(per_class)), SplitConfig(val_fraction=0.0, workers=workers, split=split))

    # Assert
    assert len(parts) == workers
    assert_partition(parts, len(labels))
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("split", SPLITS)
def test_split_is_deterministic_for_a_seed_and_changes_with_it(split: str) -> None:
    # Prepare
    labels = make_labels(BALANCED_10)

    def parts(seed: int) -> list[torch.Tensor]:
        return assign_shards(labels, names(10), SplitConfig(val_fraction=0.0, workers=3, split=split, seed=seed))

    # Execute
    first, again, other = parts(11), parts(11), parts(12)

    # Assert
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(len(a) == len(b) and torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_split_does_not_modify_the_labels() -> None:
    labels = make_labels(UNEVEN_4)
    before = labels.clone()

    assign_shards(labels, names(4), SplitConfig(val_fraction=0.0, workers=3, split="dirichlet"))

    assert torch.equal(labels, before)


@pytest.mark.parametrize("per_class", [BALANCED_10, UNEVEN_4, [101] * 10])
@pytest.mark.parametrize("workers", [2, 3, 7])
def test_stratified_shards_keep_the_class_proportions(per_class: list[int], workers: int) -> None:
    # Prepare
    labels = make_labels(per_class)
    num_classes = len(per_class)

    # Execute
    parts = assign_shards(labels, names(num_classes), SplitConfig(val_fraction=0.0, workers=workers, seed=3))

    # Assert: class c gets n_c / k examples in every shard, rounded up or down (so within one example).
    for part in parts:
        for c, count in enumerate(histogram(labels[part], num_classes)):
            assert abs(count - per_class[c] / workers) < 1, (c, count)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= num_classes


def test_stratified_with_ratios_follows_the_ratios() -> None:
    # Prepare: 4 classes of 40 -> 10 / 20 / 10 of each class.
    labels = make_labels([40] * 4)

    # Execute
    parts = assign_shards(labels, names(4), SplitConfig(val_fraction=0.0, workers=3, ratios=(1, 2, 1)))

    # Assert
    assert [len(p) for p in parts] == [40, 80, 40]
    for part, share in zip(parts, (10, 20, 10), strict=True):
        assert histogram(labels[part], 4) == [share] * 4


@pytest.mark.parametrize(
    ("per_class", "ratios"),
    [
        # class 1 has 6 examples: 1.5 / 3 / 1.5 -> the middle shard must get exactly 3 of them.
        ([5, 6, 5], (1.0, 2.0, 1.0)),
        # class 2 has 5 examples: shard 3 is owed 5 * 3/7 = 2.14 of them -> 2 or 3.
        ([5, 10, 5], (2.0, 1.0, 1.0, 3.0)),
        (UNEVEN_4, (1.0, 2.0, 1.0)),
    ],
)
def test_stratified_with_ratios_gives_each_class_its_share_rounded_up_or_down(
    per_class: list[int], ratios: tuple[float, ...]
) -> None:
    # Prepare
    labels = make_labels(per_class)
    num_classes = len(per_class)

    # Execute
    parts = assign_shards(labels, names(num_classes), SplitConfig(val_fraction=0.0, workers=len(ratios), ratios=ratios))

    # Assert: shard i holds floor or ceil of n_c * r_i / sum(r) examples of class c.
    for i, (part, r) in enumerate(zip(parts, ratios, strict=True)):
        for c, count in enumerate(histogram(labels[part], num_classes)):
            owed = per_class[c] * r / sum(ratios)
            assert math.floor(owed) <= count <= math.ceil(owed), f"shard {i}, class {c}: {count} vs {owed:.2f}"
        assert abs(len(part) - len(labels) * r / sum(ratios)) <= num_classes


def test_iid_with_ratios_follows_the_ratios() -> None:
    labels = make_labels([50] * 4)  # 200 examples -> 50 / 100 / 50

    parts = assign_shards(labels, names(4), SplitConfig(val_fraction=0.0, workers=3, split="iid", ratios=(1, 2, 1)))

    assert [len(p) for p in parts] == [50, 100, 50]


def test_stratified_with_too_few_examples_of_a_class_names_the_class() -> None:
    # Prepare: 'Sandal' has 2 examples for 3 shards.
    labels = make_labels([9, 2, 9])
    class_names = ("Coat", "Sandal", "Bag")

    # Execute / Assert
    with pytest.raises(MicrofedError, match=r"'Sandal' has 2 training examples") as info:
        assign_shards(labels, class_names, SplitConfig(val_fraction=0.0, workers=3))
    assert "workers" in str(info.value)


def test_dirichlet_with_small_alpha_gives_skewed_non_empty_shards() -> None:
    # Prepare: balanced 10 classes; a stratified shard has every class at a 0.1 share.
    labels = make_labels([100] * 10)

    # Execute
    skewed = assign_shards(labels, names(10), SplitConfig(val_fraction=0.0, workers=5, split="dirichlet", alpha=0.1))
    even = assign_shards(labels, names(10), SplitConfig(val_fraction=0.0, workers=5))

    # Assert
    def largest_share(part: torch.Tensor) -> float:
        return max(histogram(labels[part], 10)) / len(part)

    assert all(len(p) > 0 for p in skewed)
    assert max(largest_share(p) for p in skewed) > 0.5
    assert max(largest_share(p) for p in even) == pytest.approx(0.1)


def test_a_label_outside_the_class_names_is_not_dropped_silently() -> None:
    # Prepare: label 5 (and -1) index no class of ("a", "b"); the design says nothing is dropped silently.
    labels = torch.tensor([0, 1, 0, 1, 5, 0, 1, -1, 0, 1])

    for split in SPLITS:
        config = SplitConfig(val_fraction=0.0, workers=2, split=split)
        # Execute: either a clear error, or every example assigned.
        try:
            parts = assign_shards(labels, ("a", "b"), config)
        except MicrofedError:
            continue
        # Assert
        assert_partition(parts, len(labels))


# ------------------------------------------------------------------------------------- SplitConfig


def test_split_config_rejects_an_unknown_split_and_lists_the_allowed_ones() -> None:
    with pytest.raises(MicrofedError, match=r"'random'") as info:
        SplitConfig(val_fraction=0.0, workers=2, split="random")
    for allowed in ("stratified", "iid", "dirichlet"):
        assert allowed in str(info.value)


@pytest.mark.parametrize("bad", [0, -1])
def test_split_config_rejects_fewer_than_one_shard(bad: int) -> None:
    with pytest.raises(MicrofedError, match=rf"workers must be an integer from 1 to 99,999, got {bad}"):
        SplitConfig(val_fraction=0.0, workers=bad)


@pytest.mark.parametrize("ratios", [(1.0,), (1.0, 2.0, 3.0)])
def test_split_config_rejects_ratios_of_the_wrong_length(ratios: tuple[float, ...]) -> None:
    with pytest.raises(MicrofedError, match=rf"ratios has {len(ratios)} values but there are 2 workers"):
        SplitConfig(val_fraction=0.0, workers=2, ratios=ratios)


@pytest.mark.parametrize("ratios", [(1.0, 0.0), (1.0, -1.0), (1.0, math.nan)])
def test_split_config_rejects_non_positive_ratios(ratios: tuple[float, ...]) -> None:
    with pytest.raises(MicrofedError, match="ratios must be positive"):
        SplitConfig(val_fraction=0.0, workers=2, ratios=ratios)


def test_split_config_rejects_ratios_for_dirichlet() -> None:
    with pytest.raises(MicrofedError, match="not dirichlet"):
        SplitConfig(val_fraction=0.0, workers=2, split="dirichlet", ratios=(1.0, 1.0))


@pytest.mark.parametrize("alpha", [0.0, -0.5, math.nan, math.inf])
def test_split_config_rejects_a_non_positive_alpha(alpha: float) -> None:
    with pytest.raises(MicrofedError, match="alpha must be a finite number greater than 0"):
        SplitConfig(val_fraction=0.0, workers=2, split="dirichlet", alpha=alpha)


def test_split_config_is_frozen_and_keyword_only() -> None:
    config: Any = SplitConfig(val_fraction=0.0, workers=2)  # Any: these misuses are the point of the test
    with pytest.raises(AttributeError):
        config.workers = 3
    with pytest.raises(TypeError):
        cast(Any, SplitConfig)(2)


# --------------------------------------------------------------------------- normalisation, subsample


def test_normalisation_stats_of_black_and_white_halves() -> None:
    # Prepare: half the pixels 0, half 255 -> mean 0.5, std 0.5 on the 0..1 scale.
    images = torch.zeros(4, 1, 2, 3, dtype=torch.uint8)
    images[2:] = 255

    # Execute
    mean, std = normalisation_stats(images)

    # Assert
    assert mean == pytest.approx([0.5], abs=1e-12)
    assert std == pytest.approx([0.5], abs=1e-12)


def test_normalisation_stats_are_per_channel_and_independent_of_the_chunk_size() -> None:
    # Prepare: channel 0 all 0, channel 1 all 255, channel 2 half 0 / half 51 (= 0.2).
    images = torch.zeros(6, 3, 2, 2, dtype=torch.uint8)
    images[:, 1] = 255
    images[:, 2, 0] = 51  # top row of every image

    # Execute
    mean, std = normalisation_stats(images)
    mean_chunked, std_chunked = normalisation_stats(images, chunk=4)

    # Assert
    assert mean == pytest.approx([0.0, 1.0, 0.1], abs=1e-12)
    assert std == pytest.approx([0.0, 0.0, 0.1], abs=1e-5)  # a constant channel's std is clamped just above 0
    assert mean_chunked == pytest.approx(mean, abs=1e-12)
    assert std_chunked == pytest.approx(std, abs=1e-12)


def test_subsample_keeps_class_proportions_and_the_limit() -> None:
    # Prepare: classes of 20 / 40 / 60 -> a 30-example subsample has 5 / 10 / 15.
    data = make_images(make_labels([20, 40, 60]))

    # Execute
    small = subsample(data, limit=30, seed=4)

    # Assert
    assert len(small.labels) == len(small.images) == 30
    assert small.labels.dtype == torch.int64 and small.images.dtype == torch.uint8
    assert histogram(small.labels, 3) == [5, 10, 15]
    assert small.class_names == data.class_names
    original = examples(data.images, data.labels)
    assert not examples(small.images, small.labels) - original  # a sub-multiset of the original
    again = subsample(data, limit=30, seed=4)
    assert torch.equal(again.images, small.images) and torch.equal(again.labels, small.labels)


@pytest.mark.parametrize("limit", [0, 120, 500])
def test_subsample_without_a_binding_limit_keeps_everything(limit: int) -> None:
    data = make_images(make_labels([20, 40, 60]))

    kept = subsample(data, limit=limit, seed=0)

    assert torch.equal(kept.images, data.images) and torch.equal(kept.labels, data.labels)


# ------------------------------------------------------------------------------------- files on disk


@pytest.fixture
def dataset() -> LoadedDataset:
    """3 classes (30 train examples: 8 / 10 / 12), RGB 4x5 images, and a 6-example test set."""
    train = make_images(make_labels([8, 10, 12]), channels=3)
    test_labels = torch.tensor([0, 1, 2, 2, 1, 0])
    test = ImageData(
        images=torch.full((6, 3, 4, 5), 200, dtype=torch.uint8),  # different statistics from train
        labels=test_labels,
        class_names=train.class_names,
    )
    return LoadedDataset(name="synthetic", train=train, test=test)


def written(dataset: LoadedDataset, out: Path, workers: int = 3) -> dict[str, object]:
    return write_shards(dataset, out, SplitConfig(val_fraction=0.0, workers=workers, seed=7))


def test_shards_round_trip_to_the_training_set(dataset: LoadedDataset, tmp_path: Path) -> None:
    # Prepare / Execute
    written(dataset, tmp_path)
    shards = [load_shard(tmp_path, i) for i in range(3)]
    test = load_test_set(tmp_path)

    # Assert: the union of the shards is the training set, example for example.
    for shard in shards:
        assert shard.images.dtype == torch.uint8 and shard.labels.dtype == torch.int64
        assert shard.images.shape[1:] == (3, 4, 5)
    together = sum((examples(s.images, s.labels) for s in shards), Counter())
    assert together == examples(dataset.train.images, dataset.train.labels)
    assert torch.equal(test.images, dataset.test.images)
    assert torch.equal(test.labels, dataset.test.labels)


def test_shard_manifests_describe_their_shard(dataset: LoadedDataset, tmp_path: Path) -> None:
    # Prepare / Execute
    written(dataset, tmp_path)
    mean, std = normalisation_stats(dataset.train.images)

    for i in range(3):
        shard = load_shard(tmp_path, i)
        m = shard.manifest
        # Assert
        assert m["num_examples"] == shard.num_examples == len(shard.labels)
        assert m["class_histogram"] == histogram(shard.labels, 3)
        assert m["class_names"] == list(dataset.train.class_names)
        assert m["image_shape"] == [3, 4, 5]
        assert m["mean"] == pytest.approx(mean) and m["std"] == pytest.approx(std)  # training set only
        assert m["split"]["split"] == "stratified" and m["split"]["seed"] == 7
        data = (tmp_path / f"shard-{i:05d}.safetensors").read_bytes()
        assert m["sha256"] == hashlib.sha256(data).hexdigest()
    test = load_test_set(tmp_path).manifest
    assert test["num_examples"] == 6 and test["class_histogram"] == [2, 2, 2]
    assert test["mean"] == pytest.approx(mean)  # test images are normalised with training statistics


def test_dataset_manifest_lists_the_shards(dataset: LoadedDataset, tmp_path: Path) -> None:
    # Execute
    returned = written(dataset, tmp_path)
    summary = read_dataset_manifest(tmp_path)

    # Assert
    assert summary == returned
    assert summary == json.loads((tmp_path / "dataset.json").read_text())
    assert len(summary["shards"]) == 3
    assert sum(s["num_examples"] for s in summary["shards"]) == summary["num_train_examples"] == 30
    assert summary["num_test_examples"] == 6
    per_class = [sum(s["class_histogram"][c] for s in summary["shards"]) for c in range(3)]
    assert per_class == [8, 10, 12]
    for entry in summary["shards"]:
        assert (tmp_path / entry["file"]).is_file()


def test_writing_leaves_no_temporary_files(dataset: LoadedDataset, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "shards"  # created on demand

    written(dataset, out)

    files = sorted(p.name for p in out.iterdir())
    assert not [name for name in files if name.startswith(".")]
    expected = {f"shard-{i:05d}.{ext}" for i in range(3) for ext in ("json", "safetensors")}
    assert set(files) == expected | {"test.json", "test.safetensors", "dataset.json"}


def test_a_corrupted_shard_fails_its_checksum(dataset: LoadedDataset, tmp_path: Path) -> None:
    # Prepare: flip one bit of the last byte (pixel data) of shard 1.
    written(dataset, tmp_path)
    path = tmp_path / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    # Execute / Assert
    with pytest.raises(MicrofedError, match="checksum") as info:
        load_shard(tmp_path, 1)
    assert "shard-00001.safetensors" in str(info.value)
    load_shard(tmp_path, 0)  # the others still load


def test_a_corrupted_test_set_fails_its_checksum(dataset: LoadedDataset, tmp_path: Path) -> None:
    written(dataset, tmp_path)
    path = tmp_path / "test.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(MicrofedError, match="checksum"):
        load_test_set(tmp_path)


@pytest.mark.parametrize("rank", [3, 4, -1])
def test_loading_a_shard_that_does_not_exist_names_rank(dataset: LoadedDataset, tmp_path: Path, rank: int) -> None:
    written(dataset, tmp_path)

    with pytest.raises(MicrofedError, match=rf"RANK must be 0\.\.2, got {rank}"):
        load_shard(tmp_path, rank)


def test_loading_from_a_folder_without_shards_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(MicrofedError, match=r"dataset\.json"):
        load_shard(tmp_path, 0)
