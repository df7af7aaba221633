"""The whole detector on tiny presets: training/evaluation paths, gradients, odd image shapes."""

import pytest
import torch
from tests.targets import random_targets

from asag.build import build_criterion, build_model
from asag.config import load_config
from asag.structures import ImageTargets


def tiny(decoder: str = "adamixer", *overrides: str):
    cfg = load_config("tiny_cpu", [f"model.decoder.type={decoder}", *overrides])
    torch.manual_seed(0)
    return cfg, build_model(cfg), build_criterion(cfg)


def targets_for(sizes: torch.Tensor, n: int = 3, seed: int = 0) -> list[ImageTargets]:
    return random_targets(sizes, n, seed=seed)


def perturb_zero_parameters(model: torch.nn.Module) -> None:
    """Zero-initialised regression layers block gradients to the layers before them at step 0;
    perturb them as one optimizer step would."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.01)


@pytest.mark.parametrize("decoder", ["adamixer", "sparse_rcnn"])
def test_gradients_reach_every_trainable_parameter(decoder):
    cfg, model, criterion = tiny(decoder, "denoising.enabled=true", "denoising.num_queries=12")
    perturb_zero_parameters(model)
    model.train()
    sizes = torch.tensor([[128, 160], [96, 128]])
    images = torch.randn(2, 3, 128, 160)
    tg = targets_for(sizes)
    missing = set()
    for epoch in (0, 1):  # epoch 0: GT-derived patches; epoch 1: predicted patches
        model.zero_grad()
        out = model(images, sizes, tg, epoch=epoch)
        loss = criterion(out, tg, sizes)
        assert torch.isfinite(loss.total)
        loss.total.backward()
        missing |= {n for n, p in model.named_parameters()
                    if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))}
    # P6/crops and both probed levels are exercised over the two epochs; everything must learn.
    assert not missing, sorted(missing)[:10]


@pytest.mark.parametrize("decoder", ["adamixer", "sparse_rcnn"])
@pytest.mark.parametrize("hw", [(64, 64), (200, 1600), (1600, 200)])
def test_small_and_elongated_images_train_and_evaluate(decoder, hw):
    cfg, model, criterion = tiny(decoder)
    h, w = hw
    sizes = torch.tensor([[h, w]])
    images = torch.randn(1, 3, (h + 31) // 32 * 32, (w + 31) // 32 * 32)
    tg = targets_for(sizes, n=2)
    model.train()
    for epoch in (0, 1):
        loss = criterion(model(images, sizes, tg, epoch=epoch), tg, sizes)
        assert torch.isfinite(loss.total)
        loss.total.backward()
    dets = model.predict(images, sizes, sizes)
    assert len(dets) == 1 and torch.isfinite(dets[0].boxes).all()


def test_same_output_type_in_training_and_evaluation():
    cfg, model, _ = tiny()
    sizes = torch.tensor([[96, 128], [64, 96]])
    images = torch.randn(2, 3, 96, 128)
    model.train()
    train_out = model(images, sizes, targets_for(sizes), epoch=1)
    model.eval()
    with torch.no_grad():
        eval_out = model(images, sizes)
    assert type(train_out) is type(eval_out)
    assert len(train_out.heads) == len(eval_out.heads) == cfg.model.decoder.num_heads
    assert eval_out.num_dn == 0


def test_padded_queries_never_become_detections():
    cfg, model, _ = tiny()
    model.eval()
    sizes = torch.tensor([[128, 160], [64, 64]])
    images = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        out = model(images, sizes)
    dets = model.postprocess(out, sizes)
    for b, d in enumerate(dets):
        n_valid = int(out.valid_mask[b].sum())
        assert len(d) == min(cfg.model.postprocess.topk, n_valid * cfg.model.num_classes)


@pytest.mark.parametrize("decoder", ["adamixer", "sparse_rcnn"])
def test_gather_roi_pooling_trains_like_torchvision_roi_align(decoder):
    """``model.roi_pooling=gather``: same losses and gradients as torchvision's RoIAlign (to float
    rounding), no gradient reaching the pooled boxes, and the same state dict layout."""
    results = []
    for pooling in ("torchvision", "gather"):
        cfg, model, criterion = tiny(decoder, f"model.roi_pooling={pooling}")
        perturb_zero_parameters(model)
        model.train()
        sizes = torch.tensor([[128, 160], [96, 128]])
        images = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
        tg = targets_for(sizes)
        loss = criterion(model(images, sizes, tg, epoch=0), tg, sizes)
        loss.total.backward()
        results.append((model, loss))
    (ref, ref_loss), (gather, gather_loss) = results
    assert ref.state_dict().keys() == gather.state_dict().keys()
    assert torch.allclose(ref_loss.total, gather_loss.total, rtol=1e-5)
    for (name, a), b in zip(ref.named_parameters(), gather.parameters(), strict=True):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5), name
