"""Training and evaluation transforms (spec 9.1), built on ``torchvision.transforms.v2``.

Geometric steps run on the PIL image and a ``tv_tensors.BoundingBoxes`` (xyxy, pixels of the current
image), so v2 moves, scales and clips the boxes with the image. Written by hand, because v2 lacks them:

* :class:`ResizeShortSide`: the DETR resize rule (``round`` when the long side caps the short side, then
  ``floor`` for the long side). ``v2.Resize(max_size=...)`` and ``v2.RandomShortestSize`` use ``int``
  for the capped side and scale the long side to exactly ``max_size``, which gives different sizes.
* :class:`RandomSizeCrop`: width and height drawn independently and uniformly from a range (v2 only
  crops to a fixed size, or by area and aspect ratio with a resize).
* :class:`DropEmptyBoxes`: drops boxes with zero width or height; ``v2.SanitizeBoundingBoxes`` refuses
  thresholds below 1 px and would also drop the thin (< 1 px) boxes the spec keeps.

:class:`DetectionTransform` then converts the image to a normalised float tensor and the boxes to
normalised cxcywh of the resized image (``ImageTargets.size`` = resized ``(h, w)``, ``orig_size`` =
``(h, w)`` as read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import PIL.Image
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from asag.structures import ImageTargets

# ImageNet statistics of the torchvision backbones (spec 9.1).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Spec 9.1: COCO 1x / evaluation resize, and the six scales and crop branch of the 3x schedule.
DEFAULT_SIZE = 800
DEFAULT_MAX_SIZE = 1333
MULTI_SCALES = (800, 768, 736, 704, 672, 640)
CROP_PRE_SCALES = (400, 500, 600)
CROP_MIN_SIZE = 384
CROP_MAX_SIZE = 600
DEFAULT_FLIP_PROB = 0.5
DEFAULT_CROP_PROB = 0.5


class Sample(NamedTuple):
    """One transformed data-set item: ``image`` ``[3, h, w]`` float (normalised) and its targets."""

    image: Tensor
    target: ImageTargets


@dataclass(frozen=True)
class CropSpec:
    """The crop branch of the 3x pipeline (spec 9.1).

    With probability ``prob``: resize the short side to one of ``pre_scales`` (no max size), crop a
    window whose width and height are drawn uniformly from ``[min_size, min(side, max_size)]``, then
    resize to one of the training scales with ``final_max_size``.
    """

    pre_scales: Sequence[int] = CROP_PRE_SCALES
    min_size: int = CROP_MIN_SIZE
    max_size: int = CROP_MAX_SIZE
    final_max_size: int = DEFAULT_MAX_SIZE
    prob: float = DEFAULT_CROP_PROB


# ------------------------------------------------------------------------------------- geometry


def resized_hw(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Output ``(h, w)`` of the DETR resize rule (spec 9.1).

    The short side becomes ``size``, unless ``long / short * size > max_size``: then it becomes
    ``round(max_size * short / long)``. The long side is ``floor(S * long / short)``. Unlike the release,
    the short side is at least 1 px (aspect ratios beyond ``2 * max_size`` would round it to 0 and crash).
    """
    short, long = (h, w) if h <= w else (w, h)
    if max_size is not None and long / short * size > max_size:
        size = max(1, int(round(max_size * short / long)))
    new_long = int(size * long / short)
    return (size, new_long) if h <= w else (new_long, size)


def _image_hw(flat_inputs: list[Any]) -> tuple[int, int]:
    """``(h, w)`` of the first image among the flattened transform inputs."""
    for inpt in flat_inputs:
        if isinstance(inpt, PIL.Image.Image | tv_tensors.Image):
            h, w = F.get_size(inpt)
            return h, w
    raise TypeError("no image among the transform inputs")


def _draw(choices: Sequence[int]) -> int:
    """One element drawn uniformly with the torch RNG (seeded per training sample, see
    :mod:`asag.data.seeding`); a single choice draws nothing, so that evaluation never moves the RNG."""
    if len(choices) == 1:
        return int(choices[0])
    return int(choices[int(torch.randint(len(choices), ()))])


