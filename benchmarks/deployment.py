"""ASAG on the CPU in PyTorch and as exported files (ONNX Runtime, OpenVINO fp32 / bf16, ``.pt2``), against
torchvision's FCOS in the same runtimes, interleaved round-robin in one process.

For every preset (default: the ASAG-A and ASAG-S R50 speed presets, one decoder head), the model has
random weights with calibrated frozen-BN statistics and crafted anchor biases (as in
``inference_speed.py``), so that Adaptive Probing of P4 and P3 runs as in a trained model on a crowded
image. For every input size ``HxW`` and batch size ``B`` (a group) it is exported with the library's
:func:`asag.export.export_model` (ONNX and ``.pt2`` of batch ``B`` at ``HxW``; cached in ``--out-dir``
and reused while the weights, configuration, size, batch, torch version and asag sources are the same,
since an R50 export takes minutes), and these settings run ``B`` random images of ``HxW``:

* ``fast``: the dynamic model through ``optimize_for_inference`` (``--fast``), ``model(...)`` +
  ``postprocess``;
* ``fast_bf16``: the same with a bfloat16 backbone and FPN (``--fast --precision bf16``);
* ``static``: the eager static model's ``detect`` (plain, not folded: the exported graph in PyTorch);
* ``onnxruntime``: the ONNX file in ONNX Runtime (CPU provider);
* ``openvino`` / ``openvino_bf16``: the ONNX file compiled by OpenVINO's CPU plugin
  (``INFERENCE_PRECISION_HINT`` f32 / bf16, latency hint);
* ``pt2``: the ``.pt2`` program (``torch.export.load(...).module()``).

The runtime of an exported file is chosen in one place, :func:`runtimes.load_exported`. Each setting
runs with ``--threads`` intra-op threads. bf16 settings are skipped, with a line saying so, on a CPU
without native bfloat16 (AVX512-BF16 / AMX; :func:`runtimes.cpu_description` prints the flags).

FCOS: torchvision's ``fcos_resnet50_fpn`` (random weights, seeded; nothing is downloaded) as
:class:`FCOSDeployed` -- normalised, padded ``[B, 3, H, W]`` images in, as for ASAG's export, through
backbone + FPN, head, anchors and its own post-processing (score threshold 0.05, top 1000 per level,
NMS, 100 per image), without torchvision's transform (which would normalise and resize again). It runs
``fast`` (frozen BNs folded, channels-last backbone + FPN), ``fast_bf16`` (+ bfloat16 backbone + FPN),
and its ONNX export (``torch.onnx.export(dynamo=False)``, NMS as ``NonMaxSuppression``; cached) in ONNX
Runtime and OpenVINO fp32 / bf16. Its random head scores nearly every location below the threshold, so
its post-processing is light: a lower bound of a trained FCOS's time.

Detections of every setting are compared with the eager float32 reference of the same model and
inputs (ASAG: the plain dynamic model for ``fast`` / ``fast_bf16``, the static model's ``detect`` for
``static`` and the exported files; FCOS: the plain model), and the static model with the dynamic one
(they differ where a patch budget of the static mode binds: on these crafted models the P3 budget does,
docs/inference.md): detection counts, whether labels
agree rank by rank, the fraction of reference detections matched one-to-one by a detection of the same
label with IoU >= 0.5 (greedy in score order), and the largest score and box differences over the
matched pairs (a swapped near-tie is then no difference).

Within a group, all variants (presets x settings and FCOS x settings) run round-robin: ``--warmup``
calls each, then ``--repeats`` rounds. Printed: the CPU (model name, bf16 flags, PyTorch's and
OpenVINO's verdict on native bf16), export times, the comparisons, and a markdown table of median ms,
ms per image, images/s and the ratio to FCOS in the same runtime (same size and batch), and the peak
memory of the process (every model of a group is loaded at once: one R50 preset and FCOS at 512x512,
batch 1 took 6 GiB; run presets or sizes separately on a smaller machine). Times are end to end from
the normalised, padded tensor to the detections (decoding, resizing and normalising the image are not
included).

Quick check (two exports of a few minutes each, then seconds)::

    python benchmarks/deployment.py --presets asag_a_r50_speed --sizes 512x512 --batches 1 --repeats 2

The full measurement (docs/performance.md, "Exported models"; 8 ASAG exports per format, run on a
quiet machine)::

    python benchmarks/deployment.py --presets asag_a_r50_speed asag_s_r50_speed \\
        --sizes 800x1216 512x512 --batches 1 4 --threads 2 --repeats 5 --out-dir runs/deployment
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from inference_speed import benchmark_model
from runtimes import cpu_description, has_native_bf16, load_exported, openvino_model, torch_threads
from torch import Tensor, nn
from torchvision.models.detection import fcos_resnet50_fpn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

import asag
from asag.commands.benchmark import parse_size
from asag.config import load_config
from asag.data import LabelMap
from asag.engine.benchmark import (
    BYTES_PER_MIB,
    MS_PER_S,
    RSS_UNIT_BYTES,
    random_inputs,
    time_call,
    timing_stats,
)
from asag.export import export_model
from asag.modeling.detector import ASAG
from asag.modeling.fast import fold_batch_norms, optimize_for_inference
from asag.structures import Detections

SETTINGS = ("fast", "fast_bf16", "static", "onnxruntime", "openvino", "openvino_bf16", "pt2")
DEFAULT_SETTINGS = ("fast", "fast_bf16", "onnxruntime", "openvino", "openvino_bf16", "pt2")
# Exported settings -> (runtime of load_exported, precision, export format).
EXPORTED = {"onnxruntime": ("onnxruntime", "fp32", "onnx"), "openvino": ("openvino", "fp32", "onnx"),
            "openvino_bf16": ("openvino", "bf16", "onnx"), "pt2": ("torch", "fp32", "pt2")}
# bf16 settings -> the runtime whose native bf16 they need.
BF16_SETTINGS = {"fast_bf16": "torch", "openvino_bf16": "openvino"}
FCOS = "FCOS R50"
FCOS_SETTINGS = ("fast", "fast_bf16", "onnxruntime", "openvino", "openvino_bf16")
FCOS_OPSET = 17  # ONNX opset of the FCOS export (TorchScript exporter)
FCOS_OUTPUTS = ("boxes", "scores", "labels")  # per image, in this order, in the flat output tuple
MATCH_IOU = 0.5  # a detection matches a reference detection of the same label at this IoU or more
SAME_BOX_PX = 1.0  # boxes whose coordinates all agree within this many pixels match as IoU 1
INPUT_SEED = 1
DYNAMIC, STATIC = "dynamic", "static"  # the eager float32 references (reference_of)
Run = Callable[[], list[Detections]]


# ------------------------------------------------------------------------------------------- FCOS


class FCOSDeployed(nn.Module):
    """torchvision's FCOS from normalised, padded images ``[B, 3, H, W]`` (all of size ``H x W``) to its
    detections, without its transform: a flat tuple ``(boxes_0 [n_0, 4], scores_0 [n_0], labels_0
    [n_0], boxes_1, ...)``, boxes xyxy in input pixels. ``dtype`` / ``channels_last``: the input's
    precision and layout (those of the backbone, see :func:`fast_fcos`); the levels enter the head in
    float32 and the default layout."""

    def __init__(self, fcos: nn.Module, dtype: torch.dtype | None = None,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.fcos = fcos.eval()
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        fcos = self.fcos
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        levels = fcos.backbone(images.to(dtype=self.dtype or images.dtype, memory_format=layout)).values()
        features = [level.float().contiguous() for level in levels]
        head = fcos.head(features)
        image_list = ImageList(images, [tuple(images.shape[-2:])] * len(images))
        anchors = fcos.anchor_generator(image_list, features)
        counts = [f.shape[2] * f.shape[3] for f in features]
        split_head = {key: list(value.split(counts, dim=1)) for key, value in head.items()}
        split_anchors = [list(a.split(counts)) for a in anchors]
        detections = fcos.postprocess_detections(split_head, split_anchors, image_list.image_sizes)
        return tuple(d[key] for d in detections for key in FCOS_OUTPUTS)


def fcos_model(seed: int = 0) -> FCOSDeployed:
    """``fcos_resnet50_fpn`` with random (seeded) weights and frozen batch norms, eval mode."""
    torch.manual_seed(seed)
    return FCOSDeployed(fcos_resnet50_fpn(weights=None, weights_backbone=None)).eval()


def fast_fcos(model: FCOSDeployed, dtype: torch.dtype | None = None) -> FCOSDeployed:
    """A copy treated as ``--fast`` treats ASAG: frozen batch norms folded into the convolutions,
    channels-last backbone + FPN, optionally in ``dtype`` (the head stays float32)."""
    fast = copy.deepcopy(model)
    fold_batch_norms(fast.fcos.backbone.body)
    fast.fcos.backbone.to(memory_format=torch.channels_last)
    if dtype is not None:
        fast.fcos.backbone.to(dtype)
    fast.dtype, fast.channels_last = dtype, True
    return fast


def fcos_detections(outputs: list | tuple) -> list[Detections]:
    """The flat output tuple of :class:`FCOSDeployed` (tensors or arrays) as one Detections per image."""
    tensors = [torch.as_tensor(o) for o in outputs]
    n = len(FCOS_OUTPUTS)
    return [Detections(*tensors[i:i + n]) for i in range(0, len(tensors), n)]


def export_fcos(model: FCOSDeployed, path: Path, size: tuple[int, int], batch: int) -> None:
    """ONNX export of ``model`` at batch ``batch`` and ``size`` (input ``images``; outputs
    ``boxes_i``, ``scores_i``, ``labels_i`` per image) with the TorchScript exporter."""
    names = [f"{key}_{i}" for i in range(batch) for key in FCOS_OUTPUTS]
    with warnings.catch_warnings():  # tracer warnings of torchvision's data-dependent post-processing
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(batch, 3, *size),), str(path), dynamo=False,
                          opset_version=FCOS_OPSET, input_names=["images"], output_names=names)


def fcos_onnxruntime(path: Path, threads: int) -> Callable[[Tensor], list[Detections]]:
    """``run(images) -> detections`` of an FCOS ONNX file in ONNX Runtime (CPU, ``threads`` intra-op)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: fcos_detections(session.run(None, {"images": images.numpy()}))


