"""
The resolve step: what the data decides, turned into plain config values once, after the config
is loaded and before any model, mapper, loss or evaluator is built.

:func:`resolve_config` reads the metadata of the config's datasets and

* checks the config against them, once, naming the key: registered names, the class counts of
  the heads (``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` against ``stuff_classes``,
  ``MODEL.ROI_HEADS.NUM_CLASSES`` / ``MODEL.RETINANET.NUM_CLASSES`` against ``thing_classes``),
  the ignore value (``MODEL.SEM_SEG_HEAD.IGNORE_VALUE`` against ``ignore_label``: one value from
  label file to loss to metric), and whether the meta-architecture can run the inference mode
  asked for (``TEST.TILING``);
* decides whether ``Seg2MultiTaskRCNN`` merges a panoptic output:
``MODEL.PANOPTIC_FPN.COMBINE.ENABLED``
  stays on only for panoptic datasets in detectron2's separated class layout (checked, naming the
  key), and is turned off, with one log line, for data without panoptic metadata;
* turns ``MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING`` into numbers in ``MODEL.SEM_SEG_HEAD.CLASS_WEIGHT``
  (counted once from ``DATASETS.TRAIN``'s label maps, cached, :mod:`seg2.data.class_weights`),
  so the run's saved ``config.yaml`` holds the weights it used.

Models, losses and mappers then take plain values and never read a catalog (as detectron2's
heads and MMSegmentation's static ``class_weight`` do). seg2's ``setup``, ``Trainer``,
``Seg2Predictor`` and tools call it; it is idempotent, so calling it again costs little.
"""

import logging
import os
from typing import List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY

from .data import check_dataset_names, register_seg2_shapes, register_seg2_shapes_panoptic
from .data.class_weights import class_weights_for_datasets
from .tasks import META_ARCH_TASKS, model_tasks
from .utils import Seg2Error, config_keys

__all__ = ["resolve_config", "check_class_counts", "panoptic_output"]

logger = logging.getLogger(__name__)


