"""
Reading semantic label maps as class indices: index PNGs (palette or single-channel), RGB
colour-coded masks, SBD ``.mat`` files.

seg2's convention: a *decoded* label map holds class indices ``0..C-1`` and
:data:`IGNORE_LABEL` (255) for pixels that losses and metrics leave out; every seg2 dataset's
metadata has ``ignore_label=255`` and ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE`` defaults to 255. A
dataset whose files mark void otherwise (CamVid's label 11, a colour in an RGB mask) says so in
its records' ``sem_seg_format`` (see :func:`sem_seg_format`), and :func:`read_sem_seg` maps
those values to 255 as it decodes the file, so the number is set in one place only.
"""

import functools
import os
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..constants import IGNORE_LABEL
from ..utils import Seg2Error, UnreadableFileError

__all__ = [
    "IGNORE_LABEL",
    "sem_seg_format",
    "read_label_map",
    "read_sem_seg",
    "label_map_size",
    "check_label_values",
    "write_label_map",
]

# Marks "colour in no table" in the colour lookup table, so RGB formats hold at most 254 classes.
_UNKNOWN = 254
MAX_RGB_CLASSES = _UNKNOWN

# PIL modes whose pixel values are class indices. detectron2's DatasetMapper reads label maps
# with ``convert("L")``, which turns a VOC palette PNG into luminance, not indices: that is why
# seg2 reads them here.
_INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")
# PIL modes a colour-coded mask may have ('P': the colours of its palette entries are decoded).
_RGB_MODES = ("RGB", "RGBA", "P")


def _check_mode(path: str, mode: str, expect_palette: bool, rgb: bool = False):
    if rgb:
        if mode not in _RGB_MODES:
            raise Seg2Error(
                f"{path}: label map has PIL mode {mode!r}; this dataset's label format is 'rgb' "
                "(colour-coded masks: an RGB, RGBA or palette PNG whose colours are in the colour table)"
            )
        return
    if mode not in _INDEX_MODES:
        raise Seg2Error(
            f"{path}: label map has PIL mode {mode!r}; expected a palette ('P') or "
            "single-channel PNG whose pixel values are class indices (an RGB colour-coded mask "
            "needs label_format='rgb' and its colour table, see seg2.data.sem_seg_format)"
        )
    if expect_palette and mode != "P":
        raise Seg2Error(
            f"{path}: label map has PIL mode {mode!r} but this dataset's label PNGs are palette "
            "('P') images, as Pascal VOC ships them; a grayscale copy may hold luminance instead of "
            "class indices. Use the original PNGs, or load with require_palette=False if this file "
            "really holds class indices"
        )


def _color_list(colors, what: str):
    out = []
    for c in colors:
        try:
            rgb = [int(v) for v in c]
        except (TypeError, ValueError):
            rgb = None
        if rgb is None or len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise Seg2Error(f"{what}: {c!r} is not an (r, g, b) colour of three integers in 0..255")
        out.append(rgb)
    return out


def sem_seg_format(
    label_format: str = "index",
    *,
    void: Sequence[int] = (),
    colors: Optional[Sequence[Sequence[int]]] = None,
    void_colors: Sequence[Sequence[int]] = (),
) -> dict:
    """
    The description of a dataset's label files that loaders put in each record under
    ``sem_seg_format`` and that :func:`read_sem_seg` decodes by: a small JSON-like dict.

    Args:
        label_format (str): "index": palette ('P') or single-channel ('L', 16-bit) PNGs whose pixel
            values are class indices; "rgb": colour-coded masks (RGB, opaque RGBA, or palette PNGs
            decoded by their palette's colours), class ``i`` having colour ``colors[i]``.
        void (list[int]): "index" only: pixel values that mean void; decoded as 255.
        colors (list[(r, g, b)]): "rgb" only: the colour of each class, in class order.
        void_colors (list[(r, g, b)]): "rgb" only: colours that mean void; decoded as 255.

    Returns:
        dict: ``{"type": "index", "void": [...]}`` or
        ``{"type": "rgb", "colors": [[r, g, b], ...], "void_colors": [...]}``.

    Raises:
        Seg2Error: an unknown format, a colour given twice (to two classes, or to a class and to
            void), a malformed colour, more than 254 colour classes, or options of the other format.
    """
    if label_format == "index":
        if colors is not None or len(void_colors):
            raise Seg2Error("label_format='index' decodes pixel values; colors / void_colors need label_format='rgb'")
        values = sorted({int(v) for v in void})
        if any(v < 0 for v in values):
            raise Seg2Error(f"void values must be non-negative pixel values, got {values}")
        return {"type": "index", "void": values}
    if label_format != "rgb":
        raise Seg2Error(f"label_format must be 'index' or 'rgb', got {label_format!r}")
    if len(void):
        raise Seg2Error("label_format='rgb' decodes colours: give void_colors instead of void values")
    if not colors:
        raise Seg2Error("label_format='rgb' needs colors: the (r, g, b) colour of each class, in class order")
    colors = _color_list(colors, "colors")
    void_colors = _color_list(void_colors, "void_colors")
    if len(colors) > MAX_RGB_CLASSES:
        raise Seg2Error(f"label_format='rgb' supports at most {MAX_RGB_CLASSES} classes, got {len(colors)} colours")
    owner = {}
    for name, i, c in [("class", i, c) for i, c in enumerate(colors)] + [("void colour", i, c) for i, c in enumerate(void_colors)]:
        key = tuple(c)
        if key in owner:
            raise Seg2Error(f"colour {key} is given twice: to {owner[key]} and to {name} {i}")
        owner[key] = f"{name} {i}"
    return {"type": "rgb", "colors": colors, "void_colors": void_colors}


