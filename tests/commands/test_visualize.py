"""``asag visualize`` end to end on synthetic images with a tiny model: the written figures are opened and
looked at (panel layout, ground-truth boxes in their class colours, heat maps), and bad input gives a
message and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from asag.build import build_model
from asag.cli import main
from asag.config import load_config
from asag.data.synthetic import SHAPE_CLASSES, generate_synthetic
from asag.engine.checkpoint import save_checkpoint
from asag.viz.draw import PANEL_GAP, TITLE_HEIGHT, class_colour
from asag.viz.features import COLOUR_BAR_HEIGHT
from asag.viz.pipeline import ANCHOR_COLOUR


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two synthetic validation images and a checkpoint of a freshly built tiny model."""
    root = tmp_path_factory.mktemp("visualize")
    paths = generate_synthetic(root / "data", 1, seed=5, val_images=2)
    cfg = load_config("tiny_cpu", [f"data.root={root / 'data'}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    labels = {"category_ids": list(range(1, 6)), "names": list(SHAPE_CLASSES)}
    checkpoint = save_checkpoint(root / "tiny.pth", model=model, optimizer=None, scheduler=None, scaler=None,
                                 epoch=0, iteration=0, config=cfg.to_dict(), label_map=labels)
    return checkpoint, paths


def first_image(paths):
    return sorted(paths.val_images.iterdir())[0]


def test_writes_a_panel_per_stage_with_ground_truth_drawn(setup, tmp_path, capsys):
    checkpoint, paths = setup
    image_path = first_image(paths)
    code = main(["visualize", str(checkpoint), str(image_path), "--ann", str(paths.val_json),
                 "--features", "P3,P5", "--out", str(tmp_path), "--separate", "--score-threshold", "0.01"])
    assert code == 0
    assert "anchors" in capsys.readouterr().out
    stem = image_path.stem
    for name in ("pipeline", "features", "patches", "anchors", "proposals", "detections", "gt"):
        assert (tmp_path / f"{stem}_{name}.png").is_file(), name
    image = PIL.Image.open(image_path).convert("RGB")
    w, h = image.size
    figure = PIL.Image.open(tmp_path / f"{stem}_pipeline.png").convert("RGB")
    assert figure.size == (5 * w + 4 * PANEL_GAP, h + TITLE_HEIGHT)  # one row: the five stages
    features = PIL.Image.open(tmp_path / f"{stem}_features.png")
    assert features.size == (2 * w + PANEL_GAP, h + TITLE_HEIGHT + COLOUR_BAR_HEIGHT)

    # the last panel is the ground truth: every annotated box in its class colour
    gt_panel = np.asarray(figure)[TITLE_HEIGHT:, 4 * (w + PANEL_GAP) :][:h, :w]
    data = json.loads(paths.val_json.read_text())
    image_id = next(i["id"] for i in data["images"] if i["file_name"] == image_path.name)
    anns = [a for a in data["annotations"] if a["image_id"] == image_id]
    assert anns
    for ann in anns:
        x, y, bw, bh = ann["bbox"]
        colour = np.asarray(class_colour(ann["category_id"]))
        x2, y2 = min(int(x + bw), w - 1), min(int(y + bh), h - 1)
        side = gt_panel[int(y) : y2 + 1, max(x2 - 1, 0) : x2 + 1]  # right side, where no caption sits
        assert (side == colour).all(-1).any(), ann
    # the anchor panel (second) holds white outlines, the separate file is the same picture
    anchors = np.asarray(PIL.Image.open(tmp_path / f"{stem}_anchors.png").convert("RGB"))
    assert np.array_equal(anchors, np.asarray(figure)[TITLE_HEIGHT:, w + PANEL_GAP : 2 * w + PANEL_GAP])
    assert (anchors == np.asarray(ANCHOR_COLOUR)).all(-1).sum() > 50


def test_one_stage_at_a_time(setup, tmp_path):
    checkpoint, paths = setup
    image_path = first_image(paths)
    assert main(["visualize", str(checkpoint), str(paths.val_images), "--stages", "anchors",
                 "--out", str(tmp_path), "--inference-level", "P5P6"]) == 0
    figures = sorted(tmp_path.glob("*_pipeline.png"))
    assert len(figures) == 2 and not list(tmp_path.glob("*_features.png"))
    w, h = PIL.Image.open(image_path).size
    assert PIL.Image.open(tmp_path / f"{image_path.stem}_pipeline.png").size == (w, h + TITLE_HEIGHT)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["missing.png"], "missing.png"),
        (["IMAGE", "--stages", "anchors,boxes"], "--stages: unknown value(s) boxes"),
        (["IMAGE", "--stages", "gt"], "--ann"),
        (["IMAGE", "--ann", "nope.json"], "nope.json"),
        (["IMAGE", "--features", "P7"], "--features: unknown value(s) P7"),
    ],
)
def test_bad_input_gives_a_message_and_exit_code_2(setup, tmp_path, capsys, extra, message):
    checkpoint, paths = setup
    args = [str(first_image(paths)) if a == "IMAGE" else a for a in extra]
    assert main(["visualize", str(checkpoint), *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("asag visualize: error:")


def test_missing_checkpoint_and_unreadable_image(setup, tmp_path, capsys):
    _, paths = setup
    assert main(["visualize", str(tmp_path / "none.pth"), str(first_image(paths))]) == 2
    assert "none.pth" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    checkpoint, _ = setup
    image = first_image(paths)
    assert main(["visualize", str(checkpoint), str(bad), str(image), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"asag visualize: error: {bad}: cannot read image" in err and "Traceback" not in err
    assert "1 of 2 images could not be read" in err
    assert (tmp_path / f"{image.stem}_pipeline.png").is_file()  # the readable image is still drawn


@pytest.mark.slow
def test_after_two_training_iterations(setup, tmp_path):
    _, paths = setup
    run = tmp_path / "run"
    # one training image: two epochs of one iteration
    assert main(["train", "tiny_cpu", f"data.root={paths.root}", f"runtime.output_dir={run}",
                 "data.batch_size=1", "schedule.epochs=2", "runtime.eval_every=0"]) == 0
    out = tmp_path / "vis"
    assert main(["visualize", str(run / "last.pth"), str(paths.val_images), "--ann", str(paths.val_json),
                 "--features", "P2,P3,P4,P5", "--out", str(out)]) == 0
    assert len(list(out.glob("*_pipeline.png"))) == 2 and len(list(out.glob("*_features.png"))) == 2


def test_inputs_with_the_same_stem_get_their_own_figures(setup, tmp_path, capsys):
    import shutil

    checkpoint, paths = setup
    first, second = sorted(paths.val_images.iterdir())[:2]
    for folder, source in (("a", first), ("b", second)):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "x.png")
    out = tmp_path / "out"
    assert main(["visualize", str(checkpoint), str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                 "--out", str(out), "--stages", "detections"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_x_png_pipeline.png", "b_x_png_pipeline.png"]
    first_figure, second_figure = (np.asarray(PIL.Image.open(out / f"{f}_x_png_pipeline.png")) for f in "ab")
    assert first_figure.shape != second_figure.shape or (first_figure != second_figure).any()
    assert "-> a_x_png_pipeline.png" in capsys.readouterr().out


def test_earlier_figures_are_never_replaced(setup, tmp_path, monkeypatch, capsys):
    checkpoint, paths = setup
    image = first_image(paths)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the default --out: a new folder each time
        assert main(["visualize", str(checkpoint), str(image)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["visualizations", "visualizations_2"]
    first = tmp_path / "visualizations"
    before = (first / f"{image.stem}_pipeline.png").read_bytes()
    capsys.readouterr()
    # --separate would also write <stem>_<stage>.png: only the pipeline figure is in the way
    assert main(["visualize", str(checkpoint), str(image), "--out", str(first), "--separate"]) == 2
    err = capsys.readouterr().err
    assert f"--out {first} already holds {image.stem}_pipeline.png; pass --overwrite" in err
    assert (first / f"{image.stem}_pipeline.png").read_bytes() == before
    assert main(["visualize", str(checkpoint), str(image), "--out", str(first), "--features", "P3"]) == 2
    assert main(["visualize", str(checkpoint), str(image), "--out", str(first), "--overwrite"]) == 0
    assert main(["visualize", str(tmp_path / "none.pth"), str(image)]) == 2  # a failed run leaves no folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["visualizations", "visualizations_2"]
