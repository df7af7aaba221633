"""The only code that reads the configuration: config -> modules, criterion, optimizer, data.

Everything built here takes plain, typed arguments; see :mod:`asag.config` for the fields.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from asag.config import Config, DataConfig, ModelConfig, ScheduleConfig
from asag.convert.official import head_index
from asag.data import (
    CocoDetection,
    CropSpec,
    LabelMap,
    build_eval_transforms,
    build_train_transforms,
    collate,
)
from asag.data.coco import load_coco_json
from asag.data.synthetic import check_classes, generate_synthetic, synthetic_paths
from asag.data.transforms import DetectionTransform
from asag.engine.distributed import build_eval_sampler, build_train_loader, loader_options
from asag.engine.finetune import (
    FREEZE_CHOICES,
    InitReport,
    class_axes,
    initialize_from,
    read_init_source,
)
from asag.engine.optim import build_optimizer
from asag.engine.schedule import WarmupMultiStepLR
from asag.engine.trainer import Trainer, set_amp_scope, use_channels_last
from asag.errors import ConfigError, DataError
from asag.modeling.anchor_generator import AnchorGenerator
from asag.modeling.backbone import RESNET_STRIDES, Backbone
from asag.modeling.budgets import Budgets
from asag.modeling.decoders.adamixer import AdaMixerStage
from asag.modeling.decoders.deformable import DeformableStage
from asag.modeling.decoders.parallel import ParallelHeads
from asag.modeling.decoders.sparse_rcnn import SparseRCNNStage
from asag.modeling.deformable_encoder import ENCODER_STRIDES, DeformableEncoder
from asag.modeling.detector import ASAG
from asag.modeling.neck import Neck
from asag.modeling.postprocess import PostProcessor
from asag.modeling.proposal import ProposalStage

# The anchor generator reads P3, P4, P5 (spec 3.1); the proposal stage and decoders read P2..P5.
ANCHOR_STRIDES = (8, 16, 32)
# ASAG-D (spec 16): the deformable encoder's P3..P6 (strides 8..64) replace the FPN's P2..P5; the anchor
# generator's P3..P5 are then the neck's levels 0..2 instead of 1..3.
FPN_ANCHOR_LEVELS = (1, 2, 3)
ENCODER_ANCHOR_LEVELS = (0, 1, 2)


def is_deformable(cfg: ModelConfig) -> bool:
    return cfg.decoder.type == "deformable"


def feature_strides(cfg: ModelConfig) -> tuple[int, ...]:
    """Strides of the neck's levels read by the proposal stage and the decoder heads."""
    return tuple(ENCODER_STRIDES) if is_deformable(cfg) else tuple(RESNET_STRIDES)


def build_backbone(cfg: ModelConfig) -> Backbone:
    b = cfg.backbone
    backbone = Backbone(b.name, norm=b.norm, trainable_layers=b.trainable_layers,
                        freeze_bn_affine=b.freeze_bn_affine, eps=b.frozen_bn_eps)
    if b.weights:
        backbone.load_pretrained(b.weights)
    return backbone


def build_anchor_generator(cfg: ModelConfig) -> AnchorGenerator:
    a = cfg.anchor_generator
    return AnchorGenerator(
        in_channels=cfg.neck.out_channels,
        compress_dim=a.compress_dim,
        mlp_hidden_dim=a.mlp_hidden_dim,
        num_anchors_coarse=a.num_anchors_coarse,
        num_anchors_patch=a.num_anchors_patch,
        interpolate_size=a.interpolate_size,
        patch_size=a.patch_size,
        strides=ANCHOR_STRIDES,
        threshold_low=a.threshold_low,
        threshold_high=a.threshold_high,
        patch_nms_threshold=a.patch_nms_threshold,
        score_threshold=a.score_threshold,
        min_anchors=a.min_anchors,
        max_anchors=a.max_anchors,
        min_anchor_size=a.min_anchor_size,
        min_training_patches=a.min_training_patches,
        use_target_epoch=a.use_target_epoch,
        max_patches_per_image=a.max_patches_per_image,
        max_patches_per_level=a.max_patches_per_level,
        inference_level=a.inference_level,
    )


def static_budgets(cfg: ModelConfig) -> Budgets:
    """The fixed budgets of the static mode: ``anchor_generator.static_patches_per_level`` patch slots per
    image and probed level, ``anchor_generator.max_anchors`` query slots."""
    a = cfg.anchor_generator
    return Budgets(patches_per_level=a.static_patches_per_level, queries=a.max_anchors)


