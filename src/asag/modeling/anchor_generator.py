"""The Anchor Generator: adaptive sparse anchors from P5/P6, refined by probing P4 and P3 (spec section 3).

Data flow for a batch of ``B`` images (``d`` = FPN width, ``c`` = ``compress_dim``, ``P`` = patch size):

1. *Coarse stage* (spec 3.3): ``compress[2](P5)``, the valid region resized to ``2P x 2P``, four
   ``P x P`` crops plus a stride-2 ``P6`` map -> ``proj_all`` -> ``K1`` anchors per crop / P6 map.
2. *Adaptive probing* (spec 3.4): mid-confidence small anchors become candidates; fixed-size squares
   around them go through a per-image NMS; each kept square becomes a ``P x P`` patch on P4 (then P3),
   whose tokens go through ``proj_patch`` -> ``K2`` anchors per patch.
3. *Output selection* (spec 3.5): per stage the confident anchors that were not sent for refinement,
   concatenated per image, capped at ``max_anchors`` and padded with the full-image box.

Training (``self.training`` and targets given) adds flipped P6 copies, ground-truth patches and the
epoch-0 teacher forcing of spec 3.7. Patches never loop in Python: cutting, predicting and decoding are
batched over all patches of all images. In evaluation the host reads device values only where a size
depends on them: per probed level the candidate positions (which also decide the early stop) and the
patch NMS, and once for all stages the output count and ``Q`` (docs/inference.md).

*Static mode* (``static=True``, inference only) fixes every shape by the input size and two budgets:
per image and probed level ``static_patches_per_level`` patch slots chosen by a fixed-length greedy
NMS (:func:`asag.ops.nms.fixed_budget_nms`), and ``max_anchors`` output columns. Empty slots and the
early stop become masks (``StageAnchors.row_valid``), so the forward reads nothing back from the
device; where no budget binds the output anchors equal the dynamic mode's (docs/inference.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from asag.errors import ConfigError
from asag.modeling.anchor_selection import (
    ANCHOR_FIELDS,
    PackedAnchors,
    StageAnchors,
    StageGroups,
    StageSelection,
    _static_groups,
    capped_slots,
    flatten_selections,
    rank_static_selections,
)
from asag.modeling.blocks import MLP, init_xavier
from asag.modeling.patches import (
    anchor_patch_positions,
    anchors_to_pixels,
    bilinear_resize_weights,
    count_per_group,
    crop_offsets,
    crops_to_image_frame,
    extract_patch_tokens,
    finite_or_zero,
    maps_to_tokens,
    pad_to_patch,
    patches_to_image_frame,
    rank_in_group,
    split_into_crops,
    square_boxes_xyxy,
    valid_region_cells,
)
from asag.ops.boxes import full_image_boxes_cxcywh_px
from asag.ops.nms import fixed_budget_nms
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
# Static mode: default patch slots per image and probed level (the release's speed path kept at most
# 15 patches per level; measured in docs/inference.md) and the keys of ``AnchorOutput.budget_bound``.
STATIC_PATCHES_PER_LEVEL = 15
BUDGET_KEYS = ("P4", "P3", "queries")


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
        static: fixed shapes and no host reads (inference only; module docstring, docs/inference.md).
        static_patches_per_level: static mode's patch slots per image and probed level (further capped
            by ``max_patches_per_image`` / ``max_patches_per_level``).
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
        static: bool = False,
        static_patches_per_level: int = STATIC_PATCHES_PER_LEVEL,
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
        self.static = static
        self.static_patches_per_level = static_patches_per_level
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
    ) -> AnchorOutput:
        """Generate anchors.

        Args:
            features: ``[P3, P4, P5]``, each ``[B, d, H_l, W_l]`` of the zero-padded batch.
            image_sizes: ``[B, 2]`` int64 ``(h, w)`` of the unpadded images (pixels).
            targets: ground truth; with ``self.training`` it enables the training behaviour of spec 3.7.
            epoch: current epoch (teacher forcing while ``epoch < use_target_epoch``).
            inference_level: per-call override of the probing depth (``P3P6 | P4P6 | P5P6``).
        Returns:
            :class:`AnchorOutput`: ``boxes [B, Q, 4]`` pixel cxcywh (padding = full-image box),
            ``valid_mask [B, Q]``, per-level ``patch_predictions`` and per-image ``selected`` groups.
        """
        train = self.training and targets is not None
        if self.static and train:
            raise ConfigError("static mode is for inference only: train the model with static off")
        teacher = train and epoch < self.use_target_epoch
        stop = INFERENCE_LEVEL_STOP[_check_level(inference_level or self.inference_level)]
        image_sizes = image_sizes.to(features[0].device)
        image_wh = image_sizes.flip(-1).to(features[0].dtype)  # [B, 2] (w, h)
        predictions, current = self._coarse_stage(features[P5_INDEX], image_sizes, image_wh, train)
        selections: list[StageSelection] = []
        bound: dict[str, Tensor] = {}
        for step, level, name in PROBE_ORDER:
            if step == stop:
                break
            candidates = self._candidates(current, self.strides[level])
            if self.static:
                selections.append(self._select(current, candidates, len(image_wh)))
                patches, valid, bound[name] = self._static_patches(current, candidates, level, image_wh)
                prediction, current = self._probe(features[level], level, step, name, patches, image_wh,
                                                  False, valid)
                predictions.append(prediction)
                continue
            # one host sync per level: the candidates' positions also decide the early stop
            found = None if teacher else candidates.nonzero(as_tuple=True)
            if not train and len(found[0]) == 0:
                break
            selections.append(self._select(current, None if teacher else candidates, len(image_wh)))
            patches = self._choose_patches(current, found, level, image_wh, targets if train else None)
            prediction, current = self._probe(features[level], level, step, name, patches, image_wh, train)
            predictions.append(prediction)
        selections.append(self._select(current, None, len(image_wh)))
        if self.static:
            return self._pack_static(predictions, selections, image_sizes, bound)
        return self._pack(predictions, selections, image_sizes)

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
        return predictions, StageAnchors(anchors, batch_idx, True)

    def _decode_coarse(self, raw: Tensor, offsets: Tensor, image_wh: Tensor) -> Tensor:
        """``[B, 4 + n6, K1, 5]`` raw -> ``[B, 5 * K1, 5]`` pixel anchors ordered crop0..crop3, P6."""
        size, patch = self.interpolate_size, self.patch_size
        crops = crops_to_image_frame(raw[:, :NUM_CROPS, :, :4], offsets, size, patch)  # [B, 4, K1, 4]
        boxes = torch.cat([crops, raw[:, NUM_CROPS : NUM_CROPS + 1, :, :4]], dim=1)  # [B, 5, K1, 4]
        logits = raw[:, : NUM_CROPS + 1, :, 4]  # [B, 5, K1]
        boxes, logits = boxes.flatten(1, 2), logits.flatten(1)  # [B, 5 * K1, 4], [B, 5 * K1]
        return anchors_to_pixels(boxes, logits, image_wh, self.min_anchor_size, check_boundary=False)

    # ---------------------------------------------------------------------------------- probing

    def _candidates(self, current: StageAnchors, stride: int) -> Tensor:
        """``[N, K]`` bool refinement candidates: ``low < c < high`` and both sides ``< s * P / 2`` px."""
        a = current.anchors
        limit = stride * self.patch_size / 2
        conf = a[..., 4]
        confident = (conf > self.threshold_low) & (conf < self.threshold_high)
        candidates = confident & (a[..., 3] < limit) & (a[..., 2] < limit)
        return candidates if current.row_valid is None else candidates & current.row_valid[:, None]

    @torch.no_grad()
    def _predicted_patches(self, current: StageAnchors, found: tuple[Tensor, Tensor], stride: int,
                           image_wh: Tensor) -> PatchSet:
        """Patch NMS on ``s * P`` px squares around the candidates at ``found`` (row, column indices of
        ``current.anchors``) (spec 3.4 step 4); batched-NMS order."""
        rows, cols = found
        anchors = current.anchors[rows, cols]  # [M, 5]
        image_idx = current.image_idx[rows]  # [M]
        squares = square_boxes_xyxy(anchors[:, :2], stride * self.patch_size)  # [M, 4] xyxy px
        keep = batched_nms(squares, anchors[:, 4], image_idx, self.patch_nms_threshold)
        if self.patch_cap is not None:
            keep = keep[rank_in_group(image_idx[keep], len(image_wh)) < self.patch_cap]
        kept_images = image_idx[keep]
        centres = finite_or_zero(anchors[keep, :2])  # a diverged model's NaN centre: no index out of range
        positions = anchor_patch_positions(centres, image_wh[kept_images], stride, self.patch_size)
        return PatchSet(kept_images, positions, torch.zeros_like(kept_images, dtype=torch.bool))

    @property
    def static_patch_slots(self) -> int:
        """Patch slots per image and probed level in static mode (the budget, capped like the dynamic
        mode's ``max_patches_per_*``)."""
        cap = self.patch_cap if self.patch_cap is not None else self.static_patches_per_level
        return min(cap, self.static_patches_per_level)

    @torch.no_grad()
    def _static_patches(
        self, current: StageAnchors, candidates: Tensor, level: int, image_wh: Tensor
    ) -> tuple[PatchSet, Tensor, Tensor]:
        """Static mode's patch choice: the first ``T`` patches of the dynamic mode's NMS per image.

        The rows of ``current`` are image-major with the same count per image, so each image's anchors
        form one row of ``[B, R * K]`` in the dynamic mode's order (rows, then columns).
        Returns ``B * T`` patches (image-major; slot ``t`` of image ``b`` is row ``b * T + t``), their
        ``[B * T]`` validity and the ``[B]`` bool budget bound (greedy NMS would have kept more).
        """
        stride, num_images, slots = self.strides[level], len(image_wh), self.static_patch_slots
        anchors = current.anchors.reshape(num_images, -1, ANCHOR_FIELDS)  # [B, R * K, 5]
        squares = square_boxes_xyxy(anchors[..., :2], stride * self.patch_size)  # [B, R * K, 4] xyxy px
        chosen = fixed_budget_nms(squares, anchors[..., 4], candidates.reshape(num_images, -1),
                                  self.patch_nms_threshold, slots)  # [B, T]
        centres = anchors[..., :2].gather(1, chosen.index[..., None].expand(-1, -1, 2))  # [B, T, 2]
        wh = image_wh.repeat_interleave(slots, dim=0)  # [B * T, 2]
        positions = anchor_patch_positions(centres.reshape(-1, 2), wh, stride, self.patch_size)  # [B * T, 2]
        images = torch.arange(num_images, device=image_wh.device).repeat_interleave(slots)  # [B * T]
        valid = chosen.kept.reshape(-1)  # [B * T]
        return PatchSet(images, positions, torch.zeros_like(valid)), valid, chosen.overflow

    def _choose_patches(
        self,
        current: StageAnchors,
        found: tuple[Tensor, Tensor] | None,
        level: int,
        image_wh: Tensor,
        targets: list[ImageTargets] | None,
    ) -> PatchSet:
        """Predicted patches (none while teacher forcing, ``found is None``), plus in training the
        GT-derived / random patches of spec 3.7."""
        stride = self.strides[level]
        predicted = None if found is None else self._predicted_patches(current, found, stride, image_wh)
        if targets is None:
            return predicted
        with torch.no_grad():
            return training_patches(
                predicted, targets, image_wh, stride, self.patch_size, self.patch_nms_threshold,
                self.min_training_patches,
            )

    def _probe(
        self, feature: Tensor, level: int, step: int, name: str, patches: PatchSet, image_wh: Tensor,
        train: bool, valid: Tensor | None = None,
    ) -> tuple[PatchPredictions, StageAnchors]:
        """Cut the patches from ``compress[level](feature)``, predict and decode the real ones (in
        evaluation every patch is real). ``valid`` (static mode): ``[N]`` bool, the used patch slots."""
        stride = self.strides[level]
        fmap = pad_to_patch(self.compress[level](feature), self.patch_size)  # [B, c, >=P, >=P]
        tokens = extract_patch_tokens(fmap, patches.batch_idx, patches.crop_pos, self.patch_size)
        raw = self._predict(tokens, step, self.proj_patch, self.num_anchors_patch)  # [N, K2, 5]
        prediction = PatchPredictions(
            name, raw, patches.batch_idx, crop_pos=patches.crop_pos, loss_only=patches.loss_only,
            stride=stride, valid=valid,
        )
        raw_real, images, crop_pos = raw.detach(), patches.batch_idx, patches.crop_pos
        if train:
            real = (~patches.loss_only).nonzero()[:, 0]  # [N_real]
            raw_real, images, crop_pos = raw_real[real], images[real], crop_pos[real]  # [N_real, K2, 5], ...
        wh = image_wh[images]  # [N_real, 2]
        boxes = patches_to_image_frame(raw_real[..., :4], crop_pos, wh, stride, self.patch_size)
        anchors = anchors_to_pixels(boxes, raw_real[..., 4], wh, self.min_anchor_size, check_boundary=True)
        return prediction, StageAnchors(anchors, images, False, valid)

    # ----------------------------------------------------------------------------------- output

    def _select(self, current: StageAnchors, candidates: Tensor | None, num_images: int) -> StageSelection:
        """Output anchors of one stage (spec 3.5): confident and, if ``candidates`` is given, not refined.

        At the coarse stage, rows where fewer than ``min_anchors`` pass take their ``min_anchors`` most
        confident anchors instead, in descending order (spec 3.5 A; may duplicate refined anchors).
        """
        conf = current.anchors[..., 4]  # [N, K]
        keep = conf > self.score_threshold
        if current.row_valid is not None:
            keep &= current.row_valid[:, None]
        if candidates is not None:
            keep &= ~candidates
        columns = torch.arange(conf.shape[1], device=conf.device).expand_as(conf)  # [N, K]
        chosen, position = keep, columns
        if current.coarse:
            num = conf.shape[1]
            k = min(self.min_anchors, num)
            fallback = (keep.sum(1) < k)[:, None]  # [N, 1]
            top = conf.topk(k, dim=1).indices  # [N, k]
            top_rank = torch.full_like(columns, num).scatter_(1, top, columns[:, :k])  # [N, K]; K = not top
            chosen = torch.where(fallback, top_rank < k, keep)
            position = torch.where(fallback, top_rank, columns)
        reached = count_per_group(current.image_idx, num_images, current.row_valid) > 0
        return StageSelection(current.anchors, chosen, position, current.image_idx, reached)

    def _pack(
        self, predictions: list[PatchPredictions], selections: list[StageSelection], image_sizes: Tensor
    ) -> AnchorOutput:
        """Concatenate stages per image, cap at ``max_anchors``, pad to ``[B, Q, 4]`` (spec 3.5 C-D).

        One host sync for all stages: the number of chosen anchors and ``Q``, the longest row, are read
        together; anchors over the cap are written to a spare column.
        """
        num_images = len(image_sizes)
        flat = flatten_selections(selections)
        kept = count_per_group(flat.image_idx, num_images, flat.chosen).clamp(max=self.max_anchors)  # [B]
        total, q = torch.stack([flat.chosen.sum(), kept.max()]).tolist()
        index = torch.nonzero_static(flat.chosen, size=total)[:, 0]  # [n]
        index = index[torch.argsort(flat.order_key[index])]  # images, stages, rows, positions
        packed = PackedAnchors(flat.anchors[index], flat.image_idx[index], flat.stage_idx[index],
                               torch.stack([s.reached for s in selections]))
        slots, _ = capped_slots(packed.anchors[:, 4], packed.image_idx, num_images, self.max_anchors)
        slots = slots.clamp(max=q)  # [n], column q collects the anchors over the cap
        boxes = full_image_boxes_cxcywh_px(image_sizes, q + 1).clone()  # [B, Q + 1, 4]
        boxes[packed.image_idx, slots] = packed.anchors[:, :4].to(boxes.dtype)
        valid = torch.zeros(boxes.shape[:2], dtype=torch.bool, device=boxes.device)  # [B, Q + 1]
        valid[packed.image_idx, slots] = True
        boxes, valid = boxes[:, :q].contiguous(), valid[:, :q].contiguous()  # [B, Q, 4], [B, Q]
        return AnchorOutput(predictions, boxes, valid, StageGroups(packed, num_images))


    def _pack_static(
        self, predictions: list[PatchPredictions], selections: list[StageSelection], image_sizes: Tensor,
        bound: dict[str, Tensor],
    ) -> AnchorOutput:
        """:meth:`_pack` with fixed shapes: ``Q = max_anchors`` columns, no host reads.

        Per image the chosen anchors of all stages are ranked by (stage, row, position) as in the
        dynamic mode; an image with more than ``max_anchors`` keeps its most confident ones (ties in
        that order). ``bound`` (patch budgets per level) gains ``"queries"``: the cap bound.
        """
        num_images, q = len(image_sizes), self.max_anchors
        ranked = rank_static_selections(selections, num_images)
        count = ranked.chosen.sum(dim=1, keepdim=True)  # [B, 1]
        columns = torch.arange(ranked.chosen.shape[1], device=count.device).expand_as(ranked.chosen)  # [B, T]
        conf = ranked.anchors[..., 4].masked_fill(~ranked.chosen, float("-inf"))
        by_conf = torch.sort(conf, dim=1, descending=True, stable=True).indices  # [B, T]
        conf_rank = torch.empty_like(by_conf).scatter_(1, by_conf, columns)  # [B, T]
        slots = torch.where(count > q, conf_rank, columns)
        slots = torch.where(ranked.chosen & (slots < q), slots, q)  # column q collects the rest
        boxes = full_image_boxes_cxcywh_px(image_sizes, q + 1).clone()  # [B, Q + 1, 4]
        boxes.scatter_(1, slots[..., None].expand(-1, -1, 4), ranked.anchors[..., :4].to(boxes.dtype))
        valid = torch.zeros(boxes.shape[:2], dtype=torch.bool, device=boxes.device)  # [B, Q + 1]
        valid.scatter_(1, slots, ranked.chosen)
        bound = {key: bound.get(key, torch.zeros_like(count[:, 0], dtype=torch.bool)) for key in BUDGET_KEYS}
        bound["queries"] = count[:, 0] > q
        groups = StageGroups(build=lambda: _static_groups(ranked, num_images))
        return AnchorOutput(predictions, boxes[:, :q].contiguous(), valid[:, :q].contiguous(), groups,
                            budget_bound=bound)


# ---------------------------------------------------------------------------------- pure helpers


def _check_level(level: str) -> str:
    if level not in INFERENCE_LEVEL_STOP:
        raise ValueError(f"inference_level must be one of {sorted(INFERENCE_LEVEL_STOP)}, got {level!r}")
    return level
