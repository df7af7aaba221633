"""The one image reader of every command: training, evaluation, prediction, drawing and the Python API.

Any file Pillow decodes becomes an 8-bit RGB image with its EXIF orientation applied:

* ``1`` (bilevel): 0 / 255 in all three channels; ``L``: the gray value in all three channels;
* ``LA``, ``PA``, ``RGBA``: the alpha channel is dropped (colours kept, not blended);
* ``P`` (palette): the palette colours, transparency applied before the alpha is dropped;
* ``I;16*`` and ``I`` (16-bit grayscale, e.g. 16-bit PNG): scaled from ``[0, 65535]`` to ``[0, 255]``,
  ``round(v * 255 / 65535)`` (values outside the range are clipped); Pillow's own conversion would clip
  at 255 and turn almost every pixel white;
* ``F`` (32-bit float grayscale, e.g. a float TIFF): intensities in ``[0, 1]``, scaled to ``round(v * 255)``
  (Pillow's own conversion would truncate them to 0 and 1: a black image). A float image with any value
  outside ``[0, 1]``, NaN or infinity is refused (:class:`~asag.errors.DataError` with the value range):
  its scale cannot be known, so it is not guessed. Float TIFFs Pillow cannot decode (float16, float64,
  float RGB) are refused as unreadable files;
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` and the rest: Pillow's conversion to RGB.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


def float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float intensities in ``[0, 1]`` (any shape) -> ``round(v * 255)`` as uint8; DataError (without a
    file name) when a value is outside ``[0, 1]``, NaN or infinite."""
    finite = np.isfinite(values)
    if not finite.all():
        raise DataError(f"float image with {int((~finite).sum())} NaN or infinite pixel value(s); "
                        f"a float image must hold intensities in [0, 1]")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise DataError(f"float image with pixel values in [{values.min():g}, {values.max():g}]; a float "
                        f"image must hold intensities in [0, 1] (save other ranges as 8- or 16-bit integers)")
    return (values.astype(np.float64) * 255.0).round().astype(np.uint8)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any Pillow image -> a new 8-bit RGB image (module docstring for each mode). DataError for a float
    image outside ``[0, 1]`` and for a mode Pillow cannot convert."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "F":
        gray = float_to_uint8(np.asarray(image, dtype=np.float32))  # [H, W]
        return PIL.Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64).clip(0, UINT16_MAX)  # [H, W]
        scaled = (values * (255.0 / UINT16_MAX)).round().astype(np.uint8)
        return PIL.Image.fromarray(scaled, mode="L").convert("RGB")
    try:
        if image.mode in _ALPHA_MODES:
            image = image.convert("RGBA")  # palette transparency first, then the alpha is dropped below
        return image.convert("RGB")
    except ValueError as err:  # a mode Pillow cannot convert (e.g. premultiplied "La")
        raise DataError(f"image mode {image.mode!r} cannot be converted to RGB ({err})") from None


def open_image(path: str | os.PathLike, *, exif: bool = True) -> tuple[PIL.Image.Image, tuple[int, int]]:
    """Decode ``path`` as RGB: ``(image, stored_size)``.

    ``image`` has its EXIF orientation applied when ``exif`` (the default); ``stored_size`` is the
    ``(width, height)`` of the pixels as stored, before any rotation. Unreadable or missing files, and
    pixel values :func:`to_rgb` refuses, raise :class:`asag.errors.DataError` naming the file.
    """
    with _reading(path), PIL.Image.open(path) as raw:
        raw.load()
        stored_size = raw.size
        oriented = PIL.ImageOps.exif_transpose(raw) if exif else raw
        return to_rgb(oriented), stored_size  # a new image, valid after the file is closed


@contextlib.contextmanager
def _reading(path: str | os.PathLike) -> Iterator[None]:
    """Errors of reading image ``path`` inside the block as one :class:`DataError` naming the file."""
    try:
        yield
    except DataError as err:  # pixel values to_rgb refuses
        raise DataError(f"{path}: {err}") from None
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
    with _reading(path), PIL.Image.open(path) as image:
        width, height = image.size
        transposed = _orientation(image) in _TRANSPOSING_ORIENTATIONS
    return ImageHeader((width, height), (height, width) if transposed else (width, height))
