"""The library at an earlier git revision against the working tree, in one process: inference and training
steps interleaved call by call on the same weights and inputs, so that the machine's drift between
processes (10 % on a shared 2-core VM) does not enter the ratio.

The earlier revision's repository is extracted with ``git archive`` into a temporary folder and its
package imported as ``asag_before`` (``src/asag`` renamed, its ``asag`` imports rewritten), next to the
current ``asag``; its presets are read from the extracted ``configs/``. Both models get the current
model's state dict (the layouts of checkpoints do not change between revisions; a mismatch is an
error). Printed: per setting the median ms of ``--rounds`` interleaved calls after a warm-up round (the
order alternates every round), and the ratio after / before.

    python benchmarks/before_after.py REV infer [--presets asag_a_r50_speed asag_s_r50_speed]
        [--settings fast fast_static] [--size 800x1216] [--rounds 10] [--threads 2]
    python benchmarks/before_after.py REV train [--presets asag_a_r50_1x_100q]
        [--variants release default bf16] [--size 512x640] [--batch 2] [--rounds 8] [--threads 2]

``infer``: ``fast`` is ``optimize_for_inference`` (``--fast``), ``fast_static`` the same in static mode,
``plain`` the model as built; each call is ``model(images, sizes)`` + ``postprocess`` on one random image
batch, the crafted, calibrated weights of ``inference_speed.py``. ``train``: ``Trainer.train_step`` on
the batch of ``train_step.py``, ``release`` = its release path, ``default`` = the configuration's
defaults (fp32), ``bf16`` = the defaults with ``runtime.amp=bf16`` (each revision's own choice of memory
layout for it).
"""

from __future__ import annotations

import argparse
import copy
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from inference_speed import benchmark_model
from train_step import RELEASE_PATH, random_targets

from asag.build import build_trainer
from asag.commands.benchmark import parse_size
from asag.config import load_config
from asag.engine.benchmark import random_inputs
from asag.modeling.fast import optimize_for_inference

REPO = Path(__file__).resolve().parents[1]
BEFORE = "asag_before"
IMPORT = re.compile(r"\b(from|import) asag\b")


def import_revision(rev: str, folder: Path):
    """The package of ``rev`` imported as ``asag_before`` (extracted under ``folder``)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src/asag", "configs"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "src" / BEFORE
    (folder / "src" / "asag").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(IMPORT.sub(lambda m: f"{m.group(1)} {BEFORE}", path.read_text()))
    sys.path.insert(0, str(folder / "src"))
    return __import__(BEFORE, fromlist=["build", "config", "modeling", "structures"])


def interleave(calls: dict, rounds: int) -> dict:
    """Median seconds of each call over ``rounds`` rounds after one warm-up round, order alternating."""
    times = {name: [] for name in calls}
    for r in range(rounds + 1):
        names = list(calls) if r % 2 == 0 else list(reversed(list(calls)))
        for name in names:
            start = time.perf_counter()
            calls[name]()
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def detect(model, images, sizes) -> None:
    model.postprocess(model(images, sizes), sizes)


def step(trainer, inputs, targets) -> None:
    torch.manual_seed(0)
    trainer.train_step(inputs.images, inputs.image_sizes, targets, epoch=1)


def inference(before, args) -> None:
    import_module = __import__(f"{BEFORE}.modeling.fast", fromlist=["optimize_for_inference"])
    for preset in args.presets:
        current = benchmark_model(preset, [])
        cfg = before.config.load_config(preset)
        cfg.model.backbone.weights = None
        earlier = before.build.build_model(cfg).eval()
        earlier.load_state_dict(current.state_dict(), strict=True)
        models = {}
        for setting in args.settings:
            for tree, model, optimize in (("before", earlier, import_module.optimize_for_inference),
                                          ("after", current, optimize_for_inference)):
                base = copy.deepcopy(model).set_static(True) if setting.endswith("static") else model
                models[tree, setting] = (optimize(base, device=torch.device("cpu"), fold_bn=True,
                                                  channels_last=True) if setting != "plain" else base)
        images = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(3))
        sizes = torch.tensor([list(args.size)])

        with torch.inference_mode():
            medians = interleave({key: partial(detect, m, images, sizes) for key, m in models.items()},
                                 args.rounds)
        for setting in args.settings:
            b, a = medians["before", setting] * 1e3, medians["after", setting] * 1e3
            print(f"{preset} {setting}: before {b:.0f} ms, after {a:.0f} ms, ratio {a / b:.3f}", flush=True)


def training(before, args) -> None:
    inputs = random_inputs(args.batch, args.size, seed=1)
    for preset in args.presets:
        for variant in args.variants:
            overrides = RELEASE_PATH if variant == "release" else []
            amp = "bf16" if variant == "bf16" else None
            trainers = {}
            for tree, config, build in (("before", before.config, before.build), ("after", None, None)):
                cfg = config.load_config(preset, overrides) if config else load_config(preset, overrides)
                cfg.model.backbone.weights = None
                torch.manual_seed(0)
                trainers[tree] = build.build_trainer(cfg, amp=amp) if build else build_trainer(cfg, amp=amp)
            targets = random_targets(inputs.image_sizes, cfg.model.num_classes)
            earlier = [before.structures.ImageTargets(t.boxes, t.labels, t.image_id, t.size, t.orig_size)
                       for t in targets]

            calls = {tree: partial(step, trainer, inputs, earlier if tree == "before" else targets)
                     for tree, trainer in trainers.items()}
            medians = interleave(calls, args.rounds)
            b, a = medians["before"] * 1e3, medians["after"] * 1e3
            print(f"{preset} {variant} step: before {b:.0f} ms, after {a:.0f} ms, ratio {a / b:.3f}",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the earlier git revision")
    parser.add_argument("mode", choices=["infer", "train"])
    parser.add_argument("--presets", nargs="+")
    parser.add_argument("--settings", nargs="+", default=["fast", "fast_static"],
                        choices=["plain", "fast", "fast_static"])
    parser.add_argument("--variants", nargs="+", default=["release", "default"],
                        choices=["release", "default", "bf16"])
    parser.add_argument("--size", type=parse_size)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    infer = args.mode == "infer"
    args.presets = args.presets or (["asag_a_r50_speed", "asag_s_r50_speed"] if infer
                                    else ["asag_a_r50_1x_100q"])
    args.size = args.size or ((800, 1216) if infer else (512, 640))
    args.rounds = args.rounds or (10 if infer else 8)
    print(f"{args.rev} against the working tree, {args.threads} threads, torch {torch.__version__}",
          flush=True)
    with tempfile.TemporaryDirectory() as folder:
        before = import_revision(args.rev, Path(folder))
        (inference if infer else training)(before, args)


if __name__ == "__main__":
    main()
