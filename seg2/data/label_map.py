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
import logging
import os
import threading
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..constants import IGNORE_LABEL
from ..utils import Seg2Error, UnreadableFileError

__all__ = [
    "IGNORE_LABEL",
    "sem_seg_format",
    "ignore_only",
    "note_ignore_only",
    "ignore_only_counts",
    "warn_ignore_only_sample",
    "read_label_map",
    "read_sem_seg",
    "label_map_size",
    "check_label_values",
    "write_label_map",
]

logger = logging.getLogger(__name__)

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
                "(colour-coded masks: an RGB, RGBA or palette PNG whose colours are in the colour "
                "table)"
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
            "('P') images, as Pascal VOC ships them; a grayscale copy may hold luminance instead "
            "of "
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


def _value_map_pairs(value_map, void) -> list:
    """``value_map`` ({file value: class index}) as sorted [[value, index], ...] (JSON-safe)."""
    if value_map is None:
        return []
    try:
        items = value_map.items() if isinstance(value_map, dict) else list(value_map)
        pairs = sorted((int(a), int(b)) for a, b in items)
    except (TypeError, ValueError):
        raise Seg2Error(
            f"value_map {value_map!r} is not a mapping of pixel values to class indices, "
            "e.g. {255: 1}"
        ) from None
    sources = [a for a, _ in pairs]
    if len(set(sources)) != len(sources):
        raise Seg2Error(f"value_map {value_map!r} maps a pixel value twice")
    for a, b in pairs:
        if a < 0:
            raise Seg2Error(f"value_map: {a} is not a pixel value (values are non-negative)")
        if not 0 <= b <= IGNORE_LABEL:
            raise Seg2Error(
                f"value_map: pixel value {a} is mapped to {b}, which is neither a class index "
                f"0..254 nor void {IGNORE_LABEL}"
            )
        if a in void:
            raise Seg2Error(f"pixel value {a} is both in void and in value_map; give it once")
    return [[a, b] for a, b in pairs]


