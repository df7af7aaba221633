"""The inference-optimised model: batch-norm folding, equivalence with the plain model and the release,
reduced precision, inference-only behaviour, host-sync counts, and the command-line flags."""

import copy
import pickle
import shutil
from collections import OrderedDict

import pytest
import torch
from tests.helpers import COCO_IDS, crafted_generator, fixture_model, probing_inputs
from tests.official import CASES, LEVELS, load, load_inputs
from torch import nn

from asag.api import load_model
from asag.build import build_model
from asag.cli import main
from asag.config import load_config
from asag.engine.syncs import CudaSyncCount, SyncAudit
from asag.errors import ConfigError
from asag.modeling.backbone import Backbone, FrozenBatchNorm2d
from asag.modeling.detector import ASAG
from asag.modeling.fast import (
    check_precision,
    cpu_supports_bf16,
    fold_batch_norms,
    fold_conv_bn,
    optimize_for_inference,
    resolve_precision,
)
from asag.modeling.postprocess import postprocess
from asag.modeling.roi_pooling import RoIPooling
from asag.structures import HeadOutput

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cpu_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="CPU without native bfloat16")


def randomise_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial statistics and affine terms for every frozen / batch norm (as a trained model has)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, FrozenBatchNorm2d | nn.BatchNorm2d):
                c = norm.running_mean.numel()
                norm.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
                norm.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                norm.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(c, generator=generator) * 0.1)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(load_config("tiny_cpu")).eval()
    randomise_norms(model, seed)
    return model


def tiny_inputs():
    images = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(1))
    return images, torch.tensor([[160, 224], [150, 200]])


def count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


# ------------------------------------------------------------------------------------- folding


def test_fold_conv_bn_hand_computed():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    nn.init.constant_(conv.weight, 2.0)
    norm = FrozenBatchNorm2d(1, eps=1.0)
    norm.running_mean.fill_(1.0)
    norm.running_var.fill_(3.0)  # s = gamma / sqrt(3 + 1) = gamma / 2
    with torch.no_grad():
        norm.weight.fill_(4.0)
        norm.bias.fill_(0.5)
    fused = fold_conv_bn(conv, norm)
    # W' = 2 * 2 = 4; b' = (0 - 1) * 2 + 0.5 = -1.5
    assert fused.weight.item() == pytest.approx(4.0)
    assert fused.bias.item() == pytest.approx(-1.5)
    x = torch.tensor([[[[3.0]]]])
    assert fused(x).item() == pytest.approx(4.0 * 3.0 - 1.5)
    assert conv.bias is None and conv.weight.item() == 2.0  # the original is untouched


def test_folding_a_random_r50_backbone_keeps_its_features():
    torch.manual_seed(0)
    backbone = Backbone("resnet50", norm="frozen_bn").eval()
    randomise_norms(backbone)
    folded = copy.deepcopy(backbone)
    # R50: stem 1 + 16 blocks x 3 + 4 downsample = 53 frozen batch norms
    assert fold_batch_norms(folded) == 53
    assert count(folded, FrozenBatchNorm2d) == 0
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, out = backbone(images), folded(images)
    for name in ref:
        scale = ref[name].abs().max()
        assert torch.allclose(out[name], ref[name], atol=1e-5 * scale, rtol=1e-4), name


def test_folding_eval_batch_norm_but_not_training_or_group_norm():
    torch.manual_seed(0)
    backbone = Backbone("resnet18", norm="batch_norm").eval()
    randomise_norms(backbone)
    folded = copy.deepcopy(backbone)
    assert fold_batch_norms(folded) == 1 + 8 * 2 + 3  # stem, 8 basic blocks, 3 downsamples
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(backbone(images).values(), folded(images).values()):
            assert torch.allclose(a, b, atol=1e-5 * a.abs().max())
    assert fold_batch_norms(Backbone("resnet18", norm="group_norm")) == 0
    assert fold_batch_norms(Backbone("resnet18", norm="batch_norm").train()) == 0


