"""
The synthetic "seg2_shapes" dataset: textured images with overlapping circles, squares and
triangles, written deterministically from a seed in the two real on-disk layouts:

* COCO: ``coco/annotations/instances_{split}.json`` (polygons) and ``coco/{split}/*.jpg``;
* Pascal VOC: ``VOC2012/JPEGImages``, palette PNGs in ``VOC2012/SegmentationClass`` and
  ``VOC2012/SegmentationObject`` (255 on object borders, as VOC does) and
  ``VOC2012/ImageSets/Segmentation/{split}.txt``.

Both views describe the same objects: the VOC label maps are painted from the COCO polygons as
pycocotools rasterises them, and every pixel where two rasterised polygons meet, or where the label
changes, is 255 ("void") in both PNGs. Off those borders, each instance mask of the JSON equals
its region of ``SegmentationObject`` exactly.

The whole tree is generated into a folder beside ``root`` (``.partial-<name>-<parameter hash>``)
and renamed into place, with a manifest written last, so an interrupted run never leaves a
half-written cache behind; the next run resumes in that folder where it stopped. Two processes may
start generation at once: they take turns on a lock file beside it (POSIX ``flock``), and the later
one finds the cache done. Every call then removes what killed generations left beside ``root`` and
no process is using (:func:`remove_stale_generations`). Progress, with an ETA, is logged every 10 s.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Callable, Dict, Optional

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from ..constants import IGNORE_LABEL
from ..utils import Seg2Error
from ..utils.progress import log_progress
from .voc_palette import VOC_PALETTE

logger = logging.getLogger(__name__)

SHAPES_CLASSES = ("circle", "square", "triangle")
# Instance colours lean on the class (hue) but vary per instance, so colour alone is a weak cue.
_CLASS_HUES = {"circle": 0, "square": 60, "triangle": 120}  # OpenCV hue units (0-179)
MANIFEST = "manifest.json"
# Per-image records of a generation in progress (removed before the manifest is written).
_PARTS = ".parts"
# Bump when the generator's output changes, so old caches are regenerated.
GENERATOR_VERSION = 1

# What the registered names `seg2_shapes_{train,val}` use.
DEFAULT_SPLITS = {"train": 320, "val": 64}
DEFAULT_IMAGE_SIZE = 128
DEFAULT_SEED = 0


def default_shapes_root() -> str:
    """``$SEG2_SHAPES_ROOT``, else ``$DETECTRON2_DATASETS/seg2_shapes`` (default ``datasets/``)."""
    root = os.environ.get("SEG2_SHAPES_ROOT")
    if root:
        return root
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "seg2_shapes")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: a dull base colour, oriented stripes and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(60, 190, size=3)
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(0.05, 0.3)
    stripes = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    amplitude = rng.uniform(10, 35, size=3)
    noise = rng.normal(0, 8, size=(size, size, 3))
    img = base[None, None, :] + stripes[..., None] * amplitude[None, None, :] + noise
    return img


def _shape_polygon(
    rng: np.random.Generator, cls: str, cx: float, cy: float, r: float
) -> np.ndarray:
    """Vertices (N, 2) of a convex shape of class ``cls`` centred at (cx, cy) with radius r."""
    theta0 = rng.uniform(0, 2 * np.pi)
    if cls == "circle":
        n = 28
    elif cls == "square":
        n = 4
    else:
        n = 3
    theta = theta0 + np.arange(n) * 2 * np.pi / n
    return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)


def _rasterize(polygons, size: int) -> np.ndarray:
    """The union of ``polygons`` (COCO format, flat xy lists) as pycocotools rasterises it."""
    rles = mask_util.frPyObjects(polygons, size, size)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def _mask_to_polygons(mask: np.ndarray):
    """Outer contours of ``mask`` as COCO polygons in continuous pixel coordinates."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polygons = []
    for c in contours:
        c = c.reshape(-1, 2).astype(np.float64) + 0.5  # pixel centres -> continuous coordinates
        if len(c) >= 3:
            polygons.append([round(float(v), 2) for v in c.reshape(-1)])
    return polygons


