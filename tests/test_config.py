import json

import pytest
import yaml

from asag.config import (
    Config,
    apply_overrides,
    available_presets,
    config_from_dict,
    load_config,
)
from asag.errors import ConfigError


def test_defaults_follow_the_release():
    cfg = Config()
    ag = cfg.model.anchor_generator
    assert (ag.compress_dim, ag.mlp_hidden_dim) == (8, 1000)
    assert (ag.num_anchors_coarse, ag.num_anchors_patch) == (50, 20)
    assert (ag.threshold_high, ag.threshold_low) == (0.7, 0.1)
    assert (ag.patch_nms_threshold, ag.score_threshold) == (0.25, 0.1)
    assert (ag.min_anchors, ag.max_anchors, ag.use_target_epoch, ag.inference_level) == (5, 200, 1, "P3P6")
    assert (cfg.loss.area_weight, cfg.loss.gamma1, cfg.loss.gamma2) == (4.0, 0.4, 0.6)
    assert (cfg.matcher.cost_class, cfg.matcher.cost_bbox, cfg.matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert cfg.loss.anchor * cfg.loss.anchor_ce == 8.0
    assert cfg.loss.anchor * cfg.loss.anchor_bbox == 4.0
    assert cfg.loss.anchor * cfg.loss.anchor_giou == 2.0
    s = cfg.schedule
    assert (s.lr, s.backbone_lr, s.weight_decay, s.milestones, s.warmup_iters, s.clip_max_norm) == (
        2e-4, 2e-5, 1e-4, [8, 11], 500, 0.1)
    assert (cfg.denoising.num_queries, cfg.denoising.noise_scale) == (200, 0.4)


def test_resolved_config_is_plain_data():
    cfg = Config()
    data = cfg.to_dict()
    assert config_from_dict(json.loads(json.dumps(data))) == cfg
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_overrides_are_typed_and_validated():
    data = apply_overrides(Config().to_dict(), ["model.decoder.num_heads=1", "schedule.lr=1e-3",
                                                "model.anchor_generator.max_patches_per_level=15"])
    cfg = config_from_dict(data)
    assert cfg.model.decoder.num_heads == 1
    assert cfg.schedule.lr == pytest.approx(1e-3)
    assert cfg.model.anchor_generator.max_patches_per_level == 15


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.nope=1", "unknown key model.nope"),
        ("model.decoder.num_heads=two", "expected an integer"),
        ("model.decoder.type=detr", "is not one of"),
        ("model.anchor_generator.threshold_low=0.9", "threshold_low < threshold_high"),
        ("model.decoder.used_head=aux_3", "used_head"),
        ("model.backbone.dilation=true", "dilation is not supported"),
        ("runtime.amp=fp8", "is not one of"),
        ("noequals", "key.path=value"),
    ],
)
def test_bad_overrides_have_clear_messages(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(apply_overrides(Config().to_dict(), [override]))


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no_such_preset")


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_resolves(name):
    cfg = load_config(name)
    assert config_from_dict(cfg.to_dict()) == cfg
