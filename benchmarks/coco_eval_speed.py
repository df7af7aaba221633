"""Speed of the two COCO evaluation backends on the same detections (``evaluation.backend``).

A seeded random COCO case (:func:`random_coco_case`, default 5000 images, about 100 detections each, 80
categories) is scored by :func:`asag.engine.coco_eval.run_coco_eval` (results -> ``loadRes`` ->
``evaluate`` -> ``accumulate`` -> ``summarize``, per-class AP included: everything ``asag eval`` does
after the model) with ``faster_coco_eval`` and with ``pycocotools``, the backends interleaved in each
repeat (their order alternating), so that a machine loaded by other work slows both alike. Reported: the
median seconds of each backend, their ratio, the largest difference of the 12 stats and of the per-class
APs, and the CPU (``lscpu``'s model name).

    python benchmarks/coco_eval_speed.py [--images 5000] [--detections 100] [--categories 80]
        [--repeats 3] [--seed 0]

The case (also used by tests/engine/test_coco_backends.py to prove the backends equal): ground truth of
0 to ``2 * OBJECTS_PER_IMAGE`` objects per image, sides log-uniform from ``MIN_SIDE`` to ``MAX_SIDE`` px
(small, medium and large objects), ``area`` below ``w * h`` as a segmentation's is, some areas exactly on
the 32^2 / 96^2 limits, a few crowd regions, the last category without ground truth; detections: a
jittered copy of most objects (now and then of the wrong class), random boxes, some on crowd regions,
about ``detections`` per image but more than 100 on some (the 100-detection cut) and none on others;
scores on a grid of ``score_levels + 1`` values (the copies' higher), so that many tie within and across
images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time

import numpy as np
from pycocotools.coco import COCO

from asag.engine.benchmark import cpu_name
from asag.engine.coco_eval import BACKENDS, CocoMetrics, run_coco_eval

IMAGE_SIZE = (640, 480)  # width, height of every image
OBJECTS_PER_IMAGE = 7  # mean ground-truth objects of an image
MIN_SIDE, MAX_SIDE = 4.0, 400.0  # box sides, log-uniform (px)
AREA_LIMITS = (32.0**2, 96.0**2)  # COCO's small / medium / large limits, hit exactly by some areas
CROWD_FRACTION = 0.03  # ground-truth boxes that are crowd regions
DETECTED_FRACTION = 0.8  # objects that get a jittered detection
WRONG_CLASS_FRACTION = 0.1  # jittered detections of another class
EMPTY_IMAGE_FRACTION = 0.05  # images without any detection
SCORE_LEVELS = 50  # distinct scores: k / SCORE_LEVELS
MAX_JITTER = 0.25  # largest standard deviation of a detection's shift, relative to the object's size
# Score ranges (in levels) of the detections near an object and of the random ones: the first rank higher.
COPY_SCORES, RANDOM_SCORES = (1 / 3, 1.0), (0.0, 2 / 3)


def _boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 4]`` random ``[x, y, w, h]`` boxes with log-uniform sides inside (mostly) the image."""
    sides = np.exp(rng.uniform(np.log(MIN_SIDE), np.log(MAX_SIDE), (n, 2)))  # [n, 2]
    corner = rng.uniform(0.0, 1.0, (n, 2)) * np.maximum(np.array(IMAGE_SIZE) - sides, 1.0)  # [n, 2]
    return np.concatenate([corner, sides], axis=1)


def _jittered(rng: np.random.Generator, boxes: np.ndarray) -> np.ndarray:
    """``boxes [n, 4]`` moved and resized by random amounts of up to about ``MAX_JITTER`` of their size
    (IoUs over the whole 0.5-0.95 range and below)."""
    scale = rng.uniform(0.0, MAX_JITTER, (len(boxes), 1))  # [n, 1]
    shift = rng.normal(0.0, 1.0, (len(boxes), 4)) * scale * np.tile(boxes[:, 2:], 2)  # [n, 4]
    out = boxes + shift
    out[:, 2:] = np.maximum(out[:, 2:], 1.0)
    return out


