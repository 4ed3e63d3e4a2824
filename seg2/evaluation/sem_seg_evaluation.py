"""
mIoU evaluation with a confusion matrix, counted on the CPU in single-threaded numpy kernels
(on an accelerator: on the prediction's device).

The metrics are those of detectron2's :class:`~detectron2.evaluation.SemSegEvaluator` (same keys,
same formulas, percent), computed from the same confusion matrix. What differs is the cost:
detectron2 keeps an RLE of every predicted class of every image in memory (for a JSON dump) and
uses ``torch.argmax`` over channels, which is slow on the CPU; here nothing per image is kept
unless asked, the argmax is a few vectorised numpy passes per channel and the counting is one
``np.bincount`` per image. numpy, not torch, on the CPU: a torch op on a large tensor forks and
joins torch's intra-op thread pool, and with one op per channel that is a few hundred round trips
per image, each waiting for the slowest thread, which is slow when other processes share the
cores (tools/benchmarks/benchmark_evaluators.py measures both under load). It is a
:class:`~detectron2.evaluation.DatasetEvaluator` of its own, not a ``SemSegEvaluator`` subclass
(it would override every method and inherit none of the state).
"""

import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table
from tabulate import tabulate

from ..data.label_map import read_sem_seg
from ..utils import Seg2Error
from .plots import plot_confusion_matrix, plot_per_class_iou

try:
    import cv2
except ImportError:  # the torch path of mask_to_boundary needs no OpenCV
    cv2 = None

logger = logging.getLogger(__name__)

# detectron2's SemSegEvaluator._mask_to_boundary uses 2% of the image diagonal.
BOUNDARY_DILATION_RATIO = 0.02


def _argmax_numpy(x: np.ndarray):
    """(H, W) uint8 ``x.argmax(0)`` of a (C, H, W) float array, C <= 256, and whether x has a NaN.

    Single-threaded numpy, four vectorised passes per channel that keep a running maximum: where
    channel c is strictly greater than the maximum so far, the index becomes c, written as
    ``max(pred, c * is_greater)`` (c grows, so it wins; a masked ``np.copyto`` branches per pixel
    and is several times slower). Strictly greater keeps the first maximum on ties, as
    ``torch.argmax``; ``np.maximum`` propagates NaN, so the final maximum tells about NaN.
    """
    num_channels = x.shape[0]
    best = x[0].copy()
    pred = np.zeros(best.shape, dtype=np.uint8)
    greater = np.empty(best.shape, dtype=bool)
    weighted = np.empty(best.shape, dtype=np.uint8)
    for c in range(1, num_channels):
        np.greater(x[c], best, out=greater)
        np.maximum(best, x[c], out=best)
        np.multiply(greater.view(np.uint8), c, out=weighted)
        np.maximum(pred, weighted, out=pred)
    return pred, bool(np.isnan(best).any())


def _cpu_logits_numpy(logits: torch.Tensor) -> Optional[np.ndarray]:
    """The CPU logits as a float32/float64 numpy array (no copy for those dtypes), or None where
    the numpy path does not apply (another device, more than 256 channels, integer logits)."""
    if logits.device.type != "cpu" or logits.shape[0] > 256 or not logits.is_floating_point():
        return None
    if logits.dtype not in (torch.float32, torch.float64):  # half, bfloat16: slow or not in numpy
        logits = logits.float()
    return logits.detach().numpy()


def argmax_channels(logits: torch.Tensor):
    """
    ``logits.argmax(dim=0)`` (first maximum on ties, as ``torch.argmax``), as uint8 when there are
    at most 256 channels, and whether any logit is NaN.

    On the CPU this is :func:`_argmax_numpy`: ``torch.argmax`` over the leading dimension of a
    (C, H, W) tensor is 10-20x slower there, and a torch loop over channels pays a thread-pool
    fork/join per op, which is slow on a shared CPU.

    Returns:
        (Tensor, bool): (H, W) class indices, and True when a logit is NaN (indices then undefined).
    """
    x = _cpu_logits_numpy(logits)
    if x is not None:
        pred, has_nan = _argmax_numpy(x)
        return torch.from_numpy(pred), has_nan
    num_channels = logits.shape[0]
    floating = logits.is_floating_point()
    pred = logits.argmax(dim=0)
    has_nan = bool(torch.isnan(logits).any()) if floating else False
    return (pred.to(torch.uint8) if num_channels <= 256 else pred), has_nan


