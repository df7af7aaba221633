"""Loading a checkpoint for prediction and evaluation: its label map must fit the model."""

import pytest
import torch

from asag.api import Detector, load_model
from asag.cli import main
from asag.errors import CheckpointError


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
