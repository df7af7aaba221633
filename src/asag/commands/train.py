"""``asag train PRESET [key=value ...]``: train on a COCO-format data set (single process or torchrun)."""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from asag.api import resolve_device
from asag.build import (
    build_criterion,
    build_dataset,
    build_loader,
    build_model,
    build_optimizer_and_schedule,
    check_annotated,
    check_num_classes,
    init_model,
)
from asag.config import Config, field_option, load_config
from asag.engine.checkpoint import configure_determinism, load_checkpoint, seed_everything
from asag.engine.coco_eval import resolve_backend
from asag.engine.crowdhuman_eval import check_single_category
from asag.engine.distributed import cleanup_distributed, init_distributed, is_main_process, wrap_ddp
from asag.engine.ema import ModelEma
from asag.engine.evaluator import evaluate, evaluate_crowdhuman
from asag.engine.finetune import INIT_REPORT, describe_trainable
from asag.engine.host_memory import configure_host_memory
from asag.engine.logger import RunLogger
from asag.engine.memory_format import (
    LayoutChoice,
    agree_across_ranks,
    choose_memory_format,
    probe_images,
    probe_layouts,
    recorded_layout,
)
from asag.engine.trainer import FitResult, autocast_context, fit, make_grad_scaler, set_amp_scope
from asag.errors import ConfigError
from asag.modeling.detector import STATIC_TRAINING_ERROR
from asag.modeling.fast import cpu_supports_bf16
from asag.outputs import atomic_write_text, prepare_run_dir, remove_unfinished_run
from asag.viz.curves import curves_after_training


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a detector from a preset",
        description="Train from a preset (see `asag config list`). Multi-GPU: torchrun --nproc_per_node=8 "
                    "-m asag.cli train PRESET ...",
    )
    parser.add_argument("preset", help="preset name or YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--resume", metavar="CKPT",
                        help="continue from a checkpoint written by asag train (default: start afresh)")
    parser.add_argument("--init", metavar="CKPT",
                        help="start from the weights of a trained detector (asag train / asag convert "
                             "checkpoint, or an authors' release file) with fresh optimiser and schedule; "
                             "classes are matched by name (finetune.init, docs/finetuning.md; default: "
                             "finetune.init, random initialisation when unset)")
    parser.add_argument("--output-dir", help="where checkpoints and logs go (default: runtime.output_dir)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoints and logs of an earlier run in the output folder "
                             "(default: refuse a folder that holds a run)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: runtime.device)")
    parser.add_argument("--threads", type=field_option("runtime.num_threads"),
                        help="torch CPU threads (default: runtime.num_threads)")
    parser.set_defaults(func=run)


def resolve_amp(cfg: Config, device: torch.device) -> str | None:
    """The training precision: ``auto`` is fp16 on CUDA and float32 on the CPU; ``bf16`` on a CPU without
    native bf16 instructions (emulated, slower than float32) falls back to float32 with a message."""
    amp = cfg.runtime.amp
    if amp == "auto":
        return "fp16" if device.type == "cuda" else None
    if amp == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        print("runtime.amp=bf16: this CPU has no native bf16 support; training in float32 instead")
        return None
    return None if amp == "none" else amp


def training_layout(cfg: Config, model: torch.nn.Module, device: torch.device, amp: str | None, *,
                    resume: str | Path | None = None) -> LayoutChoice:
    """``runtime.memory_format`` of this run in precision ``amp``
    (:func:`~asag.engine.memory_format.choose_memory_format`): ``auto`` and ``probe`` keep the layout
    recorded in the ``resume`` checkpoint; else ``probe`` on the CPU has rank 0 time ``model``'s backbone
    and FPN on a synthetic batch of ``data.batch_size`` images of the largest training scale (under
    ``amp``). Every rank takes rank 0's choice."""
    recorded = recorded_layout(load_checkpoint(resume, mmap=True)) if resume is not None else None
    data = cfg.data

    def probe() -> dict[str, list[float]]:
        images = probe_images(data.batch_size, max(data.train_scales), data.train_max_size, device)
        return probe_layouts(model, images, autocast=functools.partial(autocast_context, device, amp))

    choice = choose_memory_format(cfg.runtime.memory_format, device, amp=amp, recorded=recorded,
                                  probe=probe if is_main_process() else None)
    return agree_across_ranks(choice)


