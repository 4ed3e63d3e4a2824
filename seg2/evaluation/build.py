"""Pick evaluators from the dataset's ``evaluator_type`` and the outputs the model predicts."""

import importlib.util
import logging
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
)

from ..tasks import model_tasks
from ..utils import Seg2Error
from .coco_evaluation import COCO_MAX_DETS_PER_IMAGE, MaskAPEvaluator
from .panoptic_evaluation import Seg2PanopticEvaluator
from .sem_seg_evaluation import MIoUEvaluator

logger = logging.getLogger(__name__)

# evaluator_type -> {target the dataset has: the evaluator for it}, for every type detectron2's
# builtin datasets carry (those of its tools/train_net.py, and cityscapes_panoptic_seg) and seg2's
# "coco_sem_seg". seg2's evaluators where they compute what detectron2's would (MIoUEvaluator gives
# SemSegEvaluator's numbers, MaskAPEvaluator COCOEvaluator's, Seg2PanopticEvaluator
# COCOPanopticEvaluator's PQ without panopticapi, which is not on PyPI); detectron2's own where the
# dataset's protocol is another one (Cityscapes' scripts, VOC's AP, LVIS' federated AP).
EVALUATORS = {
    "sem_seg": {"sem_seg": MIoUEvaluator},
    "coco": {"instances": MaskAPEvaluator},
    "coco_sem_seg": {"instances": MaskAPEvaluator, "sem_seg": MIoUEvaluator},
    "coco_panoptic_seg": {
        "instances": MaskAPEvaluator,
        "sem_seg": MIoUEvaluator,
        "panoptic_seg": Seg2PanopticEvaluator,
    },
    "cityscapes_instance": {"instances": CityscapesInstanceEvaluator},
    "cityscapes_sem_seg": {"sem_seg": CityscapesSemSegEvaluator},
    "cityscapes_panoptic_seg": {
        "instances": CityscapesInstanceEvaluator,
        "sem_seg": CityscapesSemSegEvaluator,
        "panoptic_seg": Seg2PanopticEvaluator,
    },
    "pascal_voc": {"instances": PascalVOCDetectionEvaluator},
    "lvis": {"instances": LVISEvaluator},
}
# evaluator_type -> the targets a dataset of that type has.
DATASET_TASKS = {t: frozenset(targets) for t, targets in EVALUATORS.items()}

# What each evaluator computes, for the log line that says which one is used.
WHAT = {
    MIoUEvaluator: "seg2's, the numbers of detectron2's SemSegEvaluator",
    MaskAPEvaluator: "seg2's, the numbers of detectron2's COCOEvaluator",
    COCOEvaluator: "detectron2's: MaskAPEvaluator has no keypoint AP",
    CityscapesSemSegEvaluator: "detectron2's: Cityscapes' official IoU/iIoU script",
    CityscapesInstanceEvaluator: "detectron2's: Cityscapes' official instance AP script",
    PascalVOCDetectionEvaluator: "detectron2's: VOC box AP, 'difficult' objects ignored",
    LVISEvaluator: "detectron2's: LVIS' federated AP",
    Seg2PanopticEvaluator: "seg2's, the PQ of detectron2's COCOPanopticEvaluator",
}
# detectron2 evaluators that import a package detectron2 does not install; checked here rather
# than after a whole inference run.
PACKAGES = {
    CityscapesSemSegEvaluator: ("cityscapesscripts", "pip install cityscapesscripts"),
    CityscapesInstanceEvaluator: ("cityscapesscripts", "pip install cityscapesscripts"),
    LVISEvaluator: ("lvis", "pip install lvis"),
}


