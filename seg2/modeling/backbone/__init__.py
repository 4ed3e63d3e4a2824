"""seg2's backbones (registered in detectron2's ``BACKBONE_REGISTRY`` on import)."""

from typing import Dict

from .segnet_basic import SegNetBasicEncoder, build_segnet_basic_backbone
from .unet_encoder import UNetEncoder, build_unet_encoder_backbone
from .vgg import VGG, build_vgg_backbone, vgg_feature_offsets

__all__ = [
    "VGG",
    "UNetEncoder",
    "SegNetBasicEncoder",
    "build_vgg_backbone",
    "build_unet_encoder_backbone",
    "build_segnet_basic_backbone",
    "feature_offsets",
]


def feature_offsets(cfg, input_shape) -> Dict[str, float]:
    """
    Input-pixel coordinate of the centre of pixel (0, 0) of each feature of ``cfg``'s backbone.

    "Same"-padded backbones (detectron2's ResNets, FPN, VGG without pad-100) are taken to sit at
    ``(stride - 1) / 2``; only VGG's pad-100 mode differs, and heads that fuse features of
    different strides (FCN) crop by these offsets.
    """
    offsets = {k: (v.stride - 1) / 2 for k, v in input_shape.items()}
    if cfg.MODEL.BACKBONE.NAME == "build_vgg_backbone" and cfg.MODEL.VGG.FCN_PAD100:
        vgg = vgg_feature_offsets(5, True)
        offsets.update({k: vgg[k] for k in offsets if k in vgg})
    return offsets
