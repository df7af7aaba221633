"""Host-device synchronisations per image of each ASAG stage on a CUDA device.

``torch.cuda.set_sync_debug_mode("warn")`` makes PyTorch warn at every operation that blocks the host
until the GPU has caught up (``.item()``, ``nonzero``, boolean-mask indexing, blocking copies...).
This script counts those warnings between module hooks, so each stage gets its own count: the backbone
and FPN ("features"), the anchor generator, the proposal stage (with query preparation), the decoder
and the post-processing. It does so for the plain model and for the fast path
(:func:`asag.modeling.fast.optimize_for_inference`), for batch sizes 1 and 4, on a crafted detector
(``crafting.py``) whose anchor generator probes P4 and P3 on random inputs. Stage counts that stay the
same from batch 1 to batch 4 show that no stage loops over images or patches on the host.

    python benchmarks/cuda_syncs.py [--models ASAG-A ASAG-S] [--size 800x1216] [--batch-sizes 1 4]
"""

from __future__ import annotations

import argparse

import torch
from crafting import crafted_detector
from inference_speed import STAGES, StageClock, detect

from asag.commands.benchmark import parse_size
from asag.engine.benchmark import random_inputs
from asag.engine.syncs import CudaSyncCount
from asag.modeling.detector import ASAG
from asag.modeling.fast import optimize_for_inference

PRESETS = {"ASAG-A": "asag_a_r50_speed", "ASAG-S": "asag_s_r50_speed"}


def count_stage_syncs(model: ASAG, images: torch.Tensor, sizes: torch.Tensor) -> dict[str, int]:
    """Sync warnings per stage of one ``model(images, sizes)`` + ``model.postprocess`` call, and in all."""
    torch.cuda.synchronize()
    with torch.inference_mode(), CudaSyncCount() as syncs:
        clock = StageClock(images.device, read=lambda: syncs.total)
        clock.attach(model)
        try:
            clock.mark("start")
            detect(model, images, sizes)
            clock.mark("end")
        finally:
            clock.detach()
    counts = {stage: int(n) for stage, n in clock.stages().items()}
    return {**counts, "total": int(clock.marks["end"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--size", default="800x1216")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("cuda_syncs.py needs a CUDA device")
    device = torch.device("cuda")
    h, w = parse_size(args.size)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, size {h}x{w}")
    print(f"{'model':>7} {'setting':>6} {'batch':>5} " + " ".join(f"{s:>16}" for s in STAGES)
          + f" {'total':>6} {'AG/img':>7}")
    for name in args.models:
        model = crafted_detector(PRESETS[name]).to(device)
        settings = {"plain": model, "fast": optimize_for_inference(model, device=device)}
        for batch in args.batch_sizes:
            inputs = random_inputs(batch, (h, w), device, seed=1)
            for setting, m in settings.items():
                # warm-up: lazy initialisation, cuDNN autotuning, and the one extra sync of the first call
                # made in sync-debug mode in a process
                count_stage_syncs(m, inputs.images, inputs.image_sizes)
                counts = count_stage_syncs(m, inputs.images, inputs.image_sizes)
                print(f"{name:>7} {setting:>6} {batch:>5} " + " ".join(f"{counts[s]:>16}" for s in STAGES)
                      + f" {counts['total']:>6} {counts['anchor_generator'] / batch:>7.2f}")


if __name__ == "__main__":
    main()
