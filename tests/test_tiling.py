"""Tiled prediction of large images (asag.tiling): tile grids computed by hand, boxes mapped back to the
full image exactly, the merge rule (cut fragments dropped, duplicates suppressed), and the API / CLI."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.ops import batched_nms

from asag.api import Detector
from asag.cli import main
from asag.errors import ConfigError
from asag.structures import Detections
from asag.tiling import (
    DEFAULT_MERGE_IOU,
    FULL_IMAGE,
    Tile,
    TiledDetections,
    cut_boxes,
    gather_tiles,
    merge_tiles,
    predict_tiled,
    tile_grid,
    tile_starts,
)

# ------------------------------------------------------------------------------------------- grids


@pytest.mark.parametrize("length, tile, overlap, starts", [
    (1000, 400, 0.2, [0, 320, 600]),  # stride 320; the third tile shifted back from 640 to stay inside
    (1000, 400, 0.0, [0, 400, 600]),
    (1024, 256, 0.25, [0, 192, 384, 576, 768]),  # stride 192 reaches the end exactly
    (401, 400, 0.5, [0, 1]),
    (400, 400, 0.5, [0]),  # as long as a tile: one
    (300, 400, 0.2, [0]),  # shorter than a tile: one tile, as long as the side
    (100, 40, 0.99, list(range(61))),  # stride round(0.4) -> at least 1
])
def test_tile_starts_by_hand(length, tile, overlap, starts):
    assert tile_starts(length, tile, overlap) == starts


def test_tile_grid_rows_sizes_and_interior_edges():
    tiles = tile_grid(1000, 300, 400, 0.2)
    assert tiles == [Tile(0, 0, 400, 300, (False, False, True, False)),
                     Tile(320, 0, 720, 300, (True, False, True, False)),
                     Tile(600, 0, 1000, 300, (True, False, False, False))]
    grid = tile_grid(700, 700, 400, 0.5)  # starts 0, 200, 300 per side: 3 x 3, row by row
    assert [(t.x0, t.y0) for t in grid[:4]] == [(0, 0), (200, 0), (300, 0), (0, 200)]
    assert grid[4] == Tile(200, 200, 600, 600, (True, True, True, True))
    assert tile_grid(50, 60, 400) == [Tile(0, 0, 50, 60, (False, False, False, False))]


@pytest.mark.parametrize("tile, overlap, message", [
    (16, 0.2, "tile must be >= 32"), (400, 1.0, r"tile_overlap must be in \[0, 1\)"),
    (400, -0.1, "tile_overlap"), (400.0, 0.2, "tile must be an integer"),
])
def test_bad_tiling_is_one_config_error(tile, overlap, message):
    with pytest.raises(ConfigError, match=message):
        tile_grid(1000, 1000, tile, overlap)


# ------------------------------------------------------------------------------- mapping, cut boxes


def test_boxes_are_mapped_back_by_the_tile_offset_exactly():
    tiles = [Tile(0, 0, 400, 300, (False, False, True, False)),
             Tile(320, 0, 720, 300, (True, False, True, False))]
    per_tile = [Detections(torch.tensor([[10.25, 20.5, 30.0, 40.0]]), torch.tensor([0.9]), torch.tensor([2])),
                Detections(torch.tensor([[100.0, 5.0, 150.5, 60.0], [1.0, 2.0, 3.0, 4.0]]),
                           torch.tensor([0.8, 0.7]), torch.tensor([0, 1]))]
    full = Detections(torch.tensor([[0.0, 0.0, 700.0, 290.0]]), torch.tensor([0.6]), torch.tensor([3]))
    gathered = gather_tiles(per_tile, tiles, margin=4, full_image=full)
    assert gathered.boxes.tolist() == [[10.25, 20.5, 30.0, 40.0], [420.0, 5.0, 470.5, 60.0],
                                       [321.0, 2.0, 323.0, 4.0], [0.0, 0.0, 700.0, 290.0]]
    assert gathered.source.tolist() == [0, 1, 1, FULL_IMAGE]
    assert gathered.labels.tolist() == [2, 0, 1, 3]
    # only the box at 1 px from tile 1's interior left edge is cut; the full-image box never is
    assert gathered.cut.tolist() == [False, False, True, False]


def test_cut_boxes_only_near_interior_edges():
    tile = Tile(100, 0, 500, 400, (True, False, True, True))  # top edge is the image border
    boxes = torch.tensor([
        [103.0, 50, 150, 90],   # 3 px from the interior left edge: cut (margin 4)
        [105.0, 50, 150, 90],   # 5 px: not cut
        [200.0, 0, 250, 40],    # at the top, which is the image border: not cut
        [400.0, 50, 497, 90],   # 3 px from the right edge: cut
        [400.0, 50, 520, 90],   # past the right edge: cut
        [200.0, 300, 250, 396],  # 4 px from the bottom edge: cut
    ])
    assert cut_boxes(boxes, tile, margin=4).tolist() == [True, False, False, True, True, True]


# ------------------------------------------------------------------------------------- merge rule


def tiled(rows):
    """TiledDetections from rows (box, score, label, source, cut)."""
    boxes, scores, labels, source, cut = zip(*rows)
    return TiledDetections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores),
                           torch.tensor(labels), torch.tensor(source), torch.tensor(cut))


WHOLE = [250.0, 10, 340, 60]  # an object seen whole by tile 0
FRAGMENT = [320.0, 10, 340, 60]  # its part that tile 1 sees (cut at tile 1's left edge): IoU 0.22 only


@pytest.mark.parametrize("fragment_row, expected", [
    ((FRAGMENT, 0.95, 1, 1, True), [WHOLE]),  # dropped, although it scores higher (plain NMS keeps it)
    ((FRAGMENT, 0.95, 2, 1, True), [FRAGMENT, WHOLE]),  # another class: kept
    ((FRAGMENT, 0.95, 1, 0, True), [FRAGMENT, WHOLE]),  # the same tile: kept (a tile's own boxes stand)
    ((FRAGMENT, 0.95, 1, 1, False), [FRAGMENT, WHOLE]),  # not cut: kept (IoU 0.22 < NMS IoU 0.5)
    (([300.0, 10, 380, 60], 0.95, 1, 1, True), [WHOLE]),  # IoA 40/80 = 0.5: dropped (>= min_ioa)
    (([310.0, 10, 390, 60], 0.95, 1, 1, True), [[310.0, 10, 390, 60], WHOLE]),  # IoA 0.375: kept
])
def test_merge_drops_cut_fragments_of_objects_another_tile_sees_whole(fragment_row, expected):
    merged = merge_tiles(tiled([(WHOLE, 0.9, 1, 0, False), fragment_row]))
    assert merged.boxes.tolist() == expected


def test_merge_keeps_the_fragments_of_an_object_no_tile_sees_whole_and_the_full_image_drops_them():
    left, right = ([100.0, 0, 400, 50], 0.8, 0, 0, True), ([320.0, 0, 600, 50], 0.7, 0, 1, True)
    assert merge_tiles(tiled([left, right])).scores.tolist() == pytest.approx([0.8, 0.7])
    full = ([90.0, 0, 610, 52], 0.6, 0, FULL_IMAGE, False)
    merged = merge_tiles(tiled([left, right, full]))
    assert merged.boxes.tolist() == [[90.0, 0, 610, 52]]


def test_merge_suppresses_duplicates_of_two_tiles_with_class_wise_nms():
    a = ([330.0, 10, 380, 60], 0.9, 0, 0, False)
    b = ([331.0, 11, 381, 61], 0.8, 0, 1, False)  # the same object seen whole by tile 1
    c = ([331.0, 11, 381, 61], 0.7, 1, 1, False)  # another class at the same place
    merged = merge_tiles(tiled([a, b, c]))
    assert merged.scores.tolist() == pytest.approx([0.9, 0.7]) and merged.labels.tolist() == [0, 1]
    assert len(merge_tiles(tiled([a, b, c]), nms_iou=0.99)) == 3


# ---------------------------------------------------------------------- end to end, a perfect detector

# One pure colour per object (its class is the value), so that the perfect detector below tells them apart.
COLOURS = {(255, 0, 0): 0, (0, 255, 0): 1, (255, 0, 255): 0, (0, 0, 255): 1}


class PerfectDetector:
    """Finds the pure-coloured rectangles of a crop: the box of the visible pixels, as a detector that
    sees only its tile would; the score falls with the distance of the box centre from the crop centre."""

    def __init__(self):
        self.batches = []

    def predict_raw(self, images):
        self.batches.append([image.size for image in images])
        return [self._detect(np.asarray(image)) for image in images]

    @staticmethod
    def _detect(pixels):
        h, w = pixels.shape[:2]
        boxes, scores, labels = [], [], []
        for colour, label in COLOURS.items():
            ys, xs = np.nonzero((pixels == colour).all(axis=2))
            if len(xs):
                box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
                centre = ((box[0] + box[2]) / (2 * w), (box[1] + box[3]) / (2 * h))  # relative
                off_centre = max(abs(centre[0] - 0.5), abs(centre[1] - 0.5))
                boxes.append(box)
                scores.append(1.0 - 0.5 * off_centre)
                labels.append(label)
        return Detections(torch.tensor(boxes).reshape(-1, 4), torch.tensor(scores), torch.tensor(labels))


def scene(objects, size=(1000, 300)):
    """A grey image with rectangles ``((x0, y0, x1, y1), colour)``."""
    canvas = PIL.Image.new("RGB", size, (90, 90, 90))
    for box, colour in objects:
        canvas.paste(colour, box)
    return canvas


def test_tiled_prediction_finds_each_object_once_at_its_exact_box():
    red, green, magenta, blue = COLOURS
    objects = [((250, 10, 340, 60), red),  # whole in tile 0, a 20 px fragment in tile 1
               ((500, 100, 560, 180), green),  # whole in tile 1 only
               ((640, 200, 700, 260), magenta),  # whole in tiles 1 and 2 (their overlap is 600-720)
               ((900, 250, 990, 300), blue)]  # tile 2, at the image border (bottom): not cut
    detector = PerfectDetector()
    merged = predict_tiled(detector, scene(objects), tile=400, overlap=0.2, batch_size=2)
    assert detector.batches == [[(400, 300), (400, 300)], [(400, 300)]]
    found = sorted(zip(merged.boxes.tolist(), merged.labels.tolist()))
    assert found == sorted(([float(v) for v in box], COLOURS[colour]) for box, colour in objects)


def test_plain_nms_would_keep_the_fragment_that_the_merge_rule_drops():
    detector = PerfectDetector()
    image = scene([((250, 10, 340, 60), (255, 0, 0))])
    tiles = tile_grid(image.width, image.height, 400, 0.2)
    gathered = gather_tiles(detector.predict_raw([image.crop(t.box) for t in tiles]), tiles, margin=4.0)
    assert gathered.boxes.tolist() == [[250.0, 10.0, 340.0, 60.0], [320.0, 10.0, 340.0, 60.0]]
    assert gathered.cut.tolist() == [False, True]
    assert len(batched_nms(gathered.boxes, gathered.scores, gathered.labels, 0.5)) == 2
    assert merge_tiles(gathered).boxes.tolist() == [[250.0, 10.0, 340.0, 60.0]]


def test_full_image_pass_finds_an_object_larger_than_a_tile():
    detector = PerfectDetector()
    image = scene([((100, 50, 900, 250), (0, 255, 0))])  # 800 px wide: no 400 px tile sees it whole
    assert len(predict_tiled(detector, image, tile=400, overlap=0.2)) == 3  # one fragment per tile
    merged = predict_tiled(detector, image, tile=400, overlap=0.2, full_image=True)
    assert merged.boxes.tolist() == [[100.0, 50.0, 900.0, 250.0]]


# ----------------------------------------------------------------------------------- API and CLI


def test_api_image_smaller_than_a_tile_is_predict_with_merging_nms(tiny_checkpoint):
    detector = Detector.from_checkpoint(tiny_checkpoint / "ckpt.pth", device="cpu")
    image = val_image(tiny_checkpoint)
    tiled_dets = detector.predict_tiled(image, tile=max(image.size) + 1)
    expected = detector.to_detections(detector.predict_raw([image])[0], nms_iou=DEFAULT_MERGE_IOU)
    assert len(expected) > 0 and tiled_dets == expected


def val_image(tiny_checkpoint, size=None):
    image = PIL.Image.open(sorted((tiny_checkpoint / "data" / "images" / "val").iterdir())[0]).convert("RGB")
    return image.crop((0, 0, *size)) if size else image


def test_cli_tile_writes_boxes_in_full_image_pixels(tiny_checkpoint, tmp_path):
    path = tmp_path / "large.png"
    val_image(tiny_checkpoint, (200, 160)).save(path)  # tiles of 128 px, stride 96: 2 x 2
    out = tmp_path / "out"
    argv = ["predict", str(tiny_checkpoint / "ckpt.pth"), str(path), "--out", str(out), "--tile", "128",
            "--tile-overlap", "0.25", "--batch-size", "4", "--score-threshold", "0", "--topk", "10", "--draw"]
    assert main(argv) == 0
    records = json.loads((out / "predictions.json").read_text())
    boxes = [d["box_xyxy"] for d in records[0]["detections"]]
    assert boxes and max(b[0] for b in boxes) > 72  # boxes of the right tiles, in full-image pixels
    assert (out / records[0]["drawing"]).is_file()
    detector = Detector.from_checkpoint(tiny_checkpoint / "ckpt.pth", device="cpu")
    api = detector.predict_tiled(path, 128, 0.25, topk=10)
    assert [d.to_dict() for d in api] == records[0]["detections"]


@pytest.mark.parametrize("options, message", [
    (["--tile-overlap", "0.3"], "asag predict: error: --tile-overlap goes with --tile SIZE"),
    (["--tile-full-image"], "asag predict: error: --tile-full-image goes with --tile SIZE"),
])
def test_cli_tile_options_without_tile_are_one_line(tiny_checkpoint, tmp_path, capsys, options, message):
    image = sorted((tiny_checkpoint / "data" / "images" / "val").iterdir())[0]
    assert main(["predict", str(tiny_checkpoint / "ckpt.pth"), str(image), "--out", str(tmp_path / "p"),
                 *options]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("options, message", [
    (["--tile", "8"], "argument --tile: must be >= 32, got 8"),
    (["--tile", "64", "--tile-overlap", "1"], "argument --tile-overlap: must be in [0, 1), got 1.0"),
])
def test_cli_bad_tile_values_are_refused_by_the_parser(tiny_checkpoint, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tiny_checkpoint / "ckpt.pth"), "x.png", *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
