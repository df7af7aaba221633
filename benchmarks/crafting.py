"""Shared helper of the benchmark scripts: models whose anchor generator really probes on random inputs.

A randomly initialised anchor generator outputs ``max_anchors`` coarse anchors and never probes P4/P3
(spec Appendix C), which says nothing about the cost of Adaptive Probing. As for the official
fixtures (``fixtures/official/README.md``, "Weights"), only the biases of the two last linears
(``proj_all.layers.2``, ``proj_patch.layers.2``) are crafted: every anchor slot gets a role through its
(cx, cy, w, h, confidence) logits -- refinement candidate, confident, low, tiny (< 3 px), large -- with
ranges far from every threshold, so probing decisions do not hinge on the inputs. The role tables and
the crafting itself live in :mod:`asag.engine.benchmark` (``asag benchmark --craft`` uses them too);
this module builds crafted models for the scripts.

    from crafting import crafted_anchor_generator, crafted_detector
"""

from __future__ import annotations

import torch

from asag.build import build_model
from asag.config import load_config
from asag.engine.benchmark import COARSE_ROLES, PATCH_ROLES, ROLE_CYCLE, craft_probing_biases
from asag.modeling.anchor_generator import AnchorGenerator
from asag.modeling.detector import ASAG

__all__ = [
    "COARSE_ROLES",
    "PATCH_ROLES",
    "ROLE_CYCLE",
    "craft_probing_biases",
    "crafted_anchor_generator",
    "crafted_detector",
]


def crafted_anchor_generator(seed: int = 0) -> AnchorGenerator:
    """Full-width anchor generator (d = 256, compress_dim 8, 1000-wide MLPs), official initialisation
    (seeded) except the crafted last-layer biases; eval mode."""
    torch.manual_seed(seed)
    model = AnchorGenerator()
    craft_probing_biases(model, seed)
    return model.eval()


def crafted_detector(preset: str, overrides: list[str] | None = None, seed: int = 0,
                     craft: bool = True) -> ASAG:
    """A preset's detector with random (seeded) weights, no backbone checkpoint, crafted anchor biases
    (plain random weights throughout with ``craft=False``); eval mode."""
    torch.manual_seed(seed)
    cfg = load_config(preset, list(overrides or []))
    cfg.model.backbone.weights = None
    model = build_model(cfg)
    if craft:
        craft_probing_biases(model.anchor_generator, seed)
    return model.eval()
