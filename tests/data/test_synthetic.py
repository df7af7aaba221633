import contextlib
import hashlib
import io
import json
import time
import warnings

import numpy as np
import PIL.Image
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from asag.data.coco import CocoDetection
from asag.data.stats import MEDIUM_AREA, SMALL_AREA
from asag.data.synthetic import (
    SHAPE_CATALOGUE,
    SHAPE_CLASSES,
    SyntheticSpec,
    _shape_mask,
    check_classes,
    format_catalogue,
    generate_synthetic,
    render_scene,
)
from asag.errors import ConfigError, DataError

SMALL_SPEC = SyntheticSpec(min_image_side=64, max_image_side=96, min_object_size=6)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# sha256 of generate_synthetic(root, 4, seed=7, val_images=2, spec=SMALL_SPEC) as written by the code before
# the shape catalogue (commit 6c4f461): the JSON files' bytes and each image's decoded RGB pixels (shape,
# then the uint8 bytes). Pixels rather than PNG bytes, which also depend on the zlib build behind Pillow
# (the PNG files were byte-identical too where these were recorded: Pillow 13.0, zlib 1.2.13).
BEFORE_THE_CATALOGUE = {
    "train.json": "be883c44c9f70e35815d4e7021ba7f6d5dc68b2ffb42a00dbf8486349316d0d4",
    "val.json": "c31a842e577f2fb5ab1538753c85723e8f3db917a6af9726be931544de148c52",
    "images/train/train_000000.png": "7fa0b4e7fcfb751b02057569b5bf909b2f248e6eb480f4879ac3e62d44bd6ee0",
    "images/train/train_000001.png": "ef7f02cb44a3b75cbbed2e1f92c6e61438f85046385899cd4fbe2f881cba6557",
    "images/train/train_000002.png": "6cf0b718bf976830ed59652048cf13dc917932d3ab90898aef695c1855168702",
    "images/train/train_000003.png": "8d6909fa2d36dddf0406feefbef276aca14fba5238b94534a9abc6850a664791",
    "images/val/val_000000.png": "f23db8e2436aa2ff30f512fdb0c07dfc6a958c45da82f9abfffbd3e3fd5d1c9d",
    "images/val/val_000001.png": "d3a9e4d24111de5297df6046255e47b205bd9ed103f410cb39ec7a21b2e15a8b",
}
BEFORE_THE_CATALOGUE_SHAPES = {
    "images/train/train_000000.png": (95, 84, 3), "images/train/train_000001.png": (88, 91, 3),
    "images/train/train_000002.png": (96, 64, 3), "images/train/train_000003.png": (77, 89, 3),
    "images/val/val_000000.png": (92, 89, 3), "images/val/val_000001.png": (66, 88, 3),
}


