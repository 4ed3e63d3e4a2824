"""
Pascal VOC 2012 segmentation (and the SBD-augmented ``train_aug`` set) as detectron2 dataset dicts.

Layout of ``voc_root`` (the VOC devkit's ``VOC2012`` folder)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png      palette PNG: 0 background, 1..20 classes, 255 void (borders)
    SegmentationObject/<id>.png     palette PNG: 0 background, k = k-th object, 255 void
    ImageSets/Segmentation/{train,val,trainval}.txt   one <id> per line

and of ``sbd_root`` (the ``benchmark_RELEASE/dataset`` folder of the SBD tarball)::

    cls/<id>.mat                    struct GTcls with field Segmentation (0 background, 1..20)
    train.txt, val.txt              SBD's own splits

The loaders work on any folder with this layout (a user's own VOC-style data, other class lists).
"""

import logging
import os
from typing import List, Optional, Sequence

import numpy as np
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASSES
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools import mask as mask_util

from ..constants import IGNORE_LABEL
from ..utils import Seg2Error
from .catalog import register_dataset
from .label_map import check_label_values, label_map_size, read_label_map
from .voc_palette import palette_colors

__all__ = [
    "VOC_CLASSES",
    "voc_metadata",
    "read_voc_split",
    "load_voc_sem_seg",
    "load_voc_sem_seg_train_aug",
    "load_voc_instances",
    "register_voc_sem_seg",
    "register_voc_instances",
]

logger = logging.getLogger(__name__)


def voc_metadata(class_names: Sequence[str] = VOC_CLASSES) -> dict:
    """Metadata of a VOC-style dataset: thing classes, background + things as stuff classes,
    VOC's colour map and ignore label."""
    colours = palette_colors(len(class_names) + 1)
    return {
        "thing_classes": list(class_names),
        "thing_colors": colours[1:],
        "thing_dataset_id_to_contiguous_id": {i: i for i in range(len(class_names))},
        "stuff_classes": ["background"] + list(class_names),
        "stuff_colors": colours,
        "ignore_label": IGNORE_LABEL,
    }


def _read_id_list(path: str, what: str) -> List[str]:
    if not os.path.isfile(path):
        raise Seg2Error(f"{path}: {what} not found")
    with open(path) as f:
        names = [line.strip().split()[0] for line in f if line.strip()]
    seen = {}
    for lineno, name in enumerate(names, start=1):
        if name in seen:
            raise Seg2Error(
                f"{path}: image id {name!r} is listed twice (lines {seen[name]} and {lineno})"
            )
        seen[name] = lineno
    if not names:
        raise Seg2Error(f"{path}: {what} lists no image")
    return names


def read_voc_split(voc_root: str, split: str) -> List[str]:
    """The image ids of ``ImageSets/Segmentation/<split>.txt``; a missing or empty file, or an id
    listed twice, is an error naming the file."""
    return _read_id_list(
        os.path.join(voc_root, "ImageSets", "Segmentation", split + ".txt"), f"split {split!r}"
    )


def _image_record(voc_root: str, name: str, split_file: str) -> dict:
    path = os.path.join(voc_root, "JPEGImages", name + ".jpg")
    if not os.path.isfile(path):
        raise Seg2Error(f"{path}: image for id {name!r} listed in {split_file} not found")
    try:
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
    except OSError as e:
        raise Seg2Error(f"{path}: cannot read the image ({e})") from e
    return {"file_name": path, "height": height, "width": width, "image_id": name}


def _check_same_size(record: dict, mask_path: str, mask_hw):
    if tuple(mask_hw) != (record["height"], record["width"]):
        raise Seg2Error(
            f"{mask_path}: mask is {mask_hw[1]}x{mask_hw[0]} (WxH) but its image "
            f"{record['file_name']} "
            f"is {record['width']}x{record['height']}"
        )


