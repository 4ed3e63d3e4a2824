"""
The synthetic "seg2_shapes_panoptic" dataset: the shapes of :mod:`seg2.data.shapes` (things:
circle, square, triangle) over two stuff regions, a smooth sky above a wavy horizon and a striped
ground below it, written deterministically from a seed in COCO's panoptic layout:

* ``coco/{split}/*.jpg``: the images;
* ``coco/annotations/panoptic_{split}.json`` and ``coco/panoptic_{split}/*.png``: COCO panoptic
  segments (PNG colour = segment id, R + 256 G + 256^2 B; id 0 = void);
* ``coco/annotations/instances_{split}.json``: the things as COCO polygons (as PanopticFPN trains
  on COCO's instance polygons);
* ``coco/panoptic_stuff_{split}/*.png``: semantic maps in detectron2's separated layout (0 = any
  thing, 1 = sky, 2 = ground, 255 = void), as detectron2's ``prepare_panoptic_fpn.py`` makes them.

Every pixel is one thing, sky, ground, or void where two things' rasterised polygons overlap
(the thing segments of the PNG are the instance polygons less those pixels). It uses the cache
machinery of :func:`seg2.data.shapes.generate_shapes` (manifest, resumable, locked); the plain
``seg2_shapes`` files are untouched by it.
"""

import json
import logging
import os
import shutil
from typing import Dict, Optional

import cv2
import numpy as np
from PIL import Image

from ..utils.progress import log_progress
from . import shapes as _shapes
from .panoptic import id2rgb
from .shapes import SHAPES_CLASSES, _background, _paint_instances, _place_shapes, _visible_instances

__all__ = [
    "PANOPTIC_CATEGORIES",
    "PANOPTIC_STUFF_CLASSES",
    "default_shapes_panoptic_root",
    "generate_shapes_panoptic",
]

logger = logging.getLogger(__name__)

PANOPTIC_STUFF_CLASSES = ("sky", "ground")
# COCO panoptic categories: the things keep their seg2_shapes ids (1..3), the stuff follows.
PANOPTIC_CATEGORIES = [
    {"id": i + 1, "name": n, "isthing": 1, "supercategory": "shape"}
    for i, n in enumerate(SHAPES_CLASSES)
] + [
    {"id": len(SHAPES_CLASSES) + 1 + i, "name": n, "isthing": 0, "supercategory": "stuff"}
    for i, n in enumerate(PANOPTIC_STUFF_CLASSES)
]
_COLOURS = {
    "circle": (220, 20, 60),
    "square": (0, 142, 0),
    "triangle": (0, 0, 230),
    "sky": (70, 130, 180),
    "ground": (152, 110, 60),
}
for _c in PANOPTIC_CATEGORIES:
    _c["color"] = list(_COLOURS[_c["name"]])
# Bump when the output changes, so old caches are regenerated.
PANOPTIC_GENERATOR_VERSION = 1
# Segment ids: category id x 1000 + instance number (things) or 0 (stuff), so ids use two bytes.
_ID_DIVISOR = 1000


def default_shapes_panoptic_root() -> str:
    """Beside the shapes cache: ``<seg2_shapes root>_panoptic`` (see
    :func:`seg2.data.shapes.default_shapes_root`)."""
    return os.path.normpath(_shapes.default_shapes_root()) + "_panoptic"


