"""
Semantic maps derived from COCO instance annotations (``coco_2017_sem_seg_*``), and the cache
they are written to once. They follow one rule (:func:`coco_sem_seg_map`):

* value 0 is background, value ``c + 1`` is thing class ``c`` (contiguous id), 255 is ignored;
* crowd regions (``iscrowd=1``) are 255 where no non-crowd instance covers them: they hold objects
  of their class whose extent is not delineated, so neither the class nor background is certain;
* where non-crowd instances overlap, the smaller instance (by mask area; ties: the later
  annotation) is on top, so small objects in front of large ones survive.

The maps are written once to a cache folder (one palette PNG per image, each written to a
temporary file and renamed) and reused: an interrupted generation resumes where it stopped (and
removes the temporary files it left), and several processes may generate at once (distributed
ranks split the work). The cache is keyed on the content of the annotation file (its SHA-256,
in ``seg2_source.json``): maps made from other annotations are refused, not reused.
"""

import json
import logging
import multiprocessing as mp
import os
from collections import Counter
from typing import Optional, Sequence

import numpy as np
from pycocotools import mask as mask_util

from ..constants import IGNORE_LABEL
from ..utils import Seg2Error
from ..utils.files import atomic_write, remove_stale_tmp_files
from ..utils.progress import log_progress
from .coco_json import _short
from .label_map import write_label_map

__all__ = ["coco_sem_seg_map", "generate_coco_sem_seg", "label_map_path"]

logger = logging.getLogger(__name__)

# Bump when coco_sem_seg_map's output changes: caches made by another version are refused.
SEM_SEG_RULE_VERSION = 1
_SOURCE_MARKER = "seg2_source.json"


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


def label_map_path(out_dir: str, record: dict) -> str:
    """The label map of ``record`` in the folder ``out_dir``: ``<out_dir>/<image stem>.png``."""
    return os.path.join(
        out_dir, os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
    )


def _write_one(args):
    record, path, ignore_label = args
    write_label_map(coco_sem_seg_map(record, ignore_label), path)
    return 1


def _check_source(out_dir: str, source: Optional[dict]):
    """Refuse a cache made from another annotation file (by content) or rule version; mark a new one."""
    if source is None:
        return
    source = dict(source, rule_version=SEM_SEG_RULE_VERSION)
    marker = os.path.join(out_dir, _SOURCE_MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            found = json.load(f)
        if found != source:
            differ = ", ".join(
                f"{k} {found.get(k, '(none)')} there, {source.get(k, '(none)')} now"
                for k in sorted(set(found) | set(source))
                if found.get(k) != source.get(k)
            )
            old = (
                " (made by an earlier seg2, which keyed the cache on the file's size: annotations "
                "edited in place were not noticed)"
                if "json_sha256" in source and "json_sha256" not in found
                else ""
            )
            raise Seg2Error(
                f"{out_dir} holds semantic maps made from other annotations{old}: {differ}. "
                "Delete the "
                "folder (it is a cache) to regenerate it."
            )
        return
    with atomic_write(marker, "w") as f:
        json.dump(source, f, sort_keys=True)


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
    ``torch.distributed``, ranks split the missing files and wait for each other. Progress, with
    an ETA, is logged every 10 s.

    Args:
        records (list[dict]): detectron2 records with ``annotations`` (masks), height and width.
        out_dir (str): the cache folder.
        num_workers (int): processes to use (0: this process only).
        ignore_label (int): value of crowd regions.
        source (dict or None): identifies the annotations (file name, SHA-256 of the file); a
            cache made from other annotations is refused instead of being silently mixed.

    Returns:
        int: the number of maps this process wrote.
    """
    from detectron2.utils import comm

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise Seg2Error(
            f"cannot create the semantic-map cache {out_dir!r}: {e.strerror or e}"
        ) from e
    _check_source(out_dir, source)
    stems = Counter(os.path.basename(label_map_path(out_dir, r)) for r in records)
    clash = [s for s, n in stems.items() if n > 1]
    if clash:
        raise Seg2Error(
            f"{out_dir}: several images share the file stem of {_short(clash)}; their maps would "
            "collide"
        )
    todo = [
        (r, p, ignore_label)
        for r in records
        for p in [label_map_path(out_dir, r)]
        if not os.path.isfile(p)
    ]
    world, rank = comm.get_world_size(), comm.get_rank()
    mine = todo[rank::world] if world > 1 else todo
    if world > 1:  # the ranks of one machine share its cores
        num_workers = min(num_workers, max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    if todo:
        # Temporary files of a killed generation (a map is renamed into place once written).
        remove_stale_tmp_files(out_dir)
    if mine:
        logger.info(
            f"Writing {len(mine)} semantic maps to {out_dir} ({len(records) - len(todo)} already "
            "there) ..."
        )
    what = f"semantic maps to {out_dir}"
    if num_workers > 1 and len(mine) > 1:
        with mp.get_context("fork").Pool(num_workers) as pool:
            written = sum(
                log_progress(
                    pool.imap_unordered(_write_one, mine, chunksize=16), len(mine), what, logger
                )
            )
    else:
        written = sum(log_progress(map(_write_one, mine), len(mine), what, logger))
    if world > 1:
        comm.synchronize()
        # A rank that failed has raised already; anything still missing is written here.
        written += sum(_write_one(a) for a in todo if not os.path.isfile(a[1]))
    return written
