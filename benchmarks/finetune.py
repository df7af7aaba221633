"""Measured transfer: fine-tuning a trained ASAG-A on new classes against training from scratch.

1. A **source** data set of 8 synthetic shape classes (640 training / 80 validation images) and the
   ``demo`` model (ASAG-A, ResNet-10, width 64) trained on it for ``--source-minutes``.
2. A **target** data set of 4 classes, 2 shared with the source (ring, triangle) and 2 new (star,
   heart; the source never saw them), with ``--target-images`` training and 100 validation images.
3. On the target, for the same wall-clock budget (``--target-minutes``) each: ASAG-A fine-tuned from the
   source checkpoint (``asag train --init``, the ``finetune_demo`` recipe), with variants (frozen backbone;
   EMA), ASAG-A from scratch (the ``demo`` preset), and torchvision's FCOS from scratch (the setting of
   ``benchmarks/synthetic_shootout.py``). Every run is scored by the same evaluator (pycocotools) on
   the target's validation images.

Prints a table (AP, AP50, iterations) and writes ``results.json``, ``results.md`` and the learning
curves ``curves.png`` (AP against training seconds) into ``--work``. ASAG runs are ``asag train`` runs
(folders under ``--work``); the schedules fit the budget as in ``asag demo`` (speed probe, then epochs
re-planned from the measured speed).

    python benchmarks/finetune.py [--work /tmp/finetune] [--source-minutes 12] [--target-minutes 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from asag.build import build_dataset, build_loader, prepare_synthetic
from asag.commands.demo import fit_to_budget
from asag.commands.train import train
from asag.config import Config, load_config
from asag.engine.evaluator import evaluate
from asag.modeling.fast import cpu_supports_bf16

SOURCE_CLASSES = ["rectangle", "ellipse", "triangle", "cross", "ring", "diamond", "corner", "arrow"]
TARGET_CLASSES = ["ring", "star", "triangle", "heart"]  # 2 shared with the source, 2 new
SOURCE_IMAGES, SOURCE_VAL_IMAGES, TARGET_VAL_IMAGES = 640, 80, 100
SOURCE_SEED, TARGET_SEED = 11, 12
# Long enough that the budget, not the schedule, ends every run (the budget shortens the epochs, keeping
# their number, the warm-up's share and the drop before the last epoch).
MANY_EPOCHS = 12


@dataclass
class Row:
    name: str
    ap: float
    ap50: float
    iterations: int
    train_seconds: float
    curve: list[tuple[float, float]] = field(default_factory=list)  # (training seconds, AP)


def data_config(root: Path, classes: list[str], images: int, val_images: int, seed: int) -> list[str]:
    return [f"data.root={root}", f"data.synthetic_classes={json.dumps(classes)}",
            f"data.synthetic_train_images={images}", f"data.synthetic_val_images={val_images}",
            f"data.synthetic_seed={seed}", f"model.num_classes={len(classes)}"]


def budgeted(cfg: Config, minutes: float) -> tuple[Config, object]:
    cfg.schedule.epochs, cfg.schedule.milestones = MANY_EPOCHS, [MANY_EPOCHS - 1]
    cfg.runtime.eval_every = 1
    return fit_to_budget(cfg, minutes * 60)


def run_asag(name: str, preset: str, overrides: list[str], out: Path, minutes: float) -> Row:
    print(f"\n== {name}", flush=True)
    cfg, pacer = budgeted(load_config(preset, overrides), minutes)
    start = time.perf_counter()
    run = train(cfg, output_dir=out, overwrite=True, epoch_iters=pacer)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    last = evals[-1]
    return Row(name, last["ap"], last["ap50"], run.result.iteration, seconds,
               [(r["elapsed"], r["ap"]) for r in evals])


def run_fcos(cfg: Config, minutes: float, bf16: bool) -> Row:
    """torchvision FCOS from scratch as in ``synthetic_shootout.py``, evaluated at each third of the
    budget (the clock stops while it evaluates)."""
    import synthetic_shootout as shootout

    print("\n== FCOS from scratch", flush=True)
    train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    contestant = shootout.FcosContestant(cfg, bf16)
    loader = build_loader(train_set, cfg.data, train=True, seed=0)
    val_loader = build_loader(val_set, cfg.data, train=False)
    curve, results = [], []

    def score(trained_seconds: float) -> None:
        results.append(evaluate(contestant.model, val_loader, coco_gt=val_set.coco,
                                label_map=val_set.label_map, device="cpu"))
        curve.append((trained_seconds, results[-1].ap))

    iterations = shootout.train_for(contestant, loader, minutes * 60, cfg.schedule.clip_max_norm, parts=3,
                                    on_part=score)
    r, trained = results[-1], curve[-1][0]
    return Row("FCOS from scratch", r.ap, r.ap50, iterations, trained, curve)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for row in rows:
        xs, ys = zip(*row.curve, strict=True) if row.curve else ((), ())
        ax.plot([x / 60 for x in xs], [100 * y for y in ys], marker="o", label=row.name)
    ax.set_xlabel("training time on the target (min)")
    ax.set_ylabel("COCO AP on the target's validation images")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/finetune", help="data sets, runs and results")
    parser.add_argument("--source-minutes", type=float, default=12.0)
    parser.add_argument("--target-minutes", type=float, default=3.0)
    parser.add_argument("--target-images", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse-source", action="store_true",
                        help="keep an existing source checkpoint in --work instead of training it again")
    parser.add_argument("--only", nargs="*", help="names of target runs to do (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    bf16 = cpu_supports_bf16()
    threads = [f"runtime.num_threads={args.threads}"]
    source_data = data_config(work / "source_data", SOURCE_CLASSES, SOURCE_IMAGES, SOURCE_VAL_IMAGES,
                              SOURCE_SEED)
    target_data = data_config(work / "target_data", TARGET_CLASSES, args.target_images, TARGET_VAL_IMAGES,
                              TARGET_SEED)
    for overrides in (source_data, target_data):
        prepare_synthetic(load_config("demo", overrides).data)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"bf16 autocast: {bf16}")
    source_ckpt = work / "source" / "best.pth"
    if not (args.reuse_source and source_ckpt.is_file()):
        run_asag("source: ASAG-A on 8 classes", "demo", source_data + threads, work / "source",
                 args.source_minutes)
    init = [f"finetune.init={source_ckpt}"]
    runs = {
        "ASAG-A fine-tuned": ("finetune_demo", target_data + threads + init),
        "ASAG-A fine-tuned, frozen backbone": ("finetune_demo", target_data + threads + init
                                               + ["finetune.freeze=backbone"]),
        "ASAG-A fine-tuned, EMA": ("finetune_demo", target_data + threads + init
                                   + ["schedule.ema_decay=0.999"]),
        "ASAG-A from scratch": ("demo", target_data + threads),
    }
    rows = []
    for name, (preset, overrides) in runs.items():
        if args.only is None or name in args.only:
            folder = work / name.lower().replace(" ", "_").replace(",", "").replace("-", "_")
            rows.append(run_asag(name, preset, overrides, folder, args.target_minutes))
    if args.only is None or "FCOS from scratch" in args.only:
        rows.append(run_fcos(load_config("demo", target_data + threads), args.target_minutes, bf16))
    print(f"\n{'run':40s} {'AP':>6s} {'AP50':>6s} {'iters':>6s} {'seconds':>8s}")
    for row in rows:
        print(f"{row.name:40s} {100 * row.ap:6.1f} {100 * row.ap50:6.1f} {row.iterations:6d} "
              f"{row.train_seconds:8.0f}")
    (work / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    lines = ["| run | AP | AP50 | iterations | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {100 * r.ap:.1f} | {100 * r.ap50:.1f} | {r.iterations} | {r.train_seconds:.0f} |"
              for r in rows]
    (work / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, work / "curves.png", f"{len(TARGET_CLASSES)} target classes, {args.target_images} training "
                                    f"images, {args.target_minutes:g} min each")
    print(f"results: {work / 'results.md'}, curves: {work / 'curves.png'}")


if __name__ == "__main__":
    main()
