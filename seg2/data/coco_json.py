"""
Checks of a COCO instances JSON before detectron2 loads it: what pycocotools and detectron2's
``load_coco_json`` accept silently (duplicate ids, dangling references, boxes or polygons outside
the image, a missing ``area`` that only COCO evaluation trips over, after training) becomes a
:class:`Seg2Error` naming the file and the image or annotation.
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


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_image_entry(json_file: str, img):
    if not isinstance(img, dict) or "id" not in img:
        raise Seg2Error(f"{json_file}: an entry of 'images' has no 'id': {str(img)[:100]}")
    for key in ("file_name", "width", "height"):
        if key not in img:
            raise Seg2Error(f"{json_file}: image id {img['id']} has no {key!r}")
    for key in ("width", "height"):
        v = img[key]
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise Seg2Error(
                f"{json_file}: image id {img['id']}: {key} {v!r} is not a positive integer"
            )


def _check_polygons(where: str, polygons, img):
    """Every polygon is a flat list of finite numbers, its points within the image (plus the
    tolerance): a point outside is an annotation in another scale or with x and y swapped, which
    rasterising would cut off at the border without a word."""
    t = BOX_TOLERANCE
    w, h = img["width"], img["height"]
    for k, poly in enumerate(polygons):
        if not isinstance(poly, (list, tuple)) or not all(_is_number(v) for v in poly):
            raise Seg2Error(f"{where}: polygon {k} is not a flat list of numbers [x1, y1, ...]")
        points = list(zip(poly[0::2], poly[1::2]))
        outside = [(x, y) for x, y in points if not (-t <= x <= w + t and -t <= y <= h + t)]
        if outside:
            raise Seg2Error(
                f"{where}: polygon {k} has {len(outside)} of its {len(points)} points outside the "
                f"image by more than {t:g} px, e.g. (x, y) = {outside[0]}"
            )


def check_coco_json(json_file: str) -> dict:
    """
    Parse and check a COCO instances JSON before detectron2 loads it (pycocotools keeps the last
    of two images with the same id, and neither checks boxes against the image).

    Errors (:class:`Seg2Error` naming the file, and the image or annotation id): a file that is
    missing or does not parse; a file without any image (an empty split); an image without
    ``id``, ``file_name`` or a positive integer ``width`` / ``height``; duplicate image or
    annotation ids; an annotation whose image or category is not in the file; an annotation
    without a numeric, non-negative ``area`` (COCO's AP sizes objects by it: pycocotools fails
    on it at evaluation, after training); a box that is malformed, has negative size or lies
    outside its image by more than ``BOX_TOLERANCE`` pixels; a polygon with a coordinate that is
    not a finite number or lies outside its image by more than ``BOX_TOLERANCE`` pixels (they
    would be cut off without a word when rasterised); an RLE whose size is not its image's.
    Annotations without ``area`` are listed together (the first ids and the count).

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
        raise Seg2Error(
            f"{json_file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise Seg2Error(f"{json_file}: cannot read the COCO annotation file ({e})") from e
    if not isinstance(data, dict):
        raise Seg2Error(
            f"{json_file}: expected a JSON object with 'images', 'annotations', 'categories'"
        )
    data.setdefault("annotations", [])  # an image-info file (e.g. COCO test) has none
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise Seg2Error(f"{json_file}: missing or non-list {key!r} (not a COCO instances file)")

    if not data["images"]:
        raise Seg2Error(f"{json_file}: no images (an empty split): nothing to train or evaluate on")
    images = {}
    for img in data["images"]:
        _check_image_entry(json_file, img)
        if img["id"] in images:
            raise Seg2Error(
                f"{json_file}: image id {img['id']} appears twice "
                f"({images[img['id']]['file_name']!r} and "
                f"{img['file_name']!r}); pycocotools would silently keep only one"
            )
        images[img["id"]] = img
    categories = {c["id"] for c in data["categories"]}
    ann_ids = Counter(a.get("id") for a in data["annotations"])
    dup = [i for i, n in ann_ids.items() if n > 1]
    if dup:
        raise Seg2Error(f"{json_file}: annotation id(s) {_short(dup)} appear more than once")

    no_area = [a.get("id") for a in data["annotations"] if "area" not in a]
    if no_area:
        raise Seg2Error(
            f"{json_file}: {len(no_area)} annotation(s) have no 'area' (ids {_short(no_area)}); "
            "COCO evaluation sizes objects by it (pycocotools fails without it): add each object's "
            "area in pixels (pycocotools.mask.area of its mask)"
        )

    short_polygons, empty_anns, annotated = 0, [], set()
    for a in data["annotations"]:
        aid = a.get("id")
        img = images.get(a.get("image_id"))
        if img is None:
            raise Seg2Error(
                f"{json_file}: annotation {aid} refers to image id {a.get('image_id')}, which is "
                "not in 'images'"
            )
        annotated.add(img["id"])
        size = f"{img['width']}x{img['height']}"
        where = (
            f"{json_file}: annotation {aid} (image id {img['id']}, {img['file_name']!r}, {size})"
        )
        if a.get("category_id") not in categories:
            raise Seg2Error(f"{where}: category_id {a.get('category_id')} is not in 'categories'")
        area = a["area"]
        if not (_is_number(area) and area >= 0):
            raise Seg2Error(f"{where}: area {area!r} is not a non-negative number of pixels")
        box = a.get("bbox")
        if not (
            isinstance(box, (list, tuple))
            and len(box) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        ):
            raise Seg2Error(f"{where}: bbox {box!r} is not [x, y, width, height]")
        x, y, w, h = box
        if w < 0 or h < 0:
            raise Seg2Error(f"{where}: bbox {box} has a negative width or height")
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > img["width"] + t or y + h > img["height"] + t:
            raise Seg2Error(f"{where}: bbox {box} (XYWH) lies outside the image")
        segm = a.get("segmentation")
        if isinstance(segm, list) and segm:
            _check_polygons(where, segm, img)
            bad = sum(1 for p in segm if len(p) < 6 or len(p) % 2)
            short_polygons += bad
            if bad == len(segm):
                empty_anns.append(aid)
        elif isinstance(segm, dict):
            if list(segm.get("size", [])) != [img["height"], img["width"]]:
                raise Seg2Error(
                    f"{where}: RLE size {segm.get('size')} is not the image's [height, width]"
                )
    if short_polygons:
        logger.warning(
            f"{json_file}: skipping {short_polygons} polygon(s) with fewer than 3 points; "
            f"{len(empty_anns)} annotation(s) have no other polygon and are dropped: ids "
            f"{_short(empty_anns)}"
        )
    return {
        "images": len(images),
        "annotations": len(data["annotations"]),
        "images_without_annotations": len(images) - len(annotated),
        "short_polygons": short_polygons,
        "annotations_without_valid_polygon": len(empty_anns),
    }