# ----------------------------------------------------------------------------------- fast model


def test_fast_model_matches_the_plain_model_and_leaves_it_alone():
    model = tiny_model()
    trainable = [p.requires_grad for p in model.parameters()]
    fast = optimize_for_inference(model)
    images, sizes = tiny_inputs()
    with torch.no_grad():
        ref, out = model(images, sizes), fast(images, sizes)
    assert torch.equal(out.valid_mask, ref.valid_mask)
    for a, b in zip(ref.heads, out.heads):
        assert torch.allclose(b.logits, a.logits, atol=1e-4)
        assert torch.allclose(b.boxes, a.boxes, atol=1e-5)
    dets, ref_dets = fast.postprocess(out, sizes), model.postprocess(ref, sizes)
    assert [len(d.scores) for d in dets] == [len(d.scores) for d in ref_dets]
    expected = {"fold_bn": True, "channels_last": True, "compile": False, "dtype": "float32"}
    assert fast.inference_settings == expected
    assert count(fast, nn.BatchNorm2d) == 0 and count(model, nn.BatchNorm2d) == 20
    assert fast.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert [p.requires_grad for p in model.parameters()] == trainable and any(trainable)
    assert model.backbone.body.conv1.weight.is_contiguous()


@pytest.mark.parametrize("decoder", [
    ["model.decoder.type=sparse_rcnn"],
    ["model.decoder.type=deformable", "model.decoder.encoder_layers=1", "model.decoder.encoder_ffn_dim=64",
     "model.decoder.deformable_points=2"],
], ids=["asag_s", "asag_d"])
def test_fast_model_matches_the_plain_model_for_every_decoder(decoder):
    torch.manual_seed(0)
    model = build_model(load_config("tiny_cpu", decoder)).eval()
    randomise_norms(model)
    images, sizes = tiny_inputs()
    with torch.no_grad():
        ref, out = model(images, sizes), optimize_for_inference(model)(images, sizes)
    assert torch.equal(out.valid_mask, ref.valid_mask)
    assert torch.allclose(out.heads[-1].logits, ref.heads[-1].logits, atol=1e-4)
    assert torch.allclose(out.heads[-1].boxes, ref.heads[-1].boxes, atol=1e-5)


def test_fast_model_carries_every_setting_of_the_plain_model():
    model = tiny_model()
    model.used_head = 0
    model.set_static(True)  # a setting that a re-built copy would lose
    fast = optimize_for_inference(model)
    plain_attrs = {k: v for k, v in vars(model).items()
                   if not k.startswith("_") and k not in ("training", "inference_settings", "feature_format")}
    for key, value in plain_attrs.items():
        assert getattr(fast, key) == value, key
    assert type(fast) is ASAG and fast.used_head == 0 and fast.static
    assert model.inference_settings is None and fast.inference_settings is not None


def test_fast_model_is_inference_only():
    fast = optimize_for_inference(tiny_model())
    images, sizes = tiny_inputs()
    out = fast(images, sizes)  # no torch.no_grad needed
    assert out.heads[-1].logits.is_inference()
    assert not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(RuntimeError, match="cannot be trained"):
        fast.train()
    fast.eval()  # allowed


def test_fast_model_runs_stage_by_stage():
    """Callers that run ``backbone`` and ``neck`` themselves (benchmark, visualisation) get float32 FPN
    levels: the casts live in module hooks (the levels stay channels-last)."""
    model = tiny_model()
    fast = optimize_for_inference(model)
    images, _ = tiny_inputs()
    with torch.inference_mode():
        levels = fast.neck(fast.backbone(images))
        ref = model.neck(model.backbone(images))
    for a, b in zip(ref, levels):
        assert b.dtype == torch.float32 and b.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(a, b, atol=1e-4 * a.abs().max())


