"""
COCO mask (and box) AP computed by pycocotools' ``COCOeval`` for any registered dataset.

Compared with detectron2's :class:`~detectron2.evaluation.COCOEvaluator` the numbers are the same
(same ``COCOeval``, same inputs) but the work around it is cheaper: masks are RLE-encoded from the
columns they occupy instead of one full-image Fortran copy per instance, the results are handed to
``COCOeval`` without a JSON round trip or a deep copy per task, and datasets without a COCO JSON
are converted in memory. Only the processed images are evaluated.

It subclasses :class:`~detectron2.evaluation.DatasetEvaluator`, not ``COCOEvaluator``: the latter's
constructor writes a dataset without a COCO JSON to ``output_dir`` (and points the metadata's
``json_file`` at it), and its ``_derive_coco_results`` is private; :func:`coco_metrics` owns that
table instead.
"""

import contextlib
import io
import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import COCOevalMaxDets
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tabulate import tabulate

from ..utils import Seg2Error

logger = logging.getLogger(__name__)

try:  # detectron2's C++ evaluateImg/accumulate (compiled with detectron2._C)
    from detectron2.evaluation.fast_eval_api import COCOeval_opt
except ImportError:  # pragma: no cover - detectron2 built without its C++ ops
    COCOeval_opt = None

# backend name -> COCOeval class; "pycocotools" is the reference.
BACKENDS = {"pycocotools": COCOeval, "detectron2_fast": COCOeval_opt}


class COCOevalOptMaxDets(COCOevalMaxDets, COCOeval_opt or COCOeval):
    """detectron2's C++ ``evaluate``/``accumulate`` (``COCOeval_opt``) with the ``summarize`` of its
    ``COCOevalMaxDets`` (AP at ``maxDets[2]``, which pycocotools' summarize fixes at 100)."""


