"""Export-friendly formulations: the fixed-shape RoIAlign over all levels, and every stage after the anchor
generator (proposal stage, decoder heads of ASAG-A / S / D, backbone and neck) through ``torch.export``
and the ONNX exporter with fixed shapes, equal to eager within float rounding."""

import pytest
import torch
from torch import Tensor, nn

from asag.build import build_model
from asag.config import load_config
from asag.modeling.queries import build_queries
from asag.modeling.roi_pooling import LevelTable
from asag.structures import AnchorOutput

DECODERS = ["adamixer", "sparse_rcnn", "deformable"]


def level_features(batch: int = 2, channels: int = 8, height: int = 256, width: int = 384) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, height // s, width // s, generator=g) for s in (4, 8, 16, 32)]


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
        table = LevelTable.of(features)  # fixed shapes: RoI pooling from one table of all levels
        proposals = self.model.proposal(queries, features, sizes, table)
        head = self.model.decoder(proposals, features, sizes, queries.attn_mask, table)[-1]
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
    with torch.no_grad():
        expected = tail(*inputs)
        torch.onnx.export(tail, inputs, dynamo=True, verbose=False).save(tmp_path / "tail.onnx")
    session = ort.InferenceSession(tmp_path / "tail.onnx", providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
    for e, o in zip(expected, got):
        assert torch.allclose(torch.from_numpy(o), e, atol=1e-5, rtol=1e-5)