def sem_seg_format(
    label_format: str = "index",
    *,
    void: Sequence[int] = (),
    value_map: Optional[dict] = None,
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
        value_map (dict[int, int] or None): "index" only: pixel values decoded as other class
            indices, e.g. ``{255: 1}`` for binary masks saved as 0/255 (255 is void otherwise).
            Values not in it (nor in ``void``) are kept.
        colors (list[(r, g, b)]): "rgb" only: the colour of each class, in class order.
        void_colors (list[(r, g, b)]): "rgb" only: colours that mean void; decoded as 255.

    Returns:
        dict: ``{"type": "index", "void": [...]}`` (and ``"value_map": [[value, index], ...]``
        when given) or ``{"type": "rgb", "colors": [[r, g, b], ...], "void_colors": [...]}``.

    Raises:
        Seg2Error: an unknown format, a colour given twice (to two classes, or to a class and to
            void), a malformed colour, more than 254 colour classes, or options of the other format.
    """
    if label_format == "index":
        if colors is not None or len(void_colors):
            raise Seg2Error(
                "label_format='index' decodes pixel values; colors / void_colors need "
                "label_format='rgb'"
            )
        values = sorted({int(v) for v in void})
        if any(v < 0 for v in values):
            raise Seg2Error(f"void values must be non-negative pixel values, got {values}")
        fmt = {"type": "index", "void": values}
        pairs = _value_map_pairs(value_map, values)
        if pairs:
            fmt["value_map"] = pairs
        return fmt
    if label_format != "rgb":
        raise Seg2Error(f"label_format must be 'index' or 'rgb', got {label_format!r}")
    if value_map:
        raise Seg2Error("value_map maps pixel values of index maps; label_format='rgb' has colors")
    if len(void):
        raise Seg2Error(
            "label_format='rgb' decodes colours: give void_colors instead of void values"
        )
    if not colors:
        raise Seg2Error(
            "label_format='rgb' needs colors: the (r, g, b) colour of each class, in class order"
        )
    colors = _color_list(colors, "colors")
    void_colors = _color_list(void_colors, "void_colors")
    if len(colors) > MAX_RGB_CLASSES:
        raise Seg2Error(
            f"label_format='rgb' supports at most {MAX_RGB_CLASSES} classes, got {len(colors)} "
            "colours"
        )
    owner = {}
    for name, i, c in [("class", i, c) for i, c in enumerate(colors)] + [
        ("void colour", i, c) for i, c in enumerate(void_colors)
    ]:
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
    return (
        seg.astype(np.uint8)
        if seg.max(initial=0) < 256 and seg.min(initial=0) >= 0
        else seg.astype(np.int64)
    )


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


def _unknown_colors_error(
    path: str, codes: np.ndarray, bad: np.ndarray, num_colors: int
) -> Seg2Error:
    values, counts = np.unique(codes[bad], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    shown = ", ".join(f"{_unpack(values[i])} in {int(counts[i])} pixel(s)" for i in order[:10])
    more = f" and {len(values) - 10} more colour(s)" if len(values) > 10 else ""
    return Seg2Error(
        f"{path}: RGB label map has colour(s) that are in no class or void colour of its label "
        "format "
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
                raise Seg2Error(
                    f"{path}: palette label map uses entries beyond its {n}-colour palette"
                )
            raise _unknown_colors_error(
                path, entry_codes.take(index), bad, len(colors) + len(void_colors)
            )
        return out
    im.load()
    # PIL keeps RGB(A) pixels as 4 bytes: one copy gives every pixel as one uint32.
    raw = np.frombuffer(im.tobytes("raw", "RGBA" if im.mode == "RGBA" else "RGBX"), dtype="<u4")
    if im.mode == "RGBA":
        transparent = int(np.count_nonzero((raw >> 24) != 255))
        if transparent:
            raise Seg2Error(
                f"{path}: RGBA label map has {transparent} pixel(s) that are not opaque; "
                "transparency "
                "has no class: save the mask as RGB with a void colour there"
            )
    codes = raw & 0xFFFFFF
    out = lut.take(codes)
    bad = out == _UNKNOWN
    if bad.any():
        raise _unknown_colors_error(path, codes, bad, len(colors) + len(void_colors))
    return out.reshape(im.height, im.width)


def _map_values(label: np.ndarray, void: Sequence[int] = (), value_map: Sequence = ()):
    """``void`` values to 255 and ``value_map``'s ``[value, index]`` pairs applied, all at once;
    then a map whose values all fit in 0..255 (a 16-bit PNG of class indices) as uint8, what
    detectron2's transforms resize (its nearest resize of an int64 map fails)."""
    pairs = [(int(v), IGNORE_LABEL) for v in void] + [(int(a), int(b)) for a, b in value_map]
    if pairs:
        if label.dtype == np.uint8:
            lut = np.arange(256, dtype=np.uint8)
            for a, b in pairs:
                if a < 256:
                    lut[a] = b
            label = lut.take(label)
        else:
            out = label.copy()
            for a, b in pairs:
                out[label == a] = b
            label = out
    if label.dtype != np.uint8 and label.size and 0 <= label.min() and label.max() <= 255:
        label = label.astype(np.uint8)
    return label


def _pairs(value_map) -> list:
    if value_map is None:
        return []
    return list(value_map.items()) if isinstance(value_map, dict) else list(value_map)


def read_label_map(
    path: str,
    expect_palette: bool = False,
    *,
    void: Sequence[int] = (),
    value_map=None,
    colors: Optional[Sequence[Sequence[int]]] = None,
    void_colors: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """
    Read a label map as an (H, W) integer array of class indices: uint8 for 8-bit files and for
    16-bit files whose values (after ``void`` and ``value_map``) are all in 0..255, else int64.

    Args:
        path (str): a palette ("P") or single-channel PNG whose pixel values are class ids, an SBD
            ``cls/*.mat`` file (its ``GTcls.Segmentation`` field), or with ``colors`` a
            colour-coded mask (RGB, opaque RGBA, or palette PNG decoded by its colours).
        expect_palette (bool): require a palette PNG (Pascal VOC's format).
        void (list[int]): pixel values that mean void, returned as 255 (index maps).
        value_map (dict[int, int] or list[[int, int]] or None): pixel values returned as other
            class indices (index maps), e.g. ``{255: 1}`` for 0/255 binary masks.
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
        return _map_values(_read_sbd_mat(path), void, _pairs(value_map))
    rgb = colors is not None
    try:
        with Image.open(path) as im:
            _check_mode(path, im.mode, expect_palette, rgb=rgb)
            if rgb:
                return _decode_rgb(
                    path, im, tuple(map(tuple, colors)), tuple(map(tuple, void_colors))
                )
            arr = np.asarray(im)
    except (
        OSError,
        SyntaxError,
        ValueError,
    ) as e:  # PIL's errors of a missing, empty or corrupt file
        raise UnreadableFileError(path, "label map", str(e) or type(e).__name__) from e
    arr = arr.astype(np.int64) if arr.dtype != np.uint8 else arr
    return _map_values(arr, void, _pairs(value_map))


def _format_kwargs(fmt: Optional[dict], path: str) -> dict:
    if fmt is None:
        return {}
    kind = fmt.get("type")
    if kind == "index":
        return {"void": fmt.get("void", ()), "value_map": fmt.get("value_map")}
    if kind == "rgb":
        return {"colors": fmt["colors"], "void_colors": fmt.get("void_colors", ())}
    raise Seg2Error(
        f"{path}: the record's sem_seg_format has type {kind!r}; expected 'index' or 'rgb'"
    )


def read_sem_seg(record: dict) -> np.ndarray:
    """
    The class-index map of a dataset record, as the mapper and the evaluators read it: its
    ``sem_seg_file_name`` decoded by its ``sem_seg_format`` (see :func:`sem_seg_format`; void
    values or colours become 255, ``value_map`` values their class). A record without
    ``sem_seg_format`` is read as an index map (palette/single-channel PNG or SBD ``.mat``), its
    values unchanged. A map whose only non-zero value is 255 is counted and, the first time in
    its folder, warned about (:func:`note_ignore_only`).
    """
    path = record["sem_seg_file_name"]
    label = read_label_map(path, **_format_kwargs(record.get("sem_seg_format"), path))
    note_ignore_only(label, path)
    return label


def ignore_only(label: np.ndarray, ignore_label: int = IGNORE_LABEL) -> bool:
    """True when the only non-zero value of ``label`` is ``ignore_label`` (and it has one): every
    pixel is background or void, as a 0/255 binary mask read with 255 as void."""
    if label.size == 0 or int(label.max()) != ignore_label:
        return False
    if label.dtype == np.uint8 and ignore_label == 255:
        # Two SIMD passes, several times faster than counting: label + 1 wraps 255 to 0, so its
        # maximum exceeds 1 exactly when a value in 1..254 is present.
        return int(np.add(label, 1, dtype=np.uint8).max()) <= 1
    return np.count_nonzero(label) == np.count_nonzero(label == ignore_label)


# label folder -> [maps read, maps whose only non-zero value is 255], in this process.
_IGNORE_ONLY_COUNTS = {}
_IGNORE_ONLY_LOCK = threading.Lock()


def note_ignore_only(label: np.ndarray, path: str) -> bool:
    """
    Count ``label`` (decoded from ``path``) in its folder, and whether its only non-zero value is
    the ignore label 255 (:func:`ignore_only`); the first such map of a folder gets one warning
    naming it, with the hint that 0/255 binary masks need ``value_map={255: 1}``. Folders (a
    dataset's label folder) are counted per process: DataLoader workers forked after the dataset
    was loaded inherit the counts of the load (see :func:`warn_ignore_only_sample`).
    """
    found = ignore_only(label)
    folder = os.path.dirname(os.path.abspath(path))
    with _IGNORE_ONLY_LOCK:
        counts = _IGNORE_ONLY_COUNTS.setdefault(folder, [0, 0])
        counts[0] += 1
        counts[1] += int(found)
        first, n_read = found and counts[1] == 1, counts[0]
    if first:
        logger.warning(
            f"{path}: the only non-zero value of this label map is the ignore value "
            f"{IGNORE_LABEL}, so all its non-background pixels are void (the first such map of "
            f"{n_read} read from {folder}). "
            f"0/255 binary masks? {IGNORE_LABEL} is void in seg2: map it to class 1 with "
            "value_map={255: 1} (docs/datasets.md, 'Binary masks saved as 0/255')"
        )
    return found


def ignore_only_counts() -> dict:
    """Per label folder, ``(maps read, maps whose only non-zero value is 255)`` in this process
    (see :func:`note_ignore_only`)."""
    with _IGNORE_ONLY_LOCK:
        return {folder: tuple(c) for folder, c in _IGNORE_ONLY_COUNTS.items()}


def warn_ignore_only_sample(records: Sequence[dict], n: int = 3):
    """
    Decode the label maps of the first ``n`` records at load (a few ms), so that a dataset of
    0/255 binary masks is warned about when it is loaded, before training: each map goes through
    :func:`read_sem_seg`'s :func:`note_ignore_only`. A map that cannot be decoded, or holds a
    colour in no table, is left to the mapper and the evaluator, which say so where they read it
    (the mapper skips an unreadable map in training).
    """
    for r in records[:n]:
        try:
            read_sem_seg(r)
        except Seg2Error:
            continue


def label_map_size(
    path: str, expect_palette: bool = False, sem_seg_format: Optional[dict] = None
) -> Tuple[int, int]:
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
