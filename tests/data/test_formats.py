"""``asag data convert --from yolo|voc``: exact COCO values, round trips from COCO, loading, errors."""

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from coco_files import write_image

from asag.build import build_dataset
from asag.cli import main
from asag.commands import data as data_command
from asag.config import load_config
from asag.data.coco import CocoDetection
from asag.data.formats import (
    NORMALISED_TOLERANCE,
    VOC_DIFFICULT_MODES,
    ConvertedPaths,
    read_voc,
    read_yolo,
    train_overrides,
    write_coco_dataset,
)
from asag.data.image import EXIF_ORIENTATION, read_image_header
from asag.data.synthetic import generate_synthetic
from asag.errors import ConfigError, DataError, OutputError

# ------------------------------------------------------------------------------------------ writers


def _write_yolo_labels(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def coco_to_yolo(coco_root: Path, out: Path) -> None:
    """A YOLO data set (data.yaml, images/{split}, labels/{split}) from a synthetic COCO data set, values
    written with full float precision."""
    names = None
    for split in ("train", "val"):
        data = json.loads((coco_root / f"{split}.json").read_text())
        names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
        lines = {img["id"]: [] for img in data["images"]}
        sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        for a in data["annotations"]:
            (w, h), (x, y, bw, bh) = sizes[a["image_id"]], a["bbox"]
            values = ((x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h)
            lines[a["image_id"]].append(" ".join([str(a["category_id"] - 1), *map(repr, values)]))
        for img in data["images"]:
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(coco_root / "images" / split / img["file_name"],
                            out / "images" / split / img["file_name"])
            label = out / "labels" / split / f"{Path(img['file_name']).stem}.txt"
            _write_yolo_labels(label, lines[img["id"]])
    (out / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {names}\n")


def voc_xml(filename: str, size: tuple[int, int] | None, objects: list[tuple[str, int, tuple]]) -> str:
    """A VOC annotation: ``objects`` of ``(name, difficult, (xmin, ymin, xmax, ymax))`` 1-based."""
    size_xml = "" if size is None else (f"<size><width>{size[0]}</width><height>{size[1]}</height>"
                                        f"<depth>3</depth></size>")
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, difficult, b in objects
    )
    return f"<annotation><folder>VOC</folder><filename>{filename}</filename>{size_xml}{body}</annotation>"


def coco_to_voc(coco_root: Path, out: Path) -> None:
    """A VOC data set (Annotations, JPEGImages, ImageSets/Main/{train,val}.txt) from a synthetic COCO
    data set: integer COCO boxes -> 1-based inclusive corners."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        data = json.loads((coco_root / f"{split}.json").read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        ids = []
        for img in data["images"]:
            stem = f"{split}_{Path(img['file_name']).stem}"
            ids.append(stem)
            shutil.copyfile(coco_root / "images" / split / img["file_name"],
                            out / "JPEGImages" / f"{stem}.png")
            boxes = [(a["category_id"], a["bbox"]) for a in data["annotations"] if a["image_id"] == img["id"]]
            objects = [(names[c], 0, (x + 1, y + 1, x + w, y + h)) for c, (x, y, w, h) in boxes]
            xml = voc_xml(f"{stem}.png", (img["width"], img["height"]), objects)
            (out / "Annotations" / f"{stem}.xml").write_text(xml)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def _boxes_by_image(data: dict) -> list[list[tuple]]:
    """Per image (in image order) the (category name, bbox) pairs, sorted."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_image = {img["id"]: [] for img in data["images"]}
    for a in data["annotations"]:
        per_image[a["image_id"]].append((names[a["category_id"]], tuple(a["bbox"])))
    return [sorted(per_image[img["id"]]) for img in data["images"]]


def _convert(argv: list[str]) -> int:
    return main(["data", "convert", *argv])


def _printed_overrides(out: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.strip().startswith("asag train PRESET "))
    return shlex.split(line)[3:]


# --------------------------------------------------------------------------------------------- YOLO


@pytest.fixture
def yolo_yaml(tmp_path):
    """data.yaml (names as a mapping) with train (a.jpg 100x50, b.png 40x80 without label file,
    d.png 20x20 with an empty one) and val (c.png 64x32)."""
    src = tmp_path / "yolo"
    for split, name, w, h in (("train", "a.jpg", 100, 50), ("train", "b.png", 40, 80),
                              ("train", "d.png", 20, 20), ("val", "c.png", 64, 32)):
        (src / "images" / split).mkdir(parents=True, exist_ok=True)
        write_image(src / "images" / split / name, w, h)
    _write_yolo_labels(src / "labels" / "train" / "a.txt", [
        "0 0.5 0.5 0.2 0.4",  # (40, 15, 20, 20)
        "",
        "1 0.1 0.1 0.2 0.2",  # (0, 0, 20, 10)
        "1 0.1 0.2 0.3 0.2 0.3 0.6 0.1 0.6",  # polygon -> (10, 10, 20, 20)
        "0 0.9 0.5 0.2001 0.2",  # right edge 1.00005: clipped to the image, (79.995, 20, 20.005, 10)
    ])
    _write_yolo_labels(src / "labels" / "train" / "d.txt", [])
    _write_yolo_labels(src / "labels" / "val" / "c.txt", ["2 0.25 0.5 0.5 1"])  # (0, 0, 32, 32)
    (src / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnc: 3\n"
                                   "names:\n  0: cat\n  1: dog\n  2: bird\n")
    return src


def test_yolo_yaml_exact_values(yolo_yaml, tmp_path, capsys):
    out = tmp_path / "coco"
    assert _convert(["--from", "yolo", str(yolo_yaml / "data.yaml"), "--out", str(out)]) == 0
    train = json.loads((out / "annotations" / "train.json").read_text())
    assert train["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"},
                                   {"id": 3, "name": "bird"}]
    assert train["images"] == [
        {"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 80},
        {"id": 3, "file_name": "d.png", "width": 20, "height": 20},
    ]
    anns = train["annotations"]
    assert [(a["id"], a["image_id"], a["category_id"], a["iscrowd"]) for a in anns] == [
        (1, 1, 1, 0), (2, 1, 2, 0), (3, 1, 2, 0), (4, 1, 1, 0)]
    expected = [(40, 15, 20, 20), (0, 0, 20, 10), (10, 10, 20, 20), (79.995, 20, 20.005, 10)]
    for a, box in zip(anns, expected):
        assert a["bbox"] == pytest.approx(box, abs=1e-9)
        assert a["area"] == pytest.approx(box[2] * box[3], abs=1e-6)
    val = json.loads((out / "annotations" / "val.json").read_text())
    assert val["images"] == [{"id": 1, "file_name": "c.png", "width": 64, "height": 32}]
    assert val["annotations"][0]["bbox"] == [0, 0, 32, 32] and val["annotations"][0]["category_id"] == 3
    link = out / "images" / "train" / "a.jpg"
    assert link.is_symlink() and link.resolve() == (yolo_yaml / "images" / "train" / "a.jpg").resolve()
    printed = capsys.readouterr().out
    assert "1 segmentation polygons were converted to their bounding boxes" in printed
    assert "1 boxes reaching outside their image were clipped to it" in printed
    assert "1 images have no label file and are written without boxes" in printed
    assert "annotations/train.json\n  images: 3 (2 without boxes)\n  boxes: 4 " in printed  # the stats


def test_yolo_folder_holding_data_yaml_and_list_files(yolo_yaml, tmp_path):
    # a split given as a list file of image paths, relative to the list's folder
    (yolo_yaml / "val.txt").write_text("./images/val/c.png\n")
    (yolo_yaml / "data.yaml").write_text("train: [images/train]\nval: val.txt\nnames: [cat, dog, bird]\n")
    source = read_yolo(yolo_yaml)
    assert list(source.splits) == ["train", "val"]
    assert [i.file_name for i in source.splits["val"].images] == ["images/val/c.png"]
    assert source.splits["val"].boxes[0].bbox == (0.0, 0.0, 32.0, 32.0)
    (yolo_yaml / "val.txt").write_text("./images/val/c.png\nimages/val/missing.png\n")
    with pytest.raises(DataError, match=r"val.txt, line 2: image .*missing.png not found"):
        read_yolo(yolo_yaml)


def test_yolo_roboflow_relative_paths(tmp_path):
    src = tmp_path / "export"
    for split in ("train", "valid"):
        (src / split / "images").mkdir(parents=True)
        write_image(src / split / "images" / "x.jpg", 30, 30)
        _write_yolo_labels(src / split / "labels" / "x.txt", ["0 0.5 0.5 0.5 0.5"])
    (src / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['ball']\n")
    source = read_yolo(src / "data.yaml")
    assert source.categories == ("ball",)
    assert [len(s.boxes) for s in source.splits.values()] == [1, 1]
    assert source.splits["val"].images[0].path == src / "valid" / "images" / "x.jpg"


def test_yolo_plain_folder_one_split(tmp_path):
    src = tmp_path / "labelled"
    (src / "images").mkdir(parents=True)
    write_image(src / "images" / "p.png", 50, 40)
    _write_yolo_labels(src / "labels" / "p.txt", ["1 0.5 0.5 0.4 0.5"])
    (src / "labels" / "classes.txt").write_text("a\nb\n\n")  # LabelImg: names in the label folder
    source = read_yolo(src, "mine")
    assert source.categories == ("a", "b")
    assert list(source.splits) == ["mine"]
    assert source.splits["mine"].boxes[0].bbox == (15.0, 10.0, 20.0, 20.0)
    assert read_yolo(src).splits.keys() == {"train"}


def test_yolo_plain_folder_split_subfolders(tmp_path):
    src = tmp_path / "labelled"
    for split in ("train", "valid"):
        (src / "images" / split).mkdir(parents=True)
        write_image(src / "images" / split / "p.png", 50, 40)
        _write_yolo_labels(src / "labels" / split / "p.txt", ["0 0.5 0.5 0.4 0.5"])
    (src / "obj.names").write_text("thing\n")
    source = read_yolo(src)
    assert list(source.splits) == ["train", "valid"]
    with pytest.raises(ConfigError, match="--split x: .* defines its splits"):
        read_yolo(src, "x")


def test_exif_rotated_image_uses_the_displayed_size(tmp_path):
    src = tmp_path / "yolo"
    (src / "images").mkdir(parents=True)
    exif = PIL.Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored 80x40, shown rotated by 90 degrees: 40x80
    PIL.Image.new("RGB", (80, 40), "red").save(src / "images" / "r.jpg", exif=exif)
    header = read_image_header(src / "images" / "r.jpg")
    assert (header.stored, header.oriented) == ((80, 40), (40, 80))
    _write_yolo_labels(src / "labels" / "r.txt", ["0 0.5 0.25 0.5 0.5"])
    (src / "classes.txt").write_text("thing\n")
    out = tmp_path / "coco"
    paths = write_coco_dataset(read_yolo(src), out)
    data = json.loads(paths.splits["train"][0].read_text())
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (40, 80)
    assert data["annotations"][0]["bbox"] == [10, 0, 20, 40]
    ds = CocoDetection(paths.splits["train"][0], paths.splits["train"][1])
    assert ds.load_image(0).size == (40, 80)


# ---------------------------------------------------------------------------------------------- VOC


@pytest.fixture
def voc_dir(tmp_path):
    """VOC: img1 (60x40, a dog, a difficult cat, a person), img2 (30x30, a cat), splits train / val."""
    src = tmp_path / "VOC"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (src / folder).mkdir(parents=True)
    write_image(src / "JPEGImages" / "img1.jpg", 60, 40)
    write_image(src / "JPEGImages" / "img2.jpg", 30, 30)
    (src / "Annotations" / "img1.xml").write_text(voc_xml("img1.jpg", (60, 40), [
        ("dog", 0, (1, 1, 10, 20)),  # 1-based inclusive: (0, 0, 10, 20)
        ("cat", 1, (11, 5, 30, 15)),  # (10, 4, 20, 11)
        ("person", 0, (50, 30, 61, 40)),  # xmax 61 > width 60: clipped, (49, 29, 11, 11)
    ]))
    (src / "Annotations" / "img2.xml").write_text(voc_xml("img2.jpg", None, [("cat", 0, (2.5, 3, 30, 30))]))
    (src / "ImageSets" / "Main" / "train.txt").write_text("img1\n")
    (src / "ImageSets" / "Main" / "val.txt").write_text("img2\n\n")
    return src


def test_voc_exact_values(voc_dir, tmp_path, capsys):
    out = tmp_path / "coco"
    assert _convert(["--from", "voc", str(voc_dir), "--out", str(out), "--copy-images"]) == 0
    train = json.loads((out / "annotations" / "train.json").read_text())
    assert train["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"},
                                   {"id": 3, "name": "person"}]  # sorted names
    assert train["images"] == [{"id": 1, "file_name": "img1.jpg", "width": 60, "height": 40}]
    assert [(a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in train["annotations"]] == [
        (2, [0, 0, 10, 20], 200, 0), (1, [10, 4, 20, 11], 220, 1), (3, [49, 29, 11, 11], 121, 0)]
    val = json.loads((out / "annotations" / "val.json").read_text())
    assert val["images"] == [{"id": 1, "file_name": "img2.jpg", "width": 30, "height": 30}]
    assert val["annotations"][0]["bbox"] == [1.5, 2, 28.5, 28]
    copied = out / "images" / "train" / "img1.jpg"
    assert copied.is_file() and not copied.is_symlink()
    printed = capsys.readouterr().out
    assert "1 difficult objects written as crowd regions" in printed
    assert "boxes: 2 (crowd regions: 1;" in printed


@pytest.mark.parametrize("mode, expected", [("crowd", [0, 1, 0]), ("keep", [0, 0, 0]), ("skip", [0, 0])])
def test_voc_difficult_modes(voc_dir, mode, expected):
    boxes = read_voc(voc_dir, difficult=mode).splits["train"].boxes
    assert [int(b.iscrowd) for b in boxes] == expected


def test_voc_classes_fix_the_order_and_default_split(voc_dir):
    shutil.rmtree(voc_dir / "ImageSets")
    source = read_voc(voc_dir, "all", classes=["person", "dog", "cat", "horse"])
    assert source.categories == ("person", "dog", "cat", "horse")
    assert list(source.splits) == ["all"] and len(source.splits["all"].images) == 2
    assert [b.category for b in source.splits["all"].boxes] == [1, 2, 0, 2]
    assert list(read_voc(voc_dir).splits) == ["train"]
    with pytest.raises(DataError, match=r"img1.xml, object 1: class 'dog' is not in --classes \(cat\)"):
        read_voc(voc_dir, classes=["cat"])


# ------------------------------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, 3, seed=4, val_images=2)
    return root


def test_yolo_round_trip(synthetic, tmp_path):
    coco_to_yolo(synthetic, tmp_path / "yolo")
    paths = write_coco_dataset(read_yolo(tmp_path / "yolo"), tmp_path / "back")
    for split in ("train", "val"):
        original = json.loads((synthetic / f"{split}.json").read_text())
        back = json.loads(paths.splits[split][0].read_text())
        assert back["categories"] == [{"id": c["id"], "name": c["name"]} for c in original["categories"]]
        sizes = [(i["file_name"], i["width"], i["height"]) for i in back["images"]]
        assert sizes == [(i["file_name"], i["width"], i["height"]) for i in original["images"]]
        for want, got in zip(_boxes_by_image(original), _boxes_by_image(back)):
            assert [name for name, _ in got] == [name for name, _ in want]
            np.testing.assert_allclose([b for _, b in got], [b for _, b in want], atol=1e-9)


def test_voc_round_trip_exact(synthetic, tmp_path):
    coco_to_voc(synthetic, tmp_path / "voc")
    original_names = [c["name"] for c in json.loads((synthetic / "train.json").read_text())["categories"]]
    paths = write_coco_dataset(read_voc(tmp_path / "voc", classes=original_names), tmp_path / "back")
    for split in ("train", "val"):
        original = json.loads((synthetic / f"{split}.json").read_text())
        back = json.loads(paths.splits[split][0].read_text())
        assert [(c["id"], c["name"]) for c in back["categories"]] == \
            [(c["id"], c["name"]) for c in original["categories"]]
        assert _boxes_by_image(back) == _boxes_by_image(original)  # integer pixels, exactly
        assert [(i["width"], i["height"]) for i in back["images"]] == \
            [(i["width"], i["height"]) for i in original["images"]]


def test_converted_set_loads_with_the_printed_overrides(synthetic, tmp_path, capsys):
    coco_to_voc(synthetic, tmp_path / "voc")
    out = tmp_path / "coco"
    assert _convert(["--from", "voc", str(tmp_path / "voc"), "--out", str(out)]) == 0
    overrides = _printed_overrides(capsys.readouterr().out)
    assert overrides == ["data.format=coco", f"data.root={out.resolve()}",
                         "data.train_annotations=annotations/train.json", "data.train_images=images/train",
                         "data.val_annotations=annotations/val.json", "data.val_images=images/val",
                         "model.num_classes=5"]
    cfg = load_config("tiny_cpu", overrides)
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert (len(train), len(val)) == (3, 2)
    assert train.label_map.names == ("cross", "ellipse", "rectangle", "ring", "triangle")
    sample = val[0]
    assert sample.image.shape[0] == 3 and len(sample.target.labels) > 0


@pytest.mark.parametrize("splits, train, val", [
    (["train", "val", "trainval", "test"], "train", "val"),
    (["trainval", "test"], "trainval", "test"),
    (["train", "valid", "test"], "train", "valid"),
    (["mine"], "mine", None),
])
def test_train_and_val_split_choice(tmp_path, splits, train, val):
    paths = ConvertedPaths(tmp_path, {s: (tmp_path / s, tmp_path / s) for s in splits})
    overrides = train_overrides(paths, 2)
    assert f"data.train_annotations=annotations/{train}.json" in overrides
    assert f"data.train_images=images/{train}" in overrides
    assert (f"data.val_annotations=annotations/{val}.json" in overrides) if val else \
        ("runtime.eval_every=0" in overrides)


def test_no_val_split_turns_evaluation_off(voc_dir, tmp_path, capsys):
    shutil.rmtree(voc_dir / "ImageSets")
    assert _convert(["--from", "voc", str(voc_dir), "--out", str(tmp_path / "c")]) == 0
    overrides = _printed_overrides(capsys.readouterr().out)
    assert "runtime.eval_every=0" in overrides and not any("data.val_" in o for o in overrides)
    assert load_config("tiny_cpu", overrides).runtime.eval_every == 0


# ----------------------------------------------------------------------------------- output folder


def test_existing_output_needs_overwrite(voc_dir, tmp_path, capsys):
    out = tmp_path / "coco"
    argv = ["--from", "voc", str(voc_dir), "--out", str(out)]
    assert _convert(argv) == 0
    (out / "keep.txt").write_text("mine")
    (out / "images" / "train" / "stale.jpg").write_text("old")
    capsys.readouterr()
    assert _convert(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds annotations/train.json, images/train" in err and "--overwrite" in err
    assert _convert([*argv, "--overwrite"]) == 0
    assert not (out / "images" / "train" / "stale.jpg").exists()
    assert (out / "keep.txt").read_text() == "mine"


def test_output_holding_the_sources_is_refused(tmp_path):
    src = tmp_path / "yolo"
    (src / "images" / "train").mkdir(parents=True)
    (src / "labels" / "train").mkdir(parents=True)
    write_image(src / "images" / "train" / "a.png", 10, 10)
    (src / "classes.txt").write_text("a\n")
    with pytest.raises(OutputError, match="holds source images"):
        write_coco_dataset(read_yolo(src), src, overwrite=True)
    assert (src / "images" / "train" / "a.png").is_file()


def test_options_only_for_voc(yolo_yaml, tmp_path, capsys):
    for extra in (["--classes", "a,b"], ["--voc-difficult", "keep"]):
        assert _convert(["--from", "yolo", str(yolo_yaml), "--out", str(tmp_path / "o"), *extra]) == 2
        assert "only for --from voc" in capsys.readouterr().err
    assert _convert(["--from", "yolo", str(yolo_yaml), "--out", str(tmp_path / "o"), "--split", "x"]) == 2
    assert "--split x:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_command_choices_match_the_library():
    assert data_command.VOC_DIFFICULT_MODES == VOC_DIFFICULT_MODES


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", r"4 columns; expected 5 \(class cx cy w h\)"),
    ("0 0.5 0.5 0.2 0.2 0.9", r"6 columns; .* extra columns such as a confidence are not supported"),
    ("0 0.1 0.1 0.2 0.1 0.2 0.2 0.3", "8 columns; expected 5"),  # a polygon needs x y pairs
    ("0 0.5 abc 0.2 0.2", "value 'abc' is not a number"),
    ("0 0.5 nan 0.2 0.2", "value 'nan' is not a finite number"),
    ("cat 0.5 0.5 0.2 0.2", "class index 'cat' is not a number"),
    ("1.5 0.5 0.5 0.2 0.2", "class index '1.5' is not an integer"),
    ("3 0.5 0.5 0.2 0.2", r"class index 3 is out of range: there are 3 class names \(0..2\)"),
    ("-1 0.5 0.5 0.2 0.2", "class index -1 is out of range"),
    ("0 0.5 0.5 1.2 0.2", r"value 1.2 is outside \[0, 1\]"),
    (f"0 0.5 0.5 0.2 {-2 * NORMALISED_TOLERANCE}", r"is outside \[0, 1\]"),
    ("0 0.5 0.5 0 0.2", "zero or negative box width or height"),
    ("0 0.5 0.5 0.2 -0.0001", "zero or negative box width or height"),
])
def test_malformed_label_line_names_file_and_line(yolo_yaml, line, message):
    label = yolo_yaml / "labels" / "train" / "a.txt"
    label.write_text(f"0 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(DataError, match=message) as info:
        read_yolo(yolo_yaml)
    assert str(info.value).startswith(f"{label}, line 2: ")


def test_label_file_without_image_is_refused(yolo_yaml):
    (yolo_yaml / "images" / "train" / "d.png").unlink()
    with pytest.raises(DataError, match=r"d.txt: no image for this label file in .*1 label files without"):
        read_yolo(yolo_yaml)


@pytest.mark.parametrize("files, message", [
    ({}, "no class names file"),
    ({"classes.txt": "a\n\nb\n"}, r"classes.txt, line 2: empty class name"),
    ({"classes.txt": "a\nb\na\n"}, "repeated class names a"),
    ({"classes.txt": "a\n", "obj.names": "b\n"}, "disagree"),
])
def test_names_file_problems(tmp_path, files, message):
    src = tmp_path / "yolo"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    write_image(src / "images" / "a.png", 10, 10)
    for name, text in files.items():
        (src / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_yolo(src)


@pytest.mark.parametrize("text, message", [
    ("train: images/train\n", "missing or invalid 'names'"),
    ("train: images/train\nnames: {1: a}\n", "needs the class indices 0..N-1"),
    ("train: images/train\nnc: 2\nnames: [a]\n", "'nc' is 2 but 'names' lists 1 classes"),
    ("train: images/nowhere\nnames: [a]\n", "'train' 'images/nowhere': .* not found"),
    ("names: [a]\n", r"no split paths \(train, val, test\)"),
    ("train: [images/train\n", "not valid YAML"),
])
def test_data_yaml_problems(yolo_yaml, text, message):
    (yolo_yaml / "data.yaml").write_text(text)
    with pytest.raises(DataError, match=message) as info:
        read_yolo(yolo_yaml)
    assert str(info.value).startswith(str(yolo_yaml / "data.yaml"))


def test_malformed_xml_names_file(voc_dir):
    xml = voc_dir / "Annotations" / "img2.xml"
    xml.write_text("<annotation><object></annotation>")
    with pytest.raises(DataError, match="malformed XML") as info:
        read_voc(voc_dir)
    assert str(info.value).startswith(f"{xml}: ")


@pytest.mark.parametrize("objects_xml, message", [
    ("<object><name>cat</name></object>", r"object 1 \('cat'\): no <bndbox>"),
    ("<object><bndbox><xmin>1</xmin></bndbox></object>", "object 1: no <name>"),
    ("<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox></object>",
     "<bndbox> has no <ymax>"),
    ("<object><name>cat</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>"
     "</object>", "<xmin> 'a' is not a number"),
    ("<object><name>cat</name><bndbox><xmin>9</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>"
     "</object>", "zero or negative box width or height"),
    ("<object><name>cat</name><difficult>2</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
     "<ymax>5</ymax></bndbox></object>", "<difficult> must be 0 or 1"),
    ("<object><name>cat</name><bndbox><xmin>40</xmin><ymin>1</ymin><xmax>50</xmax><ymax>5</ymax></bndbox>"
     "</object>", "lies outside the 30x30 image"),
])
def test_bad_voc_object_names_file(voc_dir, objects_xml, message):
    xml = voc_dir / "Annotations" / "img2.xml"
    xml.write_text(f"<annotation><filename>img2.jpg</filename>{objects_xml}</annotation>")
    with pytest.raises(DataError, match=message) as info:
        read_voc(voc_dir)
    assert str(info.value).startswith(f"{xml}")


def test_voc_missing_files(voc_dir):
    (voc_dir / "JPEGImages" / "img2.jpg").unlink()
    with pytest.raises(DataError, match=r"img2.xml: image not found in .*JPEGImages"):
        read_voc(voc_dir)
    (voc_dir / "ImageSets" / "Main" / "val.txt").write_text("img3\n")
    with pytest.raises(DataError, match=r"img3.xml: annotation file not found"):
        read_voc(voc_dir)
    with pytest.raises(DataError, match="not a Pascal VOC folder"):
        read_voc(voc_dir / "Annotations")


def test_voc_size_must_match_the_image(voc_dir):
    xml = voc_dir / "Annotations" / "img1.xml"
    xml.write_text(voc_xml("img1.jpg", (64, 40), [("dog", 0, (1, 1, 10, 20))]))
    with pytest.raises(DataError, match=r"img1.xml: <size> says 64x40 but .*img1.jpg is 60x40 pixels"):
        read_voc(voc_dir)


def test_cli_error_is_one_line_and_leaves_no_output_folder(voc_dir, tmp_path, capsys):
    (voc_dir / "Annotations" / "img2.xml").write_text("<annotation>")
    out = tmp_path / "new" / "coco"
    assert _convert(["--from", "voc", str(voc_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asag data: error: ") and err.count("\n") == 1 and "img2.xml: malformed XML" in err
    assert not out.exists()
