"""``asag convert OFFICIAL.pth --out OURS.pth``: load the authors' released checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from asag.build import build_model
from asag.config import apply_overrides, config_from_dict, load_config
from asag.convert.official import convert_state_dict, head_index, infer_architecture
from asag.data.coco_categories import default_label_map
from asag.engine.checkpoint import one_line, read_torch_file, save_checkpoint
from asag.errors import CheckpointError
from asag.outputs import check_output_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a checkpoint of the authors' release into an asag checkpoint")
    parser.add_argument("checkpoint", help="the authors' .pth file (state dict under 'model')")
    parser.add_argument("--out", required=True, help="where to write the converted checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (default: refuse)")
    parser.add_argument("--keep-head", metavar="HEAD",
                        help="keep one head of a multi-head checkpoint (main or aux_k), e.g. for speed tests "
                             "(default: keep all heads)")
    parser.add_argument("--preset", help="preset whose training/data settings to record (default: inferred)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides")
    parser.set_defaults(func=run)


def read_official(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an authors' checkpoint, read with ``weights_only=True``."""
    obj = read_torch_file(path, allow=[argparse.Namespace])
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no state dict found (expected a dict of tensors under 'model')")
    return state


def official_overrides(state: dict[str, torch.Tensor]) -> list[str]:
    """Config overrides that describe the architecture stored in an authors' state dict."""
    try:
        arch = infer_architecture(state)
    except KeyError as err:
        raise CheckpointError(f"not an ASAG checkpoint of the authors' layout ({err})") from None
    out = [
        f"model.decoder.type={arch.decoder_type}",
        f"model.variant={'asag_a' if arch.decoder_type == 'adamixer' else 'asag_s'}",
        f"model.decoder.num_heads={arch.num_heads}",
        f"model.num_classes={arch.num_classes}",
        f"model.hidden_dim={arch.hidden_dim}",
        f"model.neck.out_channels={arch.hidden_dim}",
        f"model.anchor_generator.compress_dim={arch.compress_dim}",
        f"model.anchor_generator.mlp_hidden_dim={arch.mlp_hidden_dim}",
        f"model.anchor_generator.num_anchors_coarse={arch.num_anchors_coarse}",
        f"model.anchor_generator.num_anchors_patch={arch.num_anchors_patch}",
    ]
    if arch.backbone:
        out.append(f"model.backbone.name={arch.backbone}")
    return out


def default_preset(state: dict[str, torch.Tensor]) -> str:
    arch = infer_architecture(state)
    many = arch.num_anchors_coarse > 50  # the release's 300-query setting
    return {("adamixer", False): "asag_a_r50_1x_100q", ("adamixer", True): "asag_a_r50_3x_300q",
            ("sparse_rcnn", False): "asag_s_r50_3x_100q", ("sparse_rcnn", True): "asag_s_r50_3x_300q"}[
        (arch.decoder_type, many)]


def run(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    check_output_file(args.out, "--out", overwrite=args.overwrite)
    state = read_official(path)
    overrides = official_overrides(state)
    base = load_config(args.preset or default_preset(state))
    num_heads = infer_architecture(state).num_heads
    keep = head_index(args.keep_head, num_heads) if args.keep_head else None
    if keep is not None:
        overrides += ["model.decoder.num_heads=1"]
    if keep is not None or num_heads == 1:  # one head left: it is the main one, whatever the preset says
        overrides += ["model.decoder.used_head=main"]
    cfg = config_from_dict(apply_overrides(base.to_dict(), overrides + list(args.overrides)))
    converted = convert_state_dict(state, keep_head=keep)
    model = build_model(cfg)
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False)
    except RuntimeError as err:  # shapes that do not fit
        raise CheckpointError(f"{path}: converted weights do not fit ({one_line(err)})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: converted weights do not fit ({len(missing)} missing, e.g. "
                              f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    labels = default_label_map(cfg.model.num_classes)
    # save_checkpoint writes atomically: --out is complete or untouched
    save_checkpoint(args.out, model=model, optimizer=None, scheduler=None, scaler=None, epoch=-1,
                    iteration=0, config=cfg.to_dict(), label_map=labels.to_dict() if labels else {},
                    extra={"converted_from": str(path)})
    print(f"converted {path} ({len(state)} tensors, {cfg.model.variant}, {cfg.model.decoder.num_heads} "
          f"head(s)) -> {args.out}")
    return 0
