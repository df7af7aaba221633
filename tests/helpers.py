"""Models and inputs shared by several test modules (import from here, not from another test module)."""

from __future__ import annotations

import torch
from tests.official import load_weights

from asag.build import build_model
from asag.config import load_config
from asag.convert.official import convert_state_dict
from asag.engine.benchmark import craft_probing_biases
from asag.modeling.anchor_generator import AnchorGenerator

# COCO category ids of the 80 contiguous labels (the fixtures' detections carry category ids).
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def fixture_model(fixtures_dir, variant: str, level: str):
    """The ``tiny_cpu`` detector with the fixtures' reduced widths (README "Model configuration used") in
    evaluation mode, and the converted official weights of ``variant`` (load them with ``strict=False``:
    the fixtures hold no backbone)."""
    overrides = [
        "model.num_classes=80", "model.hidden_dim=64", "model.neck.out_channels=64",
        "model.backbone.name=resnet50", "model.backbone.norm=frozen_bn",
        "model.anchor_generator.compress_dim=4", "model.anchor_generator.mlp_hidden_dim=500",
        f"model.anchor_generator.inference_level={level}",
        "model.proposal.ffn_dim=2048", "model.decoder.ffn_dim=2048", "model.decoder.in_points=8",
        "model.decoder.out_points=16", "model.decoder.dim_dynamic=64", "model.decoder.num_heads=2",
        f"model.decoder.type={'adamixer' if variant == 'asag_a' else 'sparse_rcnn'}",
    ]
    cfg = load_config("tiny_cpu", overrides)
    model = build_model(cfg).eval()
    return model, convert_state_dict(load_weights(fixtures_dir, variant))


def crafted_generator() -> AnchorGenerator:
    """A full-width anchor generator (seed 0) whose crafted biases make it probe P4 and P3."""
    torch.manual_seed(0)
    generator = AnchorGenerator().eval()
    craft_probing_biases(generator)
    return generator


def probing_inputs(batch: int, device: str = "cpu") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Seeded P3-P5 levels of a 256x384 image and its sizes, on which :func:`crafted_generator` probes P4
    and P3 at any batch size."""
    h, w = 256, 384
    levels = [torch.randn(batch, 256, h // s, w // s, generator=torch.Generator().manual_seed(s)).to(device)
              for s in (8, 16, 32)]
    return levels, torch.tensor([[h, w]] * batch, device=device)


def random_boxes(num: int, width: float, height: float, seed: int = 0) -> torch.Tensor:
    """``[num, 4]`` xyxy boxes of all sizes, some reaching outside the image or thinner than a cell."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * torch.tensor([width * 1.2, height * 1.2]) - 20.0
    wh = torch.rand(num, 2, generator=g) ** 2 * torch.tensor([width, height]) + 0.5
    return torch.cat([xy, xy + wh], dim=1)
