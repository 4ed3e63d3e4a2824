"""Evaluators, and the choice of evaluators for a dataset and a model."""

from .build import EVALUATORS, build_evaluator
from .coco_evaluation import MaskAPEvaluator, coco_metrics, encode_masks, load_coco_gt
from .panoptic_evaluation import Seg2PanopticEvaluator, pq_compute
from .sem_seg_evaluation import (
    MIoUEvaluator,
    mask_to_boundary,
    sem_seg_metrics,
    sem_seg_to_coco_json,
)

__all__ = [
    "EVALUATORS",
    "build_evaluator",
    "MaskAPEvaluator",
    "MIoUEvaluator",
    "Seg2PanopticEvaluator",
    "coco_metrics",
    "encode_masks",
    "load_coco_gt",
    "mask_to_boundary",
    "pq_compute",
    "sem_seg_metrics",
    "sem_seg_to_coco_json",
]
