"""The U-Net head: U-Net's expansive path over any backbone's multi-scale features."""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ...utils import Seg2Error
from ..backbone.unet_encoder import PADDING_MODES, conv3x3_block
from ..norm import check_norm
from ..upsample import Upsample, center_crop, match_size
from .common import BaseSemSegHead, check_upsample_mode, final_upsample, nested_features

__all__ = ["UNetHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class UNetHead(BaseSemSegHead):
    """
    The expansive path of U-Net (Ronneberger et al., MICCAI 2015): per step a 2x up-sampling
    ("up-conv") halving the channels, concatenation with the (centre-cropped) skip feature and
    two 3x3 convs; a final 1x1 conv gives the class scores.

    Works on features at strides 1..16 (the U-Net encoder), 2..32 or 4..32 (ResNet); when the
    shallowest feature is coarser than the input, the logits are up-sampled to stride 1.
    With "valid" padding the output is smaller than the input; ``Seg2SemanticSegmentor``
    mirror-pads the input (overlap-tile) so it still covers the whole image.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        padding: str = "same",
        decoder_channels: Optional[List[int]] = None,
        upsample: str = "deconv",
        norm: str = "",
        **kwargs,
    ):
        """
        Args:
            input_shape (dict[str, ShapeSpec]): the features; the deepest one is the bottom of
                the "U", the others are skips.
            num_classes (int): number of classes.
            padding (str): "valid" (unpadded convs, skips centre-cropped) or "same".
            decoder_channels (list[int] or None): channels of each up step, deepest first;
                None: the channels of that step's skip feature (on U-Net's encoder, halving
                the channels at each step, as the paper).
            upsample (str): up-sampling mode; "deconv" is the paper's 2x2 up-conv.
            norm (str): normalization after each 3x3 conv ("" as the paper).
            kwargs: ``ignore_value``, ``loss_weight``, ``loss``: see :class:`BaseSemSegHead`.
        """
        super().__init__(num_classes=num_classes, **kwargs)
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
        self.in_features = sorted(input_shape, key=lambda f: input_shape[f].stride)
        self.padding = padding
        self.valid_padding = padding == "valid"
        skips = self.in_features[:-1][::-1]  # deepest skip first
        if decoder_channels is None or len(decoder_channels) == 0:
            # The skip's channels: the paper's halving (1024 -> 512 -> ... -> 64) on its encoder.
            decoder_channels = [input_shape[f].channels for f in skips]
        if len(decoder_channels) != len(skips):
            raise ValueError(
                f"{len(skips)} up steps need {len(skips)} decoder channels, got "
                f"{list(decoder_channels)}"
            )
        self.up, self.convs = nn.ModuleDict(), nn.ModuleDict()
        cur, stride = (
            input_shape[self.in_features[-1]].channels,
            input_shape[self.in_features[-1]].stride,
        )
        for f, c in zip(skips, decoder_channels):
            factor = stride // input_shape[f].stride
            # The paper's up-conv is a 2x2 transposed conv (kernel = factor), with a bias.
            self.up[f] = Upsample(upsample, factor, cur, c, kernel_size=factor, bias=True)
            self.convs[f] = conv3x3_block(c + input_shape[f].channels, c, padding, norm)
            cur, stride = c, input_shape[f].stride
        self.predictor = Conv2d(cur, num_classes, kernel_size=1)
        self.final_up = final_upsample(upsample, stride, num_classes)

    @classmethod
    def from_config(cls, cfg, input_shape):
        names, _ = nested_features(input_shape, cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
        head = cfg.MODEL.UNET_HEAD
        no_unpool = "U-Net's up path has no pooling indices"
        mode = check_upsample_mode(head.UPSAMPLE, "MODEL.UNET_HEAD.UPSAMPLE", no_unpool=no_unpool)
        if head.PADDING not in PADDING_MODES:
            raise Seg2Error(
                f"MODEL.UNET_HEAD.PADDING={head.PADDING!r}: must be one of {PADDING_MODES}"
            )
        if head.DECODER_CHANNELS and len(head.DECODER_CHANNELS) != len(names) - 1:
            raise Seg2Error(
                f"MODEL.UNET_HEAD.DECODER_CHANNELS={list(head.DECODER_CHANNELS)}: "
                f"{len(names) - 1} up steps "
                f"(MODEL.SEM_SEG_HEAD.IN_FEATURES={names}) need {len(names) - 1} values, or [] "
                "for the skips' channels"
            )
        if head.DECODER_CHANNELS:
            channels, channels_key = head.DECODER_CHANNELS, "MODEL.UNET_HEAD.DECODER_CHANNELS"
        else:  # [] : each step keeps its skip feature's channels
            channels = [input_shape[f].channels for f in names[:-1]]
            channels_key = f"MODEL.UNET_HEAD.DECODER_CHANNELS=[] (the channels of the skip features {names[:-1]})"
        check_norm(head.NORM, channels, "MODEL.UNET_HEAD.NORM", channels_key)
        ret = super().from_config(cfg, input_shape)
        ret.update(
            input_shape={f: input_shape[f] for f in names},
            padding=head.PADDING,
            decoder_channels=list(head.DECODER_CHANNELS),
            upsample=mode,
            norm=head.NORM,
        )
        return ret

    def layers(self, features):
        """Stride-1 logits ("valid": the centre of the input, smaller than it)."""
        x = features[self.in_features[-1]]
        for f in self.in_features[:-1][::-1]:
            skip = features[f]
            x = self.up[f](x)
            if self.valid_padding:
                skip = center_crop(skip, x.shape[-2:])
            else:  # "same": coarser maps round up (ResNet) or down (VGG); match the skip
                x = match_size(x, skip.shape[-2:])
            x = self.convs[f](torch.cat([skip, x], dim=1))
        return self.final_up(self.predictor(x))
