"""Build-time checks of the config and target assembly shared by seg2's meta-architectures
(config against data is the resolve step's, :mod:`seg2.resolve`)."""

from typing import List, Optional, Sequence

import torch
from detectron2.modeling import BACKBONE_REGISTRY, SEM_SEG_HEADS_REGISTRY

from ...utils import Seg2Error

__all__ = ["check_registered", "check_head_loss", "check_head_features", "sem_seg_targets"]


def check_registered(cfg):
    """A :class:`Seg2Error` naming the config key when the backbone or head name is unknown."""
    for key, name, registry, registry_name in (
        ("MODEL.BACKBONE.NAME", cfg.MODEL.BACKBONE.NAME, BACKBONE_REGISTRY, "BACKBONE_REGISTRY"),
        (
            "MODEL.SEM_SEG_HEAD.NAME",
            cfg.MODEL.SEM_SEG_HEAD.NAME,
            SEM_SEG_HEADS_REGISTRY,
            "SEM_SEG_HEADS_REGISTRY",
        ),
    ):
        if name not in registry:
            known = sorted(k for k, _ in registry)
            raise Seg2Error(
                f"{key}={name!r} is not registered in detectron2's {registry_name}; known: {known}"
            )
    check_head_loss(cfg)


# seg2's loss settings that heads outside seg2 (detectron2's SemSegFPNHead, say) would ignore.
_SEG2_LOSS_TYPES = ("focal", "dice", "lovasz")


def check_head_loss(cfg):
    """A :class:`Seg2Error` when the config asks for seg2's class weights or losses but
    ``MODEL.SEM_SEG_HEAD.NAME`` is a head that does not use them (it would train with its own
    cross-entropy, silently)."""
    from ..heads import BaseSemSegHead, Seg2DeepLabV3PlusHead

    head = cfg.MODEL.SEM_SEG_HEAD
    if issubclass(SEM_SEG_HEADS_REGISTRY.get(head.NAME), (BaseSemSegHead, Seg2DeepLabV3PlusHead)):
        return
    asked = (
        [f"LOSS_TYPE={head.LOSS_TYPE!r}"]
        if any(t in head.LOSS_TYPE for t in _SEG2_LOSS_TYPES)
        else []
    )
    asked += [f"{k}={head.get(k)!r}" for k in ("CLASS_WEIGHT", "CLASS_WEIGHTING") if head.get(k)]
    if asked:
        raise Seg2Error(
            f"MODEL.SEM_SEG_HEAD.NAME={head.NAME!r} is not a seg2 head and ignores "
            "MODEL.SEM_SEG_HEAD."
            f"{', '.join(asked)}: use one of seg2's heads (FCNHead, UNetHead, SegNetHead, "
            "Seg2DeepLabV3PlusHead) or leave these keys at their defaults"
        )


def check_head_features(cfg, backbone_shape):
    """A :class:`Seg2Error` when ``MODEL.SEM_SEG_HEAD.IN_FEATURES`` asks for what the backbone lacks."""
    wanted = list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
    missing = [f for f in wanted if f not in backbone_shape]
    if missing:
        raise Seg2Error(
            f"MODEL.SEM_SEG_HEAD.IN_FEATURES={wanted}: backbone {cfg.MODEL.BACKBONE.NAME!r} gives "
            f"no {missing}; "
            f"it gives {sorted(backbone_shape)} (set them in its OUT_FEATURES, e.g. "
            "MODEL.RESNETS.OUT_FEATURES)"
        )


def sem_seg_targets(
    batched_inputs: List[dict], size: Sequence[int], ignore_value: int, device
) -> Optional[torch.Tensor]:
    """
    (N, H, W) targets of ``size``, padded with ``ignore_value``; an image without "sem_seg" is all
    ``ignore_value`` (no loss, nothing made up). None when no image of the batch has one.
    """
    if not any("sem_seg" in x for x in batched_inputs):
        return None
    h, w = int(size[0]), int(size[1])
    targets = torch.full((len(batched_inputs), h, w), ignore_value, dtype=torch.long, device=device)
    for i, x in enumerate(batched_inputs):
        if "sem_seg" in x:
            t = x["sem_seg"].to(device)
            targets[i, : t.shape[0], : t.shape[1]] = t[:h, :w]
    return targets