def resolve_config(cfg, *, class_weights: bool = True):
    """
    A copy of ``cfg`` with what its datasets decide resolved (see the module docstring), frozen
    if ``cfg`` was.

    Args:
        cfg (CfgNode): a config with seg2's keys.
        class_weights (bool): count ``CLASS_WEIGHTING``'s weights where ``CLASS_WEIGHT`` is empty
            (training needs them; a model built only for inference does not, and its training
            labels may be absent).

    Raises:
        Seg2Error: a config that does not fit its datasets, naming the key.
    """
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    if cfg.SEG2.SHAPES_ROOT:
        register_seg2_shapes(cfg.SEG2.SHAPES_ROOT)
        register_seg2_shapes_panoptic(os.path.normpath(cfg.SEG2.SHAPES_ROOT) + "_panoptic")
    check_dataset_names(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "Seg2MultiTaskRCNN" and not panoptic_output(cfg):
        # The data decides: no panoptic metadata, no panoptic merge (a plain False in config.yaml).
        cfg.MODEL.PANOPTIC_FPN.COMBINE.ENABLED = False
    tasks = model_tasks(cfg) if cfg.MODEL.META_ARCHITECTURE in META_ARCH_TASKS else None
    _check_inference_mode(cfg, tasks)
    names = _dataset_names(cfg)
    check_class_counts(cfg, tasks, names)
    _check_ignore_value(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE, names)
    if class_weights and (tasks is None or "sem_seg" in tasks):
        _resolve_class_weights(cfg)
    if frozen:
        cfg.freeze()
    return cfg


def _dataset_names(cfg) -> List[str]:
    names = (
        list(cfg.DATASETS.TRAIN)
        + list(cfg.DATASETS.TEST)
        + list(cfg.SEG2.BEST_CHECKPOINT.TEST_DATASETS)
    )
    return list(dict.fromkeys(names))


def _check_inference_mode(cfg, tasks):
    if not cfg.TEST.TILING.ENABLED:
        return
    name = cfg.MODEL.META_ARCHITECTURE
    if tasks is not None and "sem_seg" not in tasks:
        raise Seg2Error(
            f"TEST.TILING.ENABLED=True but MODEL.META_ARCHITECTURE={name!r} predicts no semantic "
            "map; tiling applies "
            "to semantic models and the semantic branch of multi-task ones"
        )
    arch = META_ARCH_REGISTRY.get(name) if name in META_ARCH_REGISTRY else None
    if not getattr(arch, "tiles_in_inference", False):
        raise Seg2Error(
            f"TEST.TILING.ENABLED=True but MODEL.META_ARCHITECTURE={name!r} does not tile in its "
            "inference: use "
            "Seg2SemanticSegmentor (semantic) or Seg2MultiTaskRCNN (instances + semantic), which "
            "run the same "
            "heads (detectron2's SemSegFPNHead too)"
        )


def _metadata_classes(name: str, field: str):
    """``field`` of dataset ``name``'s metadata; a COCO-json dataset registered without its
    classes (detectron2's register_coco_instances) learns them when it is loaded, so it is
    loaded here once where the field is missing."""
    meta = MetadataCatalog.get(name)
    classes = meta.get(field, None)
    if classes is None and meta.get("json_file", None) and name in DatasetCatalog.list():
        logger.info(f"resolve: loading {name!r} to learn its {field}")
        DatasetCatalog.get(name)
        classes = MetadataCatalog.get(name).get(field, None)
    return classes


def check_class_counts(cfg, tasks, dataset_names: Sequence[str]):
    """
    A :class:`Seg2Error` naming the key when a class count of the model ``cfg`` builds differs
    from the metadata of a registered dataset of ``dataset_names``: the semantic head's
    ``NUM_CLASSES`` against ``stuff_classes``, the RoI heads' / RetinaNet's against
    ``thing_classes``. Too few classes would otherwise train with the extra classes silently
    treated as background (detectron2 does not check). ``tasks`` None (a meta-architecture seg2
    does not know): the keys of the heads the config turns on.
    """
    name = cfg.MODEL.META_ARCHITECTURE
    checks = []
    if tasks is None or "instances" in tasks:
        if name == "RetinaNet":
            checks.append(
                ("MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES, "thing_classes")
            )
        elif tasks is not None:
            checks.append(
                ("MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES, "thing_classes")
            )
    if tasks is not None and "sem_seg" in tasks:
        checks.append(
            ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, "stuff_classes")
        )
    registered = set(DatasetCatalog.list())
    for dataset in dataset_names:
        if dataset not in registered:
            continue
        for key, n, field in checks:
            classes = _metadata_classes(dataset, field)
            if classes is not None and len(classes) != n:
                raise Seg2Error(
                    f"{key}={n} but dataset {dataset!r} has {len(classes)} {field} "
                    f"({list(classes)[:6]}{'...' if len(classes) > 6 else ''}); set {key}: "
                    f"{len(classes)}"
                )


def _check_ignore_value(ignore_value: int, dataset_names: Sequence[str]):
    """A :class:`Seg2Error` when a dataset marks unlabelled pixels with a metadata
    ``ignore_label`` (which the evaluators skip) other than ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``
    (which the mapper and the loss skip)."""
    registered = set(MetadataCatalog.list())
    for name in dataset_names:
        ignore = MetadataCatalog.get(name).get("ignore_label", None) if name in registered else None
        if ignore is not None and ignore != ignore_value:
            raise Seg2Error(
                f"dataset {name!r} has ignore_label={ignore} in its metadata but "
                "MODEL.SEM_SEG_HEAD.IGNORE_VALUE="
                f"{ignore_value}: the loss would train on the pixels its metrics skip; set "
                f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE: {ignore} (or correct the dataset's metadata)"
            )


def _resolve_class_weights(cfg):
    sem = cfg.MODEL.SEM_SEG_HEAD
    method = sem.CLASS_WEIGHTING
    if not method:
        return
    if len(sem.CLASS_WEIGHT):
        logger.warning(
            f"MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING={method!r} and CLASS_WEIGHT are both set: using "
            "CLASS_WEIGHT as "
            "given (a resolved run's config.yaml); clear it to count the weights again"
        )
        return
    names = tuple(cfg.DATASETS.TRAIN)
    if not names and method:
        raise Seg2Error(
            f"MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING={method!r} computes the weights from "
            "DATASETS.TRAIN, which is empty"
        )
    with config_keys({"method": "MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING"}):
        weights = class_weights_for_datasets(
            names, sem.NUM_CLASSES, method, ignore_label=sem.IGNORE_VALUE
        )
    sem.CLASS_WEIGHT = [float(w) for w in weights]


# ---- panoptic output ----------------------------------------------------------------------------
def is_panoptic_dataset(meta) -> bool:
    """Whether a dataset's metadata describes panoptic data (detectron2's COCO panoptic
    registrations, :func:`seg2.data.register_coco_panoptic_folder`): thing and stuff id maps and a
    panoptic JSON or a panoptic evaluator type."""
    return (
        meta.get("thing_dataset_id_to_contiguous_id", None) is not None
        and meta.get("stuff_dataset_id_to_contiguous_id", None) is not None
        and (
            meta.get("panoptic_json", None) is not None
            or str(meta.get("evaluator_type", "")).endswith("panoptic_seg")
        )
    )


def is_separated_layout(meta) -> bool:
    """Whether a panoptic dataset's semantic classes are detectron2's separated layout (Panoptic
    FPN's): ``stuff_classes`` = [all things folded] + the stuff, each stuff id mapped to 1.."""
    stuff = meta.get("stuff_classes", None)
    ids = set(meta.get("stuff_dataset_id_to_contiguous_id", {}).values()) - {0}
    return stuff is not None and ids == set(range(1, len(stuff)))


_logged = set()  # log lines said once per process


def panoptic_output(cfg) -> bool:
    """
    Whether ``Seg2MultiTaskRCNN`` built from ``cfg`` should return "panoptic_seg" (detectron2's
    ``combine_semantic_and_instance_outputs`` of its instances and semantic map, as PanopticFPN):
    ``MODEL.PANOPTIC_FPN.COMBINE.ENABLED`` (detectron2's default True) and panoptic datasets in
    ``DATASETS.TRAIN`` / ``DATASETS.TEST``. Their semantic classes must be detectron2's separated
    layout (class 0 = all things, 1.. = stuff): the merge reads class 0 as "thing" and every other
    class as a stuff segment. Datasets with semantic classes but no panoptic metadata (seg2_shapes'
    background + things, VOC, CamVid) give no panoptic output: logged once.

    Raises:
        Seg2Error: a panoptic dataset in another layout, panoptic datasets mixed with
            non-panoptic semantic ones, or no instance masks (``MODEL.MASK_ON`` False).
    """
    if not cfg.MODEL.PANOPTIC_FPN.COMBINE.ENABLED:
        return False
    registered = set(MetadataCatalog.list())
    names = [n for n in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) if n in registered]
    panoptic = [n for n in names if is_panoptic_dataset(MetadataCatalog.get(n))]
    other = [
        n
        for n in names
        if n not in panoptic and MetadataCatalog.get(n).get("stuff_classes", None) is not None
    ]
    key = "MODEL.PANOPTIC_FPN.COMBINE.ENABLED"
    if not panoptic:
        message = (
            f"Seg2MultiTaskRCNN: no panoptic_seg output although {key}: the datasets "
            f"{other or names} have no panoptic metadata (thing/stuff id maps, panoptic_json), so "
            f"their semantic classes are not detectron2's separated layout; set {key} False to "
            "silence this"
        )
        if message not in _logged:
            _logged.add(message)
            logger.info(message)
        return False
    n = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if other:
        raise Seg2Error(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={n}: DATASETS mix the panoptic dataset "
            f"{panoptic[0]!r} (separated layout: class 0 = all things) with {other[0]!r}, whose "
            "semantic classes mean something else"
        )
    for name in panoptic:
        meta = MetadataCatalog.get(name)
        stuff = meta.get("stuff_classes", None)
        if not is_separated_layout(meta):
            raise Seg2Error(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={n} with {key}: dataset {name!r} gives "
                f"{len(stuff) if stuff is not None else 'no'} stuff_classes in another layout than "
                "detectron2's separated one (class 0 = all things, 1.. = stuff), which the "
                "panoptic merge needs: use its *_panoptic_separated registration (COCO: "
                f"NUM_CLASSES 54) or set {key} False"
            )
        if len(stuff) != n:
            raise Seg2Error(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={n} but the panoptic dataset {name!r} has "
                f"{len(stuff)} semantic classes (things + {len(stuff) - 1} stuff); "
                f"set MODEL.SEM_SEG_HEAD.NUM_CLASSES: {len(stuff)}"
            )
    if not cfg.MODEL.MASK_ON:
        raise Seg2Error(f"{key} on panoptic datasets needs instance masks: set MODEL.MASK_ON True")
    return True
