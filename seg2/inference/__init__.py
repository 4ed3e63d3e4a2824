"""Inference for users: a predictor, test-time augmentation, visualisation. Images are read by
:func:`seg2.data.read_image` (the training mapper's reader); tiling is the models' inference mode
(:mod:`seg2.modeling.tiling`)."""

from ..data.image import UINT16_MODES, read_image, to_uint8_image
from ..modeling.tiling import (
    BLEND_MODES,
    TiledSemSegInference,
    blend_window,
    reflect_indices,
    tile_starts,
)
from .predictor import Seg2Predictor
from .tta import (
    MultiTaskRCNNWithTTA,
    ScaleRatioMapperTTA,
    SemanticSegmentorWithTTA,
    build_tta_model,
)

__all__ = [
    "BLEND_MODES",
    "MultiTaskRCNNWithTTA",
    "ScaleRatioMapperTTA",
    "UINT16_MODES",
    "Seg2Predictor",
    "SemanticSegmentorWithTTA",
    "TiledSemSegInference",
    "blend_window",
    "build_tta_model",
    "read_image",
    "reflect_indices",
    "tile_starts",
    "to_uint8_image",
]
