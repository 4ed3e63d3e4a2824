"""Reading semantic label maps (palette/grayscale PNGs, SBD ``.mat`` files) as class indices."""

import os
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from ..utils import Seg2Error

__all__ = ["read_label_map", "read_sem_seg", "label_map_size", "check_label_values", "write_label_map"]

# PIL modes whose pixel values are class indices. detectron2's DatasetMapper reads label maps
# with ``convert("L")``, which turns a VOC palette PNG into luminance, not indices: that is why
# seg2 reads them here.
_INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")


def _check_mode(path: str, mode: str, expect_palette: bool):
    if mode not in _INDEX_MODES:
        raise Seg2Error(
            f"{path}: label map has PIL mode {mode!r}; expected a palette ('P') or "
            "single-channel PNG whose pixel values are class indices (an RGB colour "
            "mask must be converted to indices first)"
        )
    if expect_palette and mode != "P":
        raise Seg2Error(
            f"{path}: label map has PIL mode {mode!r} but this dataset's label PNGs are palette "
            "('P') images, as Pascal VOC ships them; a grayscale copy may hold luminance instead of "
            "class indices. Use the original PNGs, or load with require_palette=False if this file "
            "really holds class indices"
        )


def _read_sbd_mat(path: str) -> np.ndarray:
    """The class map of an SBD ``cls/*.mat`` file (``GTcls.Segmentation``)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, TypeError) as e:
        raise Seg2Error(f"{path}: cannot read the SBD .mat file ({e})") from e
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None)
    if seg is None or not isinstance(seg, np.ndarray) or seg.ndim != 2:
        raise Seg2Error(
            f"{path}: not an SBD class file: expected a struct 'GTcls' with a 2-D field "
            f"'Segmentation' (found variables {sorted(k for k in mat if not k.startswith('__'))})"
        )
    return seg.astype(np.uint8) if seg.max(initial=0) < 256 and seg.min(initial=0) >= 0 else seg.astype(np.int64)


def read_label_map(path: str, expect_palette: bool = False) -> np.ndarray:
    """
    Read a label map as an (H, W) integer array of class indices.

    Args:
        path (str): a palette ("P") or single-channel PNG whose pixel values are class ids, or an
            SBD ``cls/*.mat`` file (its ``GTcls.Segmentation`` field).
        expect_palette (bool): require a palette PNG (Pascal VOC's format).

    Raises:
        Seg2Error: the file cannot be read, is an RGB/RGBA colour image (a colour-coded mask
            must be converted to indices first), or is not a palette PNG where one is expected.
    """
    if path.endswith(".mat"):
        return _read_sbd_mat(path)
    try:
        with Image.open(path) as im:
            _check_mode(path, im.mode, expect_palette)
            arr = np.asarray(im)
    except OSError as e:
        raise Seg2Error(f"{path}: cannot read the label map ({e})") from e
    return arr.astype(np.int64) if arr.dtype != np.uint8 else arr


def read_sem_seg(record: dict) -> np.ndarray:
    """The class-index map of a dataset record (its ``sem_seg_file_name``), as the mapper and the
    evaluators read it."""
    return read_label_map(record["sem_seg_file_name"])


def label_map_size(path: str, expect_palette: bool = False) -> Tuple[int, int]:
    """(height, width) of a label-map PNG, reading only its header; checks its mode like
    :func:`read_label_map`."""
    if not os.path.isfile(path):
        raise Seg2Error(f"{path}: label map not found")
    try:
        with Image.open(path) as im:
            _check_mode(path, im.mode, expect_palette)
            return im.height, im.width
    except OSError as e:
        raise Seg2Error(f"{path}: cannot read the label map ({e})") from e


def check_label_values(label: np.ndarray, path: str, num_classes: Optional[int], ignore_label: int):
    """
    Raise :class:`Seg2Error` naming ``path`` if ``label`` holds a value that is neither a class
    index in ``[0, num_classes)`` nor ``ignore_label`` (such values would be trained on, or
    counted by mIoU, as a wrong class).
    """
    if num_classes is None:
        return
    bad = (label >= num_classes) & (label != ignore_label)
    if label.dtype.kind == "i":
        bad |= label < 0
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(int(v)) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise Seg2Error(
            f"{path}: label map holds value(s) {shown} in {int(bad.sum())} pixel(s), which are "
            f"neither a class index (0..{num_classes - 1}) nor the ignore label {ignore_label}"
        )


def write_label_map(label: np.ndarray, path: str, palette=None):
    """
    Write ``label`` (H, W) uint8 as a palette PNG (VOC's colour map by default), atomically: a
    temporary file in the same folder is renamed onto ``path``, so a reader or a concurrent writer
    never sees a half-written file and an interrupted run leaves none behind under ``path``.
    """
    import tempfile

    from .voc_palette import VOC_PALETTE

    if label.dtype != np.uint8:
        raise ValueError(f"{path}: label maps are written as uint8, got {label.dtype}")
    im = Image.fromarray(label, mode="P")
    im.putpalette(palette or VOC_PALETTE)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            # Label maps compress well even at level 1, which encodes several times faster than 6.
            im.save(f, format="PNG", compress_level=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
