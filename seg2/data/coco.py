"""
COCO-format loading and registration: a checked wrapper of detectron2's ``load_coco_json``
(checks in :mod:`seg2.data.coco_json`), an optional per-pixel semantic map per image, or semantic
maps derived from the instances (the rule and its cache in :mod:`seg2.data.sem_seg_cache`).
"""

import importlib
import os
import warnings
from typing import List, Optional, Sequence

from detectron2.data import MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image

from ..constants import IGNORE_LABEL
from ..utils import Seg2Error
from ..utils.files import file_sha256
from .catalog import register_dataset
from .coco_json import check_coco_json as _check_coco_json
from .label_map import label_map_size, warn_ignore_only_sample
from .sem_seg_cache import generate_coco_sem_seg as _generate_coco_sem_seg
from .sem_seg_cache import label_map_path

__all__ = [
    "load_coco_with_sem_seg",
    "load_coco_sem_seg",
    "register_coco_with_sem_seg",
    "register_coco_sem_seg",
]

# Names that lived here before this module was split by job: still importable from here, with a
# DeprecationWarning, for one release. Import them from seg2.data.
_MOVED = {
    "check_coco_json": "coco_json",
    "BOX_TOLERANCE": "coco_json",
    "coco_sem_seg_map": "sem_seg_cache",
    "generate_coco_sem_seg": "sem_seg_cache",
    "SEM_SEG_RULE_VERSION": "sem_seg_cache",
}


def __getattr__(name):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    new = f"{__package__}.{_MOVED[name]}"
    warnings.warn(
        f"{__name__}.{name} moved to {new}.{name}; import it from seg2.data "
        "(the old place goes away in the next release)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(new), name)


# EXIF orientations that rotate by 90 degrees: detectron2's read_image swaps width and height.
_EXIF_TRANSPOSED = (5, 6, 7, 8)


def _oriented_size(im: Image.Image):
    """(width, height) of an open image as detectron2's ``read_image`` returns it, after its EXIF
    orientation, from the header only (a PNG's EXIF is read where it precedes the pixels)."""
    width, height = im.size
    if im.format == "PNG" and "exif" not in im.info:
        return width, height  # PIL would decode the whole PNG to look for a late eXIf chunk
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:  # a broken EXIF block: detectron2 ignores it too
        return width, height
    return (height, width) if orientation in _EXIF_TRANSPOSED else (width, height)


def _check_image_files(records: List[dict], json_file: str):
    """Every image exists, PIL recognises its header, and its size (after its EXIF orientation)
    is the width/height the JSON gives it, as the VOC and folder loaders check: an empty file, a
    text file named .jpg or an image of another size is an error naming it now, not a crash in
    training (detectron2's SizeMismatchError) or a wrong box scale.
    Reads the first bytes of each file only: 0.12-0.14 ms per image, 1.2-1.4 s per 10,000 images
    on a warm page cache, about twice the JSON loading itself
    (tools/benchmarks/benchmark_image_check.py);
    ``check_images=False`` skips it. A truncated image body is found when the mapper decodes it."""
    for r in records:
        path = r["file_name"]
        if not os.path.isfile(path):
            raise Seg2Error(f"{path}: image for id {r['image_id']} listed in {json_file} not found")
        try:
            with Image.open(path) as im:  # reads the header only
                width, height = _oriented_size(im)
        except (OSError, SyntaxError, ValueError) as e:
            raise Seg2Error(
                f"{path}: cannot read the image for id {r['image_id']} listed in {json_file} ({e})"
            ) from e
        if (width, height) != (r["width"], r["height"]):
            raise Seg2Error(
                f"{path}: image is {width}x{height} (WxH, after its EXIF orientation) but "
                f"{json_file} gives image id {r['image_id']} as {r['width']}x{r['height']}"
            )


def _set_semantic_metadata(dataset_name: Optional[str]):
    """Derive ``stuff_classes`` (background + things) and the ignore label from the thing classes
    that ``load_coco_json`` put into the metadata, where they are not set yet."""
    if dataset_name is None:
        return
    meta = MetadataCatalog.get(dataset_name)
    things = list(meta.thing_classes)
    if "stuff_classes" not in meta.as_dict():
        meta.stuff_classes = ["background"] + things
    if "ignore_label" not in meta.as_dict():
        meta.ignore_label = IGNORE_LABEL


def _load_checked(
    json_file: str, image_root: str, dataset_name: Optional[str], check_images: bool
) -> List[dict]:
    _check_coco_json(json_file)
    records = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])
    if check_images:
        _check_image_files(records, json_file)
    _set_semantic_metadata(dataset_name)
    return records


