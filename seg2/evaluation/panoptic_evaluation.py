"""
Panoptic quality (PQ, SQ, RQ; Kirillov et al., "Panoptic Segmentation", CVPR 2019) with COCO's
rules, as a function with panopticapi's ``pq_compute`` signature and result dict, and as a
detectron2 evaluator with ``COCOPanopticEvaluator``'s interface.

seg2 owns the metric because panopticapi (the reference, which detectron2's
``COCOPanopticEvaluator`` imports) is not on PyPI, and because its per-image loop (two sorts of the
whole image, a Python loop over segment pairs) is slow. Here, per image, the pixels are split
into runs of equal (gt id, pred id) in raster order (panoptic maps are flat regions: a few percent
of the pixels start a run), the run values are turned into small indices, one weighted
``np.bincount`` over ``gt_index * (K + 1) + pred_index`` gives every gt/pred intersection at once,
and matching, void and crowd handling are array operations on that small matrix. The numbers equal
panopticapi's
(``tools/benchmarks/benchmark_pq.py`` checks it to 1e-9).

COCO's rules (those of panopticapi/evaluation.py):

* a gt and a predicted segment of the same category match when IoU > 0.5, with the prediction's
  pixels on gt VOID (id 0, or unlabelled) removed from the union; crowd gt segments never match;
* unmatched non-crowd gt segments are false negatives;
* an unmatched prediction is a false positive unless more than half of its area lies on gt VOID
  plus the crowd region of its own category;
* per category PQ = sum(IoU of matches) / (TP + FP/2 + FN/2), SQ = sum(IoU) / TP, RQ = TP / (TP +
  FP/2 + FN/2); "All", "Things", "Stuff" average the categories that have any TP, FP or FN.
"""

import itertools
import json
import logging
import multiprocessing
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

from ..utils import Seg2Error, UnreadableFileError

__all__ = [
    "Seg2PanopticEvaluator",
    "id2rgb",
    "pq_compute",
    "pq_from_stats",
    "rgb2id",
    "PanopticStats",
]

logger = logging.getLogger(__name__)

VOID = 0
_RGB_IDS = 256**3  # the ids an RGB PNG can hold


def rgb2id(color: np.ndarray) -> np.ndarray:
    """Segment ids of a panoptic PNG (COCO's convention: id = R + 256 G + 256^2 B); a 2-D array is
    returned unchanged (as int64), as panopticapi's ``rgb2id`` returns it."""
    color = np.asarray(color)
    if color.ndim == 3 and color.shape[2] >= 3:
        if color.dtype == np.uint8:  # int32 per channel: a third of the time of int64 arithmetic
            r, g, b = (color[..., i].astype(np.int32) for i in range(3))
            return r | (g << 8) | (b << 16)
        c = color[..., :3].astype(np.int64)
        return c[..., 0] + (c[..., 1] << 8) + (c[..., 2] << 16)
    return color.astype(np.int64)


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """The (H, W, 3) uint8 PNG colours of segment ids (inverse of :func:`rgb2id`)."""
    id_map = np.asarray(id_map).astype(np.int64)
    if id_map.size and (id_map.min() < 0 or id_map.max() >= _RGB_IDS):
        raise Seg2Error(
            "panoptic ids must lie in [0, 2^24) to be written as RGB, got "
            f"{id_map.min()}..{id_map.max()}"
        )
    return np.stack([id_map & 255, (id_map >> 8) & 255, (id_map >> 16) & 255], axis=-1).astype(
        np.uint8
    )


def read_panoptic_png(path: str) -> np.ndarray:
    """The (H, W) segment ids of a panoptic PNG (uint32 for RGB); :class:`UnreadableFileError` if it
    cannot be read."""
    try:
        with PathManager.open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise UnreadableFileError(
            path, "panoptic PNG", str(e).splitlines()[0] if str(e) else type(e).__name__
        )
    if img.mode == "RGB":
        # PIL holds RGB pixels as 4 bytes: as little-endian uint32 they are R + 256 G + 256^2 B
        # plus the pad byte, masked off; a third of the time of rgb2id on the (H, W, 3) array.
        ids = np.frombuffer(img.tobytes("raw", "RGBX"), dtype="<u4").reshape(
            img.size[1], img.size[0]
        )
        return ids & np.uint32(0xFFFFFF)
    return rgb2id(np.asarray(img))


