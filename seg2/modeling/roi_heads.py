"""
RoI heads whose box and mask poolers are :class:`~seg2.modeling.poolers.ExtendedROIPooler`, so
``MODEL.ROI_BOX_HEAD.POOLER_TYPE`` / ``MODEL.ROI_MASK_HEAD.POOLER_TYPE`` may also be ``ROIWarp``
and ``MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION`` / ``MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION`` (seg2's
keys) may be ``max`` (Mask R-CNN, Table 2c).

Select them with ``MODEL.ROI_HEADS.NAME``: ``ExtendedPoolerStandardROIHeads`` (FPN, C5) or
``ExtendedPoolerRes5ROIHeads`` (C4). Everything else is detectron2's StandardROIHeads /
Res5ROIHeads.
"""

from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads, StandardROIHeads

from ..utils import Seg2Error
from .poolers import POOLER_AGGREGATIONS, ExtendedROIPooler

__all__ = ["ExtendedPoolerStandardROIHeads", "ExtendedPoolerRes5ROIHeads", "build_extended_pooler"]

# The RoI-head config nodes whose poolers seg2 builds.
_POOLER_HEADS = ("ROI_BOX_HEAD", "ROI_MASK_HEAD")


def build_extended_pooler(cfg, head: str, input_shape) -> ExtendedROIPooler:
    """
    The pooler of RoI head ``head`` ("ROI_BOX_HEAD" or "ROI_MASK_HEAD") from ``cfg``, on the
    features ``MODEL.ROI_HEADS.IN_FEATURES`` of ``input_shape``. Bad settings raise Seg2Error
    naming the config key.
    """
    node = cfg.MODEL[head]
    pooler_type = node.POOLER_TYPE
    aggregation = node.POOLER_AGGREGATION
    if pooler_type not in POOLER_AGGREGATIONS:
        raise Seg2Error(
            f"MODEL.{head}.POOLER_TYPE={pooler_type!r} is not a pooler seg2 knows; choose one of "
            f"{sorted(POOLER_AGGREGATIONS)}"
        )
    choices = POOLER_AGGREGATIONS[pooler_type]
    if aggregation and aggregation not in choices:
        raise Seg2Error(
            f"MODEL.{head}.POOLER_AGGREGATION={aggregation!r} is not available for "
            f"MODEL.{head}.POOLER_TYPE={pooler_type!r}; it supports {list(choices)} ('' = "
            f"{choices[0]})"
        )
    if (
        (aggregation or choices[0]) == "max"
        and pooler_type != "ROIPool"
        and node.POOLER_SAMPLING_RATIO <= 0
    ):
        raise Seg2Error(
            f"MODEL.{head}.POOLER_AGGREGATION='max' needs MODEL.{head}.POOLER_SAMPLING_RATIO > 0 "
            f"(got {node.POOLER_SAMPLING_RATIO}, adaptive); the paper uses 2 (4 samples per bin)"
        )
    in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
    return ExtendedROIPooler(
        output_size=node.POOLER_RESOLUTION,
        scales=tuple(1.0 / input_shape[k].stride for k in in_features),
        sampling_ratio=node.POOLER_SAMPLING_RATIO,
        pooler_type=pooler_type,
        aggregation=aggregation,
    )


def _with_detectron2_pooler_types(cfg):
    """A copy of ``cfg`` whose pooler types detectron2's ROIPooler can build, for the parent's
    from_config; the pooler it builds is then replaced by an ExtendedROIPooler."""
    cfg = cfg.clone()
    cfg.defrost()
    for head in _POOLER_HEADS:
        if cfg.MODEL[head].POOLER_TYPE:
            cfg.MODEL[head].POOLER_TYPE = "ROIAlignV2"
    return cfg


@ROI_HEADS_REGISTRY.register()
class ExtendedPoolerStandardROIHeads(StandardROIHeads):
    """StandardROIHeads (FPN / C5) with the RoIPool / RoIWarp / RoIAlign poolers of Mask R-CNN
    (He et al., ICCV 2017, Table 2c), average or max, chosen by config."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(_with_detectron2_pooler_types(cfg), input_shape)
        ret["box_pooler"] = build_extended_pooler(cfg, "ROI_BOX_HEAD", input_shape)
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(_with_detectron2_pooler_types(cfg), input_shape)
        if ret.get("mask_pooler") is not None:
            ret["mask_pooler"] = build_extended_pooler(cfg, "ROI_MASK_HEAD", input_shape)
        return ret


@ROI_HEADS_REGISTRY.register()
class ExtendedPoolerRes5ROIHeads(Res5ROIHeads):
    """Res5ROIHeads (C4, box and mask share one pooler) with the RoIPool / RoIWarp / RoIAlign
    poolers of Mask R-CNN (He et al., ICCV 2017, Table 2c), chosen by MODEL.ROI_BOX_HEAD.POOLER_TYPE."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        if cfg.MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION:
            raise Seg2Error(
                f"MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION={cfg.MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION!r} has no "
                f"effect with MODEL.ROI_HEADS.NAME={cfg.MODEL.ROI_HEADS.NAME!r}: C4 box and mask "
                "heads share one "
                "pooler; set MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION instead"
            )
        ret = super().from_config(_with_detectron2_pooler_types(cfg), input_shape)
        ret["pooler"] = build_extended_pooler(cfg, "ROI_BOX_HEAD", input_shape)
        return ret
