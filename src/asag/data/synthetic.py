"""A synthetic COCO-format data set of textured shape scenes, for tests and quick CPU training runs.

Five shape classes with class-typical (but varied) saturated colours and inner textures on a grey,
low-contrast textured background, so a small detector learns them in minutes. Object sizes are
log-uniform from a few pixels (many below 32x32 px, COCO "small") to about 60 % of the short image side;
later objects may hide up to half of an earlier one; image sizes and aspect ratios vary.

Layout written under ``out_dir``: ``train.json``, ``val.json``, ``images/train/*.png``,
``images/val/*.png``. Everything is a function of the seed: the same seed gives byte-identical files
(fixed PNG encoder settings, no timestamps), and image ``i`` of a split does not depend on the count.
The JSON files are written atomically after their split's images, ``val.json`` last: a data set with
both JSON files is complete.
"""

from __future__ import annotations

import colorsys
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

from asag.outputs import atomic_write_text

SHAPE_CLASSES = ("rectangle", "ellipse", "triangle", "cross", "ring")
# Class-typical hues in [0, 1): red, green, blue, yellow, magenta.
CLASS_HUES = (0.0, 0.33, 0.62, 0.15, 0.83)
HUE_JITTER = 0.03
PNG_COMPRESS_LEVEL = 1  # fixed so the encoded bytes depend on the pixels only
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.25  # val images per train image when the count is not given
MAX_PLACEMENT_TRIES = 10


@dataclass(frozen=True)
class SyntheticSpec:
    """Scene parameters (pixels unless stated)."""

    min_image_side: int = 256
    max_image_side: int = 384
    min_objects: int = 3
    max_objects: int = 10
    min_object_size: int = 8  # geometric-mean side of the smallest objects
    max_object_fraction: float = 0.6  # largest objects: this fraction of the short image side
    max_occlusion: float = 0.5  # an object keeps at least (1 - this) of its area visible


@dataclass(frozen=True)
class SyntheticPaths:
    """Where a generated data set lives."""

    root: Path
    train_json: Path
    val_json: Path
    train_images: Path
    val_images: Path


def synthetic_paths(root: str | os.PathLike) -> SyntheticPaths:
    """The file layout of a synthetic data set under ``root``."""
    root = Path(root)
    return SyntheticPaths(
        root, root / "train.json", root / "val.json", root / "images" / "train", root / "images" / "val"
    )


def synthetic_files(root: str | os.PathLike) -> list[Path]:
    """The files of a synthetic data set already under ``root`` (what :func:`generate_synthetic` writes:
    ``train.json``, ``val.json`` and the ``<split>_NNNNNN.png`` images), sorted; other files are not
    listed."""
    paths = synthetic_paths(root)
    found = [p for p in (paths.train_json, paths.val_json) if p.is_file()]
    for split, folder in zip(SPLITS, (paths.train_images, paths.val_images)):
        found += sorted(folder.glob(f"{split}_[0-9]*.png")) if folder.is_dir() else []
    return found