def _place_shapes(rng: np.random.Generator, size: int, max_instances: int):
    """
    Draw 2..``max_instances`` shapes, later ones on top, each earlier one keeping at least half of
    its area visible. Returns their full masks (H, W) bool and class indices, in drawing order.
    """
    n = int(rng.integers(2, max_instances + 1))
    full_masks, classes = [], []
    for _ in range(n):
        for _attempt in range(20):
            cls = int(rng.integers(len(SHAPES_CLASSES)))
            r = rng.uniform(0.1, 0.24) * size
            cx, cy = rng.uniform(r * 0.6, size - r * 0.6, size=2)
            # A later shape's centre lies outside every earlier shape, so no instance can end up
            # with a hole (which COCO polygons cannot express).
            if any(m[min(int(cy), size - 1), min(int(cx), size - 1)] for m in full_masks):
                continue
            poly = _shape_polygon(rng, SHAPES_CLASSES[cls], cx, cy, r)
            poly = np.clip(poly, 0, size)
            full = _rasterize([poly.reshape(-1).tolist()], size)
            # Every earlier shape must keep at least half of its area visible.
            ok = full.sum() >= 30
            for i, m in enumerate(full_masks):
                on_top = full.copy()
                for later in full_masks[i + 1 :]:
                    on_top |= later
                if (m & ~on_top).sum() < 0.5 * m.sum():
                    ok = False
                    break
            if ok:
                full_masks.append(full)
                classes.append(cls)
                break
    return full_masks, classes


def _visible_instances(full_masks, classes, size: int):
    """
    The visible part of each shape (later ones are on top) as COCO polygons, and the instance
    map painted from those polygons exactly as pycocotools rasterises them.

    Returns:
        instances [(class index, polygons)] (shapes whose polygons cover no pixel left out), the
        instance map (H, W) uint8 (0 none, k = k-th instance) and the number of polygons
        covering each pixel (H, W) int32.
    """
    instances = []
    for i, m in enumerate(full_masks):
        visible = m.copy()
        for later in full_masks[i + 1 :]:
            visible &= ~later
        polygons = _mask_to_polygons(visible)
        if polygons:
            instances.append((classes[i], polygons))

    obj = np.zeros((size, size), dtype=np.uint8)
    count = np.zeros((size, size), dtype=np.int32)
    kept = []
    for cls, polygons in instances:
        m = _rasterize(polygons, size)
        if m.sum() == 0:
            continue
        kept.append((cls, polygons))
        count += m
        obj[m] = len(kept)
    return kept, obj, count


