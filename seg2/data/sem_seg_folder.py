"""
A user's semantic segmentation data in the most common custom layout: a folder of images and a
folder of label PNGs paired by file name (detectron2's ``load_sem_seg`` shape)::

    image_root/<stem><image_ext>       e.g. images/0001.jpg
    label_root/<stem><label_ext>       e.g. labels/0001.png (label_ext may carry a suffix: "_L.png")

Label files are index maps (palette 'P' or single-channel 'L'/16-bit PNGs whose pixel values are
class indices) or RGB colour-coded masks with a colour -> class table. Either way the decoded map
holds class indices ``0..C-1`` and 255 for void (see :mod:`seg2.data.label_map`).
"""

import logging
import os
from typing import List, Optional, Sequence, Union

from PIL import Image

from ..utils import Seg2Error
from .catalog import register_dataset
from .label_map import (
    IGNORE_LABEL,
    check_label_values,
    label_map_size,
    read_sem_seg,
    sem_seg_format,
    warn_ignore_only_sample,
)
from .voc_palette import palette_colors

__all__ = [
    "IMAGE_EXTENSIONS",
    "load_sem_seg_folder",
    "register_sem_seg_folder",
    "class_colors",
    "sem_seg_record",
    "sem_seg_folder_format",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _image_size(path: str):
    if not os.path.isfile(path):
        raise Seg2Error(f"{path}: image not found")
    try:
        with Image.open(path) as im:  # reads the header only
            return im.height, im.width
    except OSError as e:
        raise Seg2Error(f"{path}: cannot read the image ({e})") from e


def sem_seg_record(
    image_file: str, label_file: str, fmt: dict, image_id: Optional[str] = None
) -> dict:
    """
    One semantic segmentation record: ``file_name``, ``sem_seg_file_name``, ``sem_seg_format``,
    ``height``, ``width``, ``image_id`` (the image's file stem by default). Both files' headers are
    read: a missing or unreadable file, a label file of the wrong kind for ``fmt``, or a label
    map of another size than its image is an error naming the file.
    """
    height, width = _image_size(image_file)
    lh, lw = label_map_size(label_file, sem_seg_format=fmt)
    if (lh, lw) != (height, width):
        raise Seg2Error(
            f"{label_file}: label map is {lw}x{lh} (WxH) but its image {image_file} is "
            f"{width}x{height}"
        )
    return {
        "file_name": image_file,
        "sem_seg_file_name": label_file,
        "sem_seg_format": fmt,
        "height": height,
        "width": width,
        "image_id": image_id
        if image_id is not None
        else os.path.splitext(os.path.basename(image_file))[0],
    }


def _colors_from_palette(palette, num_classes: int):
    """The first ``num_classes`` colours of a flat palette, or of the palette of a palette PNG."""
    if isinstance(palette, str):
        with Image.open(palette) as im:
            if im.mode != "P":
                raise Seg2Error(
                    f"{palette}: has PIL mode {im.mode!r}; a palette is taken from a palette "
                    "('P') PNG"
                )
            palette = im.getpalette()
    try:
        return palette_colors(num_classes, palette)
    except ValueError as e:
        raise Seg2Error(f"palette: {e} (one colour per class)") from e


def class_colors(class_names: Sequence[str], colors=None, palette=None) -> Optional[List[tuple]]:
    """One (r, g, b) colour per class from ``colors`` or from ``palette`` (a flat
    ``[r0, g0, b0, r1, ...]`` list or a palette PNG's path: its first ``len(class_names)``
    entries); None when neither is given."""
    if colors is not None and palette is not None:
        raise Seg2Error("give the class colours as colors or as palette, not both")
    if colors is None and palette is None:
        return None
    table = list(colors) if colors is not None else _colors_from_palette(palette, len(class_names))
    if len(table) != len(class_names):
        raise Seg2Error(
            f"colors has {len(table)} colours but there are {len(class_names)} class_names; give "
            "one per class"
        )
    return [tuple(int(v) for v in c) for c in table]


def sem_seg_folder_format(
    class_names: Sequence[str],
    label_format: str = "index",
    colors=None,
    palette=None,
    void: Sequence[int] = (),
    void_colors=(),
    value_map=None,
) -> dict:
    """The ``sem_seg_format`` of :func:`load_sem_seg_folder`'s records (see its arguments)."""
    if not class_names:
        raise Seg2Error("class_names is empty: give the name of every class, in label order")
    table = class_colors(class_names, colors, palette)
    if label_format != "rgb":
        return sem_seg_format(label_format, void=void, void_colors=void_colors, value_map=value_map)
    if table is None:
        raise Seg2Error(
            "label_format='rgb' needs the colour of each class: colors=[(r, g, b), ...] or palette="
        )
    return sem_seg_format(
        "rgb", void=void, colors=table, void_colors=void_colors, value_map=value_map
    )


def _files_by_stem(folder: str, extensions, exclude_suffix: Optional[str] = None) -> dict:
    if not os.path.isdir(folder):
        raise Seg2Error(f"{folder}: folder not found")
    by_stem = {}
    for name in sorted(os.listdir(folder)):
        if exclude_suffix and name.endswith(exclude_suffix):
            continue
        ext = next((e for e in extensions if name.lower().endswith(e.lower())), None)
        if ext is None or not os.path.isfile(os.path.join(folder, name)):
            continue
        stem = name[: len(name) - len(ext)]
        if stem in by_stem:
            raise Seg2Error(
                f"{os.path.join(folder, name)}: two files have the stem {stem!r} "
                f"(also {by_stem[stem]}); images and labels are paired by stem"
            )
        by_stem[stem] = os.path.join(folder, name)
    return by_stem


def _unpaired_error(files: List[str], problem: str) -> Seg2Error:
    more = (
        f" (and {len(files) - 1} more: {', '.join(files[1:4])}{' ...' if len(files) > 4 else ''})"
        if len(files) > 1
        else ""
    )
    return Seg2Error(f"{files[0]}: {problem}{more}")


def load_sem_seg_folder(
    image_root: str,
    label_root: str,
    class_names: Sequence[str],
    label_format: str = "index",
    *,
    colors: Optional[Sequence[Sequence[int]]] = None,
    palette: Union[Sequence[int], str, None] = None,
    void: Sequence[int] = (),
    value_map: Optional[dict] = None,
    void_colors: Sequence[Sequence[int]] = (),
    image_ext: Union[str, Sequence[str]] = IMAGE_EXTENSIONS,
    label_ext: str = ".png",
    check_labels: bool = False,
) -> List[dict]:
    """
    Load a folder of images and a folder of label maps, paired by file stem, as detectron2 dicts
    with ``file_name``, ``sem_seg_file_name``, ``sem_seg_format``, ``height``, ``width`` and
    ``image_id``; :func:`seg2.data.read_sem_seg` decodes a record's map to class indices 0..C-1
    with 255 for void.

    Every image needs its label file and every label file its image, of the same size (read from
    the file headers). Label values are checked when the mapper or the evaluator reads a map, or
    here for every file with ``check_labels`` (decodes every file).

    Args:
        image_root (str): the folder of images (not searched recursively).
        label_root (str): the folder of label files; may be ``image_root`` when ``label_ext``
            tells the labels apart (e.g. "_mask.png").
        class_names (list[str]): the classes, in label order: index or colour ``i`` is class ``i``.
        label_format (str): "index": palette ('P') or single-channel ('L', 16-bit) PNGs of class
            indices; "rgb": colour-coded masks (RGB, opaque RGBA, or palette PNGs decoded by their
            palette's colours) with the colour table ``colors`` or ``palette``.
        colors (list[(r, g, b)] or None): the colour of each class: for "rgb" the colour table
            the masks are decoded by; for "index" display colours (``stuff_colors``) only, VOC's
            colour map by default.
        palette (list[int] or str or None): instead of ``colors``: the first ``len(class_names)``
            entries of a flat ``[r0, g0, b0, r1, ...]`` palette (e.g.
            ``seg2.data.voc_palette.VOC_PALETTE``) or of the palette of a palette PNG (a path).
        void (list[int]): "index": pixel values that mean void (decoded as 255). 255 is void anyway.
        value_map (dict[int, int] or None): "index": pixel values decoded as another class index,
            e.g. ``{255: 1}`` for binary masks saved as 0/255 (else 255 is void and the
            foreground class has no pixel).
        void_colors (list[(r, g, b)]): "rgb": colours that mean void (decoded as 255).
        image_ext (str or list[str]): image file extensions (case-insensitive).
        label_ext (str): what follows the stem in a label file's name.
        check_labels (bool): decode every label map now and check its values.

    Raises:
        Seg2Error: naming the file: an image without label file or the reverse, two files with one
            stem, a size mismatch, a label file of the wrong kind; with ``check_labels``, an unknown
            colour or a value that is neither a class index nor void.
    """
    fmt = sem_seg_folder_format(
        class_names, label_format, colors, palette, void, void_colors, value_map
    )
    extensions = (image_ext,) if isinstance(image_ext, str) else tuple(image_ext)
    same_folder = os.path.abspath(image_root) == os.path.abspath(label_root)
    images = _files_by_stem(
        image_root, extensions, exclude_suffix=label_ext if same_folder else None
    )
    labels = _files_by_stem(label_root, (label_ext,))
    if not images:
        raise Seg2Error(f"{image_root}: no image files ({', '.join(extensions)})")
    unlabelled = [images[s] for s in images if s not in labels]
    if unlabelled:
        raise _unpaired_error(
            unlabelled, f"image has no label file <stem>{label_ext} in {label_root}"
        )
    orphans = [labels[s] for s in labels if s not in images]
    if orphans:
        raise _unpaired_error(
            orphans, f"label file has no image ({', '.join(extensions)}) in {image_root}"
        )
    records = [sem_seg_record(images[s], labels[s], fmt, image_id=s) for s in sorted(images)]
    if check_labels:
        for r in records:
            check_label_values(
                read_sem_seg(r), r["sem_seg_file_name"], len(class_names), IGNORE_LABEL
            )
    else:  # 0/255 binary masks read with 255 as void: warned about now, not after training
        warn_ignore_only_sample(records)
    logger.info(
        f"Loaded {len(records)} images with {label_format} label maps from {image_root} and "
        f"{label_root}"
    )
    return records


def register_sem_seg_folder(
    name: str,
    image_root: str,
    label_root: str,
    class_names: Sequence[str],
    label_format: str = "index",
    **kwargs,
):
    """
    Register :func:`load_sem_seg_folder` under ``name`` (evaluator_type "sem_seg") with the
    metadata of every seg2 dataset: ``stuff_classes``, ``stuff_colors`` (the colour table for
    "rgb", else ``colors``/``palette`` or VOC's colour map), ``ignore_label`` 255, ``image_root``,
    ``sem_seg_root``. The label format is checked now; no file is read until the dataset is loaded.

    Args:
        name (str): the dataset name, e.g. "my_dataset_train".
        image_root, label_root, class_names, label_format: as :func:`load_sem_seg_folder`.
        kwargs: the other arguments of :func:`load_sem_seg_folder`.
    """
    colors, palette = kwargs.get("colors"), kwargs.get("palette")
    sem_seg_folder_format(
        class_names,
        label_format,
        colors,
        palette,
        kwargs.get("void", ()),
        kwargs.get("void_colors", ()),
        kwargs.get("value_map"),
    )
    stuff_colors = class_colors(class_names, colors, palette) or palette_colors(len(class_names))
    class_names = list(class_names)
    register_dataset(
        name,
        lambda: load_sem_seg_folder(image_root, label_root, class_names, label_format, **kwargs),
        dict(
            stuff_classes=class_names,
            stuff_colors=stuff_colors,
            ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg",
            image_root=image_root,
            sem_seg_root=label_root,
        ),
    )