def build_neck(cfg: ModelConfig, backbone: Backbone) -> nn.Module:
    """The FPN (ASAG-A/S) or the deformable encoder on C3..C5 (ASAG-D)."""
    if not is_deformable(cfg):
        return Neck(backbone.out_channels, cfg.neck.out_channels)
    d = cfg.decoder
    return DeformableEncoder(
        backbone.out_channels[1:], dim=cfg.neck.out_channels, num_layers=d.encoder_layers,
        num_heads=d.attention_heads, num_points=d.deformable_points, ffn_dim=d.encoder_ffn_dim,
        dropout=d.dropout, strides=ENCODER_STRIDES,
    )


def build_decoder_stage(cfg: ModelConfig) -> nn.Module:
    d = cfg.decoder
    if d.type == "adamixer":
        return AdaMixerStage(
            hidden_dim=cfg.hidden_dim, num_classes=cfg.num_classes, num_heads=d.attention_heads,
            ffn_dim=d.ffn_dim, in_points=d.in_points, out_points=d.out_points, n_groups=d.n_groups,
            strides=RESNET_STRIDES,
        )
    if d.type == "sparse_rcnn":
        return SparseRCNNStage(
            hidden_dim=cfg.hidden_dim, num_classes=cfg.num_classes, num_heads=d.attention_heads,
            ffn_dim=d.ffn_dim, dim_dynamic=d.dim_dynamic, roi_size=d.roi_size,
            sampling_ratio=d.sampling_ratio, strides=RESNET_STRIDES, roi_pooling=cfg.roi_pooling,
        )
    if d.type == "deformable":
        return DeformableStage(
            hidden_dim=cfg.hidden_dim, num_classes=cfg.num_classes, num_heads=d.attention_heads,
            ffn_dim=d.ffn_dim, num_points=d.deformable_points, strides=ENCODER_STRIDES, dropout=d.dropout,
        )
    raise NotImplementedError(f"decoder type {d.type!r} is not available yet")


def build_model(config: Config) -> ASAG:
    """Build the detector of ``config`` (``model`` and ``denoising`` sections; random initialisation
    except the backbone's optional ImageNet weights). The whole configuration is required so that
    denoising training can never be dropped by leaving an argument out."""
    if not isinstance(config, Config):
        raise TypeError(f"build_model takes the whole Config (model and denoising), got "
                        f"{type(config).__name__}; pass cfg, not cfg.model")
    cfg, denoising = config.model, config.denoising
    backbone = build_backbone(cfg)
    neck = build_neck(cfg, backbone)
    proposal = ProposalStage(
        hidden_dim=cfg.hidden_dim, num_classes=cfg.num_classes, num_heads=cfg.proposal.num_heads,
        ffn_dim=cfg.proposal.ffn_dim, roi_size=cfg.proposal.roi_size,
        sampling_ratio=cfg.proposal.sampling_ratio, strides=feature_strides(cfg), roi_pooling=cfg.roi_pooling,
    )
    heads = [build_decoder_stage(cfg) for _ in range(cfg.decoder.num_heads)]
    decoder = ParallelHeads(heads, cfg.hidden_dim)
    p = cfg.postprocess
    postprocessor = PostProcessor(topk=p.topk, nms=p.nms, nms_threshold=p.nms_threshold)
    model = ASAG(
        backbone=backbone,
        neck=neck,
        anchor_generator=build_anchor_generator(cfg),
        proposal=proposal,
        decoder=decoder,
        postprocessor=postprocessor,
        attention_heads=cfg.proposal.num_heads,
        num_dn=denoising.num_queries if denoising.enabled else 0,
        dn_noise_scale=denoising.noise_scale if denoising.fix_noise_scale else 0.8,
        dn_noise_decay=0.0 if denoising.fix_noise_scale else 0.04,
        used_head=head_index(cfg.decoder.used_head, cfg.decoder.num_heads),
        anchor_levels=ENCODER_ANCHOR_LEVELS if is_deformable(cfg) else FPN_ANCHOR_LEVELS,
        neck_uses_image_sizes=is_deformable(cfg),
        frozen_parts=FREEZE_CHOICES[config.finetune.freeze],
        static_budgets=static_budgets(cfg),
        static=cfg.static,
    )
    return model


