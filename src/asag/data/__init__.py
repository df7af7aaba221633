"""Data sets, transforms and batching (spec 9.1)."""

from asag.data.coco import CocoDetection, DataWarning
from asag.data.collate import collate
from asag.data.labels import LabelMap
from asag.data.transforms import CropSpec, Sample, build_eval_transforms, build_train_transforms

__all__ = [
    "CocoDetection",
    "CropSpec",
    "DataWarning",
    "LabelMap",
    "Sample",
    "build_eval_transforms",
    "build_train_transforms",
    "collate",
]
