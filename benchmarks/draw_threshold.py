"""Precision, recall and F1 of the boxes a drawing shows, per score threshold, with and without hiding
same-class near-duplicates: how ``asag demo`` chose its drawing threshold (docs/demo.md).

Every validation image of the checkpoint's data set is predicted once (all scores); then, for each
threshold, the boxes scoring at least that much are matched greedily (best score first) to unmatched
ground-truth boxes of the same class at IoU >= 0.5. A matched box is a true positive, an unmatched one a
false positive, an unmatched ground-truth box a miss.

    python benchmarks/draw_threshold.py runs/demo/best.pth [--data runs/demo/data] [--nms-iou 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torchvision.ops import box_convert, box_iou

from asag.api import Detector
from asag.build import data_files

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
MATCH_IOU = 0.5


def ground_truth(annotation_file: Path) -> dict[str, tuple[list[int], torch.Tensor]]:
    """File name -> ``(category ids, boxes [N, 4] xyxy)`` of a COCO JSON, crowd boxes left out."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading progress
        coco = COCO(str(annotation_file))
    truth = {}
    for image in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"], iscrowd=False))
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        truth[image["file_name"]] = ([a["category_id"] for a in anns], box_convert(boxes, "xywh", "xyxy"))
    return truth


def count_matches(dets, truth: tuple[list[int], torch.Tensor], threshold: float) -> tuple[int, int, int]:
    """``(true positives, false positives, misses)`` of the detections scoring >= ``threshold``: greedy
    matching, best score first, to the unmatched ground truth of the same class with the highest IoU."""
    categories, gt_boxes = truth
    kept = sorted((d for d in dets if d.score >= threshold), key=lambda d: -d.score)
    if not kept:
        return 0, 0, len(categories)
    ious = box_iou(torch.tensor([d.box for d in kept]), gt_boxes)
    ious[torch.tensor([d.category_id for d in kept])[:, None] != torch.tensor(categories)[None, :]] = 0.0
    tp = 0
    for row in ious:  # one detection after the other: each match removes its ground-truth column
        best = int(row.argmax()) if row.numel() else -1
        if best >= 0 and row[best] >= MATCH_IOU:
            ious[:, best] = 0.0
            tp += 1
    return tp, len(kept) - tp, len(categories) - tp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", help="data set root (default: the checkpoint's data.root)")
    parser.add_argument("--nms-iou", type=float, default=0.5, help="duplicate hiding for the second columns")
    args = parser.parse_args(argv)
    detector = Detector.from_checkpoint(args.checkpoint, device="cpu")
    data_cfg = replace(detector.cfg.data, root=args.data) if args.data else detector.cfg.data
    annotation_file, image_dir = data_files(data_cfg, "val")
    truth = ground_truth(annotation_file)
    totals: dict[tuple[str, float], list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, boxes in truth.items():
        for mode, nms_iou in (("all boxes", None), (f"nms {args.nms_iou}", args.nms_iou)):
            dets = detector.predict(image_dir / name, nms_iou=nms_iou)
            for threshold in THRESHOLDS:
                counts = count_matches(dets, boxes, threshold)
                totals[mode, threshold] = [a + b for a, b in zip(totals[mode, threshold], counts)]
    print(f"{len(truth)} validation images, {sum(len(c) for c, _ in truth.values())} objects; "
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
