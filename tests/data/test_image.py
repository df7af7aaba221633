"""The one image reader: every mode decodes to the same hand-computed RGB pixels in the training/evaluation
reader (``read_image``) and in the prediction API (``Detector.load_image``)."""

import struct

import numpy as np
import PIL.Image
import pytest
import torch

from asag.api import Detector
from asag.data.coco import read_image
from asag.data.image import open_image, to_rgb
from asag.errors import DataError

GRAY = np.array([[0, 100, 255], [7, 8, 9]], dtype=np.uint8)  # [H=2, W=3]


def gray_rgb(values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=2)


def bilevel():
    bits = np.array([[0, 1, 0], [1, 1, 0]], dtype=bool)
    return PIL.Image.fromarray(bits), gray_rgb(bits * 255)


def gray():
    return PIL.Image.fromarray(GRAY, mode="L"), gray_rgb(GRAY)


def gray_alpha():
    alpha = np.array([[0, 50, 255], [255, 0, 1]], dtype=np.uint8)
    return PIL.Image.fromarray(np.stack([GRAY, alpha], axis=2), mode="LA"), gray_rgb(GRAY)  # alpha dropped


def palette():
    image = PIL.Image.fromarray(np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8), mode="P")
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (253 * 3))
    image.info["transparency"] = 0  # index 0 transparent: its colour is kept, the alpha dropped
    colours = {0: (10, 20, 30), 1: (200, 100, 50), 2: (0, 255, 0)}
    return image, np.array([[colours[i] for i in row] for row in ([0, 1, 2], [2, 1, 0])], dtype=np.uint8)


def rgba():
    rgb = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 13
    alpha = np.full((2, 3, 1), 0, dtype=np.uint8)  # fully transparent: the colours stay
    return PIL.Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA"), rgb


def sixteen_bit():
    # round(v * 255 / 65535): 0 -> 0, 257 -> 1, 32768 -> 127.502 -> 128, 65535 -> 255, 1000 -> 3.891 -> 4,
    # 65534 -> 254.996 -> 255
    values = np.array([[0, 257, 32768], [65535, 1000, 65534]], dtype=np.uint16)
    return PIL.Image.fromarray(values), gray_rgb([[0, 1, 128], [255, 4, 255]])


def cmyk():
    # Pillow: each channel (255 - c) (255 - k) / 255
    image = PIL.Image.new("CMYK", (3, 2))
    cmyk_values = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 0)]
    image.putdata(cmyk_values)
    expected = [[(255, 255, 255), (0, 255, 255), (0, 0, 0)], [(255, 0, 255), (255, 255, 0), (255, 255, 255)]]
    return image, np.array(expected, dtype=np.uint8)


def float_gray():
    # round(v * 255): 0.5 -> 127.5 -> 128, 0.25 -> 63.75 -> 64, 0.002 -> 0.51 -> 1, 0.998 -> 254.49 -> 254
    values = np.array([[0.0, 0.5, 1.0], [0.25, 0.002, 0.998]], dtype=np.float32)
    return PIL.Image.fromarray(values, mode="F"), gray_rgb([[0, 128, 255], [64, 1, 254]])


MODES = {"1": bilevel, "L": gray, "LA": gray_alpha, "P": palette, "RGBA": rgba, "I;16": sixteen_bit,
         "CMYK": cmyk, "F": float_gray}
TIFF_ONLY = ("CMYK", "F")


def save(image: PIL.Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_reads_to_the_same_rgb_pixels(tmp_path, mode):
    image, expected = MODES[mode]()
    assert image.mode == mode
    suffix = ".tif" if mode in TIFF_ONLY else ".png"  # lossless files of each mode
    path = save(image, tmp_path / f"image{suffix}")
    assert PIL.Image.open(path).mode == mode  # the file really holds that mode
    training = read_image(path, 3, 2)  # the training / evaluation reader
    api = Detector.load_image(path)  # asag predict, visualize, demo and the Python API
    for decoded in (training, api, Detector.load_image(image), to_rgb(image)):
        assert decoded.mode == "RGB" and decoded.size == (3, 2)
        np.testing.assert_array_equal(np.asarray(decoded), expected)


def test_sixteen_bit_png_is_not_white(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32) * 1024).astype(np.uint16).reshape(8, 8)  # 0 ... 64512
    path = save(PIL.Image.fromarray(ramp), tmp_path / "ramp16.png")
    pixels = np.asarray(Detector.load_image(path))[..., 0]
    assert pixels.min() == 0 and pixels.max() == round(64512 * 255 / 65535) == 251
    assert len(np.unique(pixels)) == 64  # all levels kept apart


