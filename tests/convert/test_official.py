"""Authors' checkpoint layout -> ours, using the key manifests of the full default models."""

import pytest
import torch
from tests.official import FIXTURES_DIR

from asag.build import build_model
from asag.config import load_config
from asag.convert.official import (
    convert_state_dict,
    head_index,
    infer_architecture,
    rename_official_key,
)


def manifest_state_dict(variant: str, old_fpn_names: bool = False) -> dict[str, torch.Tensor]:
    path = FIXTURES_DIR / f"official-state-dict-{variant}.txt"
    out = {}
    gen = torch.Generator().manual_seed(0)
    for line in path.read_text().splitlines():
        key, shape, _ = line.split("\t")
        dims = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        if old_fpn_names and key.startswith("neck."):
            key = key.replace(".0.weight", ".weight").replace(".0.bias", ".bias")
        out[key] = torch.randn(dims, generator=gen)
    return out


def test_key_renames():
    key = "layer1.0.conv1.weight"
    assert rename_official_key(f"backbone.0.body.{key}") == f"backbone.body.{key}"
    assert rename_official_key("neck.inner_blocks.2.weight") == "neck.inner_blocks.2.0.weight"
    assert rename_official_key("neck.layer_blocks.0.0.bias") == "neck.layer_blocks.0.0.bias"
    assert rename_official_key("rpn.fc_cls.bias") == "proposal.fc_cls.bias"
    assert rename_official_key("decoder.bbox_head.3.fc_reg.weight") == "decoder.heads.3.fc_reg.weight"
    assert rename_official_key("decoder.head_series.1.linear1.bias") == "decoder.heads.1.linear1.bias"
    assert rename_official_key("decoder.decoder_embedding.weight") == "decoder.head_embedding"
    assert rename_official_key("backbone.0.body.bn1.num_batches_tracked") is None
    assert head_index("main", 4) == 3 and head_index("aux_2", 4) == 2


@pytest.mark.parametrize("variant, preset", [("asag-a", "asag_a_r50_1x_100q"),
                                             ("asag-s", "asag_s_r50_3x_100q")])
def test_architecture_is_read_off_the_state_dict(variant, preset):
    arch = infer_architecture(manifest_state_dict(variant))
    assert arch.decoder_type == {"asag-a": "adamixer", "asag-s": "sparse_rcnn"}[variant]
    assert (arch.num_heads, arch.num_classes, arch.hidden_dim, arch.backbone) == (4, 80, 256, "resnet50")
    assert (arch.compress_dim, arch.num_anchors_coarse, arch.num_anchors_patch, arch.mlp_hidden_dim) == (
        8, 50, 20, 1000)


CASES = [
    (variant, preset, heads, old)
    for variant, preset in [("asag-a", "asag_a_r50_1x_100q"), ("asag-s", "asag_s_r50_3x_100q")]
    for heads in (4, 1)
    for old in (False, True)
]
FAST = {("asag-a", 4, False), ("asag-s", 1, True)}


@pytest.mark.parametrize(
    "variant, preset, heads, old_fpn_names",
    [c if (c[0], c[2], c[3]) in FAST else pytest.param(*c, marks=pytest.mark.slow) for c in CASES],
)
def test_converted_state_dict_loads_strictly(variant, preset, heads, old_fpn_names):
    sd = manifest_state_dict(variant, old_fpn_names)
    keep = None if heads == 4 else 2
    converted = convert_state_dict(sd, keep_head=keep)
    cfg = load_config(preset, [f"model.decoder.num_heads={heads}", "model.decoder.used_head=main"])
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert missing == [] and unexpected == []
    if keep is not None:
        prefix = "decoder.bbox_head.2." if variant == "asag-a" else "decoder.head_series.2."
        some = next(k for k in sd if k.startswith(prefix))
        ours = "decoder.heads.0." + some[len(prefix):]
        assert torch.equal(model.state_dict()[ours], sd[some])
        assert torch.equal(model.state_dict()["decoder.head_embedding"][0],
                           sd["decoder.decoder_embedding.weight"][2])


def test_convert_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    import argparse

    from asag.api import load_model
    from asag.cli import main

    sd = manifest_state_dict("asag-a", old_fpn_names=True)
    official = tmp_path / "official.pth"
    torch.save({"model": sd, "args": argparse.Namespace(num_query="100"), "epoch": 11}, official)
    out = tmp_path / "ours.pth"
    assert main(["convert", str(official), "--out", str(out), "--keep-head", "aux_2"]) == 0
    model, cfg, labels = load_model(out)
    assert cfg.model.decoder.num_heads == 1 and cfg.model.decoder.type == "adamixer"
    assert len(labels) == 80 and labels.category_ids[-1] == 90 and labels.names[0] == "person"
    assert torch.equal(model.state_dict()["proposal.fc_cls.weight"], sd["rpn.fc_cls.weight"])
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert main(["convert", str(tmp_path / "junk.pth"), "--out", str(out)]) == 2  # out exists: refused
    assert f"--out {out} already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "junk.pth"), "--out", str(out), "--overwrite"]) == 2
    assert "junk.pth" in capsys.readouterr().err
    assert load_model(out)[1].model.decoder.num_heads == 1  # a failed conversion replaces nothing


def test_convert_command_picks_the_main_head_of_a_single_head_checkpoint(tmp_path):
    from asag.api import load_model
    from asag.cli import main

    sd = manifest_state_dict("asag-a")
    # a one-head release checkpoint: head 0 only (the default preset, asag_a_r50_1x_100q, says aux_2)
    single = {k: v for k, v in sd.items() if not k.startswith(("decoder.bbox_head.1.", "decoder.bbox_head.2.",
                                                               "decoder.bbox_head.3."))}
    single["decoder.decoder_embedding.weight"] = sd["decoder.decoder_embedding.weight"][:1]
    assert infer_architecture(single).num_heads == 1
    official, out = tmp_path / "official.pth", tmp_path / "ours.pth"
    torch.save({"model": single}, official)
    assert main(["convert", str(official), "--out", str(out)]) == 0
    model, cfg, _ = load_model(out)
    assert (cfg.model.decoder.num_heads, cfg.model.decoder.used_head, model.used_head) == (1, "main", 0)
    embedding = model.state_dict()["decoder.head_embedding"]
    assert torch.equal(embedding[0], sd["decoder.decoder_embedding.weight"][0])
