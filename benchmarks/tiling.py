"""Recall and AP on a large scene of many small objects, with and without tiled prediction (``--tile``).

A seeded ``SIZE x SIZE`` scene (default 4000 x 4000) of many small synthetic shapes is rendered with the
data set's own drawer (:func:`asag.data.synthetic.render_scene`: the same textured background, classes,
colours and occlusion rule as the training images; object sides log-uniform between ``--min-object``
and ``--max-object`` px), with its COCO ground truth (the tight boxes of the visible pixels). The
checkpoint predicts it

* whole, resized by its evaluation transform as ``asag predict`` does without ``--tile``;
* whole with class-wise NMS at the merging IoU (the NMS alone, to separate its effect from the tiles');
* tiled (``--tile``, ``--tile-overlap``; see docs/inference.md, "Large images");
* tiled plus the whole image as one more tile (``--tile-full-image``);

and pycocotools scores each (all detections, score >= 0; up to ``MAX_DETS`` per image): recall at IoU
0.5, AP50 and AP@[.50:.95]. Nothing is trained; the checkpoint should know the synthetic shapes:

    asag demo                                         # trains runs/demo/best.pth in about 8 minutes
    python benchmarks/tiling.py --checkpoint runs/demo/best.pth [--size 4000] [--objects 500]
        [--tile 256] [--tile-overlap 0.2] [--batch-size 8] [--device auto] [--json tiling.json]

``--tile`` defaults to the checkpoint's evaluation short side (``data.val_size``), so that tiles reach
the model at their own scale. The scene's classes are the checkpoint's class names when they are
synthetic shapes (the demo's), else the default shapes with the checkpoint's category ids.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
from pycocotools.coco import COCO

from asag.api import Detection, Detector
from asag.data.synthetic import SHAPE_CLASSES, SHAPES_BY_NAME, SyntheticSpec, render_scene
from asag.engine.coco_eval import PYCOCOTOOLS, accumulated_eval, load_results
from asag.tiling import DEFAULT_MERGE_IOU, DEFAULT_TILE_OVERLAP

MAX_DETS = 10_000  # detections per image that pycocotools may count (its default, 100, caps recall)
MATCH_IOU_INDEX = 0  # COCOeval's IoU thresholds start at 0.5
AREA_ALL = 0  # COCOeval area range "all"


@dataclass(frozen=True)
class Scene:
    """A rendered test scene and its ground truth as a COCO data set (one image, id 1)."""

    image: PIL.Image.Image
    coco: dict


def scene_classes(detector: Detector) -> tuple[list[str], list[int]]:
    """Shape names and category ids of the scene: the checkpoint's classes when all are synthetic shapes,
    else the default shapes (as many as the checkpoint has classes) with the checkpoint's ids."""
    names, ids = list(detector.label_map.names), list(detector.label_map.category_ids)
    if all(name in SHAPES_BY_NAME for name in names):
        return names, ids
    if len(ids) > len(SHAPE_CLASSES):
        raise SystemExit(f"the checkpoint has {len(ids)} classes that are not synthetic shapes; the scene "
                         f"needs a checkpoint trained on the synthetic data set (asag demo)")
    return list(SHAPE_CLASSES[:len(ids)]), ids


def make_scene(size: int, objects: int, min_object: int, max_object: int, seed: int, classes: list[str],
               category_ids: list[int]) -> Scene:
    """Render a ``size x size`` scene with up to ``objects`` objects (fewer when there is no room) of
    ``classes``; the COCO ground truth names them with ``category_ids``."""
    spec = SyntheticSpec(min_image_side=size, max_image_side=size, min_objects=objects, max_objects=objects,
                         min_object_size=min_object, max_object_fraction=max_object / size)
    rendered = render_scene(np.random.default_rng(seed), spec, classes)
    annotations = [{"id": i + 1, "image_id": 1, "category_id": category_ids[obj.label],
                    "bbox": list(obj.bbox), "area": obj.area, "iscrowd": 0}
                   for i, obj in enumerate(rendered.objects)]
    coco = {"images": [{"id": 1, "file_name": "scene.png", "width": size, "height": size}],
            "annotations": annotations,
            "categories": [{"id": c, "name": n} for c, n in zip(category_ids, classes)]}
    return Scene(PIL.Image.fromarray(rendered.pixels), coco)


