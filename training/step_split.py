"""The split step: dataset name / zip / folder -> shards folder (one shard per worker + test set).

A plain function over folders; the split_dataset component (components/steps.py) is one call into it. The source
may be a local path or a gs:// URI (staged in first); the shards are written locally and uploaded when the step
succeeds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from microfed.training.config import DataConfig
from microfed.training.datasets import LoadedDataset, load_dataset
from microfed.training.layout import DatasetManifest, write_dataset_manifest
from microfed.training.shards import SplitConfig, subsample, write_shards
from microfed.training.step_log import log, step
from microfed.training.storage import is_gcs, staged_file, staged_input, staged_output

__all__ = ["SplitOptions", "split_step"]


@dataclass(frozen=True, kw_only=True)
class SplitOptions:
    """What the split step reads besides the split itself."""

    source: str
    """Dataset name (fashion-mnist, mnist, cifar10), or a path to a zip or folder of class folders."""
    image_size: tuple[int, int] | None = None
    """Resize every image to (H, W); None keeps a common size (the most frequent one when sizes differ)."""
    data_dir: str | None = None
    """Where the named dataset's files are; None searches the default places."""
    train_limit: int = DataConfig().train_limit
    """Use at most this many training examples, class proportions kept (0 = all); for quick runs."""
    test_limit: int = DataConfig().test_limit
    """Use at most this many test examples (0 = all)."""
    bad_images: str = DataConfig().bad_images
    """`fail` on an image that cannot be decoded (the error names it), or `skip` it with a warning and a
    count in the manifest."""


@step("split")
def split_step(options: SplitOptions, split: SplitConfig, out_dir: str | Path) -> DatasetManifest:
    """Decode the dataset once and write the shards; returns the dataset manifest (with `seconds`)."""
    start = time.perf_counter()
    with _staged_source(options.source) as source, staged_output(out_dir) as out:
        data = load_dataset(
            source, data_dir=options.data_dir, image_size=options.image_size, bad_images=options.bad_images
        )
        train = subsample(data.train, options.train_limit, split.seed)
        test = subsample(data.test, options.test_limit, split.seed)
        summary = write_shards(LoadedDataset(name=data.name, train=train, test=test), out, split)
        summary["seconds"] = time.perf_counter() - start
        write_dataset_manifest(out, summary)
    log(
        f"split {data.name}: {summary['num_train_examples']} training examples into {split.workers} "
        f"{split.split} shards of {[s['num_examples'] for s in summary['shards']]}, "
        f"{summary['num_test_examples']} test examples ({summary['seconds']:.1f} s)"
    )
    return summary


@contextlib.contextmanager
def _staged_source(source: str) -> Iterator[str]:
    """A dataset name as is; a gs:// zip or folder downloaded first (the name of a zip is kept). A CSV (local or
    gs://) is passed as is: load_dataset reads it and the images it lists from wherever they are."""
    if not is_gcs(source) or source.strip().lower().endswith(".csv"):
        yield source
    elif source.rstrip("/").lower().endswith(".zip"):
        with staged_file(source) as path:
            yield str(path)
    else:
        with staged_input(source) as path:
            yield str(path)
