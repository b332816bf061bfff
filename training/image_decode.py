"""Image decoding shared by the split step (datasets) and `predict`: one Pillow image to uint8 (C, H, W).

Training data and the images a model later classifies must be decoded the same way, or the model sees pixels
at prediction time unlike those it learned from: any Pillow mode becomes 'L' (one channel) or 'RGB' (three),
alpha is dropped, 16-bit values are scaled (not clipped) to 8 bits, and the image is resized bilinearly.

This module must not import torch: `predict` runs on devices that install only onnxruntime, numpy and Pillow
(a test blocks torch there). The limits on hostile images (pixels, pixels per byte) are checked by the dataset
reader (upload_reader.py), which knows the `DatasetLimits`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError, features

__all__ = [
    "DECODE_ERRORS",
    "GRAY_MODES",
    "IMAGE_SUFFIXES",
    "SIXTEEN_BIT_MODES",
    "decode_chw",
    "decode_reason",
    "to_mode",
]

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# Formats every Pillow build reads, plus those that depend on optional libraries when present.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"} | ({".webp"} if features.check("webp") else set()))
DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError)
"""What Pillow raises for a file that is not an image, is truncated or damaged, or declares too many pixels."""


def decode_reason(exc: Exception) -> str:
    """Why an image could not be decoded, for a message that names the file."""
    # Pillow's UnidentifiedImageError text shows a BytesIO repr, which tells the user nothing.
    return "not an image format Pillow can read" if isinstance(exc, UnidentifiedImageError) else str(exc)


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to 'L' (channels=1) or 'RGB' (channels=3); alpha is dropped."""
    if image.mode in SIXTEEN_BIT_MODES:
        # Pillow's convert('L') clips 16-bit values at 255 instead of scaling them; scale by hand.
        wide = np.clip(np.asarray(image, dtype=np.int32), 0, 65535)  # 255 * 65535 fits; 4 bytes a pixel, not 8
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the direct P -> RGB conversion warns about the transparency
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)  # convert() would copy anyway


def decode_chw(image: Image.Image, channels: int, size: tuple[int, int]) -> np.ndarray:
    """The image's pixels as uint8 (C, H, W): converted by `to_mode`, resized bilinearly to size (height, width)
    unless it already has it. Raises one of DECODE_ERRORS when the pixel data cannot be decoded."""
    height, width = size
    pixels = to_mode(image, channels)
    if pixels.size != (width, height):
        pixels = pixels.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(pixels, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)
