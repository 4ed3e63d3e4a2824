"""The SegNet-Basic encoder, registered in detectron2's ``BACKBONE_REGISTRY``."""

from typing import Sequence

import torch
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torch.nn import functional as F

from ...utils import Seg2Error
from ..norm import check_norm
from ..weight_init import caffe_msra_fill

__all__ = ["SegNetBasicEncoder", "build_segnet_basic_backbone"]


class SegNetBasicEncoder(Backbone):
    """
    The encoder of SegNet-Basic (Badrinarayanan et al., TPAMI 2017; the authors'
    ``segnet_basic_train.prototxt``): local response normalisation of the input, then per stage a
    ``k x k`` conv (MSRA init, with bias) + BN + ReLU and a 2x2 max-pool whose indices are kept.

    Features, named as :class:`seg2.modeling.VGG` names them so that ``SegNetHead`` decodes
    either: ``conv{i}`` (stride ``2**(i-1)``), ``pool{i}`` and ``pool{i}_indices`` (stride
    ``2**i``). Pooling uses Caffe's ceil mode (360 -> 180 -> 90 -> 45 -> 23), and the decoder
    unpools back to each ``conv{i}`` size.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        kernel_size: int = 7,
        num_stages: int = 4,
        input_lrn: bool = True,
        norm: str = "BN",
        out_features: Sequence[str] = (),
    ):
        super().__init__()
        if kernel_size % 2 != 1 or num_stages < 1 or channels < 1:
            raise ValueError(
                f"need an odd kernel, >= 1 stage and >= 1 channel; got kernel {kernel_size}, "
                f"{num_stages} stages, {channels} channels"
            )
        # Caffe's LRN across channels: x / (1 + alpha / n * sum of n squares) ** beta, as torch's.
        self.lrn = (
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0) if input_lrn else nn.Identity()
        )
        self.stages = nn.ModuleList()
        self._out_feature_channels, self._out_feature_strides = {}, {}
        cin = in_channels
        for i in range(1, num_stages + 1):
            conv = Conv2d(
                cin,
                channels,
                kernel_size,
                padding=kernel_size // 2,
                bias=True,
                norm=get_norm(norm, channels),
                activation=F.relu,
            )
            caffe_msra_fill(conv)
            self.stages.append(conv)
            for name, stride in (
                (f"conv{i}", 2 ** (i - 1)),
                (f"pool{i}", 2**i),
                (f"pool{i}_indices", 2**i),
            ):
                self._out_feature_channels[name] = channels
                self._out_feature_strides[name] = stride
            cin = channels
        all_features = list(self._out_feature_channels)
        unknown = [f for f in out_features if f not in all_features]
        if unknown:
            raise ValueError(f"unknown out_features {unknown}; the encoder gives {all_features}")
        self._out_features = list(out_features) or all_features

    def forward(self, x: torch.Tensor):
        x = self.lrn(x)
        out = {}
        for i, conv in enumerate(self.stages, start=1):
            x = conv(x)
            out[f"conv{i}"] = x
            x, indices = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
            out[f"pool{i}"], out[f"pool{i}_indices"] = x, indices
        return {k: v for k, v in out.items() if k in self._out_features}

    def output_shape(self):
        return {
            f: ShapeSpec(
                channels=self._out_feature_channels[f], stride=self._out_feature_strides[f]
            )
            for f in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_segnet_basic_backbone(cfg, input_shape: ShapeSpec):
    """A :class:`SegNetBasicEncoder` from ``cfg.MODEL.SEGNET_BASIC``."""
    b = cfg.MODEL.SEGNET_BASIC
    check_norm(b.NORM, [b.CHANNELS], "MODEL.SEGNET_BASIC.NORM", "MODEL.SEGNET_BASIC.CHANNELS")
    try:
        return SegNetBasicEncoder(
            in_channels=input_shape.channels,
            channels=b.CHANNELS,
            kernel_size=b.KERNEL_SIZE,
            num_stages=b.NUM_STAGES,
            input_lrn=b.INPUT_LRN,
            norm=b.NORM,
            out_features=b.OUT_FEATURES,
        )
    except ValueError as e:
        raise Seg2Error(f"MODEL.SEGNET_BASIC: {e}") from e
