"""
COCO-format loading: a checked wrapper of detectron2's ``load_coco_json``, an optional per-pixel
semantic map per image, and semantic maps derived from the instance annotations.

Semantic maps derived from instances (``coco_2017_sem_seg_*``) follow one rule
(:func:`coco_sem_seg_map`):

* value 0 is background, value ``c + 1`` is thing class ``c`` (contiguous id), 255 is ignored;
* crowd regions (``iscrowd=1``) are 255 where no non-crowd instance covers them: they hold objects
  of their class whose extent is not delineated, so neither the class nor background is certain;
* where non-crowd instances overlap, the smaller instance (by mask area; ties: the later
  annotation) is on top, so small objects in front of large ones survive.

The maps are written once to a cache folder (one palette PNG per image, each written to a
temporary file and renamed) and reused: an interrupted generation resumes where it stopped, and
several processes may generate at once (distributed ranks split the work).
"""

import json
import logging
import math
import multiprocessing as mp
import os
from collections import Counter
from typing import List, Optional, Sequence

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import load_coco_json
from pycocotools import mask as mask_util

from ..utils import Seg2Error
from .catalog import register_dataset
from .label_map import label_map_size, write_label_map

__all__ = [
    "check_coco_json",
    "load_coco_with_sem_seg",
    "coco_sem_seg_map",
    "generate_coco_sem_seg",
    "load_coco_sem_seg",
    "register_coco_with_sem_seg",
    "register_coco_sem_seg",
]

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
# Bump when coco_sem_seg_map's output changes: caches made by another version are refused.
SEM_SEG_RULE_VERSION = 1
_SOURCE_MARKER = "seg2_source.json"
# A box may pass the image border by this much (pixels): annotation tools round coordinates.
BOX_TOLERANCE = 1.0


def _short(ids, n=5):
    ids = list(ids)
    return ", ".join(map(str, ids[:n])) + (f" ... ({len(ids)} in all)" if len(ids) > n else "")


