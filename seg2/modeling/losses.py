"""
The semantic-segmentation losses of every seg2 head, chosen by ``MODEL.SEM_SEG_HEAD.LOSS_TYPE``.

Terms (``LOSS_TYPE`` is one of them or a sum such as ``"cross_entropy+dice"``):

* ``"cross_entropy"``: PyTorch's cross-entropy; with class weights the weighted mean
  ``sum_i w[y_i] * nll_i / sum_i w[y_i]`` over labelled pixels (PyTorch's definition), or, with
  ``CLASS_WEIGHT_NORMALIZATION: "pixels"``, ``sum_i w[y_i] * nll_i / (labelled pixels)``: the
  ``SoftmaxWithLoss`` of SegNet's Caffe, whose learning rates assume that scale (on CamVid's
  training labels with SegNet's weights it is about half of PyTorch's).
* ``"hard_pixel_mining"``: detectron2's :class:`~detectron2.projects.deeplab.loss.DeepLabCE`
  (TF DeepLab's online hard example mining): the mean of the ``LOSS_TOP_K`` fraction of labelled
  pixels with the largest (class-weighted) cross-entropy.
* ``"focal"``: softmax focal loss (Lin et al., ICCV 2017), ``-(1 - p_t)^gamma * log(p_t)``,
  averaged over labelled pixels like ``"cross_entropy"`` (class weights as the paper's alpha);
  gamma 0 is exactly ``"cross_entropy"``.
* ``"dice"``: soft Dice on softmax probabilities, ``1 - mean_c 2 * sum(p_c * g_c) /
  (sum(p_c) + sum(g_c))`` over the classes present in the batch's labels, all labelled pixels of
  the batch pooled (no smoothing term: a present class has a non-zero denominator).
* ``"lovasz"``: Lovász-softmax (Berman et al., CVPR 2018), the authors' default variant: classes
  present in the batch's labels, all labelled pixels of the batch pooled (``per_image=False``).

Every term leaves out the pixels labelled ``ignore_value`` (their logits do not change the loss,
and they do not count in any mean); with no labelled pixel a term is 0 (with a gradient of 0).
Class weights weight the per-pixel terms (cross-entropy, hard pixel mining, focal); Dice and
Lovász already weigh every present class equally.

Why our own code: torch and torchvision have cross-entropy but no softmax focal loss
(``torchvision.ops.sigmoid_focal_loss`` and fvcore's are the binary, sigmoid form), no Dice and no
Lovász. On PyPI, kornia's Lovász-softmax has no ignore label and averages over all classes per
image (absent ones too); pytorch-toolbelt's pulls opencv-python, which clashes with the
opencv-python-headless seg2 installs; segmentation-models-pytorch pulls timm and huggingface_hub.
So Lovász-softmax is a port of the authors' reference (MIT licence), vectorised over classes.
"""

import functools
from typing import Callable, Optional, Sequence, Tuple

import torch
from detectron2.projects.deeplab.loss import DeepLabCE
from torch import nn
from torch.nn import functional as F

from ..constants import IGNORE_LABEL
from ..utils import InvalidArgument, Seg2Error, config_keys

__all__ = [
    "LOSS_TERMS",
    "PIXEL_LOSS_TERMS",
    "CLASS_WEIGHT_NORMALIZATIONS",
    "SemSegLoss",
    "build_sem_seg_loss",
    "parse_loss_type",
    "cross_entropy_loss",
    "hard_pixel_mining_loss",
    "focal_loss",
    "dice_loss",
    "lovasz_softmax_loss",
]

LOSS_TERMS = ("cross_entropy", "hard_pixel_mining", "focal", "dice", "lovasz")
# How class-weighted pixel terms are averaged: by the sum of the weights (PyTorch) or by the count
# of labelled pixels (Caffe, SegNet's recipe).
CLASS_WEIGHT_NORMALIZATIONS = ("weights", "pixels")
# The terms that class weights weight (the others average over classes).
PIXEL_LOSS_TERMS = ("cross_entropy", "hard_pixel_mining", "focal")


