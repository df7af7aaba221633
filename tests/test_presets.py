"""Contract of every preset: it builds, trains one step and evaluates, at full architecture on a small
input; parameter counts of the paper's R50 and R101 models equal the official ones (spec Appendix A)."""

import pytest
import torch
from tests.targets import random_targets

from asag.build import build_criterion, build_model, build_optimizer_and_schedule
from asag.config import available_presets, load_config
from asag.structures import ImageTargets

PRESETS = available_presets()
# (h, w) of the two images of the contract test: small, not square, not multiples of 32 (padded).
SIZES = torch.tensor([[160, 224], [128, 200]])


def build(preset: str, *overrides: str):
    cfg = load_config(preset, list(overrides))
    cfg.model.backbone.weights = None  # random initialisation: nothing is downloaded or read
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def targets(num_classes: int, seed: int = 0) -> list[ImageTargets]:
    return random_targets(SIZES, counts=(3, 4), num_classes=num_classes, min_side=0.05, seed=seed)


def test_every_model_zoo_row_has_a_preset():
    expected = {"asag_a_r50_1x_100q", "asag_a_r50_1x_300q", "asag_a_r50_3x_100q", "asag_a_r50_3x_300q",
                "asag_a_r101_3x_300q", "asag_s_r50_3x_100q", "asag_s_r50_3x_300q", "asag_a_r50_1x_dn",
                "asag_d_r50_3x", "asag_s_r50_crowdhuman", "asag_a_r50_speed", "asag_s_r50_speed",
                "asag_d_r50_speed"}
    assert expected <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_one_step_and_evaluates(preset):
    cfg, model = build(preset)
    criterion = build_criterion(cfg)
    optimizer, scheduler = build_optimizer_and_schedule(model, cfg.schedule)
    images = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(1))  # padded batch
    tg = targets(cfg.model.num_classes)

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = criterion(model(images, SIZES, tg, epoch=0), tg, SIZES)
    assert torch.isfinite(loss.total) and loss.total > 0
    optimizer.zero_grad()
    loss.total.backward()
    optimizer.step()
    scheduler.step_iteration()
    changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    assert changed > 0.5 * len(before), f"{changed} of {len(before)} trainable tensors changed"

    model.eval()
    with torch.no_grad():
        output = model(images, SIZES)
        detections = model.postprocess(output, SIZES)
    assert len(detections) == 2
    for dets in detections:  # boxes are not clipped to the image (as in the release)
        assert 0 < len(dets) <= cfg.model.postprocess.topk
        assert torch.isfinite(dets.boxes).all() and torch.all(dets.boxes[:, 2:] >= dets.boxes[:, :2])
        assert torch.all((dets.labels >= 0) & (dets.labels < cfg.model.num_classes))
        assert torch.all(dets.scores[:-1] >= dets.scores[1:])


def count(model: torch.nn.Module) -> tuple[int, int, int]:
    params = list(model.parameters())
    return (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
            sum(b.numel() for b in model.buffers()))


# spec Appendix A: (preset, overrides) -> total parameters (official model built on CPU)
APPENDIX_A = [
    ("asag_a_r50_1x_100q", (), 111_805_026),
    ("asag_s_r50_3x_100q", (), 90_705_474),
    ("asag_a_r50_1x_100q", ("model.decoder.num_heads=1", "model.decoder.used_head=main"), 56_273_358),
    ("asag_s_r50_3x_100q", ("model.decoder.num_heads=1", "model.decoder.used_head=main"), 50_998_470),
    ("asag_a_r50_1x_300q", (), 112_455_676),
    ("asag_a_r50_1x_100q", ("model.backbone.name=resnet101",), 130_797_154),  # R101, 100-query setting
    # the R101 preset (300 queries): R101 L = 4 plus the 300-query difference (112,455,676 - 111,805,026)
    ("asag_a_r101_3x_300q", (), 130_797_154 + 650_650),
]


APPENDIX_A_IDS = [f"{p}-{'-'.join(v.split('=')[1] for v in o) or 'preset'}" for p, o, _ in APPENDIX_A]


@pytest.mark.parametrize(("preset", "overrides", "expected"), APPENDIX_A, ids=APPENDIX_A_IDS)
def test_parameter_counts_equal_appendix_a(preset, overrides, expected):
    _, model = build(preset, *overrides)
    total, trainable, buffers = count(model)
    assert total == expected
    if (preset, overrides) == ("asag_a_r50_1x_100q", ()):
        assert trainable == 111_579_682 and buffers == 53_120
