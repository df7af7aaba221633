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


# Detection drawings: label text on a filled strip of the box colour, kept inside the image.
LABEL_FONT_SIZE = 14
LABEL_PADDING = 2
DETECTION_LINE_WIDTH = 2
# Text colour on a label strip: black on light colours, white on dark ones (ITU-R BT.601 luma).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
DARK_LUMA = 128


def label_origin(box_xyxy: Sequence[float], label_size: tuple[int, int], image_size: tuple[int, int]
                 ) -> tuple[int, int]:
    """Top-left pixel of a ``label_size = (w, h)`` strip for a box: above the box's top-left corner,
    or just inside the box when there is no room above; shifted so the strip stays inside an image of
    ``image_size = (W, H)`` (at its left / top edge when it is wider / taller than the image)."""
    (w, h), (width, height) = label_size, image_size
    x1, y1 = math.floor(box_xyxy[0]), math.floor(box_xyxy[1])
    y = y1 - h if y1 - h >= 0 else max(y1, 0)
    x = min(max(x1, 0), width - w)
    y = min(y, height - h)
    return max(x, 0), max(y, 0)


def text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    luma = sum(w * c for w, c in zip(LUMA_WEIGHTS, fill))
    return (0, 0, 0) if luma >= DARK_LUMA else (255, 255, 255)


def draw_detections(image: PIL.Image.Image, detections: Sequence, *, min_side: int | None = None
                    ) -> PIL.Image.Image:
    """Draw :class:`asag.api.Detection` objects (``box`` xyxy in pixels of ``image``) in their class
    colours, each with a ``name score`` label on a filled strip inside the image.

    ``min_side``: scale small images up (bicubic) so that their shorter side has at least this many
    pixels, boxes with them, so that labels stay readable; larger images are drawn at their size.
    """
    scale = max(1.0, min_side / min(image.size)) if min_side else 1.0
    canvas = image.convert("RGB")
    if scale > 1.0:
        canvas = canvas.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.BICUBIC)
    else:
        canvas = canvas.copy()
    pen = PIL.ImageDraw.Draw(canvas)
    font = PIL.ImageFont.load_default(size=LABEL_FONT_SIZE)
    ordered = sorted(detections, key=lambda d: d.score)  # the most confident drawn last, on top
    for det in ordered:
        pen.rectangle([v * scale for v in det.box], outline=class_colour(det.category_id),
                      width=DETECTION_LINE_WIDTH)
    for det in ordered:
        text = f"{det.category_name} {det.score:.2f}"
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        size = (right - left + 2 * LABEL_PADDING, bottom - top + 2 * LABEL_PADDING)
        x, y = label_origin([v * scale for v in det.box], size, canvas.size)
        fill = class_colour(det.category_id)
        pen.rectangle([x, y, x + size[0] - 1, y + size[1] - 1], fill=fill)
        pen.text((x + LABEL_PADDING - left, y + LABEL_PADDING - top), text, fill=text_colour(fill), font=font)
    return canvas


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
