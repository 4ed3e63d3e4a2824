"""Inference for users: overlap-tile semantic inference, a predictor, image reading, benchmarks."""

from .io import UINT16_MODES, read_image, to_uint8_image
from .predictor import Seg2Predictor
from .tiling import BLEND_MODES, TiledSemSegInference, blend_window, reflect_indices, tile_starts

__all__ = [
    "BLEND_MODES",
    "UINT16_MODES",
    "Seg2Predictor",
    "TiledSemSegInference",
    "blend_window",
    "read_image",
    "reflect_indices",
    "tile_starts",
    "to_uint8_image",
]
