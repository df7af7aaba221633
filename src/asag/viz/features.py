"""FPN feature maps as heat maps over the image (the supplement's Figure C-3).

A level's heat map is the mean over channels of its ``[d, H_l, W_l]`` map, cut to the cells that cover
the resized image (the batch padding neither shows nor bleeds in through the interpolation), upsampled
by the level's stride, cut to the resized image's pixels, resized to the original image, min-max
normalised to ``[0, 1]``, coloured with a "jet" colour map (blue = low, red = high) and blended over the
image. No plotting library is needed: the colour map is a piecewise-linear table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor

from asag.modeling.backbone import RESNET_STRIDES
from asag.viz.draw import BACKGROUND, Panel

# ``ASAG.extract_features`` returns these levels in this order, at the ResNet strides 4, 8, 16, 32.
FPN_LEVELS = ("P2", "P3", "P4", "P5")
FPN_STRIDES = dict(zip(FPN_LEVELS, RESNET_STRIDES))
# The classic "jet" colour map: positions in [0, 1] and their RGB colours, linear in between.
JET_POSITIONS = (0.0, 0.125, 0.375, 0.625, 0.875, 1.0)
JET_COLOURS = ((0, 0, 128), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (128, 0, 0))
# Weight of the heat-map colours in the blend with the image.
HEAT_ALPHA = 0.5
# Height in pixels of the colour bar drawn under the feature figure.
COLOUR_BAR_HEIGHT = 12


def mean_activation(feature: Tensor) -> Tensor:
    """``[C, H, W]`` feature map -> ``[H, W]`` mean over channels."""
    return feature.float().mean(dim=0)


def normalise_unit(values: Tensor) -> Tensor:
    """Min-max normalise to ``[0, 1]``; a constant map becomes all zeros."""
    low, high = values.min(), values.max()
    span = high - low
    if float(span) <= 0:
        return torch.zeros_like(values)
    return (values - low) / span


def heat_map(feature: Tensor, stride: int, size_hw: tuple[int, int], orig_hw: tuple[int, int]) -> Tensor:
    """One level's heat map over the original image.

    Args:
        feature: ``[C, H_l, W_l]`` FPN map of one image of the padded batch (cell ``(i, j)`` covers
            pixels ``[i * stride, (i + 1) * stride)`` of the padded image).
        stride: the level's stride.
        size_hw: ``(h, w)`` of the resized, unpadded image; orig_hw: ``(h, w)`` of the original image.
    Returns:
        ``[orig_h, orig_w]`` float in ``[0, 1]`` (1 = the highest mean activation inside the image).
    """
    h, w = size_hw
    cells_h, cells_w = math.ceil(h / stride), math.ceil(w / stride)  # cells touching the image
    mean = mean_activation(feature)[None, None, :cells_h, :cells_w]  # [1, 1, h_c, w_c]: padding cut away
    cells = F.interpolate(mean, scale_factor=stride, mode="bilinear", align_corners=False)  # [1, 1, >=h, >=w]
    resized = cells[..., :h, :w]  # [1, 1, h, w]
    original = F.interpolate(resized, size=tuple(orig_hw), mode="bilinear", align_corners=False)
    return normalise_unit(original[0, 0])  # [orig_h, orig_w]


def colourise(heat: Tensor) -> np.ndarray:
    """``[H, W]`` values in ``[0, 1]`` -> ``[H, W, 3]`` uint8 jet colours."""
    values = heat.detach().cpu().numpy().clip(0.0, 1.0)
    table = np.asarray(JET_COLOURS, dtype=np.float64)  # [S, 3]
    channels = [np.interp(values, JET_POSITIONS, table[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)  # [H, W, 3]


def overlay_heat(image: PIL.Image.Image, heat: Tensor, alpha: float = HEAT_ALPHA) -> PIL.Image.Image:
    """Blend the jet colours of ``heat`` (``[H, W]`` in ``[0, 1]``, the image's size) over ``image``."""
    if tuple(heat.shape) != (image.height, image.width):
        size = (image.height, image.width)
        raise ValueError(f"heat map {tuple(heat.shape)} does not match the image {size}")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)  # [H, W, 3]
    blended = (1.0 - alpha) * pixels + alpha * colourise(heat).astype(np.float64)
    return PIL.Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def feature_panels(
    image: PIL.Image.Image,
    features: Sequence[Tensor],
    image_index: int,
    levels: Sequence[str],
    size_hw: tuple[int, int],
) -> list[Panel]:
    """Heat-map panels of the chosen levels for one image of a batch.

    Args:
        image: the original image.
        features: ``[P2, P3, P4, P5]``, each ``[B, C, H_l, W_l]`` (``ASAG.extract_features``).
        image_index: the image's row in the batch.
        levels: names from :data:`FPN_LEVELS`.
        size_hw: ``(h, w)`` of the resized unpadded image.
    """
    panels = []
    for level in levels:
        if level not in FPN_STRIDES:
            raise ValueError(f"unknown FPN level {level!r}; choose from {', '.join(FPN_LEVELS)}")
        feature = features[FPN_LEVELS.index(level)][image_index]  # [C, H_l, W_l]
        heat = heat_map(feature, FPN_STRIDES[level], size_hw, (image.height, image.width))
        title = f"{level} mean activation (stride {FPN_STRIDES[level]})"
        panels.append(Panel(title, overlay_heat(image, heat)))
    return panels


def colour_bar(width: int, height: int = COLOUR_BAR_HEIGHT) -> PIL.Image.Image:
    """A horizontal legend of the colour map: low (left) to high (right)."""
    ramp = torch.linspace(0.0, 1.0, max(width, 2))[None].expand(height, -1)  # [height, width]
    return PIL.Image.fromarray(colourise(ramp))


def with_colour_bar(figure: PIL.Image.Image) -> PIL.Image.Image:
    """``figure`` with the colour map's legend (low = left, high = right) along its bottom edge."""
    out = PIL.Image.new("RGB", (figure.width, figure.height + COLOUR_BAR_HEIGHT), BACKGROUND)
    out.paste(figure, (0, 0))
    out.paste(colour_bar(figure.width), (0, figure.height))
    return out