def init_model(model: ASAG, config: Config, label_map: LabelMap) -> InitReport | None:
    """Load ``config.finetune.init`` into the freshly built ``model`` for the data set's classes
    ``label_map`` (:mod:`asag.engine.finetune`); None when no starting checkpoint is set."""
    ft = config.finetune
    if not ft.init:
        return None
    source = read_init_source(ft.init)
    no_weights = dataclasses.replace(config.model, backbone=dataclasses.replace(config.model.backbone,
                                                                                 weights=None))

    def build(num_classes: int) -> ASAG:
        model_cfg = dataclasses.replace(no_weights, num_classes=num_classes)
        return build_model(dataclasses.replace(config, model=model_cfg))

    axes = class_axes(build, config.model.num_classes)
    return initialize_from(model, source, label_map, axes, allow_partial=ft.allow_partial)


def build_criterion(cfg: Config) -> nn.Module:
    """The training objective (spec 8) from the matcher, loss and patch-size settings."""
    from asag.training.criterion import SetCriterion

    m, loss = cfg.matcher, cfg.loss
    return SetCriterion(
        num_classes=cfg.model.num_classes,
        cost_class=m.cost_class,
        cost_bbox=m.cost_bbox,
        cost_giou=m.cost_giou,
        focal_alpha=m.focal_alpha,
        focal_gamma=m.focal_gamma,
        ce_coef=loss.ce,
        bbox_coef=loss.bbox,
        giou_coef=loss.giou,
        other_coef=loss.other,
        anchor_coef=loss.anchor,
        anchor_ce_coef=loss.anchor_ce,
        anchor_bbox_coef=loss.anchor_bbox,
        anchor_giou_coef=loss.anchor_giou,
        area_weight=loss.area_weight,
        gamma1=loss.gamma1,
        gamma2=loss.gamma2,
        patch_size=cfg.model.anchor_generator.patch_size,
        fix_p6_flip_targets=loss.fix_p6_flip_targets,
    )


# ------------------------------------------------------------------------------------------ data


def data_files(cfg: DataConfig, split: str) -> tuple[Path, Path]:
    """``(annotation JSON, image folder)`` of ``split`` (``"train"`` or ``"val"``): the four file fields
    under ``root`` for the coco format, the fixed layout of :func:`synthetic_paths` for the synthetic one
    (which reads no file field; :func:`asag.config.check_data_fields` refuses them there)."""
    if cfg.format == "synthetic":
        paths = synthetic_paths(cfg.root)
        if split == "train":
            return paths.train_json, paths.train_images
        return paths.val_json, paths.val_images
    root = Path(cfg.root)
    if split == "train":
        return root / cfg.train_annotations, root / cfg.train_images
    return root / cfg.val_annotations, root / cfg.val_images


def synth_command(cfg: DataConfig) -> str:
    """The ``asag data synth`` command line that generates the synthetic data set ``cfg`` describes."""
    classes = "" if cfg.synthetic_classes is None else f" --classes {','.join(cfg.synthetic_classes)}"
    return (f"asag data synth --out {cfg.root} --images {cfg.synthetic_train_images} --val-images "
            f"{cfg.synthetic_val_images} --seed {cfg.synthetic_seed}{classes}")


def prepare_synthetic(cfg: DataConfig, log=print) -> None:
    """Generate the synthetic data set into ``cfg.root`` unless it is already there. Only ``asag demo``
    (and ``asag data synth``) generate data; elsewhere a missing data set is an error
    (:func:`build_dataset`). A data set already there is reused only if its categories are the
    configured classes (``DataError`` otherwise: it was generated with other ``data.synthetic_classes``)."""
    paths = synthetic_paths(cfg.root)
    classes = check_classes(cfg.synthetic_classes, "data.synthetic_classes")
    if paths.train_json.is_file() and paths.val_json.is_file():
        categories = load_coco_json(paths.train_json)["categories"]
        found = LabelMap.from_categories(categories, str(paths.train_json))
        if found.names != classes:
            raise DataError(
                f"{paths.train_json}: the data set there has the classes {','.join(found.names)}, not "
                f"data.synthetic_classes={','.join(classes)}; remove {paths.root} (or choose another folder) "
                f"to generate it anew")
        return
    log(f"generating the synthetic data set in {paths.root} ({cfg.synthetic_train_images} train / "
        f"{cfg.synthetic_val_images} val images, seed {cfg.synthetic_seed}, classes {','.join(classes)})")
    generate_synthetic(paths.root, cfg.synthetic_train_images, cfg.synthetic_seed,
                       val_images=cfg.synthetic_val_images, classes=classes)


def build_transforms(cfg: DataConfig, train: bool) -> DetectionTransform:
    if not train or cfg.augmentation == "none":
        return build_eval_transforms(cfg.val_size, cfg.val_max_size)
    crop = None
    if cfg.augmentation == "3x":
        crop = CropSpec(pre_scales=tuple(cfg.crop_scales), min_size=cfg.crop_size[0],
                        max_size=cfg.crop_size[1], final_max_size=cfg.crop_max_size)
    return build_train_transforms(cfg.train_scales, cfg.train_max_size, crop=crop)


