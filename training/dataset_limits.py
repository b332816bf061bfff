"""Limits on the image zips, folders and CSVs users upload, which are read as hostile input.

`DatasetLimits` bounds what such a source may hold: file count, path depth, what a zip expands to and each
entry's compression ratio, the size of each image file and of a CSV, each image's pixels and pixels per byte of
file, all images' pixels together, and the decoded tensors. Each limit is checked on declared sizes and image
headers before the bytes or pixels it bounds are read or decoded (upload_listing.py, upload_reader.py,
csv_dataset.py), and a refusal names the file, what it holds and the limit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from microfed.training.errors import MicrofedError

__all__ = [
    "COMPRESSION_RATIO_MIN_BYTES",
    "DatasetLimits",
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
    "format_size",
]

# The defaults of `DatasetLimits`, one constant each so that the README's table can be checked against them
# (tests/test_hostile_inputs.py). Each is generous for real datasets (Fashion-MNIST or CIFAR as PNG files, a
# few hundred thousand ImageNet-like JPEGs) and strict for bombs. Figures measured on this project's 2-core
# machine (Pillow 12, the 70,000 Fashion-MNIST images saved as PNG):
#   pixels per byte of file: Fashion-MNIST PNGs 1.5 (median) to 4.9 (max); a 512x600 photo (matplotlib's sample
#   grace_hopper.jpg) 0.7 (PNG), 3.6-10 (JPEG q90-q50), 6.8 (lossy WebP); the photo upscaled to 2048x2400: 14
#   (JPEG), 28 (WebP); noise 0.3 (PNG);
#   one-colour images 0.1-1.7 at 8x8, 20-90 at 64x64, 35-1,100 at 224x224 (JPEG lowest, lossless WebP highest);
#   a synthetic scanned page (2550x3300, text lines on white) 13 (JPEG), 170 (PNG), 310 (1-bit PNG). The
#   decompression bomb of issue 14, a one-colour 9400x9400 lossless WebP of 3,436 bytes: 25,716.
#   decode speed on one core: 183 megapixels/s (JPEG), 128 megapixels/s (lossless WebP).

MAX_FILES = 1_000_000
"""Default of `DatasetLimits.max_files`: entries of a zip, files and folders of a folder, rows of a CSV. Room for
a few hundred thousand images with their folders (Fashion-MNIST has 70,000, CIFAR-10 60,000); the listing of a
million entries takes a few hundred MB of memory."""

MAX_DEPTH = 32
"""Default of `DatasetLimits.max_depth`: path components of an entry (`pets/train/cat/0.png` has 4). The layout
needs 4; images may sit in sub-folders of their class folder, as ImageFolder allows, and 32 leaves room for
any real tree while refusing the 10,000-level paths that only exist to exhaust a walker."""

MAX_TOTAL_BYTES = 4 * 1024**3
"""Default of `DatasetLimits.max_total_bytes` (4 GiB): what a zip expands to. Twenty times the 200 MB the
platform we replace accepted per upload; zips of PNG or JPEG files barely compress, so an honest upload expands
to little more than its own size."""

MAX_COMPRESSION_RATIO = 100.0
"""Default of `DatasetLimits.max_compression_ratio`: how many times a zip entry may expand. PNG and JPEG files
shrink by a few percent in a zip; a zip bomb's entries expand about 1000 times."""

COMPRESSION_RATIO_MIN_BYTES = 1 << 20
"""Zip entries up to this size (1 MiB) are not held to the compression ratio: a small file of flat colour
compresses well and harms no one, and the total (`max_total_bytes`) bounds what many of them expand to."""

MAX_FILE_BYTES = 256 * 1024**2
"""Default of `DatasetLimits.max_file_bytes` (256 MiB): one image file, in a folder, a zip or a bucket, checked
before it is read. An image within the pixel limit needs at most this much even uncompressed (89,478,485
pixels x 3 bytes of RGB is 2^28 - 1 bytes); real photos are a few MiB. A larger file is not an image worth
reading (issue 14: a sparse 3 GB ".png" took 3.7 GB of memory)."""