# -------------------------------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int, channels: int) -> np.ndarray:
    """``[h, w, channels]`` float in [0, 1]: a random grid upsampled bilinearly (cell ~ feature size)."""
    grid = (rng.random((h // cell + 2, w // cell + 2, channels)) * 255).astype(np.uint8)
    layers = [PIL.Image.fromarray(grid[..., c]).resize((w, h), PIL.Image.BILINEAR) for c in range(channels)]
    return np.stack([np.asarray(layer, dtype=np.float32) / 255.0 for layer in layers], axis=-1)


def _stripes(rng: np.random.Generator, h: int, w: int, period: float) -> np.ndarray:
    """``[h, w]`` float in [-1, 1]: a sine grating of random orientation and phase."""
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    ys = np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(angle))  # [h, 1]
    xs = np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(angle))  # [1, w]
    return np.sin((xs + ys) * np.float32(2 * np.pi / period) + np.float32(phase))  # [h, w]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``[h, w, 3]`` float32 in [0, 255]: grey, low-saturation texture."""
    base = rng.uniform(80, 170)
    gray = _smooth_noise(rng, h, w, cell=int(rng.integers(16, 64)), channels=1)  # [h, w, 1]
    tint = _smooth_noise(rng, h, w, cell=64, channels=3)  # [h, w, 3]
    stripes = _stripes(rng, h, w, period=rng.uniform(6, 30))[..., None]  # [h, w, 1]
    image = base + 60 * (gray - 0.5) + 16 * (tint - 0.5) + 8 * stripes
    return image.astype(np.float32)


def _shape_mask(kind: str, bh: int, bw: int, rng: np.random.Generator) -> np.ndarray:
    """``[bh, bw]`` bool mask of one shape filling its box."""
    canvas = PIL.Image.new("L", (bw, bh), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    x1, y1 = bw - 1, bh - 1
    if kind == "rectangle":
        draw.rectangle([0, 0, x1, y1], fill=1)
    elif kind == "ellipse":
        draw.ellipse([0, 0, x1, y1], fill=1)
    elif kind == "triangle":
        corners = [(0, y1), (x1, y1), (x1 / 2, 0)]  # apex up, or down after the flip
        draw.polygon(corners, fill=1)
        if rng.random() < 0.5:
            canvas = canvas.transpose(PIL.Image.FLIP_TOP_BOTTOM)
    elif kind == "cross":
        tw, th = max(1, round(bw * 0.34)), max(1, round(bh * 0.34))
        draw.rectangle([(bw - tw) // 2, 0, (bw - tw) // 2 + tw - 1, y1], fill=1)
        draw.rectangle([0, (bh - th) // 2, x1, (bh - th) // 2 + th - 1], fill=1)
    elif kind == "ring":
        draw.ellipse([0, 0, x1, y1], fill=1)
        ix, iy = bw * 0.25, bh * 0.25
        if bw >= 6 and bh >= 6:
            draw.ellipse([ix, iy, x1 - ix, y1 - iy], fill=0)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.asarray(canvas, dtype=bool)


def _object_pixels(label: int, bh: int, bw: int, rng: np.random.Generator) -> np.ndarray:
    """``[bh, bw, 3]`` float32 colours of one object: the class hue, varied, with a mild texture."""
    hue = (CLASS_HUES[label] + rng.normal(0, HUE_JITTER)) % 1.0
    rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)), dtype=np.float32)
    if rng.random() < 0.5:
        texture = _stripes(rng, bh, bw, period=rng.uniform(4, 12))
    else:
        texture = rng.normal(0, 0.5, (bh, bw))
    shade = 1.0 + 0.12 * np.clip(texture, -1, 1)[..., None]  # [bh, bw, 1]
    return np.clip(255 * rgb * shade, 0, 255).astype(np.float32)


# ---------------------------------------------------------------------------------------- scenes


@dataclass
class _Scene:
    """An image being composed: pixels ``[h, w, 3]``, owner id per pixel ``[h, w]`` (-1 = background)."""

    pixels: np.ndarray
    owner: np.ndarray
    labels: list[int]
    full_area: list[int]
    visible_area: list[int]


def _fits(scene: _Scene, top: int, left: int, mask: np.ndarray, max_occlusion: float) -> bool:
    """Whether painting ``mask`` at (top, left) leaves every earlier object enough visible area."""
    covered = scene.owner[top : top + mask.shape[0], left : left + mask.shape[1]][mask]
    lost = np.bincount(covered[covered >= 0], minlength=len(scene.labels))  # [K]
    remaining = np.asarray(scene.visible_area) - lost
    return bool((remaining >= (1.0 - max_occlusion) * np.asarray(scene.full_area)).all())


def _place_object(scene: _Scene, rng: np.random.Generator, spec: SyntheticSpec) -> None:
    h, w = scene.owner.shape
    label = int(rng.integers(len(SHAPE_CLASSES)))
    largest = spec.max_object_fraction * min(h, w)
    side = np.exp(rng.uniform(np.log(spec.min_object_size), np.log(largest)))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    bh = int(np.clip(round(side / np.sqrt(aspect)), 3, h))
    bw = int(np.clip(round(side * np.sqrt(aspect)), 3, w))
    mask = _shape_mask(SHAPE_CLASSES[label], bh, bw, rng)
    for _ in range(MAX_PLACEMENT_TRIES):
        top, left = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
        if _fits(scene, top, left, mask, spec.max_occlusion):
            break
    else:
        return  # no free place: skip this object
    window = (slice(top, top + bh), slice(left, left + bw))
    covered = scene.owner[window][mask]
    lost = np.bincount(covered[covered >= 0], minlength=len(scene.labels))  # [K]
    scene.visible_area[:] = (np.asarray(scene.visible_area, dtype=np.int64) - lost).tolist()
    scene.pixels[window][mask] = _object_pixels(label, bh, bw, rng)[mask]
    scene.owner[window][mask] = len(scene.labels)
    scene.labels.append(label)
    scene.full_area.append(int(mask.sum()))
    scene.visible_area.append(int(mask.sum()))


def _visible_boxes(owner: np.ndarray, num_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Tight xywh boxes ``[K, 4]`` (pixel edges) and visible areas ``[K]`` of objects ``0..K-1``."""
    ys, xs = np.nonzero(owner >= 0)
    ids = owner[ys, xs]
    big = np.iinfo(np.int64).max
    x0, y0 = np.full(num_objects, big), np.full(num_objects, big)
    x1, y1 = np.full(num_objects, -1), np.full(num_objects, -1)
    np.minimum.at(x0, ids, xs)
    np.minimum.at(y0, ids, ys)
    np.maximum.at(x1, ids, xs)
    np.maximum.at(y1, ids, ys)
    areas = np.bincount(ids, minlength=num_objects)  # [K]
    return np.stack([x0, y0, x1 + 1 - x0, y1 + 1 - y0], axis=1), areas


@dataclass(frozen=True)
class SceneObject:
    """One visible object: contiguous ``label``, tight ``bbox`` of its visible pixels (xywh, pixel edges),
    visible ``area`` and unoccluded ``full_area`` in pixels."""

    label: int
    bbox: tuple[int, int, int, int]
    area: int
    full_area: int


@dataclass
class RenderedScene:
    """``pixels``: ``[h, w, 3]`` uint8 RGB; ``objects``: in drawing order (later ones on top)."""

    pixels: np.ndarray
    objects: list[SceneObject]


def render_scene(rng: np.random.Generator, spec: SyntheticSpec) -> RenderedScene:
    """Compose one scene: textured background, then objects placed one by one."""
    h, w = (int(v) for v in rng.integers(spec.min_image_side, spec.max_image_side + 1, size=2))
    scene = _Scene(_background(rng, h, w), np.full((h, w), -1, dtype=np.int64), [], [], [])
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        _place_object(scene, rng, spec)
    boxes, areas = _visible_boxes(scene.owner, len(scene.labels))
    objects = [
        SceneObject(label, tuple(int(v) for v in box), int(area), full)
        for label, box, area, full in zip(scene.labels, boxes, areas, scene.full_area)
        if area > 0
    ]
    return RenderedScene(np.clip(scene.pixels, 0, 255).round().astype(np.uint8), objects)


# ----------------------------------------------------------------------------------------- files


def _write_split(paths: SyntheticPaths, split: str, count: int, seed: int, spec: SyntheticSpec) -> None:
    image_dir = paths.train_images if split == "train" else paths.val_images
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        scene = render_scene(rng, spec)
        pixels = scene.pixels
        name = f"{split}_{index:06d}.png"
        PIL.Image.fromarray(pixels).save(image_dir / name, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        image_id = index + 1
        h, w = pixels.shape[:2]
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for obj in scene.objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj.label + 1,
                    "bbox": list(obj.bbox),
                    "area": obj.area,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)]
    info = {"description": "asag synthetic shapes", "seed": seed, "split": split}
    data = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    json_path = paths.train_json if split == "train" else paths.val_json
    atomic_write_text(json_path, json.dumps(data, indent=1) + "\n")


def generate_synthetic(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int,
    val_images: int | None = None,
    spec: SyntheticSpec | None = None,
) -> SyntheticPaths:
    """Write a synthetic data set: ``num_images`` training and ``val_images`` validation images
    (default ``DEFAULT_VAL_FRACTION * num_images``, at least 1). Returns the paths written."""
    if num_images < 1:
        raise ValueError("num_images must be at least 1")
    if val_images is None:
        val_images = max(1, round(DEFAULT_VAL_FRACTION * num_images))
    spec = spec or SyntheticSpec()
    paths = synthetic_paths(out_dir)
    _write_split(paths, "train", num_images, seed, spec)
    _write_split(paths, "val", val_images, seed, spec)
    return paths
