import json
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from coco_files import ann, write_image

from asag.data.coco import CocoDetection, DataWarning
from asag.data.transforms import DetectionTransform, build_eval_transforms
from asag.errors import DataError

RAW = DetectionTransform(mean=None, std=None)  # tensor conversion only: boxes stay comparable


def _basic(coco_writer, **kwargs):
    images = [(1, "a.png", 100, 80), (2, "b.png", 60, 40), (3, "c.png", 50, 20)]
    annotations = [
        ann(10, 1, 5, [10, 20, 30, 40]),  # airplane -> label 1
        ann(11, 1, 90, [0, 0, 100, 80], iscrowd=1),  # crowd: not a target
        ann(12, 1, 1, [90, 70, 20, 20]),  # person -> label 0, extends outside: clipped to (90,70,100,80)
        ann(13, 3, 90, [5, 5, 10, 10]),  # image 3 is only 20 px high (< 32)
    ]
    return coco_writer(images, annotations, **kwargs)


def test_targets_labels_and_sizes(coco_writer):
    json_path, image_dir = _basic(coco_writer)
    with pytest.warns(DataWarning, match="1 boxes extending outside their image were clipped"):
        ds = CocoDetection(json_path, image_dir, transforms=RAW)
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3]
    assert ds.label_map.category_ids == (1, 5, 90)
    image, target = ds[0]
    assert image.shape == (3, 80, 100) and target.size == (80, 100) and target.orig_size == (80, 100)
    assert target.image_id == 1
    assert target.labels.tolist() == [1, 0]
    # xyxy (10, 20, 40, 60) and clipped (90, 70, 100, 80), normalised cxcywh by (100, 80)
    expected = torch.tensor([[25 / 100, 40 / 80, 30 / 100, 40 / 80], [95 / 100, 75 / 80, 10 / 100, 10 / 80]])
    torch.testing.assert_close(target.boxes, expected)
    empty = ds[1].target
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    assert torch.equal(ds.annotations(0).boxes_xyxy, torch.tensor([[10.0, 20, 40, 60], [90, 70, 100, 80]]))
    # pixels are the file's
    stored = np.asarray(PIL.Image.open(image_dir / "a.png"), dtype=np.float32) / 255
    torch.testing.assert_close(image, torch.from_numpy(stored).permute(2, 0, 1))


def test_crowd_kept_in_pycocotools_index(coco_writer):
    json_path, image_dir = _basic(coco_writer)
    with pytest.warns(DataWarning):
        ds = CocoDetection(json_path, image_dir)
    assert sorted(ds.coco.getAnnIds()) == [10, 11, 12, 13]
    assert ds.coco.loadAnns(11)[0]["iscrowd"] == 1


def test_training_filter_drops_empty_and_small_images(coco_writer):
    json_path, image_dir = _basic(coco_writer)
    with pytest.warns(DataWarning):
        ds = CocoDetection(json_path, image_dir, training_filter=True)
    assert ds.image_ids == [1] and ds.num_filtered == 2
    with pytest.warns(DataWarning):
        ds_small = CocoDetection(json_path, image_dir, training_filter=True, min_side=16)
    assert ds_small.image_ids == [1, 3]


def test_eval_transform_output(coco_writer):
    json_path, image_dir = _basic(coco_writer)
    with pytest.warns(DataWarning):
        ds = CocoDetection(json_path, image_dir, transforms=build_eval_transforms(size=40, max_size=100))
    image, target = ds[0]
    assert image.shape == (3, 40, 50) and target.size == (40, 50) and target.orig_size == (80, 100)
    torch.testing.assert_close(target.boxes[0], torch.tensor([0.25, 0.5, 0.3, 0.5]))


def test_zero_size_box_dropped_with_warning(coco_writer):
    anns = [ann(7, 1, 1, [5, 5, 0, 10]), ann(8, 1, 1, [50, 5, 4, 4]), ann(9, 1, 1, [1, 1, 5, 5])]
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], anns)
    match = "2 boxes with zero width or height .* dropped .*annotation ids 7, 8"
    with pytest.warns(DataWarning, match=match):
        ds = CocoDetection(json_path, image_dir)
    assert ds.index.num_dropped == 2 and len(ds[0].target) == 1