def _content_hashes(root):
    """Relative path -> sha256 of a JSON file's bytes or of a PNG's decoded RGB pixels."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if path.suffix == ".png":
            pixels = np.asarray(PIL.Image.open(path).convert("RGB"))
            assert pixels.shape == BEFORE_THE_CATALOGUE_SHAPES[name]
            out[name] = hashlib.sha256(pixels.tobytes()).hexdigest()
        else:
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_the_default_classes_give_the_data_set_of_before_the_catalogue(tmp_path):
    paths = generate_synthetic(tmp_path / "a", 4, seed=7, val_images=2, spec=SMALL_SPEC)
    assert _content_hashes(paths.root) == BEFORE_THE_CATALOGUE
    named = generate_synthetic(tmp_path / "b", 4, seed=7, val_images=2, spec=SMALL_SPEC,
                               classes=list(SHAPE_CLASSES))
    assert _files(named.root) == _files(paths.root)  # naming the defaults is the default


def test_chosen_classes_are_the_categories_in_order_and_the_only_objects(tmp_path):
    classes = ["heart", "star", "rectangle", "hourglass"]  # not in catalogue order
    a = generate_synthetic(tmp_path / "a", 8, seed=2, val_images=2, spec=SMALL_SPEC, classes=classes)
    b = generate_synthetic(tmp_path / "b", 8, seed=2, val_images=2, spec=SMALL_SPEC, classes=classes)
    default = generate_synthetic(tmp_path / "c", 8, seed=2, val_images=2, spec=SMALL_SPEC)
    assert _files(a.root) == _files(b.root)  # same seed, same bytes
    assert _files(a.train_images) != _files(default.train_images)
    for json_path in (a.train_json, a.val_json):
        data = json.loads(json_path.read_text())
        assert data["categories"] == [{"id": i + 1, "name": n, "supercategory": "shape"}
                                      for i, n in enumerate(classes)]
    train = json.loads(a.train_json.read_text())
    assert {ann["category_id"] for ann in train["annotations"]} == {1, 2, 3, 4}
    ds = CocoDetection(a.train_json, a.train_images)
    assert ds.label_map.names == tuple(classes)


def test_render_scene_draws_objects_of_the_given_classes_only():
    labels = set()
    for index in range(10):
        scene = render_scene(np.random.default_rng([1, 0, index]), SMALL_SPEC, ("crescent", "arrow"))
        labels |= {obj.label for obj in scene.objects}
    assert labels == {0, 1}


def test_the_catalogue_starts_with_the_defaults_and_its_shapes_differ():
    names = [shape.name for shape in SHAPE_CATALOGUE]
    assert tuple(names[: len(SHAPE_CLASSES)]) == SHAPE_CLASSES
    assert len(set(names)) == len(names) >= 12
    assert len({shape.hue for shape in SHAPE_CATALOGUE}) == len(names)
    for shape in SHAPE_CATALOGUE:  # every size from the smallest box draws something that fills its box
        for bh, bw in ((3, 3), (4, 7), (8, 8), (9, 5), (23, 31)):
            for seed in range(4):
                mask = _shape_mask(shape, bh, bw, np.random.default_rng(seed))
                assert mask.shape == (bh, bw) and mask.any(), (shape.name, bh, bw)
        mask = _shape_mask(shape, 40, 40, np.random.default_rng(0))
        assert mask[[0, -1]].any() and mask[:, [0, -1]].any() and mask.any(1).all() and mask.any(0).all()

    def orientations(shape):  # the masks a class draws in a 40 x 40 box, every variant
        return [_shape_mask(shape, 40, 40, np.random.default_rng(seed)) for seed in range(16)]

    masks = {shape.name: orientations(shape) for shape in SHAPE_CATALOGUE}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            iou = max((m & n).sum() / (m | n).sum() for m in masks[a] for n in masks[b])
            assert iou < 0.9, (a, b, iou)


def test_unknown_repeated_or_no_classes_are_one_line_errors_before_writing(tmp_path):
    catalogue = ", ".join(shape.name for shape in SHAPE_CATALOGUE)
    with pytest.raises(ConfigError) as info:
        generate_synthetic(tmp_path / "out", 1, seed=0, classes=["star", "sqaure"])
    assert str(info.value) == f"classes: unknown shape class 'sqaure'; the catalogue: {catalogue}"
    with pytest.raises(ConfigError, match="^--classes: shape class 'star' is listed twice$"):
        check_classes(["star", "heart", "star"], "--classes")
    with pytest.raises(ConfigError, match="^data.synthetic_classes must be a non-empty list"):
        check_classes([], "data.synthetic_classes")
    assert not (tmp_path / "out").exists()
    assert check_classes(None) == SHAPE_CLASSES


def test_format_catalogue_lists_every_class_and_marks_the_defaults():
    lines = format_catalogue().splitlines()
    assert len(lines) == 1 + len(SHAPE_CATALOGUE)
    assert lines[1].startswith("* rectangle") and lines[6].startswith("  diamond")
    assert all(shape.name in line for shape, line in zip(SHAPE_CATALOGUE, lines[1:]))


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


def test_a_preset_chooses_the_classes_and_a_stale_data_set_is_not_reused(tmp_path):
    from asag.build import build_dataset, prepare_synthetic
    from asag.config import load_config

    overrides = [f"data.root={tmp_path / 'data'}", "data.synthetic_classes=[star,arrow]",
                 "data.synthetic_train_images=2", "data.synthetic_val_images=1", "model.num_classes=2"]
    cfg = load_config("tiny_cpu", overrides)
    with pytest.raises(DataError, match=r"asag data synth --out .* --seed 0 --classes star,arrow;"):
        build_dataset(cfg.data, "train")  # the hint generates the configured classes
    logged = []
    prepare_synthetic(cfg.data, log=logged.append)
    assert logged[0].endswith("seed 0, classes star,arrow)")
    assert build_dataset(cfg.data, "val").label_map.names == ("star", "arrow")
    prepare_synthetic(cfg.data, log=pytest.fail)  # the same classes: reused
    other = load_config("tiny_cpu", [*overrides[:1], *overrides[2:]])  # the default classes
    stale = (r"data/train.json: the data set there has the classes star,arrow, not "
             r"data.synthetic_classes=rectangle,ellipse,triangle,cross,ring; remove")
    with pytest.raises(DataError, match=stale):
        prepare_synthetic(other.data, log=pytest.fail)


@pytest.mark.parametrize("value, message", [
    ("[star,sqaure]", "data.synthetic_classes: unknown shape class 'sqaure'; the catalogue: rectangle, "),
    ("[]", "data.synthetic_classes must be a non-empty list of shape class names, got []"),
    ("star", "data.synthetic_classes: expected a list, got 'star'"),
])
def test_bad_synthetic_classes_in_a_configuration(value, message):
    from asag.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", [f"data.synthetic_classes={value}"])
    assert str(info.value).startswith(message)
