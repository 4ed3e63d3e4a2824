"""
COCO panoptic data in detectron2's "separated" layout (Panoptic FPN's): instances for the RoI
heads, a semantic map with class 0 = every thing folded into one class and 1.. = the stuff
classes for the semantic head, and the panoptic PNGs + JSON for the PQ evaluator.

detectron2 registers COCO 2017 itself (``coco_2017_{train,val}_panoptic_separated``; semantic
maps made by its ``datasets/prepare_panoptic_fpn.py``). :func:`register_coco_panoptic_folder`
registers a folder of panoptic PNGs + COCO panoptic JSON as users bring it, with the same
records and metadata: it reuses instances and semantic maps where given, and otherwise derives
them from the PNGs once, into a cache (:func:`separate_coco_panoptic`), checking that the PNGs
and the JSON agree.
"""

import json
import logging
import os
from typing import Dict, List, Optional

import numpy as np
from detectron2.data.datasets import load_coco_json
from PIL import Image
from pycocotools import mask as mask_util

from ..utils import Seg2Error
from ..utils.files import atomic_write, file_sha256
from ..utils.progress import log_progress
from .catalog import register_dataset
from .coco import _check_image_files
from .voc_palette import palette_colors

__all__ = [
    "IGNORE_LABEL",
    "folder_metadata",
    "id2rgb",
    "load_coco_panoptic_separated",
    "panoptic_metadata",
    "read_panoptic_json",
    "register_coco_panoptic_folder",
    "rgb2id",
    "separate_coco_panoptic",
]

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
# Bump when the derived files change, so old caches are rebuilt.
SEPARATE_VERSION = 1
_MANIFEST = "seg2_manifest.json"
_INSTANCES = "instances.json"


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids of a COCO panoptic PNG (H, W, 3): R + 256 G + 256^2 B. panopticapi's
    ``rgb2id`` (panopticapi is not on PyPI, and detectron2 has no public copy)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """The (H, W, 3) uint8 colours of segment ids, the inverse of :func:`rgb2id`."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def read_panoptic_json(panoptic_json: str) -> dict:
    """The parsed COCO panoptic JSON; a one-line :class:`Seg2Error` naming the file when it is
    missing, does not parse, lacks "annotations"/"categories", or has a category id twice (e.g. one
    thing and one stuff category with the same id, which no segment could tell apart)."""
    try:
        with open(panoptic_json) as f:
            data = json.load(f)
    except OSError as e:
        raise Seg2Error(
            f"{panoptic_json}: cannot read the panoptic JSON ({e.strerror or e})"
        ) from e
    except ValueError as e:
        raise Seg2Error(f"{panoptic_json}: not valid JSON ({e})") from e
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise Seg2Error(
                f"{panoptic_json}: no {key!r} list; a COCO panoptic JSON has 'images', "
                "'annotations', 'categories'"
            )
    seen: Dict[int, dict] = {}
    for c in data["categories"]:
        if c["id"] in seen:
            kinds = ["thing" if x.get("isthing") else "stuff" for x in (seen[c["id"]], c)]
            raise Seg2Error(
                f"{panoptic_json}: category id {c['id']} is given twice "
                f"({seen[c['id']]['name']!r} as {kinds[0]}, "
                f"{c['name']!r} as {kinds[1]}); thing and stuff categories need distinct ids"
            )
        if c["id"] == 0:
            raise Seg2Error(
                f"{panoptic_json}: category {c['name']!r} has id 0, which COCO panoptic "
                "reserves for void"
            )
        seen[c["id"]] = c
    return data


def panoptic_metadata(categories: List[dict], source: str = "categories") -> dict:
    """
    detectron2's metadata of the separated layout, from the categories of a COCO panoptic JSON
    (``source`` names them in errors):
    ``thing_classes`` / ``thing_colors`` / ``thing_dataset_id_to_contiguous_id`` (thing ids sorted,
    as ``load_coco_json`` maps them), ``stuff_classes`` = ["things"] + stuff names,
    ``stuff_colors`` and ``stuff_dataset_id_to_contiguous_id`` (stuff ids sorted -> 1.., and 0 -> 0
    for the folded things, as detectron2's ``coco_panoptic_separated`` metadata has it).
    """
    panoptic_json = source
    cats = sorted(categories, key=lambda c: c["id"])
    things = [c for c in cats if c.get("isthing", 0)]
    stuff = [c for c in cats if not c.get("isthing", 0)]
    if not things or not stuff:
        raise Seg2Error(
            f"{panoptic_json}: {len(things)} thing and {len(stuff)} stuff categories "
            "(isthing 1 / 0); the "
            "separated layout needs at least one of each"
        )
    if len(stuff) > 254:
        raise Seg2Error(
            f"{panoptic_json}: {len(stuff)} stuff categories; the separated layout's uint8 "
            "maps hold 254"
        )
    default = palette_colors(len(cats) + 1)[1:]
    colour = {c["id"]: tuple(c.get("color", default[i])) for i, c in enumerate(cats)}
    stuff_map = {0: 0}
    stuff_map.update({c["id"]: i + 1 for i, c in enumerate(stuff)})
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [colour[c["id"]] for c in things],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
        "stuff_classes": ["things"] + [c["name"] for c in stuff],
        # detectron2's colour of the folded things class (builtin_meta: "randomly picked")
        "stuff_colors": [(82, 18, 128)] + [colour[c["id"]] for c in stuff],
        "stuff_dataset_id_to_contiguous_id": stuff_map,
    }


def _png_path(panoptic_root: str, ann: dict) -> str:
    return os.path.join(panoptic_root, ann["file_name"])


def _separate_one(png: str, ann: dict, meta: dict, panoptic_json: str):
    """(separated semantic map, [COCO instance annotations without ids]) of one panoptic PNG."""
    if not os.path.isfile(png):
        raise Seg2Error(
            f"{png}: panoptic PNG of image {ann['image_id']} listed in {panoptic_json} not found"
        )
    try:
        with Image.open(png) as im:
            ids = rgb2id(np.asarray(im.convert("RGB")))
    except (OSError, SyntaxError, ValueError) as e:
        raise Seg2Error(f"{png}: cannot read the panoptic PNG ({e})") from e
    segments = {s["id"]: s for s in ann["segments_info"]}
    present, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.reshape(ids.shape)
    extra = [int(v) for v in present if v != 0 and int(v) not in segments]
    if extra:
        raise Seg2Error(
            f"{png}: segment id {extra[0]} is in the PNG but not in the segments_info of image "
            f"{ann['image_id']} "
            f"in {panoptic_json}"
            + (f" ({len(extra)} such ids: {extra[:5]})" if len(extra) > 1 else "")
        )
    things, stuff = (
        meta["thing_dataset_id_to_contiguous_id"],
        meta["stuff_dataset_id_to_contiguous_id"],
    )
    lut = np.full(len(present), IGNORE_LABEL, dtype=np.uint8)  # 0 (void) and unlisted -> ignore
    index = {int(v): i for i, v in enumerate(present)}
    annotations = []
    for seg_id, s in segments.items():
        if seg_id not in index:
            raise Seg2Error(
                f"{panoptic_json}: segment id {seg_id} (category {s['category_id']}) of image "
                f"{ann['image_id']} "
                f"has no pixel in {png}"
            )
        cat = s["category_id"]
        if cat in things:
            lut[index[seg_id]] = 0
            mask = np.asfortranarray((inverse == index[seg_id]).astype(np.uint8))
            rle = mask_util.encode(mask)
            annotations.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": cat,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": int(s.get("iscrowd", 0)),
                }
            )
        elif cat in stuff:
            lut[index[seg_id]] = stuff[cat]
        else:
            raise Seg2Error(
                f"{panoptic_json}: segment id {seg_id} of image {ann['image_id']} has "
                f"category_id {cat}, which is not "
                "in the file's categories"
            )
    return lut[inverse], annotations


def separate_coco_panoptic(
    panoptic_json: str, panoptic_root: str, out_dir: str, data: Optional[dict] = None
) -> str:
    """
    Derive the separated layout from COCO panoptic PNGs + JSON into ``out_dir``, as detectron2's
    ``datasets/prepare_panoptic_fpn.py`` does for the semantic maps, plus the instances:

    * ``out_dir/<PNG file_name>``: single-channel PNGs, 0 = any thing, 1.. = stuff (ids sorted),
      255 = void (id 0 in the panoptic PNG);
    * ``out_dir/instances.json``: a COCO instances JSON of the thing segments (RLE masks, boxes and
      areas of the PNG segments, ``iscrowd`` from the JSON), the thing categories, the images.

    A complete cache of the same JSON (by its SHA-256) is reused. Errors (:class:`Seg2Error`, one
    line naming the file and the id): a PNG that is missing or unreadable, a segment id in a PNG
    that its JSON entry does not list, a JSON segment with no pixel in its PNG, a segment whose
    category is not in the JSON.

    Returns:
        str: ``out_dir``.
    """
    key = {"version": SEPARATE_VERSION, "panoptic_json_sha256": file_sha256(panoptic_json)}
    manifest = os.path.join(out_dir, _MANIFEST)
    try:
        with open(manifest) as f:
            if json.load(f) == key:
                return out_dir
    except (OSError, ValueError):
        pass
    data = data if data is not None else read_panoptic_json(panoptic_json)
    meta = panoptic_metadata(data["categories"], panoptic_json)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise Seg2Error(
            f"cannot write the separated panoptic cache {out_dir!r}: {e.strerror or e}"
        ) from e
    logger.info(f"Deriving instances and semantic maps of {panoptic_json} into {out_dir} ...")
    annotations: List[dict] = []
    anns = data["annotations"]
    for ann in log_progress(anns, len(anns), "panoptic PNGs", logger):
        sem, instances = _separate_one(_png_path(panoptic_root, ann), ann, meta, panoptic_json)
        out = os.path.join(out_dir, ann["file_name"])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with atomic_write(out) as f:
            Image.fromarray(sem, mode="L").save(f, format="PNG", compress_level=1)
        for a in instances:
            a["id"] = len(annotations) + 1
            annotations.append(a)
    thing_ids = set(meta["thing_dataset_id_to_contiguous_id"])
    coco = {
        "info": {
            "description": f"instances derived by seg2 from {os.path.basename(panoptic_json)}"
        },
        "images": data.get("images", []),
        "annotations": annotations,
        "categories": [c for c in data["categories"] if c["id"] in thing_ids],
    }
    with atomic_write(os.path.join(out_dir, _INSTANCES), "w") as f:
        json.dump(coco, f)
    with atomic_write(manifest, "w") as f:
        json.dump(key, f)
    return out_dir


def _image_files(data: dict, image_root: str, panoptic_json: str) -> Dict[int, dict]:
    images = {im["id"]: im for im in data.get("images", [])}
    for ann in data["annotations"]:
        if ann["image_id"] not in images:
            raise Seg2Error(
                f"{panoptic_json}: annotation {ann['file_name']} names image id "
                f"{ann['image_id']}, not in 'images'"
            )
    return images


def load_coco_panoptic_separated(
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    instances_json: Optional[str] = None,
    sem_seg_root: Optional[str] = None,
    cache_dir: Optional[str] = None,
    dataset_name: Optional[str] = None,
) -> List[dict]:
    """
    Records of a COCO panoptic folder in the separated layout: per image of the panoptic JSON,
    ``file_name`` (``image_root`` + the JSON's image ``file_name``), ``image_id``, ``height``,
    ``width``, ``annotations`` (from ``instances_json``, else derived from the PNGs) and
    ``sem_seg_file_name`` (``sem_seg_root/<PNG file_name>``, else the derived map). Arguments as
    :func:`register_coco_panoptic_folder`.
    """
    data = read_panoptic_json(panoptic_json)
    images = _image_files(data, image_root, panoptic_json)
    if instances_json is None or sem_seg_root is None:
        if cache_dir is None:
            cache_dir = default_cache_dir(panoptic_root)
        separate_coco_panoptic(panoptic_json, panoptic_root, cache_dir, data)
    instances_json = instances_json or os.path.join(cache_dir, _INSTANCES)
    sem_seg_root = sem_seg_root or cache_dir
    records = {r["image_id"]: r for r in load_coco_json(instances_json, image_root, dataset_name)}
    out = []
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        r = records.get(ann["image_id"])
        if r is None:  # an image without things: load_coco_json keeps it only if listed in its JSON
            r = {
                "image_id": ann["image_id"],
                "height": image["height"],
                "width": image["width"],
                "annotations": [],
            }
        r = dict(r, file_name=os.path.join(image_root, image["file_name"]))
        r["sem_seg_file_name"] = os.path.join(sem_seg_root, ann["file_name"])
        out.append(r)
    if not out:
        raise Seg2Error(f"{panoptic_json}: no annotations")
    _check_image_files(out, panoptic_json)
    return out


def default_cache_dir(panoptic_root: str) -> str:
    """Where derived maps go: ``<parent of panoptic_root>/seg2_panoptic_separated/<its name>``."""
    root = os.path.abspath(panoptic_root)
    return os.path.join(os.path.dirname(root), "seg2_panoptic_separated", os.path.basename(root))


def folder_metadata(
    categories: List[dict],
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    instances_json: Optional[str] = None,
    sem_seg_root: Optional[str] = None,
) -> dict:
    """The metadata :func:`register_coco_panoptic_folder` sets (see there)."""
    meta = panoptic_metadata(categories, panoptic_json)
    meta.update(
        panoptic_root=panoptic_root,
        panoptic_json=panoptic_json,
        image_root=image_root,
        evaluator_type="coco_panoptic_seg",
        ignore_label=IGNORE_LABEL,
        label_divisor=1000,
    )
    if instances_json:
        meta["json_file"] = instances_json
    if sem_seg_root:
        meta["sem_seg_root"] = sem_seg_root
    return meta


def register_coco_panoptic_folder(
    name: str,
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    instances_json: Optional[str] = None,
    sem_seg_root: Optional[str] = None,
    cache_dir: Optional[str] = None,
    metadata: Optional[dict] = None,
    categories: Optional[List[dict]] = None,
) -> str:
    """
    Register (or re-register) a COCO panoptic folder for seg2's multi-task model and the PQ
    evaluator, in detectron2's separated layout (as ``register_coco_panoptic_separated`` does for
    COCO, whose records it also makes).

    Args:
        name (str): the dataset name for ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        image_root (str): the images, named as the JSON's "images" ``file_name``.
        panoptic_root (str): the panoptic PNGs (segment id = R + 256 G + 256^2 B).
        panoptic_json (str): the COCO panoptic JSON ("images", "annotations", "categories").
        instances_json (str or None): a COCO instances JSON of the same images (COCO's polygons,
            as PanopticFPN trains); None: the thing segments of the PNGs (RLE).
        sem_seg_root (str or None): semantic maps in the separated layout named as the PNGs (e.g.
            made by detectron2's ``prepare_panoptic_fpn.py``; stuff classes by sorted id); None:
            derived from the PNGs.
        cache_dir (str or None): where derived files go (:func:`default_cache_dir`).
        metadata (dict or None): extra metadata (overrides).
        categories (list[dict] or None): the JSON's categories, when the JSON does not exist yet
            (a generated dataset); None: read from ``panoptic_json`` now.

    Returns:
        str: ``name``. Its metadata: the classes and id maps of :func:`panoptic_metadata`,
        ``panoptic_root``, ``panoptic_json``, ``image_root``, ``sem_seg_root`` (when given),
        ``json_file`` (``instances_json``, when given), ``evaluator_type="coco_panoptic_seg"``,
        ``ignore_label=255``, ``label_divisor=1000``.
    """
    if categories is None:
        categories = read_panoptic_json(panoptic_json)["categories"]
    meta = folder_metadata(
        categories, image_root, panoptic_root, panoptic_json, instances_json, sem_seg_root
    )
    meta.update(metadata or {})
    return register_dataset(
        name,
        lambda: load_coco_panoptic_separated(
            image_root,
            panoptic_root,
            panoptic_json,
            instances_json,
            sem_seg_root,
            cache_dir,
            dataset_name=name,
        ),
        meta,
    )
