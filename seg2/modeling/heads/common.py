"""What seg2's semantic heads share: the loss and the config checks."""

from typing import Callable, Dict, Optional

import torch
from torch.nn import functional as F

from ...utils import Seg2Error
from ..upsample import UPSAMPLE_MODES

__all__ = ["sem_seg_loss", "check_upsample_mode", "sorted_features", "nested_features"]


def sem_seg_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_value: int,
    loss_weight: float = 1.0,
    loss_fn: Optional[Callable] = None,
) -> Dict[str, torch.Tensor]:
    """
    ``{"loss_sem_seg": weight * cross-entropy}`` of stride-1 logits against (N, H, W) targets.

    seg2's heads return logits whose pixel (0, 0) is the input's pixel (0, 0) and that cover at
    least the input; they are cropped to the targets here. A batch whose targets are all
    ``ignore_value`` has no semantic loss (an empty dict): its mean would be 0/0.
    """
    h, w = targets.shape[-2:]
    if logits.shape[-2] < h or logits.shape[-1] < w:
        raise ValueError(f"logits {tuple(logits.shape[-2:])} are smaller than the targets {(h, w)}")
    if not bool((targets != ignore_value).any()):
        return {}
    logits = logits[..., :h, :w]
    if loss_fn is None:
        loss = F.cross_entropy(logits, targets, reduction="mean", ignore_index=ignore_value)
    else:
        loss = loss_fn(logits, targets)
    return {"loss_sem_seg": loss * loss_weight}


def check_upsample_mode(mode: str, key: str) -> str:
    """``mode`` if it is one of :data:`UPSAMPLE_MODES`, else a :class:`Seg2Error` naming ``key``."""
    if mode not in UPSAMPLE_MODES:
        raise Seg2Error(f"{key}={mode!r}: unknown up-sampling mode; choose one of {list(UPSAMPLE_MODES)}")
    return mode


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
