"""AP and detection differences of the inference settings on a trained checkpoint's validation split.

Each setting loads the same checkpoint (``asag.api.load_model``) with its own ``fast`` / ``dtype``
options and is evaluated with pycocotools on the validation split stored in the checkpoint's
configuration (or the one named with ``data.root=...``), in one process. Printed per setting: AP,
AP50, AP75, the AP change against the plain float32 model, and the largest absolute difference of the
detection scores against it. Scores are compared per image after sorting (rank by rank), so a
reordering of near-equal detections does not count as a difference.

    python benchmarks/precision_accuracy.py runs/demo/best.pth [--device cuda] \\
        [--settings plain fast fast_fp16 fast_bf16] [data.root=runs/demo/data]

A setting that changes AP by more than 0.5 points is flagged (``docs/inference.md`` labels it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from asag.api import load_model, resolve_device
from asag.build import build_dataset
from asag.commands.train import build_evaluate_fn

# setting -> keyword arguments of load_model
SETTINGS = {
    "plain": {},
    "fp16": {"dtype": "fp16"},
    "bf16": {"dtype": "bf16"},
    "fast": {"fast": True},
    "fast_fp16": {"fast": True, "dtype": "fp16"},
    "fast_bf16": {"fast": True, "dtype": "bf16"},
    "fast_compile": {"fast": True, "compile": True},
}
AP_FLAG = 0.5  # AP points


def sorted_scores(results_json: Path) -> dict[int, torch.Tensor]:
    """image id -> its detection scores, descending, from a COCO results file."""
    per_image: dict[int, list[float]] = defaultdict(list)
    for det in json.loads(results_json.read_text()):
        per_image[int(det["image_id"])].append(float(det["score"]))
    return {k: torch.tensor(sorted(v, reverse=True)) for k, v in per_image.items()}


def max_score_difference(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
    """Largest rank-by-rank score difference over all images (a missing detection counts as score 0)."""
    worst = 0.0
    for image_id in a.keys() | b.keys():
        x, y = a.get(image_id, torch.zeros(0)), b.get(image_id, torch.zeros(0))
        n = max(len(x), len(y))
        x, y = torch.nn.functional.pad(x, (0, n - len(x))), torch.nn.functional.pad(y, (0, n - len(y)))
        if n:
            worst = max(worst, float((x - y).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["plain", "fast"])
    parser.add_argument("--no-tf32", action="store_true",
                        help="CUDA: float32 convolutions and matmuls without TF32 (exact comparisons)")
    args = parser.parse_args(argv)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    settings = ["plain", *[s for s in args.settings if s != "plain"]]
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, checkpoint {args.checkpoint}")
    if device.type == "cuda":
        print(f"TF32: cuDNN convolutions {torch.backends.cudnn.allow_tf32}, "
              f"matmul {torch.backends.cuda.matmul.allow_tf32}")

    rows, scores = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            model, cfg, label_map = load_model(args.checkpoint, overrides=args.overrides, device=device,
                                               **SETTINGS[setting])
            dataset = build_dataset(cfg.data, "val")
            results = Path(tmp) / f"{setting}.json"
            evaluate_fn = build_evaluate_fn(cfg, dataset, device=device, amp=None, label_map=label_map,
                                            results_json=results, per_class=False)
            result = evaluate_fn(model.to(device))
            scores[setting] = sorted_scores(results)
            rows.append((setting, result))
            print(f"{setting:>13}: AP {100 * result.ap:.2f}  ({result.num_images} images, "
                  f"{result.images_per_second:.1f} img/s)", flush=True)

    base = rows[0][1]
    print("\n| setting | AP | AP50 | AP75 | AP change | max abs. detection-score diff. |")
    print("|---|---|---|---|---|---|")
    for setting, r in rows:
        change = "" if setting == "plain" else f"{100 * (r.ap - base.ap):+.2f}"
        if setting != "plain" and abs(100 * (r.ap - base.ap)) > AP_FLAG:
            change += f" (more than {AP_FLAG})"
        diff = "" if setting == "plain" else f"{max_score_difference(scores['plain'], scores[setting]):.1e}"
        metrics = " | ".join(f"{100 * v:.2f}" for v in (r.ap, r.ap50, r.ap75))
        print(f"| {setting} | {metrics} | {change} | {diff} |")


if __name__ == "__main__":
    main()