def fcos_openvino(path: Path, precision: str, threads: int) -> Callable[[Tensor], list[Detections]]:
    """``run(images) -> detections`` of an FCOS ONNX file compiled by OpenVINO at ``precision``."""
    compiled = openvino_model(path, precision, threads)
    request = compiled.create_infer_request()

    def run(images: Tensor) -> list[Detections]:
        results = request.infer({"images": images.numpy()})
        return fcos_detections([results[output].copy() for output in compiled.outputs])

    return run


# ------------------------------------------------------------------------------------ comparisons


def match_detections(ref: Detections, got: Detections, iou: float = MATCH_IOU) -> list[tuple[int, int]]:
    """One-to-one pairs ``(i, j)``: each reference detection ``i``, in order (scores descending), takes
    the unmatched detection ``j`` of ``got`` with the same label and the highest IoU, if at least
    ``iou``. Boxes whose coordinates all agree within :data:`SAME_BOX_PX` count as IoU 1 (a zero-area
    box has no IoU with itself)."""
    if not len(ref) or not len(got):
        return []
    a, b = ref.boxes.float(), got.boxes.float()
    overlaps = box_iou(a, b).nan_to_num(0.0)  # two zero-area boxes: 0 / 0
    same = (a[:, None, :] - b[None, :, :]).abs().amax(dim=-1) <= SAME_BOX_PX
    overlaps[same] = 1.0
    overlaps[ref.labels[:, None] != got.labels[None, :]] = -1.0
    pairs = []
    for i in range(len(ref)):
        j = int(overlaps[i].argmax())
        if overlaps[i, j] >= iou:
            pairs.append((i, j))
            overlaps[:, j] = -1.0
    return pairs


