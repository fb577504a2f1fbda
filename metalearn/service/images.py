"""Images from clients -> the 28x28 arrays the network sees (ink = 1), with size limits.

A PNG data URL goes through :func:`metalearn.omniglot.decode_ink`, the function that packs
Omniglot, so a drawing is preprocessed exactly like the training data. A nested list must
already be such an array.
"""

from __future__ import annotations

import base64
import binascii
import math

import numpy as np

from metalearn.errors import UserError
from metalearn.omniglot import IMAGE_SIZE, ImageTooLarge, decode_ink
from metalearn.service.errors import invalid, too_large

PNG_PREFIX = "data:image/png;base64,"


def decode_image(image: object, field: str, max_bytes: int, max_side: int) -> np.ndarray:
    """A PNG data URL or a 28x28 nested list -> float32 [28, 28] in [0, 1]."""
    if isinstance(image, str):
        return _from_data_url(image, field, max_bytes, max_side)
    if isinstance(image, list):
        return _from_list(image, field)
    raise invalid("an image is a PNG data URL or a 28x28 list of numbers in [0, 1]", field)


def _from_data_url(text: str, field: str, max_bytes: int, max_side: int) -> np.ndarray:
    if not text.startswith(PNG_PREFIX):
        raise invalid(f"an image string must start with {PNG_PREFIX!r}", field)
    payload = text[len(PNG_PREFIX) :]
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise too_large(f"image larger than {max_bytes} bytes", field)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("image data URL is not valid base64", field) from None
    try:
        return decode_ink(data, "image", max_side=max_side)
    except ImageTooLarge as error:
        raise too_large(str(error), field) from None
    except UserError as error:
        raise invalid(str(error), field) from None


def _from_list(rows: list, field: str) -> np.ndarray:
    shape_ok = len(rows) == IMAGE_SIZE and all(
        isinstance(row, list) and len(row) == IMAGE_SIZE for row in rows
    )
    if not shape_ok:
        raise invalid(f"an image list must be {IMAGE_SIZE} rows of {IMAGE_SIZE} numbers", field)
    values = [v for row in rows for v in row]
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise invalid("image values must be finite numbers", field)
    array = np.asarray(values, dtype=np.float32).reshape(IMAGE_SIZE, IMAGE_SIZE)
    if array.min() < 0.0 or array.max() > 1.0:
        raise invalid("image values must lie in [0, 1] (ink = 1, background = 0)", field)
    return array
