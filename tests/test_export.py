"""``asag export`` and exported models: ASAG-A / S / D (tiny widths, anchor generator probing P4 and P3)
exported to ONNX and ``.pt2`` give the eager static model's detections; the ONNX graphs are portable
(:mod:`asag.portable`) and OpenVINO gives the same detections in the same order as ONNX Runtime;
``Detector.from_exported`` and ``asag predict FILE.onnx|FILE.pt2`` give the checkpoint's; clear errors for
what cannot be exported.

The default run exports ASAG-A in both formats (the file is made once per module); ASAG-S and ASAG-D
take as long each and run with ``-m slow``."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from asag.api import Detector, load_model
from asag.build import build_model
from asag.cli import main
from asag.config import load_config
from asag.data import LabelMap
from asag.engine.benchmark import craft_probing_biases
from asag.engine.checkpoint import save_checkpoint
from asag.errors import CheckpointError, ConfigError, DataError
from asag.export import DeployedDetector, ExportedModel, export_model, require
from asag.portable import portability_problems
from asag.structures import DetectionBatch

VARIANTS = {
    "ASAG-A": ["model.decoder.type=adamixer"],
    "ASAG-S": ["model.decoder.type=sparse_rcnn"],
    "ASAG-D": ["model.decoder.type=deformable", "model.decoder.encoder_layers=1"],
}
SIZE = (160, 224)  # (H, W) of the exported input
BATCH = 2
CASES = [
    pytest.param(variant, fmt, marks=[] if variant == "ASAG-A" else [pytest.mark.slow], id=f"{variant}-{fmt}")
    for variant in VARIANTS for fmt in ("onnx", "pt2")
]
ONNX_CASES = [pytest.param(variant, marks=[] if variant == "ASAG-A" else [pytest.mark.slow], id=variant)
              for variant in VARIANTS]
LABELS = LabelMap.from_dict({"category_ids": [1, 2, 3, 5, 8], "names": ["a", "b", "c", "d", "e"]})


def checkpoint(variant: str, folder, overrides: tuple[str, ...] = ()) -> str:
    """A tiny model of ``variant`` (one head, class-wise NMS in the post-processing) with crafted anchor
    biases, so that Adaptive Probing of P4 and P3 runs on any input, saved as a checkpoint
    (``overrides``: more configuration overrides)."""
    overrides = [*VARIANTS[variant], "model.decoder.num_heads=1", "model.decoder.used_head=main",
                 "model.postprocess.nms=true", *overrides]  # class-wise NMS, as the 300-query presets
    cfg = load_config("tiny_cpu", overrides)
    cfg.model.backbone.weights = None
    torch.manual_seed(0)
    model = build_model(cfg)
    craft_probing_biases(model.anchor_generator)
    path = folder / f"{variant}.pth"
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, scaler=None, epoch=0, iteration=0,
                    config=cfg.to_dict(), label_map=LABELS.to_dict())
    return str(path)


def probe_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two normalised images padded to ``SIZE`` (the second smaller), their sizes and original sizes."""
    g = torch.Generator().manual_seed(5)
    sizes = torch.tensor([[160, 224], [128, 200]])
    images = torch.zeros(BATCH, 3, *SIZE)
    for b, (h, w) in enumerate(sizes.tolist()):
        images[b, :, :h, :w] = torch.randn(3, h, w, generator=g)
    return images, sizes, torch.tensor([[320, 448], [300, 470]])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    """``(variant, fmt) -> (checkpoint, exported file)``, each made once through ``asag export``."""
    folder = tmp_path_factory.mktemp("export")
    made = {}

    def get(variant: str, fmt: str):
        if (variant, fmt) not in made:
            ckpt = checkpoint(variant, folder)
            out = folder / f"{variant}.{fmt}"
            assert main(["export", ckpt, "--size", f"{SIZE[0]}x{SIZE[1]}", "--batch-size", str(BATCH),
                         "--out", str(out)]) == 0
            made[variant, fmt] = ckpt, out
        return made[variant, fmt]

    return get


def eager_static(ckpt: str):
    model, cfg, labels = load_model(ckpt)
    return model.set_static(True), cfg, labels


@pytest.mark.parametrize("variant, fmt", CASES)
def test_exported_model_gives_the_eager_static_detections(exported, variant, fmt):
    ckpt, path = exported(variant, fmt)
    model, _, _ = eager_static(ckpt)
    images, sizes, orig = probe_batch()
    with torch.no_grad():
        output = model(images, sizes)
        expected = model.postprocess_fixed(output, orig)
    levels = {p.level for p in output.anchors.patch_predictions}
    assert {"P4", "P3"} <= levels, "the crafted generator probes P4 and P3"
    got = ExportedModel(path).run(images, sizes, orig)
    assert got.boxes.shape == (BATCH, expected.boxes.shape[1], 4) and got.labels.dtype == torch.int64
    assert_same_detections(got, expected)