@dataclass
class Agreement:
    """Detections of one setting against the reference, over all images of the batch."""

    reference: int  # reference detections
    detections: int  # this setting's detections
    same_ranks: bool  # counts and labels identical rank by rank
    matched: float  # fraction of reference detections matched (match_detections); 1.0 without any
    score: float  # largest |score difference| over matched pairs
    box: float  # largest |coordinate difference| over matched pairs, px

    def __str__(self) -> str:
        return (f"{self.detections} detections (reference {self.reference}), labels identical rank by rank "
                f"{self.same_ranks}, matched {100 * self.matched:.1f} % (same label, IoU >= {MATCH_IOU}), "
                f"matched pairs: max |score diff| {self.score:.2e}, max |box diff| {self.box:.2e} px")


def agreement(ref: list[Detections], got: list[Detections]) -> Agreement:
    """:class:`Agreement` of per-image detections ``got`` with ``ref`` (same images, same order)."""
    matched = score = box = 0.0
    same = len(ref) == len(got)
    for r, g in zip(ref, got, strict=True):
        same = same and len(r) == len(g) and torch.equal(r.labels, g.labels.to(r.labels.dtype))
        pairs = match_detections(r, g)
        matched += len(pairs)
        if pairs:
            i, j = (torch.tensor(index) for index in zip(*pairs, strict=True))
            score = max(score, float((r.scores[i] - g.scores[j].float()).abs().max()))
            box = max(box, float((r.boxes[i] - g.boxes[j].float()).abs().max()))
    total = sum(len(r) for r in ref)
    return Agreement(total, sum(len(g) for g in got), same, matched / total if total else 1.0, score, box)


