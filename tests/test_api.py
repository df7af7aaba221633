"""Loading a checkpoint for prediction and evaluation: its label map must fit the model, and a checkpoint
with the wrong content is one line naming the file; device strings."""

import pytest
import torch

from asag.api import Detector, load_model, resolve_device
from asag.cli import main
from asag.errors import CheckpointError, ConfigError


def with_label_map(tiny_checkpoint, tmp_path, num_categories):
    ckpt = torch.load(tiny_checkpoint / "ckpt.pth", weights_only=True)
    ckpt["label_map"] = {"category_ids": list(range(1, num_categories + 1)),
                         "names": [f"c{i}" for i in range(num_categories)]}
    path = tmp_path / f"labels{num_categories}.pth"
    torch.save(ckpt, path)
    return path


def test_label_map_that_fits_loads(tiny_checkpoint, tmp_path):
    _, cfg, labels = load_model(with_label_map(tiny_checkpoint, tmp_path, 5))
    assert cfg.model.num_classes == 5 and list(labels.names) == ["c0", "c1", "c2", "c3", "c4"]


@pytest.mark.parametrize("num_categories, relation", [(3, "fewer"), (7, "more")])
def test_label_map_that_does_not_fit_the_classes_is_refused_on_load(tiny_checkpoint, tmp_path, capsys,
                                                                   num_categories, relation):
    path = with_label_map(tiny_checkpoint, tmp_path, num_categories)
    message = f"{path}: its label map has {num_categories} categories, {relation} than the model's " \
              f"model.num_classes=5"
    with pytest.raises(CheckpointError, match=message):
        Detector.from_checkpoint(path, device="cpu")
    image = next((tiny_checkpoint / "data" / "images" / "val").iterdir())
    data = f"data.root={tiny_checkpoint / 'data'}"
    for argv in (["predict", str(path), str(image), "--out", str(tmp_path / "p")],
                 ["eval", str(path), data, "--out", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "metrics.json").exists()


def edited(tiny_checkpoint, tmp_path, edit):
    ckpt = torch.load(tiny_checkpoint / "ckpt.pth", weights_only=True)
    edit(ckpt)
    path = tmp_path / "edited.pth"
    torch.save(ckpt, path)
    return path


def _shrink_first_weight(ckpt):
    key = next(k for k, v in ckpt["model"].items() if v.ndim == 4)
    ckpt["model"][key] = ckpt["model"][key][:, :1]


def _two_shape_errors(ckpt):
    keys = [k for k, v in ckpt["model"].items() if v.ndim == 4][:2]
    for key in keys:
        ckpt["model"][key] = ckpt["model"][key][:1]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("config"), "no model configuration stored in this checkpoint"),
        (lambda c: c["config"].pop("model"), "no model configuration stored in this checkpoint"),
        (lambda c: c["config"]["model"].pop("backbone"), "the stored configuration is malformed (no section "
                                                         "'backbone')"),
        (lambda c: c["config"]["model"].update(num_classes="five"),
         "the stored configuration is invalid: model.num_classes: expected an integer"),
        (lambda c: c.pop("model"), "no model weights stored in this checkpoint"),
        (_shrink_first_weight, "weights do not fit the stored configuration: Error(s) in loading state_dict "
                               "for ASAG; size mismatch for backbone."),
        (lambda c: c.update(label_map={"names": ["a"] * 5}),
         "the stored label map has no 'category_ids' entry"),
        (lambda c: c.update(label_map={"category_ids": ["x"] * 5, "names": ["a"] * 5}),
         "the stored label map is malformed"),
    ],
    ids=["no_config", "no_model_section", "no_backbone_section", "bad_value", "no_weights", "shape",
         "label_map_key", "label_map_value"],
)
def test_readable_checkpoint_with_wrong_content_is_one_line_naming_the_file(
        tiny_checkpoint, tmp_path, capsys, edit, message):
    path = edited(tiny_checkpoint, tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    image = next((tiny_checkpoint / "data" / "images" / "val").iterdir())
    assert main(["predict", str(path), str(image), "--out", str(tmp_path / "p")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0]


def test_every_shape_that_does_not_fit_is_named(tiny_checkpoint, tmp_path):
    path = edited(tiny_checkpoint, tmp_path, _two_shape_errors)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value).count("size mismatch for") == 2 and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["foo", "cuda:abc", "cpu:1", "meta", "cuda:99", "gpu"])
def test_unknown_device_strings_are_refused(name, tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(ConfigError, match="device"):
        resolve_device(name)
    image = next((tiny_checkpoint / "data" / "images" / "val").iterdir())
    data = f"data.root={tiny_checkpoint / 'data'}"
    for argv in (["predict", str(tiny_checkpoint / "ckpt.pth"), str(image), "--device", name],
                 ["eval", str(tiny_checkpoint / "ckpt.pth"), data, "--device", name],
                 ["train", "tiny_cpu", data, "--device", name],
                 ["train", "tiny_cpu", data, f"runtime.device={name}"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"device {name!r}" in err and "Traceback" not in err
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto").type in ("cpu", "cuda")


def test_nms_iou_hides_same_class_near_duplicates_only(tiny_checkpoint, tmp_path):
    from asag.structures import Detections

    detector = Detector.from_checkpoint(with_label_map(tiny_checkpoint, tmp_path, 5), device="cpu")
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],    # best
                          [0.0, 0.0, 10.0, 9.0],     # IoU 0.9 with the best, same class: hidden
                          [0.0, 0.0, 10.0, 9.0],     # the same box, another class: kept
                          [0.0, 0.0, 10.0, 4.0],     # IoU 0.4 with the best: kept
                          [20.0, 20.0, 30.0, 30.0]])  # elsewhere, below the threshold: dropped
    dets = Detections(boxes, torch.tensor([0.9, 0.8, 0.7, 0.6, 0.2]), torch.tensor([1, 1, 2, 1, 1]))
    plain = detector.to_detections(dets, score_threshold=0.5)
    assert [d.score for d in plain] == [0.9, 0.8, 0.7, 0.6]  # default: the model's detections as they are
    hidden = detector.to_detections(dets, score_threshold=0.5, nms_iou=0.5)
    assert [(d.score, d.category_name) for d in hidden] == [(0.9, "c1"), (0.7, "c2"), (0.6, "c1")]
    assert [d.score for d in detector.to_detections(dets, nms_iou=0.95)] == [0.9, 0.8, 0.7, 0.6, 0.2]
    with pytest.raises(ConfigError, match="nms_iou"):
        detector.to_detections(dets, nms_iou=1.5)