class ResizeShortSide(v2.Transform):
    """Resize the short side to one of ``sizes`` (drawn uniformly) by the DETR rule (:func:`resized_hw`)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None) -> None:
        super().__init__()
        self.sizes = tuple(sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_hw(flat_inputs)
        return {"hw": list(resized_hw(h, w, _draw(self.sizes), self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["hw"])


class RandomSizeCrop(v2.Transform):
    """Crop a window with height and width uniform in ``[min_size, min(side, max_size)]``, at a uniform
    position. v2 clips the boxes to the window; follow with :class:`DropEmptyBoxes`."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def _extent(self, side: int) -> int:
        high = min(side, self.max_size)
        low = min(self.min_size, high)  # images smaller than min_size are kept whole along that side
        return int(torch.randint(low, high + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_hw(flat_inputs)
        ch, cw = self._extent(h), self._extent(w)
        top = int(torch.randint(h - ch + 1, ()))
        left = int(torch.randint(w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


class DropEmptyBoxes(v2.Transform):
    """Remove boxes (and their labels) with zero width or height, as left by a crop.

    Input: ``(image, {"boxes": BoundingBoxes xyxy, "labels": [N] ...})``.
    """

    def forward(self, *inputs: Any) -> Any:
        image, target = inputs if len(inputs) > 1 else inputs[0]
        boxes = target["boxes"]
        xyxy = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])  # [N]
        target = dict(target, boxes=tv_tensors.wrap(boxes[keep], like=boxes), labels=target["labels"][keep])
        return image, target


# ------------------------------------------------------------------------------------ pipelines


class DetectionTransform:
    """Geometric v2 steps, then tensor conversion, normalisation and normalised cxcywh targets.

    ``geometric``: v2 transforms applied to ``(PIL image, {"boxes": BoundingBoxes, "labels"})``.
    ``mean`` / ``std``: per-channel normalisation of the ``[0, 1]`` image; ``None`` skips it.
    """

    def __init__(
        self,
        geometric: Sequence[v2.Transform] = (),
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
    ) -> None:
        self.geometric = v2.Compose(list(geometric)) if geometric else v2.Identity()
        to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        norm = [v2.Normalize(list(mean), list(std))] if mean is not None and std is not None else []
        self.to_tensor = v2.Compose(to_float + norm)

    def __call__(
        self, image: PIL.Image.Image, boxes_xyxy: Tensor, labels: Tensor, image_id: int = 0
    ) -> Sample:
        """Transform one image.

        image: RGB PIL image as read; ``boxes_xyxy``: ``[N, 4]`` float xyxy in its pixels; ``labels``:
        ``[N]`` int64 contiguous indices. Returns the ``[3, h, w]`` float image and ImageTargets with
        ``[M, 4]`` cxcywh boxes normalised by the transformed ``(w, h)`` (M <= N after crops).
        """
        orig_hw = (image.height, image.width)
        boxes = tv_tensors.BoundingBoxes(boxes_xyxy.float(), format="XYXY", canvas_size=orig_hw)
        image, target = self.geometric(image, {"boxes": boxes, "labels": labels})
        tensor = self.to_tensor(image)
        h, w = tensor.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        boxes_cxcywh = box_convert(target["boxes"].as_subclass(Tensor), "xyxy", "cxcywh") / scale  # [M, 4]
        targets = ImageTargets(
            boxes=boxes_cxcywh, labels=target["labels"], image_id=image_id, size=(h, w), orig_size=orig_hw
        )
        return Sample(tensor.as_subclass(Tensor), targets)


def build_train_transforms(
    scales: Sequence[int],
    max_size: int,
    crop: CropSpec | None = None,
    flip_prob: float = DEFAULT_FLIP_PROB,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> DetectionTransform:
    """Spec 9.1 training pipeline: horizontal flip, then resize the short side to one of ``scales``
    (max ``max_size``), or, with ``crop``, the 3x choice between that and the crop branch.

    1x: ``scales=(800,)``, ``max_size=1333``, ``crop=None``. 3x: ``scales=MULTI_SCALES``, ``crop=CropSpec()``.
    CrowdHuman: as 3x with ``max_size=1500`` (the crop branch keeps ``final_max_size=1333``).
    """
    resize = ResizeShortSide(scales, max_size)
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(p=flip_prob)]
    if crop is None:
        steps.append(resize)
    else:
        crop_branch = v2.Compose(
            [
                ResizeShortSide(crop.pre_scales, None),
                RandomSizeCrop(crop.min_size, crop.max_size),
                DropEmptyBoxes(),
                ResizeShortSide(scales, crop.final_max_size),
            ]
        )
        steps.append(v2.RandomChoice([resize, crop_branch], p=[1.0 - crop.prob, crop.prob]))
    return DetectionTransform(steps, mean, std)


def build_eval_transforms(
    size: int = DEFAULT_SIZE,
    max_size: int | None = DEFAULT_MAX_SIZE,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> DetectionTransform:
    """Evaluation: resize the short side to ``size`` (long side at most ``max_size``), normalise."""
    return DetectionTransform([ResizeShortSide((size,), max_size)], mean, std)
