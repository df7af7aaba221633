"""The authors' checkpoint layout -> ours.

The authors' checkpoints hold ``{"model": state_dict, ...}`` with the key prefixes listed in the
spec's Appendix B. Inside the anchor generator, the proposal stage and each head our parameter
names are the authors', so conversion only renames prefixes, accepts the pre-0.13 torchvision FPN
names, optionally keeps one head of a multi-head checkpoint, and infers the architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from asag.errors import ConfigError
from asag.modeling.decoders.parallel import select_head

# (authors' prefix, our prefix), applied in order; the first match wins.
PREFIX_MAP = [
    ("backbone.0.body.", "backbone.body."),
    ("rpn.", "proposal."),
    ("decoder.decoder_embedding.weight", "decoder.head_embedding"),
    ("decoder.bbox_head.", "decoder.heads."),
    ("decoder.head_series.", "decoder.heads."),
]
# torchvision < 0.13 named the FPN convs without the inner ``.0`` (spec 2.2).
_OLD_FPN = re.compile(r"^neck\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$")


@dataclass
class OfficialArchitecture:
    """What a state dict in the authors' layout tells about the model it came from."""

    decoder_type: str  # "adamixer" | "sparse_rcnn"
    num_heads: int
    num_classes: int
    hidden_dim: int
    backbone: str | None  # None when the state dict holds no backbone
    compress_dim: int
    num_anchors_coarse: int
    num_anchors_patch: int
    mlp_hidden_dim: int


def rename_official_key(key: str) -> str | None:
    """Our name for one of the authors' keys (``None`` for keys we drop)."""
    if key.endswith("num_batches_tracked"):
        return None
    match = _OLD_FPN.match(key)
    if match:
        return f"neck.{match.group(1)}.{match.group(2)}.0.{match.group(3)}"
    for old, new in PREFIX_MAP:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def infer_architecture(state_dict: dict[str, Tensor]) -> OfficialArchitecture:
    """Read the architecture off a state dict in the authors' layout."""
    keys = state_dict.keys()
    if any(k.startswith("decoder.bbox_head.") for k in keys):
        decoder_type, head_prefix, cls_key = "adamixer", "decoder.bbox_head.", "fc_cls.weight"
    elif any(k.startswith("decoder.head_series.") for k in keys):
        decoder_type, head_prefix, cls_key = "sparse_rcnn", "decoder.head_series.", "class_logits.weight"
    else:
        raise KeyError("no decoder heads (decoder.bbox_head.* or decoder.head_series.*) in the state dict")
    heads = {int(k[len(head_prefix):].split(".")[0]) for k in keys if k.startswith(head_prefix)}
    num_classes, hidden_dim = state_dict[f"{head_prefix}0.{cls_key}"].shape
    layer3_blocks = {k.split(".")[4] for k in keys if k.startswith("backbone.0.body.layer3.")}
    backbone = {6: "resnet50", 23: "resnet101"}.get(len(layer3_blocks)) if layer3_blocks else None
    ln = state_dict["anchor_generator.layernorm.0.weight"]
    return OfficialArchitecture(
        decoder_type=decoder_type,
        num_heads=len(heads),
        num_classes=int(num_classes),
        hidden_dim=int(hidden_dim),
        backbone=backbone,
        compress_dim=int(ln.shape[1]),
        num_anchors_coarse=state_dict["anchor_generator.proj_all.layers.2.bias"].shape[0] // 5,
        num_anchors_patch=state_dict["anchor_generator.proj_patch.layers.2.bias"].shape[0] // 5,
        mlp_hidden_dim=state_dict["anchor_generator.proj_all.layers.0.bias"].shape[0],
    )


def convert_state_dict(
    state_dict: dict[str, Tensor], keep_head: int | None = None
) -> dict[str, Tensor]:
    """Authors' layout -> ours (float32), optionally keeping only head ``keep_head``."""
    out = {}
    for key, value in state_dict.items():
        new = rename_official_key(key)
        if new is not None:
            out[new] = value.float() if value.is_floating_point() else value
    if keep_head is None:
        return out
    return select_head(out, keep_head, out["decoder.head_embedding"].shape[0])


def head_index(used_head: str, num_heads: int) -> int:
    """``"main"`` -> the last head; ``"aux_k"`` -> k (``k < num_heads - 1``); ConfigError otherwise."""
    if used_head == "main":
        return num_heads - 1
    k = used_head.removeprefix("aux_")
    if used_head.startswith("aux_") and k.isdigit() and int(k) < num_heads - 1:
        return int(k)
    choices = ", ".join(["main", *(f"aux_{i}" for i in range(num_heads - 1))])
    raise ConfigError(f"head {used_head!r}: this model has {num_heads} head(s); choose {choices}")