def _boundary_dilation(h: int, w: int, dilation_ratio: float) -> int:
    return max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))


def mask_to_boundary(
    mask: torch.Tensor, dilation_ratio: float = BOUNDARY_DILATION_RATIO, use_cv2=None
):
    """
    detectron2's ``SemSegEvaluator._mask_to_boundary`` for an (H, W) uint8 label map:
    ``mask - erode(mask)`` where the erosion is a (2d+1)-square minimum filter over the map
    padded by one ring of zeros, d = 2% of the diagonal. Note that on a multi-class map this is a
    difference of label values, not a class map; it is reproduced as detectron2 defines it.

    Args:
        mask (Tensor): (H, W) uint8.
        dilation_ratio (float): d as a fraction of the image diagonal.
        use_cv2 (bool or None): erode with OpenCV (what detectron2 does; fastest on the CPU) or with
            separable max-pooling in torch (runs on the mask's device). None: OpenCV for CPU masks.
    """
    if mask.dim() != 2 or mask.dtype != torch.uint8:
        raise ValueError(
            f"mask_to_boundary expects an (H, W) uint8 map, got {tuple(mask.shape)} {mask.dtype}"
        )
    h, w = mask.shape
    d = _boundary_dilation(h, w, dilation_ratio)
    if use_cv2 is None:
        use_cv2 = cv2 is not None and mask.device.type == "cpu"
    if use_cv2:
        return torch.from_numpy(_boundary_cv2(mask.cpu().numpy(), dilation_ratio)).to(mask.device)
    # d iterations of a 3x3 erosion = one (2d+1)-square minimum filter; the border outside the
    # zero ring is neutral (OpenCV's default erosion border, and max-pooling's -inf padding).
    x = F.pad(mask.float()[None, None], (1, 1, 1, 1), value=0.0)
    k = 2 * d + 1
    x = -F.max_pool2d(-x, (1, k), stride=1, padding=(0, d))
    x = -F.max_pool2d(-x, (k, 1), stride=1, padding=(d, 0))
    eroded = x[0, 0, 1:-1, 1:-1].to(torch.uint8)
    return mask - eroded


def _boundary_cv2(m: np.ndarray, dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> np.ndarray:
    """:func:`mask_to_boundary` of an (H, W) uint8 numpy map, with OpenCV."""
    d = _boundary_dilation(m.shape[0], m.shape[1], dilation_ratio)
    padded = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), dtype=np.uint8), iterations=d)[1:-1, 1:-1]
    return m - eroded


def _boundary_numpy(m: np.ndarray) -> np.ndarray:
    """:func:`mask_to_boundary` of an (H, W) uint8 numpy map: OpenCV where installed."""
    if cv2 is not None:
        return _boundary_cv2(m)
    return mask_to_boundary(torch.from_numpy(m), use_cv2=False).numpy()


def sem_seg_to_coco_json(
    sem_seg: np.ndarray, file_name: str, contiguous_id_to_dataset_id: Optional[dict] = None
):
    """
    A predicted class map as COCO stuff results, one RLE per class present: the entries detectron2's
    ``SemSegEvaluator.encode_json_sem_seg`` writes to ``sem_seg_predictions.json``. That is a method
    reading a SemSegEvaluator's private state, so its few lines are owned here.

    Args:
        sem_seg (ndarray): (H, W) int class indices.
        file_name (str): the input image, written into each entry.
        contiguous_id_to_dataset_id (dict or None): class index -> ``category_id`` written; None
            writes the class index.
    """
    entries = []
    for label in np.unique(sem_seg):
        if contiguous_id_to_dataset_id is None:
            category_id = int(label)
        elif label in contiguous_id_to_dataset_id:
            category_id = contiguous_id_to_dataset_id[label]
        else:
            raise Seg2Error(
                f"{file_name}: predicted class {label} has no entry in the metadata's "
                "stuff_dataset_id_to_contiguous_id"
            )
        rle = mask_util.encode(
            np.array((sem_seg == label).astype(np.uint8)[:, :, None], order="F")
        )[0]
        rle["counts"] = rle["counts"].decode("utf-8")
        entries.append({"file_name": file_name, "category_id": category_id, "segmentation": rle})
    return entries


