"""The one image reader: every mode decodes to the same hand-computed RGB pixels in the training/evaluation
reader (``read_image``) and in the prediction API (``Detector.load_image``)."""

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


MODES = {"1": bilevel, "L": gray, "LA": gray_alpha, "P": palette, "RGBA": rgba, "I;16": sixteen_bit,
         "CMYK": cmyk}


def save(image: PIL.Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_reads_to_the_same_rgb_pixels(tmp_path, mode):
    image, expected = MODES[mode]()
    assert image.mode == mode
    suffix = ".tif" if mode == "CMYK" else ".png"  # lossless files of each mode
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
