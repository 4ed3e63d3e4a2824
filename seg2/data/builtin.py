"""
Registers seg2's built-in dataset names, in the style of detectron2's ``builtin.py``. Data live
under ``$DETECTRON2_DATASETS`` (default ``datasets/``); nothing is read at import time.

* ``seg2_shapes_{train,val}``: the synthetic shapes dataset (see :mod:`seg2.data.shapes`),
  generated on first use into ``default_shapes_root()``. Records carry both ``annotations`` and
  ``sem_seg_file_name``.
* ``seg2_shapes_panoptic_{train,val}``: the panoptic variant (see
  :mod:`seg2.data.shapes_panoptic`), generated on first use into
  ``default_shapes_panoptic_root()``: COCO panoptic PNGs + JSON, instances, separated semantic maps.
* ``voc_2012_sem_seg_{train,val}``, ``voc_2012_sem_seg_train_aug`` (VOC + SBD, 10,582 images),
  ``voc_2012_instance_{train,val}`` (instances and class maps): Pascal VOC 2012 in
  ``VOC2012/`` and SBD in ``SBD/`` (see :mod:`seg2.data.voc`).
* ``coco_2017_sem_seg_{train,val}``, ``coco_2017_multitask_{train,val}``: COCO 2017 with
  semantic maps derived from the instances, cached in ``coco/seg2_sem_seg/{train,val}2017``
  (see :mod:`seg2.data.coco`). ``coco_2017_{train,val}`` stay detectron2's own registration
  (instances only, so plain Mask R-CNN users never wait for the semantic cache), their metadata
  left as detectron2 sets it. ``coco_2017_multitask_*`` carry both views.
"""

import os

from detectron2.data import MetadataCatalog

from ..utils import Seg2Error
from .catalog import register_dataset
from .coco import load_coco_with_sem_seg, register_coco_sem_seg
from .panoptic import folder_metadata, load_coco_panoptic_separated
from .shapes import (
    DEFAULT_SPLITS,
    IGNORE_LABEL,
    SHAPES_CLASSES,
    default_shapes_root,
    generate_shapes,
    read_shapes_params,
)
from .shapes_panoptic import (
    PANOPTIC_CATEGORIES,
    PANOPTIC_GENERATOR_VERSION,
    default_shapes_panoptic_root,
    generate_shapes_panoptic,
)
from .voc import register_voc_instances, register_voc_sem_seg
from .voc_palette import palette_colors

SHAPES_DATASETS = tuple(f"seg2_shapes_{split}" for split in sorted(DEFAULT_SPLITS))


def _shapes_cache(root: str, split: str, generate, what: str, current=lambda params: True) -> dict:
    """
    The parameters of the shapes cache under ``root`` after ``generate`` made or repaired it: a
    cache made with other parameters keeps them (and is repaired with them if damaged); a missing
    or outdated one (``current`` False) is generated with the defaults. A :class:`Seg2Error` when
    it has no ``split``.
    """
    params = read_shapes_params(root)
    if params is None or not current(params):
        generate(root)
        params = read_shapes_params(root)
    else:
        keys = ("splits", "image_size", "seed", "max_instances")
        generate(root, **{k: params[k] for k in keys})
    if split not in params["splits"]:
        raise Seg2Error(
            f"{root}: the {what} cache has the splits {sorted(params['splits'])}, not {split!r}"
        )
    return params


def load_shapes(root: str, split: str):
    """
    Load ``split`` of the shapes dataset under ``root`` as dataset dicts. A cache made with other
    parameters (e.g. by ``generate_shapes(root, image_size=256)``) is used as it is, and repaired
    with its own parameters if damaged; a missing one is generated with the defaults.
    """
    _shapes_cache(root, split, generate_shapes, "shapes")
    return load_coco_with_sem_seg(
        os.path.join(root, "coco", "annotations", f"instances_{split}.json"),
        os.path.join(root, "coco", split),
        os.path.join(root, "VOC2012", "SegmentationClass"),
        dataset_name=f"seg2_shapes_{split}",
    )


def register_seg2_shapes(root: str = None):
    """
    (Re-)register ``seg2_shapes_{train,val}`` with their data under ``root``.

    Args:
        root (str or None): the cache folder; None means :func:`default_shapes_root`.
    """
    root = root or default_shapes_root()
    for split in sorted(DEFAULT_SPLITS):
        name = f"seg2_shapes_{split}"
        colours = palette_colors(len(SHAPES_CLASSES) + 1)
        register_dataset(
            name,
            lambda root=root, split=split: load_shapes(root, split),
            dict(
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
            ),
        )


SHAPES_PANOPTIC_DATASETS = tuple(f"seg2_shapes_panoptic_{s}" for s in sorted(DEFAULT_SPLITS))


def _shapes_panoptic_paths(root: str, split: str) -> dict:
    coco = os.path.join(root, "coco")
    return dict(
        image_root=os.path.join(coco, split),
        panoptic_root=os.path.join(coco, f"panoptic_{split}"),
        panoptic_json=os.path.join(coco, "annotations", f"panoptic_{split}.json"),
        instances_json=os.path.join(coco, "annotations", f"instances_{split}.json"),
        sem_seg_root=os.path.join(coco, f"panoptic_stuff_{split}"),
    )


