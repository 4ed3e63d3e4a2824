"""seg2's meta-architectures (registered in detectron2's ``META_ARCH_REGISTRY`` on import)."""

from .multitask_rcnn import Seg2MultiTaskRCNN
from .semantic_segmentor import Seg2SemanticSegmentor, semantic_inference

__all__ = ["Seg2SemanticSegmentor", "Seg2MultiTaskRCNN", "semantic_inference"]
