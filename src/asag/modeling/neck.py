"""Feature pyramid (spec 2.2): torchvision's FPN without extra levels."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor
from torchvision.ops import FeaturePyramidNetwork


class Neck(FeaturePyramidNetwork):
    """torchvision ``FeaturePyramidNetwork``: 1x1 lateral convs, nearest top-down, 3x3 output convs.

    Input ``OrderedDict`` ``C2..C5``; output list ``[P2, P3, P4, P5]`` of ``[B, out_channels, H/s, W/s]``.
    State-dict keys follow torchvision >= 0.13 (``inner_blocks.i.0.weight``); the older names without
    ``.0`` are remapped by :mod:`asag.convert`.
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256) -> None:
        super().__init__(in_channels_list=list(in_channels), out_channels=out_channels)
        self.out_channels = out_channels

    def forward(self, features: OrderedDict[str, Tensor]) -> list[Tensor]:  # type: ignore[override]
        return list(super().forward(features).values())