MAX_CSV_BYTES = 256 * 1024**2
"""Default of `DatasetLimits.max_csv_bytes` (256 MiB): a CSV listing images, checked before it is read. The
`max_files` rows at 268 bytes each (long gs:// paths and a few extra columns included)."""

MAX_IMAGE_PIXELS = 89_478_485
"""Default of `DatasetLimits.max_image_pixels`: width x height of one image, from its header. Pillow's own
default (a quarter gigabyte of RGB); a 12,000 x 7,400 panorama passes."""

MAX_PIXELS_PER_BYTE = 1024
"""Default of `DatasetLimits.max_pixels_per_byte`: an image's pixels per byte of its file, for every image.
Real images stay far below (Fashion-MNIST PNGs at most 4.9, photos under 30, scanned pages up to about 300;
see the figures above); images of one flat colour reach it from about 210x210 as lossless WebP and 2000x2000 as
GIF, and not even at the pixel limit as PNG (815 at 9000x9000), JPEG (64) or lossy WebP (561). Decompression
bombs are far above (25,716 for issue 14's WebP). So a hostile upload buys at most 1024 decoded pixels with each
byte it sends."""

MAX_TOTAL_PIXELS = 100_000_000_000
"""Default of `DatasetLimits.max_total_pixels`: the pixels of all images together (train and test), summed from
their headers before any is decoded: the decoding work of the split step, each pixel being decoded once (about
10 minutes on one core at the speeds above). Holds 500,000 photos of 0.2 megapixels (ImageNet's average is
about 0.18) before resizing; a hostile upload needs about 100 MB of image files to reach it (see
`MAX_PIXELS_PER_BYTE`), no less than an honest dataset of the same cost."""

MAX_DECODED_BYTES = 4 * 1024**3
"""Default of `DatasetLimits.max_decoded_bytes` (4 GiB): the decoded uint8 tensors (N x C x H x W, train and
test, after resizing) that the split step holds in memory and writes as shards. Fashion-MNIST needs 55 MB,
CIFAR-10 184 MB, 300,000 RGB images at 64x64 3.7 GB."""


@dataclass(frozen=True, kw_only=True)
class DatasetLimits:
    """Limits on an image zip, folder or CSV, which come from users and are read as hostile input.

    Every limit is checked on what headers, the file system or the bucket declare, before the bytes or pixels
    it bounds are read or decoded, and a refusal names the file, what it holds and the limit. The defaults are
    the MAX_* constants of this module (each says why its value). Named datasets (our own parsers over known
    files) are not subject to them.
    """

    max_files: int = MAX_FILES
    """Entries of a zip, files and folders of a folder, rows of a CSV."""
    max_depth: int = MAX_DEPTH
    """Path components of a zip entry or of a file or folder under a dataset folder."""
    max_total_bytes: int = MAX_TOTAL_BYTES
    """Zip archives: the sum of the entries' uncompressed sizes, i.e. what the archive expands to."""
    max_compression_ratio: float = MAX_COMPRESSION_RATIO
    """Zip archives: uncompressed over compressed size of any entry larger than COMPRESSION_RATIO_MIN_BYTES."""
    max_file_bytes: int = MAX_FILE_BYTES
    """Size of one image file (a file of a folder, a zip entry, an image a CSV lists)."""
    max_csv_bytes: int = MAX_CSV_BYTES
    """Size of a CSV file."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Width x height of one image, read from its header before any pixel is decoded."""
    max_pixels_per_byte: float = MAX_PIXELS_PER_BYTE
    """Width x height of one image over the size of its file: how much decoding each byte of input may cost."""
    max_total_pixels: int = MAX_TOTAL_PIXELS
    """Width x height summed over all images, train and test, before resizing: the split step's decoding work."""
    max_decoded_bytes: int = MAX_DECODED_BYTES
    """The decoded uint8 tensors (N x C x H x W, train and test together) the split step holds in memory."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and value > 0):
                raise MicrofedError(f"DatasetLimits.{field.name} must be a positive number, got {value!r}")


def format_size(n: float) -> str:
    """A byte count for a message: '512 bytes', '1.5 KiB', ... up to GiB."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