# ---------------------------------------------------------------------------------------- exports


def source_digest() -> str:
    """SHA-256 of the installed ``asag`` package's Python sources: an export made by other code is stale."""
    h = hashlib.sha256()
    root = Path(asag.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def digest(module: nn.Module, extra: dict) -> str:
    """SHA-256 of a module's state (names and bytes), of ``extra`` (JSON) and of the library's sources:
    what an export depends on."""
    h = hashlib.sha256(json.dumps({**extra, "asag": source_digest()}, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cached_export(path: Path, fingerprint: str, export: Callable[[Path], object]) -> Path:
    """``path``, exported by ``export(path)`` unless it exists with the same ``fingerprint`` in its side
    file ``path + ".json"`` (written after a successful export); prints the export time or the reuse."""
    side = path.with_name(path.name + ".json")
    if path.is_file() and side.is_file() and json.loads(side.read_text()).get("fingerprint") == fingerprint:
        print(f"reusing {path} (same weights, configuration, size, batch, torch, asag sources)", flush=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    side.unlink(missing_ok=True)
    start = time.perf_counter()
    export(path)
    seconds = time.perf_counter() - start
    side.write_text(json.dumps({"fingerprint": fingerprint, "export_seconds": round(seconds, 1)}))
    print(f"exported {path} in {seconds:.0f} s ({path.stat().st_size / 2**20:.0f} MiB)", flush=True)
    return path


def label_map(num_classes: int) -> LabelMap:
    return LabelMap.from_dict({"category_ids": list(range(1, num_classes + 1)),
                               "names": [f"class_{i}" for i in range(1, num_classes + 1)]})


def asag_exports(preset: str, static: ASAG, size: tuple[int, int], batch: int, formats: set[str],
                 out_dir: Path) -> dict[str, Path]:
    """Format -> file of ``static`` exported at ``size`` and ``batch`` (cached, :func:`cached_export`)."""
    cfg = load_config(preset)
    fingerprint = digest(static, {"config": cfg.to_dict(), "size": size, "batch": batch,
                                  "torch": torch.__version__})
    files = {}
    for fmt in sorted(formats):
        path = out_dir / f"{preset}_{size[0]}x{size[1]}_b{batch}.{fmt}"
        files[fmt] = cached_export(path, fingerprint, lambda p: export_model(
            static, cfg, label_map(cfg.model.num_classes), p, size=size, batch_size=batch))
    return files


# ---------------------------------------------------------------------------------------- runners


@dataclass
class Models:
    """The eager models shared by all groups: per preset the plain (dynamic) and static models, the
    float32 references, and the fast copies."""

    plain: dict[str, ASAG]
    static: dict[str, ASAG]
    fast: dict[tuple[str, str], ASAG]  # (preset, setting) -> optimize_for_inference copy
    fcos: FCOSDeployed | None
    fcos_fast: dict[str, FCOSDeployed]  # setting -> fast_fcos copy


def build_models(presets: list[str], settings: list[str], with_fcos: bool) -> Models:
    plain, static, fast = {}, {}, {}
    for preset in presets:
        model = plain[preset] = benchmark_model(preset, [])
        static[preset] = copy.deepcopy(model).set_static(True)
        for setting in ("fast", "fast_bf16"):
            if setting in settings:
                dtype = "bf16" if "bf16" in setting else None
                fast[preset, setting] = optimize_for_inference(model, dtype=dtype)
    fcos = fcos_model() if with_fcos else None
    fcos_fast = {s: fast_fcos(fcos, torch.bfloat16 if "bf16" in s else None)
                 for s in ("fast", "fast_bf16") if fcos is not None and s in settings}
    return Models(plain, static, fast, fcos, fcos_fast)


def group_runs(models: Models, settings: list[str], size: tuple[int, int], batch: int, images: Tensor,
               sizes: Tensor, args: argparse.Namespace) -> tuple[dict[tuple[str, str], Run], dict[str, Run]]:
    """``(model, setting) -> run()`` for one group, and ``(model, mode) -> run()`` of its float32 eager
    references (:func:`reference_of`)."""
    runs: dict[tuple[str, str], Run] = {}
    references: dict[tuple[str, str], Run] = {}
    formats = {EXPORTED[s][2] for s in settings if s in EXPORTED}
    for preset, static in models.static.items():
        plain = models.plain[preset]
        references[preset, STATIC] = lambda static=static: static.detect(images, sizes, sizes).to_list()
        references[preset, DYNAMIC] = lambda plain=plain: plain.postprocess(plain(images, sizes), sizes)
        files = asag_exports(preset, static, size, batch, formats, Path(args.out_dir)) if formats else {}
        for setting in settings:
            if (preset, setting) in models.fast:
                fast = models.fast[preset, setting]
                runs[preset, setting] = lambda fast=fast: fast.postprocess(fast(images, sizes), sizes)
            elif setting == "static":
                runs[preset, setting] = references[preset, STATIC]
            else:
                runtime, precision, fmt = EXPORTED[setting]
                runner = load_exported(files[fmt], runtime, precision, args.threads)
                runs[preset, setting] = lambda runner=runner: runner.run(images, sizes, sizes).to_list()
    if models.fcos is not None:
        fcos = models.fcos
        references[FCOS, DYNAMIC] = lambda: fcos_detections(fcos(images))
        fcos_settings = [s for s in settings if s in FCOS_SETTINGS]
        path = None
        if any(s in EXPORTED for s in fcos_settings):
            fingerprint = digest(fcos, {"size": size, "batch": batch, "torch": torch.__version__})
            path = cached_export(Path(args.out_dir) / f"fcos_resnet50_fpn_{size[0]}x{size[1]}_b{batch}.onnx",
                                 fingerprint, lambda p: export_fcos(fcos, p, size, batch))
        for setting in fcos_settings:
            if setting in models.fcos_fast:
                model = models.fcos_fast[setting]
                runs[FCOS, setting] = lambda model=model: fcos_detections(model(images))
                continue
            runtime, precision, _ = EXPORTED[setting]
            run = (fcos_onnxruntime(path, args.threads) if runtime == "onnxruntime"
                   else fcos_openvino(path, precision, args.threads))
            runs[FCOS, setting] = lambda run=run: run(images)
    return runs, references


def reference_of(model: str, setting: str) -> tuple[str, str]:
    """The float32 eager reference a setting is compared with: the dynamic model for the PyTorch fast
    settings (and FCOS), the static model (the exported graph) for ``static`` and the exported files."""
    return (model, DYNAMIC) if model == FCOS or setting in ("fast", "fast_bf16") else (model, STATIC)


@dataclass
class Row:
    model: str
    setting: str
    size: tuple[int, int]
    batch: int
    median_ms: float
    q1_ms: float
    q3_ms: float


def time_group(runs: dict[tuple[str, str], Run], warmup: int, repeats: int
               ) -> dict[tuple[str, str], list[float]]:
    """Seconds per call of every run: ``warmup`` untimed calls each, then ``repeats`` round-robin rounds."""
    device = torch.device("cpu")
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for run in runs.values():
        for _ in range(warmup):
            time_call(run, device)
    for _ in range(repeats):
        for key, run in runs.items():
            times[key].append(time_call(run, device)[1])
    return times


def run_group(models: Models, settings: list[str], size: tuple[int, int], batch: int,
              args: argparse.Namespace) -> list[Row]:
    """Exports, comparisons and interleaved timing of one (size, batch) group."""
    print(f"\n=== {size[0]}x{size[1]}, batch {batch} ===", flush=True)
    inputs = random_inputs(batch, size, seed=INPUT_SEED)
    with torch_threads(args.threads):
        runs, references = group_runs(models, settings, size, batch, inputs.images, inputs.image_sizes, args)
    with torch.inference_mode():
        expected = {key: reference() for key, reference in references.items()}
        for preset in models.static:
            print(f"{preset} eager fp32: static vs dynamic model (they differ where a patch budget binds): "
                  f"{agreement(expected[preset, DYNAMIC], expected[preset, STATIC])}")
        for (model, setting), run in runs.items():
            reference = reference_of(model, setting)
            found = agreement(expected[reference], run())
            print(f"{model} {setting} vs eager fp32 {reference[1]} model: {found}", flush=True)
        times = time_group(runs, args.warmup, args.repeats)
    rows = []
    for (model, setting), seconds in times.items():
        t = timing_stats(seconds)
        rows.append(Row(model, setting, size, batch, t.median, t.q1, t.q3))
    return rows


# ------------------------------------------------------------------------------------------ table


def markdown_table(rows: list[Row]) -> str:
    """Median ms per call, ms per image, images/s and the ratio to FCOS (same setting, size, batch)."""
    fcos = {(r.setting, r.size, r.batch): r.median_ms for r in rows if r.model == FCOS}
    lines = ["| model | input | batch | setting | median ms | quartiles | ms / image | images/s | vs FCOS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = fcos.get((r.setting, r.size, r.batch))
        ratio = f"{r.median_ms / base:.2f}" if base and r.model != FCOS else "-"
        lines.append(f"| {r.model} | {r.size[0]}x{r.size[1]} | {r.batch} | {r.setting} | {r.median_ms:.1f} | "
                     f"{r.q1_ms:.1f}-{r.q3_ms:.1f} | {r.median_ms / r.batch:.1f} | "
                     f"{r.batch * MS_PER_S / r.median_ms:.2f} | {ratio} |")
    return "\n".join(lines)


def supported_settings(settings: list[str]) -> list[str]:
    """``settings`` without the bf16 ones whose runtime has no native bfloat16 here (printed)."""
    kept = []
    for setting in settings:
        runtime = BF16_SETTINGS.get(setting)
        if runtime is not None and not has_native_bf16(runtime):
            print(f"skipping {setting}: {runtime} reports no native bfloat16 on this CPU (needs AVX512-BF16 "
                  "or AMX); only float32 is measured")
            continue
        kept.append(setting)
    return kept


def versions() -> str:
    import onnxruntime
    import openvino
    import torchvision

    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, openvino {openvino.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["asag_a_r50_speed", "asag_s_r50_speed"])
    parser.add_argument("--sizes", nargs="+", default=["800x1216", "512x512"],
                        help="HxW of the images and of the exports (multiples of 32)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(DEFAULT_SETTINGS))
    parser.add_argument("--no-fcos", action="store_true", help="ASAG only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="runs/deployment", help="exported files (reused when current)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [parse_size(s) for s in args.sizes]
    print(cpu_description())
    print(f"{versions()}; {args.threads} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    settings = supported_settings([s for s in SETTINGS if s in args.settings])
    models = build_models(args.presets, settings, with_fcos=not args.no_fcos)
    rows = []
    for size in sizes:
        for batch in args.batches:
            rows += run_group(models, settings, size, batch, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES / BYTES_PER_MIB
    print(f"\n{args.repeats} interleaved rounds per group after {args.warmup} warm-up call(s); load average "
          f"now {os.getloadavg()[0]:.1f}; peak RSS of this process {peak:.0f} MiB\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