def _read_sbd_mat(path: str) -> np.ndarray:
    """The class map of an SBD ``cls/*.mat`` file (``GTcls.Segmentation``)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, TypeError) as e:
        raise UnreadableFileError(path, "SBD .mat file", str(e)) from e
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None)
    if seg is None or not isinstance(seg, np.ndarray) or seg.ndim != 2:
        raise Seg2Error(
            f"{path}: not an SBD class file: expected a struct 'GTcls' with a 2-D field "
            f"'Segmentation' (found variables {sorted(k for k in mat if not k.startswith('__'))})"
        )
    return seg.astype(np.uint8) if seg.max(initial=0) < 256 and seg.min(initial=0) >= 0 else seg.astype(np.int64)


def _pack(colors) -> np.ndarray:
    """(r, g, b) colours as the uint32 codes ``r | g << 8 | b << 16`` (the value of the pixel's
    bytes R, G, B, X read as a little-endian uint32, X masked off)."""
    c = np.asarray(colors, dtype=np.uint32).reshape(-1, 3)
    return c[:, 0] | (c[:, 1] << 8) | (c[:, 2] << 16)


def _unpack(code: int) -> Tuple[int, int, int]:
    return int(code) & 255, (int(code) >> 8) & 255, (int(code) >> 16) & 255


@functools.lru_cache(maxsize=8)
def _color_lut(colors: tuple, void_colors: tuple) -> np.ndarray:
    """A 2**24-entry uint8 table from colour code (see :func:`_pack`) to class index, 255 for void
    colours and 254 for any other colour. One table lookup per pixel is several times faster than
    a search among the colours (np.searchsorted) and needs no per-colour pass; the table (16 MiB)
    is built once per process and format."""
    lut = np.full(1 << 24, _UNKNOWN, dtype=np.uint8)
    if void_colors:
        lut[_pack(void_colors)] = IGNORE_LABEL
    lut[_pack(colors)] = np.arange(len(colors), dtype=np.uint8)
    return lut


def _unknown_colors_error(path: str, codes: np.ndarray, bad: np.ndarray, num_colors: int) -> Seg2Error:
    values, counts = np.unique(codes[bad], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    shown = ", ".join(f"{_unpack(values[i])} in {int(counts[i])} pixel(s)" for i in order[:10])
    more = f" and {len(values) - 10} more colour(s)" if len(values) > 10 else ""
    return Seg2Error(
        f"{path}: RGB label map has colour(s) that are in no class or void colour of its label format "
        f"({num_colors} colours): {shown}{more}; add them to colors or void_colors"
    )


def _decode_rgb(path: str, im: Image.Image, colors: tuple, void_colors: tuple) -> np.ndarray:
    lut = _color_lut(colors, void_colors)
    if im.mode == "P":
        # The classes of the palette's entries, then one lookup per pixel by its entry.
        palette = im.getpalette() or []
        n = len(palette) // 3
        entry_codes = np.zeros(256, dtype=np.uint32)
        entry_codes[:n] = _pack(palette[: 3 * n])
        entry_classes = np.full(256, _UNKNOWN, dtype=np.uint8)
        entry_classes[:n] = lut.take(entry_codes[:n])
        index = np.asarray(im)
        out = entry_classes.take(index)
        bad = out == _UNKNOWN
        if bad.any():
            if (index[bad] >= n).any():
                raise Seg2Error(f"{path}: palette label map uses entries beyond its {n}-colour palette")
            raise _unknown_colors_error(path, entry_codes.take(index), bad, len(colors) + len(void_colors))
        return out
    im.load()
    # PIL keeps RGB(A) pixels as 4 bytes: one copy gives every pixel as one uint32.
    raw = np.frombuffer(im.tobytes("raw", "RGBA" if im.mode == "RGBA" else "RGBX"), dtype="<u4")
    if im.mode == "RGBA":
        transparent = int(np.count_nonzero((raw >> 24) != 255))
        if transparent:
            raise Seg2Error(
                f"{path}: RGBA label map has {transparent} pixel(s) that are not opaque; transparency "
                "has no class: save the mask as RGB with a void colour there"
            )
    codes = raw & 0xFFFFFF
    out = lut.take(codes)
    bad = out == _UNKNOWN
    if bad.any():
        raise _unknown_colors_error(path, codes, bad, len(colors) + len(void_colors))
    return out.reshape(im.height, im.width)


def _map_void(label: np.ndarray, void: Sequence[int]) -> np.ndarray:
    if not len(void):
        return label
    if label.dtype == np.uint8:
        lut = np.arange(256, dtype=np.uint8)
        lut[[v for v in void if v < 256]] = IGNORE_LABEL
        return lut.take(label)
    return np.where(np.isin(label, void), IGNORE_LABEL, label)


def read_label_map(
    path: str,
    expect_palette: bool = False,
    *,
    void: Sequence[int] = (),
    colors: Optional[Sequence[Sequence[int]]] = None,
    void_colors: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """
    Read a label map as an (H, W) integer array of class indices (uint8 for 8-bit files).

    Args:
        path (str): a palette ("P") or single-channel PNG whose pixel values are class ids, an SBD
            ``cls/*.mat`` file (its ``GTcls.Segmentation`` field), or with ``colors`` a
            colour-coded mask (RGB, opaque RGBA, or palette PNG decoded by its colours).
        expect_palette (bool): require a palette PNG (Pascal VOC's format).
        void (list[int]): pixel values that mean void, returned as 255 (index maps).
        colors (list[(r, g, b)] or None): decode a colour-coded mask: class ``i`` has ``colors[i]``.
        void_colors (list[(r, g, b)]): colours that mean void, returned as 255 (with ``colors``).

    Raises:
        UnreadableFileError: the file cannot be read or decoded (a :class:`Seg2Error`).
        Seg2Error: an index map that is an RGB image or (with
            ``expect_palette``) not a palette PNG; a colour-coded mask with a colour in neither
            ``colors`` nor ``void_colors`` (the message names the colours and their pixel counts)
            or with transparent pixels.
    """
    if path.endswith(".mat"):
        return _map_void(_read_sbd_mat(path), void)
    rgb = colors is not None
    try:
        with Image.open(path) as im:
            _check_mode(path, im.mode, expect_palette, rgb=rgb)
            if rgb:
                return _decode_rgb(path, im, tuple(map(tuple, colors)), tuple(map(tuple, void_colors)))
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors of a missing, empty or corrupt file
        raise UnreadableFileError(path, "label map", str(e) or type(e).__name__) from e
    arr = arr.astype(np.int64) if arr.dtype != np.uint8 else arr
    return _map_void(arr, void)


def _format_kwargs(fmt: Optional[dict], path: str) -> dict:
    if fmt is None:
        return {}
    kind = fmt.get("type")
    if kind == "index":
        return {"void": fmt.get("void", ())}
    if kind == "rgb":
        return {"colors": fmt["colors"], "void_colors": fmt.get("void_colors", ())}
    raise Seg2Error(f"{path}: the record's sem_seg_format has type {kind!r}; expected 'index' or 'rgb'")


def read_sem_seg(record: dict) -> np.ndarray:
    """
    The class-index map of a dataset record, as the mapper and the evaluators read it: its
    ``sem_seg_file_name`` decoded by its ``sem_seg_format`` (see :func:`sem_seg_format`; void
    values or colours become 255). A record without ``sem_seg_format`` is read as an index map
    (palette/single-channel PNG or SBD ``.mat``), its values unchanged.
    """
    path = record["sem_seg_file_name"]
    return read_label_map(path, **_format_kwargs(record.get("sem_seg_format"), path))


def label_map_size(path: str, expect_palette: bool = False, sem_seg_format: Optional[dict] = None) -> Tuple[int, int]:
    """(height, width) of a label-map PNG, reading only its header; checks its mode like
    :func:`read_label_map` does for an index map, or for ``sem_seg_format``'s kind of file."""
    if not os.path.isfile(path):
        raise Seg2Error(f"{path}: label map not found")
    rgb = "colors" in _format_kwargs(sem_seg_format, path)
    try:
        with Image.open(path) as im:
            _check_mode(path, im.mode, expect_palette, rgb=rgb)
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
    never sees a half-written file and an interrupted run leaves none behind under ``path``. The
    file gets the mode of any file the process creates (0o666 less the umask).
    """
    from ..utils.files import atomic_write
    from .voc_palette import VOC_PALETTE

    if label.dtype != np.uint8:
        raise ValueError(f"{path}: label maps are written as uint8, got {label.dtype}")
    im = Image.fromarray(label, mode="P")
    im.putpalette(palette or VOC_PALETTE)
    with atomic_write(path) as f:
        # Label maps compress well even at level 1, which encodes several times faster than 6.
        im.save(f, format="PNG", compress_level=1)