def assert_same_detections(got: DetectionBatch, expected: DetectionBatch) -> None:
    """The same detections in the same order: equal valid masks and labels, scores within 1e-4, boxes
    within 0.01 px."""
    assert torch.equal(got.valid, expected.valid) and expected.valid.sum() > 0
    assert torch.equal(got.labels, expected.labels)
    assert (got.scores - expected.scores).abs().max() <= 1e-4
    assert (got.boxes - expected.boxes).abs().max() <= 1e-2


@pytest.mark.parametrize("variant", ONNX_CASES)
def test_onnx_export_is_portable_and_openvino_gives_the_same_detections_in_order(exported, variant):
    """OpenVINO fp32 = ONNX Runtime = the eager static model, in the same order (OpenVINO's TopK orders
    equal keys arbitrarily; a sort written as one TopK came back out of order there)."""
    pytest.importorskip("openvino")
    onnx = pytest.importorskip("onnx")
    ckpt, path = exported(variant, "onnx")
    assert portability_problems(onnx.load(str(path))) == []
    model, _, _ = eager_static(ckpt)
    images, sizes, orig = probe_batch()
    with torch.no_grad():
        expected = model.detect(images, sizes, orig)
    for row, valid in zip(expected.scores, expected.valid):  # a meaningful order: distinct scores
        assert valid.sum() >= 10 and row[valid].unique().numel() >= valid.sum() // 2
    onnxruntime = ExportedModel(path).run(images, sizes, orig)
    openvino = ExportedModel(path, runtime="openvino").run(images, sizes, orig)
    assert_same_detections(onnxruntime, expected)
    assert_same_detections(openvino, expected)
    assert torch.equal(openvino.labels, onnxruntime.labels)
    assert (openvino.scores - onnxruntime.scores).abs().max() <= 1e-4
    assert (openvino.boxes - onnxruntime.boxes).abs().max() <= 1e-2
    for row, valid in zip(openvino.scores, openvino.valid):  # the output contract
        assert valid[:valid.sum()].all() and (row[valid].diff() <= 0).all() and (row[~valid] == 0).all()