def build_dataset(cfg: DataConfig, split: str) -> CocoDetection:
    """The COCO-format data set of ``split`` with its transforms (training filter on for ``train``)."""
    ann_file, image_dir = data_files(cfg, split)
    if not ann_file.is_file():
        hint = ""
        if cfg.format == "synthetic":  # never generated behind the user's back (a mistyped root)
            hint = (f"; to generate the synthetic data set there: {synth_command(cfg)}; for other "
                    f"COCO-format files: data.format=coco with data.{split}_annotations and "
                    f"data.{split}_images")
        raise DataError(f"{ann_file}: annotation file not found (data.root={cfg.root!r}){hint}")
    train = split == "train"
    return CocoDetection(ann_file, image_dir, build_transforms(cfg, train), training_filter=train,
                         min_side=cfg.min_image_side)


def build_loader(dataset: Dataset, cfg: DataConfig, train: bool, seed: int = 0) -> DataLoader:
    """Training: shuffled, distributed-aware batches dropping the last incomplete one, each sample's
    order and augmentation a function of ``seed``, epoch and position only, whatever ``data.num_workers``
    (:func:`~asag.engine.distributed.build_train_loader`); evaluation: this rank's share in order."""
    if train:
        return build_train_loader(dataset, batch_size=cfg.batch_size, seed=seed, num_workers=cfg.num_workers,
                                  collate_fn=collate)
    return DataLoader(dataset, batch_size=cfg.val_batch_size, sampler=build_eval_sampler(dataset),
                      **loader_options(num_workers=cfg.num_workers, seed=seed, collate_fn=collate))


def check_annotated(dataset: CocoDetection) -> None:
    """Refuse to evaluate on a data set without a single (non-crowd) box: AP, recall and mMR would be
    undefined (pycocotools reports -1), after a full pass of the model."""
    if int(dataset.index.num_boxes()[dataset.positions].sum()) == 0:
        raise DataError(
            f"{dataset.ann_file}: none of its {len(dataset)} images has an annotated box (iscrowd 0), so "
            f"AP is undefined (pycocotools would print -1). Evaluate on annotated images; `asag predict` "
            f"gives detections without annotations; in training, runtime.eval_every=0 turns evaluation off"
        )


def check_num_classes(cfg: ModelConfig, label_map: LabelMap, source: str) -> None:
    if len(label_map) != cfg.num_classes:
        raise ConfigError(
            f"{source} has {len(label_map)} categories but model.num_classes={cfg.num_classes}; "
            f"set model.num_classes={len(label_map)}"
        )


# --------------------------------------------------------------------------------------- training


def build_optimizer_and_schedule(model: nn.Module, cfg: ScheduleConfig):
    optimizer = build_optimizer(model, lr=cfg.lr, backbone_lr=cfg.backbone_lr, weight_decay=cfg.weight_decay,
                                kernel=cfg.optimizer_kernel)
    scheduler = WarmupMultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma,
                                  warmup_iters=cfg.warmup_iters, warmup_start_factor=cfg.warmup_factor)
    return optimizer, scheduler


def build_trainer(cfg: Config, *, model: nn.Module | None = None, device: torch.device | str = "cpu",
                  amp: str | None = None, channels_last: bool | None = None) -> Trainer:
    """A :class:`~asag.engine.trainer.Trainer` for ``cfg``: the model (built here unless given; moved to
    ``device``), criterion, AdamW and warm-up schedule, clipping and memory layout of the configuration.
    ``amp``: None (fp32), ``"bf16"`` or ``"fp16"`` (resolve ``runtime.amp`` first, as ``asag train`` does);
    ``runtime.amp_scope`` decides what it covers. ``channels_last``: the layout (None:
    ``runtime.memory_format`` for ``amp`` on ``device``; ``probe`` follows ``auto``'s rule here, only
    ``asag train`` probes: ``asag.commands.train.training_layout``)."""
    model = (model if model is not None else build_model(cfg)).to(device)
    set_amp_scope(model, cfg.runtime.amp_scope)
    optimizer, scheduler = build_optimizer_and_schedule(model, cfg.schedule)
    if channels_last is None:
        channels_last = use_channels_last(cfg.runtime.memory_format, device, amp)
    return Trainer(model, build_criterion(cfg).to(device), optimizer, scheduler, device=device, amp=amp,
                   clip_max_norm=cfg.schedule.clip_max_norm, channels_last=channels_last)
