"""Precision, recall and F1 of the boxes a drawing shows, per score threshold, with and without hiding
same-class near-duplicates: how ``asag demo`` chose its drawing threshold (README, "The demo").

Every validation image of the checkpoint's data set is predicted once (all scores); then, for each
threshold, the boxes scoring at least that much are matched greedily (best score first) to unmatched
ground-truth boxes of the same class at IoU >= 0.5. A matched box is a true positive, an unmatched one a
false positive, an unmatched ground-truth box a miss.

    python benchmarks/draw_threshold.py runs/demo/best.pth [--data runs/demo/data] [--nms-iou 0.5]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torchvision.ops import box_iou

from asag.api import Detector
from asag.build import data_files

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
MATCH_IOU = 0.5


def ground_truth(annotation_file: Path) -> dict[str, list[tuple[int, list[float]]]]:
    """File name -> ``[(category_id, [x1, y1, x2, y2])]`` from a COCO JSON (crowd boxes left out)."""
    coco = json.loads(annotation_file.read_text())
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    boxes: dict[str, list[tuple[int, list[float]]]] = {name: [] for name in names.values()}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            x, y, w, h = ann["bbox"]
            boxes[names[ann["image_id"]]].append((ann["category_id"], [x, y, x + w, y + h]))
    return boxes


def count_matches(dets, truth, threshold: float) -> tuple[int, int, int]:
    """``(true positives, false positives, misses)`` of the detections scoring >= ``threshold``."""
    tp = fp = 0
    matched: set[int] = set()
    for det in sorted((d for d in dets if d.score >= threshold), key=lambda d: -d.score):
        candidates = [i for i, (cat, _) in enumerate(truth) if cat == det.category_id and i not in matched]
        if candidates:
            ious = box_iou(torch.tensor([det.box]), torch.tensor([truth[i][1] for i in candidates]))[0]
            best = int(ious.argmax())
            if ious[best] >= MATCH_IOU:
                matched.add(candidates[best])
                tp += 1
                continue
        fp += 1
    return tp, fp, len(truth) - len(matched)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", help="data set root (default: the checkpoint's data.root)")
    parser.add_argument("--nms-iou", type=float, default=0.5, help="duplicate hiding for the second columns")
    args = parser.parse_args(argv)
    detector = Detector.from_checkpoint(args.checkpoint, device="cpu")
    data_cfg = detector.cfg.data
    if args.data:
        data_cfg.root = args.data
    annotation_file, image_dir = data_files(data_cfg, "val")
    truth = ground_truth(annotation_file)
    totals: dict[tuple[str, float], list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, boxes in truth.items():
        for mode, nms_iou in (("all boxes", None), (f"nms {args.nms_iou}", args.nms_iou)):
            dets = detector.predict(image_dir / name, nms_iou=nms_iou)
            for threshold in THRESHOLDS:
                counts = count_matches(dets, boxes, threshold)
                totals[mode, threshold] = [a + b for a, b in zip(totals[mode, threshold], counts)]
    print(f"{len(truth)} validation images, {sum(map(len, truth.values()))} objects; "
          f"precision / recall / F1 of the drawn boxes (same class, IoU >= {MATCH_IOU})")
    modes = ("all boxes", f"nms {args.nms_iou}")
    print(f"{'threshold':>9} " + " ".join(f"{m:>20}" for m in modes))
    for threshold in THRESHOLDS:
        cells = []
        for mode in modes:
            tp, fp, fn = totals[mode, threshold]
            precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
            f1 = 2 * precision * recall / max(precision + recall, 1e-9)
            cells.append(f"{precision:.2f} / {recall:.2f} / {f1:.2f}")
        print(f"{threshold:>9} " + " ".join(f"{c:>20}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
