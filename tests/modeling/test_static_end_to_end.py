"""The static detector against the dynamic one: official fixtures (ASAG-A / ASAG-S, every inference
level, batch 1 and 2) from the FPN on, the same through ``--fast``, ASAG-D, the output contract, and
the proof of no host reads (``SyncAudit`` on the CPU, ``set_sync_debug_mode("error")`` on CUDA)."""

import copy
from collections import OrderedDict

import pytest
import torch
from tests.helpers import fixture_model
from tests.official import CASES, LEVELS, load_inputs

from asag.build import build_model
from asag.config import load_config
from asag.engine.benchmark import craft_probing_biases
from asag.engine.syncs import SyncAudit
from asag.errors import ConfigError
from asag.modeling.fast import optimize_for_inference
from asag.modeling.roi_pooling import LevelTable, RoIPooling
from asag.structures import DetectionBatch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DECODERS = ["adamixer", "sparse_rcnn", "deformable"]


def assert_same_detections(dynamic_out, dynamic_dets, static_out, static_batch: DetectionBatch) -> None:
    """Identical anchor valid masks and detection counts and labels; scores <= 1e-5, boxes <= 1e-2 px."""
    q = dynamic_out.valid_mask.shape[1]
    assert torch.equal(static_out.valid_mask[:, :q], dynamic_out.valid_mask), "anchor valid mask"
    assert not static_out.valid_mask[:, q:].any()
    assert not any(bound.any() for bound in static_out.anchors.budget_bound.values()), "a budget bound"
    for b, det in enumerate(dynamic_dets):
        n = len(det)
        assert static_batch.valid[b].tolist() == [i < n for i in range(static_batch.valid.shape[1])]
        assert torch.allclose(static_batch.scores[b, :n], det.scores, atol=1e-5, rtol=0), f"image {b} scores"
        assert torch.equal(static_batch.labels[b, :n], det.labels), f"image {b} labels"
        assert torch.allclose(static_batch.boxes[b, :n], det.boxes, atol=1e-2, rtol=0), f"image {b} boxes"


def run_both(dynamic, static, features, sizes, orig_sizes, level=None):
    with torch.inference_mode():
        dyn_out = dynamic.forward_features(features, sizes, inference_level=level)
        dyn_dets = dynamic.postprocess(dyn_out, orig_sizes)
        with SyncAudit() as audit:
            out = static.forward_features(features, sizes, inference_level=level)
            batch = static.postprocess_fixed(out, orig_sizes)
    assert audit.total == 0, audit.sites
    return dyn_out, dyn_dets, out, batch


