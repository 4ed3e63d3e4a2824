"""Inference for users: overlap-tile semantic inference, test-time augmentation, a predictor, image reading."""

from .io import UINT16_MODES, read_image, to_uint8_image
from .predictor import Seg2Predictor
from .tiling import BLEND_MODES, TiledSemSegInference, blend_window, reflect_indices, tile_starts
from .tta import MultiTaskRCNNWithTTA, SemanticSegmentorWithTTA, build_tta_model

__all__ = [
    "BLEND_MODES",
    "MultiTaskRCNNWithTTA",
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
