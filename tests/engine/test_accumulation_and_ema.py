"""Gradient accumulation (N micro-batches = one batch of N*b images) and the EMA of the weights."""

import copy

import pytest
import torch
from torch import nn

from asag.build import build_criterion, build_model
from asag.config import load_config
from asag.engine.ema import ModelEma, ema_decay_at
from asag.engine.trainer import train_step
from asag.structures import Batch, ImageTargets
from asag.training.criterion import BatchShare


def test_decay_warms_up_as_timm_model_ema():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay_at(0.999, 8) == pytest.approx(0.5)  # 9 / 18
    assert ema_decay_at(0.999, 100_000) == 0.999
    assert ema_decay_at(0.5, 8) == 0.5


def test_update_averages_floats_and_copies_integers():
    model = nn.BatchNorm1d(2)
    ema = ModelEma(model, decay=0.99)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.num_batches_tracked.fill_(7)
    ema.update(model)  # decay 0.1 at the first update
    assert torch.allclose(ema.module.weight, 0.1 * start + 0.9 * 3.0)
    assert int(ema.module.num_batches_tracked) == 7 and ema.updates == 1
    ema.update(model)  # decay 2 / 11
    expected = (2 / 11) * (0.1 * start + 0.9 * 3.0) + (9 / 11) * 3.0
    assert torch.allclose(ema.module.weight, expected)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    with pytest.raises(ValueError, match=r"decay must lie in \(0, 1\)"):
        ModelEma(model, 1.0)


def frozen_bn_model(seed: int = 0):
    """tiny_cpu with frozen batch norm (no batch statistics: the batch composition cannot matter), probing
    P5/P6 only (no data-dependent patch count), no denoising."""
    cfg = load_config("tiny_cpu", ["model.backbone.norm=frozen_bn",
                                   "model.anchor_generator.inference_level=P5P6"])
    torch.manual_seed(seed)
    return build_model(cfg).train(), build_criterion(cfg)


def batch(images: torch.Tensor, targets: list[ImageTargets]) -> Batch:
    sizes = torch.tensor([list(images.shape[-2:])] * len(images))
    return Batch(images, sizes, sizes.clone(), targets, list(range(len(images))))


def random_targets(gen: torch.Generator, n: int) -> ImageTargets:
    centres = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    sides = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    labels = torch.randint(0, 5, (n,), generator=gen)
    return ImageTargets(torch.cat([centres, sides], 1), labels, size=(128, 128))


def gradients(model, criterion, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step changes nothing
    step = train_step(model, criterion, batches, optimizer, epoch=0, device=torch.device("cpu"), amp=None,
                      scaler=None, clip_max_norm=0.0)
    return step, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_micro_batches_give_the_gradients_of_one_batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 128, 128, generator=gen)
    targets = [random_targets(gen, n) for n in (3, 1, 5, 2)]  # unequal box counts per micro-batch
    model, criterion = frozen_bn_model()
    twin = copy.deepcopy(model)
    whole_step, whole = gradients(model, criterion, batch(images, targets))
    micro = [batch(images[i:i + 2], targets[i:i + 2]) for i in (0, 2)]
    micro_step, accumulated = gradients(twin, criterion, micro)
    assert whole.keys() == accumulated.keys() and len(whole) > 100
    for name, grad in whole.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(micro_step.total, whole_step.total.detach(), rtol=1e-5, atol=1e-6)
    for key, value in whole_step.terms.items():
        torch.testing.assert_close(micro_step.terms[key], value.detach(), rtol=1e-5, atol=1e-6, msg=key)
    assert micro_step.loss.stats["num_boxes"] == whole_step.loss.stats["num_boxes"] == 11


def test_a_share_scales_the_per_batch_normalised_terms():
    """Box terms use the accumulated batch's box count; denoising and P4/P3 patch terms are divided by
    the number of micro-batches."""
    cfg = load_config("tiny_cpu", ["denoising.enabled=true", "denoising.num_queries=10"])
    torch.manual_seed(0)
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    gen = torch.Generator().manual_seed(1)
    targets = [random_targets(gen, 3), random_targets(gen, 2)]
    torch.manual_seed(5)
    output = model(torch.randn(2, 3, 128, 128, generator=gen), torch.tensor([[128, 128]] * 2), targets)
    sizes = torch.tensor([[128, 128]] * 2)
    own = criterion(output, targets, sizes)
    shared = criterion(output, targets, sizes, share=BatchShare(num_boxes=10.0, parts=2))
    for key, value in own.terms.items():
        if key.startswith("dn_"):
            factor = 2.0  # num_dn * B * parts
        elif key.endswith("_anchor"):
            continue  # P6/P5 parts by the box count, P4/P3 also by the parts: checked below
        else:
            factor = 10.0 / 5.0  # 10 boxes instead of this batch's 5
        torch.testing.assert_close(shared.terms[key] * factor, value, msg=key)
    assert shared.stats["num_boxes"] == 10.0


def test_train_with_accumulation_and_ema_stores_the_average_that_prediction_uses(tmp_path):
    from asag.api import load_model
    from asag.cli import main
    from asag.data.synthetic import generate_synthetic
    from asag.engine.checkpoint import load_checkpoint

    generate_synthetic(tmp_path / "data", 8, seed=3, val_images=2)
    out = tmp_path / "run"
    args = ["train", "tiny_cpu", f"data.root={tmp_path / 'data'}", "schedule.accumulate_steps=2",
            "schedule.ema_decay=0.9", "runtime.eval_every=0", "--output-dir", str(out)]
    assert main(args) == 0
    ckpt = load_checkpoint(out / "last.pth")
    usable = 8 // 2 // 2  # batches of 2, two per optimiser step (images without a box may be left out)
    assert 1 <= ckpt["iteration"] <= usable and ckpt["ema_updates"] == ckpt["iteration"]
    name = "decoder.heads.0.fc_cls.weight"
    assert not torch.equal(ckpt["ema"][name], ckpt["model"][name])
    model, _, _ = load_model(out / "last.pth")
    assert torch.equal(model.state_dict()[name], ckpt["ema"][name])