@pytest.fixture(scope="module")
def fixture_pairs(fixtures_dir):
    """(variant, fast) -> (dynamic model, static model) with the official fixture weights, built once."""
    cache = {}

    def get(variant: str, fast: bool):
        if (variant, fast) not in cache:
            model, weights = fixture_model(fixtures_dir, variant, "P3P6")
            model.load_state_dict(weights, strict=False)
            dynamic = optimize_for_inference(model) if fast else model
            static = copy.deepcopy(model).set_static(True)
            cache[variant, fast] = dynamic, optimize_for_inference(static) if fast else static
        return cache[variant, fast]

    return get


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("variant", ["asag_a", "asag_s"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("level", LEVELS)
def test_static_fixture_detections_equal_the_dynamic_ones(fixtures_dir, fixture_pairs, variant, case, level,
                                                          fast):
    dynamic, static = fixture_pairs(variant, fast)
    assert static.static and not dynamic.static
    inputs = load_inputs(fixtures_dir, case)
    layout = torch.channels_last if fast else torch.contiguous_format  # as after a (fast) backbone
    c_levels = OrderedDict((k, inputs[k].contiguous(memory_format=layout)) for k in ("C2", "C3", "C4", "C5"))
    with torch.inference_mode():
        features = dynamic.neck(c_levels)
    results = run_both(dynamic, static, features, inputs["image_sizes"], inputs["orig_sizes"], level)
    assert_same_detections(*results)


def crafted_model(decoder: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(load_config("tiny_cpu", [f"model.decoder.type={decoder}"])).eval()
    craft_probing_biases(model.anchor_generator)
    return model


def tiny_batch(batch: int):
    images = torch.randn(batch, 3, 256, 384, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[256, 384], [224, 320], [256, 288]][:batch])
    return images, sizes, sizes * 2


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("batch", [1, 2])
def test_static_detector_equals_the_dynamic_one_and_reads_nothing_back(decoder, batch, fast):
    """Every decoder (ASAG-D included) with crafted probing, through the whole forward and ``detect``."""
    model = crafted_model(decoder)
    dynamic = optimize_for_inference(model) if fast else model
    static = copy.deepcopy(model).set_static(True)
    static = optimize_for_inference(static) if fast else static
    images, sizes, orig = tiny_batch(batch)
    with torch.inference_mode():
        dyn_out = dynamic(images, sizes)
        dyn_dets = dynamic.postprocess(dyn_out, orig)
        with SyncAudit() as audit:
            out = static(images, sizes)
            detections = static.postprocess_fixed(out, orig)
        assert audit.total == 0, audit.sites
        assert [p.level for p in out.anchors.patch_predictions] == ["P6", "P5", "P4", "P3"]
        assert_same_detections(dyn_out, dyn_dets, out, detections)
        again = static.detect(images, sizes, orig)
    assert torch.equal(again.boxes, detections.boxes) and torch.equal(again.valid, detections.valid)
    listed = static.postprocess(out, orig)  # the list interface splits the fixed batch
    assert [len(d) for d in listed] == [len(d) for d in dyn_dets]


@pytest.mark.parametrize("decoder", ["sparse_rcnn", "adamixer"])
def test_static_forward_concatenates_the_levels_once(decoder, monkeypatch):
    """The proposal stage and the decoder (ASAG-S: both RoIAlign) share one table of all levels."""
    built = []
    original = LevelTable.of.__func__

    def counted(cls, features):
        built.append(len(features))
        return original(cls, features)

    monkeypatch.setattr(LevelTable, "of", classmethod(counted))
    model = crafted_model(decoder)
    static = copy.deepcopy(model).set_static(True)
    images, sizes, _ = tiny_batch(2)
    with torch.inference_mode():
        static(images, sizes)
    assert built == [4]  # P2..P5, once per forward
    pooled = [m for m in static.modules() if isinstance(m, RoIPooling)]
    assert (len(pooled) > 1) == (decoder == "sparse_rcnn")  # proposal stage (+ every ASAG-S head)


def test_detection_batch_contract():
    model = crafted_model("adamixer").set_static(True)
    images, sizes, orig = tiny_batch(2)
    with torch.inference_mode():
        out = model.detect(images, sizes, orig)
    k = min(model.postprocessor.topk, model.anchor_generator.max_anchors * 80)
    assert out.boxes.shape == (2, k, 4) and out.boxes.dtype == torch.float32
    assert out.scores.shape == (2, k) and out.scores.dtype == torch.float32
    assert out.labels.shape == (2, k) and out.labels.dtype == torch.int64
    assert out.valid.shape == (2, k) and out.valid.dtype == torch.bool
    for b in range(2):
        n = int(out.valid[b].sum())
        assert out.valid[b, :n].all() and not out.valid[b, n:].any()  # a prefix
        assert (out.scores[b, :n].diff() <= 0).all()
        assert not out.scores[b, n:].any() and not out.boxes[b, n:].any() and not out.labels[b, n:].any()


def test_static_postprocess_with_nms_equals_the_dynamic_one():
    model = crafted_model("sparse_rcnn")
    model.postprocessor.nms_iou = 0.5
    static = copy.deepcopy(model).set_static(True)
    images, sizes, orig = tiny_batch(2)
    with torch.inference_mode():
        out = model(images, sizes)
        dets = model.postprocess(out, orig)
        batch = static.postprocess_fixed(out, orig)
    assert any(len(d) < model.postprocessor.topk for d in dets)  # the NMS removed something
    for b, det in enumerate(dets):
        n = len(det)
        assert int(batch.valid[b].sum()) == n
        assert torch.equal(batch.labels[b, :n], det.labels) and torch.equal(batch.scores[b, :n], det.scores)
        assert torch.allclose(batch.boxes[b, :n], det.boxes)


def test_static_mode_is_inference_only():
    model = crafted_model("adamixer")
    with pytest.raises(ConfigError, match="inference only"):
        model.train().set_static(True)
    model.eval().set_static(True)
    with pytest.raises(ConfigError, match="inference only"):
        model.train()
    model.set_static(False).train()  # back to dynamic: trainable again
    assert model.training and not model.static


@needs_cuda
@pytest.mark.parametrize("decoder", DECODERS)
def test_cuda_static_forward_never_synchronises(decoder):
    """Ground truth on a GPU: any synchronising call raises under ``set_sync_debug_mode("error")``."""
    model = crafted_model(decoder).cuda().set_static(True)
    fast = optimize_for_inference(model)
    images, sizes, orig = (t.cuda() for t in tiny_batch(2))
    for detector in (model, fast):
        with torch.inference_mode():
            detector.detect(images, sizes, orig)  # warm-up: lazy initialisation may synchronise once
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = detector.detect(images, sizes, orig)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert out.valid.any()
