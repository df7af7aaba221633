"""Drawing detections on images (torchvision ``draw_bounding_boxes``)."""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import torch
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

# A qualitative palette (RGB), cycled by category id.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
]


def class_colour(category_id: int) -> tuple[int, int, int]:
    return PALETTE[category_id % len(PALETTE)]


def draw_boxes(
    image: PIL.Image.Image,
    boxes_xyxy: Sequence[Sequence[float]],
    colours: Sequence[tuple[int, int, int]],
    labels: Sequence[str] | None = None,
    width: int = 2,
) -> PIL.Image.Image:
    """Draw pixel ``xyxy`` boxes on a copy of ``image``."""
    if len(boxes_xyxy) == 0:
        return image.copy()
    canvas = F.pil_to_tensor(image.convert("RGB"))
    boxes = torch.tensor([list(b) for b in boxes_xyxy], dtype=torch.float32)
    out = draw_bounding_boxes(canvas, boxes, labels=list(labels) if labels else None,
                              colors=list(colours), width=width)
    return F.to_pil_image(out)


def draw_detections(image: PIL.Image.Image, detections: Sequence) -> PIL.Image.Image:
    """Draw :class:`asag.api.Detection` objects in their class colours with ``name score`` labels."""
    return draw_boxes(
        image,
        [d.box for d in detections],
        [class_colour(d.category_id) for d in detections],
        [f"{d.category_name} {d.score:.2f}" for d in detections],
    )
