"""Starting from a trained detector (--init): tensor matching, class remapping by name, head mapping,
the authors' layout, refusals, and freezing."""

import argparse
import math

import pytest
import torch
from tests.official import FIXTURES_DIR

from asag.build import build_model, init_model
from asag.cli import main
from asag.config import load_config
from asag.data.labels import LabelMap
from asag.engine.checkpoint import save_checkpoint
from asag.engine.finetune import INIT_REPORT, class_axes, class_pairs, initialize_from, read_init_source
from asag.errors import CheckpointError
from asag.modeling.blocks import PRIOR_PROB

PRIOR_BIAS = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
SOURCE_NAMES = ("rectangle", "ellipse", "triangle", "cross", "ring")
CLASSIFIERS = ("proposal.fc_cls", "decoder.heads.0.fc_cls", "decoder.heads.1.fc_cls")


def labels(names) -> LabelMap:
    return LabelMap(tuple(range(1, len(names) + 1)), tuple(names))


def tiny(overrides=(), num_classes=5, seed=0):
    cfg = load_config("tiny_cpu", [f"model.num_classes={num_classes}", *overrides])
    torch.manual_seed(seed)
    return build_model(cfg), cfg


def save(path, model, cfg, names=SOURCE_NAMES):
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, scaler=None, epoch=0, iteration=0,
                    config=cfg.to_dict(), label_map=labels(names).to_dict() if names else {})
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny 5-class checkpoint (random weights, seed 1) and its model."""
    model, cfg = tiny(seed=1)
    path = save(tmp_path_factory.mktemp("source") / "source.pth", model, cfg)
    return path, model.state_dict()


def test_class_axes_find_every_classifier_whatever_the_decoder():
    for decoder in ("adamixer", "sparse_rcnn", "deformable"):
        _, cfg = tiny([f"model.decoder.type={decoder}"])

        def build(n, cfg=cfg):
            cfg.model.num_classes = n
            return build_model(cfg)

        axes = class_axes(build, 5)
        leaf = "class_logits" if decoder == "sparse_rcnn" else "fc_cls"
        expected = {"proposal.fc_cls.weight", "proposal.fc_cls.bias",
                    *(f"decoder.heads.{h}.{leaf}.{p}" for h in (0, 1) for p in ("weight", "bias"))}
        assert axes == dict.fromkeys(expected, 0), decoder


def test_classes_are_matched_by_name_ignoring_case_and_outer_spaces():
    pairs, by = class_pairs(labels(SOURCE_NAMES), labels(["Ring ", "star", "RECTANGLE"]))
    assert (pairs, by) == ([(0, 4), (2, 0)], "name")
    with pytest.raises(CheckpointError, match="'ring' more than once"):
        class_pairs(labels(SOURCE_NAMES), labels(["ring", "Ring"]))


def test_init_copies_shared_class_rows_and_keeps_fresh_rows_for_new_classes(source):
    path, state = source
    model, cfg = tiny(num_classes=4, seed=7)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    target = labels(["Cross", "star", "rectangle", "heart"])
    report = init_model_with(model, cfg, path, target)
    after = model.state_dict()
    for prefix in CLASSIFIERS:
        w, b = after[f"{prefix}.weight"], after[f"{prefix}.bias"]
        sw, sb = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
        assert torch.equal(w[0], sw[3]) and torch.equal(b[0], sb[3])  # Cross <- cross
        assert torch.equal(w[2], sw[0]) and torch.equal(b[2], sb[0])  # rectangle <- rectangle
        for new in (1, 3):  # the fresh model's own initialisation: its weights and the prior bias
            assert torch.equal(w[new], fresh[f"{prefix}.weight"][new])
            assert b[new].item() == pytest.approx(PRIOR_BIAS)
    others = [k for k in after if not k.startswith(CLASSIFIERS)]
    assert all(torch.equal(after[k], state[k]) for k in others)
    assert report.class_pairs == [("Cross", "cross"), ("rectangle", "rectangle")]
    assert report.new_classes == ["star", "heart"]
    assert report.dropped_classes == ["ellipse", "triangle", "ring"]
    assert len(report.remapped) == 6 and not report.fresh and not report.unused
    assert len(report.loaded) == len(after) - 6
    table = report.table()
    assert "remapped      6 tensors" in table and "classes copied by name: Cross, rectangle" in table
    assert "new classes (fresh rows): star, heart" in table


def init_model_with(model, cfg, path, target, **kw):
    cfg.finetune.init = str(path)
    for key, value in kw.items():
        setattr(cfg.finetune, key, value)
    return init_model(model, cfg, target)


def test_a_checkpoint_without_names_maps_classes_by_position_only_when_counts_agree(tmp_path, source):
    _, state = source
    model, cfg = tiny(seed=1)
    path = save(tmp_path / "unnamed.pth", model, cfg, names=None)
    same, cfg5 = tiny(seed=3)
    report = init_model_with(same, cfg5, path, labels("abcde"))
    assert report.matched_by == "position" and len(report.class_pairs) == 5
    assert torch.equal(same.state_dict()["proposal.fc_cls.weight"], state["proposal.fc_cls.weight"])
    other, cfg3 = tiny(num_classes=3, seed=3)
    report = init_model_with(other, cfg3, path, labels("abc"))
    assert report.matched_by == "none" and report.new_classes == ["a", "b", "c"]


def test_one_head_model_takes_the_checkpoints_used_head(source):
    path, state = source
    model, cfg = tiny(["model.decoder.num_heads=1"], seed=5)
    report = init_model_with(model, cfg, path, labels(SOURCE_NAMES))
    after = model.state_dict()
    assert "head 1 of the checkpoint's 2" in report.head_note
    assert torch.equal(after["decoder.heads.0.fc_cls.weight"], state["decoder.heads.1.fc_cls.weight"])
    assert torch.equal(after["decoder.head_embedding"], state["decoder.head_embedding"][1:])
    assert any(k.startswith("decoder.heads.1.") for k in report.unused) is False


def test_another_architecture_is_refused_in_one_line_unless_partial(source):
    path, state = source
    model, cfg = tiny(["model.decoder.type=sparse_rcnn", "model.variant=asag_s"], seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        init_model_with(model, cfg, path, labels(SOURCE_NAMES))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "does not fit" in message
    assert "decoder.heads.0." in message and "finetune.allow_partial=true" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    report = init_model_with(model, cfg, path, labels(SOURCE_NAMES), allow_partial=True)
    assert report.fresh and report.unused
    name = "neck.inner_blocks.0.0.weight"
    assert torch.equal(model.state_dict()[name], state[name])


def test_wider_model_is_refused(source):
    path, _ = source
    model, cfg = tiny(["model.hidden_dim=128", "model.neck.out_channels=128"])
    with pytest.raises(CheckpointError, match=r"neck\.inner_blocks\.0\.0\.weight \(64, 64, 1, 1\) vs \(128"):
        init_model_with(model, cfg, path, labels(SOURCE_NAMES))


def official_shapes(variant: str) -> dict[str, torch.Tensor]:
    """An authors'-layout state dict (the full default model's names and shapes): tensor ``i`` holds
    ``i + row index`` along its first axis, a broadcast view (a few bytes on disk)."""
    state = {}
    lines = (FIXTURES_DIR / f"official-state-dict-{variant}.txt").read_text().splitlines()
    for i, line in enumerate(lines):
        key, shape, _ = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        if not dims:
            state[key] = torch.tensor(float(i))
            continue
        rows = torch.arange(dims[0], dtype=torch.float32).add(i)
        state[key] = rows.reshape(dims[0], *([1] * (len(dims) - 1))).expand(dims)
    return state


def test_an_authors_release_file_loads_with_the_coco_label_map(tmp_path):
    path = tmp_path / "asag_a_r50.pth"
    torch.save({"model": official_shapes("asag-a"), "args": argparse.Namespace(lr=1e-4)}, path)
    source = read_init_source(path)
    assert source.kind == "release" and source.num_heads == 4 and source.used_head == 3
    assert len(source.label_map) == 80 and source.label_map.names[16] == "dog"
    cfg = load_config("asag_a_r50_1x_100q", ["model.num_classes=2"])
    model = build_model(cfg)
    report = initialize_from(model, source, labels(["dog", "Person"]), {**dict.fromkeys(
        [f"decoder.heads.{h}.fc_cls.{p}" for h in range(4) for p in ("weight", "bias")], 0),
        "proposal.fc_cls.weight": 0, "proposal.fc_cls.bias": 0})
    bias = model.state_dict()["decoder.heads.3.fc_cls.bias"]
    expected = source.state["decoder.heads.3.fc_cls.bias"]
    assert torch.equal(bias, expected[[16, 0]])
    assert report.class_pairs == [("dog", "dog"), ("Person", "person")] and len(report.dropped_classes) == 78
    assert not report.fresh and not report.unused


@pytest.mark.parametrize("kind, message", [
    ("missing", "checkpoint not found"),
    ("garbage", "truncated or corrupt"),
    ("pickled", "cannot be loaded safely"),
    ("foreign", "neither an asag checkpoint nor an authors' release checkpoint"),
    ("other_state", "not of an ASAG detector"),
])
def test_unreadable_or_foreign_init_files_are_one_line_errors(kind, message, tmp_path, source):
    path = tmp_path / "init.pth"
    marker = tmp_path / "marker"
    if kind == "garbage":  # a truncated checkpoint
        whole = source[0].read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "pickled":
        torch.save({"model": Marker(str(marker))}, path)
    elif kind == "foreign":
        torch.save({"epoch": 3}, path)
    elif kind == "other_state":
        torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError) as err:
        read_init_source(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


class Marker:
    """Unpickling it would create a file: it must never be unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_frozen_parts_get_no_gradient_and_keep_their_batch_norm_statistics():
    model, _ = tiny(["finetune.freeze=backbone_neck"])
    assert model.frozen_parts == ("backbone", "neck")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.neck.parameters())
    assert all(p.requires_grad for p in model.proposal.parameters())
    model.train()
    assert not model.backbone.training and not model.neck.training and model.decoder.training
    bn = model.backbone.body.bn1
    before = bn.running_mean.clone()
    model.backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)
    heads_only, _ = tiny(["finetune.freeze=all_but_heads"])
    assert heads_only.frozen_parts == ("backbone", "neck", "anchor_generator")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from asag.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root, 4, seed=3, val_images=2, classes=["ring", "star", "ellipse"])
    return root


def test_train_init_prints_and_saves_the_table(source, data_root, tmp_path, capsys):
    path, _ = source
    out = tmp_path / "run"
    args = ["train", "tiny_cpu", f"data.root={data_root}", "model.num_classes=3", "runtime.eval_every=0",
            "schedule.max_iters_per_epoch=1", "finetune.freeze=backbone", "--output-dir", str(out),
            "--init", str(path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    saved = (out / INIT_REPORT).read_text()
    assert saved.strip() in printed
    assert "classes copied by name: ring, ellipse" in saved
    assert "new classes (fresh rows): star" in saved
    assert "finetune.freeze=backbone: backbone frozen;" in printed and "M parameters train" in printed
    stored = torch.load(out / "last.pth", weights_only=True)
    assert stored["epoch"] == 0 and stored["config"]["finetune"]["init"] == str(path)


def test_init_with_resume_is_refused(source, tmp_path, capsys):
    path, _ = source
    code = main(["train", "tiny_cpu", "--output-dir", str(tmp_path), "--init", str(path),
                 "--resume", str(path)])
    assert code == 2
    assert "--init starts a new run from trained weights, --resume continues a run" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
