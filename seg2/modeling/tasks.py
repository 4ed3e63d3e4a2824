"""Which outputs ("instances", "sem_seg", "panoptic_seg") a meta-architecture predicts, for
picking evaluators."""

import logging

from detectron2.data import MetadataCatalog

from ..utils import Seg2Error

logger = logging.getLogger(__name__)

# detectron2's own meta-architectures; seg2's add themselves where they are defined.
META_ARCH_TASKS = {
    "GeneralizedRCNN": frozenset({"instances"}),
    "ProposalNetwork": frozenset(),
    "SemanticSegmentor": frozenset({"sem_seg"}),
    # panoptic_seg only while MODEL.PANOPTIC_FPN.COMBINE.ENABLED (detectron2's default), see model_tasks
    "PanopticFPN": frozenset({"instances", "sem_seg", "panoptic_seg"}),
}


def model_tasks(cfg) -> frozenset:
    """The outputs the model of ``cfg`` predicts; unknown meta-architectures are an error."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in META_ARCH_TASKS:
        raise KeyError(
            f"MODEL.META_ARCHITECTURE={name!r}: seg2 does not know which outputs it predicts; add it "
            "to seg2.modeling.META_ARCH_TASKS"
        )
    tasks = META_ARCH_TASKS[name]
    if name == "PanopticFPN" and not cfg.MODEL.PANOPTIC_FPN.COMBINE.ENABLED:
        tasks = tasks - {"panoptic_seg"}  # PanopticFPN.forward combines the outputs only when enabled
    if name == "Seg2MultiTaskRCNN" and panoptic_output(cfg):
        tasks = tasks | {"panoptic_seg"}
    return tasks


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


_logged = set()


def panoptic_output(cfg) -> bool:
    """
    Whether ``Seg2MultiTaskRCNN`` built from ``cfg`` returns "panoptic_seg" (detectron2's
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