@dataclass
class TrainingRun:
    """What :func:`train` produced."""

    result: FitResult
    output_dir: Path


def train(cfg: Config, *, output_dir: str | Path | None = None, resume: str | None = None,
          overwrite: bool = False, log=print, epoch_iters: Callable[[int], int | None] | None = None
          ) -> TrainingRun:
    """Train ``cfg`` end to end: data, model, objective, schedule, evaluation and checkpoints.

    An output folder holding an earlier run is refused unless it is the folder of the ``resume``
    checkpoint or ``overwrite`` replaces it (its checkpoints and logs are removed first); a ``resume``
    checkpoint that has completed ``schedule.epochs`` is refused. A start that fails before its first
    checkpoint removes the logs it wrote (and the folder it created). ``epoch_iters``: as in
    :func:`~asag.engine.trainer.fit` (``asag demo``'s budget).
    """
    if cfg.model.static:
        raise ConfigError(f"model.static=true: {STATIC_TRAINING_ERROR}")
    rt = cfg.runtime
    device = resolve_device(rt.device)
    out = Path(output_dir or rt.output_dir)
    if resume is not None:
        check_epochs_left(resume, cfg.schedule.epochs)
    created = not out.exists()
    prepare_run_dir(out, resume=resume, overwrite=overwrite, remove=False)  # every rank
    dist = init_distributed(device.type)
    device = dist.device if dist.distributed else device
    if rt.num_threads:
        torch.set_num_threads(rt.num_threads)
    host_memory = configure_host_memory(rt.host_memory, device)
    seed_everything(rt.seed + dist.rank)
    configure_determinism(rt.deterministic)
    if is_main_process():
        prepare_run_dir(out, resume=resume, overwrite=overwrite, log=log)
    logger = RunLogger(out if is_main_process() else None)
    try:
        train_set = build_dataset(cfg.data, "train")
        val_set = build_dataset(cfg.data, "val")
        check_num_classes(cfg.model, train_set.label_map, str(train_set.ann_file))
        if rt.eval_every > 0:
            check_annotated(val_set)
        if is_main_process():
            log(f"training {cfg.description or cfg.model.variant}: {len(train_set)} train images, "
                f"{len(val_set)} val images, device {device}, output {out}")
            log(host_memory.line())
        model = build_model(cfg)
        if resume is None:
            report = init_model(model, cfg, train_set.label_map)
            if report is not None and is_main_process():
                log(report.table())
                atomic_write_text(out / INIT_REPORT, report.table() + "\n")
        elif cfg.finetune.init and is_main_process():
            log(f"finetune.init={cfg.finetune.init} not loaded: the resumed checkpoint holds the weights")
        if (cfg.finetune.freeze != "none" or cfg.finetune.init) and is_main_process():
            log(describe_trainable(model, cfg.finetune.freeze))
        model = model.to(device)
        ema = ModelEma(model, cfg.schedule.ema_decay) if cfg.schedule.ema_decay > 0 else None
        criterion = build_criterion(cfg).to(device)
        optimizer, scheduler = build_optimizer_and_schedule(model, cfg.schedule)
        amp = resolve_amp(cfg, device)
        set_amp_scope(model, rt.amp_scope)
        layout = training_layout(cfg, model, device, amp, resume=resume)
        if is_main_process():
            log(layout.line())
        train_model = wrap_ddp(model, device) if dist.distributed else model
        evaluate_fn = build_evaluate_fn(cfg, val_set, device=device, amp=amp,
                                        results_json=out / "val_results.json")
        train_loader = build_loader(train_set, cfg.data, train=True, seed=rt.seed)
        check_iterations(train_loader, cfg, str(train_set.ann_file))
        result = fit(
            train_model, criterion, train_loader, optimizer,
            scheduler, epochs=cfg.schedule.epochs, device=device, output_dir=out, config=cfg.to_dict(),
            label_map=train_set.label_map.to_dict(), evaluate_fn=evaluate_fn, eval_every=rt.eval_every,
            checkpoint_every=rt.checkpoint_every, clip_max_norm=cfg.schedule.clip_max_norm, amp=amp,
            scaler=make_grad_scaler(amp, device), logger=logger, resume=resume,
            max_iters=cfg.schedule.max_iters_per_epoch, epoch_iters=epoch_iters, log_every=rt.log_every,
            channels_last=layout.channels_last, accumulate_steps=cfg.schedule.accumulate_steps, ema=ema,
        )
    except BaseException:
        with contextlib.suppress(OSError):  # the error that stopped the run is the one to report
            logger.close()
        if is_main_process():  # a start that failed before its first checkpoint leaves no run behind
            remove_unfinished_run(out, created)
        raise
    finally:
        logger.close()
        cleanup_distributed()
    if is_main_process():
        curves_after_training(out, log)
    return TrainingRun(result, out)


