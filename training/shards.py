"""Split a decoded dataset into one shard per worker, and read shards back.

A *shard* is the part of the training set one worker trains on: uint8 images (N, C, H, W) and int64 labels
in safetensors, plus a JSON manifest (n_k = `num_examples`, class names and histogram, image shape, the
normalisation statistics of the whole training set, the split and its seed, the number of image files the
loader skipped as unreadable (`num_skipped_files`; dataset.json names them), and a checksum of the tensors
file). Every training example lands in exactly one shard. The test set is written once, beside the shards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from microfed.training.config import SPLITS, LoopConfig, SplitSection
from microfed.training.config_checks import parse_ratios
from microfed.training.datasets import ImageData, LoadedDataset
from microfed.training.errors import MicrofedError
from microfed.training.io import read_safetensors, sha256_bytes, sha256_file
from microfed.training.io import write_safetensors as _write_st
from microfed.training.layout import (
    TEST_FILES,
    VAL_FILES,
    DatasetInfo,
    DatasetManifest,
    PartFiles,
    PartManifest,
    ShardEntry,
    SkippedFile,
    read_dataset_manifest,
    read_part_manifest,
    shard_files,
    write_dataset_manifest,
    write_part_manifest,
)

__all__ = [
    "SPLITS",
    "Shard",
    "SplitConfig",
    "assign_shards",
    "load_shard",
    "load_test_set",
    "normalisation_stats",
    "parse_ratios",
    "read_dataset_manifest",
    "subsample",
    "write_shards",
]

# A Dirichlet draw can leave a shard empty; redraw this many times before giving up.
_DIRICHLET_TRIES = 100
# dataset.json lists at most this many skipped files by name (num_skipped_files counts all of them).
_MAX_SKIPPED_LISTED = 1000


# Defaults shared with the pipeline come from RunConfig's sections (training/config.py).
_SPLIT, _LOOP = SplitSection(), LoopConfig()


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """How training examples are divided among workers."""

    workers: int
    """Number of shards, one per worker (the PyTorchJob's WORLD_SIZE)."""
    split: str = _SPLIT.split
    """`stratified`: every shard gets the class proportions of the whole; `iid`: a uniform random split;
    `dirichlet`: per-class shard proportions drawn from Dirichlet(alpha), i.e. label skew."""
    ratios: tuple[float, ...] | None = None
    """Relative shard sizes for `stratified` and `iid` (normalised); None means equal sizes."""
    alpha: float = _SPLIT.alpha
    """Dirichlet concentration: small values give very skewed shards (0.1), large ones near-IID (100)."""
    seed: int = _LOOP.seed
    """Seed of the split; the same seed and data give the same shards."""
    val_fraction: float = _SPLIT.val_fraction
    """Share of the training examples held out (stratified, before sharding) as the validation split that
    selects the best round; 0 = none."""

    def __post_init__(self) -> None:
        # the ranges and rules of RunConfig's split section (training/config.py), whose field this is
        ratios = "" if self.ratios is None else ",".join(repr(float(r)) for r in self.ratios)
        SplitSection(
            workers=self.workers,
            split=self.split,
            split_ratios=ratios,
            alpha=self.alpha,
            val_fraction=self.val_fraction,
        )


@dataclass(frozen=True)
class Shard:
    """One shard (or the test set) read back from disk."""

    images: torch.Tensor
    labels: torch.Tensor
    manifest: PartManifest | None = None

    @property
    def num_examples(self) -> int:
        return int(self.labels.numel())


def _largest_remainder(total: int, ratios: Sequence[float]) -> list[int]:
    """Integer counts summing to `total`, proportional to `ratios` (Hamilton's method)."""
    s = float(sum(ratios))
    exact = [total * r / s for r in ratios]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(ratios)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def assign_shards(labels: torch.Tensor, class_names: Sequence[str], config: SplitConfig) -> list[torch.Tensor]:
    """Indices of the examples in each shard: a partition of range(len(labels)), deterministic for a seed.

    Pure function of the labels and the config; the order inside a shard is shuffled.
    """
    rng = np.random.default_rng(config.seed)
    y = labels.numpy()
    if y.size and (y.min() < 0 or y.max() >= len(class_names)):
        bad = sorted({int(v) for v in y if not 0 <= v < len(class_names)})[:5]
        raise MicrofedError(f"labels {bad} are outside the {len(class_names)} class names; no example may be dropped")
    k = config.workers
    ratios = list(config.ratios) if config.ratios else [1.0] * k
    if config.split == "iid":
        perm = rng.permutation(len(y))
        bounds = np.cumsum([0, *_largest_remainder(len(y), ratios)])
        parts = [perm[bounds[i] : bounds[i + 1]] for i in range(k)]
    elif config.split == "stratified":
        by_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(len(class_names))]
        counts = _stratified_counts([len(idx) for idx in by_class], ratios)
        for name, idx, cls_counts in zip(class_names, by_class, counts, strict=True):
            if min(cls_counts) == 0:
                raise MicrofedError(
                    f"class {name!r} has {len(idx)} training examples, too few to give each of the {k} "
                    "shards one under the stratified split",
                    hint="use fewer workers, more equal --split-ratios, or --split iid",
                )
        parts = _take(by_class, counts, k)
    else:
        by_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(len(class_names))]
        counts = _dirichlet_counts([len(idx) for idx in by_class], k, config.alpha, rng)
        parts = _take(by_class, counts, k)
    out = [torch.from_numpy(rng.permutation(p).astype(np.int64)) for p in parts]
    for i, p in enumerate(out):
        if p.numel() == 0:
            raise MicrofedError(
                f"shard {i} would be empty ({len(y)} examples for {k} workers)", hint="use fewer workers"
            )
    return out


