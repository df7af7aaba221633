import contextlib
import io
import json
import time
import warnings

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from asag.data.coco import CocoDetection
from asag.data.stats import MEDIUM_AREA, SMALL_AREA
from asag.data.synthetic import SHAPE_CLASSES, SyntheticSpec, generate_synthetic, render_scene
from asag.errors import DataError

SMALL_SPEC = SyntheticSpec(min_image_side=64, max_image_side=96, min_object_size=6)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    a = generate_synthetic(tmp_path / "a", 6, seed=3, val_images=2, spec=SMALL_SPEC)
    b = generate_synthetic(tmp_path / "b", 6, seed=3, val_images=2, spec=SMALL_SPEC)
    c = generate_synthetic(tmp_path / "c", 6, seed=4, val_images=2, spec=SMALL_SPEC)
    files_a, files_b, files_c = _files(a.root), _files(b.root), _files(c.root)
    assert len(files_a) == 2 + 6 + 2
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert all(files_a[k] != files_c[k] for k in files_a)


def test_image_i_does_not_depend_on_the_count(tmp_path):
    a = generate_synthetic(tmp_path / "a", 2, seed=1, val_images=1, spec=SMALL_SPEC)
    b = generate_synthetic(tmp_path / "b", 4, seed=1, val_images=1, spec=SMALL_SPEC)
    name = "train_000001.png"
    assert (a.train_images / name).read_bytes() == (b.train_images / name).read_bytes()


def test_valid_for_pycocotools_and_gt_as_detections_gives_ap_1(tmp_path):
    paths = generate_synthetic(tmp_path, 8, seed=0, val_images=4)
    for json_path in (paths.train_json, paths.val_json):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(json_path))
            keys = ("image_id", "category_id", "bbox")
            dets = [{**{k: a[k] for k in keys}, "score": 1.0} for a in gt.dataset["annotations"]]
            evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0)
        assert [c["name"] for c in gt.dataset["categories"]] == list(SHAPE_CLASSES)


def test_content_and_size_distribution(tmp_path):
    paths = generate_synthetic(tmp_path, 30, seed=5, val_images=1)
    data = json.loads(paths.train_json.read_text())
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    assert all(256 <= w <= 384 and 256 <= h <= 384 for w, h in sizes.values())
    assert len({w / h for w, h in sizes.values()}) > 10  # varied aspect ratios
    boxes = np.array([a["bbox"] for a in data["annotations"]], dtype=np.float64)
    areas = np.array([a["area"] for a in data["annotations"]])
    limits = np.array([sizes[a["image_id"]] for a in data["annotations"]])
    assert (boxes[:, 2:] > 0).all() and (boxes[:, :2] >= 0).all()
    assert (boxes[:, :2] + boxes[:, 2:] <= limits).all()
    assert (areas <= boxes[:, 2] * boxes[:, 3]).all()
    assert (areas < SMALL_AREA).mean() > 0.3  # many small objects
    assert (areas >= MEDIUM_AREA).sum() > 5  # and large ones
    largest = (boxes[:, 2:] / limits.min(axis=1, keepdims=True)).max()
    assert 0.4 < largest <= 0.6 * np.sqrt(2) + 0.01  # up to ~60 % of the short side (aspect up to 2)
    assert set(a["category_id"] for a in data["annotations"]) == {1, 2, 3, 4, 5}
    assert "date_created" not in json.dumps(data)


def test_occlusion_is_partial():
    # objects overlap, but every one keeps at least half of its pixels visible
    occluded = 0
    for index in range(20):
        scene = render_scene(np.random.default_rng([0, 0, index]), SyntheticSpec())
        assert scene.pixels.dtype == np.uint8 and scene.pixels.ndim == 3
        for obj in scene.objects:
            assert 0.5 * obj.full_area <= obj.area <= obj.full_area
            occluded += obj.area < obj.full_area
    assert occluded >= 3


def test_loads_as_a_dataset_without_warnings(tmp_path):
    paths = generate_synthetic(tmp_path, 3, seed=0, val_images=1, spec=SMALL_SPEC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(paths.train_json, paths.train_images, training_filter=True)
    image, target = ds[0]
    assert image.shape[0] == 3 and len(target) > 0
    assert ds.label_map.names == SHAPE_CLASSES


@pytest.mark.slow
def test_two_hundred_images_in_a_few_seconds(tmp_path):
    start = time.perf_counter()
    generate_synthetic(tmp_path, 200, seed=0, val_images=1)
    assert time.perf_counter() - start < 10.0


def test_a_missing_synthetic_data_set_is_an_error_not_generated(tmp_path, capsys):
    from asag.build import build_dataset
    from asag.cli import main
    from asag.config import load_config

    typo = tmp_path / "synthtic"
    cfg = load_config("tiny_cpu", [f"data.root={typo}"])
    with pytest.raises(DataError, match=r"synthtic/train.json: annotation file not found .*asag data synth"):
        build_dataset(cfg.data, "train")
    assert main(["train", "tiny_cpu", f"data.root={typo}", f"runtime.output_dir={tmp_path / 'run'}"]) == 2
    assert "synthtic/train.json: annotation file not found" in capsys.readouterr().err
    assert not typo.exists()
