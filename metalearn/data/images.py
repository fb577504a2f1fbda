"""The one preprocessing of every image a network sees: packing, evaluation and the playground.

:func:`preprocess` turns an image file of any size and mode into ``uint8 [channels, size, size]``:

1. Pillow opens it; EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`), so a
   phone photo stored sideways is seen upright. A JPEG is decoded at the smallest of 1/1, 1/2,
   1/4, 1/8 scale that still covers ``size`` (``Image.draft``): several times faster on large
   photos, and the LANCZOS filter below does the final resampling.
2. Transparency (RGBA, LA, palette with a transparent colour) is composited onto white.
3. 16-bit grayscale (``I;16``, ``I``) is scaled to 8 bits (v / 257); Pillow's own conversion
   would clip everything above 255 to white. Then the mode becomes ``RGB`` (3 channels) or ``L``
   (1 channel, ITU-R 601-2 luma) with Pillow's converters (CMYK, palette, grayscale, ...).
4. The centred square of side min(width, height) is resized to ``size`` x ``size`` with
   LANCZOS (the same as resizing the shorter side to ``size`` and cropping the centre), so
   images are never stretched.

What the network sees is a float32 view of these bytes, chosen per dataset:

* image folders: :func:`to_float`, v / 255 (natural images: black = 0);
* Omniglot: ink = 1 - v / 255 (:func:`metalearn.data.omniglot.decode_ink`), the paper's convention,
  kept so that numbers stay comparable with the paper and a convolution's zero padding equals the
  white background of a drawing.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from metalearn.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
"""File types read from image folders (case-insensitive)."""
CHANNELS = {1: "L", 3: "RGB"}
RESIZE_FILTER = "LANCZOS"
MAX_SIZE = 512
"""Largest output side: a few-shot network on bigger inputs would not fit in memory anyway."""
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageTooLarge(UserError):
    """An image above the size a caller accepts (refused before its pixels are decoded)."""


def check_shape(size: int, channels: int) -> None:
    """``channels`` 1 or 3 and a ``size`` from 4 to :data:`MAX_SIZE`, in one line if not."""
    if channels not in CHANNELS:
        raise UserError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if not 4 <= size <= MAX_SIZE:
        raise UserError(f"--size must be between 4 and {MAX_SIZE} pixels, got {size}")


def preprocess(
    source: bytes | str | os.PathLike[str] | Image.Image,
    size: int,
    channels: int,
    name: str = "image",
    max_side: int | None = None,
    exact_side: int | None = None,
) -> np.ndarray:
    """An image (file bytes, a path or a PIL image) -> ``uint8 [channels, size, size]``.

    See the module docstring for the steps. ``max_side`` bounds the stored image's sides and
    ``exact_side`` demands a square of that side; both are checked before any pixel is decoded.
    Anything Pillow cannot decode raises :class:`UserError` naming ``name``; a decompression
    bomb (more pixels than Pillow's limit) or a side above ``max_side`` raises
    :class:`ImageTooLarge`, before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(source)
            with image:
                _check_side(image, name, max_side, exact_side)
                if image.format == "JPEG":
                    image.draft(image.mode, (size, size))
                image.load()
                converted = _to_mode(ImageOps.exif_transpose(image), CHANNELS[channels])
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(f"{name} is too large to decode ({error})") from None
    except Exception as error:  # Pillow raises many types for broken files; all mean unreadable.
        raise UserError(f"cannot decode {name}: {error}") from None
    width, height = converted.size
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    small = converted.resize((size, size), getattr(Image.Resampling, RESIZE_FILTER), box=box)
    pixels = np.asarray(small, dtype=np.uint8)
    return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (v / 255): what networks see of an image-folder set."""
    return pixels.astype(np.float32) / np.float32(255.0)


def _open(source: bytes | str | os.PathLike[str] | Image.Image) -> Image.Image:
    if isinstance(source, Image.Image):
        return source.copy()
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    return Image.open(Path(source))


def _check_side(
    image: Image.Image, name: str, max_side: int | None, exact_side: int | None
) -> None:
    width, height = image.size
    if exact_side is not None and (width, height) != (exact_side, exact_side):
        raise UserError(
            f"{name} is {width}x{height}, expected {exact_side}x{exact_side} (original)"
        )
    if max_side is not None and max(width, height) > max_side:
        raise ImageTooLarge(f"{name} is {width}x{height}, larger than {max_side}x{max_side}")


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Composite transparency onto white, scale 16-bit grayscale to 8 bits, convert to ``mode``."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    return on_white(image).convert(mode)


def on_white(image: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white; others are returned unchanged.

    A browser canvas is transparent where nothing was drawn, a PNG icon around its subject.
    """
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
