"""Reading semantic label maps (palette or grayscale PNGs) as class indices."""

import numpy as np
from PIL import Image

from ..utils import Seg2Error

# PIL modes whose pixel values are class indices. detectron2's DatasetMapper reads label maps
# with ``convert("L")``, which turns a VOC palette PNG into luminance, not indices: that is why
# seg2 reads them here.
_INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")


def read_label_map(path: str) -> np.ndarray:
    """
    Read a label map as an (H, W) integer array of class indices.

    Args:
        path (str): a palette ("P") or single-channel PNG whose pixel values are class ids.

    Raises:
        Seg2Error: the file cannot be read, or is an RGB/RGBA colour image (a colour-coded mask
            must be converted to indices first).
    """
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in _INDEX_MODES:
                raise Seg2Error(
                    f"{path}: label map has PIL mode {mode!r}; expected a palette ('P') or "
                    "single-channel PNG whose pixel values are class indices (an RGB colour "
                    "mask must be converted to indices first)"
                )
            arr = np.asarray(im)
    except OSError as e:
        raise Seg2Error(f"{path}: cannot read the label map ({e})") from e
    return arr.astype(np.int64) if arr.dtype != np.uint8 else arr