# The same for a maxDets[2] other than COCO's 100, as detectron2's COCOEvaluator does.
BACKENDS_MAX_DETS = {
    "pycocotools": COCOevalMaxDets,
    "detectron2_fast": COCOeval_opt and COCOevalOptMaxDets,
}
# COCO's limit on detections per image (COCOeval's maxDets[2], detectron2's COCOEvaluator default).
COCO_MAX_DETS_PER_IMAGE = 100
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_metrics(coco_eval, iou_type: str, class_names: Sequence[str], category_ids: Sequence[int]):
    """
    The numbers of a summarized ``COCOeval`` (bbox or segm) in percent, NaN where COCOeval gives -1:
    ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AP-<class>``, then ``AR<n>`` for the
    three maxDets (AR1, AR10, AR100 by default), ``ARs``, ``ARm``, ``ARl``.

    The AP part is the dict of detectron2's ``COCOEvaluator._derive_coco_results``, formula for
    formula (per class: the mean of the precisions > -1 over all IoUs and recalls, all areas, the
    largest maxDets). It is owned here because that method is private and needs a COCOEvaluator
    instance (whose constructor would load or convert the dataset a second time).

    Args:
        class_names (list[str]): the names of the contiguous classes.
        category_ids (list[int]): the dataset (COCO) category id of each contiguous class, to find
            its column in ``coco_eval.eval["precision"]`` (ordered as ``coco_eval.params.catIds``).
    """
    stats = coco_eval.stats
    results = OrderedDict(
        (k, float(stats[i] * 100) if stats[i] >= 0 else float("nan")) for i, k in enumerate(AP_KEYS)
    )
    logger.info(f"Evaluation results for {iou_type}: \n" + create_small_table(results))
    if len(class_names) > 1:
        precisions = coco_eval.eval["precision"]  # (iou, recall, class, area range, max dets)
        column = {cid: k for k, cid in enumerate(coco_eval.params.catIds)}
        per_class = []
        for name, cid in zip(class_names, category_ids):
            precision = precisions[:, :, column[cid], 0, -1]
            precision = precision[precision > -1]
            per_class.append(
                (name, float(np.mean(precision) * 100) if precision.size else float("nan"))
            )
        n_cols = min(6, len(per_class) * 2)
        flat = list(itertools.chain(*per_class))
        rows = itertools.zip_longest(*[flat[i::n_cols] for i in range(n_cols)])
        table = tabulate(
            rows,
            tablefmt="pipe",
            floatfmt=".3f",
            headers=["category", "AP"] * (n_cols // 2),
            numalign="left",
        )
        logger.info(f"Per-category {iou_type} AP: \n" + table)
        results.update((f"AP-{name}", ap) for name, ap in per_class)
    max_dets = coco_eval.params.maxDets
    ar_keys = [f"AR{max_dets[0]}", f"AR{max_dets[1]}", f"AR{max_dets[2]}", "ARs", "ARm", "ARl"]
    for key, value in zip(ar_keys, stats[6:12]):
        results[key] = float(value * 100) if value >= 0 else float("nan")
    return results


def encode_masks(masks: torch.Tensor):
    """
    COCO compressed RLEs of binary masks, equal to ``pycocotools.mask.encode`` of each.

    Each mask is run-length coded inside its bounding box only (every run outside it is zeros),
    so the cost follows the instances' sizes, not the image's; pycocotools would need one
    full-image Fortran-order copy per mask.

    Args:
        masks (Tensor): (N, H, W) bool, or uint8 holding 0/1, on any device.

    Returns:
        list[dict]: N dicts ``{"size": [H, W], "counts": bytes}``.
    """
    if masks.dim() != 3:
        raise ValueError(f"encode_masks expects (N, H, W) masks, got {tuple(masks.shape)}")
    n, h, w = masks.shape
    if n == 0:
        return []
    m = masks.detach().to("cpu")
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    elif m.dtype != torch.uint8:
        raise ValueError(
            f"masks must be bool (or uint8 0/1), got {m.dtype}: threshold soft masks first"
        )
    elif int(m.max()) > 1:
        raise ValueError("uint8 masks must hold only 0 and 1")
    m = m.contiguous()
    # Occupied columns of every mask in one pass, 8 pixels at a time when the width allows.
    group = 8 if w % 8 == 0 else 1
    packed = m.view(torch.int64) if group == 8 else m
    occupied = packed.amax(dim=1) > 0  # (N, W / group)
    nonempty = occupied.any(dim=1).tolist()
    first = occupied.to(torch.uint8).argmax(dim=1).tolist()
    last = (occupied.shape[1] - occupied.flip(1).to(torch.uint8).argmax(dim=1)).tolist()
    arr = m.numpy()
    packed_np = packed.numpy() if group == 8 else None
    uncompressed = []
    for i in range(n):
        if not nonempty[i]:
            uncompressed.append({"size": [h, w], "counts": [h * w]})
            continue
        lo, hi = first[i] * group, last[i] * group
        if packed_np is not None:  # occupied rows from the packed words: 8x fewer elements
            rows = np.flatnonzero(packed_np[i, :, first[i] : last[i]].max(axis=1))
        else:
            rows = np.flatnonzero(
                arr[i, :, lo:hi].max(axis=1)
            )  # uint8 max reduces faster than any()
        y0, y1 = rows[0], rows[-1] + 1
        band = arr[i, y0:y1, lo:hi]
        cols = np.flatnonzero(band.max(axis=0))
        x0 = lo + cols[0]
        crop = band[:, cols[0] : cols[-1] + 1]
        # Column-major crop with a zero row above and below: runs cannot cross the box edges.
        padded = np.zeros((crop.shape[1], crop.shape[0] + 2), dtype=np.uint8)
        padded[:, 1:-1] = crop.T
        step = np.flatnonzero(padded[:, 1:] != padded[:, :-1])
        col, row = np.divmod(step, crop.shape[0] + 1)
        starts = (x0 + col) * h + y0 + row  # first pixel of each new run, column-major
        if y0 == 0 and y1 == h:
            # A box of full height: a run of ones leaving the bottom of a column and one entering
            # the top of the next start at the same pixel: one run, not two.
            dup = np.flatnonzero(starts[1:] == starts[:-1])
            if dup.size:
                starts = np.delete(starts, np.concatenate((dup, dup + 1)))
        counts = np.diff(np.concatenate(([0], starts, [h * w]))).tolist()
        if counts[-1] == 0:  # the last run ends exactly at the image's last pixel
            counts.pop()
        uncompressed.append({"size": [h, w], "counts": counts})
    return mask_util.frPyObjects(uncompressed, h, w)


def load_coco_gt(dataset_name: str) -> COCO:
    """
    The ground truth of a registered dataset as a pycocotools ``COCO``: read from the metadata's
    ``json_file`` when it has one, else converted in memory with detectron2's
    ``convert_to_coco_dict`` (datasets in detectron2's format: VOC instances, custom loaders).
    """
    meta = MetadataCatalog.get(dataset_name)
    json_file = meta.get("json_file", None)
    with contextlib.redirect_stdout(io.StringIO()):
        if json_file:
            local = PathManager.get_local_path(json_file)
            if not os.path.isfile(local):
                raise Seg2Error(
                    f"dataset {dataset_name!r}: metadata json_file {json_file} does not exist"
                )
            coco = COCO(local)
        else:
            logger.info(
                f"{dataset_name!r} has no json_file: converting its records to COCO format in "
                "memory"
            )
            coco = COCO()
            coco.dataset = convert_to_coco_dict(dataset_name)
            coco.createIndex()
    if len(coco.imgs) == 0:
        raise Seg2Error(f"dataset {dataset_name!r} has no images: nothing to evaluate AP on")
    if "annotations" not in coco.dataset:
        raise Seg2Error(
            f"dataset {dataset_name!r}: {json_file} has no 'annotations' (a test-dev JSON?); AP "
            "needs ground truth"
        )
    return coco


class MaskAPEvaluator(DatasetEvaluator):
    """
    COCO-style mask (``segm``) and box (``bbox``) AP and AR, as pycocotools' ``COCOeval`` computes
    them, on the processed images of a registered dataset; results under detectron2's keys
    (``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AP-<class>``) plus the six AR numbers,
    in percent (see :func:`coco_metrics`).

    An image processed with no instance keeps its ground truth as misses; images never processed
    are left out. Bad input is an error: an ``image_id`` not in the dataset or seen twice, class ids
    outside the dataset, NaN scores or boxes, masks of another size than the image (ValueError /
    Seg2Error). No processed image: a warning and ``{}``. No instance at all: AP 0 where the
    processed images have ground truth.
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        tasks: Sequence[str] = ("bbox", "segm"),
        backend: str = "detectron2_fast",
        segm_area: str = "box",
        max_dets_per_image: int = COCO_MAX_DETS_PER_IMAGE,
        save_predictions_json: bool = False,
    ):
        """
        Args:
            dataset_name (str): a registered dataset with a COCO ``json_file`` in its metadata, or
                records with ``annotations`` in detectron2's format (converted in memory).
            distributed (bool): gather the predictions of all processes; the main process returns
                the results, the others ``{}``.
            output_dir (str or None): where ``mask_ap_evaluation.json`` (metrics, 12 COCO numbers
                per task) is written.
            tasks (tuple[str]): among "bbox", "segm".
            backend (str): "detectron2_fast" (detectron2's C++ ``COCOeval_opt``, identical numbers
                on seg2's tests and benchmark) or "pycocotools" (the reference ``COCOeval``).
            segm_area (str): the detection area that puts it in the small/medium/large range for
                ``segm``: "box" (default: what pycocotools' ``COCOeval`` does with results that
                carry a box and a mask, as Mask R-CNN's do; reproduces the team's pycocotools
                fixture) or "mask" (the mask's area, as detectron2's COCOEvaluator, which drops
                the box). AP/AP50/AP75 do not depend on it; APs/APm/APl and ARs/ARm/ARl may.
            max_dets_per_image (int): how many detections of an image count (highest scores
                first; COCOeval applies the limit per image and category): COCOeval's ``maxDets``
                become ``[1, 10, max_dets_per_image]`` as with detectron2's
                ``COCOEvaluator(max_dets_per_image=...)``, AP and ``AR<max_dets_per_image>`` are
                taken at this limit. At least 10 (COCOeval sorts ``maxDets``: a smaller value
                would still give AP at 10). Default: COCO's 100.
            save_predictions_json (bool): write ``coco_instances_results.json`` to ``output_dir``.
        """
        unknown = set(tasks) - {"bbox", "segm"}
        if unknown or not tasks:
            raise ValueError(
                f"tasks={tuple(tasks)}: MaskAPEvaluator evaluates 'bbox' and/or 'segm'"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {sorted(BACKENDS)}")
        if BACKENDS[backend] is None:
            raise ValueError(
                f"backend={backend!r}: detectron2 was built without its C++ COCOeval_opt"
            )
        if segm_area not in ("mask", "box"):
            raise ValueError(f"segm_area={segm_area!r}: choose 'mask' or 'box'")
        is_int = isinstance(max_dets_per_image, (int, np.integer)) and not isinstance(
            max_dets_per_image, bool
        )
        if not is_int or max_dets_per_image < 10:
            raise ValueError(
                f"max_dets_per_image={max_dets_per_image!r}: a number of detections per image >= "
                "10 (COCOeval's "
                "maxDets [1, 10, max_dets_per_image] are sorted: AP is taken at the largest)"
            )
        if save_predictions_json and not output_dir:
            raise ValueError("save_predictions_json=True needs an output_dir")
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._tasks = tuple(sorted(set(tasks)))
        self._backend = backend
        self._segm_area = segm_area
        self._max_dets = [1, 10, int(max_dets_per_image)]  # as detectron2's COCOEvaluator
        self._save_predictions_json = save_predictions_json

        self._coco_gt = load_coco_gt(dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        d2c = meta.get("thing_dataset_id_to_contiguous_id", None)
        if not d2c:  # what detectron2's load_coco_json does: sorted category ids
            d2c = {cid: i for i, cid in enumerate(sorted(self._coco_gt.getCatIds()))}
        self._contiguous_to_dataset_id = np.zeros(len(d2c), dtype=np.int64)
        for dataset_id, contiguous in d2c.items():
            self._contiguous_to_dataset_id[contiguous] = dataset_id
        cats = self._coco_gt.loadCats(sorted(self._coco_gt.getCatIds()))
        self._class_names = list(meta.get("thing_classes", None) or [c["name"] for c in cats])
        if len(self._class_names) != len(cats) or len(d2c) != len(cats):
            raise Seg2Error(
                f"dataset {dataset_name!r}: its metadata has {len(self._class_names)} "
                "thing_classes and "
                f"{len(d2c)} thing_dataset_id_to_contiguous_id entries but its COCO ground truth "
                "has "
                f"{len(cats)} categories; AP per class needs one name per category"
            )
        self.reset()

    def reset(self):
        self._predictions = []  # one compact record per processed image
        self._seen = set()

    def process(self, inputs, outputs):
        """
        Args:
            inputs (list[dict]): model inputs, each with the record's ``image_id``.
            outputs (list[dict]): model outputs, each with ``instances`` holding ``pred_boxes``
                (XYXY, absolute), ``scores``, ``pred_classes`` (contiguous ids) and, for "segm",
                ``pred_masks`` (N, H, W) bool at the image's original size.
        """
        for inp, out in zip(inputs, outputs):
            image_id = inp["image_id"]
            if image_id not in self._coco_gt.imgs:
                raise Seg2Error(
                    f"image_id {image_id!r} ({inp.get('file_name', '?')}) is not in dataset "
                    f"{self._dataset_name!r}"
                )
            if image_id in self._seen:
                raise ValueError(
                    f"image_id {image_id!r} was processed twice; its detections would count twice"
                )
            if "instances" not in out:
                raise ValueError(
                    f"image_id {image_id}: the model output has no 'instances' (keys: "
                    f"{sorted(out)})"
                )
            self._predictions.append(self._encode(image_id, out["instances"]))
            self._seen.add(image_id)

    def _encode(self, image_id, instances):
        n = len(instances)
        scores = instances.scores.detach().to("cpu", torch.float32)
        boxes = instances.pred_boxes.tensor.detach().to("cpu", torch.float32).clone()
        classes = instances.pred_classes.detach().to("cpu", torch.int64)
        if n and (torch.isnan(scores).any() or torch.isnan(boxes).any()):
            raise ValueError(
                f"image_id {image_id}: NaN in scores or pred_boxes; refusing to score them"
            )
        num_classes = len(self._contiguous_to_dataset_id)
        if n and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
            bad = sorted({c for c in classes.tolist() if not 0 <= c < num_classes})
            raise ValueError(
                f"image_id {image_id}: pred_classes {bad} outside the {num_classes} classes of "
                "dataset "
                f"{self._dataset_name!r} (contiguous ids 0..{num_classes - 1})"
            )
        record = {
            "image_id": image_id,
            # XYXY -> XYWH in float32, as detectron2's instances_to_coco_json
            "boxes": torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            if n
            else [],
            "scores": scores.tolist(),
            "category_ids": self._contiguous_to_dataset_id[classes.numpy()].tolist(),
        }
        if "segm" in self._tasks:
            if not instances.has("pred_masks"):
                raise ValueError(f"image_id {image_id}: 'segm' AP needs instances.pred_masks")
            masks = instances.pred_masks
            img = self._coco_gt.imgs[image_id]
            if masks.dim() != 3 or tuple(masks.shape[1:]) != (img["height"], img["width"]):
                raise ValueError(
                    f"image_id {image_id}: pred_masks {tuple(masks.shape)} do not match the image "
                    "size "
                    f"{img['height']}x{img['width']}; paste masks at the original resolution "
                    "(detectron2's detector_postprocess)"
                )
            record["rles"] = encode_masks(masks)
        return record

    def _gather(self):
        if not self._distributed:
            return self._predictions
        comm.synchronize()
        predictions = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return None
        predictions = list(itertools.chain(*predictions))
        ids = [p["image_id"] for p in predictions]
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"MaskAPEvaluator({self._dataset_name!r}): some images were processed by two "
                "processes"
            )
        return predictions

    def _results_api(self, predictions, task):
        anns = []
        for p in predictions:
            rles = p.get("rles")
            if task == "segm" and self._segm_area == "mask" and rles:
                areas = mask_util.area(rles).tolist()
            else:
                areas = [b[2] * b[3] for b in p["boxes"]]
            for k, (box, score, cat) in enumerate(zip(p["boxes"], p["scores"], p["category_ids"])):
                ann = {
                    "image_id": p["image_id"],
                    "category_id": cat,
                    "score": score,
                    "bbox": box,
                    "area": areas[k],
                    "iscrowd": 0,
                    "id": len(anns) + 1,
                }
                if task == "segm":
                    ann["segmentation"] = rles[k]
                anns.append(ann)
        # What pycocotools' loadRes builds, without its copies and per-annotation recomputation.
        gt = self._coco_gt.dataset
        dt = COCO()
        dt.dataset = {
            "images": list(gt["images"]),
            "categories": list(gt["categories"]),
            "annotations": anns,
        }
        with contextlib.redirect_stdout(io.StringIO()):
            dt.createIndex()
        return dt

    def evaluate(self):
        """
        Returns:
            dict: ``{"bbox": {...}, "segm": {...}}`` in percent on the main process (NaN where
            COCOeval gives -1); ``{}`` elsewhere and when nothing was processed.
        """
        predictions = self._gather()
        if predictions is None:
            return {}
        if not predictions:
            logger.warning(
                f"MaskAPEvaluator({self._dataset_name!r}): no image was processed; no metrics"
            )
            return {}
        img_ids = sorted(p["image_id"] for p in predictions)
        results = OrderedDict()
        self.coco_evals = {}
        backends = BACKENDS if self._max_dets[2] == COCO_MAX_DETS_PER_IMAGE else BACKENDS_MAX_DETS
        for task in self._tasks:
            coco_dt = self._results_api(predictions, task)
            coco_eval = backends[self._backend](self._coco_gt, coco_dt, task)
            coco_eval.params.imgIds = img_ids
            coco_eval.params.maxDets = list(self._max_dets)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
            logger.info(
                f"COCOeval ({self._backend}) {task} on {len(img_ids)} images of "
                f"{self._dataset_name}:\n{out.getvalue()}"
            )
            results[task] = coco_metrics(
                coco_eval, task, self._class_names, self._contiguous_to_dataset_id.tolist()
            )
            self.coco_evals[task] = coco_eval
        if self._output_dir:
            self._write(results, predictions)
        return results

    def _write(self, results, predictions):
        PathManager.mkdirs(self._output_dir)
        payload = {
            "dataset": self._dataset_name,
            "backend": self._backend,
            "segm_area": self._segm_area,
            "max_dets_per_image": self._max_dets[2],
            "results": {
                t: {k: (None if np.isnan(v) else v) for k, v in r.items()}
                for t, r in results.items()
            },
        }
        with PathManager.open(os.path.join(self._output_dir, "mask_ap_evaluation.json"), "w") as f:
            json.dump(payload, f, indent=1)
        if self._save_predictions_json:
            coco_results = []
            for p in predictions:
                for k, (box, score, cat) in enumerate(
                    zip(p["boxes"], p["scores"], p["category_ids"])
                ):
                    r = {"image_id": p["image_id"], "category_id": cat, "bbox": box, "score": score}
                    if "rles" in p:
                        rle = p["rles"][k]
                        r["segmentation"] = {
                            "size": rle["size"],
                            "counts": rle["counts"].decode("utf-8"),
                        }
                    coco_results.append(r)
            with PathManager.open(
                os.path.join(self._output_dir, "coco_instances_results.json"), "w"
            ) as f:
                json.dump(coco_results, f)
