"""Small stand-ins for the model, criterion, data and label map used by the engine tests."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from torch import Tensor, nn
from torch.utils.data import Dataset

from asag.structures import (
    AnchorOutput,
    Batch,
    Detections,
    HeadOutput,
    ImageTargets,
    ModelOutput,
    PatchPredictions,
    QuerySet,
)

CATEGORY_IDS = (1, 3, 7)  # non-contiguous on purpose
CATEGORY_NAMES = ("cat", "dog", "bird")
IMAGE_PIXELS = 32  # side of the (fake) network input


class FakeLabelMap:
    """Contiguous label -> category id, like ``asag.data.labels.LabelMap``."""

    def __init__(self, category_ids=CATEGORY_IDS):
        self.category_ids = torch.tensor(category_ids, dtype=torch.int64)

    def to_category_ids(self, labels: Tensor) -> Tensor:
        return self.category_ids[labels.long()]


def coco_gt_dict(num_images: int = 6) -> dict:
    """A COCO ground truth with small (< 32^2), medium and large (> 96^2) boxes of all categories."""
    images, annotations = [], []
    sizes = [(20, 10), (60, 40), (150, 120)]  # w, h: small, medium, large
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        for k in range(3):
            w, h = sizes[(image_id + k) % 3]
            x, y = 30.0 + 170 * k + image_id, 40.0 + 50 * k + 2 * image_id
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[(image_id + 2 * k) % 3],
                    "bbox": [x, y, float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CATEGORY_NAMES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_coco(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ----------------------------------------------------------------------------------------------- data


class SyntheticDataset(Dataset):
    """Images ``[3, 32, 32]`` whose pixel (0, 0, 0) holds the image id, with one or two targets.

    ``augment`` draws from the global torch RNG (a random flip), like a real training pipeline.
    """

    def __init__(self, coco: dict, *, augment: bool = False):
        self.images = coco["images"]
        self.anns = coco["annotations"]
        self.augment = augment
        self.cat_index = {c: i for i, c in enumerate(CATEGORY_IDS)}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        info = self.images[index]
        gen = torch.Generator().manual_seed(index)
        image = torch.rand(3, IMAGE_PIXELS, IMAGE_PIXELS, generator=gen)
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        image[0, 0, 0] = float(info["id"])
        anns = [a for a in self.anns if a["image_id"] == info["id"]]
        w, h = info["width"], info["height"]
        boxes = torch.tensor(
            [[(a["bbox"][0] + a["bbox"][2] / 2) / w, (a["bbox"][1] + a["bbox"][3] / 2) / h,
              a["bbox"][2] / w, a["bbox"][3] / h] for a in anns],
            dtype=torch.float32,
        ).reshape(-1, 4)
        labels = torch.tensor([self.cat_index[a["category_id"]] for a in anns], dtype=torch.int64)
        target = ImageTargets(boxes, labels, info["id"], (IMAGE_PIXELS, IMAGE_PIXELS), (h, w))
        return image, target


def collate(samples) -> Batch:
    images = torch.stack([s[0] for s in samples])
    targets = [s[1] for s in samples]
    return Batch(
        images=images,
        image_sizes=torch.tensor([t.size for t in targets], dtype=torch.int64),
        orig_sizes=torch.tensor([t.orig_size for t in targets], dtype=torch.int64),
        targets=targets,
        image_ids=[t.image_id for t in targets],
    )


# ---------------------------------------------------------------------------------------------- models


def model_output(
    logits: Tensor, boxes: Tensor, valid_mask: Tensor, patches: list[PatchPredictions]
) -> ModelOutput:
    """Wrap head predictions ``[B, Q, C]`` / ``[B, Q, 4]`` (normalised cxcywh) in a ModelOutput."""
    b, q, _ = boxes.shape
    head = HeadOutput(logits=logits, boxes=boxes)
    anchors = AnchorOutput(patches, boxes=boxes.detach() * IMAGE_PIXELS, valid_mask=valid_mask)
    queries = QuerySet(boxes=anchors.boxes, attn_mask=torch.zeros(b * 8, q, q, dtype=torch.bool),
                       valid_mask=valid_mask)
    return ModelOutput(anchors=anchors, queries=queries, proposals=head, heads=[head])


class TinyDetector(nn.Module):
    """Conv "backbone" + linear head predicting ``Q`` boxes; dropout consumes RNG in training; one
    parameter never gets a gradient (exercises ``find_unused_parameters``)."""

    def __init__(self, num_classes: int = 3, num_queries: int = 4, dropout: float = 0.2):
        super().__init__()
        self.num_classes, self.num_queries = num_classes, num_queries
        self.backbone = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.head = nn.Linear(8, num_queries * (num_classes + 4))
        self.dropout = nn.Dropout(dropout)
        self.unused = nn.Linear(2, 2)
        self.seen_epochs: list[int] = []

    def forward(self, images, image_sizes, targets=None, epoch: int = 0) -> ModelOutput:
        self.seen_epochs.append(epoch)
        feats = F.relu(self.backbone(images)).mean(dim=(2, 3))  # [B, 8]
        out = self.head(self.dropout(feats)).view(len(images), self.num_queries, -1)  # [B, Q, C + 4]
        valid = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
        return model_output(out[..., : self.num_classes], out[..., self.num_classes :].sigmoid(), valid, [])

    def postprocess(self, output: ModelOutput, orig_sizes: Tensor) -> list[Detections]:
        head = output.heads[-1]
        scores = head.logits.sigmoid().flatten(1)  # [B, Q * C]
        dets = []
        for i in range(len(scores)):
            top = scores[i].topk(min(5, scores.shape[1]))
            query, label = top.indices // self.num_classes, top.indices % self.num_classes
            cx, cy, w, h = head.boxes[i, query].unbind(-1)
            xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
            hh, ww = orig_sizes[i].tolist()
            dets.append(Detections(xyxy * torch.tensor([ww, hh, ww, hh]), top.values, label))
        return dets


class OracleDetector(nn.Module):
    """Returns fixed detections per image id (read from pixel (0, 0, 0) of the image).

    table: image id -> (boxes ``[K, 4]`` xyxy original pixels, scores ``[K]``, labels ``[K]``).
    The output reports ``3 + id % 3`` valid queries of 5 and ``id % 2`` probed P4 patches per image
    (plus one loss-only P4 patch and one P3 patch for image 0 of the batch).
    """

    def __init__(self, table: dict[int, tuple[Tensor, Tensor, Tensor]]):
        super().__init__()
        self.table = table
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images, image_sizes, targets=None, epoch: int = 0) -> ModelOutput:
        ids = images[:, 0, 0, 0].round().long()  # [B]
        b = len(ids)
        valid = torch.arange(5).expand(b, 5) < (3 + ids % 3)[:, None]  # [B, 5]
        p4_idx = torch.repeat_interleave(torch.arange(b), ids % 2)
        p4_idx = torch.cat([p4_idx, torch.zeros(1, dtype=torch.int64)])
        loss_only = torch.zeros(len(p4_idx), dtype=torch.bool)
        loss_only[-1] = True
        patches = [
            PatchPredictions("P6", torch.zeros(b, 1, 2, 5), torch.arange(b)),
            PatchPredictions("P4", torch.zeros(len(p4_idx), 2, 5), p4_idx, loss_only=loss_only, stride=16),
            PatchPredictions("P3", torch.zeros(1, 2, 5), torch.zeros(1, dtype=torch.int64),
                             loss_only=torch.zeros(1, dtype=torch.bool), stride=8),
        ]
        out = model_output(torch.zeros(b, 5, 3), torch.full((b, 5, 4), 0.5), valid, patches)
        out.image_ids = ids.tolist()  # remembered for postprocess (plain attribute, test only)
        return out

    def postprocess(self, output: ModelOutput, orig_sizes: Tensor) -> list[Detections]:
        empty = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
        return [Detections(*self.table.get(i, empty)) for i in output.image_ids]


def oracle_table(coco: dict, *, shift: float = 0.0, score_fn=None) -> dict:
    """Detections equal to the ground truth (optionally shifted right by ``shift`` px)."""
    cat_index = {c: i for i, c in enumerate(CATEGORY_IDS)}
    table = {}
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        boxes = torch.tensor([[a["bbox"][0] + shift, a["bbox"][1], a["bbox"][0] + a["bbox"][2] + shift,
                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float64).float()
        scores = torch.tensor([score_fn(a) if score_fn else 1.0 for a in anns])
        labels = torch.tensor([cat_index[a["category_id"]] for a in anns], dtype=torch.int64)
        table[image["id"]] = (boxes, scores, labels)
    return table


# ------------------------------------------------------------------------------------------- criterion


@dataclass
class FakeLoss:
    total: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, float]
    stats: dict[str, float]


class FakeCriterion(nn.Module):
    """L1 between mean predicted and mean target box, plus BCE on mean logits; weights 5 and 2."""

    weights = {"l1": 5.0, "cls": 2.0}

    def __init__(self):
        super().__init__()
        self.seen_dtypes: list[torch.dtype] = []

    def forward(self, output: ModelOutput, targets: list[ImageTargets], image_sizes: Tensor) -> FakeLoss:
        head = output.heads[-1]
        self.seen_dtypes.append(head.logits.dtype)
        target_box = torch.stack([t.boxes.mean(0) if len(t) else torch.full((4,), 0.5) for t in targets])
        onehot = torch.stack([F.one_hot(t.labels, head.logits.shape[-1]).amax(0).float() for t in targets])
        terms = {
            "l1": (head.boxes.mean(1) - target_box).abs().mean(),
            "cls": F.binary_cross_entropy_with_logits(head.logits.mean(1), onehot),
        }
        total = sum(self.weights[k] * v for k, v in terms.items())
        stats = {"num_targets": float(sum(len(t) for t in targets))}
        return FakeLoss(total, terms, dict(self.weights), stats)