def sem_seg_metrics(
    conf: np.ndarray, class_names, b_conf: Optional[np.ndarray] = None
) -> Dict[str, float]:
    """
    detectron2's semantic segmentation metrics (percent) from a confusion matrix.

    Args:
        conf (ndarray): (C, C) int, ``conf[pred, gt]`` pixel counts, ignored pixels left out.
        class_names (list[str]): the C class names.
        b_conf (ndarray or None): (C+1, C+1) boundary confusion matrix as detectron2 builds it
            (row/column C: boundary values of the ignore label); None: no boundary IoU.

    Returns:
        dict: mIoU, fwIoU, IoU-<class> (and BoundaryIoU-<class>, min(IoU, B-Iou)-<class>), mACC,
        pACC, ACC-<class>, in detectron2's order. Classes absent from the ground truth are NaN.

    Note: detectron2's ``SemSegEvaluator`` builds its boundary matrix from ``(C+1) * b_pred + b_gt``
    on uint8 arrays, which wraps around modulo 256 once C >= 16 (VOC's 21 and Cityscapes' 19 classes
    included), so its boundary IoU is garbled there. seg2 counts in int32/int64: it equals
    detectron2 wherever detectron2 does not wrap around.
    """
    num_classes = len(class_names)
    # The formulas below are detectron2's SemSegEvaluator.evaluate, line for line.
    acc = np.full(num_classes, np.nan, dtype=float)
    iou = np.full(num_classes, np.nan, dtype=float)
    tp = conf.diagonal().astype(float)
    pos_gt = np.sum(conf, axis=0).astype(float)
    class_weights = pos_gt / np.sum(pos_gt)
    pos_pred = np.sum(conf, axis=1).astype(float)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = np.logical_and(acc_valid, union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    macc = np.sum(acc[acc_valid]) / np.sum(acc_valid)
    miou = np.sum(iou[iou_valid]) / np.sum(iou_valid)
    fiou = np.sum(iou[iou_valid] * class_weights[iou_valid])
    pacc = np.sum(tp) / np.sum(pos_gt)

    if b_conf is not None:
        b_iou = np.full(num_classes, np.nan, dtype=float)
        b_tp = b_conf.diagonal()[:-1].astype(float)
        b_pos_gt = np.sum(b_conf[:-1, :-1], axis=0).astype(float)
        b_pos_pred = np.sum(b_conf[:-1, :-1], axis=1).astype(float)
        b_union = b_pos_gt + b_pos_pred - b_tp
        b_iou_valid = b_union > 0
        b_iou[b_iou_valid] = b_tp[b_iou_valid] / b_union[b_iou_valid]

    res = {"mIoU": 100 * miou, "fwIoU": 100 * fiou}
    for i, name in enumerate(class_names):
        res[f"IoU-{name}"] = 100 * iou[i]
        if b_conf is not None:
            res[f"BoundaryIoU-{name}"] = 100 * b_iou[i]
            res[f"min(IoU, B-Iou)-{name}"] = 100 * min(iou[i], b_iou[i])
    res["mACC"] = 100 * macc
    res["pACC"] = 100 * pacc
    for i, name in enumerate(class_names):
        res[f"ACC-{name}"] = 100 * acc[i]
    return {k: float(v) for k, v in res.items()}


class MIoUEvaluator(DatasetEvaluator):
    """
    mIoU, fwIoU, mACC, pACC, per-class IoU/ACC and optionally boundary IoU, exactly as detectron2's
    :class:`SemSegEvaluator` computes them, from a confusion matrix accumulated with
    ``np.bincount`` (CPU predictions; ``torch.bincount`` on an accelerator's) and summed over
    processes.

    mIoU and mACC average over the classes with at least one ground-truth pixel in the evaluated
    images (detectron2's definition); the others are NaN. Such classes are named in a one-line
    warning and in the results (``classes_without_gt``, ``noGT-<class>``), with a hint when the
    ground-truth maps hold only 0 and the ignore label (0/255 binary masks read with 255 as void).

    Ground truth: the label map ``sem_seg_file_name`` of the dataset record whose ``file_name`` is
    the input's, read with :func:`seg2.data.read_sem_seg` (palette PNGs give class indices; the
    record's ``sem_seg_format`` decodes RGB masks, void values and ``value_map``).

    Bad input is an error, never a number: predictions of another size than the ground truth
    (ValueError), a label map holding ids that are neither a class nor the ignore label
    (Seg2Error), NaN logits (ValueError), a dataset without records (Seg2Error). When no image was
    processed, :meth:`evaluate` logs a warning and returns ``{}``; when every processed pixel is
    ignored, the metrics are NaN (as in detectron2).
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        boundary_iou: bool = False,
        save_predictions_json: bool = False,
        plots: bool = True,
    ):
        """
        Args:
            dataset_name (str): a registered dataset whose records carry ``file_name`` and
                ``sem_seg_file_name``, and whose metadata has ``stuff_classes`` (and
                ``ignore_label``; absent means every pixel must hold a class id).
            distributed (bool): sum the confusion matrices of all processes; the main process
                returns the results, the others ``{}``.
            output_dir (str or None): where ``sem_seg_evaluation.json`` (metrics and confusion
                matrix), ``sem_seg_confusion_matrix.png`` and ``sem_seg_iou_per_class.png`` go.
            boundary_iou (bool): also compute detectron2's boundary IoU (``BoundaryIoU-<class>``,
                ``min(IoU, B-Iou)-<class>``); needs fewer than 255 classes.
            save_predictions_json (bool): keep every prediction as RLEs and write
                ``sem_seg_predictions.json`` to ``output_dir``, as detectron2 does. Memory then
                grows with the dataset.
            plots (bool): write the two PNG plots when ``output_dir`` is set.
        """
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._boundary_iou = boundary_iou
        self._save_predictions_json = save_predictions_json
        self._plots = plots

        records = DatasetCatalog.get(dataset_name)
        if len(records) == 0:
            raise Seg2Error(f"dataset {dataset_name!r} has no records: nothing to evaluate mIoU on")
        missing = [r.get("file_name", "?") for r in records if "sem_seg_file_name" not in r]
        if missing:
            raise Seg2Error(
                f"dataset {dataset_name!r}: {len(missing)} of {len(records)} records have no "
                f"'sem_seg_file_name' (first: {missing[0]}); mIoU needs a label map per image"
            )
        # What read_sem_seg needs of each record (not the whole record: COCO's carry instances).
        self._gt_records = {
            r["file_name"]: {k: r[k] for k in ("sem_seg_file_name", "sem_seg_format") if k in r}
            for r in records
        }

        meta = MetadataCatalog.get(dataset_name)
        if not meta.get("stuff_classes"):
            raise Seg2Error(
                f"dataset {dataset_name!r}: metadata has no 'stuff_classes'; mIoU needs the class "
                "names"
            )
        self._class_names = list(meta.stuff_classes)
        self._num_classes = len(self._class_names)
        self._ignore_label = meta.get("ignore_label", None)
        c2d = meta.get("stuff_dataset_id_to_contiguous_id", None)
        self._contiguous_id_to_dataset_id = {v: k for k, v in c2d.items()} if c2d else None
        if boundary_iou and self._num_classes >= np.iinfo(np.uint8).max:
            raise ValueError(
                f"boundary_iou=True: dataset {dataset_name!r} has {self._num_classes} classes; "
                "detectron2's "
                "boundary IoU works on uint8 maps and needs fewer than 255"
            )
        if save_predictions_json and not output_dir:
            raise ValueError(
                "save_predictions_json=True needs an output_dir to write sem_seg_predictions.json "
                "to"
            )
        self.reset()

    def reset(self):
        self._conf = None  # (C, C) int64 numpy, [pred, gt], from CPU predictions
        self._conf_device = None  # the same, torch, on the device of predictions on an accelerator
        self._b_conf = None  # (C+1, C+1) as detectron2 builds it (numpy, CPU predictions)
        self._b_conf_device = None
        self._num_images = 0
        self._ignore_only_maps = 0  # GT maps whose only non-zero value is the ignore label
        self._predictions = []

    def _ground_truth(self, file_name: str) -> np.ndarray:
        try:
            record = self._gt_records[file_name]
        except KeyError:
            raise Seg2Error(
                f"image {file_name} is not a record of dataset {self._dataset_name!r}: no ground "
                "truth to "
                "evaluate it against (inputs must carry the records' 'file_name')"
            ) from None
        return read_sem_seg(record), record["sem_seg_file_name"]

    def _check_logits(self, logits, file_name):
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            shape = (
                tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            )
            raise ValueError(f"{file_name}: 'sem_seg' must be (C, H, W) logits, got {shape}")
        if logits.shape[0] != self._num_classes:
            raise ValueError(
                f"{file_name}: 'sem_seg' has {logits.shape[0]} channels but dataset "
                f"{self._dataset_name!r} has "
                f"{self._num_classes} stuff_classes"
            )

    def process(self, inputs, outputs):
        """
        Args:
            inputs (list[dict]): model inputs, each with the record's ``file_name``.
            outputs (list[dict]): model outputs, each with ``sem_seg``: (C, H, W) logits at the
                ground truth's resolution.
        """
        for inp, out in zip(inputs, outputs):
            file_name = inp["file_name"]
            if "sem_seg" not in out:
                raise ValueError(
                    f"{file_name}: the model output has no 'sem_seg' (keys: {sorted(out)})"
                )
            logits = out["sem_seg"]
            self._check_logits(logits, file_name)
            gt_np, gt_path = self._ground_truth(file_name)
            if tuple(gt_np.shape) != tuple(logits.shape[1:]):
                raise ValueError(
                    f"{file_name}: prediction is {tuple(logits.shape[1:])} (H, W) but its ground "
                    "truth "
                    f"{gt_path} is {tuple(gt_np.shape)}; resize predictions to the original image "
                    "size "
                    "(detectron2's sem_seg_postprocess does it when inputs carry 'height'/'width')"
                )
            x = _cpu_logits_numpy(logits)  # CPU: single-threaded numpy (see the module docstring)
            pred, has_nan = _argmax_numpy(x) if x is not None else argmax_channels(logits)
            if has_nan:
                raise ValueError(
                    f"{file_name}: 'sem_seg' logits contain NaN; refusing to score them"
                )
            if x is not None:
                self._accumulate_numpy(pred, gt_np, file_name, gt_path)
            else:
                if not gt_np.flags.writeable:  # PIL's buffer; torch wants writable memory
                    gt_np = gt_np.copy()
                gt = torch.from_numpy(gt_np).to(pred.device, non_blocking=True)
                self._accumulate(pred, gt, file_name, gt_path)
                pred = pred.cpu().numpy() if self._save_predictions_json else None
            if self._save_predictions_json:
                ids = self._contiguous_id_to_dataset_id
                self._predictions.extend(sem_seg_to_coco_json(pred.astype(int), file_name, ids))
            self._num_images += 1

    def _label_columns(self, gt_max: Optional[int]):
        """(k, ignore column, fold) for a ground truth whose largest value is ``gt_max`` (None:
        uint8): its values index k columns; the ignore label's column (None: no ignore label among
        them); fold: a negative ignore label moves to column ``gt_max + 1`` (else None)."""
        ignore = self._ignore_label
        if gt_max is None:
            k = 256
        elif ignore is not None and ignore < 0:  # fold a negative ignore label past the largest id
            return gt_max + 2, gt_max + 1, gt_max + 1
        else:
            k = gt_max + 1
        return k, (ignore if ignore is not None and 0 <= ignore < k else None), None

    def _check_columns(self, hist: np.ndarray, ignore_col, file_name, gt_path):
        """Raise for ground-truth values that are neither a class nor the ignore label (``hist``:
        pixels per ground-truth value, numpy); count a map whose only non-zero value is the
        ignore label (0/255 binary masks read with 255 as void)."""
        C = self._num_classes
        if len(hist) > C:
            outside = np.flatnonzero(hist[C:]) + C
            if ignore_col is not None:
                outside = outside[outside != ignore_col]
            if outside.size:
                bad = outside.tolist()
                raise Seg2Error(
                    f"{gt_path} (ground truth of {file_name}): label values {bad[:10]} are neither "
                    f"one of the {C} classes of dataset {self._dataset_name!r} nor its "
                    f"ignore_label {self._ignore_label}"
                )
        if ignore_col is not None and ignore_col > 0 and hist[ignore_col] > 0:
            if int(hist[1:].sum()) == int(hist[ignore_col]):
                self._ignore_only_maps += 1

    def _accumulate_numpy(self, pred: np.ndarray, gt: np.ndarray, file_name, gt_path):
        """Count one CPU prediction: numpy only, no torch op (no thread-pool round trip)."""
        C = self._num_classes
        if gt.dtype == np.uint8:
            k, ignore_col, fold = self._label_columns(None)
        else:
            lo = int(gt.min()) if gt.size else 0
            hi = int(gt.max()) if gt.size else 0
            k, ignore_col, fold = self._label_columns(hi)
            if fold is not None:
                gt = np.where(gt == self._ignore_label, fold, gt)
                lo = int(gt.min()) if gt.size else 0
            if lo < 0:
                raise Seg2Error(f"{gt_path} (ground truth of {file_name}): negative label {lo}")
        # One bincount over (pred, gt) pairs with every possible gt value: columns 0..C-1 are the
        # confusion matrix; the ignore column is dropped; any other column is a bad label.
        nbins = C * k
        dtype = np.int16 if nbins < 2**15 else (np.int32 if nbins < 2**31 else np.int64)
        idx = pred.astype(dtype)
        idx *= k
        idx += gt
        counts = np.bincount(idx.ravel(), minlength=nbins).reshape(C, k)
        self._check_columns(counts.sum(axis=0), ignore_col, file_name, gt_path)
        if ignore_col is not None:
            counts[:, ignore_col] = 0
        if self._conf is None:
            self._conf = np.zeros((C, C), dtype=np.int64)
        self._conf += counts[:, :C]

        if self._boundary_iou:
            # As detectron2: ignored pixels become class C, boundaries of both uint8 maps.
            gt_c = gt if ignore_col is None else np.where(gt == ignore_col, C, gt)
            b_gt = _boundary_numpy(gt_c.astype(np.uint8))
            b_pred = _boundary_numpy(pred)
            n = C + 1
            b_idx = b_pred.astype(np.int16 if n * n < 2**15 else np.int32)
            b_idx *= n
            b_idx += b_gt
            b_counts = np.bincount(b_idx.ravel(), minlength=n * n).reshape(n, n)
            if self._b_conf is None:
                self._b_conf = np.zeros((n, n), dtype=np.int64)
            self._b_conf += b_counts

    def _accumulate(self, pred, gt, file_name, gt_path):
        """Count one prediction on an accelerator, with torch on its device."""
        C = self._num_classes
        if gt.dtype == torch.uint8:
            k, ignore_col, fold = self._label_columns(None)
        else:
            hi = int(gt.max())
            k, ignore_col, fold = self._label_columns(hi)
            if fold is not None:
                gt = torch.where(gt == self._ignore_label, fold, gt)
            lo = int(gt.min())
            if lo < 0:
                raise Seg2Error(f"{gt_path} (ground truth of {file_name}): negative label {lo}")
        nbins = C * k
        dtype = torch.int16 if nbins < 2**15 else (torch.int32 if nbins < 2**31 else torch.int64)
        idx = pred.to(dtype) * k + gt.to(dtype)
        counts = torch.bincount(idx.view(-1), minlength=nbins).view(C, k)
        self._check_columns(counts.sum(dim=0).cpu().numpy(), ignore_col, file_name, gt_path)
        if ignore_col is not None:
            counts[:, ignore_col] = 0
        if self._conf_device is None:
            self._conf_device = torch.zeros((C, C), dtype=torch.int64, device=pred.device)
        self._conf_device += counts[:, :C].to(self._conf_device.device)

        if self._boundary_iou:
            gt_c = gt if ignore_col is None else torch.where(gt == ignore_col, C, gt)
            gt_c = gt_c.to(torch.uint8)
            b_gt = mask_to_boundary(gt_c)
            b_pred = mask_to_boundary(pred.to(torch.uint8))
            n = C + 1
            b_dtype = torch.int16 if n * n < 2**15 else torch.int32
            b_idx = b_pred.to(b_dtype) * n + b_gt.to(b_dtype)
            b_counts = torch.bincount(b_idx.view(-1), minlength=n * n).view(n, n)
            if self._b_conf_device is None:
                self._b_conf_device = torch.zeros((n, n), dtype=torch.int64, device=pred.device)
            self._b_conf_device += b_counts.to(self._b_conf_device.device)

    @staticmethod
    def _total(host, device, shape):
        total = np.zeros(shape, np.int64)
        if host is not None:
            total += host
        if device is not None:
            total += device.cpu().numpy()
        return total

    def _gathered(self):
        """Confusion matrices, image count, count of ignore-only ground-truth maps and predictions
        summed over processes (None on non-main ranks)."""
        C = self._num_classes
        conf = self._total(self._conf, self._conf_device, (C, C))
        b_conf = None
        if self._boundary_iou:
            b_conf = self._total(self._b_conf, self._b_conf_device, (C + 1, C + 1))
        state = (conf, b_conf, self._num_images, self._ignore_only_maps, self._predictions)
        if not self._distributed:
            return state
        comm.synchronize()
        states = comm.all_gather(state)
        if not comm.is_main_process():
            return None
        conf = sum(s[0] for s in states)
        b_conf = sum(s[1] for s in states) if self._boundary_iou else None
        num_images = sum(s[2] for s in states)
        ignore_only = sum(s[3] for s in states)
        predictions = list(itertools.chain(*[s[4] for s in states]))
        return conf, b_conf, num_images, ignore_only, predictions

    def evaluate(self):
        """
        Returns:
            dict: ``{"sem_seg": {"mIoU", "fwIoU", "IoU-<class>", "mACC", "pACC", "ACC-<class>",
            ...}}``
            in percent on the main process; ``{}`` elsewhere and when nothing was processed.
            Where classes have no ground-truth pixel in the evaluated images, also
            ``classes_without_gt`` (their number) and ``noGT-<class>`` (1.0) for each; the
            warning names them (see :meth:`_warn_classes_without_gt`).
        """
        state = self._gathered()
        if state is None:
            return {}
        conf, b_conf, num_images, ignore_only, predictions = state
        if num_images == 0:
            logger.warning(
                f"MIoUEvaluator({self._dataset_name!r}): no image was processed; no metrics"
            )
            return {}
        with np.errstate(invalid="ignore", divide="ignore"):
            res = sem_seg_metrics(conf, self._class_names, b_conf)
        if conf.sum() == 0:
            # detectron2 would report fwIoU 0 here; with no labelled pixel every metric is
            # undefined.
            logger.warning(
                f"MIoUEvaluator({self._dataset_name!r}): every processed pixel is ignored; "
                "metrics are NaN"
            )
            res = {k: float("nan") for k in res}
        absent = [name for name, n in zip(self._class_names, conf.sum(axis=0)) if n == 0]
        self.classes_without_gt = absent
        if absent:
            self._warn_classes_without_gt(absent, num_images, ignore_only)
            res["classes_without_gt"] = float(len(absent))
            res.update({f"noGT-{name}": 1.0 for name in absent})
        self.confusion_matrix = conf
        self._log(res, conf, num_images)
        if self._output_dir:
            self._write(res, conf, predictions)
        return OrderedDict({"sem_seg": res})

    def _warn_classes_without_gt(self, absent, num_images, ignore_only):
        """One line naming the classes that have no ground-truth pixel: their IoU and ACC are NaN
        and every mean leaves them out (detectron2's definition), so mIoU can reach 100 while a
        class was never seen, as with 0/255 binary masks whose foreground 255 is void."""
        C = self._num_classes
        shown = ", ".join(repr(n) for n in absent[:20])
        if len(absent) > 20:
            shown += f" ... ({len(absent)} in all)"
        means = (
            f"mIoU, fwIoU and mACC average over the other {C - len(absent)} classes only"
            if len(absent) < C
            else "so are mIoU, fwIoU and mACC"
        )
        msg = (
            f"MIoUEvaluator({self._dataset_name!r}): {len(absent)} of {C} classes have no "
            f"ground-truth pixel in the {num_images} evaluated images: {shown}; their IoU/ACC are "
            f"NaN and {means}"
        )
        if ignore_only:
            msg += (
                f". {ignore_only} of the {num_images} ground-truth maps have no non-zero value but "
                f"the ignore label {self._ignore_label}: 0/255 binary masks? 255 is void; "
                "map it to class 1 (value_map={255: 1}, see docs/datasets.md)"
            )
        logger.warning(msg)

    def _log(self, res, conf, num_images):
        rows = []
        pos_gt = conf.sum(axis=0)
        for i, name in enumerate(self._class_names):
            row = [name, res[f"IoU-{name}"], res[f"ACC-{name}"]]
            if self._boundary_iou:
                row.append(res[f"BoundaryIoU-{name}"])
            rows.append(row + [int(pos_gt[i])])
        headers = (
            ["class", "IoU", "ACC"]
            + (["BoundaryIoU"] if self._boundary_iou else [])
            + ["GT pixels"]
        )
        table = tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".3f", numalign="left")
        summary = {k: res[k] for k in ("mIoU", "fwIoU", "mACC", "pACC")}
        logger.info(
            f"Semantic segmentation on {self._dataset_name} ({num_images} images):\n"
            + create_small_table(summary)
            + "\nPer class:\n"
            + table
        )

    def _write(self, res, conf, predictions):
        PathManager.mkdirs(self._output_dir)
        payload = {
            "dataset": self._dataset_name,
            "sem_seg": {k: (None if np.isnan(v) else v) for k, v in res.items()},
            "class_names": self._class_names,
            "confusion_matrix_pred_by_gt": conf.tolist(),
        }
        with PathManager.open(os.path.join(self._output_dir, "sem_seg_evaluation.json"), "w") as f:
            json.dump(payload, f, indent=1)
        if self._save_predictions_json:
            with PathManager.open(
                os.path.join(self._output_dir, "sem_seg_predictions.json"), "w"
            ) as f:
                json.dump(predictions, f)
        if self._plots:
            iou = np.array([res[f"IoU-{n}"] for n in self._class_names])
            plot_confusion_matrix(
                conf,
                self._class_names,
                os.path.join(self._output_dir, "sem_seg_confusion_matrix.png"),
            )
            plot_per_class_iou(
                iou, self._class_names, os.path.join(self._output_dir, "sem_seg_iou_per_class.png")
            )