def onnx_nodes(graph) -> int:
    """Nodes of an ONNX graph, those of its subgraphs (a Loop's body) included."""
    import onnx

    return sum(1 + sum(onnx_nodes(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
               for node in graph.node)


@pytest.mark.slow  # one more export of the tiny model (two when run alone), 30 to 60 s
def test_a_large_patch_budget_exports_the_same_graph_size_and_the_eager_detections(exported, tmp_path):
    """The patch NMS is one ONNX Loop per probed level whatever ``static_patches_per_level`` is (and the
    post-processing NMS one more): 64 slots
    (more than the P5 anchors of the input) give the default export's node count and the eager model's
    detections."""
    onnx = pytest.importorskip("onnx")
    ckpt = checkpoint("ASAG-A", tmp_path, ("model.anchor_generator.static_patches_per_level=64",))
    out = tmp_path / "large.onnx"
    assert main(["export", ckpt, "--size", f"{SIZE[0]}x{SIZE[1]}", "--batch-size", str(BATCH),
                 "--out", str(out)]) == 0
    graph, default = (onnx.load(path).graph for path in (out, exported("ASAG-A", "onnx")[1]))
    assert [node.op_type for node in graph.node].count("Loop") == 3  # P4, P3 and the class-wise NMS
    assert onnx_nodes(graph) == onnx_nodes(default)
    model, _, _ = eager_static(ckpt)
    images, sizes, orig = probe_batch()
    with torch.no_grad():
        expected = model.postprocess_fixed(model(images, sizes), orig)
    got = ExportedModel(out).run(images, sizes, orig)
    assert torch.equal(got.valid, expected.valid) and torch.equal(got.labels, expected.labels)
    assert (got.scores - expected.scores).abs().max() <= 1e-4
    assert (got.boxes - expected.boxes).abs().max() <= 1e-2


def write_images(folder) -> list:
    """Two RGB images whose evaluation resize (short side 160) fits ``SIZE`` (160 x 200 and 160 x 213)."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(320, 400), (300, 400)]):
        path = folder / f"img{i}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_from_exported_and_predict_give_the_checkpoint_detections(exported, fmt, tmp_path):
    ckpt, path = exported("ASAG-A", fmt)
    images = write_images(tmp_path)
    model, cfg, labels = eager_static(ckpt)
    expected = Detector(model, cfg, labels, torch.device("cpu")).predict_batch(images)
    deployed = Detector.from_exported(path, device="cpu")
    got = deployed.predict_batch(images)
    assert [len(d) for d in got] == [len(d) for d in expected] and len(got[0]) > 0
    for dets, ref in zip(got, expected):
        assert [d.category_id for d in dets] == [d.category_id for d in ref]
        assert [d.category_name for d in dets] == [d.category_name for d in ref]
        assert np.allclose([d.score for d in dets], [d.score for d in ref], atol=1e-4)
        assert np.allclose([d.box for d in dets], [d.box for d in ref], atol=2e-2)  # boxes rounded to 0.01
    out = tmp_path / "pred"
    assert main(["predict", str(path), *map(str, images), "--out", str(out), "--score-threshold", "0"]) == 0
    records = json.loads((out / "predictions.json").read_text())
    assert [len(r["detections"]) for r in records] == [min(len(d), 100) for d in got]
    assert records[0]["detections"][0] == got[0][0].to_dict()


def test_predict_with_openvino_gives_the_onnxruntime_predictions(exported, tmp_path):
    ov = pytest.importorskip("openvino")
    _, path = exported("ASAG-A", "onnx")
    images = write_images(tmp_path)
    runs = {"onnxruntime": [], "openvino": []}
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        runs["openvino-bf16"] = ["--precision", "bf16"]
    records = {}
    for name, extra in runs.items():
        out = tmp_path / name
        runtime = name.split("-")[0]
        assert main(["predict", str(path), *map(str, images), "--out", str(out), "--score-threshold", "0",
                     "--runtime", runtime, *extra]) == 0
        records[name] = [r["detections"] for r in json.loads((out / "predictions.json").read_text())]
    for got, ref in zip(records["openvino"], records["onnxruntime"]):
        assert len(got) == len(ref) > 0
        assert [d["category_id"] for d in got] == [d["category_id"] for d in ref]
        assert np.allclose([d["score"] for d in got], [d["score"] for d in ref], atol=1e-4)
        assert np.allclose([d["box_xyxy"] for d in got], [d["box_xyxy"] for d in ref], atol=2e-2)
    for dets in records.get("openvino-bf16", []):  # bf16 changes the numbers, not the contract
        assert dets and all(a["score"] >= b["score"] for a, b in zip(dets, dets[1:]))


def test_predict_refuses_options_of_the_checkpoint_path(exported, tmp_path, capsys):
    _, path = exported("ASAG-A", "onnx")
    image = write_images(tmp_path)[0]
    assert main(["predict", str(path), str(image), "--out", str(tmp_path / "o"), "--fast"]) == 2
    assert "--fast cannot change an exported model" in capsys.readouterr().err


def test_exported_model_refuses_images_larger_than_its_size(exported):
    _, path = exported("ASAG-A", "onnx")
    runner = ExportedModel(path)
    with pytest.raises(DataError, match="does not fit the exported input size 160x224"):
        runner.predict(torch.zeros(1, 3, 192, 224), torch.tensor([[192, 224]]), torch.tensor([[192, 224]]))


# ------------------------------------------------------------------------------------------- errors


def test_export_errors_name_the_option(tmp_path, capsys):
    ckpt = checkpoint("ASAG-A", tmp_path)
    cases = [
        (["--size", "150x224", "--out", str(tmp_path / "m.onnx")], "multiples of 32"),
        (["--size", "160x224", "--batch-size", "0", "--out", str(tmp_path / "m.onnx")], "--batch-size 0"),
        (["--size", "160x224", "--format", "pt2", "--out", str(tmp_path / "m.onnx")], "does not match"),
        (["--size", "160x224", "--out", str(tmp_path / "m.tflite")], "ends in .onnx or .pt2"),
        (["--size", "big", "--out", str(tmp_path / "m.onnx")], "expected HEIGHTxWIDTH"),
    ]
    for args, message in cases:
        assert main(["export", ckpt, *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not list(tmp_path.glob("m.*"))


def test_only_a_static_model_in_evaluation_mode_exports():
    model = build_model(load_config("tiny_cpu"))
    with pytest.raises(ConfigError, match="static model in evaluation mode"):
        DeployedDetector(model.eval())
    with pytest.raises(ConfigError, match="static"):
        model.eval().set_static(True).train()


def test_missing_extra_and_foreign_files_are_named(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not found"):
        ExportedModel(tmp_path / "none.onnx")
    onnx = pytest.importorskip("onnx")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(CheckpointError, match="not exported by `asag export`"):
        ExportedModel(tmp_path / "other.onnx")
    import importlib

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "onnxruntime"
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r'onnxruntime.*pip install "asag\[export\]"'):
        require("onnxruntime", "running an ONNX model")


def test_export_api_writes_metadata(tmp_path):
    ckpt = checkpoint("ASAG-A", tmp_path)
    model, cfg, labels = eager_static(ckpt)
    with pytest.raises(ConfigError, match="multiples of 32"):
        export_model(model, cfg, labels, tmp_path / "m.pt2", size=(100, 100))
