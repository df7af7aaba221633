"""The only code that reads the configuration: config -> modules, criterion, optimizer, data.

Everything built here takes plain, typed arguments; see :mod:`asag.config` for the fields.
"""

from __future__ import annotations

from torch import nn

from asag.config import Config, DenoisingConfig, LossConfig, MatcherConfig, ModelConfig
from asag.convert.official import head_index
from asag.modeling.anchor_generator import AnchorGenerator
from asag.modeling.backbone import RESNET_STRIDES, Backbone
from asag.modeling.decoders.adamixer import AdaMixerStage
from asag.modeling.decoders.parallel import ParallelHeads
from asag.modeling.decoders.sparse_rcnn import SparseRCNNStage
from asag.modeling.detector import ASAG
from asag.modeling.neck import Neck
from asag.modeling.postprocess import PostProcessor
from asag.modeling.proposal import ProposalStage

# The anchor generator reads P3, P4, P5 (spec 3.1); the proposal stage and decoders read P2..P5.
ANCHOR_STRIDES = (8, 16, 32)


def build_backbone(cfg: ModelConfig) -> Backbone:
    b = cfg.backbone
    backbone = Backbone(b.name, trainable_layers=b.trainable_layers, freeze_bn_affine=b.freeze_bn_affine,
                        eps=b.frozen_bn_eps)
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
            sampling_ratio=d.sampling_ratio, strides=RESNET_STRIDES,
        )
    raise NotImplementedError(f"decoder type {d.type!r} is not available yet")


def build_model(cfg: ModelConfig, denoising: DenoisingConfig | None = None) -> ASAG:
    """Build the detector (random initialisation except the backbone's optional ImageNet weights)."""
    denoising = denoising or DenoisingConfig()
    backbone = build_backbone(cfg)
    neck = Neck(backbone.out_channels, cfg.neck.out_channels)
    proposal = ProposalStage(
        hidden_dim=cfg.hidden_dim, num_classes=cfg.num_classes, num_heads=cfg.proposal.num_heads,
        ffn_dim=cfg.proposal.ffn_dim, roi_size=cfg.proposal.roi_size,
        sampling_ratio=cfg.proposal.sampling_ratio, strides=RESNET_STRIDES,
    )
    heads = [build_decoder_stage(cfg) for _ in range(cfg.decoder.num_heads)]
    decoder = ParallelHeads(heads, cfg.hidden_dim)
    p = cfg.postprocess
    postprocessor = PostProcessor(topk=p.topk, nms=p.nms, nms_threshold=p.nms_threshold)
    return ASAG(
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
    )


def build_criterion(cfg: Config) -> nn.Module:
    from asag.training.criterion import SetCriterion

    return SetCriterion(**criterion_arguments(cfg.model.num_classes, cfg.matcher, cfg.loss))


def criterion_arguments(num_classes: int, m: MatcherConfig, loss: LossConfig) -> dict:
    return dict(
        num_classes=num_classes,
        cost_class=m.cost_class,
        cost_bbox=m.cost_bbox,
        cost_giou=m.cost_giou,
        focal_alpha=m.focal_alpha,
        focal_gamma=m.focal_gamma,
        loss_ce=loss.ce * loss.other,
        loss_bbox=loss.bbox * loss.other,
        loss_giou=loss.giou * loss.other,
        anchor_ce=loss.anchor_ce * loss.anchor,
        anchor_bbox=loss.anchor_bbox * loss.anchor,
        anchor_giou=loss.anchor_giou * loss.anchor,
        area_weight=loss.area_weight,
        gamma1=loss.gamma1,
        gamma2=loss.gamma2,
        fix_p6_flip_targets=loss.fix_p6_flip_targets,
    )