def load_shapes_panoptic(root: str, split: str):
    """
    Load ``split`` of the panoptic shapes dataset under ``root`` (generated on first use, with
    the defaults; a cache made with other parameters is used as it is, as :func:`load_shapes`
    does) as separated-layout records (:func:`seg2.data.load_coco_panoptic_separated`).
    """
    _shapes_cache(
        root,
        split,
        generate_shapes_panoptic,
        "panoptic shapes",
        current=lambda p: p.get("panoptic_generator_version") == PANOPTIC_GENERATOR_VERSION,
    )
    paths = _shapes_panoptic_paths(root, split)
    return load_coco_panoptic_separated(dataset_name=f"seg2_shapes_panoptic_{split}", **paths)


def register_seg2_shapes_panoptic(root: str = None):
    """
    (Re-)register ``seg2_shapes_panoptic_{train,val}`` with their data under ``root`` (None:
    :func:`~seg2.data.shapes_panoptic.default_shapes_panoptic_root`): things circle, square,
    triangle; stuff sky, ground; detectron2's separated layout (semantic classes "things", "sky",
    "ground") and the metadata of the PQ evaluator (evaluator_type "coco_panoptic_seg").
    """
    root = root or default_shapes_panoptic_root()
    for split in sorted(DEFAULT_SPLITS):
        name = f"seg2_shapes_panoptic_{split}"
        meta = folder_metadata(PANOPTIC_CATEGORIES, **_shapes_panoptic_paths(root, split))
        meta["dataset_root"] = root
        register_dataset(name, lambda r=root, s=split: load_shapes_panoptic(r, s), meta)


# name -> (split, with_sem_seg)
# VOC has both views for every segmentation image: the instance records carry the class map too,
# so one name feeds Mask R-CNN, the semantic heads and the multi-task model.
VOC_2012_INSTANCE_SPLITS = {
    "voc_2012_instance_train": ("train", True),
    "voc_2012_instance_val": ("val", True),
}
# name -> (split, uses SBD)
VOC_2012_SEM_SEG_SPLITS = {
    "voc_2012_sem_seg_train": ("train", False),
    "voc_2012_sem_seg_val": ("val", False),
    "voc_2012_sem_seg_train_aug": ("train", True),
}
# name -> (image folder, instances JSON, with_instances); maps cached in coco/seg2_sem_seg/<image
# folder>
COCO_2017_SEM_SEG_SPLITS = {
    "coco_2017_sem_seg_train": ("train2017", "instances_train2017.json", False),
    "coco_2017_sem_seg_val": ("val2017", "instances_val2017.json", False),
    "coco_2017_multitask_train": ("train2017", "instances_train2017.json", True),
    "coco_2017_multitask_val": ("val2017", "instances_val2017.json", True),
}


def register_all_voc_2012(root: str):
    """Register the Pascal VOC 2012 names with ``root/VOC2012`` and ``root/SBD``."""
    voc_root, sbd_root = os.path.join(root, "VOC2012"), os.path.join(root, "SBD")
    for name, (split, with_sbd) in VOC_2012_SEM_SEG_SPLITS.items():
        register_voc_sem_seg(name, voc_root, split, sbd_root=sbd_root if with_sbd else None)
    for name, (split, with_sem_seg) in VOC_2012_INSTANCE_SPLITS.items():
        register_voc_instances(name, voc_root, split, with_sem_seg=with_sem_seg)


# detectron2's builtin registration of its COCO instance names: the 80 thing classes, their colours
# and COCO category ids.
COCO_THING_METADATA_SOURCE = "coco_2017_train"


def _coco_semantic_metadata():
    """COCO's thing metadata as detectron2 registers it for ``coco_2017_train`` (read through the
    public MetadataCatalog), plus the semantic view: background + 80 things, ignore label."""
    things = MetadataCatalog.get(COCO_THING_METADATA_SOURCE)
    return {
        "thing_classes": list(things.thing_classes),
        "thing_colors": list(things.thing_colors),
        "thing_dataset_id_to_contiguous_id": dict(things.thing_dataset_id_to_contiguous_id),
        "stuff_classes": ["background"] + list(things.thing_classes),
        "stuff_colors": [(0, 0, 0)] + [tuple(c) for c in things.thing_colors],
        "ignore_label": IGNORE_LABEL,
    }


def register_all_coco_2017_sem_seg(root: str):
    """Register the COCO 2017 semantic and multi-task names with ``root/coco``; detectron2's own
    ``coco_2017_*`` names are not touched."""
    semantic = _coco_semantic_metadata()
    for name, (image_dir, json_name, with_instances) in COCO_2017_SEM_SEG_SPLITS.items():
        register_coco_sem_seg(
            name,
            os.path.join(root, "coco", "annotations", json_name),
            os.path.join(root, "coco", image_dir),
            os.path.join(root, "coco", "seg2_sem_seg", image_dir),
            with_instances=with_instances,
            metadata=semantic,
            num_workers=min(8, os.cpu_count() or 1),
        )


register_seg2_shapes()
register_seg2_shapes_panoptic()
_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
register_all_voc_2012(_root)
register_all_coco_2017_sem_seg(_root)

from .camvid import register_all_camvid  # noqa: E402

register_all_camvid(_root)