def check_epochs_left(resume: str | Path, epochs: int) -> None:
    """Refuse to resume a checkpoint that has already completed ``epochs`` (``schedule.epochs``): the run
    would train nothing and write nothing. Reads only the checkpoint's progress (memory-mapped)."""
    checkpoint = load_checkpoint(resume, mmap=True)
    epoch = checkpoint.get("epoch")
    done = epoch + 1 if isinstance(epoch, int) else 0  # a malformed entry is reported by the resume itself
    if done >= epochs:
        status = (f"that run is already complete ({done} of {epochs} epochs)" if done == epochs else
                  f"the checkpoint has completed {done} epochs, more than schedule.epochs={epochs}")
        raise ConfigError(f"--resume {resume}: {status}; nothing to train. To train longer pass "
                          f"schedule.epochs=N with N > {done}")


def check_iterations(train_loader, cfg: Config, source: str) -> None:
    """Refuse a run whose epochs would perform no iteration (the incomplete last batch is dropped, and so
    is an incomplete last group of ``schedule.accumulate_steps`` batches)."""
    steps = cfg.schedule.accumulate_steps
    if len(train_loader) // steps == 0:
        images = len(train_loader.batch_sampler.sampler)  # this process's share of the usable images
        needed = f"data.batch_size={cfg.data.batch_size}" + (
            f" x schedule.accumulate_steps={steps}" if steps > 1 else "")
        raise ConfigError(
            f"{needed} is larger than the {images} usable training images of "
            f"{source} (per process; images without a box or smaller than data.min_image_side="
            f"{cfg.data.min_image_side} px are left out): an epoch would run no iteration"
        )


def build_evaluate_fn(cfg: Config, dataset, *, device: torch.device, amp: str | None, results_json: Path,
                      label_map=None, per_class: bool | None = None):
    """``evaluate_fn(model)`` on ``dataset`` with the metric named by ``cfg.evaluation.metric`` (COCO, by
    the COCOeval of ``cfg.evaluation.backend``, or CrowdHuman; the best checkpoint follows its ``ap``
    either way). ``label_map`` (default: the data
    set's) maps predicted labels to category ids; ``per_class`` overrides ``cfg.evaluation.per_class``."""
    label_map = dataset.label_map if label_map is None else label_map
    common = dict(loader=build_loader(dataset, cfg.data, train=False), coco_gt=dataset.coco,
                  label_map=label_map, device=device, amp=amp, results_json=results_json)
    if cfg.evaluation.metric == "crowdhuman":
        check_single_category(dataset.coco, str(dataset.ann_file))  # fail before training, not after
        return functools.partial(evaluate_crowdhuman, **common, miss_rate_rule=cfg.evaluation.miss_rate_rule)
    per_class = cfg.evaluation.per_class if per_class is None else per_class
    backend = resolve_backend(cfg.evaluation.backend)  # fail before training, not after
    return functools.partial(evaluate, **common, per_class=per_class, backend=backend)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"runtime.device={args.device}")
    if args.threads is not None:
        overrides.append(f"runtime.num_threads={args.threads}")
    if args.init is not None and args.resume is not None:
        raise ConfigError("--init starts a new run from trained weights, --resume continues a run: give one "
                          "of them")
    cfg = load_config(args.preset, overrides)
    if args.init is not None:
        cfg.finetune.init = args.init
    run = train(cfg, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite)
    if is_main_process():
        print(final_line(run))
    return 0


def final_line(run: TrainingRun) -> str:
    """The last line of ``asag train``: the best AP when the run evaluated, else where the weights are."""
    r = run.result
    if r.best_epoch >= 0:
        return f"done: best AP {r.best_ap:.4f} at epoch {r.best_epoch}; checkpoints in {run.output_dir}"
    return f"done: no evaluation (runtime.eval_every=0); last checkpoint {run.output_dir / 'last.pth'}"
