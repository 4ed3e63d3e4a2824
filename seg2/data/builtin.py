"""
Registers seg2's built-in dataset names, in the style of detectron2's ``builtin.py``.

``seg2_shapes_{train,val}``: the synthetic shapes dataset (see :mod:`seg2.data.shapes`), generated
on first use into ``default_shapes_root()``. Records carry both ``annotations`` and
``sem_seg_file_name``.
"""

import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .coco import load_coco_with_sem_seg
from .shapes import DEFAULT_SPLITS, IGNORE_LABEL, SHAPES_CLASSES, default_shapes_root, generate_shapes
from .voc_palette import VOC_PALETTE

SHAPES_DATASETS = tuple(f"seg2_shapes_{split}" for split in sorted(DEFAULT_SPLITS))


def load_shapes(root: str, split: str):
    """Generate the shapes dataset under ``root`` if needed and load ``split`` as dataset dicts."""
    generate_shapes(root)
    return load_coco_with_sem_seg(
        os.path.join(root, "coco", "annotations", f"instances_{split}.json"),
        os.path.join(root, "coco", split),
        os.path.join(root, "VOC2012", "SegmentationClass"),
        dataset_name=f"seg2_shapes_{split}",
    )


def _voc_colours(n):
    return [tuple(VOC_PALETTE[3 * i : 3 * i + 3]) for i in range(n)]


def register_seg2_shapes(root: str = None):
    """
    (Re-)register ``seg2_shapes_{train,val}`` with their data under ``root``.

    Args:
        root (str or None): the cache folder; None means :func:`default_shapes_root`.
    """
    root = root or default_shapes_root()
    for split in sorted(DEFAULT_SPLITS):
        name = f"seg2_shapes_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda root=root, split=split: load_shapes(root, split))
        colours = _voc_colours(len(SHAPES_CLASSES) + 1)
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPES_CLASSES),
            thing_colors=colours[1:],
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPES_CLASSES))},
            stuff_classes=["background"] + list(SHAPES_CLASSES),
            stuff_colors=colours,
            ignore_label=IGNORE_LABEL,
            json_file=os.path.join(root, "coco", "annotations", f"instances_{split}.json"),
            image_root=os.path.join(root, "coco", split),
            sem_seg_root=os.path.join(root, "VOC2012", "SegmentationClass"),
            # Both views exist: seg2's Trainer evaluates whichever the model predicts.
            evaluator_type="coco_sem_seg",
            dataset_root=root,
        )


register_seg2_shapes()
