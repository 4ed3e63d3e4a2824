"""The classic U-Net contracting path, registered in detectron2's ``BACKBONE_REGISTRY``."""

from typing import List, Optional, Sequence

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torch.nn import functional as F

from ...utils import Seg2Error
from ..norm import check_norm

__all__ = ["UNetEncoder", "conv3x3_block", "build_unet_encoder_backbone"]

PADDING_MODES = ("valid", "same")


def conv3x3_block(
    in_channels: int, out_channels: int, padding_mode: str, norm: str = "", num_convs: int = 2
):
    """U-Net's step: ``num_convs`` 3x3 convs + ReLU, unpadded ("valid") or padded by 1 ("same")."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding_mode!r}")
    layers = []
    for i in range(num_convs):
        conv = Conv2d(
            in_channels if i == 0 else out_channels,
            out_channels,
            kernel_size=3,
            padding=1 if padding_mode == "same" else 0,
            bias=not norm,
            norm=get_norm(norm, out_channels),
            activation=F.relu,
        )
        weight_init.c2_msra_fill(conv)
        layers.append(conv)
    return nn.Sequential(*layers)


class UNetEncoder(Backbone):
    """
    The contracting path of U-Net (Ronneberger et al., MICCAI 2015): per level two 3x3 convs +
    ReLU, then a 2x2 max-pool; features ``enc1`` (stride 1) ... ``enc{n}`` (stride 2**(n-1)).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 512, 1024),
        padding: str = "valid",
        norm: str = "",
        out_features: Optional[List[str]] = None,
    ):
        """
        Args:
            in_channels (int): channels of the input image (1 in the paper).
            channels (list[int]): channels per level, shallowest first (the paper: 64 ... 1024).
            padding (str): "valid" (unpadded convs, as the paper) or "same".
            norm (str): normalization after each conv ("" as the paper).
            out_features (list[str] or None): features to return; None: all levels.
        """
        super().__init__()
        self.padding = padding
        self.valid_padding = padding == "valid"
        names = [f"enc{i + 1}" for i in range(len(channels))]
        prev = in_channels
        for name, c in zip(names, channels):
            self.add_module(name, conv3x3_block(prev, c, padding, norm))
            prev = c
        self._names = names
        self._out_feature_strides = {n: 2**i for i, n in enumerate(names)}
        self._out_feature_channels = dict(zip(names, channels))
        self._out_features = list(out_features) if out_features else names
        unknown = [f for f in self._out_features if f not in names]
        if unknown:
            raise ValueError(f"the U-Net encoder has no features {unknown}; it gives {names}")

    @property
    def size_divisibility(self) -> int:
        # "same": exact 2x poolings. "valid": the segmentor picks the input size (overlap-tile).
        return 0 if self.valid_padding else 2 ** (len(self._names) - 1)

    def forward(self, x):
        outputs = {}
        for i, name in enumerate(self._names):
            if i > 0:
                if self.valid_padding and (x.shape[-2] % 2 or x.shape[-1] % 2):
                    # An odd map would make the up-path's centre crops off by half a pixel.
                    raise ValueError(
                        f"U-Net 'valid' padding: the map before pool{i} is {tuple(x.shape[-2:])}, "
                        "not even; pick an input size the network tiles exactly (572 in the paper)"
                    )
                x = F.max_pool2d(x, 2, 2)
            x = getattr(self, name)(x)
            outputs[name] = x
        return {k: outputs[k] for k in self._out_features}


@BACKBONE_REGISTRY.register()
def build_unet_encoder_backbone(cfg, input_shape: ShapeSpec):
    """A :class:`UNetEncoder` from ``cfg.MODEL.UNET_ENCODER``."""
    enc = cfg.MODEL.UNET_ENCODER
    check_norm(enc.NORM, enc.CHANNELS, "MODEL.UNET_ENCODER.NORM", "MODEL.UNET_ENCODER.CHANNELS")
    if enc.PADDING not in PADDING_MODES:
        raise Seg2Error(
            f"MODEL.UNET_ENCODER.PADDING={enc.PADDING!r}: must be one of {PADDING_MODES}"
        )
    try:
        return UNetEncoder(
            in_channels=input_shape.channels,
            channels=enc.CHANNELS,
            padding=enc.PADDING,
            norm=enc.NORM,
            out_features=enc.OUT_FEATURES,
        )
    except ValueError as e:
        raise Seg2Error(f"MODEL.UNET_ENCODER: {e}") from e
