"""What seg2's semantic heads share: the base class, the loss call and the config checks."""

from typing import Callable, Dict, Optional

import torch
from torch import nn

from ...constants import IGNORE_LABEL
from ...utils import Seg2Error
from ..losses import SemSegLoss, build_sem_seg_loss
from ..upsample import UPSAMPLE_MODES, Upsample

__all__ = [
    "BaseSemSegHead",
    "sem_seg_loss",
    "check_upsample_mode",
    "final_upsample",
    "sorted_features",
    "nested_features",
]


class BaseSemSegHead(nn.Module):
    """
    The base of seg2's semantic heads (in the spirit of MMSegmentation's ``BaseDecodeHead``, with
    detectron2's ``@configurable``): the class count, the ignore label, the loss and its weight, and
    detectron2's head interface. A subclass builds its layers in ``__init__`` (passing the common
    arguments on), adds its keys to :meth:`from_config`, and implements :meth:`layers`.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        ignore_value: int = IGNORE_LABEL,
        loss_weight: float = 1.0,
        loss: Optional[nn.Module] = None,
    ):
        """
        Args:
            num_classes (int): number of classes.
            ignore_value (int): label excluded from the loss.
            loss_weight (float): weight of ``loss_sem_seg``.
            loss (nn.Module or None): ``(logits, targets) -> loss`` (see
                :mod:`seg2.modeling.losses`); None: cross-entropy without ``ignore_value``.
        """
        super().__init__()
        self.num_classes = num_classes
        self.ignore_value, self.loss_weight = ignore_value, loss_weight
        self.loss = (
            loss if loss is not None else SemSegLoss("cross_entropy", ignore_value=ignore_value)
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        """The keys every head reads (``MODEL.SEM_SEG_HEAD``): NUM_CLASSES, IGNORE_VALUE,
        LOSS_WEIGHT and the loss (:func:`seg2.modeling.losses.build_sem_seg_loss`)."""
        sem = cfg.MODEL.SEM_SEG_HEAD
        return {
            "num_classes": sem.NUM_CLASSES,
            "ignore_value": sem.IGNORE_VALUE,
            "loss_weight": sem.LOSS_WEIGHT,
            "loss": build_sem_seg_loss(cfg),
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, C, H, W) stride-1 logits whose pixel (0, 0) is the input's pixel (0, 0)."""
        raise NotImplementedError

    def forward(self, features, targets=None):
        """
        Returns:
            training: (None, {"loss_sem_seg"}, or {} when no pixel is labelled); inference:
            ((N, C, H', W') logits from the input's pixel (0, 0), {}).
        """
        x = self.layers(features)
        if self.training:
            return None, self.losses(x, targets)
        return x, {}

    def losses(self, logits, targets) -> Dict[str, torch.Tensor]:
        """``{"loss_sem_seg"}`` of the logits against the targets (:func:`sem_seg_loss`)."""
        return sem_seg_loss(
            logits, targets, self.loss, ignore_value=self.ignore_value, loss_weight=self.loss_weight
        )


def sem_seg_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    ignore_value: int,
    loss_weight: float = 1.0,
) -> Dict[str, torch.Tensor]:
    """
    ``{"loss_sem_seg": loss_weight * loss_fn(logits, targets)}`` of stride-1 logits against
    (N, H, W) targets.

    seg2's heads return logits whose pixel (0, 0) is the input's pixel (0, 0) and that cover at
    least the input; they are cropped to the targets here. A batch whose targets are all
    ``ignore_value`` has no semantic loss (an empty dict): its mean would be 0/0.
    """
    h, w = targets.shape[-2:]
    if logits.shape[-2] < h or logits.shape[-1] < w:
        raise ValueError(f"logits {tuple(logits.shape[-2:])} are smaller than the targets {(h, w)}")
    if not bool((targets != ignore_value).any()):
        return {}
    return {"loss_sem_seg": loss_fn(logits[..., :h, :w], targets) * loss_weight}


def check_upsample_mode(mode: str, key: str, no_unpool: Optional[str] = None) -> str:
    """
    ``mode`` if it is one of :data:`UPSAMPLE_MODES`, else a :class:`Seg2Error` naming ``key``;
    ``no_unpool``: the reason why this head cannot "unpool", which then is an error too.
    """
    if mode not in UPSAMPLE_MODES:
        raise Seg2Error(
            f"{key}={mode!r}: unknown up-sampling mode; choose one of {list(UPSAMPLE_MODES)}"
        )
    if mode == "unpool" and no_unpool:
        raise Seg2Error(f"{key}='unpool': {no_unpool}")
    return mode


def final_upsample(mode: str, factor: int, channels: int, **kwargs) -> Upsample:
    """The up-sampling of a head's output to stride 1, in ``mode``; "unpool" falls back to
    "bilinear" there (no pooling indices at the output's stride)."""
    return Upsample("bilinear" if mode == "unpool" else mode, factor, channels, **kwargs)


def sorted_features(input_shape, in_features, key: str = "MODEL.SEM_SEG_HEAD.IN_FEATURES"):
    """``in_features`` sorted by stride (shallowest first), checked against the backbone's features."""
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise Seg2Error(
            f"{key}={list(in_features)}: the backbone gives no {missing}; it gives "
            f"{ {k: v.stride for k, v in input_shape.items()} } (name: stride)"
        )
    if not in_features:
        raise Seg2Error(f"{key} is empty: the head needs at least one backbone feature")
    return sorted(in_features, key=lambda f: input_shape[f].stride)


def nested_features(input_shape, in_features, key: str = "MODEL.SEM_SEG_HEAD.IN_FEATURES"):
    """:func:`sorted_features` and their strides, each stride a multiple of the previous one (as
    heads that up-sample from the deepest feature and fuse the shallower ones need)."""
    names = sorted_features(input_shape, in_features, key)
    strides = [input_shape[f].stride for f in names]
    for a, b in zip(strides[:-1], strides[1:]):
        if b % a:
            raise Seg2Error(f"{key}={names}: strides {strides} are not multiples")
    return names, strides