def build_evaluator(cfg, dataset_name: str, output_dir: str = None):
    """
    The evaluators for ``dataset_name`` under the model of ``cfg``: one per target (instances,
    semantic maps, panoptic maps) that the dataset's ``evaluator_type`` has and the model predicts,
    as in :data:`EVALUATORS`. Each choice is logged.

    Args:
        cfg (CfgNode): the full config (meta-architecture, MASK_ON, KEYPOINT_ON, SEG2.EVALUATION).
        dataset_name (str): a registered dataset whose metadata has ``evaluator_type``.
        output_dir (str or None): where evaluators write their files; detectron2's evaluators get
            ``cfg.OUTPUT_DIR/inference`` when None, as in detectron2's tools/train_net.py.
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type not in EVALUATORS:
        raise Seg2Error(
            f"dataset {dataset_name!r} has evaluator_type={evaluator_type!r}; seg2 evaluates "
            f"{sorted(EVALUATORS)}"
        )
    predicted = model_tasks(cfg)
    chosen = {t: e for t, e in EVALUATORS[evaluator_type].items() if t in predicted}
    if not chosen:
        raise Seg2Error(
            f"dataset {dataset_name!r} ({evaluator_type}) has no target that "
            f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} predicts"
        )
    for target in sorted(set(EVALUATORS[evaluator_type]) - set(chosen)):
        logger.info(
            f"{dataset_name} ({evaluator_type}): {cfg.MODEL.META_ARCHITECTURE} predicts no "
            f"{target}; not evaluated"
        )
    evaluators = []
    for target, cls in chosen.items():
        if cls is MaskAPEvaluator and cfg.MODEL.KEYPOINT_ON:
            cls = COCOEvaluator
        _check_package(cls, dataset_name)
        logger.info(f"{dataset_name} ({evaluator_type}): {target} by {cls.__name__} ({WHAT[cls]})")
        evaluators.append(_make(cls, cfg, dataset_name, output_dir))
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def _check_package(cls, dataset_name):
    if cls in PACKAGES:
        module, install = PACKAGES[cls]
        if importlib.util.find_spec(module) is None:
            raise Seg2Error(
                f"dataset {dataset_name!r} is evaluated by detectron2's {cls.__name__}, which "
                "needs the "
                f"'{module}' package: {install}"
            )


def _make(cls, cfg, dataset_name, output_dir):
    ev_cfg = cfg.SEG2.EVALUATION if "SEG2" in cfg and "EVALUATION" in cfg.SEG2 else None
    iou_types = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    if cls is MIoUEvaluator:
        boundary_iou = bool(ev_cfg.BOUNDARY_IOU) if ev_cfg else False
        return MIoUEvaluator(
            dataset_name, distributed=True, output_dir=output_dir, boundary_iou=boundary_iou
        )
    if cls is MaskAPEvaluator:
        if cfg.TEST.DETECTIONS_PER_IMAGE > COCO_MAX_DETS_PER_IMAGE:
            logger.info(
                f"{dataset_name}: AP counts the {COCO_MAX_DETS_PER_IMAGE} highest-scoring of the "
                f"TEST.DETECTIONS_PER_IMAGE={cfg.TEST.DETECTIONS_PER_IMAGE} detections per image "
                "(COCO's "
                "maxDets, as detectron2's train_net); MaskAPEvaluator(max_dets_per_image=...) "
                "counts more"
            )
        return MaskAPEvaluator(
            dataset_name,
            distributed=True,
            output_dir=output_dir,
            tasks=iou_types,
            backend=ev_cfg.MASK_AP_BACKEND if ev_cfg else "detectron2_fast",
            segm_area=ev_cfg.SEGM_AREA if ev_cfg else "box",
        )
    # detectron2's own evaluators, built as its tools/train_net.py builds them.
    d2_output_dir = output_dir or os.path.join(cfg.OUTPUT_DIR, "inference")
    if cls is COCOEvaluator:
        return COCOEvaluator(
            dataset_name,
            tasks=iou_types + ("keypoints",),
            output_dir=d2_output_dir,
            kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS,
        )
    if cls is Seg2PanopticEvaluator:  # writes its predictions only when asked, as MIoUEvaluator
        return Seg2PanopticEvaluator(dataset_name, output_dir=output_dir)
    if cls is LVISEvaluator:
        return cls(dataset_name, output_dir=d2_output_dir)
    return cls(dataset_name)