def _segment_index(values: np.ndarray, segment_ids: Sequence[int], scale: int = 1) -> np.ndarray:
    """``scale`` * (1..K) for each value that is the k-th of ``segment_ids``, 0 for VOID, -1 for an
    id not listed (for the caller to report); with the gt indices scaled by K_pred + 1, one
    addition gives the index of each (gt, pred) pair."""
    values = np.asarray(values)
    if not len(segment_ids):
        return np.where(values == VOID, 0, -1)
    ids = np.asarray(segment_ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    keys, vals = ids[order], (order + 1) * scale
    pos = np.clip(np.searchsorted(keys, values), 0, len(keys) - 1)
    out = np.where(keys[pos] == values, vals[pos], -1)
    return np.where(values == VOID, 0, out)


class PanopticStats:
    """Per-category sums for PQ: ``iou`` (sum of matched IoUs, float64) and ``tp``, ``fp``, ``fn``
    (int64), each of shape (C,), in the order of ``category_ids``."""

    def __init__(self, num_categories: int):
        self.iou = np.zeros(num_categories, np.float64)
        self.tp = np.zeros(num_categories, np.int64)
        self.fp = np.zeros(num_categories, np.int64)
        self.fn = np.zeros(num_categories, np.int64)

    def __iadd__(self, other: "PanopticStats"):
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


class _Categories:
    """The categories of a panoptic gt JSON: id -> index and isthing; a duplicated id is refused."""

    def __init__(self, categories: List[dict], source: str):
        self.ids, self.isthing, self.names = [], [], []
        self.index = {}
        for cat in categories:
            cid = cat["id"]
            if cid in self.index:
                other = self.isthing[self.index[cid]]
                kinds = (
                    "as a thing and as stuff" if other != bool(cat.get("isthing", 0)) else "twice"
                )
                raise Seg2Error(f"{source}: category id {cid} is listed {kinds}")
            self.index[cid] = len(self.ids)
            self.ids.append(cid)
            self.isthing.append(bool(cat.get("isthing", 0)))
            self.names.append(str(cat.get("name", cid)))
        self.isthing_arr = np.array(self.isthing, bool)
        self.dicts = {c["id"]: c for c in categories}

    def lookup(self, segments: List[dict], where: str) -> np.ndarray:
        try:
            return np.array([self.index[s["category_id"]] for s in segments], np.int64)
        except KeyError:
            bad = next(s for s in segments if s["category_id"] not in self.index)
            raise Seg2Error(
                f"{where}: segment id {bad['id']} has category_id {bad['category_id']}, which is "
                "not among "
                f"the gt JSON's categories"
            ) from None


def _check_segment_ids(segments: List[dict], where: str):
    seen = set()
    for s in segments:
        if s["id"] == VOID:
            raise Seg2Error(f"{where}: segment id 0 is listed in segments_info, but id 0 is VOID")
        if s["id"] in seen:
            raise Seg2Error(f"{where}: segment id {s['id']} is listed twice in segments_info")
        seen.add(s["id"])


def _runs(gt: np.ndarray, pred: np.ndarray):
    """(gt value, pred value, length) of each run of equal (gt, pred) pairs in two flat arrays."""
    n = gt.size
    if n == 0:
        return gt[:0], pred[:0], np.zeros(0, np.float64)
    change = np.empty(n, bool)
    change[0] = True
    np.not_equal(gt[1:], gt[:-1], out=change[1:])
    change[1:] |= pred[1:] != pred[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(starts, append=n).astype(np.float64)
    return gt[starts], pred[starts], lengths


def image_stats(
    gt_ids: np.ndarray,
    gt_segments: List[dict],
    pred_ids: np.ndarray,
    pred_segments: List[dict],
    categories: _Categories,
    gt_name: str = "gt",
    pred_name: str = "prediction",
) -> PanopticStats:
    """PQ sums of one image from its gt and predicted id maps and segments_info lists."""
    if gt_ids.shape != pred_ids.shape:
        raise Seg2Error(
            f"{pred_name}: panoptic map is {pred_ids.shape} (H, W) but its gt {gt_name} is "
            f"{gt_ids.shape}"
        )
    _check_segment_ids(gt_segments, gt_name)
    _check_segment_ids(pred_segments, pred_name)
    gt_cat = categories.lookup(gt_segments, gt_name)
    pred_cat = categories.lookup(pred_segments, pred_name)
    kg, kp = len(gt_segments), len(pred_segments)
    # Panoptic maps are flat regions: the pixels where neither map changes from the previous one
    # (in raster order) belong to the same (gt, pred) pair, so only the starts of runs are looked
    # up and counted, each weighted by its length (a few percent of the pixels).
    gt_run, pred_run, lengths = _runs(gt_ids.ravel(), pred_ids.ravel())
    gi = _segment_index(gt_run, [s["id"] for s in gt_segments], scale=kp + 1)
    pi = _segment_index(pred_run, [s["id"] for s in pred_segments])
    for idx, ids, name, kind in (
        (gi, gt_run, gt_name, "gt"),
        (pi, pred_run, pred_name, "predicted"),
    ):
        if idx.size and idx.min() < 0:
            raise Seg2Error(
                f"{name}: {kind} PNG has segment id {int(ids[idx < 0][0])}, which is not in its "
                "JSON segments_info"
            )
    conf = np.bincount(gi + pi, weights=lengths, minlength=(kg + 1) * (kp + 1))
    conf = conf.astype(np.int64).reshape(kg + 1, kp + 1)  # sums of integers below 2^53: exact
    gt_png_area = conf[1:].sum(axis=1)
    pred_area = conf[:, 1:].sum(axis=0)
    for area, segs, name, kind in (
        (gt_png_area, gt_segments, gt_name, "gt"),
        (pred_area, pred_segments, pred_name, "predicted"),
    ):
        missing = np.flatnonzero(area == 0)
        if missing.size:
            raise Seg2Error(
                f"{name}: {kind} JSON segment id {segs[missing[0]]['id']} is not in its PNG"
            )
    # panopticapi takes gt areas from the JSON; so does this, for equal numbers.
    gt_area = np.array([s.get("area", a) for s, a in zip(gt_segments, gt_png_area)], np.int64)
    crowd = np.array([bool(s.get("iscrowd", 0)) for s in gt_segments], bool)

    stats = PanopticStats(len(categories.ids))
    inter = conf[1:, 1:]
    void_pred = conf[0, 1:]
    union = pred_area[None, :] + gt_area[:, None] - inter - void_pred[None, :]
    valid = (inter > 0) & (gt_cat[:, None] == pred_cat[None, :]) & ~crowd[:, None]
    rows, cols = np.nonzero(valid)
    iou = inter[rows, cols] / union[rows, cols]
    matched = iou > 0.5
    rows, cols, iou = rows[matched], cols[matched], iou[matched]
    c = len(categories.ids)
    stats.tp += np.bincount(gt_cat[rows], minlength=c)
    stats.iou += np.bincount(gt_cat[rows], weights=iou, minlength=c)
    gt_matched = np.zeros(kg, bool)
    gt_matched[rows] = True
    pred_matched = np.zeros(kp, bool)
    pred_matched[cols] = True
    stats.fn += np.bincount(gt_cat[~gt_matched & ~crowd], minlength=c)
    # The crowd region of a category: panopticapi keeps the last crowd gt segment of each category.
    crowd_of_cat = {}
    for j in np.flatnonzero(crowd):
        crowd_of_cat[gt_cat[j]] = j
    unmatched = np.flatnonzero(~pred_matched)
    if unmatched.size:
        ignored = void_pred[unmatched].astype(np.int64)
        crowd_rows = np.array([crowd_of_cat.get(pred_cat[k], -1) for k in unmatched], np.int64)
        has = crowd_rows >= 0
        ignored[has] += inter[crowd_rows[has], unmatched[has]]
        fp = ignored / pred_area[unmatched] <= 0.5
        stats.fp += np.bincount(pred_cat[unmatched[fp]], minlength=c)
    return stats


def pq_from_stats(stats: PanopticStats, categories: _Categories) -> Dict:
    """panopticapi's result dict: {"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class":
    {category_id: {"pq", "sq", "rq"}}}. A group without categories to average ("n" = 0, where
    panopticapi divides by zero) has NaN pq/sq/rq."""
    results = {}
    tp, fp, fn, iou = stats.tp, stats.fp, stats.fn, stats.iou
    per_class = {}
    for i, cid in enumerate(categories.ids):
        if tp[i] + fp[i] + fn[i] == 0:
            per_class[cid] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        denom = tp[i] + 0.5 * fp[i] + 0.5 * fn[i]
        per_class[cid] = {
            "pq": float(iou[i] / denom),
            "sq": float(iou[i] / tp[i]) if tp[i] != 0 else 0.0,
            "rq": float(tp[i] / denom),
        }
    counted = (tp + fp + fn) > 0
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        sel = counted.copy()
        if isthing is not None:
            sel &= categories.isthing_arr == isthing
        n = int(sel.sum())
        if n == 0:
            results[name] = {"pq": float("nan"), "sq": float("nan"), "rq": float("nan"), "n": 0}
        else:
            ids = [cid for i, cid in enumerate(categories.ids) if sel[i]]
            results[name] = {
                k: sum(per_class[cid][k] for cid in ids) / n for k in ("pq", "sq", "rq")
            }
            results[name]["n"] = n
        if name == "All":
            results["per_class"] = per_class
    return results


def _load_json(path: str) -> dict:
    try:
        with PathManager.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise Seg2Error(f"{path}: no such panoptic JSON file") from None
    except json.JSONDecodeError as e:
        raise Seg2Error(f"{path}: not a JSON file ({e})") from None


def _pair_stats(args) -> PanopticStats:
    gt_ann, pred_ann, gt_folder, pred_folder, categories = args
    gt_path = os.path.join(gt_folder, gt_ann["file_name"])
    pred_path = os.path.join(pred_folder, pred_ann["file_name"])
    return image_stats(
        read_panoptic_png(gt_path),
        gt_ann["segments_info"],
        read_panoptic_png(pred_path),
        pred_ann["segments_info"],
        categories,
        gt_path,
        pred_path,
    )


def pq_compute(
    gt_json_file: str,
    pred_json_file: str,
    gt_folder: Optional[str] = None,
    pred_folder: Optional[str] = None,
    num_workers: int = 0,
) -> Dict:
    """
    PQ, SQ, RQ of panoptic predictions, with panopticapi's ``pq_compute`` signature, folder
    defaults (``X`` for ``X.json``) and result dict (see :func:`pq_from_stats`).

    Args:
        gt_json_file, pred_json_file (str): COCO panoptic JSON files; categories come from the gt's.
        gt_folder, pred_folder (str or None): the folders of their PNGs.
        num_workers (int): processes to spread the images over (0: this process; panopticapi
            always uses one per core).
    """
    gt_json = _load_json(gt_json_file)
    pred_json = _load_json(pred_json_file)
    if gt_folder is None:
        gt_folder = gt_json_file.replace(".json", "")
    if pred_folder is None:
        pred_folder = pred_json_file.replace(".json", "")
    for folder, what in ((gt_folder, "ground truth"), (pred_folder, "prediction")):
        if not os.path.isdir(folder):
            raise Seg2Error(f"{folder}: no folder of {what} panoptic PNGs")
    categories = _Categories(gt_json["categories"], gt_json_file)
    pred_annotations = {el["image_id"]: el for el in pred_json["annotations"]}
    pairs = []
    for gt_ann in gt_json["annotations"]:
        if gt_ann["image_id"] not in pred_annotations:
            raise Seg2Error(f"{pred_json_file}: no prediction for image_id {gt_ann['image_id']!r}")
        pairs.append(
            (gt_ann, pred_annotations[gt_ann["image_id"]], gt_folder, pred_folder, categories)
        )
    extra = len(set(pred_annotations) - {a["image_id"] for a in gt_json["annotations"]})
    if extra:
        logger.warning(
            f"{pred_json_file}: {extra} predicted images have no gt in {gt_json_file}; "
            "not evaluated"
        )
    stats = PanopticStats(len(categories.ids))
    if num_workers > 0 and len(pairs) > 1:
        ctx = multiprocessing.get_context(
            "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        )
        with ctx.Pool(num_workers) as pool:
            for s in pool.imap(
                _pair_stats, pairs, chunksize=max(1, len(pairs) // (4 * num_workers))
            ):
                stats += s
    else:
        for p in pairs:
            stats += _pair_stats(p)
    results = pq_from_stats(stats, categories)
    logger.info(f"PQ of {pred_json_file} ({len(pairs)} images):\n" + format_pq_table(results))
    return results


def format_pq_table(pq_res: Dict) -> str:
    """The All/Things/Stuff table as detectron2 logs it."""
    from tabulate import tabulate

    data = [
        [n] + [pq_res[n][k] * 100 for k in ("pq", "sq", "rq")] + [pq_res[n]["n"]]
        for n in ("All", "Things", "Stuff")
    ]
    return tabulate(
        data,
        headers=["", "PQ", "SQ", "RQ", "#categories"],
        tablefmt="pipe",
        floatfmt=".3f",
        stralign="center",
        numalign="center",
    )


class Seg2PanopticEvaluator(DatasetEvaluator):
    """
    Panoptic quality with detectron2's ``COCOPanopticEvaluator`` interface and results, computed in
    memory by seg2 (no panopticapi, no PNGs written unless ``output_dir`` is given). Each process
    evaluates its own images against the dataset's ``panoptic_json`` / ``panoptic_root``; the
    per-image sums are gathered to the main process, which returns the results.
    """

    def __init__(
        self, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True
    ):
        """
        Args:
            dataset_name: a dataset whose metadata has ``panoptic_json``, ``panoptic_root``,
                ``thing_dataset_id_to_contiguous_id`` and ``stuff_dataset_id_to_contiguous_id``
                (as detectron2's ``register_coco_panoptic[_separated]`` set them).
            output_dir: when given, the predictions are also written there as panopticapi reads
                them: ``predictions/<image>.png`` and ``predictions.json``.
            distributed: gather the results of all processes to the main one.
        """
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        for key in ("panoptic_json", "panoptic_root"):
            if not self._metadata.get(key, None):
                raise Seg2Error(
                    f"dataset {dataset_name!r}: metadata has no {key!r}; PQ needs the panoptic "
                    "ground truth"
                )
        self._thing_contiguous_id_to_dataset_id = {
            v: k for k, v in self._metadata.get("thing_dataset_id_to_contiguous_id", {}).items()
        }
        self._stuff_contiguous_id_to_dataset_id = {
            v: k for k, v in self._metadata.get("stuff_dataset_id_to_contiguous_id", {}).items()
        }
        self._gt_json_file = self._metadata.panoptic_json
        self._gt_root = self._metadata.panoptic_root
        gt_json = _load_json(self._gt_json_file)
        self._gt_json_categories = gt_json["categories"]
        self._categories = _Categories(gt_json["categories"], self._gt_json_file)
        self._gt = {a["image_id"]: a for a in gt_json["annotations"]}
        self._output_dir = output_dir
        self._distributed = distributed
        if output_dir:
            PathManager.mkdirs(os.path.join(output_dir, "predictions"))

    def reset(self):
        self._stats = {}
        self._annotations = []

    def _convert_category_id(self, segment_info, where):
        isthing = segment_info.pop("isthing", None)
        if isthing is None:
            # the model produces panoptic (dataset) category ids directly, as in detectron2
            return segment_info
        table = (
            self._thing_contiguous_id_to_dataset_id
            if isthing
            else self._stuff_contiguous_id_to_dataset_id
        )
        cid = segment_info["category_id"]
        if cid not in table:
            kind = "thing" if isthing else "stuff"
            raise Seg2Error(
                f"{where}: segment id {segment_info['id']} has contiguous {kind} category_id "
                f"{cid}, which is not in the metadata's {kind}_dataset_id_to_contiguous_id of "
                f"{self._dataset_name!r}"
            )
        segment_info["category_id"] = table[cid]
        return segment_info

    def _segments_from_labels(self, panoptic_img):
        # detectron2's convention when segments_info is None: category_id * label_divisor +
        # instance_id, -1 for VOID; ids are shifted by one so that 0 is VOID.
        label_divisor = self._metadata.label_divisor
        thing_contiguous = set(self._metadata.thing_dataset_id_to_contiguous_id.values())
        segments_info = []
        for panoptic_label in np.unique(panoptic_img):
            if panoptic_label == -1:
                continue
            pred_class = int(panoptic_label) // label_divisor
            segments_info.append(
                {
                    "id": int(panoptic_label) + 1,
                    "category_id": pred_class,
                    "isthing": pred_class in thing_contiguous,
                }
            )
        return segments_info, panoptic_img + 1

    def process(self, inputs, outputs):
        for input, output in zip(inputs, outputs):
            panoptic_img, segments_info = output["panoptic_seg"]
            panoptic_img = panoptic_img.cpu().numpy().astype(np.int64)
            file_name = input.get("file_name", str(input["image_id"]))
            if segments_info is None:
                segments_info, panoptic_img = self._segments_from_labels(panoptic_img)
            segments_info = [self._convert_category_id(dict(x), file_name) for x in segments_info]
            image_id = input["image_id"]
            gt_ann = self._gt.get(image_id)
            if gt_ann is None:
                raise Seg2Error(
                    f"{self._gt_json_file}: no annotation for image_id {image_id!r} ({file_name})"
                )
            gt_path = os.path.join(self._gt_root, gt_ann["file_name"])
            self._stats[image_id] = image_stats(
                read_panoptic_png(gt_path),
                gt_ann["segments_info"],
                panoptic_img,
                segments_info,
                self._categories,
                gt_path,
                f"prediction for {file_name}",
            )
            if self._output_dir:
                png = os.path.splitext(os.path.basename(file_name))[0] + ".png"
                with PathManager.open(
                    os.path.join(self._output_dir, "predictions", png), "wb"
                ) as f:
                    Image.fromarray(id2rgb(panoptic_img)).save(f, format="PNG")
                self._annotations.append(
                    {"image_id": image_id, "file_name": png, "segments_info": segments_info}
                )

    def evaluate(self):
        stats, annotations = self._stats, self._annotations
        if self._distributed:
            comm.synchronize()
            stats = comm.gather(stats)
            annotations = list(itertools.chain(*comm.gather(annotations)))
            if not comm.is_main_process():
                return
            merged = {}
            for s in stats:
                merged.update(s)
            stats = merged
        if not stats:
            raise Seg2Error(
                f"dataset {self._dataset_name!r}: no panoptic predictions were processed; no PQ"
            )
        missing = len(set(self._gt) - set(stats))
        if missing:
            logger.warning(
                f"{self._gt_json_file}: {missing} of {len(self._gt)} images have no prediction; "
                "PQ is over "
                f"the {len(stats)} evaluated"
            )
        total = PanopticStats(len(self._categories.ids))
        for image_id in sorted(stats, key=repr):  # one order, whatever the number of processes
            total += stats[image_id]
        pq_res = pq_from_stats(total, self._categories)
        if self._output_dir:
            json_data = {"categories": self._gt_json_categories, "annotations": annotations}
            with PathManager.open(os.path.join(self._output_dir, "predictions.json"), "w") as f:
                json.dump(json_data, f)
        res = {}
        for key, name in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
            for m in ("pq", "sq", "rq"):
                res[m.upper() + key] = 100 * pq_res[name][m]
        # Per class as detectron2's SemSegEvaluator names them; NaN for a category with no gt and
        # no prediction (it is not in the averages).
        for i, cid in enumerate(self._categories.ids):
            counted = total.tp[i] + total.fp[i] + total.fn[i] > 0
            for m in ("pq", "sq", "rq"):
                v = 100 * pq_res["per_class"][cid][m] if counted else float("nan")
                res[f"{m.upper()}-{self._categories.names[i]}"] = v
        logger.info("Panoptic Evaluation Results:\n" + format_pq_table(pq_res))
        return OrderedDict({"panoptic_seg": res})
