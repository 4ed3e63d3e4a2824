"""
Class weights for imbalanced semantic data, from the pixel counts of a training set.

Methods (``MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING``):

* ``"median_frequency"``: median frequency balancing as SegNet uses it (Eigen and Fergus, ICCV
  2015): ``freq(c)`` = pixels of class c / labelled pixels of the images in which c appears, and
  ``weight(c) = median(freq) / freq(c)`` (median over the classes that appear).
* ``"inverse_frequency"``: ``weight(c) = total / (K * pixels(c))`` with ``total`` the labelled
  pixels and K the number of classes that appear (scikit-learn's "balanced" weights: a set where
  every class has as many pixels gets weight 1 everywhere).

Pixels labelled ``ignore_label`` count nowhere. A class that never appears gets weight 0 and a
warning (it has no pixel to weight; no NaN or infinity). The counts are computed once (each label
map read by :func:`seg2.data.read_sem_seg`) and cached, as JSON, in ``cache_dir``: ``$SEG2_CACHE``
or else ``~/.cache/seg2``, subfolder ``class_weights``. A cache entry is keyed by everything
that changes the counts: the dataset names, every label file's path and SHA-256 (its bytes, not
its size or modification time) and how it is decoded (its record's ``sem_seg_format``: index or
RGB, the colour table, the void values), the class count and the ignore label. Changing a
label file in any way, or correcting a colour table, recomputes it; hashing is much cheaper
than decoding the maps. Delete the folder to clear it. Both methods derive from the same
counts, so the method is not part of the key.

The weights are computed once per run by the resolve step (:func:`seg2.resolve_config`), before
the model is built, and handed to the loss as plain numbers (``MODEL.SEM_SEG_HEAD.CLASS_WEIGHT``).
"""

import hashlib
import json
import logging
import os
import time
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from tabulate import tabulate

from ..constants import IGNORE_LABEL
from ..utils import InvalidArgument, Seg2Error
from ..utils.files import atomic_write, file_sha256, remove_stale_tmp_files
from ..utils.progress import log_progress
from .label_map import check_label_values, read_sem_seg

__all__ = [
    "CLASS_WEIGHTINGS",
    "class_pixel_counts",
    "median_frequency_weights",
    "inverse_frequency_weights",
    "compute_class_weights",
    "class_weights_for_datasets",
    "default_cache_dir",
]

logger = logging.getLogger(__name__)

CLASS_WEIGHTINGS = ("median_frequency", "inverse_frequency")
# 3: keyed on how each label file is decoded too (2: its SHA-256 only; 1: size and mtime).
_CACHE_VERSION = 3
_PROGRESS_SECONDS = 10.0


