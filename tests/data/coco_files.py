"""Helpers writing tiny COCO-format data sets (images and JSON) for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image

CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> None:
    """A random-noise image of the given size and PIL mode."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).convert(mode).save(path)


def ann(ann_id: int, image_id: int, category_id: int, bbox: list[float], iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": float(bbox[2] * bbox[3]), "iscrowd": iscrowd}


def write_coco(
    tmp_path: Path, images, annotations, categories=CATEGORIES, write_images=True, name="ann.json"
):
    """Write ``images=[(id, file_name, w, h)]`` (PNG noise unless ``write_images=False``) and the JSON.

    Returns ``(json path, image folder)``.
    """
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    entries = []
    for image_id, file_name, width, height in images:
        entries.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        if write_images:
            write_image(image_dir / file_name, width, height, seed=image_id)
    data = {"images": entries, "annotations": annotations, "categories": categories}
    json_path = tmp_path / name
    json_path.write_text(json.dumps(data))
    return json_path, image_dir