def load_coco_with_sem_seg(
    json_file: str,
    image_root: str,
    sem_seg_root: str = None,
    dataset_name: str = None,
    check_images: bool = True,
):
    """
    Load a COCO instances JSON with detectron2's ``load_coco_json`` after checking it
    (:func:`~seg2.data.coco_json.check_coco_json`) and, when ``sem_seg_root`` is given, attach to
    every record the semantic map ``<sem_seg_root>/<image stem>.png`` as ``sem_seg_file_name``, so
    one record feeds both Mask R-CNN and a semantic head. Images without annotations are kept
    (training drops them with detectron2's counted ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``).

    Args:
        json_file (str): path to the COCO instances JSON.
        image_root (str): folder the JSON's ``file_name`` entries are relative to.
        sem_seg_root (str or None): folder of label-map PNGs named after the images.
        dataset_name (str or None): if given, thing classes and id mapping go into its metadata.
        check_images (bool): check that every image file exists and has an image header PIL
            reads (the file's first bytes; see :func:`_check_image_files`). Off: images are only
            read by the mapper, which skips an unreadable one in training.

    Returns:
        list[dict]: detectron2's standard dataset dicts.
    """
    records = _load_checked(json_file, image_root, dataset_name, check_images)
    if sem_seg_root is not None:
        for r in records:
            path = label_map_path(sem_seg_root, r)
            if not os.path.isfile(path):
                raise Seg2Error(
                    f"{path}: semantic map for image {r['file_name']} (id {r['image_id']}) not "
                    "found"
                )
            h, w = label_map_size(path)
            if (h, w) != (r["height"], r["width"]):
                raise Seg2Error(
                    f"{path}: label map is {w}x{h} (WxH) but {json_file} gives its image "
                    f"{r['file_name']} as {r['width']}x{r['height']}"
                )
            r["sem_seg_file_name"] = path
        warn_ignore_only_sample(records)  # 0/255 binary masks: warned about now, not after training
    return records


def load_coco_sem_seg(
    json_file: str,
    image_root: str,
    cache_dir: str,
    dataset_name: Optional[str] = None,
    with_instances: bool = False,
    num_workers: int = 0,
    check_images: bool = True,
) -> List[dict]:
    """
    Load a COCO instances JSON as semantic segmentation records whose maps are derived from the
    instances (generated into ``cache_dir`` on first use, see
    :func:`~seg2.data.sem_seg_cache.generate_coco_sem_seg`).

    Args:
        json_file, image_root, dataset_name, check_images: as in :func:`load_coco_with_sem_seg`.
        cache_dir (str): where the maps are (or will be) written.
        with_instances (bool): keep ``annotations`` in the records (multi-task), else drop them.
        num_workers (int): processes for the first generation.
    """
    records = _load_checked(json_file, image_root, dataset_name, check_images)
    # Keyed on the JSON's content: an edit that keeps its name and size is a different source.
    source = {"json_file": os.path.basename(json_file), "json_sha256": file_sha256(json_file)}
    _generate_coco_sem_seg(records, cache_dir, num_workers=num_workers, source=source)
    for r in records:
        r["sem_seg_file_name"] = label_map_path(cache_dir, r)
        if not with_instances:
            del r["annotations"]
    return records


def _things_metadata(thing_classes, metadata):
    meta = dict(metadata or {})
    if thing_classes is not None:
        meta["thing_classes"] = list(thing_classes)
        meta.setdefault("stuff_classes", ["background"] + list(thing_classes))
        meta.setdefault("ignore_label", IGNORE_LABEL)
    return meta


def register_coco_with_sem_seg(
    name: str,
    json_file: str,
    image_root: str,
    sem_seg_root: str,
    thing_classes: Optional[Sequence[str]] = None,
    metadata: Optional[dict] = None,
    check_images: bool = True,
):
    """
    Register a user's COCO-style instances JSON whose images also have label-map PNGs in
    ``sem_seg_root`` (values 0 background, 1..N the thing classes, 255 ignored, unless
    ``metadata`` gives other ``stuff_classes``). evaluator_type "coco_sem_seg". Without
    ``thing_classes``, the classes are read from the JSON when the dataset is first loaded.
    ``check_images``: as in :func:`load_coco_with_sem_seg`.
    """
    meta = _things_metadata(thing_classes, metadata)
    meta.update(
        json_file=json_file,
        image_root=image_root,
        sem_seg_root=sem_seg_root,
        evaluator_type="coco_sem_seg",
    )
    register_dataset(
        name,
        lambda: load_coco_with_sem_seg(
            json_file, image_root, sem_seg_root, name, check_images=check_images
        ),
        meta,
    )


def register_coco_sem_seg(
    name: str,
    json_file: str,
    image_root: str,
    cache_dir: str,
    with_instances: bool = False,
    thing_classes: Optional[Sequence[str]] = None,
    metadata: Optional[dict] = None,
    num_workers: int = 0,
    check_images: bool = True,
):
    """
    Register a user's COCO-style instances JSON as a semantic dataset (evaluator_type "sem_seg")
    or, with ``with_instances``, a multi-task one ("coco_sem_seg"), its maps derived from the
    instances into ``cache_dir`` on first load (:func:`~seg2.data.sem_seg_cache.coco_sem_seg_map`).
    Nothing is read or written at registration. ``check_images``: as in
    :func:`load_coco_with_sem_seg`.
    """
    meta = _things_metadata(thing_classes, metadata)
    meta.update(
        image_root=image_root,
        sem_seg_root=cache_dir,
        evaluator_type="coco_sem_seg" if with_instances else "sem_seg",
    )
    if with_instances:
        meta["json_file"] = json_file  # COCOEvaluator's ground truth
    register_dataset(
        name,
        lambda: load_coco_sem_seg(
            json_file, image_root, cache_dir, name, with_instances, num_workers, check_images
        ),
        meta,
    )
