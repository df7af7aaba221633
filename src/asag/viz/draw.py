"""Drawing detections on images (torchvision ``draw_bounding_boxes``) and laying out figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
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
    fill_labels: bool = False,
) -> PIL.Image.Image:
    """Draw pixel ``xyxy`` boxes on a copy of ``image``; ``fill_labels`` writes the labels in black on
    the box colour (readable on busy images)."""
    if len(boxes_xyxy) == 0:
        return image.copy()
    canvas = F.pil_to_tensor(image.convert("RGB"))
    boxes = torch.tensor([list(b) for b in boxes_xyxy], dtype=torch.float32)
    out = draw_bounding_boxes(canvas, boxes, labels=list(labels) if labels else None,
                              colors=list(colours), width=width, fill_labels=fill_labels)
    return F.to_pil_image(out)


def draw_detections(image: PIL.Image.Image, detections: Sequence) -> PIL.Image.Image:
    """Draw :class:`asag.api.Detection` objects in their class colours with ``name score`` labels."""
    return draw_boxes(
        image,
        [d.box for d in detections],
        [class_colour(d.category_id) for d in detections],
        [f"{d.category_name} {d.score:.2f}" for d in detections],
    )


# ------------------------------------------------------------------------------------------ panels

# Figure layout: a title strip above each panel, a gap between panels, on a dark background.
TITLE_HEIGHT = 22
TITLE_FONT_SIZE = 14
TITLE_MARGIN = 4
PANEL_GAP = 6
BACKGROUND = (24, 24, 24)
TITLE_COLOUR = (240, 240, 240)


@dataclass
class Panel:
    """One picture of a figure: ``image`` drawn under the one-line ``title``."""

    title: str
    image: PIL.Image.Image


def compose_panels(panels: Sequence[Panel], columns: int | None = None) -> PIL.Image.Image:
    """Lay panels out on a grid (``columns`` per row; default: one row), each under its title."""
    if not panels:
        raise ValueError("no panels to compose")
    columns = min(columns or len(panels), len(panels))
    rows = math.ceil(len(panels) / columns)
    cell_w = max(p.image.width for p in panels)
    cell_h = max(p.image.height for p in panels) + TITLE_HEIGHT
    size = (columns * cell_w + (columns - 1) * PANEL_GAP, rows * cell_h + (rows - 1) * PANEL_GAP)
    canvas = PIL.Image.new("RGB", size, BACKGROUND)
    pen = PIL.ImageDraw.Draw(canvas)
    font = PIL.ImageFont.load_default(size=TITLE_FONT_SIZE)
    for i, panel in enumerate(panels):
        x = (i % columns) * (cell_w + PANEL_GAP)
        y = (i // columns) * (cell_h + PANEL_GAP)
        pen.text((x + TITLE_MARGIN, y + TITLE_MARGIN // 2), panel.title, fill=TITLE_COLOUR, font=font)
        canvas.paste(panel.image.convert("RGB"), (x, y + TITLE_HEIGHT))
    return canvas
