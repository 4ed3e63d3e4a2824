"""Pick evaluators from the dataset's ``evaluator_type`` and the outputs the model predicts."""

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluators

from ..modeling.tasks import model_tasks
from ..utils import Seg2Error
from .coco_evaluation import MaskAPEvaluator
from .sem_seg_evaluation import MIoUEvaluator

# evaluator_type -> the targets a dataset of that type has.
DATASET_TASKS = {
    "coco": frozenset({"instances"}),
    "sem_seg": frozenset({"sem_seg"}),
    "coco_sem_seg": frozenset({"instances", "sem_seg"}),
}


def build_evaluator(cfg, dataset_name: str, output_dir: str = None):
    """
    The evaluators for ``dataset_name`` under the model of ``cfg``: mask/box AP where the dataset
    has instances and the model predicts them, mIoU where both have semantic maps.

    Args:
        cfg (CfgNode): the full config (meta-architecture, MASK_ON).
        dataset_name (str): a registered dataset whose metadata has ``evaluator_type``.
        output_dir (str or None): where evaluators write their files.
    """
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = meta.get("evaluator_type", None)
    if evaluator_type not in DATASET_TASKS:
        raise Seg2Error(
            f"dataset {dataset_name!r} has evaluator_type={evaluator_type!r}; seg2 evaluates "
            f"{sorted(DATASET_TASKS)}"
        )
    tasks = DATASET_TASKS[evaluator_type] & model_tasks(cfg)
    if not tasks:
        raise Seg2Error(
            f"dataset {dataset_name!r} ({evaluator_type}) has no target that "
            f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} predicts"
        )
    ev_cfg = cfg.SEG2.EVALUATION if "SEG2" in cfg and "EVALUATION" in cfg.SEG2 else None
    evaluators = []
    if "instances" in tasks:
        iou_types = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        evaluators.append(
            MaskAPEvaluator(
                dataset_name,
                distributed=True,
                output_dir=output_dir,
                tasks=iou_types,
                backend=ev_cfg.MASK_AP_BACKEND if ev_cfg else "detectron2_fast",
                segm_area=ev_cfg.SEGM_AREA if ev_cfg else "box",
            )
        )
    if "sem_seg" in tasks:
        evaluators.append(
            MIoUEvaluator(
                dataset_name,
                distributed=True,
                output_dir=output_dir,
                boundary_iou=bool(ev_cfg.BOUNDARY_IOU) if ev_cfg else False,
            )
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