@pytest.fixture(scope="module")
def fast_fixture_models(fixtures_dir):
    """variant -> the fixture model (official weights, random R50) optimised for inference, built once."""
    cache = {}

    def get(variant: str) -> ASAG:
        if variant not in cache:
            model, weights = fixture_model(fixtures_dir, variant, "P3P6")
            model.load_state_dict(weights, strict=False)
            cache[variant] = optimize_for_inference(model)
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", ["asag_a", "asag_s"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("level", LEVELS)
def test_fast_path_matches_the_release(fixtures_dir, fast_fixture_models, variant, case, level):
    """The chained fixture comparison of ``test_official_end_to_end`` through the optimised model (the
    FPN runs channels-last on channels-last inputs, as after the backbone; the R50 backbone is folded
    but the fixtures start at C2..C5)."""
    fast = fast_fixture_models(variant)
    assert count(fast.backbone, FrozenBatchNorm2d) == 0
    inputs = load_inputs(fixtures_dir, case)
    ref = load(fixtures_dir, f"eval_{variant}_case_{case}_{level}.pt")
    c_levels = OrderedDict((k, inputs[k].contiguous(memory_format=torch.channels_last))
                           for k in ("C2", "C3", "C4", "C5"))
    with torch.inference_mode():
        out = fast.forward_features(fast.neck(c_levels), inputs["image_sizes"], inference_level=level)
        dets = fast.postprocess(out, inputs["orig_sizes"])
    assert torch.equal(out.anchors.valid_mask, ref["ag.valid_mask"]), "anchor valid mask"
    assert torch.allclose(out.anchors.boxes, ref["ag.padded_output_anchors"], atol=1e-3), "anchors"
    assert torch.allclose(out.proposals.logits, ref["rpn.pred_logits"], atol=2e-4), "proposal logits"
    assert torch.allclose(out.proposals.boxes, ref["rpn.pred_boxes"], atol=1e-5), "proposal boxes"
    for head, name in zip(out.heads, ("aux_0", "main")):
        assert torch.allclose(head.logits, ref[f"heads.{name}.pred_logits"], atol=2e-4), f"{name} logits"
        assert torch.allclose(head.boxes, ref[f"heads.{name}.pred_boxes"], atol=1e-5), f"{name} boxes"
    expected = fast.postprocessor(HeadOutput(ref["heads.main.pred_logits"], ref["heads.main.pred_boxes"]),
                                  ref["ag.valid_mask"], inputs["orig_sizes"])
    for b, det in enumerate(dets):
        if bool(ref["ag.valid_mask"][b].all()):
            scores, boxes, ids = (ref[f"post.main.{b}.{k}"] for k in ("scores", "boxes", "labels"))
        else:
            scores, boxes = expected[b].scores, expected[b].boxes
            ids = torch.tensor(COCO_IDS)[expected[b].labels]
        assert torch.allclose(det.scores, scores, atol=1e-5), f"image {b} scores"
        ours = torch.tensor(COCO_IDS)[det.labels]
        assert sorted(ours.tolist()) == sorted(ids.tolist()), f"image {b} labels"
        assert torch.allclose(det.boxes.sort(0).values, boxes.sort(0).values, atol=1e-2), f"image {b} boxes"


