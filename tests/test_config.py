import dataclasses
import json
import math
import re
import types
import typing

import pytest
import yaml

from asag.config import (
    FIELD_RANGES,
    Config,
    Range,
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


# ------------------------------------------------------------------------------ numeric validation


def numeric_field_types(cls=Config, prefix=""):
    """Dotted name -> (int or float, is_list) of every numeric field, found from the type hints."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        base = tp
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None -> X
            (base,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(base):
            out.update(numeric_field_types(base, f"{prefix}{name}."))
        elif base in (int, float):
            out[f"{prefix}{name}"] = (base, False)
        elif typing.get_origin(base) is list and typing.get_args(base)[0] in (int, float):
            out[f"{prefix}{name}"] = (typing.get_args(base)[0], True)
    return out


def test_every_numeric_field_has_a_range():
    fields = numeric_field_types()
    assert len(fields) > 80
    assert sorted(set(fields) - set(FIELD_RANGES)) == []
    assert sorted(set(FIELD_RANGES) - set(fields)) == []


def outside(allowed: Range, kind: type):
    if allowed.low is not None:
        return allowed.low if allowed.low_open else allowed.low - 1
    return allowed.high + 1 if allowed.high is not None else None


def override(name: str, value, is_list: bool) -> dict:
    data: dict = {}
    node = data
    *parents, leaf = name.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = [value] if is_list else value
    return data


@pytest.mark.parametrize("name", sorted(FIELD_RANGES))
def test_every_numeric_field_is_range_checked_with_its_name(name):
    kind, is_list = numeric_field_types()[name]
    shown = f"{name}[0]" if is_list else name
    bad = outside(FIELD_RANGES[name], kind)
    if bad is not None:
        with pytest.raises(ConfigError, match="^" + re.escape(f"{shown} must be")):
            config_from_dict(override(name, kind(bad), is_list))
    if kind is float:
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match="must be a finite number"):
                config_from_dict(override(name, value, is_list))
    else:
        with pytest.raises(ConfigError, match="expected an integer"):
            config_from_dict(override(name, 2.5, is_list))
        with pytest.raises(ConfigError, match="expected an integer"):
            config_from_dict(override(name, "3", is_list))


@pytest.mark.parametrize("override_text, message", [
    ("runtime.num_threads=0", "runtime.num_threads must be >= 1, got 0"),
    ("schedule.lr=.inf", "schedule.lr must be a finite number, got inf"),
    ("schedule.lr=nan", "schedule.lr must be a finite number, got nan"),
    ("schedule.lr=0", "schedule.lr must be > 0, got 0.0"),
    ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
    ("model.postprocess.topk=-1", "model.postprocess.topk must be >= 1, got -1"),
    ("schedule.warmup_factor=0", "schedule.warmup_factor must be in \\(0, 1\\], got 0.0"),
    ("matcher.focal_alpha=1.5", "matcher.focal_alpha must be in \\[0, 1\\], got 1.5"),
    ("schedule.milestones=[3, -1]", "schedule.milestones\\[1\\] must be >= 0, got -1"),
    ("model.decoder.dropout=1", "model.decoder.dropout must be in \\[0, 1\\), got 1.0"),
    ("data.num_workers=2.0", "data.num_workers: expected an integer, got 2.0"),
])
def test_out_of_range_overrides_name_the_field(override_text, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", [override_text])


def test_range_membership_and_description():
    assert 0 in Range(0) and 0 not in Range(0, low_open=True) and 1 not in Range(0, 1, high_open=True)
    assert Range(1).describe() == ">= 1" and Range(0, 1, low_open=True).describe() == "in (0, 1]"
    assert Range(high=2, high_open=True).describe() == "< 2" and -5 in Range(high=2)


@pytest.mark.parametrize("chain", [["a"], ["a", "b"], ["a", "b", "c"]], ids=["self", "two", "three"])
def test_a_base_chain_that_loops_is_one_line_naming_the_loop(tmp_path, chain, capsys):
    from asag.cli import main

    for name, base in zip(chain, chain[1:] + chain[:1]):
        (tmp_path / f"{name}.yaml").write_text(f"_base_: {base}.yaml\nschedule:\n  epochs: 3\n")
    first = tmp_path / f"{chain[0]}.yaml"
    with pytest.raises(ConfigError, match="the _base_ chain loops") as err:
        load_config(str(first))
    assert str(err.value).count(" -> ") == len(chain)
    assert main(["config", "show", str(first)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "_base_ chain loops" in lines[0]
    (tmp_path / "ok.yaml").write_text("_base_: tiny_cpu\nschedule:\n  epochs: 3\n")  # a chain that ends
    assert load_config(str(tmp_path / "ok.yaml")).schedule.epochs == 3
