import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBN

from asag.errors import CheckpointError
from asag.modeling.backbone import Backbone, FrozenBatchNorm2d
from asag.modeling.neck import Neck


def test_frozen_bn_matches_formula_and_torchvision():
    bn = FrozenBatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    x = torch.ones(1, 3, 1, 1)
    s = bn.weight / torch.sqrt(bn.running_var + 1e-5)
    expected = (x[0, :, 0, 0] - bn.running_mean) * s + bn.bias
    assert torch.allclose(bn(x)[0, :, 0, 0], expected, atol=1e-6)
    ref = TorchvisionFrozenBN(3)
    ref.load_state_dict(bn.state_dict())
    assert torch.allclose(bn(x), ref(x), atol=1e-6)
    # weight/bias are parameters (spec 2.1); num_batches_tracked is ignored on load.
    assert {n for n, _ in bn.named_parameters()} == {"weight", "bias"}
    bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": torch.tensor(3)})


def test_resnet50_parameter_counts_match_the_release():
    b = Backbone("resnet50")
    total = sum(p.numel() for p in b.parameters())
    trainable = sum(p.numel() for p in b.parameters() if p.requires_grad)
    assert (total, trainable) == (23_508_032, 23_282_688)  # spec Appendix A
    buffers = sum(x.numel() for x in b.buffers())
    assert buffers == 53_120


def test_resnet10_has_one_basic_block_per_layer():
    b = Backbone("resnet10", norm="batch_norm", trainable_layers=["conv1", "bn1", "layer"])
    assert [len(getattr(b.body, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert b.out_channels == [64, 128, 256, 512]
    # ResNet-18 (11,176,512 parameters without fc) less one 64-, 128-, 256- and 512-channel basic block
    r18 = sum(p.numel() for p in Backbone("resnet18").parameters())
    blocks = sum(2 * (9 * c * c + 2 * c) for c in (64, 128, 256, 512))
    assert sum(p.numel() for p in b.parameters()) == r18 - blocks
    assert all(p.requires_grad for p in b.parameters())
    feats = b(torch.randn(2, 3, 64, 96))
    shapes = [tuple(f.shape[1:]) for f in feats.values()]
    assert shapes == [(64, 16, 24), (128, 8, 12), (256, 4, 6), (512, 2, 3)]


def test_freeze_bn_affine_option():
    b = Backbone("resnet18", freeze_bn_affine=True)
    assert not any(p.requires_grad for n, p in b.named_parameters() if ".bn" in n)
    assert any(p.requires_grad for n, p in b.named_parameters() if "layer2" in n and "conv" in n)


def test_features_and_fpn_shapes():
    b = Backbone("resnet18")
    neck = Neck(b.out_channels, 32)
    feats = b(torch.randn(1, 3, 64, 96))
    assert [f.shape[-2:] for f in feats.values()] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    outs = neck(feats)
    assert [o.shape for o in outs] == [torch.Size([1, 32, 64 // s, 96 // s]) for s in (4, 8, 16, 32)]


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    from torchvision.models import resnet18

    ref = resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    b = Backbone("resnet18")
    b.load_pretrained(path)
    assert torch.equal(b.body.conv1.weight, ref.conv1.weight)
    with pytest.raises(CheckpointError, match="not found"):
        b.load_pretrained(tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        b.load_pretrained(tmp_path / "bad.pth")


def test_fpn_matches_the_official_fixture(fixtures_dir):
    from tests.official import load, load_inputs, load_weights

    inputs = load_inputs(fixtures_dir, "a")
    neck = Neck([256, 512, 1024, 2048], 64)
    neck.load_state_dict(load_weights(fixtures_dir, "asag_a", "neck."))
    from collections import OrderedDict

    outs = neck(OrderedDict((k, inputs[k]) for k in ("C2", "C3", "C4", "C5")))
    ref = load(fixtures_dir, "fpn_case_a.pt")
    for name, out in zip(("P2", "P3", "P4", "P5"), outs):
        assert torch.allclose(out, ref[name], atol=1e-4), name


@pytest.mark.parametrize("norm, cls", [("batch_norm", torch.nn.BatchNorm2d),
                                       ("group_norm", torch.nn.GroupNorm)])
def test_norm_options_for_training_from_scratch(norm, cls):
    b = Backbone("resnet18", norm=norm)
    assert isinstance(b.body.bn1, cls)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in b.modules())
    with pytest.raises(ValueError, match="unsupported backbone norm"):
        Backbone("resnet18", norm="layer_norm")
