"""AP and detection differences of the inference settings on a trained checkpoint's validation split.

Each PyTorch setting loads the same checkpoint (``asag.api.load_model``) with its own ``fast`` /
``dtype`` / ``static`` options. The exported settings run the checkpoint's static model exported once
to ONNX (:func:`asag.export.export_model`, batch 1, ``--export-size``; default: a square of the
configuration's ``data.val_max_size`` rounded up to a multiple of 32, so that every validation image
fits) in a runtime chosen by :func:`runtimes.load_exported`: ``onnxruntime`` (fp32), ``openvino``
(fp32) and ``openvino_bf16`` (bf16; needs a CPU with native bfloat16); images are padded to the
exported size (``ExportedModel.predict``). ``static`` is the eager static model, the exported graph in
PyTorch. All settings are evaluated with the configured COCO evaluation on the validation split
stored in the checkpoint's configuration (or the one named with ``data.root=...``), in one process.
Printed per setting: AP, AP50, AP75, the AP change against the plain float32 model, and the largest
absolute difference of the detection scores against it, and for the OpenVINO settings the same against
``onnxruntime`` (the same file and padding in float32; against ``plain`` the exported settings also
differ by the padding: the eager model pads each batch to its largest image, the file to its fixed size,
and convolutions see the padded zeros near the right and bottom edges). Scores are compared per image
after sorting (rank by rank), so a reordering of near-equal detections does not count as a difference.

    python benchmarks/precision_accuracy.py runs/demo/best.pth [--device cuda] \\
        [--settings plain fast fast_fp16 fast_bf16] [data.root=runs/demo/data]

Reduced precision on the CPU against fp32 (docs/performance.md, "Accuracy of reduced precision"):

    python benchmarks/precision_accuracy.py runs/demo/best.pth --device cpu \\
        --settings plain fast fast_bf16 static onnxruntime openvino openvino_bf16

A setting that changes AP by more than 0.5 points is flagged (``docs/inference.md`` labels it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from runtimes import load_exported
from torch import Tensor, nn

from asag.api import load_model, resolve_device
from asag.build import build_dataset
from asag.commands.benchmark import parse_size
from asag.commands.train import build_evaluate_fn
from asag.config import Config
from asag.engine.evaluator import EvalResult
from asag.errors import ConfigError
from asag.export import SIZE_DIVISIBILITY, ExportedModel, export_model
from asag.structures import Detections

# setting -> keyword arguments of load_model
SETTINGS = {
    "plain": {},
    "fp16": {"dtype": "fp16"},
    "bf16": {"dtype": "bf16"},
    "fast": {"fast": True},
    "fast_fp16": {"fast": True, "dtype": "fp16"},
    "fast_bf16": {"fast": True, "dtype": "bf16"},
    "fast_compile": {"fast": True, "compile": True},
    "static": {"static": True},
}
# exported setting -> (runtime, precision) of runtimes.load_exported; the file is the static model's ONNX
EXPORTED = {"onnxruntime": ("onnxruntime", "fp32"), "openvino": ("openvino", "fp32"),
            "openvino_bf16": ("openvino", "bf16")}
EXPORTED_REFERENCE = "onnxruntime"  # the exported file in float32: what the other exported settings change
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


def change_cells(setting: str, reference: str, results: dict[str, EvalResult],
                 scores: dict[str, dict[int, torch.Tensor]]) -> tuple[str, str]:
    """AP change of ``setting`` against ``reference`` in points (flagged beyond :data:`AP_FLAG`) and their
    largest rank-by-rank detection-score difference, as table cells."""
    change = 100 * (results[setting].ap - results[reference].ap)
    flag = f" (more than {AP_FLAG})" if abs(change) > AP_FLAG else ""
    return f"{change:+.2f}{flag}", f"{max_score_difference(scores[reference], scores[setting]):.1e}"


def results_table(rows: list[tuple[str, EvalResult]], scores: dict[str, dict[int, torch.Tensor]]) -> str:
    """Markdown table: AP, AP50, AP75 per setting, the AP change and score difference against ``plain``
    (the first row) and, where ONNX Runtime ran, those of the other exported settings against it (the
    same file and padding in float32, so only the runtime and its precision differ)."""
    results = dict(rows)
    reference = EXPORTED_REFERENCE if EXPORTED_REFERENCE in results else None
    against_file = reference is not None and any(s in EXPORTED and s != reference for s in results)
    header = "| setting | AP | AP50 | AP75 | AP change | max abs. detection-score diff. |"
    if against_file:
        header += f" AP change vs {reference} | score diff. vs {reference} |"
    lines = [header, "|---" * header.count(" | ") + "|---|"]
    for setting, r in rows:
        cells = [setting, *(f"{100 * v:.2f}" for v in (r.ap, r.ap50, r.ap75))]
        cells += ["", ""] if setting == "plain" else change_cells(setting, "plain", results, scores)
        if against_file:
            exported = setting in EXPORTED and setting != reference
            cells += change_cells(setting, reference, results, scores) if exported else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_export_size(cfg: Config) -> tuple[int, int]:
    """``(S, S)``: ``data.val_max_size`` (the longest side of a resized validation image) rounded up to a
    multiple of :data:`SIZE_DIVISIBILITY`, so every validation image fits the export in either orientation."""
    side = -(-cfg.data.val_max_size // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    return side, side


class ExportedDetector(nn.Module):
    """The model interface that :func:`asag.engine.evaluator.evaluate` calls, over an exported file: the
    forward passes the padded batch through, ``postprocess`` runs the file on it
    (:meth:`ExportedModel.predict`: padded to the exported size, in chunks of its batch size)."""

    def __init__(self, exported: ExportedModel) -> None:
        super().__init__()
        self.exported = exported

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        return images, image_sizes

    def postprocess(self, output: tuple[Tensor, Tensor], orig_sizes: Tensor) -> list[Detections]:
        images, image_sizes = output
        return self.exported.predict(images, image_sizes, orig_sizes)


def export_checkpoint(checkpoint: str, overrides: list[str], size: tuple[int, int] | None, out: Path) -> Path:
    """The checkpoint's static model exported to ONNX ``out`` at ``size`` (default:
    :func:`default_export_size`), batch 1; the size and export time are printed."""
    model, cfg, label_map = load_model(checkpoint, overrides=overrides, static=True)
    size = size or default_export_size(cfg)
    start = time.perf_counter()
    export_model(model, cfg, label_map, out, size=size, batch_size=1)
    seconds = time.perf_counter() - start
    print(f"exported the static model at {size[0]}x{size[1]}, batch 1, in {seconds:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--settings", nargs="+", choices=[*SETTINGS, *EXPORTED], default=["plain", "fast"])
    parser.add_argument("--export-size", help="HxW of the exported settings' ONNX file (default: a square of "
                        "data.val_max_size rounded up to a multiple of 32)")
    parser.add_argument("--no-tf32", action="store_true",
                        help="CUDA: float32 convolutions and matmuls without TF32 (exact comparisons)")
    args = parser.parse_args(argv)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    settings = ["plain", *[s for s in args.settings if s != "plain"]]
    export_size = parse_size(args.export_size) if args.export_size else None
    device = resolve_device(args.device)
    if device.type != "cpu" and any(s in EXPORTED for s in settings):
        raise ConfigError(f"--settings {' '.join(s for s in settings if s in EXPORTED)}: exported settings "
                          "run on the CPU; use --device cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, checkpoint {args.checkpoint}")
    if device.type == "cuda":
        print(f"TF32: cuDNN convolutions {torch.backends.cudnn.allow_tf32}, "
              f"matmul {torch.backends.cuda.matmul.allow_tf32}")

    rows, scores = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        exported = None
        for setting in settings:
            if setting in EXPORTED:  # after "plain": cfg and label_map are the checkpoint's
                exported = exported or export_checkpoint(args.checkpoint, args.overrides, export_size,
                                                         Path(tmp) / "model.onnx")
                model = ExportedDetector(load_exported(exported, *EXPORTED[setting]))
            else:
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

    print()
    print(results_table(rows, scores))

if __name__ == "__main__":
    main()
