"""The FCN head: FCN-32s, -16s and -8s, chosen by which backbone features it fuses."""

from typing import Dict, Optional

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ...utils import Seg2Error
from ..backbone import feature_offsets
from ..upsample import Upsample
from .common import BaseSemSegHead, check_upsample_mode, final_upsample, nested_features

__all__ = ["FCNHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class FCNHead(BaseSemSegHead):
    """
    FCN (Long et al., CVPR 2015): 1x1 score layers on the deepest feature and on each skip
    feature, fused by summation after up-sampling, then up-sampled to the input.

    ``IN_FEATURES`` picks the variant: ``["fc7"]`` is FCN-32s, ``["pool4", "fc7"]`` FCN-16s and
    ``["pool3", "pool4", "fc7"]`` FCN-8s on VGG; ``res3, res4, res5`` or ``p3, p4, p5`` likewise.
    Maps are aligned by their offsets (see :func:`seg2.modeling.backbone.feature_offsets`), which
    reproduces the paper's crop layers for VGG's pad-100 mode.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        offsets: Optional[Dict[str, float]] = None,
        upsample: str = "deconv",
        learn_final_upsample: bool = True,
        deconv_kernel_multiple: int = 2,
        **kwargs,
    ):
        """
        Args:
            input_shape (dict[str, ShapeSpec]): the features to fuse; the deepest one is scored
                and up-sampled, the others are skips.
            num_classes (int): number of classes.
            offsets (dict[str, float] or None): input coordinate of pixel (0, 0) of each feature;
                None: "same" padding, ``(stride - 1) / 2``.
            upsample (str): up-sampling mode (see :mod:`seg2.modeling.upsample`); FCN: "deconv".
            learn_final_upsample (bool): False keeps the last transposed conv at bilinear, as the
                paper does.
            deconv_kernel_multiple (int): a transposed conv's kernel is this times its factor
                (FCN: 2; the SegNet paper's FCN-Basic: 4, 8x8 kernels for 2x).
            kwargs: ``ignore_value``, ``loss_weight``, ``loss``: see :class:`BaseSemSegHead`.
        """
        super().__init__(num_classes=num_classes, **kwargs)
        self.in_features = sorted(input_shape, key=lambda f: input_shape[f].stride)
        self.strides = {f: input_shape[f].stride for f in self.in_features}
        self.offsets = offsets or {f: (s - 1) / 2 for f, s in self.strides.items()}
        self.score = nn.ModuleDict()
        for f in self.in_features:
            score = nn.Conv2d(input_shape[f].channels, num_classes, kernel_size=1)
            # The FCN paper zero-initialises its score layers. (The SegNet paper starts every conv
            # of its FCN-Basic from the msra filler: on CamVid at its LR 0.1 that diverged within
            # 8-18 iterations, docs/models.md.)
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
            self.score[f] = score

        def kernel(factor):  # a transposed conv's kernel; None where the mode has none
            return deconv_kernel_multiple * factor if upsample == "deconv" else None

        # up[f]: from the fused map one level deeper to the stride of skip feature f.
        self.up = nn.ModuleDict()
        for shallow, deep in zip(self.in_features[:-1], self.in_features[1:]):
            factor = self.strides[deep] // self.strides[shallow]
            self.up[shallow] = Upsample(upsample, factor, num_classes, kernel_size=kernel(factor))
        first = self.strides[self.in_features[0]]
        self.final_up = final_upsample(
            upsample, first, num_classes, learnable=learn_final_upsample, kernel_size=kernel(first)
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        names, strides = nested_features(input_shape, cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
        no_unpool = "FCN has no pooling indices to unpool score maps with"
        mode = check_upsample_mode(
            cfg.MODEL.FCN_HEAD.UPSAMPLE, "MODEL.FCN_HEAD.UPSAMPLE", no_unpool=no_unpool
        )
        shapes = {f: input_shape[f] for f in names}
        fcn = cfg.MODEL.FCN_HEAD
        factors = [b // a for a, b in zip(strides[:-1], strides[1:])] + [strides[0]]
        m = fcn.DECONV_KERNEL_MULTIPLE
        if mode == "deconv" and (m < 1 or any(f > 1 and (m - 1) * f % 2 for f in factors)):
            raise Seg2Error(
                f"MODEL.FCN_HEAD.DECONV_KERNEL_MULTIPLE={m}: a transposed conv of factor f gets "
                "an m*f kernel, "
                f"which needs m >= 1 and (m - 1) * f even; the factors here are {factors}"
            )
        ret = super().from_config(cfg, input_shape)
        ret.update(
            input_shape=shapes,
            offsets=feature_offsets(cfg, shapes),
            upsample=mode,
            learn_final_upsample=fcn.LEARN_FINAL_UPSAMPLE,
            deconv_kernel_multiple=m,
        )
        return ret

    def layers(self, features):
        """Stride-1 logits whose pixel (0, 0) is the input's pixel (0, 0)."""
        deep = self.in_features[-1]
        x = self.score[deep](features[deep])
        offset, stride = self.offsets[deep], self.strides[deep]
        for f in reversed(self.in_features[:-1]):
            x = self.up[f](x)
            factor = stride // self.strides[f]
            offset, stride = offset - stride / 2 + stride / (2 * factor), self.strides[f]
            skip = self.score[f](features[f])
            shift = (offset - self.offsets[f]) / stride
            if shift != int(shift):
                raise ValueError(
                    f"FCN: feature {f!r} is not aligned with the deeper map (shift {shift} pixels)"
                )
            shift = int(shift)
            if shift >= 0:  # skip pixel (shift) sits where x's pixel 0 does: crop the skip
                skip = skip[..., shift:, shift:]
            else:
                x = x[..., -shift:, -shift:]
                offset -= shift * stride
            h, w = min(x.shape[-2], skip.shape[-2]), min(x.shape[-1], skip.shape[-1])
            x = x[..., :h, :w] + skip[..., :h, :w]
        x = self.final_up(x)
        offset = offset - stride / 2 + 0.5
        start = -offset
        if start < 0 or start != int(start):
            raise ValueError(
                f"FCN: the output starts at input coordinate {offset}, it cannot be cropped to "
                "the input"
            )
        start = int(start)
        return x[..., start:, start:]
