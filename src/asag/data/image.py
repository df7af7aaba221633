"""The one image reader of every command: training, evaluation, prediction, drawing and the Python API.

Any file Pillow decodes becomes an 8-bit RGB image with its EXIF orientation applied:

* ``1`` (bilevel): 0 / 255 in all three channels; ``L``: the gray value in all three channels;
* ``LA``, ``PA``, ``RGBA``: the alpha channel is dropped (colours kept, not blended);
* ``P`` (palette): the palette colours, transparency applied before the alpha is dropped;
* ``I;16*`` and ``I`` (16-bit grayscale, e.g. 16-bit PNG): scaled from ``[0, 65535]`` to ``[0, 255]``,
  ``round(v * 255 / 65535)`` (values outside the range are clipped); Pillow's own conversion would clip
  at 255 and turn almost every pixel white;
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` and the rest: Pillow's conversion to RGB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps
import PIL.PngImagePlugin

from asag.errors import DataError

# Full scale of 16-bit samples.
UINT16_MAX = 65535
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("P", "PA", "LA", "RGBA")
# EXIF orientation tag and its values that swap width and height (rotations by 90 degrees, transposes).
EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any Pillow image -> a new 8-bit RGB image (module docstring for each mode)."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64).clip(0, UINT16_MAX)  # [H, W]
        scaled = (values * (255.0 / UINT16_MAX)).round().astype(np.uint8)
        return PIL.Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES:
        image = image.convert("RGBA")  # palette transparency first, then the alpha is dropped below
    return image.convert("RGB")


def open_image(path: str | os.PathLike, *, exif: bool = True) -> tuple[PIL.Image.Image, tuple[int, int]]:
    """Decode ``path`` as RGB: ``(image, stored_size)``.

    ``image`` has its EXIF orientation applied when ``exif`` (the default); ``stored_size`` is the
    ``(width, height)`` of the pixels as stored, before any rotation. Unreadable or missing files raise
    :class:`asag.errors.DataError` naming the file.
    """
    try:
        with PIL.Image.open(path) as raw:
            raw.load()
            stored_size = raw.size
            oriented = PIL.ImageOps.exif_transpose(raw) if exif else raw
            return to_rgb(oriented), stored_size  # a new image, valid after the file is closed
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image file") from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


@dataclass(frozen=True)
class ImageHeader:
    """Sizes of an image file, ``(width, height)`` in pixels: ``stored`` as the pixels are stored,
    ``oriented`` after the EXIF orientation (as :func:`open_image` returns the image by default)."""

    stored: tuple[int, int]
    oriented: tuple[int, int]


def _orientation(image: PIL.Image.Image) -> int:
    """The EXIF orientation (1: none) known from the file's header, without decoding the pixels (a PNG's
    ``eXIf`` chunk after the pixel data would need decoding them, and is ignored)."""
    if isinstance(image, PIL.PngImagePlugin.PngImageFile) and "exif" not in image.info:
        return 1
    return int(image.getexif().get(EXIF_ORIENTATION, 1))


def read_image_header(path: str | os.PathLike) -> ImageHeader:
    """The sizes of image ``path`` read from its header only (no pixel decoding). Missing or unreadable
    files raise :class:`asag.errors.DataError` naming the file."""
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
            transposed = _orientation(image) in _TRANSPOSING_ORIENTATIONS
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image file") from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    return ImageHeader((width, height), (height, width) if transposed else (width, height))