def check_coco_json(json_file: str) -> dict:
    """
    Parse and check a COCO instances JSON before detectron2 loads it (pycocotools keeps the last
    of two images with the same id, and neither checks boxes against the image).

    Errors (:class:`Seg2Error` naming the file, and the image or annotation id): a file that is
    missing or does not parse; duplicate image or annotation ids; an annotation whose image or
    category is not in the file; a box that is malformed, has negative size or lies outside its
    image by more than ``BOX_TOLERANCE`` pixels; an RLE whose size is not its image's.

    Counted skip (logged once, with the annotation ids): polygons with fewer than 3 points, which
    detectron2's ``load_coco_json`` drops (an annotation left with no polygon is dropped too).

    Returns:
        dict: counts: ``images``, ``annotations``, ``images_without_annotations``,
        ``short_polygons``, ``annotations_without_valid_polygon``.
    """
    if not os.path.isfile(json_file):
        raise Seg2Error(f"{json_file}: COCO annotation file not found")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise Seg2Error(f"{json_file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise Seg2Error(f"{json_file}: cannot read the COCO annotation file ({e})") from e
    if not isinstance(data, dict):
        raise Seg2Error(f"{json_file}: expected a JSON object with 'images', 'annotations', 'categories'")
    data.setdefault("annotations", [])  # an image-info file (e.g. COCO test) has none
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise Seg2Error(f"{json_file}: missing or non-list {key!r} (not a COCO instances file)")

    images = {}
    for img in data["images"]:
        if img["id"] in images:
            raise Seg2Error(
                f"{json_file}: image id {img['id']} appears twice ({images[img['id']]['file_name']!r} and "
                f"{img['file_name']!r}); pycocotools would silently keep only one"
            )
        images[img["id"]] = img
    categories = {c["id"] for c in data["categories"]}
    ann_ids = Counter(a.get("id") for a in data["annotations"])
    dup = [i for i, n in ann_ids.items() if n > 1]
    if dup:
        raise Seg2Error(f"{json_file}: annotation id(s) {_short(dup)} appear more than once")

    short_polygons, empty_anns, annotated = 0, [], set()
    for a in data["annotations"]:
        aid = a.get("id")
        img = images.get(a.get("image_id"))
        if img is None:
            raise Seg2Error(f"{json_file}: annotation {aid} refers to image id {a.get('image_id')}, which is not in 'images'")
        annotated.add(img["id"])
        where = f"{json_file}: annotation {aid} (image id {img['id']}, {img['file_name']!r}, {img['width']}x{img['height']})"
        if a.get("category_id") not in categories:
            raise Seg2Error(f"{where}: category_id {a.get('category_id')} is not in 'categories'")
        box = a.get("bbox")
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            raise Seg2Error(f"{where}: bbox {box!r} is not [x, y, width, height]")
        x, y, w, h = box
        if w < 0 or h < 0:
            raise Seg2Error(f"{where}: bbox {box} has a negative width or height")
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > img["width"] + t or y + h > img["height"] + t:
            raise Seg2Error(f"{where}: bbox {box} (XYWH) lies outside the image")
        segm = a.get("segmentation")
        if isinstance(segm, list) and segm:
            bad = sum(1 for p in segm if len(p) < 6 or len(p) % 2)
            short_polygons += bad
            if bad == len(segm):
                empty_anns.append(aid)
        elif isinstance(segm, dict):
            if list(segm.get("size", [])) != [img["height"], img["width"]]:
                raise Seg2Error(f"{where}: RLE size {segm.get('size')} is not the image's [height, width]")
    if short_polygons:
        logger.warning(
            f"{json_file}: skipping {short_polygons} polygon(s) with fewer than 3 points; "
            f"{len(empty_anns)} annotation(s) have no other polygon and are dropped: ids {_short(empty_anns)}"
        )
    return {
        "images": len(images),
        "annotations": len(data["annotations"]),
        "images_without_annotations": len(images) - len(annotated),
        "short_polygons": short_polygons,
        "annotations_without_valid_polygon": len(empty_anns),
    }


def _check_image_files(records: List[dict], json_file: str):
    for r in records:
        if not os.path.isfile(r["file_name"]):
            raise Seg2Error(f"{r['file_name']}: image for id {r['image_id']} listed in {json_file} not found")


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


def _load_checked(json_file: str, image_root: str, dataset_name: Optional[str], check_images: bool) -> List[dict]:
    check_coco_json(json_file)
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
    (:func:`check_coco_json`) and, when ``sem_seg_root`` is given, attach to every record the
    semantic map ``<sem_seg_root>/<image stem>.png`` as ``sem_seg_file_name``, so one record feeds
    both Mask R-CNN and a semantic head. Images without annotations are kept (training drops them
    with detectron2's counted ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``).

    Args:
        json_file (str): path to the COCO instances JSON.
        image_root (str): folder the JSON's ``file_name`` entries are relative to.
        sem_seg_root (str or None): folder of label-map PNGs named after the images.
        dataset_name (str or None): if given, thing classes and id mapping go into its metadata.
        check_images (bool): check that every image file exists.

    Returns:
        list[dict]: detectron2's standard dataset dicts.
    """
    records = _load_checked(json_file, image_root, dataset_name, check_images)
    if sem_seg_root is not None:
        for r in records:
            stem = os.path.splitext(os.path.basename(r["file_name"]))[0]
            path = os.path.join(sem_seg_root, stem + ".png")
            if not os.path.isfile(path):
                raise Seg2Error(f"{path}: semantic map for image {r['file_name']} (id {r['image_id']}) not found")
            h, w = label_map_size(path)
            if (h, w) != (r["height"], r["width"]):
                raise Seg2Error(
                    f"{path}: label map is {w}x{h} (WxH) but {json_file} gives its image "
                    f"{r['file_name']} as {r['width']}x{r['height']}"
                )
            r["sem_seg_file_name"] = path
    return records


def _to_rle(segm, h: int, w: int) -> dict:
    """Compressed RLE of a polygon list, an (un)compressed RLE or a binary mask."""
    if isinstance(segm, list):
        return mask_util.merge(mask_util.frPyObjects(segm, h, w))
    if isinstance(segm, dict):
        return mask_util.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm
    return mask_util.encode(np.asfortranarray(np.asarray(segm, dtype=np.uint8)))


def coco_sem_seg_map(record: dict, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """
    The (H, W) uint8 semantic map of one detectron2 record with instance annotations, by the rule
    in this module's docstring: 0 background, ``category_id + 1`` for things, ``ignore_label`` on
    crowd regions no instance covers; smaller instances on top of larger ones.
    """
    h, w = record["height"], record["width"]
    sem = np.zeros((h, w), dtype=np.uint8)
    things = []
    for index, a in enumerate(record.get("annotations", [])):
        segm = a.get("segmentation")
        if segm is None or (isinstance(segm, list) and not segm):
            raise Seg2Error(
                f"{record['file_name']}: annotation {a.get('id', index)} has no segmentation; "
                "semantic maps are painted from instance masks"
            )
        rle = _to_rle(segm, h, w)
        if a.get("iscrowd", 0):
            sem[mask_util.decode(rle).astype(bool)] = ignore_label
        else:
            things.append((int(mask_util.area(rle)), index, rle, int(a["category_id"]) + 1))
    # Larger first, so smaller instances (painted later) end up on top; ties: later on top.
    for _, _, rle, value in sorted(things, key=lambda t: (-t[0], t[1])):
        sem[mask_util.decode(rle).astype(bool)] = value
    return sem


def _sem_seg_path(out_dir: str, record: dict) -> str:
    return os.path.join(out_dir, os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png")


def _write_one(args):
    record, path, ignore_label = args
    write_label_map(coco_sem_seg_map(record, ignore_label), path)
    return 1


def _check_source(out_dir: str, source: Optional[dict]):
    """Refuse a cache made from another annotation file or rule version; mark a new one."""
    if source is None:
        return
    source = dict(source, rule_version=SEM_SEG_RULE_VERSION)
    marker = os.path.join(out_dir, _SOURCE_MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            found = json.load(f)
        if found != source:
            raise Seg2Error(
                f"{out_dir} holds semantic maps made from {found}, not from {source}. Delete the "
                "folder (it is a cache) to regenerate it."
            )
        return
    tmp = f"{marker}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(source, f, sort_keys=True)
    os.replace(tmp, marker)


def generate_coco_sem_seg(
    records: Sequence[dict],
    out_dir: str,
    num_workers: int = 0,
    ignore_label: int = IGNORE_LABEL,
    source: Optional[dict] = None,
) -> int:
    """
    Write the semantic map of every record (:func:`coco_sem_seg_map`) to
    ``<out_dir>/<image stem>.png`` unless it is already there. Each file is written to a temporary
    file and renamed, so the folder never holds a partial map: a killed run resumes where it
    stopped, and concurrent processes at worst write the same file twice. Under
    ``torch.distributed``, ranks split the missing files and wait for each other.

    Args:
        records (list[dict]): detectron2 records with ``annotations`` (masks), height and width.
        out_dir (str): the cache folder.
        num_workers (int): processes to use (0: this process only).
        ignore_label (int): value of crowd regions.
        source (dict or None): identifies the annotations (file, size); a cache made from other
            annotations is refused instead of being silently mixed.

    Returns:
        int: the number of maps this process wrote.
    """
    from detectron2.utils import comm

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise Seg2Error(f"cannot create the semantic-map cache {out_dir!r}: {e.strerror or e}") from e
    _check_source(out_dir, source)
    stems = Counter(os.path.basename(_sem_seg_path(out_dir, r)) for r in records)
    clash = [s for s, n in stems.items() if n > 1]
    if clash:
        raise Seg2Error(f"{out_dir}: several images share the file stem of {_short(clash)}; their maps would collide")
    todo = [(r, p, ignore_label) for r in records for p in [_sem_seg_path(out_dir, r)] if not os.path.isfile(p)]
    world, rank = comm.get_world_size(), comm.get_rank()
    mine = todo[rank::world] if world > 1 else todo
    if world > 1:  # the ranks of one machine share its cores
        num_workers = min(num_workers, max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    if mine:
        logger.info(f"Writing {len(mine)} semantic maps to {out_dir} ({len(records) - len(todo)} already there) ...")
    written = 0
    if num_workers > 1 and len(mine) > 1:
        with mp.get_context("fork").Pool(num_workers) as pool:
            written = sum(pool.imap_unordered(_write_one, mine, chunksize=16))
    else:
        written = sum(_write_one(a) for a in mine)
    if world > 1:
        comm.synchronize()
        # A rank that failed has raised already; anything still missing is written here.
        written += sum(_write_one(a) for a in todo if not os.path.isfile(a[1]))
    return written


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
    instances (generated into ``cache_dir`` on first use, see :func:`generate_coco_sem_seg`).

    Args:
        json_file, image_root, dataset_name, check_images: as in :func:`load_coco_with_sem_seg`.
        cache_dir (str): where the maps are (or will be) written.
        with_instances (bool): keep ``annotations`` in the records (multi-task), else drop them.
        num_workers (int): processes for the first generation.
    """
    records = _load_checked(json_file, image_root, dataset_name, check_images)
    source = {"json_file": os.path.basename(json_file), "json_bytes": os.path.getsize(json_file)}
    generate_coco_sem_seg(records, cache_dir, num_workers=num_workers, source=source)
    for r in records:
        r["sem_seg_file_name"] = _sem_seg_path(cache_dir, r)
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
):
    """
    Register a user's COCO-style instances JSON whose images also have label-map PNGs in
    ``sem_seg_root`` (values 0 background, 1..N the thing classes, 255 ignored, unless
    ``metadata`` gives other ``stuff_classes``). evaluator_type "coco_sem_seg". Without
    ``thing_classes``, the classes are read from the JSON when the dataset is first loaded.
    """
    meta = _things_metadata(thing_classes, metadata)
    meta.update(json_file=json_file, image_root=image_root, sem_seg_root=sem_seg_root, evaluator_type="coco_sem_seg")
    register_dataset(name, lambda: load_coco_with_sem_seg(json_file, image_root, sem_seg_root, name), meta)


def register_coco_sem_seg(
    name: str,
    json_file: str,
    image_root: str,
    cache_dir: str,
    with_instances: bool = False,
    thing_classes: Optional[Sequence[str]] = None,
    metadata: Optional[dict] = None,
    num_workers: int = 0,
):
    """
    Register a user's COCO-style instances JSON as a semantic dataset (evaluator_type "sem_seg")
    or, with ``with_instances``, a multi-task one ("coco_sem_seg"), its maps derived from the
    instances into ``cache_dir`` on first load (:func:`coco_sem_seg_map`). Nothing is read or
    written at registration.
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
        lambda: load_coco_sem_seg(json_file, image_root, cache_dir, name, with_instances, num_workers),
        meta,
    )