# ---- the terms (logits (N, C, H, W), targets (N, H, W) long) ----------------------------------
def _labelled(
    logits: torch.Tensor, targets: torch.Tensor, ignore_value: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P, C) logits and (P,) labels of the pixels not labelled ``ignore_value``."""
    valid = targets != ignore_value
    return logits.movedim(1, -1)[valid], targets[valid]


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """0 with a (zero) gradient: the loss of a batch without labelled pixels."""
    return logits.sum() * 0.0


def _weighted_mean(
    values: torch.Tensor, weights: torch.Tensor, normalization: str = "weights"
) -> torch.Tensor:
    """``sum(w * v) / sum(w)`` ("weights"; 0 when every weight is 0, never NaN), or
    ``sum(w * v) / len(v)`` ("pixels")."""
    if normalization == "pixels":
        return (values * weights).sum() / max(values.numel(), 1)
    return (values * weights).sum() / weights.sum().clamp(min=torch.finfo(values.dtype).tiny)


def cross_entropy_loss(
    logits,
    targets,
    *,
    ignore_value: int = IGNORE_LABEL,
    class_weight: Optional[torch.Tensor] = None,
    normalization: str = "weights",
):
    """Cross-entropy over labelled pixels, optionally class-weighted and averaged by the weights
    or by the pixels (``normalization``, see the module docstring)."""
    if class_weight is None:
        if not bool((targets != ignore_value).any()):
            return _zero(logits)
        return F.cross_entropy(logits, targets, ignore_index=ignore_value)
    nll = F.cross_entropy(
        logits, targets, weight=class_weight, ignore_index=ignore_value, reduction="none"
    )
    valid = targets != ignore_value
    if normalization == "pixels":
        return nll.sum() / valid.sum().clamp(min=1)
    return nll.sum() / class_weight[targets[valid]].sum().clamp(min=torch.finfo(nll.dtype).tiny)


def hard_pixel_mining_loss(
    logits,
    targets,
    *,
    ignore_value: int = IGNORE_LABEL,
    top_k: float = 0.2,
    class_weight: Optional[torch.Tensor] = None,
):
    """
    detectron2's ``DeepLabCE`` on the labelled pixels: the mean of the ``top_k`` fraction (at least
    one pixel) of them with the largest cross-entropy. Unlike TF DeepLab, which detectron2 follows,
    ignored pixels count neither in the fraction nor in the mean (they are not passed to it).
    """
    x, t = _labelled(logits, targets, ignore_value)
    n = t.numel()
    if n == 0:
        return _zero(logits)
    if top_k < 1.0:
        k = max(1, int(top_k * n))
        top_k = (k + 0.5) / n  # DeepLabCE keeps int(top_k * n) pixels: exactly k
    return DeepLabCE(ignore_label=ignore_value, top_k_percent_pixels=top_k, weight=class_weight)(
        x, t
    )


def focal_loss(
    logits,
    targets,
    *,
    ignore_value: int = IGNORE_LABEL,
    gamma: float = 2.0,
    class_weight: Optional[torch.Tensor] = None,
    normalization: str = "weights",
):
    """Softmax focal loss (Lin et al., ICCV 2017) averaged over labelled pixels, optionally
    class-weighted (the paper's alpha) and normalised like :func:`cross_entropy_loss`."""
    x, t = _labelled(logits, targets, ignore_value)
    if t.numel() == 0:
        return _zero(logits)
    log_p = F.log_softmax(x.float(), dim=1).gather(1, t[:, None])[:, 0]
    loss = -((1.0 - log_p.exp()) ** gamma) * log_p
    if class_weight is None:
        return loss.mean()
    return _weighted_mean(loss, class_weight[t].to(loss.dtype), normalization)


def _present_probabilities(logits, targets, ignore_value):
    """Softmax probabilities (P, K) and one-hot labels (P, K) of the labelled pixels, for the K
    classes present among them; None if there is no labelled pixel."""
    x, t = _labelled(logits, targets, ignore_value)
    if t.numel() == 0:
        return None
    prob = F.softmax(x.float(), dim=1)
    onehot = F.one_hot(t, prob.shape[1]).to(prob.dtype)
    present = onehot.sum(0) > 0
    return prob[:, present], onehot[:, present]


def dice_loss(logits, targets, *, ignore_value: int = IGNORE_LABEL):
    """Soft Dice loss over the classes present in the labels (see the module docstring)."""
    probs = _present_probabilities(logits, targets, ignore_value)
    if probs is None:
        return _zero(logits)
    prob, onehot = probs
    dice = 2.0 * (prob * onehot).sum(0) / (prob.sum(0) + onehot.sum(0))
    return 1.0 - dice.mean()


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted in decreasing
    order (Berman et al., Algorithm 1), per column of ``gt_sorted`` (P, K)."""
    gts = gt_sorted.sum(0)
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax_loss(logits, targets, *, ignore_value: int = IGNORE_LABEL):
    """
    Lovász-softmax loss (Berman, Rannen Triki and Blaschko, CVPR 2018), classes present in the
    labels, the batch's labelled pixels pooled.

    Port of ``lovasz_softmax_flat`` from the authors' reference implementation,
    https://github.com/bermanmaxim/LovaszSoftmax (pytorch/lovasz_losses.py, MIT licence,
    Copyright (c) 2018 Maxim Berman), computed for all present classes at once.
    """
    probs = _present_probabilities(logits, targets, ignore_value)
    if probs is None:
        return _zero(logits)
    prob, fg = probs
    errors = (fg - prob).abs()
    errors_sorted, perm = torch.sort(errors, dim=0, descending=True)
    grad = _lovasz_grad(fg.gather(0, perm))
    return (errors_sorted * grad).sum(0).mean()


# ---- the loss module the heads hold -------------------------------------------------------------
def parse_loss_type(loss_type: str) -> Tuple[str, ...]:
    """The terms of ``loss_type`` (``"a"`` or ``"a+b"``); an :class:`InvalidArgument` for an
    unknown or repeated term."""
    terms = tuple(t.strip() for t in str(loss_type).split("+"))
    unknown = [t for t in terms if t not in LOSS_TERMS]
    if unknown or len(set(terms)) != len(terms):
        raise InvalidArgument(
            "loss_type",
            loss_type,
            f"{'no unknown term ' + str(unknown) if unknown else 'no repeated term'}: one of "
            f"{list(LOSS_TERMS)} "
            "or a sum of distinct ones such as 'cross_entropy+dice'",
        )
    return terms


class SemSegLoss(nn.Module):
    """
    The semantic loss of a seg2 head: the sum of the terms of ``loss_type`` (see this module's
    docstring), computed on the logits of the labelled pixels.

    Class weights are a buffer that is not saved in checkpoints (so they load into models with
    other weights, or none).
    """

    def __init__(
        self,
        loss_type: str = "cross_entropy",
        *,
        ignore_value: int = IGNORE_LABEL,
        class_weight: Optional[Sequence[float]] = None,
        unresolved_class_weighting: str = "",
        top_k: float = 0.2,
        focal_gamma: float = 2.0,
        class_weight_normalization: str = "weights",
    ):
        """
        Args:
            loss_type (str): a term of :data:`LOSS_TERMS` or a sum of them ("cross_entropy+dice").
            ignore_value (int): label excluded from every term.
            class_weight (list[float] or None): per-class weights of the per-pixel terms,
                finite, >= 0, not all 0 (weights computed from the data come from the resolve
                step, :func:`seg2.resolve_config`, as plain numbers).
            unresolved_class_weighting (str): a ``CLASS_WEIGHTING`` method whose weights were
                not resolved into numbers: the loss refuses to train (a model built for
                inference only needs no training labels).
            top_k (float): fraction of labelled pixels "hard_pixel_mining" keeps, in (0, 1].
            focal_gamma (float): the focusing parameter of "focal", >= 0.
            class_weight_normalization (str): "weights" or "pixels": what the class-weighted
                "cross_entropy" and "focal" divide by ("hard_pixel_mining" always averages over
                the pixels it keeps, as detectron2's DeepLabCE does).
        """
        super().__init__()
        self.terms = parse_loss_type(loss_type)
        self.loss_type = "+".join(self.terms)
        if not 0.0 < top_k <= 1.0:
            raise InvalidArgument("top_k", top_k, "the fraction of hard pixels, in (0, 1]")
        if not focal_gamma >= 0:
            raise InvalidArgument("focal_gamma", focal_gamma, ">= 0")
        if class_weight_normalization not in CLASS_WEIGHT_NORMALIZATIONS:
            raise InvalidArgument(
                "class_weight_normalization",
                class_weight_normalization,
                f"one of {list(CLASS_WEIGHT_NORMALIZATIONS)}",
            )
        if class_weight is not None:
            w = [float(v) for v in class_weight]
            if not w or any(not (0 <= v < float("inf")) for v in w) or not any(v > 0 for v in w):
                raise InvalidArgument(
                    "class_weight", list(class_weight), "one finite value >= 0 per class, not all 0"
                )
        self.class_weight_normalization = class_weight_normalization
        self.ignore_value, self.top_k, self.focal_gamma = ignore_value, top_k, focal_gamma
        weight = (
            None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32)
        )
        self.register_buffer("class_weight", weight, persistent=False)
        self.unresolved_class_weighting = unresolved_class_weighting

    def extra_repr(self) -> str:
        weighted = self.class_weight is not None
        return (
            f"loss_type={self.loss_type!r}, ignore_value={self.ignore_value}, weighted={weighted}"
        )

    def _term(self, name: str) -> Callable:
        w = self.class_weight
        return {
            "cross_entropy": functools.partial(
                cross_entropy_loss, class_weight=w, normalization=self.class_weight_normalization
            ),
            "hard_pixel_mining": functools.partial(
                hard_pixel_mining_loss, top_k=self.top_k, class_weight=w
            ),
            "focal": functools.partial(
                focal_loss,
                gamma=self.focal_gamma,
                class_weight=w,
                normalization=self.class_weight_normalization,
            ),
            "dice": dice_loss,
            "lovasz": lovasz_softmax_loss,
        }[name]

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of (N, C, H, W) logits against (N, H, W) targets of the same size."""
        if self.unresolved_class_weighting:
            raise Seg2Error(
                f"MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING={self.unresolved_class_weighting!r} is "
                "counted from the training "
                "labels by the resolve step before the model is built: train a model built from "
                "cfg = "
                "seg2.resolve_config(cfg) (seg2's Trainer and tools do), or give "
                "MODEL.SEM_SEG_HEAD.CLASS_WEIGHT"
            )
        if self.class_weight is not None and self.class_weight.numel() != logits.shape[1]:
            raise ValueError(
                f"{self.class_weight.numel()} class weights for {logits.shape[1]} classes"
            )
        # In float32 under mixed precision (SOLVER.AMP): softmax, sums over many pixels and
        # Lovász's sort lose too much in float16/bfloat16 (CPU autocast keeps softmax in bf16).
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            return sum(
                self._term(t)(logits, targets, ignore_value=self.ignore_value) for t in self.terms
            )


# SemSegLoss's arguments -> their config keys.
LOSS_KEYS = {
    "loss_type": "MODEL.SEM_SEG_HEAD.LOSS_TYPE",
    "class_weight": "MODEL.SEM_SEG_HEAD.CLASS_WEIGHT",
    "top_k": "MODEL.SEM_SEG_HEAD.LOSS_TOP_K",
    "focal_gamma": "MODEL.SEM_SEG_HEAD.FOCAL_GAMMA",
    "class_weight_normalization": "MODEL.SEM_SEG_HEAD.CLASS_WEIGHT_NORMALIZATION",
}


def build_sem_seg_loss(cfg) -> SemSegLoss:
    """
    The :class:`SemSegLoss` of ``cfg.MODEL.SEM_SEG_HEAD``: ``LOSS_TYPE``, ``IGNORE_VALUE``,
    ``LOSS_TOP_K``, ``FOCAL_GAMMA``, ``CLASS_WEIGHT_NORMALIZATION`` and ``CLASS_WEIGHT`` (the
    numbers; ``CLASS_WEIGHTING`` is turned into them by the resolve step,
    :func:`seg2.resolve_config`, before the model is built). A bad value is a :class:`Seg2Error`
    naming its key.
    """
    sem = cfg.MODEL.SEM_SEG_HEAD
    weights = list(sem.CLASS_WEIGHT) or None
    if (weights is not None or sem.CLASS_WEIGHTING) and not set(
        parse_loss_type(sem.LOSS_TYPE)
    ) & set(PIXEL_LOSS_TERMS):
        key = "CLASS_WEIGHT" if weights is not None else "CLASS_WEIGHTING"
        raise Seg2Error(
            f"MODEL.SEM_SEG_HEAD.{key} is set but MODEL.SEM_SEG_HEAD.LOSS_TYPE={sem.LOSS_TYPE!r} "
            "has no term it "
            f"weights ({list(PIXEL_LOSS_TERMS)}); Dice and Lovász weigh every present class equally"
        )
    with config_keys(LOSS_KEYS):
        if weights is not None and len(weights) != sem.NUM_CLASSES:
            raise InvalidArgument(
                "class_weight", weights, f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={sem.NUM_CLASSES} values"
            )
        return SemSegLoss(
            sem.LOSS_TYPE,
            ignore_value=sem.IGNORE_VALUE,
            class_weight=weights,
            unresolved_class_weighting=sem.CLASS_WEIGHTING if weights is None else "",
            top_k=sem.LOSS_TOP_K,
            focal_gamma=sem.FOCAL_GAMMA,
            class_weight_normalization=sem.CLASS_WEIGHT_NORMALIZATION,
        )