def _take(by_class: Sequence[np.ndarray], counts: Sequence[Sequence[int]], k: int) -> list[np.ndarray]:
    """Cut each class's shuffled indices into consecutive runs of the given per-shard counts."""
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for idx, cls_counts in zip(by_class, counts, strict=True):
        bounds = np.cumsum([0, *cls_counts])
        for i in range(k):
            parts[i].append(idx[bounds[i] : bounds[i + 1]])
    return [np.concatenate(p) for p in parts]


def _stratified_counts(class_sizes: Sequence[int], ratios: Sequence[float]) -> list[list[int]]:
    """Per class and shard, n_c * r_k rounded down or up, the roundings chosen so shard totals stay on target.

    Each class gets its floors, then its leftover examples go to the shards furthest behind their running
    target (sum over classes so far of n_c * r_k), so totals end within one example of N * r_k.
    """
    total = float(sum(ratios))
    share = [r / total for r in ratios]
    k = len(ratios)
    running = [0.0] * k
    given = [0] * k
    out = []
    for n in class_sizes:
        exact = [n * s for s in share]
        counts = [math.floor(x) for x in exact]
        running = [a + b for a, b in zip(running, exact, strict=True)]
        behind = sorted(range(k), key=lambda i: (given[i] + counts[i] - running[i], i))
        for i in behind[: n - sum(counts)]:
            counts[i] += 1
        given = [a + b for a, b in zip(given, counts, strict=True)]
        out.append(counts)
    return out


def _dirichlet_counts(class_sizes: Sequence[int], k: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    for _ in range(_DIRICHLET_TRIES):
        counts = [_largest_remainder(n, rng.dirichlet([alpha] * k).tolist()) for n in class_sizes]
        if all(sum(c[i] for c in counts) > 0 for i in range(k)):
            return counts
    raise MicrofedError(
        f"dirichlet split with alpha={alpha} left a shard empty in {_DIRICHLET_TRIES} draws",
        hint="use a larger --alpha or fewer workers",
    )


def normalisation_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, on the 0..1 scale."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def _stratified_pick(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Sorted indices of `count` examples drawn per class in proportion to the class sizes."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    classes = np.unique(y)
    counts = _largest_remainder(count, [float((y == c).sum()) for c in classes])
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n] for c, n in zip(classes, counts, strict=True)])
    keep.sort()
    return torch.from_numpy(keep)


def subsample(data: ImageData, limit: int, seed: int) -> ImageData:
    """At most `limit` examples, keeping class proportions (for quick runs and tests); 0 means all."""
    if limit <= 0 or limit >= data.labels.numel():
        return data
    index = _stratified_pick(data.labels, limit, seed)
    # The files left out while decoding stay on record: subsampling does not make them readable.
    return ImageData(
        images=data.images[index], labels=data.labels[index], class_names=data.class_names, skipped=data.skipped
    )


def holdout(data: ImageData, fraction: float, seed: int) -> tuple[ImageData, ImageData | None]:
    """(the rest, the held-out part): `fraction` of the examples, class proportions kept, drawn with a stream
    of its own from `seed`; (data, None) when the fraction is 0."""
    if fraction <= 0:
        return data, None
    n = data.labels.numel()
    held = _stratified_pick(data.labels, max(1, round(fraction * n)), seed + 7919)
    rest = torch.ones(n, dtype=torch.bool)
    rest[held] = False
    return (
        ImageData(
            images=data.images[rest], labels=data.labels[rest], class_names=data.class_names, skipped=data.skipped
        ),
        ImageData(images=data.images[held], labels=data.labels[held], class_names=data.class_names, skipped=()),
    )