def random_coco_case(num_images: int, detections_per_image: int, num_categories: int, *, seed: int,
                     score_levels: int = SCORE_LEVELS) -> tuple[dict, list[dict]]:
    """A random COCO ground truth (dict with ``images``, ``annotations``, ``categories``; ids from 1) and
    result records (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score``), as described
    in the module docstring; the same for the same arguments."""
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    categories = [{"id": c, "name": f"class_{c}", "supercategory": f"group_{c % 3}"}
                  for c in range(1, num_categories + 1)]
    gt_categories = max(num_categories - 1, 1)  # the last category has no ground truth
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        num_objects = int(rng.integers(0, 2 * OBJECTS_PER_IMAGE + 1))
        boxes = _boxes(rng, num_objects)  # [n, 4]
        labels = rng.integers(1, gt_categories + 1, num_objects)  # [n]
        areas = boxes[:, 2] * boxes[:, 3] * rng.uniform(0.5, 1.0, num_objects)  # [n]
        on_limit = rng.random(num_objects) < 0.05
        areas[on_limit] = rng.choice(AREA_LIMITS, int(on_limit.sum()))
        crowd = rng.random(num_objects) < CROWD_FRACTION
        for box, label, area, is_crowd in zip(boxes, labels, areas, crowd):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": box.tolist(), "area": float(area), "iscrowd": int(is_crowd)})
        if rng.random() < EMPTY_IMAGE_FRACTION:
            continue
        detected = rng.random(num_objects) < DETECTED_FRACTION
        copies = _jittered(rng, boxes[detected])  # [d, 4], crowd regions included
        copy_labels = np.where(rng.random(len(copies)) < WRONG_CLASS_FRACTION,
                               rng.integers(1, num_categories + 1, len(copies)), labels[detected])
        num_random = max(int(rng.integers(detections_per_image // 2, 3 * detections_per_image // 2 + 1))
                         - len(copies), 0)
        det_boxes = np.concatenate([copies, _boxes(rng, num_random)])  # [D, 4]
        det_labels = np.concatenate([copy_labels, rng.integers(1, num_categories + 1, num_random)])  # [D]
        low, high = np.repeat(np.round(np.array([COPY_SCORES, RANDOM_SCORES]) * score_levels).astype(int),
                              [len(copies), num_random], axis=0).T  # [D] each
        scores = rng.integers(low, high + 1) / score_levels  # [D], with ties
        for box, label, score in zip(det_boxes.tolist(), det_labels.tolist(), scores.tolist()):
            results.append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})
    return {"images": images, "annotations": annotations, "categories": categories}, results


def coco_index(data: dict) -> COCO:
    """A pycocotools ``COCO`` index of the ground-truth dict (as ``asag`` loads an annotation file)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def largest_difference(a: CocoMetrics, b: CocoMetrics) -> tuple[float, float]:
    """The largest absolute difference of the 12 stats and of the per-class APs of two evaluations."""
    stats = max(abs(x - y) for x, y in zip(a.stats, b.stats))
    per_class = max(abs(a.per_class_ap[name] - b.per_class_ap[name]) for name in a.per_class_ap)
    return stats, per_class


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100, help="mean detections per image")
    parser.add_argument("--categories", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data, results = random_coco_case(args.images, args.detections, args.categories, seed=args.seed)
    coco_gt = coco_index(data)
    print(f"CPU: {cpu_name()}; {args.images} images, {len(data['annotations'])} objects, {len(results)} "
          f"detections, {args.categories} categories; {args.repeats} interleaved repeats")
    seconds: dict[str, list[float]] = {b: [] for b in BACKENDS}
    metrics: dict[str, CocoMetrics] = {}
    for repeat in range(args.repeats):
        for backend in BACKENDS if repeat % 2 == 0 else BACKENDS[::-1]:
            start = time.perf_counter()
            metrics[backend] = run_coco_eval(coco_gt, results, per_class=True, backend=backend)
            seconds[backend].append(time.perf_counter() - start)
            print(f"  repeat {repeat}: {backend} {seconds[backend][-1]:.2f} s", flush=True)
    medians = {b: statistics.median(s) for b, s in seconds.items()}
    fast, reference = BACKENDS
    stats_diff, class_diff = largest_difference(metrics[reference], metrics[fast])
    print("\n| backend | median s | runs (s) |\n|---|---|---|")
    for backend in BACKENDS:
        print(f"| {backend} | {medians[backend]:.2f} | {', '.join(f'{s:.2f}' for s in seconds[backend])} |")
    print(f"\n{reference} / {fast}: {medians[reference] / medians[fast]:.1f}x; AP {metrics[fast].ap:.4f}; "
          f"largest difference: stats {stats_diff:.1e}, per-class AP {class_diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