def load_voc_sem_seg(
    voc_root: str,
    split: str,
    require_palette: bool = True,
    num_classes: int = len(VOC_CLASSES) + 1,
    check_labels: bool = False,
) -> List[dict]:
    """
    Load a VOC-style semantic segmentation split as detectron2 dicts with ``file_name``,
    ``sem_seg_file_name``, ``height``, ``width`` and ``image_id`` (no ``annotations``).

    Every listed id must have its JPEG and its label PNG, of the same size (read from the file
    headers). Label values are checked by :class:`~seg2.data.MultiTaskDatasetMapper` when training
    reads the map, or here for every file with ``check_labels`` (decodes every PNG).

    Args:
        voc_root (str): the folder holding ``JPEGImages``, ``SegmentationClass``, ``ImageSets``.
        split (str): a file name (without ``.txt``) in ``ImageSets/Segmentation``.
        require_palette (bool): label PNGs must be palette images, as VOC ships them.
        num_classes (int): number of classes including background (21 for VOC).
        check_labels (bool): decode every label map and check its values now.
    """
    split_file = os.path.join(voc_root, "ImageSets", "Segmentation", split + ".txt")
    records = []
    for name in read_voc_split(voc_root, split):
        r = _image_record(voc_root, name, split_file)
        png = os.path.join(voc_root, "SegmentationClass", name + ".png")
        _check_same_size(r, png, label_map_size(png, expect_palette=require_palette))
        if check_labels:
            check_label_values(read_label_map(png), png, num_classes, IGNORE_LABEL)
        r["sem_seg_file_name"] = png
        records.append(r)
    return records


def load_voc_sem_seg_train_aug(
    voc_root: str,
    sbd_root: str,
    require_palette: bool = True,
    train_split: str = "train",
    val_split: str = "val",
) -> List[dict]:
    """
    The SBD-augmented VOC training set (``train_aug``, 10,582 images with the real data), as
    DeepLab and MMSegmentation build it: VOC ``train`` plus SBD ``train`` and ``val``, minus VOC
    ``val``. Images in VOC ``train`` keep VOC's label PNG (finer, with void borders); the others
    take SBD's ``cls/<id>.mat`` (read with scipy by the mapper). Images come from
    ``voc_root/JPEGImages``, which holds every SBD image.

    Args:
        voc_root (str): VOC2012 folder (see :func:`load_voc_sem_seg`).
        sbd_root (str): the folder holding SBD's ``cls/``, ``train.txt`` and ``val.txt``.
        require_palette (bool): VOC label PNGs must be palette images.
        train_split, val_split (str): the VOC splits to add and to exclude.
    """
    voc_train = read_voc_split(voc_root, train_split)
    voc_val = set(read_voc_split(voc_root, val_split))
    sbd_ids = []
    for f in ("train.txt", "val.txt"):
        sbd_ids += _read_id_list(os.path.join(sbd_root, f), "SBD split")
    in_voc_train = set(voc_train)
    extra = sorted(set(sbd_ids) - in_voc_train - voc_val)
    records = load_voc_sem_seg(voc_root, train_split, require_palette=require_palette)
    sbd_split_files = f"{os.path.join(sbd_root, 'train.txt')} / val.txt"
    for name in extra:
        r = _image_record(voc_root, name, sbd_split_files)
        mat = os.path.join(sbd_root, "cls", name + ".mat")
        if not os.path.isfile(mat):
            raise Seg2Error(
                f"{mat}: SBD class map for id {name!r} listed in {sbd_split_files} not found"
            )
        # The map's size is checked when the mapper reads it: loading 9k .mat files here would
        # make every DatasetCatalog.get take tens of seconds.
        r["sem_seg_file_name"] = mat
        records.append(r)
    logger.info(
        f"VOC train_aug: {len(voc_train)} VOC {train_split} + {len(extra)} SBD images "
        f"(excluding {len(voc_val)} VOC {val_split} images) = {len(records)}"
    )
    return records


def _instances_from_maps(
    obj: np.ndarray, cls: np.ndarray, obj_path: str, cls_path: str, num_things: int
):
    """Per-object RLE masks, XYXY boxes and contiguous classes from VOC's two label maps."""
    # One joint histogram of (object index, class value) pairs instead of a pass per object.
    # Background (0) and void borders (255) are not objects.
    on_objects = (obj != 0) & (obj != IGNORE_LABEL)
    key = obj[on_objects].astype(np.int32) * 256 + cls[on_objects]
    pairs = np.bincount(key, minlength=256 * 256).reshape(256, 256)
    obj_t = np.asfortranarray(obj)  # pycocotools encodes column-major masks
    annotations = []
    for k in np.flatnonzero(pairs.sum(axis=1)):
        k = int(k)
        values = np.flatnonzero(pairs[k])
        if len(values) != 1 or not 1 <= int(values[0]) <= num_things:
            raise Seg2Error(
                f"{obj_path}: object {k} covers class value(s) {values.tolist()} in {cls_path}; "
                f"expected exactly one class in 1..{num_things}"
            )
        rle = mask_util.encode((obj_t == k).view(np.uint8))
        x, y, w, h = (int(v) for v in mask_util.toBbox(rle))
        annotations.append(
            {
                "bbox": [x, y, x + w, y + h],
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": int(values[0]) - 1,
                "segmentation": rle,
                "iscrowd": 0,
                "voc_object_index": k,
            }
        )
    return annotations