def _paint_instances(rng: np.random.Generator, img: np.ndarray, obj: np.ndarray, instances):
    """``img`` with each instance region of ``obj`` in a noisy colour of its class's hue (uint8)."""
    for k, (cls, _) in enumerate(instances, start=1):
        hue = (_CLASS_HUES[SHAPES_CLASSES[cls]] + rng.integers(-12, 13)) % 180
        hsv = np.uint8([[[hue, rng.integers(150, 256), rng.integers(150, 256)]]])
        colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
        region = obj == k
        img[region] = colour + rng.normal(0, 10, size=(int(region.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _render_image(rng: np.random.Generator, size: int, max_instances: int):
    """
    One image and its instances.

    Returns:
        image (H, W, 3) uint8 RGB, instance label map (H, W) uint8 (0 background, k = k-th
        instance, 255 void), class map (H, W) uint8 (0 background, 1.. classes, 255 void), and
        the list of instances as (class index, COCO polygons).
    """
    img = _background(rng, size)
    full_masks, classes = _place_shapes(rng, size, max_instances)
    # Label maps are painted from the polygons exactly as pycocotools rasterises them.
    instances, obj, count = _visible_instances(full_masks, classes, size)
    # Paint the objects before marking borders, so the image shows whole objects.
    img = _paint_instances(rng, img, obj, instances)

    # Void border: wherever the label changes within a 3x3 neighbourhood, or polygons overlap.
    kernel = np.ones((3, 3), np.uint8)
    border = (cv2.dilate(obj, kernel) != cv2.erode(obj, kernel)) | (count >= 2)
    cls_lut = np.zeros(256, dtype=np.uint8)
    for k, (cls, _) in enumerate(instances, start=1):
        cls_lut[k] = cls + 1
    sem = cls_lut[obj]
    obj[border] = IGNORE_LABEL
    sem[border] = IGNORE_LABEL
    return img, obj, sem, instances


def _save_palette_png(arr: np.ndarray, path: str):
    im = Image.fromarray(arr, mode="P")
    im.putpalette(VOC_PALETTE)
    im.save(path, optimize=False)


def _write_image(
    out: str, split: str, split_index: int, i: int, image_size: int, seed: int, max_instances: int
):
    """Render image ``i`` of ``split`` and write its JPEGs and PNGs under ``out``; then its record
    (COCO image entry, instances) to ``out/.parts``, last, so a record marks a finished image."""
    # One generator per image: an image does not depend on how many come before it.
    rng = np.random.default_rng([seed, split_index, i])
    img, obj, sem, instances = _render_image(rng, image_size, max_instances)
    name = f"shapes_{split}_{i:05d}"
    voc = os.path.join(out, "VOC2012")
    jpg = Image.fromarray(img)
    jpg.save(os.path.join(voc, "JPEGImages", name + ".jpg"), quality=92)
    jpg.save(os.path.join(out, "coco", split, name + ".jpg"), quality=92)
    _save_palette_png(sem, os.path.join(voc, "SegmentationClass", name + ".png"))
    _save_palette_png(obj, os.path.join(voc, "SegmentationObject", name + ".png"))
    record = {"name": name, "instances": [[cls, polygons] for cls, polygons in instances]}
    part = _part_path(out, split, i)
    with open(part + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(part + ".tmp", part)


def _part_path(out: str, split: str, i: int) -> str:
    return os.path.join(out, _PARTS, f"{split}_{i:05d}.json")


def _coco_split(out: str, split: str, num_images: int, image_size: int, seed: int, ann_id: int):
    """The COCO dict of ``split`` from its image records, annotation ids from ``ann_id``."""
    images, annotations = [], []
    for i in range(num_images):
        with open(_part_path(out, split, i)) as f:
            record = json.load(f)
        image_id = i + 1
        images.append(
            {
                "id": image_id,
                "file_name": record["name"] + ".jpg",
                "width": image_size,
                "height": image_size,
            }
        )
        for cls, polygons in record["instances"]:
            rle = mask_util.merge(mask_util.frPyObjects(polygons, image_size, image_size))
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "segmentation": polygons,
                    "area": float(mask_util.area(rle)),
                    "bbox": [round(float(v), 2) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(SHAPES_CLASSES)
    ]
    coco = {
        "info": {
            "description": f"seg2_shapes {split}, seed {seed}",
            "version": str(GENERATOR_VERSION),
        },
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return coco, ann_id


def _generate_into(
    out: str, splits: Dict[str, int], image_size: int, seed: int, max_instances: int
):
    """Write the whole tree into ``out``, skipping the images an interrupted run finished there."""
    voc = os.path.join(out, "VOC2012")
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(voc, d), exist_ok=True)
    os.makedirs(os.path.join(out, "coco", "annotations"), exist_ok=True)
    os.makedirs(os.path.join(out, _PARTS), exist_ok=True)
    jobs = [
        (split, split_index, i)
        for split_index, (split, num_images) in enumerate(sorted(splits.items()))
        for i in range(num_images)
    ]
    todo = [j for j in jobs if not os.path.isfile(_part_path(out, j[0], j[2]))]
    if len(todo) < len(jobs):
        logger.info(
            f"Resuming an interrupted generation: {len(jobs) - len(todo)} of {len(jobs)} images "
            "are there."
        )
    for split in splits:
        os.makedirs(os.path.join(out, "coco", split), exist_ok=True)
    for split, split_index, i in log_progress(todo, len(todo), "seg2_shapes images", logger):
        _write_image(out, split, split_index, i, image_size, seed, max_instances)
    ann_id = 1
    for split, num_images in sorted(splits.items()):
        names = [f"shapes_{split}_{i:05d}" for i in range(num_images)]
        with open(os.path.join(voc, "ImageSets", "Segmentation", split + ".txt"), "w") as f:
            f.write("".join(n + "\n" for n in names))
        coco, ann_id = _coco_split(out, split, num_images, image_size, seed, ann_id)
        with open(os.path.join(out, "coco", "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(coco, f, sort_keys=True)
    shutil.rmtree(os.path.join(out, _PARTS))


def _params(splits, image_size, seed, max_instances):
    return {
        "generator_version": GENERATOR_VERSION,
        "splits": dict(sorted(splits.items())),
        "image_size": image_size,
        "seed": seed,
        "max_instances": max_instances,
    }


def _file_list(root: str):
    files = {}
    for dirpath, _, filenames in os.walk(root):
        for fn in filenames:
            path = os.path.join(dirpath, fn)
            rel = os.path.relpath(path, root)
            if rel != MANIFEST:
                files[rel] = os.path.getsize(path)
    return dict(sorted(files.items()))


def read_shapes_params(root: str) -> Optional[dict]:
    """The generation parameters in ``root``'s manifest, or None if there is no readable one of
    this generator version."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            params = json.load(f)["params"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(params, dict) or params.get("generator_version") != GENERATOR_VERSION:
        return None
    return params


def check_shapes_cache(root: str, params: dict) -> Optional[str]:
    """None if ``root`` holds a complete cache made with ``params``, else why it does not."""
    manifest_path = os.path.join(root, MANIFEST)
    if not os.path.isfile(manifest_path):
        return f"{manifest_path} is missing (an interrupted or foreign generation)"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return f"{manifest_path} is unreadable ({e})"
    if manifest.get("params") != params:
        return f"it was made with other parameters ({manifest.get('params')})"
    for rel, size in manifest.get("files", {}).items():
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path)} bytes, the manifest says {size}"
    return None


def generate_shapes(
    root: str,
    splits: Optional[Dict[str, int]] = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = DEFAULT_SEED,
    max_instances: int = 5,
) -> str:
    """
    Make sure ``root`` holds the shapes dataset for these parameters, generating it if needed.

    A complete cache with the same parameters is reused as it is. A missing, incomplete or
    damaged one (e.g. a file deleted by hand) is regenerated, with a warning. Generation writes to
    a folder beside ``root`` and renames it into place; an interrupted generation resumes there,
    and concurrent callers wait for each other on a lock file.

    Args:
        root (str): the dataset folder (holds ``coco/``, ``VOC2012/`` and ``manifest.json``).
        splits (dict[str, int]): number of images per split; default ``{"train": 320, "val": 64}``.
        image_size (int): side of the square images, in pixels.
        seed (int): the seed; the same seed gives byte-identical files.
        max_instances (int): at most this many objects per image (at least 2 are tried).

    Returns:
        str: ``root``.
    """
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    params = _params(splits, image_size, seed, max_instances)
    return _ensure_cache(
        root,
        params,
        lambda out: _generate_into(out, splits, image_size, seed, max_instances),
        "seg2_shapes",
    )


def _ensure_cache(root: str, params: dict, write: Callable[[str], None], what: str) -> str:
    """
    The cache machinery of :func:`generate_shapes`, for any generator: reuse ``root`` if its
    manifest holds ``params`` and its files are intact, else ``write(folder)`` the tree into a
    resumable folder beside ``root`` (under a lock), write the manifest and rename it into place.
    ``what`` names the dataset in messages.
    """
    problem = check_shapes_cache(root, params) if os.path.exists(root) else "it does not exist yet"
    if problem is None:
        remove_stale_generations(root)
        return root

    parent = os.path.dirname(os.path.abspath(root))
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    partial = os.path.join(parent, f".partial-{os.path.basename(root)}-{digest}")
    try:
        os.makedirs(partial, exist_ok=True)
        lock = open(partial + ".lock", "a")
    except OSError as e:
        raise Seg2Error(
            f"cannot write the {what} cache under {parent!r}: {e.strerror or e}. Point "
            "SEG2_SHAPES_ROOT (or DETECTRON2_DATASETS, or the config key SEG2.SHAPES_ROOT) at a "
            "writable folder."
        ) from e
    with lock:
        _lock(lock)  # concurrent generators take turns; the later ones find the cache done
        problem = (
            check_shapes_cache(root, params) if os.path.exists(root) else "it does not exist yet"
        )
        if problem is None:
            return root
        if os.path.exists(root):
            logger.warning(f"Regenerating the {what} cache at {root}: {problem}.")
        else:
            logger.info(f"Generating the {what} dataset into {root} ({params}) ...")
        os.makedirs(partial, exist_ok=True)  # a generator before us renamed it into place
        write(partial)
        with open(os.path.join(partial, MANIFEST), "w") as f:
            json.dump({"params": params, "files": _file_list(partial)}, f, indent=1, sort_keys=True)
        _replace_dir(partial, root, params)
    remove_stale_generations(root)
    return root


# Folders older than this (no file in them changed since) are left over by a killed process.
_STALE_SECONDS = 600


def _try_lock(f) -> bool:
    """Take the lock of the open file ``f`` if no other process holds it (closing ``f`` frees it)."""
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _newest_mtime(folder: str) -> float:
    newest = os.stat(folder).st_mtime
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            try:
                newest = max(
                    newest, os.stat(os.path.join(dirpath, n), follow_symlinks=False).st_mtime
                )
            except FileNotFoundError:
                pass
    return newest


def remove_stale_generations(root: str) -> list:
    """
    Remove what killed generations of ``root`` left beside it, and only that:

    * ``.partial-<name>-<hash>`` folders whose lock nobody holds (a generation in progress holds
      it for its whole run, so its folder is kept). Those of ``root``'s current parameters were
      resumed before this is called; the others (other parameters) would only be resumed if
      those parameters were asked for again;
    * ``.trash-<name>-*`` (a replaced cache being deleted) and ``.tmp-<name>-*`` (the temporary
      folders of seg2 versions before resumable generation) in which nothing changed for 10 min.

    The lock files stay (0 bytes): removing a lock file another process may be opening would let
    two processes hold "the" lock. Returns the removed paths.
    """
    parent, name = os.path.dirname(os.path.abspath(root)), os.path.basename(os.path.abspath(root))
    partial = re.compile(rf"\.partial-{re.escape(name)}-[0-9a-f]{{12}}")
    aged = re.compile(rf"\.(trash|tmp)-{re.escape(name)}-[A-Za-z0-9_]{{8}}")
    try:
        entries = [e for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    removed = []
    for e in entries:
        if partial.fullmatch(e.name):
            try:
                import fcntl  # noqa: F401
            except ImportError:  # pragma: no cover - Windows: no lock to tell a live one
                continue
            try:
                lock = open(e.path + ".lock", "a")
            except OSError:
                continue
            with lock:
                if not _try_lock(lock):
                    continue  # a generation is writing into it
                shutil.rmtree(e.path, ignore_errors=True)
        elif aged.fullmatch(e.name):
            try:
                if time.time() - _newest_mtime(e.path) < _STALE_SECONDS:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            continue
        if not os.path.exists(e.path):
            removed.append(e.path)
    if removed:
        logger.info(
            f"Removed {len(removed)} folder(s) left beside {root} by interrupted generations: "
            f"{removed}"
        )
    return removed


def _lock(f):
    """Hold an exclusive lock on the open file ``f`` until it is closed (POSIX ``flock``)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, generators may write twice
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)


def _replace_dir(tmp: str, root: str, params: dict):
    """Move the finished ``tmp`` to ``root``, unless a concurrent run already put a good one there."""
    if os.path.exists(root):
        if check_shapes_cache(root, params) is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return  # another process finished first; its files are identical to ours
        # Move the bad cache aside first: rename is atomic, rmtree is not.
        trash = tempfile.mkdtemp(
            prefix=".trash-" + os.path.basename(root) + "-", dir=os.path.dirname(tmp)
        )
        try:
            os.rename(root, os.path.join(trash, "old"))
        except FileNotFoundError:
            pass  # removed by a concurrent run
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:
        # A concurrent run renamed its copy into place between our check and our rename.
        if check_shapes_cache(root, params) is not None:
            raise


def shapes_digest(root: str) -> str:
    """SHA-256 over every file of a generated tree (names and bytes), for determinism checks."""
    h = hashlib.sha256()
    for rel in sorted(_file_list(root)) + [MANIFEST]:
        h.update(rel.encode())
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()
