"""Export-friendly formulations: the fixed-shape RoIAlign over all levels, and every stage after the anchor
generator (proposal stage, decoder heads of ASAG-A / S / D, backbone and neck) through ``torch.export``
and the ONNX exporter with fixed shapes, equal to eager within float rounding."""

import pytest
import torch
from tests.helpers import random_boxes
from torch import Tensor, nn

from asag.build import build_model
from asag.config import load_config
from asag.modeling.blocks import RoIFeatureExtractor
from asag.modeling.fast import SyncAudit
from asag.modeling.queries import build_queries
from asag.modeling.roi_gather import GatherRoIPooling
from asag.structures import AnchorOutput

DECODERS = ["adamixer", "sparse_rcnn", "deformable"]


def level_features(batch: int = 2, channels: int = 8, height: int = 256, width: int = 384) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, height // s, width // s, generator=g) for s in (4, 8, 16, 32)]


def test_static_roi_pooling_index_formulation_equals_embedding_bag_and_torchvision():
    extractor = RoIFeatureExtractor()
    features = level_features()
    boxes = random_boxes(2 * 30, 384.0, 256.0, seed=1).view(2, 30, 4)  # every level, some outside
    sizes = torch.tensor([[256, 384], [240, 360]])
    static = GatherRoIPooling(extractor, static=True)
    bag = static(features, boxes, sizes)
    static.weighted_sum = "index"
    with SyncAudit() as audit:
        index = static(features, boxes, sizes)
    assert not audit.ops
    assert torch.allclose(index, bag, atol=1e-6)
    assert torch.allclose(index, extractor(features, boxes, sizes), atol=1e-5)
    static.weighted_sum = "loop"
    with pytest.raises(ValueError, match="weighted_sum"):
        static(features, boxes, sizes)


# ------------------------------------------------------------------------- stages after the generator

SIZE = (128, 160)  # (h, w) of the fixed export input
NUM_QUERIES = 12


class FixedAnchorTail(nn.Module):
    """Backbone, neck, query preparation, proposal stage and decoder heads on given anchors: every part
    of the model but the anchor generator and the post-processing, at one fixed input size."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, anchors: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        sizes = torch.tensor([SIZE]).expand(images.shape[0], 2)
        features = self.model.extract_features(images, sizes)
        queries = build_queries(AnchorOutput([], anchors, valid), sizes, None, 0, 0.0,
                                self.model.attention_heads)
        proposals = self.model.proposal(queries, features, sizes)
        head = self.model.decoder(proposals, features, sizes, queries.attn_mask)[-1]
        return head.logits, head.boxes


def tail_and_inputs(decoder: str, batch: int = 2) -> tuple[nn.Module, tuple[Tensor, Tensor, Tensor]]:
    overrides = [f"model.decoder.type={decoder}", "model.decoder.num_heads=1"]
    if decoder == "deformable":
        overrides.append("model.decoder.encoder_layers=1")
    torch.manual_seed(0)
    model = build_model(load_config("tiny_cpu", overrides)).eval()
    model.set_static(True)
    g = torch.Generator().manual_seed(1)
    h, w = SIZE
    images = torch.randn(batch, 3, h, w, generator=g)
    anchors = torch.rand(batch, NUM_QUERIES, 4, generator=g) * torch.tensor([w, h, w / 3, h / 3]) + 4.0
    valid = torch.arange(NUM_QUERIES)[None] < torch.tensor([[NUM_QUERIES], [NUM_QUERIES - 3]])[:batch]
    return FixedAnchorTail(model), (images, anchors, valid)


@pytest.mark.slow  # about 20 s each; the whole static model's export is tested in tests/test_export.py
@pytest.mark.parametrize("decoder", DECODERS)
def test_stages_after_the_anchor_generator_export_with_torch_export(decoder):
    tail, inputs = tail_and_inputs(decoder)
    with torch.no_grad():
        expected = tail(*inputs)
        program = torch.export.export(tail, inputs)
        got = program.module()(*inputs)
    for e, o in zip(expected, got):
        assert torch.allclose(o, e, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("decoder", DECODERS)
def test_stages_after_the_anchor_generator_export_to_onnx(decoder, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    tail, inputs = tail_and_inputs(decoder)
    for module in tail.modules():
        if isinstance(module, GatherRoIPooling):
            module.weighted_sum = "index"
    with torch.no_grad():
        expected = tail(*inputs)
        torch.onnx.export(tail, inputs, dynamo=True, verbose=False).save(tmp_path / "tail.onnx")
    session = ort.InferenceSession(tmp_path / "tail.onnx", providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
    for e, o in zip(expected, got):
        assert torch.allclose(torch.from_numpy(o), e, atol=1e-5, rtol=1e-5)