def _histogram(labels: torch.Tensor, num_classes: int) -> list[int]:
    return [int(v) for v in torch.bincount(labels, minlength=num_classes).tolist()]


def _write_part(
    out: Path, files: PartFiles, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, shard: int | None
) -> PartManifest:
    data = _write_st(out / files.tensors, {"images": images, "labels": labels})
    manifest: PartManifest = {
        **info,
        "shard": shard,
        "file": files.tensors,
        "num_examples": int(labels.numel()),
        "class_histogram": _histogram(labels, len(info["class_names"])),
        "sha256": sha256_bytes(data),
    }
    write_part_manifest(out / files.manifest, manifest)
    return manifest


def write_shards(dataset: LoadedDataset, out_dir: str | Path, config: SplitConfig) -> DatasetManifest:
    """Write `shard_files(i)` for each worker, TEST_FILES, VAL_FILES (when one is held out) and the dataset
    manifest (training/layout.py); return the latter."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = holdout(dataset.train, config.val_fraction, config.seed)
    mean, std = normalisation_stats(train.images)
    common: DatasetInfo = {
        "dataset": dataset.name,
        "class_names": list(train.class_names),
        "image_shape": list(train.images.shape[1:]),
        "mean": mean,
        "std": std,
        "split": {
            "split": config.split,
            "seed": config.seed,
            "alpha": config.alpha,
            "ratios": list(config.ratios) if config.ratios else None,
            "workers": config.workers,
            "val_fraction": config.val_fraction,
        },
        "num_skipped_files": len(train.skipped) + len(dataset.test.skipped),
    }
    shards: list[ShardEntry] = []
    for i, idx in enumerate(assign_shards(train.labels, train.class_names, config)):
        m = _write_part(out, shard_files(i), train.images[idx], train.labels[idx], common, i)
        shards.append(
            {
                "file": m["file"],
                "num_examples": m["num_examples"],
                "class_histogram": m["class_histogram"],
                "sha256": m["sha256"],
            }
        )
    test = _write_part(out, TEST_FILES, dataset.test.images, dataset.test.labels, common, None)
    num_val = 0
    if val is not None:
        num_val = _write_part(out, VAL_FILES, val.images, val.labels, common, None)["num_examples"]
    summary: DatasetManifest = {
        **common,
        "num_train_examples": int(train.labels.numel()),
        "num_val_examples": num_val,
        "num_test_examples": test["num_examples"],
        "shards": shards,
        "skipped_files": _skipped(dataset),
    }
    write_dataset_manifest(out, summary)
    return summary


def _skipped(dataset: LoadedDataset) -> list[SkippedFile]:
    """The image files the loader left out (bad_images='skip'), listed up to _MAX_SKIPPED_LISTED."""
    files: list[SkippedFile] = [
        {"split": split, "file": f.file, "reason": f.reason}
        for split, data in (("train", dataset.train), ("test", dataset.test))
        for f in data.skipped
    ]
    return files[:_MAX_SKIPPED_LISTED]


def _load_part(folder: Path, files: PartFiles) -> Shard:
    manifest = read_part_manifest(folder / files.manifest)
    st_path = folder / files.tensors
    if sha256_file(st_path) != manifest["sha256"]:
        raise MicrofedError(
            f"{st_path}: checksum does not match {files.manifest}",
            hint="the shard is corrupt or was changed; run the split step again",
        )
    tensors, _ = read_safetensors(st_path)
    return Shard(images=tensors["images"], labels=tensors["labels"], manifest=manifest)


def load_shard(shards_dir: str | Path, index: int) -> Shard:
    """Shard `index` (the worker's RANK), checksum verified."""
    summary = read_dataset_manifest(shards_dir)
    count = len(summary["shards"])
    if not 0 <= index < count:
        raise MicrofedError(
            f"{shards_dir}: there are {count} shards, so RANK must be 0..{count - 1}, got {index}",
            hint="start as many workers as the split step made shards",
        )
    return _load_part(Path(shards_dir), shard_files(index))


def load_test_set(shards_dir: str | Path) -> Shard:
    return _load_part(Path(shards_dir), TEST_FILES)


def load_val_set(shards_dir: str | Path) -> Shard | None:
    """The validation split, or None when the split step held none out."""
    folder = Path(shards_dir)
    return _load_part(folder, VAL_FILES) if (folder / VAL_FILES.manifest).exists() else None
