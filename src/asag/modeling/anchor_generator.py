"""The Anchor Generator: adaptive sparse anchors from P5/P6, refined by probing P4 and P3 (spec section 3).

The network (compression, P6, the coarse and patch predictors) and the order of the stages live here; the
choice of candidates, patches and output anchors is :mod:`asag.modeling.anchor_selection`, the training
patches (spec 3.7) are :mod:`asag.training.patch_sampling`. Data flow for a batch of ``B`` images
(``d`` = FPN width, ``c`` = ``compress_dim``, ``P`` = patch size):

1. *Coarse stage* (spec 3.3): ``compress[2](P5)``, the valid region resized to ``2P x 2P``, four
   ``P x P`` crops plus a stride-2 ``P6`` map -> ``proj_all`` -> ``K1`` anchors per crop / P6 map:
   ``[B, 5 * K1, 5]``.
2. *Adaptive probing* (spec 3.4), per level P4 then P3: mid-confidence small anchors become candidates;
   fixed-size squares around them go through a per-image NMS; each kept square becomes a ``P x P`` patch,
   whose tokens go through ``proj_patch`` -> ``K2`` anchors per patch: ``[n_patches, K2, 5]``.
3. *Output selection* (spec 3.5): per stage the confident anchors that were not sent for refinement,
   concatenated per image, capped at ``max_anchors`` and padded with the full-image box: ``[B, Q, 4]``.

The :class:`~asag.modeling.budgets.Budgets` passed to :meth:`AnchorGenerator.forward` size the patch
slots of every probed level and the ``Q`` query slots: from the data (one host read per level and one
for ``Q``; the release's result; the early stop is a level with no patch), or from the configuration
(fixed shapes, no host read; empty slots and the early stop are masks). Training (``self.training`` and
targets given) adds flipped P6 copies, ground-truth patches and the epoch-0 teacher forcing of spec 3.7.
Patches never loop in Python: cutting, predicting and decoding are batched over all patches of all images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asag.errors import ConfigError
from asag.modeling.anchor_selection import (
    ANCHOR_FIELDS,
    StageAnchors,
    StageSelection,
    choose_patches,
    pack_queries,
    refinement_candidates,
    select_output,
)
from asag.modeling.blocks import MLP, init_xavier
from asag.modeling.budgets import DATA_BUDGETS, Budgets
from asag.modeling.patches import (
    anchors_to_pixels,
    bilinear_resize_weights,
    crop_offsets,
    crops_to_image_frame,
    extract_patch_tokens,
    maps_to_tokens,
    pad_to_patch,
    patches_to_image_frame,
    split_into_crops,
    valid_region_cells,
)
from asag.structures import AnchorOutput, ImageTargets, PatchPredictions, PatchSet
from asag.training.patch_sampling import training_patches

# Loop index at which probing stops for each inference level (spec 3.4 step 1): 1 = before P4, 2 = before
# P3, 3 = never.
INFERENCE_LEVEL_STOP = {"P5P6": 1, "P4P6": 2, "P3P6": 3}
# Probed levels in loop order: (loop index, index into the [P3, P4, P5] inputs, level name) (spec 3.4).
PROBE_ORDER = ((1, 1, "P4"), (2, 0, "P3"))
# Index of P5 in the inputs and of the shared coarse LayerNorm / positional table (spec 3.2).
P5_INDEX = 2
COARSE_TABLE = 0
# The authors' AG MLPs: hidden width 125 * compress_dim, three linears (spec 3.1 / 3.2).
MLP_HIDDEN_PER_CHANNEL = 125
MLP_LAYERS = 3
# Crops tiling the resized P5 map (spec 3.3 step 5).
NUM_CROPS = 4
# Keys of ``AnchorOutput.budget_bound``.
BUDGET_KEYS = ("P4", "P3", "queries")
STATIC_TRAINING_ERROR = ("static mode is for inference only (fixed budgets, no training behaviour): train "
                         "with model.static=false and switch static mode on for inference")


class AnchorGenerator(nn.Module):
    """Adaptive Sparse Anchor Generation (spec section 3).

    Submodule names follow the authors' state dict (``compress.k.{0,2}``, ``P6``, ``layernorm.k``,
    ``pos_embedding.k``, ``proj_all.layers.j``, ``proj_patch.layers.j``), so official weights load by
    prefix alone.

    Args:
        in_channels: FPN width ``d`` of P3..P5 (256; the fixtures use 64).
        compress_dim: channels after compression (authors' default 8).
        compress_hidden_dim: width between the two compression convs (authors: ``d / 2``, i.e. 128).
        mlp_hidden_dim: hidden width of ``proj_all`` / ``proj_patch`` (authors: ``125 * compress_dim``).
        num_anchors_coarse: anchors per P5 crop / P6 map (``num_pred_anchor1``, 50; 150 for 300 queries).
        num_anchors_patch: anchors per P4/P3 patch (``num_pred_anchor2``, 20; 50 for 300 queries).
        interpolate_size: side of the resized P5 map (30, hard-coded by the authors; must be 2 * patch).
        patch_size: patch side in cells (15).
        strides: strides of the inputs P3, P4, P5 (8, 16, 32).
        threshold_low, threshold_high: confidence window of refinement candidates (0.1, 0.7).
        patch_nms_threshold: IoU of the patch-selection and GT-patch NMS (0.25).
        score_threshold: minimum confidence of an output anchor (``use_anchor_threshold``, 0.1).
        min_anchors: per image, the coarse stage outputs at least this many anchors (5).
        max_anchors: per image cap on output anchors (200).
        min_anchor_size: anchors narrower or lower than this (pixels) get confidence 0 (3, hard-coded).
        min_training_patches: training patches per image and probed level (4, hard-coded).
        use_target_epoch: epochs of ground-truth teacher forcing (1).
        max_patches_per_image: cap on predicted patches per image and level (None; CrowdHuman preset 60).
        max_patches_per_level: the same cap as a speed option (None; the release's speed path used 15).
        inference_level: default probing depth ``"P3P6"``, ``"P4P6"`` or ``"P5P6"``.
    """

    def __init__(
        self,
        in_channels: int = 256,
        compress_dim: int = 8,
        compress_hidden_dim: int | None = None,
        mlp_hidden_dim: int | None = None,
        num_anchors_coarse: int = 50,
        num_anchors_patch: int = 20,
        interpolate_size: int = 30,
        patch_size: int = 15,
        strides: tuple[int, int, int] = (8, 16, 32),
        threshold_low: float = 0.1,
        threshold_high: float = 0.7,
        patch_nms_threshold: float = 0.25,
        score_threshold: float = 0.1,
        min_anchors: int = 5,
        max_anchors: int = 200,
        min_anchor_size: float = 3.0,
        min_training_patches: int = 4,
        use_target_epoch: int = 1,
        max_patches_per_image: int | None = None,
        max_patches_per_level: int | None = None,
        inference_level: str = "P3P6",
    ):
        super().__init__()
        if interpolate_size != 2 * patch_size:
            raise ValueError("interpolate_size must be 2 * patch_size: four crops tile the resized P5 map")
        _check_level(inference_level)
        hidden = compress_hidden_dim or in_channels // 2
        mlp_hidden = mlp_hidden_dim or MLP_HIDDEN_PER_CHANNEL * compress_dim
        tokens = patch_size * patch_size
        self.compress = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, compress_dim, 3, padding=1)
            )
            for _ in strides
        )
        # P6: 2P x 2P -> P x P (kernel 3, stride 2, padding 2, dilation 2; spec 3.2).
        self.P6 = nn.Conv2d(compress_dim, compress_dim, 3, stride=2, padding=2, dilation=2)
        self.layernorm = nn.ModuleList(nn.LayerNorm((tokens, compress_dim)) for _ in strides)
        self.pos_embedding = nn.ModuleList(nn.Embedding(tokens, compress_dim) for _ in strides)
        in_dim = tokens * compress_dim
        self.proj_all = MLP(in_dim, mlp_hidden, ANCHOR_FIELDS * num_anchors_coarse, MLP_LAYERS)
        self.proj_patch = MLP(in_dim, mlp_hidden, ANCHOR_FIELDS * num_anchors_patch, MLP_LAYERS)

        self.num_anchors_coarse = num_anchors_coarse
        self.num_anchors_patch = num_anchors_patch
        self.interpolate_size = interpolate_size
        self.patch_size = patch_size
        self.strides = tuple(strides)
        self.threshold_low = threshold_low
        self.threshold_high = threshold_high
        self.patch_nms_threshold = patch_nms_threshold
        self.score_threshold = score_threshold
        self.min_anchors = min_anchors
        self.max_anchors = max_anchors
        self.min_anchor_size = min_anchor_size
        self.min_training_patches = min_training_patches
        self.use_target_epoch = use_target_epoch
        caps = [c for c in (max_patches_per_image, max_patches_per_level) if c is not None]
        self.patch_cap = min(caps) if caps else None
        self.inference_level = inference_level
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: Xavier-uniform for every >1-D parameter (the (P*P, c) LayerNorm affine
        included, spec 13 item 5), PyTorch defaults for biases, zero positional tables."""
        init_xavier(self)
        for table in self.pos_embedding:
            nn.init.zeros_(table.weight)

    # ------------------------------------------------------------------------------------ forward

    def forward(
        self,
        features: list[Tensor],
        image_sizes: Tensor,
        targets: list[ImageTargets] | None = None,
        epoch: int = 0,
        inference_level: str | None = None,
        budgets: Budgets = DATA_BUDGETS,
    ) -> AnchorOutput:
        """Generate anchors.

        Args:
            features: ``[P3, P4, P5]``, each ``[B, d, H_l, W_l]`` of the zero-padded batch.
            image_sizes: ``[B, 2]`` int64 ``(h, w)`` of the unpadded images (pixels).
            targets: ground truth; with ``self.training`` it enables the training behaviour of spec 3.7.
            epoch: current epoch (teacher forcing while ``epoch < use_target_epoch``).
            inference_level: per-call override of the probing depth (``P3P6 | P4P6 | P5P6``).
            budgets: patch and query slots (module docstring); training needs them from the data.
        Returns:
            :class:`AnchorOutput`: ``boxes [B, Q, 4]`` pixel cxcywh (padding = full-image box),
            ``valid_mask [B, Q]``, per-level ``patch_predictions`` and the stages' output anchors.
        """
        train = self.training and targets is not None
        if train and not budgets.from_data:
            raise ConfigError(STATIC_TRAINING_ERROR)
        teacher = train and epoch < self.use_target_epoch
        stop = INFERENCE_LEVEL_STOP[_check_level(inference_level or self.inference_level)]
        image_sizes = image_sizes.to(features[0].device)
        image_wh = image_sizes.flip(-1).to(features[0].dtype)  # [B, 2] (w, h)
        num_images = len(image_wh)
        predictions, current = self._coarse_stage(features[P5_INDEX], image_sizes, image_wh, train)
        selections: list[StageSelection] = []
        unbound = torch.zeros(num_images, dtype=torch.bool, device=image_wh.device)
        bound = dict.fromkeys(BUDGET_KEYS, unbound)
        for step, level, name in PROBE_ORDER:
            if step == stop:
                break
            stride = self.strides[level]
            candidates, patches = None, None  # teacher forcing: nothing refined, GT patches only
            if not teacher:
                candidates = refinement_candidates(current, stride, self.patch_size, self.threshold_low,
                                                   self.threshold_high)
                patches, bound[name] = choose_patches(
                    current, candidates, image_wh, stride, self.patch_size, self.patch_nms_threshold,
                    self.patch_slots(budgets), self.patch_cap)
                if not train and len(patches) == 0:  # early stop: no candidate in any image
                    break
            selections.append(select_output(current, candidates, self.score_threshold, self.min_anchors,
                                            num_images))
            if train:
                patches = self._training_patches(patches, targets, image_wh, stride)
            prediction, current = self._probe(features[level], level, step, name, patches, image_wh)
            predictions.append(prediction)
        selections.append(select_output(current, None, self.score_threshold, self.min_anchors, num_images))
        packed = pack_queries(selections, image_sizes, self.max_anchors, budgets.queries)
        bound["queries"] = packed.bound
        return AnchorOutput(predictions, packed.boxes, packed.valid, packed.output,
                            budget_bound=None if budgets.from_data else bound)

    def patch_slots(self, budgets: Budgets) -> int | None:
        """Patch slots per image and probed level under ``budgets`` (capped like the data-sized patches by
        ``max_patches_per_*``); None: from the data."""
        slots = budgets.patches_per_level
        return slots if slots is None or self.patch_cap is None else min(slots, self.patch_cap)

    # ------------------------------------------------------------------------------- coarse stage

    def _predict(self, tokens: Tensor, table: int, mlp: MLP, num_anchors: int) -> Tensor:
        """``[..., P*P, c]`` tokens -> ``[..., K, 5]``: sigmoid (patch-frame) cxcywh, raw logit."""
        x = self.layernorm[table](tokens) + self.pos_embedding[table].weight  # [..., P*P, c]
        out = mlp(x.flatten(-2)).unflatten(-1, (num_anchors, ANCHOR_FIELDS))  # [..., K, 5]
        return torch.cat([out[..., :4].sigmoid(), out[..., 4:]], dim=-1)

    def _resize_p5(self, f5: Tensor, image_sizes: Tensor) -> Tensor:
        """``[B, c, H5, W5]`` -> ``[B, c, I, I]``: each image's valid region, bilinearly resized."""
        valid = valid_region_cells(image_sizes, self.strides[P5_INDEX], tuple(f5.shape[-2:]))  # [B, 2]
        rows = bilinear_resize_weights(valid[:, 0], f5.shape[-2], self.interpolate_size).to(f5)  # [B, I, H5]
        cols = bilinear_resize_weights(valid[:, 1], f5.shape[-1], self.interpolate_size).to(f5)  # [B, I, W5]
        return rows[:, None] @ f5 @ cols[:, None].transpose(-1, -2)  # [B, c, I, I]

    def _coarse_stage(
        self, p5: Tensor, image_sizes: Tensor, image_wh: Tensor, train: bool
    ) -> tuple[list[PatchPredictions], StageAnchors]:
        """P5 crops and the P6 map (spec 3.3); in training P6 also runs flipped (spec 3.7 item 1)."""
        grid = self._resize_p5(self.compress[P5_INDEX](p5), image_sizes)  # [B, c, I, I]
        p6 = self.P6(F.relu(grid))  # [B, c, P, P]
        # training: original, h-flip, v-flip, hv-flip -> [B, 4, c, P, P]; otherwise [B, 1, c, P, P]
        p6 = torch.stack([p6, p6.flip(-1), p6.flip(-2), p6.flip(-2, -1)], dim=1) if train else p6[:, None]
        maps = torch.cat([split_into_crops(grid, self.patch_size), p6], dim=1)  # [B, 4 + n6, c, P, P]
        raw = self._predict(maps_to_tokens(maps), COARSE_TABLE, self.proj_all, self.num_anchors_coarse)
        batch_idx = torch.arange(len(image_wh), device=p5.device)
        offsets = crop_offsets(self.patch_size, p5.device)
        predictions = [
            PatchPredictions("P6", raw[:, NUM_CROPS:], batch_idx),
            PatchPredictions("P5", raw[:, :NUM_CROPS], batch_idx, crop_pos=offsets),
        ]
        anchors = self._decode_coarse(raw.detach(), offsets, image_wh)  # [B, 5 * K1, 5]
        every_row = torch.ones_like(batch_idx, dtype=torch.bool)
        return predictions, StageAnchors(anchors, batch_idx, True, every_row)

    def _decode_coarse(self, raw: Tensor, offsets: Tensor, image_wh: Tensor) -> Tensor:
        """``[B, 4 + n6, K1, 5]`` raw -> ``[B, 5 * K1, 5]`` pixel anchors ordered crop0..crop3, P6."""
        size, patch = self.interpolate_size, self.patch_size
        crops = crops_to_image_frame(raw[:, :NUM_CROPS, :, :4], offsets, size, patch)  # [B, 4, K1, 4]
        boxes = torch.cat([crops, raw[:, NUM_CROPS : NUM_CROPS + 1, :, :4]], dim=1)  # [B, 5, K1, 4]
        logits = raw[:, : NUM_CROPS + 1, :, 4]  # [B, 5, K1]
        boxes, logits = boxes.flatten(1, 2), logits.flatten(1)  # [B, 5 * K1, 4], [B, 5 * K1]
        return anchors_to_pixels(boxes, logits, image_wh, self.min_anchor_size, check_boundary=False)

    # ---------------------------------------------------------------------------------- probing

    def _training_patches(self, predicted: PatchSet | None, targets: list[ImageTargets], image_wh: Tensor,
                          stride: int) -> PatchSet:
        """The predicted patches (None while teacher forcing) plus the GT-derived / random patches of
        spec 3.7."""
        with torch.no_grad():
            return training_patches(predicted, targets, image_wh, stride, self.patch_size,
                                    self.patch_nms_threshold, self.min_training_patches)

    def _probe(
        self, feature: Tensor, level: int, step: int, name: str, patches: PatchSet, image_wh: Tensor,
    ) -> tuple[PatchPredictions, StageAnchors]:
        """Cut the patches from ``compress[level](feature)``, predict ``[N, K2, 5]`` and decode them; the
        next stage ignores the empty slots and the loss-only patches (``row_valid``)."""
        stride = self.strides[level]
        fmap = pad_to_patch(self.compress[level](feature), self.patch_size)  # [B, c, >=P, >=P]
        tokens = extract_patch_tokens(fmap, patches.batch_idx, patches.crop_pos, self.patch_size)
        raw = self._predict(tokens, step, self.proj_patch, self.num_anchors_patch)  # [N, K2, 5]
        prediction = PatchPredictions(
            name, raw, patches.batch_idx, crop_pos=patches.crop_pos, loss_only=patches.loss_only,
            stride=stride, valid=patches.valid,
        )
        wh = image_wh[patches.batch_idx]  # [N, 2]
        boxes = patches_to_image_frame(raw.detach()[..., :4], patches.crop_pos, wh, stride, self.patch_size)
        logits = raw.detach()[..., 4]  # [N, K2]
        anchors = anchors_to_pixels(boxes, logits, wh, self.min_anchor_size, check_boundary=True)
        real = ~patches.loss_only if patches.valid is None else patches.valid & ~patches.loss_only  # [N]
        return prediction, StageAnchors(anchors, patches.batch_idx, False, real)


# ---------------------------------------------------------------------------------- pure helpers


def _check_level(level: str) -> str:
    if level not in INFERENCE_LEVEL_STOP:
        raise ValueError(f"inference_level must be one of {sorted(INFERENCE_LEVEL_STOP)}, got {level!r}")
    return level
