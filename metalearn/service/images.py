"""Images from clients -> the arrays a run's network sees, with size limits.

* Omniglot runs (drawings): a PNG data URL goes through :func:`metalearn.data.omniglot.decode_ink`,
  the function that packs Omniglot, so a drawing is preprocessed exactly like the training data;
  a nested list must already be such a 28x28 array (ink = 1).
* Image-folder runs (uploads): a PNG or JPEG data URL goes through
  :func:`metalearn.data.images.preprocess` with the set's size and channels, the function that packed
  the set, then v / 255 as in training.

Both refuse an image whose stored sides exceed a bound before any pixel is decoded (413), so a
small file that would decompress to gigabytes (a decompression bomb) is never decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re

import numpy as np
from PIL import Image

from metalearn.data import images
from metalearn.data.omniglot import IMAGE_SIZE, decode_ink
from metalearn.errors import UserError
from metalearn.service.errors import invalid, too_large

DATA_URL = re.compile(r"data:image/(png|jpeg);base64,")
DATA_URL_HINT = "'data:image/png;base64,' or 'data:image/jpeg;base64,'"


def decode_image(image: object, field: str, max_bytes: int, max_side: int) -> np.ndarray:
    """A drawing: PNG/JPEG data URL or a 28x28 nested list -> float32 [28, 28] in [0, 1]."""
    if isinstance(image, str):
        data = data_url_bytes(image, field, max_bytes)
        return _decoded(lambda: decode_ink(data, "image", max_side=max_side), field)
    if isinstance(image, list):
        return _from_list(image, field)
    raise invalid("an image is a PNG data URL or a 28x28 list of numbers in [0, 1]", field)


def decode_upload(
    image: object, field: str, size: int, channels: int, max_bytes: int, max_side: int
) -> np.ndarray:
    """An uploaded file as a data URL -> uint8 [channels, size, size], as make_data packs it."""
    if not isinstance(image, str):
        raise invalid(f"this run takes uploaded images: a data URL starting {DATA_URL_HINT}", field)
    data = data_url_bytes(image, field, max_bytes)
    return _decoded(
        lambda: images.preprocess(data, size, channels, "image", max_side=max_side), field
    )


def data_url_bytes(text: str, field: str, max_bytes: int) -> bytes:
    """The file inside a base64 PNG/JPEG data URL, refusing more than ``max_bytes`` (413)."""
    prefix = DATA_URL.match(text)
    if prefix is None:
        raise invalid(f"an image string must start with {DATA_URL_HINT}", field)
    payload = text[prefix.end() :]
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise too_large(f"image larger than {max_bytes} bytes", field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("image data URL is not valid base64", field) from None


def png_data_url(pixels: np.ndarray) -> str:
    """uint8 [channels, H, W] -> a PNG data URL (lossless: preprocessing it again is identity)."""
    array = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _decoded(decode, field: str) -> np.ndarray:
    try:
        return decode()
    except images.ImageTooLarge as error:
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