def _sky(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth sky: a vertical gradient between two bluish colours, light noise."""
    yy = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    hues = rng.integers(95, 115, size=2)
    top = cv2.cvtColor(
        np.uint8([[[hues[0], rng.integers(90, 200), rng.integers(170, 240)]]]), cv2.COLOR_HSV2RGB
    )
    bottom = cv2.cvtColor(
        np.uint8([[[hues[1], rng.integers(20, 90), rng.integers(200, 256)]]]), cv2.COLOR_HSV2RGB
    )
    top, bottom = top[0, 0].astype(np.float32), bottom[0, 0].astype(np.float32)
    img = (1 - yy) * top + yy * bottom
    return np.broadcast_to(img, (size, size, 3)) + rng.normal(0, 3, size=(size, size, 3))


def _render_panoptic_image(rng: np.random.Generator, size: int, max_instances: int):
    """
    One image and its panoptic segmentation.

    Returns:
        image (H, W, 3) uint8 RGB, segment ids (H, W) int64 (0 void), segments_info (COCO panoptic
        entries without area/bbox), the kept instances [(class index, polygons)] and the separated
        semantic map (H, W) uint8.
    """
    xs = np.arange(size, dtype=np.float32)
    horizon = size * rng.uniform(0.3, 0.6) + size * rng.uniform(0.02, 0.08) * np.sin(
        rng.uniform(0.03, 0.12) * xs + rng.uniform(0, 2 * np.pi)
    )
    sky = np.arange(size, dtype=np.float32)[:, None] < horizon[None, :]
    img = np.where(sky[..., None], _sky(rng, size), _background(rng, size))
    full_masks, classes = _place_shapes(rng, size, max_instances)
    instances, obj, count = _visible_instances(full_masks, classes, size)
    img = _paint_instances(rng, img, obj, instances)

    void = count >= 2  # where two things' polygons overlap
    ids = np.zeros((size, size), dtype=np.int64)
    sem = np.full((size, size), 255, dtype=np.uint8)
    segments, kept = [], []
    for k, (cls, polygons) in enumerate(instances, start=1):
        m = (obj == k) & ~void
        if not m.any():
            continue
        kept.append((cls, polygons))
        seg_id = (cls + 1) * _ID_DIVISOR + len(kept)
        ids[m], sem[m] = seg_id, 0
        segments.append({"id": seg_id, "category_id": cls + 1, "iscrowd": 0})
    for j, region in enumerate((sky, ~sky)):
        m = region & (obj == 0)
        if not m.any():
            continue
        cat = len(SHAPES_CLASSES) + 1 + j
        ids[m], sem[m] = cat * _ID_DIVISOR, j + 1
        segments.append({"id": cat * _ID_DIVISOR, "category_id": cat, "iscrowd": 0})
    return img, ids, segments, kept, sem


def _write_image(
    out: str, split: str, split_index: int, i: int, image_size: int, seed: int, max_instances: int
):
    """Render image ``i`` of ``split`` and write its files; then its record, last."""
    # Its own seed sequence (a 4th entry): the panoptic images differ from seg2_shapes' ones.
    rng = np.random.default_rng([seed, split_index, i, 1])
    img, ids, segments, instances, sem = _render_panoptic_image(rng, image_size, max_instances)
    name = f"shapes_{split}_{i:05d}"
    coco = os.path.join(out, "coco")
    Image.fromarray(img).save(os.path.join(coco, split, name + ".jpg"), quality=92)
    Image.fromarray(id2rgb(ids)).save(os.path.join(coco, f"panoptic_{split}", name + ".png"))
    Image.fromarray(sem, mode="L").save(
        os.path.join(coco, f"panoptic_stuff_{split}", name + ".png")
    )
    for s in segments:
        ys, xs = np.nonzero(ids == s["id"])
        s["area"] = int(len(ys))
        s["bbox"] = [
            int(xs.min()),
            int(ys.min()),
            int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1),
        ]
    record = {
        "name": name,
        "instances": [[cls, polygons] for cls, polygons in instances],
        "segments": segments,
    }
    part = _shapes._part_path(out, split, i)
    with open(part + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(part + ".tmp", part)


def _generate_into(
    out: str, splits: Dict[str, int], image_size: int, seed: int, max_instances: int
):
    coco = os.path.join(out, "coco")
    for d in ["annotations"] + [
        f"{p}{s}" for s in splits for p in ("", "panoptic_", "panoptic_stuff_")
    ]:
        os.makedirs(os.path.join(coco, d), exist_ok=True)
    os.makedirs(os.path.join(out, _shapes._PARTS), exist_ok=True)
    jobs = [(s, k, i) for k, (s, n) in enumerate(sorted(splits.items())) for i in range(n)]
    todo = [j for j in jobs if not os.path.isfile(_shapes._part_path(out, j[0], j[2]))]
    for split, split_index, i in log_progress(
        todo, len(todo), "seg2_shapes_panoptic images", logger
    ):
        _write_image(out, split, split_index, i, image_size, seed, max_instances)
    ann_id = 1
    for split, num_images in sorted(splits.items()):
        instances, ann_id = _shapes._coco_split(out, split, num_images, image_size, seed, ann_id)
        instances["info"]["description"] = f"seg2_shapes_panoptic {split}, seed {seed}"
        annotations = []
        for i in range(num_images):
            with open(_shapes._part_path(out, split, i)) as f:
                record = json.load(f)
            annotations.append(
                {
                    "image_id": i + 1,
                    "file_name": record["name"] + ".png",
                    "segments_info": record["segments"],
                }
            )
        panoptic = {
            "info": {"description": f"seg2_shapes_panoptic {split}, seed {seed}"},
            "images": instances["images"],
            "annotations": annotations,
            "categories": PANOPTIC_CATEGORIES,
        }
        for kind, data in (("instances", instances), ("panoptic", panoptic)):
            with open(os.path.join(coco, "annotations", f"{kind}_{split}.json"), "w") as f:
                json.dump(data, f, sort_keys=True)
    shutil.rmtree(os.path.join(out, _shapes._PARTS))


def generate_shapes_panoptic(
    root: str,
    splits: Optional[Dict[str, int]] = None,
    image_size: int = _shapes.DEFAULT_IMAGE_SIZE,
    seed: int = _shapes.DEFAULT_SEED,
    max_instances: int = 5,
) -> str:
    """
    Make sure ``root`` holds the panoptic shapes dataset for these parameters, generating it if
    needed (same arguments and cache behaviour as :func:`seg2.data.generate_shapes`).

    Returns:
        str: ``root``.
    """
    splits = dict(_shapes.DEFAULT_SPLITS if splits is None else splits)
    params = _shapes._params(splits, image_size, seed, max_instances)
    params["panoptic_generator_version"] = PANOPTIC_GENERATOR_VERSION
    return _shapes._ensure_cache(
        root,
        params,
        lambda out: _generate_into(out, splits, image_size, seed, max_instances),
        "seg2_shapes_panoptic",
    )
