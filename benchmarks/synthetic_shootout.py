"""ASAG-A against torchvision's FCOS: same small backbone, same synthetic data, same training time.

Both detectors get a ResNet-18 (batch norm, trained from scratch) with a 64-channel FPN, the images and
augmentation of the ``demo`` preset (its synthetic data set, 224-288 px training scales, batches of 4),
AdamW (lr 1e-3, weight decay 1e-4, gradient clipping at the preset's 0.1), the same warm-up and the
same time-based step schedule (lr x0.1 at 75 % and x0.01 at 90 % of the budget), and bf16 autocast of
backbone and FPN where the CPU supports it (everything after the FPN in float32 for both). Each trains
for the same wall-clock budget, one after the other, then both are scored by the same evaluator
(:func:`asag.engine.evaluator.evaluate`, pycocotools) on the synthetic validation split.

* ASAG-A: the ``demo`` preset's model (one AdaMixer head, 100-query setting) and its criterion.
* FCOS: ``torchvision.models.detection.FCOS`` on the same backbone (P3-P7, four-conv GroupNorm heads,
  its own center sampling, focal and GIoU losses), with its input resizing switched off so that it sees
  exactly the images ASAG sees; score threshold 0.05, at most 100 detections per image.

    python benchmarks/synthetic_shootout.py [--budget-s 300] [--data /tmp/shootout_data] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torchvision.models import resnet18
from torchvision.models.detection import FCOS
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from asag.build import build_criterion, build_dataset, build_loader, build_model, prepare_synthetic
from asag.config import Config, load_config
from asag.engine.evaluator import evaluate
from asag.engine.trainer import autocast_context, to_float32
from asag.modeling.fast import cpu_supports_bf16
from asag.structures import Batch, Detections

LR, WEIGHT_DECAY, WARMUP_ITERS = 1e-3, 1e-4, 100
DECAY_AT = ((0.75, 0.1), (0.9, 0.01))  # (fraction of the budget, lr factor)


# ----------------------------------------------------------------------------------------- models


def autocast_bf16(fn: Callable, enabled: bool) -> Callable:
    """``fn`` run under CPU bf16 autocast (when ``enabled``), its floating outputs cast to float32."""
    if not enabled:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with autocast_context("cpu", "bf16"):
            return to_float32(fn(*args, **kwargs))

    return wrapped


class AsagContestant:
    """The demo preset's ASAG-A: ``loss(batch, epoch)`` and the evaluator's interface."""

    name = "ASAG-A"

    def __init__(self, cfg: Config, bf16: bool) -> None:
        torch.manual_seed(0)
        self.model = build_model(cfg)
        self.model.extract_features = autocast_bf16(self.model.extract_features, bf16)
        self.criterion = build_criterion(cfg)

    def loss(self, batch: Batch, epoch: int) -> Tensor:
        output = self.model(batch.images, batch.image_sizes, batch.targets, epoch=epoch)
        return self.criterion(output, batch.targets, batch.image_sizes).total


class _NoResize(GeneralizedRCNNTransform):
    """torchvision's detection transform without the resize (the loader already resized)."""

    def resize(self, image: Tensor, target: dict | None = None) -> tuple[Tensor, dict | None]:
        return image, target


class FcosAdapter(nn.Module):
    """torchvision FCOS behind the evaluator's interface: ``model(images [B,3,H,W], image_sizes [B,2])``
    and ``model.postprocess(output, orig_sizes) -> list[Detections]`` (xyxy, original pixels)."""

    def __init__(self, num_classes: int, width: int, bf16: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
        backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512],
                                   width, extra_blocks=LastLevelP6P7(width, width))
        backbone.forward = autocast_bf16(backbone.forward, bf16)
        self.fcos = FCOS(backbone, num_classes, score_thresh=0.05, detections_per_img=100)
        # Images arrive normalised and resized: identity normalisation, no resize, pad to 32.
        self.fcos.transform = _NoResize(1, 1, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], size_divisible=32)

    @staticmethod
    def crops(images: Tensor, image_sizes: Tensor) -> list[Tensor]:
        return [img[:, :h, :w] for img, (h, w) in zip(images, image_sizes.tolist(), strict=True)]

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[list[dict], Tensor]:
        return self.fcos(self.crops(images, image_sizes)), image_sizes

    def postprocess(self, output: tuple[list[dict], Tensor], orig_sizes: Tensor) -> list[Detections]:
        detections, sizes = output
        scale = (orig_sizes.flip(1) / sizes.flip(1)).repeat(1, 2).float()  # [B, 4] (w, h, w, h)
        return [Detections(d["boxes"] * s, d["scores"], d["labels"])
                for d, s in zip(detections, scale, strict=True)]


