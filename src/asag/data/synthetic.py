"""A synthetic COCO-format data set of textured shape scenes, for tests and quick CPU training runs.

Shape classes from a catalogue of thirteen (:data:`SHAPE_CATALOGUE`; by default the first five,
:data:`SHAPE_CLASSES`) with class-typical (but varied) saturated colours and inner textures on a grey,
low-contrast textured background, so a small detector learns them in minutes. Object sizes are
log-uniform from a few pixels (many below 32x32 px, COCO "small") to about 60 % of the short image side;
later objects may hide up to half of an earlier one; image sizes and aspect ratios vary.

Layout written under ``out_dir``: ``train.json``, ``val.json``, ``images/train/*.png``,
``images/val/*.png``. Everything is a function of the seed: the same seed gives byte-identical files
(fixed PNG encoder settings, no timestamps), and image ``i`` of a split does not depend on the count.
The categories are the chosen classes in the given order, ids ``1..N``.
The JSON files are written atomically after their split's images, ``val.json`` last: a data set with
both JSON files is complete.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

from asag.errors import ConfigError
from asag.outputs import atomic_write_text

# The default classes (the first five of SHAPE_CATALOGUE), in category-id order.
SHAPE_CLASSES = ("rectangle", "ellipse", "triangle", "cross", "ring")
HUE_JITTER = 0.03
PNG_COMPRESS_LEVEL = 1  # fixed so the encoded bytes depend on the pixels only
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.25  # val images per train image when the count is not given
MAX_PLACEMENT_TRIES = 10
MIN_HOLE_SIDE = 6  # rings and crescents smaller than this (either side) are drawn without their cut-out


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


# A shape drawer paints value 1 into a zeroed "L" canvas of the object's box size (the whole box is the
# shape's extent) and returns the canvas, possibly flipped or transposed (then drawn at swapped size).
ShapeDrawer = Callable[[PIL.Image.Image, np.random.Generator], PIL.Image.Image]


def _scaled(points: Sequence[tuple[float, float]], canvas: PIL.Image.Image) -> list[tuple[float, float]]:
    """Unit-square polygon corners -> pixel coordinates spanning ``canvas`` (corner pixels included)."""
    x1, y1 = canvas.width - 1, canvas.height - 1
    return [(x * x1, y * y1) for x, y in points]


def _unit_polygon(points: Sequence[tuple[float, float]]) -> ShapeDrawer:
    """A drawer of one fixed polygon given in unit-square coordinates."""

    def draw(canvas: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
        PIL.ImageDraw.Draw(canvas).polygon(_scaled(points, canvas), fill=1)
        return canvas

    return draw


def _maybe_flipped(drawer: ShapeDrawer, flip: PIL.Image.Transpose) -> ShapeDrawer:
    """``drawer``'s shape, mirrored by ``flip`` with probability 1/2 (the draw comes first)."""

    def draw(canvas: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
        canvas = drawer(canvas, rng)
        return canvas.transpose(flip) if rng.random() < 0.5 else canvas

    return draw


def _maybe_transposed(drawer: ShapeDrawer) -> ShapeDrawer:
    """``drawer``'s shape, or with probability 1/2 its mirror image across the diagonal (x and y swapped,
    drawn in a canvas of swapped size so that the result still fills the box)."""

    def draw(canvas: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
        if rng.random() < 0.5:
            return drawer(canvas, rng)
        swapped = PIL.Image.new("L", (canvas.height, canvas.width), 0)
        return drawer(swapped, rng).transpose(PIL.Image.Transpose.TRANSPOSE)

    return draw


def _four_ways(drawer: ShapeDrawer) -> ShapeDrawer:
    """A right-facing ``drawer``'s shape facing right, left, down or up (uniformly)."""
    return _maybe_transposed(_maybe_flipped(drawer, PIL.Image.Transpose.FLIP_LEFT_RIGHT))


def _rectangle(canvas: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    PIL.ImageDraw.Draw(canvas).rectangle([0, 0, canvas.width - 1, canvas.height - 1], fill=1)
    return canvas


def _ellipse(canvas: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    PIL.ImageDraw.Draw(canvas).ellipse([0, 0, canvas.width - 1, canvas.height - 1], fill=1)
    return canvas


def _cross(canvas: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    draw, (bw, bh) = PIL.ImageDraw.Draw(canvas), canvas.size
    tw, th = max(1, round(bw * 0.34)), max(1, round(bh * 0.34))
    draw.rectangle([(bw - tw) // 2, 0, (bw - tw) // 2 + tw - 1, bh - 1], fill=1)
    draw.rectangle([0, (bh - th) // 2, bw - 1, (bh - th) // 2 + th - 1], fill=1)
    return canvas


def _ring(canvas: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    draw, (bw, bh) = PIL.ImageDraw.Draw(canvas), canvas.size
    x1, y1 = bw - 1, bh - 1
    draw.ellipse([0, 0, x1, y1], fill=1)
    ix, iy = bw * 0.25, bh * 0.25
    if bw >= MIN_HOLE_SIDE and bh >= MIN_HOLE_SIDE:
        draw.ellipse([ix, iy, x1 - ix, y1 - iy], fill=0)
    return canvas


def _crescent_right(canvas: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    """An ellipse twice the box's width centred on its right edge, with an ellipse cut from its middle
    that leaves a crescent opening to the right, its horns reaching the top and bottom corners."""
    draw, (bw, bh) = PIL.ImageDraw.Draw(canvas), canvas.size
    draw.ellipse([0, 0, 2 * bw - 1, bh - 1], fill=1)
    if bw >= MIN_HOLE_SIDE and bh >= MIN_HOLE_SIDE:
        draw.ellipse([0.45 * bw, 0.04 * bh, 2.2 * bw, 0.96 * bh], fill=0)
    return canvas


def _heart(canvas: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    """Two round lobes over a downward point."""
    draw = PIL.ImageDraw.Draw(canvas)
    for lobe in ((0.0, 0.0), (0.48, 0.0)):  # left, right: each a disc over 52 % of the width
        (x0, y0), (x1, y1) = _scaled([lobe, (lobe[0] + 0.52, 0.55)], canvas)
        draw.ellipse([x0, y0, x1, y1], fill=1)
    draw.polygon(_scaled([(0.02, 0.36), (0.98, 0.36), (0.5, 1.0)], canvas), fill=1)
    return canvas


def _star_corners(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    """Unit-square corners of a regular star with ``points`` tips (one up); ``inner``: the inner
    radius as a fraction of the outer one. Stretched to touch all four sides of the square."""
    angles = -np.pi / 2 + np.pi / points * np.arange(2 * points)  # tip, notch, tip, ...
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    xs, ys = radii * np.cos(angles), radii * np.sin(angles)
    xs, ys = (xs - xs.min()) / np.ptp(xs), (ys - ys.min()) / np.ptp(ys)
    return [(float(x), float(y)) for x, y in zip(xs, ys)]


_triangle = _maybe_flipped(_unit_polygon([(0, 1), (1, 1), (0.5, 0)]), PIL.Image.Transpose.FLIP_TOP_BOTTOM)
_diamond = _unit_polygon([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)])
_star = _unit_polygon(_star_corners())
_corner = _maybe_flipped(  # an L, mirrored left-right and top-bottom at random: four turns
    _maybe_flipped(_unit_polygon([(0, 0), (0.4, 0), (0.4, 0.6), (1, 0.6), (1, 1), (0, 1)]),
                   PIL.Image.Transpose.FLIP_LEFT_RIGHT),
    PIL.Image.Transpose.FLIP_TOP_BOTTOM)
_arrow = _four_ways(_unit_polygon(
    [(0, 0.3), (0.55, 0.3), (0.55, 0), (1, 0.5), (0.55, 1), (0.55, 0.7), (0, 0.7)]))  # pointing right
_crescent = _four_ways(_crescent_right)
_trapezoid = _maybe_flipped(_unit_polygon([(0, 1), (1, 1), (0.75, 0), (0.25, 0)]),
                            PIL.Image.Transpose.FLIP_TOP_BOTTOM)  # long side down, or up after the flip
_hourglass = _maybe_transposed(_unit_polygon([(0, 0), (1, 0), (0.6, 0.5), (1, 1), (0, 1), (0.4, 0.5)]))


@dataclass(frozen=True)
class ShapeClass:
    """One shape class of the catalogue: its category ``name``, class-typical ``hue`` in [0, 1) (with
    the ``colour`` it names), a one-line ``description`` and the ``draw`` function of its mask."""

    name: str
    hue: float
    colour: str
    description: str
    draw: ShapeDrawer


# The default classes first (their hues and drawings fix the default data set's bytes), then the others;
# hues spread around the colour wheel, so colour helps but the shape decides.
SHAPE_CATALOGUE: tuple[ShapeClass, ...] = (
    ShapeClass("rectangle", 0.0, "red", "filled rectangle", _rectangle),
    ShapeClass("ellipse", 0.33, "green", "filled ellipse", _ellipse),
    ShapeClass("triangle", 0.62, "blue", "isosceles triangle, apex up or down", _triangle),
    ShapeClass("cross", 0.15, "yellow", "plus sign of two bars a third of the box thick", _cross),
    ShapeClass("ring", 0.83, "magenta", "ellipse with a hole half its size", _ring),
    ShapeClass("diamond", 0.08, "orange", "rhombus with its corners at the box's edge midpoints", _diamond),
    ShapeClass("star", 0.5, "cyan", "five-pointed star, one tip up", _star),
    ShapeClass("corner", 0.7, "violet", "L of two bars 0.4 of the box thick, in any of four turns", _corner),
    ShapeClass("arrow", 0.24, "lime", "block arrow pointing right, left, down or up", _arrow),
    ShapeClass("crescent", 0.42, "spring green", "crescent moon opening right, left, down or up", _crescent),
    ShapeClass("heart", 0.92, "rose", "heart, point down", _heart),
    ShapeClass("trapezoid", 0.56, "azure", "trapezoid with its long side down or up", _trapezoid),
    ShapeClass("hourglass", 0.77, "purple", "two triangles meeting at a narrow waist, upright or lying",
               _hourglass),
)
SHAPES_BY_NAME = {shape.name: shape for shape in SHAPE_CATALOGUE}


def check_classes(names: Sequence[str] | None, source: str = "classes") -> tuple[str, ...]:
    """The chosen class names, in order (``None``: :data:`SHAPE_CLASSES`). Raises :class:`ConfigError`
    naming ``source`` (the option or field) for an empty list, an unknown or a repeated name."""
    if names is None:
        return SHAPE_CLASSES
    if isinstance(names, str) or not names:
        raise ConfigError(f"{source} must be a non-empty list of shape class names, got {names!r}")
    for i, name in enumerate(names):
        if name not in SHAPES_BY_NAME:
            raise ConfigError(f"{source}: unknown shape class {name!r}; the catalogue: "
                              f"{', '.join(SHAPES_BY_NAME)}")
        if name in names[:i]:
            raise ConfigError(f"{source}: shape class {name!r} is listed twice")
    return tuple(names)


def format_catalogue() -> str:
    """The catalogue as text: one line per class (name, colour, description), defaults marked."""
    width = max(len(shape.name) for shape in SHAPE_CATALOGUE)
    lines = [f"{len(SHAPE_CATALOGUE)} shape classes (* = default: {','.join(SHAPE_CLASSES)}):"]
    for shape in SHAPE_CATALOGUE:
        mark = "*" if shape.name in SHAPE_CLASSES else " "
        lines.append(f"{mark} {shape.name:<{width}}  {shape.colour}: {shape.description}")
    return "\n".join(lines)


def _shape_mask(shape: ShapeClass, bh: int, bw: int, rng: np.random.Generator) -> np.ndarray:
    """``[bh, bw]`` bool mask of one shape filling its box."""
    return np.asarray(shape.draw(PIL.Image.new("L", (bw, bh), 0), rng), dtype=bool)


def _object_pixels(shape: ShapeClass, bh: int, bw: int, rng: np.random.Generator) -> np.ndarray:
    """``[bh, bw, 3]`` float32 colours of one object: the class hue, varied, with a mild texture."""
    hue = (shape.hue + rng.normal(0, HUE_JITTER)) % 1.0
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


def _place_object(
    scene: _Scene, rng: np.random.Generator, spec: SyntheticSpec, shapes: Sequence[ShapeClass]
) -> None:
    """Draw one object of a uniformly chosen class of ``shapes`` (label: its index) at a free place."""
    h, w = scene.owner.shape
    label = int(rng.integers(len(shapes)))
    largest = spec.max_object_fraction * min(h, w)
    side = np.exp(rng.uniform(np.log(spec.min_object_size), np.log(largest)))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    bh = int(np.clip(round(side / np.sqrt(aspect)), 3, h))
    bw = int(np.clip(round(side * np.sqrt(aspect)), 3, w))
    mask = _shape_mask(shapes[label], bh, bw, rng)
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
    scene.pixels[window][mask] = _object_pixels(shapes[label], bh, bw, rng)[mask]
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
    """One visible object: contiguous ``label`` (index into the scene's classes), tight ``bbox`` of its
    visible pixels (xywh, pixel edges), visible ``area`` and unoccluded ``full_area`` in pixels."""

    label: int
    bbox: tuple[int, int, int, int]
    area: int
    full_area: int


@dataclass
class RenderedScene:
    """``pixels``: ``[h, w, 3]`` uint8 RGB; ``objects``: in drawing order (later ones on top)."""

    pixels: np.ndarray
    objects: list[SceneObject]


def render_scene(
    rng: np.random.Generator, spec: SyntheticSpec, classes: Sequence[str] = SHAPE_CLASSES
) -> RenderedScene:
    """Compose one scene: textured background, then objects of ``classes`` (catalogue names) placed one
    by one."""
    shapes = [SHAPES_BY_NAME[name] for name in check_classes(classes)]
    h, w = (int(v) for v in rng.integers(spec.min_image_side, spec.max_image_side + 1, size=2))
    scene = _Scene(_background(rng, h, w), np.full((h, w), -1, dtype=np.int64), [], [], [])
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        _place_object(scene, rng, spec, shapes)
    boxes, areas = _visible_boxes(scene.owner, len(scene.labels))
    objects = [
        SceneObject(label, tuple(int(v) for v in box), int(area), full)
        for label, box, area, full in zip(scene.labels, boxes, areas, scene.full_area)
        if area > 0
    ]
    return RenderedScene(np.clip(scene.pixels, 0, 255).round().astype(np.uint8), objects)


# ----------------------------------------------------------------------------------------- files


def _write_split(
    paths: SyntheticPaths, split: str, count: int, seed: int, spec: SyntheticSpec, classes: tuple[str, ...]
) -> None:
    image_dir = paths.train_images if split == "train" else paths.val_images
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        scene = render_scene(rng, spec, classes)
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
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(classes)]
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
    classes: Sequence[str] | None = None,
) -> SyntheticPaths:
    """Write a synthetic data set: ``num_images`` training and ``val_images`` validation images
    (default ``DEFAULT_VAL_FRACTION * num_images``, at least 1) with objects of ``classes`` (catalogue
    names; default :data:`SHAPE_CLASSES`), which become the categories, ids 1..N in the given order.
    Raises :class:`ConfigError` for an unknown or repeated class before writing anything. Returns the
    paths written."""
    classes = check_classes(classes)
    if num_images < 1:
        raise ValueError("num_images must be at least 1")
    if val_images is None:
        val_images = max(1, round(DEFAULT_VAL_FRACTION * num_images))
    spec = spec or SyntheticSpec()
    paths = synthetic_paths(out_dir)
    _write_split(paths, "train", num_images, seed, spec, classes)
    _write_split(paths, "val", val_images, seed, spec, classes)
    return paths
