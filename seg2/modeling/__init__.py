"""seg2's model parts, registered into detectron2's registries on import."""

from ..tasks import META_ARCH_TASKS, model_tasks
from . import (  # noqa: F401  (registration)
    backbone,
    heads,
    meta_arch,
    roi_heads,  # noqa: F401  (RoI heads with ROIWarp / max-aggregation poolers)
)
from .backbone import VGG, UNetEncoder
from .heads import FCNHead, Seg2DeepLabV3PlusHead, SegNetHead, UNetHead
from .meta_arch import Seg2MultiTaskRCNN, Seg2SemanticSegmentor
from .upsample import UPSAMPLE_MODES, Upsample

__all__ = [
    "META_ARCH_TASKS",
    "model_tasks",
    "VGG",
    "UNetEncoder",
    "FCNHead",
    "UNetHead",
    "SegNetHead",
    "Seg2DeepLabV3PlusHead",
    "Seg2SemanticSegmentor",
    "Seg2MultiTaskRCNN",
    "Upsample",
    "UPSAMPLE_MODES",
]