class FcosContestant:
    name = "FCOS"

    def __init__(self, cfg: Config, bf16: bool) -> None:
        self.model = FcosAdapter(cfg.model.num_classes, cfg.model.neck.out_channels, bf16)

    def loss(self, batch: Batch, epoch: int) -> Tensor:
        targets = []
        for t in batch.targets:
            h, w = t.size
            boxes = box_convert(t.boxes, "cxcywh", "xyxy") * torch.tensor([w, h, w, h], dtype=t.boxes.dtype)
            targets.append({"boxes": boxes, "labels": t.labels})
        losses = self.model.fcos(FcosAdapter.crops(batch.images, batch.image_sizes), targets)
        return sum(losses.values())


# --------------------------------------------------------------------------------------- training


def lr_factor(iteration: int, fraction: float) -> float:
    warmup = min(1.0, (iteration + 1) / WARMUP_ITERS)
    decay = 1.0
    for at, factor in DECAY_AT:
        if fraction >= at:
            decay = factor
    return warmup * decay


def batches(loader) -> Iterator[tuple[int, Batch]]:
    """(epoch, batch) forever."""
    epoch = 0
    while True:
        for batch in loader:
            yield epoch, batch
        epoch += 1


def train_for(contestant, loader, budget_s: float, clip: float, *, parts: int = 1,
              on_part: Callable[[float], None] | None = None) -> int:
    """Train until ``budget_s`` seconds have passed; returns the number of iterations. With ``on_part``,
    ``on_part(trained_seconds)`` is called after each of ``parts`` equal shares of the budget (e.g. to
    evaluate), with the clock stopped while it runs."""
    model = contestant.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    start, iteration, last_print, done_parts = time.perf_counter(), 0, 0.0, 0
    for epoch, batch in batches(loader):
        elapsed = time.perf_counter() - start
        if on_part is not None and elapsed >= budget_s * (done_parts + 1) / parts:
            paused = time.perf_counter()
            on_part(elapsed)
            model.train()
            done_parts += 1
            start += time.perf_counter() - paused
        if elapsed >= budget_s:
            break
        for group in optimizer.param_groups:
            group["lr"] = LR * lr_factor(iteration, elapsed / budget_s)
        loss = contestant.loss(batch, epoch)
        if not torch.isfinite(loss):
            raise SystemExit(f"{contestant.name}: loss {float(loss)} at iteration {iteration}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        iteration += 1
        if elapsed - last_print >= 30:
            print(f"  {contestant.name}: {elapsed:5.0f} s, iteration {iteration}, epoch {epoch}, "
                  f"loss {float(loss.detach()):.3f}", flush=True)
            last_print = elapsed
    return iteration


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds per detector")
    parser.add_argument("--data", default="/tmp/shootout_data", help="synthetic data (generated if absent)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-bf16", action="store_true", help="float32 even where bf16 is supported")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Both on the ResNet-18 of FCOS's torchvision builder (the demo preset itself uses a ResNet-10), and
    # ASAG-A without denoising training, as measured in docs/performance.md (the demo preset has it on).
    cfg = load_config("demo", [f"data.root={args.data}", "model.backbone.name=resnet18",
                               "denoising.enabled=false"])
    bf16 = cpu_supports_bf16() and not args.no_bf16
    prepare_synthetic(cfg.data)
    train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 backbone+FPN: {bf16}, "
          f"budget {args.budget_s:.0f} s each, {len(train_set)} train / {len(val_set)} val images")
    rows = []
    for contestant in (AsagContestant(cfg, bf16), FcosContestant(cfg, bf16)):
        params = sum(p.numel() for p in contestant.model.parameters())
        print(f"{contestant.name}: {params / 1e6:.2f} M parameters, training ...", flush=True)
        loader = build_loader(train_set, cfg.data, train=True, seed=0)
        iterations = train_for(contestant, loader, args.budget_s, cfg.schedule.clip_max_norm)
        val_loader = build_loader(val_set, cfg.data, train=False)
        r = evaluate(contestant.model, val_loader, coco_gt=val_set.coco, label_map=val_set.label_map,
                     device="cpu")
        rows.append((contestant.name, params, iterations, r.ap, r.ap50, r.ap75, r.aps, r.apm, r.apl,
                     r.images_per_second))
    header = " ".join(f"{c:>6}" for c in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    print(f"\n{'model':>7} {'params':>8} {'iters':>6} {header} {'eval img/s':>10}")
    for name, params, iterations, *aps, ips in rows:
        values = " ".join(f"{100 * v:>6.1f}" for v in aps)
        print(f"{name:>7} {params / 1e6:>7.2f}M {iterations:>6} {values} {ips:>10.1f}")


if __name__ == "__main__":
    main()
