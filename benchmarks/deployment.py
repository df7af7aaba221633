"""Exported models on the CPU: ``asag export`` of an R50 speed preset (crafted anchor biases, so that
Adaptive Probing of P4 and P3 runs) to ONNX and ``.pt2``, their detections against the eager static model,
and their speed against the PyTorch ``--fast`` path, interleaved round-robin in one process.

Steps: build the crafted model (frozen-BN statistics calibrated as in ``inference_speed.py``), export it
at the benchmark size with the library's :func:`asag.export.export_model` (timed), run one image through
the eager static model, ONNX Runtime and the loaded ``.pt2`` program and report the largest score and
box differences (and whether labels and validity masks are identical), then time

* ``fast``: the dynamic model through ``optimize_for_inference`` (``--fast``), ``model(...)`` +
  ``postprocess`` -- the baseline of the ratios;
* ``static``: the eager static model's ``detect`` (plain, not folded: the exported graph);
* ``onnxruntime``: the ONNX file in ONNX Runtime (CPU provider, ``--threads`` intra-op threads);
* ``openvino`` / ``openvino_bf16``: the same ONNX file compiled by OpenVINO (``--threads`` threads,
  latency hint) at fp32 / bf16 (bf16 only on a CPU with native bf16; docs/deployment.md);
* ``pt2``: the ``.pt2`` program (``torch.export.load(...).module()``).

    python benchmarks/deployment.py [--preset asag_a_r50_speed] [--size 800x1216] [--repeats 5]
        [--threads 2] [--out-dir runs/deployment]
        [--settings fast static onnxruntime openvino openvino_bf16 pt2]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
from inference_speed import benchmark_model

from asag.commands.benchmark import parse_size
from asag.config import load_config
from asag.data import LabelMap
from asag.engine.benchmark import MS_PER_S, random_inputs, time_call, timing_stats
from asag.export import ExportedModel, export_model
from asag.modeling.fast import optimize_for_inference
from asag.structures import DetectionBatch

SETTINGS = ("fast", "static", "onnxruntime", "openvino", "openvino_bf16", "pt2")
# Settings that run the ONNX file: (runtime, precision) of ExportedModel.
ONNX_SETTINGS = {"onnxruntime": ("onnxruntime", "fp32"), "openvino": ("openvino", "fp32"),
                 "openvino_bf16": ("openvino", "bf16")}
BASELINE = "fast"


def differences(ref: DetectionBatch, got: DetectionBatch) -> str:
    both = ref.valid & got.valid
    score = (ref.scores - got.scores).abs()[both].max().item() if both.any() else 0.0
    box = (ref.boxes - got.boxes).abs()[both].max().item() if both.any() else 0.0
    return (f"valid identical {torch.equal(ref.valid, got.valid)} ({int(ref.valid.sum())} detections), "
            f"labels identical {torch.equal(ref.labels, got.labels)}, max |score diff| {score:.2e}, "
            f"max |box diff| {box:.2e} px")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="asag_a_r50_speed")
    parser.add_argument("--size", default="800x1216", help="HxW of the image and of the export")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="runs/deployment")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = parse_size(args.size)
    out_dir = Path(args.out_dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset}, size {args.size}, "
          f"batch 1, load average {os.getloadavg()[0]:.1f}")

    cfg = load_config(args.preset)
    model = benchmark_model(args.preset, [])
    static = copy.deepcopy(model).set_static(True)
    labels = LabelMap.from_dict({"category_ids": list(range(1, cfg.model.num_classes + 1)),
                                 "names": [f"class_{i}" for i in range(1, cfg.model.num_classes + 1)]})
    runners = {}
    for fmt, names in (("onnx", list(ONNX_SETTINGS)), ("pt2", ["pt2"])):
        names = [name for name in names if name in args.settings]
        if not names:
            continue
        start = time.perf_counter()
        path = export_model(static, cfg, labels, out_dir / f"{args.preset}.{fmt}", size=size, batch_size=1)
        print(f"exported {fmt} in {time.perf_counter() - start:.0f} s -> {path} "
              f"({path.stat().st_size / 2**20:.0f} MiB)")
        for name in names:
            runtime, precision = ONNX_SETTINGS.get(name, ("onnxruntime", "fp32"))  # the defaults for .pt2
            runners[name] = ExportedModel(path, runtime=runtime, precision=precision)

    inputs = random_inputs(1, size, seed=1)
    images, sizes = inputs.images, inputs.image_sizes
    with torch.no_grad():
        reference = static.detect(images, sizes, sizes)
    for name, runner in runners.items():
        print(f"{name} vs eager static: {differences(reference, runner.run(images, sizes, sizes))}")

    fast = optimize_for_inference(model)
    calls = {
        "fast": lambda: fast.postprocess(fast(images, sizes), sizes),
        "static": lambda: static.detect(images, sizes, sizes),
        **{name: (lambda run=runner.run: run(images, sizes, sizes)) for name, runner in runners.items()},
    }
    names = [n for n in SETTINGS if n in args.settings]
    times: dict[str, list[float]] = {n: [] for n in names}
    device = torch.device("cpu")
    with torch.inference_mode():
        for name in names:
            for _ in range(args.warmup):
                time_call(calls[name], device)
        for _ in range(args.repeats):
            for name in names:
                times[name].append(time_call(calls[name], device)[1])
    stats = {n: timing_stats(v) for n, v in times.items()}
    base = stats[BASELINE].median if BASELINE in stats else None
    print(f"\n{args.repeats} interleaved rounds after {args.warmup} warm-up call(s); load average now "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'setting':>12} {'vs fast':>8} {'median ms':>10} {'q1':>8} {'q3':>8} {'images/s':>9}")
    for name, t in stats.items():
        ratio = f"{t.median / base:.3f}" if base else "-"
        fps = MS_PER_S / t.median
        print(f"{name:>12} {ratio:>8} {t.median:>10.1f} {t.q1:>8.1f} {t.q3:>8.1f} {fps:>9.2f}")


if __name__ == "__main__":
    main()
