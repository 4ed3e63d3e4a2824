"""Evaluators, and the choice of evaluators for a dataset and a model."""

from .build import build_evaluator
from .coco_evaluation import MaskAPEvaluator, encode_masks, load_coco_gt
from .sem_seg_evaluation import MIoUEvaluator, mask_to_boundary, sem_seg_metrics

__all__ = [
    "build_evaluator",
    "MaskAPEvaluator",
    "MIoUEvaluator",
    "encode_masks",
    "load_coco_gt",
    "mask_to_boundary",
    "sem_seg_metrics",
]