def coco_scores(truth: dict, detections: list[Detection]) -> dict[str, float]:
    """pycocotools on one image with up to :data:`MAX_DETS` detections: ``recall50`` (recall at IoU 0.5,
    mean over classes), ``ap50`` and ``ap`` (AP@[.50:.95]). pycocotools and not ``evaluation.backend``:
    with ``maxDets`` changed, pycocotools' ``stats[0]`` (``ap`` here) stays the AP at 100 detections per
    image while faster-coco-eval's is at ``maxDets[-1]`` (docs/evaluation.md)."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = json.loads(json.dumps(truth))
        gt.createIndex()
    records = [{"image_id": 1, "category_id": d.category_id, "score": d.score,
                "bbox": [d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]]}
               for d in detections]
    if not records:
        return {"recall50": 0.0, "ap50": 0.0, "ap": 0.0}
    evaluator = accumulated_eval(gt, load_results(gt, records), backend=PYCOCOTOOLS,
                                 setup=lambda params: setattr(params, "maxDets", [1, 100, MAX_DETS]))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    recall = evaluator.eval["recall"][MATCH_IOU_INDEX, :, AREA_ALL, -1]  # [K], -1: class without ground truth
    return {"recall50": float(recall[recall > -1].mean()), "ap50": float(evaluator.stats[1]),
            "ap": float(evaluator.stats[0])}


def run_settings(detector: Detector, image: PIL.Image.Image, tile: int, overlap: float, batch_size: int
                 ) -> list[tuple[str, list[Detection], float]]:
    """``(setting, detections, seconds)`` of each setting of the module docstring."""
    settings = {
        "whole image (resized)": lambda: detector.predict(image),
        f"whole image + NMS {DEFAULT_MERGE_IOU:g}": lambda: detector.predict(
            image, nms_iou=DEFAULT_MERGE_IOU),
        f"tiled {tile} px, overlap {overlap:g}": lambda: detector.predict_tiled(
            image, tile, overlap, batch_size=batch_size),
        f"tiled {tile} px + full image": lambda: detector.predict_tiled(
            image, tile, overlap, batch_size=batch_size, full_image=True),
    }
    out = []
    for name, predict in settings.items():
        start = time.perf_counter()
        detections = predict()
        out.append((name, detections, time.perf_counter() - start))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint that knows the synthetic shapes, e.g. "
                        "runs/demo/best.pth of `asag demo`")
    parser.add_argument("--size", type=int, default=4000, help="side of the square scene in px")
    parser.add_argument("--objects", type=int, default=500, help="objects placed (fewer if there is no room)")
    parser.add_argument("--min-object", type=int, default=16,
                        help="smallest object side (geometric mean), px")
    parser.add_argument("--max-object", type=int, default=64, help="largest object side, px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, help="tile side in px (default: the checkpoint's data.val_size)")
    parser.add_argument("--tile-overlap", type=float, default=DEFAULT_TILE_OVERLAP)
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        print("benchmarks/tiling.py needs --checkpoint: a detector trained on the synthetic shapes, e.g. "
              "runs/demo/best.pth, which `asag demo` trains in about 8 minutes", file=sys.stderr)
        return 2
    detector = Detector.from_checkpoint(args.checkpoint, device=args.device)
    tile = args.tile or detector.cfg.data.val_size
    classes, ids = scene_classes(detector)
    scene = make_scene(args.size, args.objects, args.min_object, args.max_object, args.seed, classes, ids)
    objects = len(scene.coco["annotations"])
    data = detector.cfg.data
    print(f"scene {args.size} x {args.size} px, {objects} objects of {args.min_object}-{args.max_object} px "
          f"({', '.join(classes)}); checkpoint {args.checkpoint} evaluates at {data.val_size}-"
          f"{data.val_max_size} px; tiles of {tile} px; device {detector.device}")
    rows = []
    for name, detections, seconds in run_settings(detector, scene.image, tile, args.tile_overlap,
                                                  args.batch_size):
        rows.append({"setting": name, "detections": len(detections), "seconds": round(seconds, 2),
                     **{k: round(v, 4) for k, v in coco_scores(scene.coco, detections).items()}})
    print("\n| setting | detections | recall@0.5 | AP50 | AP | seconds |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['detections']} | {row['recall50']:.3f} | {row['ap50']:.3f} | "
              f"{row['ap']:.3f} | {row['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "tile": tile, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