def load_voc_instances(
    voc_root: str,
    split: str,
    class_names: Sequence[str] = VOC_CLASSES,
    require_palette: bool = True,
    with_sem_seg: bool = False,
) -> List[dict]:
    """
    Load a VOC-style split as instance segmentation dicts: one annotation per object of
    ``SegmentationObject`` (an RLE mask, its XYXY box, its class from ``SegmentationClass``).
    Void pixels (255) belong to no object; background is 0.

    Args:
        voc_root (str): the folder holding ``JPEGImages``, ``SegmentationClass``,
            ``SegmentationObject`` and ``ImageSets``.
        split (str): a file name (without ``.txt``) in ``ImageSets/Segmentation``.
        class_names (list[str]): the thing classes, label values 1..N.
        require_palette (bool): label PNGs must be palette images, as VOC ships them.
        with_sem_seg (bool): also set ``sem_seg_file_name`` (the ``SegmentationClass`` PNG).

    Raises:
        Seg2Error: a missing image or PNG, a size mismatch, a label value that is neither a class
            nor 255, or an object whose pixels span several classes.
    """
    split_file = os.path.join(voc_root, "ImageSets", "Segmentation", split + ".txt")
    num_things = len(class_names)
    records = []
    for name in read_voc_split(voc_root, split):
        r = _image_record(voc_root, name, split_file)
        cls_path = os.path.join(voc_root, "SegmentationClass", name + ".png")
        obj_path = os.path.join(voc_root, "SegmentationObject", name + ".png")
        maps = []
        for path in (cls_path, obj_path):
            if not os.path.isfile(path):
                raise Seg2Error(f"{path}: mask for id {name!r} listed in {split_file} not found")
            m = read_label_map(path, expect_palette=require_palette)
            _check_same_size(r, path, m.shape)
            maps.append(m)
        cls, obj = maps
        check_label_values(cls, cls_path, num_things + 1, IGNORE_LABEL)
        r["annotations"] = _instances_from_maps(obj, cls, obj_path, cls_path, num_things)
        if with_sem_seg:
            r["sem_seg_file_name"] = cls_path
        records.append(r)
    return records


def register_voc_sem_seg(
    name: str,
    voc_root: str,
    split: str,
    class_names: Sequence[str] = VOC_CLASSES,
    sbd_root: Optional[str] = None,
    require_palette: bool = True,
):
    """
    Register a VOC-style semantic segmentation split under ``name`` (evaluator_type "sem_seg").
    Nothing is read until the dataset is loaded.

    Args:
        name (str): the dataset name, e.g. "my_voc_sem_seg_train".
        voc_root (str): the VOC-style folder.
        split (str): the split file name; with ``sbd_root``, the VOC split that SBD augments.
        class_names (list[str]): the classes of label values 1..N (0 is background).
        sbd_root (str or None): build the SBD-augmented set (:func:`load_voc_sem_seg_train_aug`).
        require_palette (bool): label PNGs must be palette images.
    """
    num_classes = len(class_names) + 1
    if sbd_root is None:
        # Validation splits are decoded at load time: a wrong label would corrupt mIoU, and no
        # training mapper reads them.
        check = split != "train"

        def loader():
            return load_voc_sem_seg(
                voc_root, split, require_palette, num_classes, check_labels=check
            )

    else:

        def loader():
            return load_voc_sem_seg_train_aug(
                voc_root, sbd_root, require_palette, train_split=split
            )

    meta = voc_metadata(class_names)
    meta.update(evaluator_type="sem_seg", dirname=voc_root, split=split)
    if sbd_root is not None:
        meta["sbd_root"] = sbd_root
    register_dataset(name, loader, meta)


def register_voc_instances(
    name: str,
    voc_root: str,
    split: str,
    class_names: Sequence[str] = VOC_CLASSES,
    with_sem_seg: bool = False,
    require_palette: bool = True,
):
    """
    Register a VOC-style instance segmentation split under ``name``: evaluator_type "coco", or
    "coco_sem_seg" with ``with_sem_seg`` (records then carry ``sem_seg_file_name`` too). COCO
    evaluation converts the records to a COCO JSON in the output folder (no JSON is needed).
    """
    meta = voc_metadata(class_names)
    meta.update(
        evaluator_type="coco_sem_seg" if with_sem_seg else "coco", dirname=voc_root, split=split
    )
    register_dataset(
        name,
        lambda: load_voc_instances(voc_root, split, class_names, require_palette, with_sem_seg),
        meta,
    )
