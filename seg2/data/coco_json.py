"""
Checks of a COCO instances JSON before detectron2 loads it: what pycocotools and detectron2's
``load_coco_json`` accept silently (duplicate ids, dangling references, boxes outside the image)
becomes a :class:`Seg2Error` naming the file and the image or annotation.
"""

import json
import logging
import math
import os
from collections import Counter

from ..utils import Seg2Error

__all__ = ["check_coco_json", "BOX_TOLERANCE"]

logger = logging.getLogger(__name__)

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