def test_no_warning_for_clean_data(coco_writer):
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], [ann(1, 1, 1, [0, 0, 40, 40])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDetection(json_path, image_dir)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_image_modes_become_rgb(coco_writer, mode):
    json_path, image_dir = coco_writer([(1, "a.png" if mode != "CMYK" else "a.jpg", 30, 20)], [])
    name = "a.png" if mode != "CMYK" else "a.jpg"
    write_image(image_dir / name, 30, 20, mode=mode)
    ds = CocoDetection(json_path, image_dir, transforms=RAW)
    image, _ = ds[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    if mode in ("L", "I;16", "LA"):  # grayscale: three equal channels
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    if mode == "L":
        stored = torch.from_numpy(np.asarray(PIL.Image.open(image_dir / name), dtype=np.float32) / 255)
        torch.testing.assert_close(image[0], stored)


def test_exif_orientation_respected(coco_writer):
    # stored 40 wide x 20 high, EXIF orientation 6 (rotate 90 degrees clockwise to display): 20 x 40
    anns = [ann(1, 1, 1, [0, 0, 10, 10])]
    json_path, image_dir = coco_writer([(1, "r.png", 20, 40)], anns, write_images=False)
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(pixels).save(image_dir / "r.png", exif=exif)
    ds = CocoDetection(json_path, image_dir, transforms=RAW)
    image, target = ds[0]
    assert image.shape == (3, 40, 20) and target.orig_size == (40, 20)
    # rotated clockwise: the stored left half is now the top half
    assert float(image[0, :20].min()) == 1.0 and float(image[0, 20:].max()) == 0.0


# ------------------------------------------------------------------------------------ bad input


def _raises(match: str, *names: str):
    """pytest.raises(DataError) whose message must also contain every string in ``names``."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(DataError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            result = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            for name in names:
                assert name in message, f"{name!r} not in {message!r}"
            assert self.info.value.__cause__ is None  # no chained low-level traceback
            return result

    return _Check()


def test_missing_json(tmp_path):
    with _raises("annotation file not found", "nope.json"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


def test_malformed_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with _raises("malformed JSON \\(line 1, column 13", str(bad)):
        CocoDetection(bad, tmp_path)


def test_json_without_images_list(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with _raises("missing or invalid 'images' list", str(bad)):
        CocoDetection(bad, tmp_path)


def test_annotation_with_missing_image_id(coco_writer):
    anns = [ann(1, 1, 1, [0, 0, 5, 5]), ann(77, 3, 1, [0, 0, 5, 5])]
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], anns)
    with _raises("refer to image ids missing", str(json_path), "77 (image_id 3)"):
        CocoDetection(json_path, image_dir)


def test_unknown_category_id(coco_writer):
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], [ann(5, 1, 2, [0, 0, 5, 5])])
    with _raises("category ids missing from 'categories'", str(json_path), "5 (category_id 2)"):
        CocoDetection(json_path, image_dir)


def test_negative_box_size(coco_writer):
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], [ann(31, 1, 1, [10, 10, -3, 5])])
    with _raises("negative bbox width or height", str(json_path), "annotation ids 31"):
        CocoDetection(json_path, image_dir)


def test_malformed_bbox(coco_writer):
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], [{"id": 4, "image_id": 1, "category_id": 1,
                                                                 "bbox": [1, 2, 3]}])
    with _raises("annotation id 4 has a malformed bbox \\[1, 2, 3\\]", str(json_path)):
        CocoDetection(json_path, image_dir)


@pytest.mark.parametrize("field, value, message", [
    ("bbox", ["1", "2", "3", "4"], "annotation id 4 has a malformed bbox \\['1', '2', '3', '4'\\]"),
    ("bbox", [1, 2, "3.5", 4], "annotation id 4 has a malformed bbox \\[1, 2, '3.5', 4\\]"),
    ("bbox", [1, 2, None, 4], "annotation id 4 has a malformed bbox \\[1, 2, None, 4\\]"),
    ("bbox", [True, False, True, True], "annotation id 4 has a malformed bbox"),
    ("category_id", "1", "annotation id 4 needs integer id, image_id, category_id"),
    ("image_id", 1.0, "annotation id 4 needs integer id, image_id, category_id"),
    ("iscrowd", "0", "annotation id 4 has a non-integer 'iscrowd' '0'"),
])
def test_numeric_strings_and_non_numbers_are_refused(coco_writer, field, value, message):
    annotation = {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], field: value}
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], [annotation])
    with _raises(message, str(json_path)):
        CocoDetection(json_path, image_dir)


def test_empty_dataset(coco_writer):
    json_path, image_dir = coco_writer([], [])
    with _raises("the data set is empty", str(json_path)):
        CocoDetection(json_path, image_dir)


def test_nothing_left_for_training(coco_writer):
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], [])
    with _raises("no image left for training", str(json_path)):
        CocoDetection(json_path, image_dir, training_filter=True)


def test_missing_image_file_detected_up_front(coco_writer):
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40), (2, "gone.png", 40, 40)], [])
    (image_dir / "gone.png").unlink()
    with _raises("1 image files missing", "gone.png", str(json_path)):
        CocoDetection(json_path, image_dir)


def test_missing_image_folder(coco_writer, tmp_path):
    json_path, _ = coco_writer([(1, "a.png", 40, 40)], [])
    with _raises("image folder not found", str(tmp_path / "elsewhere")):
        CocoDetection(json_path, tmp_path / "elsewhere")


def test_unreadable_image(coco_writer):
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], [])
    (image_dir / "a.png").write_bytes(b"this is not an image")
    ds = CocoDetection(json_path, image_dir)  # construction does not decode
    with _raises("cannot read image", str(image_dir / "a.png")):
        ds[0]


def test_truncated_image(coco_writer):
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], [])
    data = (image_dir / "a.png").read_bytes()
    (image_dir / "a.png").write_bytes(data[: len(data) // 2])
    ds = CocoDetection(json_path, image_dir)
    with _raises("cannot read image", str(image_dir / "a.png"), "truncated"):
        ds[0]


def test_image_size_disagrees_with_json(coco_writer):
    json_path, image_dir = coco_writer([(1, "a.png", 40, 30)], [])
    write_image(image_dir / "a.png", 41, 30)
    ds = CocoDetection(json_path, image_dir)
    with _raises("image is 41x30 pixels .* annotation file says 40x30", str(image_dir / "a.png")):
        ds[0]


def test_duplicate_annotation_ids(coco_writer):
    anns = [ann(3, 1, 1, [0, 0, 5, 5]), ann(3, 1, 1, [1, 1, 5, 5])]
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], anns)
    with _raises("duplicate annotation ids 3", str(json_path)):
        CocoDetection(json_path, image_dir)


def test_annotation_without_id(coco_writer):
    anns = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]
    json_path, image_dir = coco_writer([(1, "a.png", 40, 40)], anns)
    with _raises("annotation id \\? needs integer id, image_id, category_id and a 'bbox'", str(json_path)):
        CocoDetection(json_path, image_dir)