def exif_rotated(tmp_path):
    """A stored 3 x 2 (w x h) image whose EXIF orientation 6 says: rotate 90 degrees clockwise."""
    stored = np.array([[40, 80, 120], [160, 200, 240]], dtype=np.uint8)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    path = save(PIL.Image.fromarray(stored, mode="L"), tmp_path / "rotated.png", exif=exif.tobytes())
    return path, stored, np.array([[160, 40], [200, 80], [240, 120]], dtype=np.uint8)  # displayed: 2 x 3


def test_exif_orientation_is_applied_by_every_reader(tmp_path):
    path, _, displayed = exif_rotated(tmp_path)
    for decoded in (read_image(path, 2, 3), Detector.load_image(path), open_image(path)[0]):
        assert decoded.size == (2, 3)
        np.testing.assert_array_equal(np.asarray(decoded), gray_rgb(displayed))
    assert open_image(path)[1] == (3, 2)  # the stored size


def test_training_reader_keeps_stored_pixels_when_the_annotations_are_in_that_frame(tmp_path):
    path, stored, _ = exif_rotated(tmp_path)
    np.testing.assert_array_equal(np.asarray(read_image(path, 3, 2)), gray_rgb(stored))
    with pytest.raises(DataError, match="rotated.png: image is 2x3 pixels"):
        read_image(path, 4, 4)


def test_tensor_input_and_bad_files(tmp_path):
    tensor = torch.tensor([[[0.0, 1.0]], [[0.5, 0.25]], [[1.0, 0.0]]])  # [3, 1, 2]
    np.testing.assert_array_equal(np.asarray(Detector.load_image(tensor)), [[[0, 128, 255], [255, 64, 0]]])
    with pytest.raises(DataError, match="missing.png: image file not found"):
        Detector.load_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    for read in (lambda p: Detector.load_image(p), lambda p: read_image(p, 1, 1)):
        with pytest.raises(DataError, match="broken.png: cannot read image"):
            read(tmp_path / "broken.png")
    with pytest.raises(DataError, match="is a folder"):
        Detector.load_image(tmp_path)