def default_cache_dir() -> str:
    """seg2's cache folder: ``$SEG2_CACHE``, else ``~/.cache/seg2``."""
    return os.environ.get("SEG2_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "seg2")


# ---- counts and weights -------------------------------------------------------------------------
def class_pixel_counts(
    label_maps: Iterable[Tuple[str, np.ndarray]], num_classes: int, ignore_label: int = IGNORE_LABEL
) -> Tuple[np.ndarray, np.ndarray]:
    """
    Args:
        label_maps: (path, (H, W) class-index map) pairs; the path names a bad file in errors.
        num_classes (int): number of classes; a value that is neither a class nor
            ``ignore_label`` is a :class:`Seg2Error` naming the file.
        ignore_label (int): value counted nowhere.

    Returns:
        (pixels, image_pixels): int64 arrays of ``num_classes``: the pixels of each class, and the
        labelled pixels of the images in which that class appears.
    """
    pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    for path, label in label_maps:
        check_label_values(label, path, num_classes, ignore_label)
        counts = np.bincount(
            label[label != ignore_label].ravel().astype(np.int64), minlength=num_classes
        )
        pixels += counts
        image_pixels[counts > 0] += counts.sum()
    return pixels, image_pixels


def _warn_absent(pixels: np.ndarray, class_names: Optional[Sequence[str]]):
    absent = [int(c) for c in np.flatnonzero(pixels == 0)]
    if absent:
        names = [class_names[c] if class_names else str(c) for c in absent]
        logger.warning(
            f"class weights: class(es) {names} have no pixel in the training set; their weight is 0"
        )


def median_frequency_weights(pixels: np.ndarray, image_pixels: np.ndarray) -> np.ndarray:
    """SegNet's median frequency balancing (see the module docstring); 0 for absent classes."""
    pixels = np.asarray(pixels, dtype=np.float64)
    present = pixels > 0
    weights = np.zeros_like(pixels)
    if present.any():
        freq = pixels[present] / np.asarray(image_pixels, dtype=np.float64)[present]
        weights[present] = np.median(freq) / freq
    return weights


def inverse_frequency_weights(pixels: np.ndarray) -> np.ndarray:
    """``total / (K * pixels(c))`` over the K present classes (see the module docstring); 0 for
    absent classes."""
    pixels = np.asarray(pixels, dtype=np.float64)
    present = pixels > 0
    weights = np.zeros_like(pixels)
    if present.any():
        weights[present] = pixels.sum() / (present.sum() * pixels[present])
    return weights


def _weights_from_counts(pixels, image_pixels, method: str) -> np.ndarray:
    """The weights of ``method`` (checked by :func:`compute_class_weights`)."""
    if method == "median_frequency":
        return median_frequency_weights(pixels, image_pixels)
    return inverse_frequency_weights(pixels)


# ---- the cached computation over dataset records ------------------------------------------------
def _cache_path(
    records: List[dict], num_classes: int, ignore_label: int, dataset_names, cache_dir: str
) -> str:
    files = []
    for r in records:
        path = r["sem_seg_file_name"]
        try:
            digest = file_sha256(path)
        except OSError as e:
            raise Seg2Error(
                f"{path}: cannot read the label map of {r.get('file_name', 'a record')} ({e})"
            ) from e
        # How the file is decoded (index values or a colour table, void values) changes the counts.
        files.append([os.path.abspath(path), digest, r.get("sem_seg_format")])
    key = json.dumps([_CACHE_VERSION, list(dataset_names), num_classes, ignore_label, files])
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return os.path.join(cache_dir, "class_weights", f"{digest}.json")


def _read_counts(path: str, num_classes: int, what: str):
    """(JSON data, pixels, image_pixels) of a cache entry or a partial count; None, with a warning,
    where it is unreadable or has other class counts (None, silently, where it does not exist)."""
    try:
        with open(path) as f:
            data = json.load(f)
        pixels, image_pixels = (
            np.array(data["pixels"], np.int64),
            np.array(data["image_pixels"], np.int64),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning(
            f"class weights: ignoring the unreadable {what} {path} ({e}); counting again"
        )
        return None
    if pixels.shape != (num_classes,) or image_pixels.shape != (num_classes,):
        logger.warning(
            f"class weights: ignoring the {what} {path}, which has other class counts; counting "
            "again"
        )
        return None
    return data, pixels, image_pixels


def _read_cache(path: str, num_classes: int):
    counts = _read_counts(path, num_classes, "cache")
    return None if counts is None else counts[1:]


def _write_json(path: str, data: dict):
    """Write atomically (a temporary file renamed over ``path``): readers never see half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_tmp_files(os.path.dirname(path))
    with atomic_write(path, "w") as f:
        json.dump(data, f)


def _write_cache(path: str, pixels, image_pixels, dataset_names, num_records: int):
    data = {
        "version": _CACHE_VERSION,
        "datasets": list(dataset_names),
        "label_maps": num_records,
        "pixels": pixels.tolist(),
        "image_pixels": image_pixels.tolist(),
    }
    _write_json(path, data)


def _read_partial(path: str, num_classes: int, num_records: int):
    """(maps done, pixels, image_pixels) of an interrupted count of the same cache key, or None."""
    counts = _read_counts(path, num_classes, "partial count")
    if counts is None:
        return None
    done = counts[0].get("done")
    if not isinstance(done, int) or not 0 < done <= num_records:
        logger.warning(
            f"class weights: ignoring the partial count {path} (done={done!r}); counting again"
        )
        return None
    return (done, *counts[1:])


def _count_resumable(records: List[dict], num_classes: int, ignore_label: int, cache: str):
    """
    :func:`class_pixel_counts` over ``records`` with progress, saving the running counts to
    ``<cache>.partial`` every few seconds: every label map's path and SHA-256 are in the cache
    key, so an interrupted pass resumes after the maps it had counted.
    """
    partial = cache + ".partial"
    start = 0
    pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    state = _read_partial(partial, num_classes, len(records))
    if state is not None:
        start, pixels, image_pixels = state
        logger.info(
            f"class weights: resuming an interrupted count after {start} of {len(records)} label "
            "maps"
        )
    last = time.perf_counter()
    todo = records[start:]
    for i, r in enumerate(
        log_progress(todo, len(todo), "class weights: label maps read", logger, _PROGRESS_SECONDS)
    ):
        p, ip = class_pixel_counts(
            [(r["sem_seg_file_name"], read_sem_seg(r))], num_classes, ignore_label
        )
        pixels += p
        image_pixels += ip
        if time.perf_counter() - last >= _PROGRESS_SECONDS:
            _write_json(
                partial,
                {
                    "done": start + i + 1,
                    "pixels": pixels.tolist(),
                    "image_pixels": image_pixels.tolist(),
                },
            )
            last = time.perf_counter()
    return pixels, image_pixels, partial


def _log_table(weights, pixels, method: str, class_names: Optional[Sequence[str]]):
    total = max(int(pixels.sum()), 1)
    rows = [
        [
            class_names[c] if class_names else c,
            int(pixels[c]),
            f"{pixels[c] / total:.4f}",
            f"{weights[c]:.4f}",
        ]
        for c in range(len(weights))
    ]
    table = tabulate(
        rows, headers=["class", "pixels", "pixel frequency", "weight"], tablefmt="pipe"
    )
    logger.info(f"class weights ({method}):\n{table}")


def compute_class_weights(
    records: Sequence[dict],
    num_classes: int,
    method: str = "median_frequency",
    *,
    ignore_label: int = IGNORE_LABEL,
    class_names: Optional[Sequence[str]] = None,
    dataset_names: Sequence[str] = (),
    cache_dir: Optional[str] = None,
) -> np.ndarray:
    """
    Class weights of ``method`` from the label maps of ``records`` (those with a
    ``sem_seg_file_name``), counted once and cached; logs a per-class table.

    Args:
        records (list[dict]): dataset records in detectron2's format.
        num_classes (int): number of classes.
        method (str): one of :data:`CLASS_WEIGHTINGS`.
        ignore_label (int): label value counted nowhere.
        class_names (list[str] or None): names for the log.
        dataset_names (list[str]): names for the cache key and the log.
        cache_dir (str or None): cache folder; None: :func:`default_cache_dir`.

    Returns:
        float64 array of ``num_classes`` weights (0 for classes that never appear).
    """
    if method not in CLASS_WEIGHTINGS:
        raise InvalidArgument("method", method, f"one of {list(CLASS_WEIGHTINGS)}")
    labelled = [r for r in records if r.get("sem_seg_file_name")]
    if not labelled:
        raise Seg2Error(
            f"class weights: no record of {list(dataset_names) or 'the records'} has a semantic "
            "label map"
        )
    cache = _cache_path(
        labelled, num_classes, ignore_label, dataset_names, cache_dir or default_cache_dir()
    )
    counts = _read_cache(cache, num_classes)
    if counts is None:
        logger.info(
            f"class weights: counting the pixels of {len(labelled)} label maps of "
            f"{list(dataset_names)}"
        )
        *counts, partial = _count_resumable(labelled, num_classes, ignore_label, cache)
        _write_cache(cache, *counts, dataset_names, len(labelled))
        if os.path.exists(partial):
            os.remove(partial)
        logger.info(f"class weights: counts cached in {cache}")
    else:
        logger.info(f"class weights: pixel counts read from the cache {cache}")
    pixels, image_pixels = counts
    weights = _weights_from_counts(pixels, image_pixels, method)
    _warn_absent(pixels, class_names)
    _log_table(weights, pixels, method, class_names)
    return weights


def class_weights_for_datasets(
    dataset_names: Sequence[str],
    num_classes: int,
    method: str = "median_frequency",
    *,
    ignore_label: int = IGNORE_LABEL,
    cache_dir: Optional[str] = None,
) -> np.ndarray:
    """:func:`compute_class_weights` over the records of registered datasets. In a distributed
    run the first process of each machine counts (and caches) while the others wait, then read
    the cache."""
    records = [r for name in dataset_names for r in DatasetCatalog.get(name)]
    class_names = (
        MetadataCatalog.get(dataset_names[0]).get("stuff_classes", None) if dataset_names else None
    )
    if class_names is not None and len(class_names) != num_classes:
        class_names = None
    kwargs = dict(
        ignore_label=ignore_label,
        class_names=class_names,
        dataset_names=dataset_names,
        cache_dir=cache_dir,
    )
    if comm.get_world_size() == 1:
        return compute_class_weights(records, num_classes, method, **kwargs)
    weights = (
        compute_class_weights(records, num_classes, method, **kwargs)
        if comm.get_local_rank() == 0
        else None
    )
    comm.synchronize()
    return (
        weights
        if weights is not None
        else compute_class_weights(records, num_classes, method, **kwargs)
    )