def test_channels_last_pools_rois_with_the_gather():
    model = tiny_model()
    sparse_cfg = load_config("tiny_cpu", ["model.decoder.type=sparse_rcnn", "model.roi_pooling=torchvision"])
    sparse = optimize_for_inference(build_model(sparse_cfg))
    pools = [m for m in sparse.modules() if isinstance(m, RoIPooling)]
    assert len(pools) == 1 + len(sparse.decoder.heads)  # proposal stage + each head
    assert {p.kind for p in pools} == {"gather"}
    fast = optimize_for_inference(model)  # AdaMixer: proposal only; its decoder samples contiguous levels
    assert count(fast, RoIPooling) == 1 and fast.decoder.contiguous_features
    assert not sparse.decoder.contiguous_features
    assert fast.feature_format.memory_format == torch.channels_last and fast.feature_format.dtype is None
    hooks = [m for m in fast.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooks == []  # what runs is the forward: no hook adapts inputs or outputs
    exact = build_model(load_config("tiny_cpu", ["model.roi_pooling=torchvision"]))
    kept = optimize_for_inference(exact, channels_last=False)
    assert {m.kind for m in kept.modules() if isinstance(m, RoIPooling)} == {"torchvision"}


# ------------------------------------------------------------------------------------ precision


def test_precision_names_and_device_checks():
    assert resolve_precision("fp32") is None and resolve_precision(None) is None
    assert resolve_precision("bf16") == torch.bfloat16 and resolve_precision(torch.float16) == torch.float16
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp8")
    with pytest.raises(ConfigError, match="CUDA"):
        check_precision(torch.float16, "cpu")
    with pytest.raises(ConfigError, match="CUDA"):
        optimize_for_inference(tiny_model(), dtype="fp16", device="cpu")


@needs_cpu_bf16
def test_bf16_features_stay_close_and_the_rest_stays_float32():
    model = tiny_model()
    fast = optimize_for_inference(model, dtype="bf16")
    assert fast.backbone.body.conv1.weight.dtype == torch.bfloat16
    assert fast.anchor_generator.proj_all.layers[0].weight.dtype == torch.float32
    images, sizes = tiny_inputs()
    with torch.inference_mode():
        levels, ref = fast.extract_features(images), model.extract_features(images)
        out = fast(images, sizes)
    for a, b in zip(ref, levels):
        assert b.dtype == torch.float32
        assert (a - b).norm() / a.norm() < 2e-2  # bf16 keeps 8 mantissa bits
    assert out.heads[-1].logits.dtype == torch.float32


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_reduced_precision_stays_close(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU without bfloat16")
    model = tiny_model().cuda()
    fast = optimize_for_inference(model, dtype=precision)
    images, _ = tiny_inputs()
    with torch.inference_mode():
        levels, ref = fast.extract_features(images.cuda()), model.extract_features(images.cuda())
    for a, b in zip(ref, levels):
        assert b.dtype == torch.float32 and (a - b).norm() / a.norm() < 2e-2


@pytest.mark.slow
def test_compiled_model_matches_the_plain_model():
    model = tiny_model()
    fast = optimize_for_inference(model, compile=True)
    images, sizes = tiny_inputs()
    with torch.inference_mode():
        ref, out = model(images, sizes), fast(images, sizes)
    assert torch.equal(out.valid_mask, ref.valid_mask)
    assert torch.allclose(out.heads[-1].logits, ref.heads[-1].logits, atol=1e-4)


# ---------------------------------------------------------------------------------------- syncs


def test_sync_audit_counts_what_would_wait_for_the_device():
    x = torch.arange(6.0)
    with SyncAudit() as audit:
        x[x > 2]  # boolean mask: sync
        x[torch.tensor([0, 1])]  # integer index built from Python data: one host copy
        x.sum().item()
        x.nonzero()
        torch.nonzero_static(x, size=3)  # static size: no sync
        x.repeat_interleave(2)  # int repeats: no sync
    assert audit.ops == {"__getitem__": 1, "tensor": 1, "item": 1, "nonzero": 1}
    assert audit.total == 4


@pytest.mark.parametrize("batch", [1, 3])
def test_anchor_generator_syncs_do_not_grow_with_images_or_patches(batch):
    generator = crafted_generator()
    levels, sizes = probing_inputs(batch)
    with torch.inference_mode(), SyncAudit() as audit:
        out = generator(levels, sizes)
    assert [p.level for p in out.patch_predictions] == ["P6", "P5", "P4", "P3"]  # probing happened
    # budgets from the data: per probed level one read sizes the patch slots (the patch NMS's counts,
    # which also decide the early stop); once: Q, the longest image's output
    assert audit.ops == {"tolist": 2, "__int__": 1}, audit.sites
    with SyncAudit() as groups_audit:
        assert len(out.selected) == batch  # the per-image groups are split on request, with one read
    assert groups_audit.total == 1


@pytest.mark.parametrize("batch", [1, 4])
def test_postprocess_reads_the_device_once_per_batch(batch):
    logits = torch.randn(batch, 30, 5)
    boxes = torch.rand(batch, 30, 4) * 0.5 + 0.25
    valid = torch.arange(30)[None].expand(batch, -1) < torch.arange(batch)[:, None] * 5 + 10
    orig_sizes = torch.tensor([[100, 200]] * batch)
    with SyncAudit() as audit:
        dets = postprocess(logits, boxes, orig_sizes, valid, top_k=None)
    assert audit.total == 1
    for b, det in enumerate(dets):
        assert len(det.scores) == int(valid[b].sum()) * 5  # padded queries give nothing


def test_selected_groups_are_each_stage_s_output_anchors():
    generator = crafted_generator()
    levels = [torch.randn(2, 256, 256 // s, 384 // s) for s in (8, 16, 32)]
    with torch.inference_mode():
        out = generator(levels, torch.tensor([[256, 384], [224, 320]]))
    plain = out.selected
    assert [len(stages) for stages in plain] == [3, 3]  # P5/P6, P4, P3 reached by both images
    for b, stages in enumerate(plain):
        valid = int(out.valid_mask[b].sum())
        assert valid < generator.max_anchors  # not capped: the groups are exactly the valid anchors
        assert torch.equal(torch.cat(stages)[:, :4], out.boxes[b, :valid])
    for other in (copy.deepcopy(out), pickle.loads(pickle.dumps(out)), out.to("cpu")):
        for ours, theirs in zip(other.selected, plain, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@needs_cuda
def test_cuda_syncs_do_not_grow_with_images_or_patches():
    """Ground truth of the sync audit on a GPU: ``torch.cuda.set_sync_debug_mode`` warnings."""
    generator = crafted_generator().cuda()

    def count_syncs(batch):
        levels, sizes = probing_inputs(batch, "cuda")
        torch.cuda.synchronize()
        with torch.inference_mode(), CudaSyncCount() as syncs:
            out = generator(levels, sizes)
        assert [p.level for p in out.patch_predictions] == ["P6", "P5", "P4", "P3"]
        return syncs.total

    count_syncs(1)  # the first call in sync-debug mode has one more, once per process (measured: 8, then 7)
    counts = [count_syncs(batch) for batch in (1, 3, 1)]
    assert len(set(counts)) == 1 and counts[0] <= 16, counts


# -------------------------------------------------------------------------------- commands / API


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """The shared tiny checkpoint and its data, copied so that this module's outputs stay apart."""
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_load_model_returns_the_optimised_model(checkpoint):
    plain, _, _ = load_model(checkpoint / "ckpt.pth")
    fast, _, _ = load_model(checkpoint / "ckpt.pth", fast=True)
    assert plain.inference_settings is None
    assert fast.inference_settings["fold_bn"] and fast.inference_settings["channels_last"]


def test_commands_accept_the_fast_flags(checkpoint, capsys):
    ckpt = str(checkpoint / "ckpt.pth")
    assert main(["eval", ckpt, "--fast", "--out", str(checkpoint)]) == 0
    assert "AP" in capsys.readouterr().out
    image = next((checkpoint / "data").rglob("*.jpg"), None) or next((checkpoint / "data").rglob("*.png"))
    assert main(["predict", ckpt, str(image), "--fast", "--out", str(checkpoint / "pred")]) == 0
    assert (checkpoint / "pred" / "predictions.json").is_file()
    assert main(["predict", ckpt, str(image), "--precision", "fp16", "--device", "cpu",
                 "--out", str(checkpoint / "pred_fp16")]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
