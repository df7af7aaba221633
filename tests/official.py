"""Loading helpers for the official reference fixtures (see ``tests/fixtures/official/README.md``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

# The reference tensors of the authors' implementation, kept in the repository so that every equivalence
# test runs on any fresh clone; ``$ASAG_FIXTURES`` points the tests at another copy (e.g. a regenerated set).
FIXTURES_DIR = Path(os.environ.get("ASAG_FIXTURES") or Path(__file__).resolve().parent / "fixtures/official")


def load(fixtures_dir: Path, name: str) -> dict:
    return torch.load(fixtures_dir / name, weights_only=True)


def load_inputs(fixtures_dir: Path, case: str) -> dict:
    """Backbone features C2..C5 as float32 (exact), plus sizes. ``image_sizes`` is ``[B, 2]`` (h, w)."""
    raw = load(fixtures_dir, f"inputs_case_{case}.pt")
    scale = raw["scale"]
    out = {f"C{i}": raw[f"C{i}_u8"].to(torch.float32) * scale for i in range(2, 6)}
    out["imgs_whwh"] = raw["imgs_whwh"]
    out["image_sizes"] = torch.tensor([list(hw) for hw in raw["hw"]], dtype=torch.int64)
    out["orig_sizes"] = raw["orig_sizes"]
    out["padded_hw"] = raw["padded_hw"]
    return out


def load_weights(fixtures_dir: Path, variant: str, prefix: str = "") -> dict[str, Tensor]:
    """Official fixture weights (float16 on disk) as float32, optionally restricted to ``prefix``."""
    sd = load(fixtures_dir, f"weights_{variant}.pt")
    return {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}


def group(d: dict, prefix: str) -> dict:
    """Keys under ``prefix.`` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in d.items() if k.startswith(prefix + ".")}


def listed(d: dict, prefix: str) -> list:
    """The list stored flat as ``prefix.num`` and ``prefix.<i>`` (or ``prefix.<i>.*``)."""
    num = d[f"{prefix}.num"]
    out = []
    for i in range(num):
        key = f"{prefix}.{i}"
        out.append(d[key] if key in d else group(d, key))
    return out


FIXTURE_MODEL = {
    # Reduced widths used by the fixtures (README "Model configuration used").
    "hidden_dim": 64,
    "compress_dim": 4,
    "in_points": 8,
    "out_points": 16,
    "num_decoder_heads": 2,
    "num_classes": 80,
    "ffn_dim": 2048,
    "dim_dynamic": 64,
}

CASES = ["a", "b"]
LEVELS = ["P3P6", "P4P6", "P5P6"]
VARIANTS = ["asag_a", "asag_s"]


def fpn_features(fixtures_dir: Path, case: str) -> list[Tensor]:
    """P2..P5 ``[B, 64, H/s, W/s]`` for an input case: stored (case a) or torchvision FPN on C2..C5."""
    if case == "a":
        stored = load(fixtures_dir, "fpn_case_a.pt")
        return [stored[f"P{i}"] for i in range(2, 6)]
    from collections import OrderedDict

    from torchvision.ops import FeaturePyramidNetwork

    inputs = load_inputs(fixtures_dir, case)
    fpn = FeaturePyramidNetwork([256, 512, 1024, 2048], FIXTURE_MODEL["hidden_dim"])
    fpn.load_state_dict(load_weights(fixtures_dir, "asag_a", "neck."))
    with torch.no_grad():
        out = fpn(OrderedDict((f"C{i}", inputs[f"C{i}"]) for i in range(2, 6)))
    return list(out.values())


def padding_attn_mask(valid_mask: Tensor, num_heads: int = 8) -> Tensor:
    """Eval attention mask without denoising (spec 4.1): ``[B * num_heads, Q, Q]`` bool, True = blocked.

    Valid rows may not attend to padded columns; padded rows see everything; batch-major ``b * heads + h``.
    """
    blocked = valid_mask[:, :, None] & ~valid_mask[:, None, :]  # [B, Q, Q]
    return blocked.repeat_interleave(num_heads, dim=0)
