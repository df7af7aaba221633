import json

import pytest
import torch
from coco_files import write_image

from asag.cli import main
from asag.data.coco import CocoDetection, DataWarning
from asag.data.crowdhuman import convert_crowdhuman, odgt_to_coco
from asag.data.transforms import DetectionTransform
from asag.errors import DataError

RECORDS = [
    {
        "ID": "273271,c9db000d5146c15",
        "gtboxes": [
            {"tag": "person", "fbox": [10, 20, 30, 60], "vbox": [12, 22, 20, 40], "hbox": [15, 20, 10, 10],
             "extra": {"box_id": 0, "occ": 0}},
            {"tag": "person", "fbox": [50, 10, 40, 100], "extra": {"box_id": 1, "ignore": 1}},
            {"tag": "mask", "fbox": [0, 0, 20, 20], "extra": {"ignore": 1}},
            # partly outside the image: the data set clips it
            {"tag": "person", "fbox": [-5, 60, 30, 50], "extra": {"box_id": 2, "ignore": 0}},
        ],
    },
    {"ID": "284193,faa9000f2678b5e", "gtboxes": []},
]


def _write(tmp_path, records=RECORDS, lines=None):
    image_dir = tmp_path / "Images"
    image_dir.mkdir()
    write_image(image_dir / "273271,c9db000d5146c15.jpg", 100, 80)
    write_image(image_dir / "284193,faa9000f2678b5e.jpg", 64, 48)
    odgt = tmp_path / "annotation_val.odgt"
    odgt.write_text("\n".join(lines if lines is not None else [json.dumps(r) for r in records]) + "\n")
    return odgt, image_dir


def test_odgt_to_coco(tmp_path):
    odgt, image_dir = _write(tmp_path)
    data = odgt_to_coco(odgt, image_dir)
    assert data["categories"] == [{"id": 1, "name": "person", "supercategory": "person"}]
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        (1, "273271,c9db000d5146c15.jpg", 100, 80),
        (2, "284193,faa9000f2678b5e.jpg", 64, 48),
    ]
    anns = data["annotations"]
    assert [a["iscrowd"] for a in anns] == [0, 1, 1, 0]
    assert [a["bbox"] for a in anns] == [box["fbox"] for box in RECORDS[0]["gtboxes"]]
    assert {a["image_id"] for a in anns} == {1} and [a["id"] for a in anns] == [1, 2, 3, 4]
    assert anns[0]["area"] == 1800.0 and anns[0]["vbox"] == [12, 22, 20, 40]


def test_converted_json_trains_on_person_boxes_only(tmp_path):
    odgt, image_dir = _write(tmp_path)
    out = tmp_path / "coco" / "val.json"
    summary = convert_crowdhuman(odgt, image_dir, out)
    assert (summary.images, summary.boxes, summary.ignore_regions) == (2, 2, 2)
    with pytest.warns(DataWarning, match="1 boxes extending outside their image were clipped"):
        ds = CocoDetection(out, image_dir, transforms=DetectionTransform(mean=None, std=None))
    assert len(ds) == 2
    target = ds[0].target
    assert target.labels.tolist() == [0, 0]
    # fbox (10,20,30,60) and (-5,60,30,50) clipped to (0,60)-(25,80) in a 100x80 image
    expected = torch.tensor([[25 / 100, 50 / 80, 30 / 100, 60 / 80],
                             [12.5 / 100, 70 / 80, 25 / 100, 20 / 80]])
    torch.testing.assert_close(target.boxes, expected)
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 4  # the ignore regions stay for evaluation


def test_missing_image_named(tmp_path):
    odgt, image_dir = _write(tmp_path)
    (image_dir / "284193,faa9000f2678b5e.jpg").unlink()
    with pytest.raises(DataError, match="line 2: image '284193,faa9000f2678b5e' not found in") as info:
        odgt_to_coco(odgt, image_dir)
    assert str(odgt) in str(info.value)


def test_malformed_line_named(tmp_path):
    odgt, image_dir = _write(tmp_path, lines=[json.dumps(RECORDS[0]), "{not json"])
    with pytest.raises(DataError, match="annotation_val.odgt, line 2: malformed JSON"):
        odgt_to_coco(odgt, image_dir)


@pytest.mark.parametrize("fbox", [["1", 2, 3, 4], [1, 2, 3, True], [1, 2, 3]])
def test_non_numeric_fbox_named(tmp_path, fbox):
    bad = [{"ID": "273271,c9db000d5146c15", "gtboxes": [{"tag": "person", "fbox": fbox}]}]
    odgt, image_dir = _write(tmp_path, records=bad)
    with pytest.raises(DataError, match="line 1: malformed 'fbox'"):
        odgt_to_coco(odgt, image_dir)


def test_negative_fbox_named(tmp_path):
    bad = [{"ID": "273271,c9db000d5146c15", "gtboxes": [{"tag": "person", "fbox": [1, 2, -3, 4]}]}]
    odgt, image_dir = _write(tmp_path, records=bad)
    with pytest.raises(DataError, match="line 1: 'fbox' \\[1, 2, -3, 4\\] has a negative width"):
        odgt_to_coco(odgt, image_dir)


def test_cli_convert(tmp_path, capsys):
    odgt, image_dir = _write(tmp_path)
    out = tmp_path / "val.json"
    assert main(["data", "convert-crowdhuman", "--odgt", str(odgt), "--images", str(image_dir),
                 "--out", str(out)]) == 0
    assert "2 images, 2 person boxes, 2 ignore regions" in capsys.readouterr().out
    assert json.loads(out.read_text())["categories"][0]["name"] == "person"
    assert main(["data", "convert-crowdhuman", "--odgt", str(tmp_path / "x.odgt"), "--images", str(image_dir),
                 "--out", str(out), "--overwrite"]) == 2
    assert "annotation file not found" in capsys.readouterr().err
    assert json.loads(out.read_text())["categories"][0]["name"] == "person"  # a failed run replaces nothing