def write_tiff(path, pixels: np.ndarray):
    """An uncompressed little-endian TIFF of ``pixels`` (``[H, W]`` or ``[H, W, 3]``, any int or float
    dtype), written by hand: Pillow writes no float16, float64 or float RGB TIFFs."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    data = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
    per_sample = {258: pixels.dtype.itemsize * 8, 339: {"u": 1, "i": 2, "f": 3}[pixels.dtype.kind]}
    tags = {256: width, 257: height, 259: 1, 262: 2 if channels == 3 else 1, 273: 8, 277: channels,
            278: height, 279: len(data), 284: 1}  # tag -> value (273: the pixels follow the header)
    ifd_offset = 8 + len(data)
    arrays_offset = ifd_offset + 2 + 12 * (len(tags) + len(per_sample)) + 4
    entries, arrays = [], b""
    for tag in sorted({**tags, **per_sample}):
        if tag in per_sample:  # SHORT per sample: inline for one, else an array after the directory
            if channels == 1:
                entries.append(struct.pack("<HHIHH", tag, 3, 1, per_sample[tag], 0))
            else:
                entries.append(struct.pack("<HHII", tag, 3, channels, arrays_offset + len(arrays)))
                arrays += struct.pack(f"<{channels}H", *[per_sample[tag]] * channels)
        else:
            entries.append(struct.pack("<HHII", tag, 4, 1, tags[tag]))  # LONG
    header = b"II*\x00" + struct.pack("<I", ifd_offset)
    path.write_bytes(header + data + struct.pack("<H", len(entries)) + b"".join(entries)
                     + struct.pack("<I", 0) + arrays)
    return path


FLOAT_VALUES = np.array([[0.0, 0.5, 1.0], [0.25, 0.002, 0.998]], dtype=np.float32)


def test_hand_written_tiffs_decode_as_written(tmp_path):
    """The writer below the float checks is right: Pillow reads its uint16, float32 and RGB files."""
    sixteen = (FLOAT_VALUES * 65535).astype(np.uint16)
    assert np.array_equal(np.asarray(PIL.Image.open(write_tiff(tmp_path / "a.tif", sixteen))), sixteen)
    floats = np.asarray(PIL.Image.open(write_tiff(tmp_path / "b.tif", FLOAT_VALUES)))
    assert floats.dtype == np.float32 and np.array_equal(floats, FLOAT_VALUES)
    rgb = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(np.asarray(PIL.Image.open(write_tiff(tmp_path / "c.tif", rgb))), rgb)
    np.testing.assert_array_equal(np.asarray(Detector.load_image(tmp_path / "b.tif")), float_gray()[1])


READERS = {"training": lambda path: read_image(path, 3, 2), "api": Detector.load_image}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("values, message", [
    (FLOAT_VALUES * 255, r"pixel values in \[0, 255\]"),  # a 0-255 float image: not guessed
    (FLOAT_VALUES - 0.5, r"pixel values in \[-0.5, 0.5\]"),
    (np.where(FLOAT_VALUES > 0.9, np.nan, FLOAT_VALUES).astype(np.float32), "2 NaN or infinite"),
    (np.where(FLOAT_VALUES > 0.9, np.inf, FLOAT_VALUES).astype(np.float32), "2 NaN or infinite"),
])
def test_float_image_outside_zero_one_is_refused_naming_the_file(tmp_path, reader, values, message):
    path = save(PIL.Image.fromarray(values.astype(np.float32), mode="F"), tmp_path / "float.tif")
    with pytest.raises(DataError, match=f"float.tif: float image with {message}") as err:
        READERS[reader](path)
    assert "intensities in [0, 1]" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("dtype, channels", [(np.float16, 1), (np.float64, 1), (np.float32, 3)])
def test_float_tiffs_pillow_cannot_decode_are_refused(tmp_path, dtype, channels):
    pixels = FLOAT_VALUES if channels == 1 else np.stack([FLOAT_VALUES] * channels, axis=2)
    path = write_tiff(tmp_path / "float.tif", pixels.astype(dtype))
    for read in READERS.values():
        with pytest.raises(DataError, match="float.tif: cannot read image"):
            read(path)


def test_32_bit_integer_images_are_clipped_to_the_16_bit_range(tmp_path):
    values = np.array([[0, 70000, -5], [2**31 - 1, 65535, 257]], dtype=np.int32)  # Pillow mode I
    path = save(PIL.Image.fromarray(values, mode="I"), tmp_path / "int32.tif")
    assert PIL.Image.open(path).mode == "I"
    expected = gray_rgb([[0, 255, 0], [255, 255, 1]])  # 257 -> 1; below 0 and above 65535: clipped
    np.testing.assert_array_equal(np.asarray(Detector.load_image(path)), expected)


def test_float_and_integer_tensors_follow_the_float_rule():
    tensor = torch.tensor([[[0.0, 255.0]], [[0.5, 0.25]], [[1.0, 0.0]]])  # a 0-255 float tensor
    with pytest.raises(DataError, match=r"float image with pixel values in \[0, 255\]"):
        Detector.load_image(tensor)
    with pytest.raises(DataError, match=r"image tensor must be uint8, or float in \[0, 1\], got torch.int64"):
        Detector.load_image(torch.zeros(3, 1, 2, dtype=torch.int64))


def test_a_mode_pillow_cannot_convert_is_a_data_error():
    with pytest.raises(DataError, match="image mode 'La' cannot be converted to RGB"):
        Detector.load_image(PIL.Image.new("La", (3, 2)))
