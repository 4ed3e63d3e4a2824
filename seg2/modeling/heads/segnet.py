"""The SegNet head: a decoder that mirrors the encoder and up-samples with its pooling indices."""

from typing import Dict, List

import fvcore.nn.weight_init as weight_init
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.nn import functional as F

from ...utils import Seg2Error
from ..upsample import Upsample
from .common import BaseSemSegHead, check_upsample_mode, final_upsample, sorted_features

__all__ = ["SegNetHead"]

INDICES_SUFFIX = "_indices"


@SEM_SEG_HEADS_REGISTRY.register()
class SegNetHead(BaseSemSegHead):
    """
    The decoder of SegNet (Badrinarayanan et al., TPAMI 2017): per encoder stage, deepest first,
    max-unpooling with that stage's pooling indices, then 3x3 conv + BN + ReLU layers mirroring
    the stage; the last conv of the last stage is the classifier.

    ``IN_FEATURES`` lists the encoder stages (e.g. VGG's ``conv1`` ... ``conv5``, whose sizes
    and channels the decoder mirrors), the decoder input (``pool5``) and, for "unpool", the
    indices (``pool1_indices`` ... ``pool5_indices``). On backbones without indices (ResNet)
    choose another up-sampling mode.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        num_convs: List[int],
        upsample: str = "unpool",
        norm: str = "BN",
        classifier_kernel: int = 3,
        **kwargs,
    ):
        """
        Args:
            input_shape (dict[str, ShapeSpec]): encoder stages, the decoder input (the deepest
                feature) and, for "unpool", features named ``*_indices`` (at the stride of the
                pooled map they index).
            num_classes (int): number of classes.
            num_convs (list[int]): convs per decoder stage, deepest first (VGG16: 3, 3, 3, 2, 2).
            upsample (str): up-sampling mode; "unpool" is SegNet's.
            norm (str): normalization after each decoder conv but the classifier ("BN").
            classifier_kernel (int): 1 or 3, the classifier's kernel.
            kwargs: ``ignore_value``, ``loss_weight``, ``loss``: see :class:`BaseSemSegHead`.
        """
        super().__init__(num_classes=num_classes, **kwargs)
        maps = sorted((f for f in input_shape if not f.endswith(INDICES_SUFFIX)), key=lambda f: input_shape[f].stride)
        indices = {input_shape[f].stride: f for f in input_shape if f.endswith(INDICES_SUFFIX)}
        self.in_features = maps
        self.decoder_input, stages = maps[-1], maps[:-1][::-1]  # stages deepest first
        if len(num_convs) != len(stages):
            raise ValueError(f"{len(stages)} decoder stages ({stages}) need {len(stages)} conv counts, got {list(num_convs)}")
        self.stages, self.up, self.indices_of = stages, nn.ModuleDict(), {}
        self.decoder = nn.ModuleDict()
        cur, stride = input_shape[self.decoder_input].channels, input_shape[self.decoder_input].stride
        for i, f in enumerate(stages):
            c = input_shape[f].channels
            factor = stride // input_shape[f].stride
            if upsample == "unpool" and factor > 1:
                if stride not in indices:
                    raise ValueError(f"'unpool' into {f!r} needs pooling indices at stride {stride}; got {indices}")
                self.indices_of[f] = indices[stride]
            self.up[f] = Upsample(upsample, factor, cur)
            last_stage = i == len(stages) - 1
            out = num_classes if last_stage else input_shape[stages[i + 1]].channels
            layers = []
            for j in range(num_convs[i]):
                cin = cur if j == 0 else c
                if j == num_convs[i] - 1 and last_stage:  # the classifier
                    conv = Conv2d(cin, out, classifier_kernel, padding=classifier_kernel // 2)
                else:
                    cout = out if j == num_convs[i] - 1 else c
                    conv = Conv2d(cin, cout, 3, padding=1, bias=True, norm=get_norm(norm, cout), activation=F.relu)
                weight_init.c2_msra_fill(conv)
                layers.append(conv)
            self.decoder[f] = nn.Sequential(*layers)
            cur, stride = out, input_shape[f].stride
        self.final_up = final_upsample(upsample, stride, num_classes)

    @classmethod
    def from_config(cls, cfg, input_shape):
        key = "MODEL.SEM_SEG_HEAD.IN_FEATURES"
        sorted_features(input_shape, cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES, key)
        head = cfg.MODEL.SEGNET_HEAD
        mode = check_upsample_mode(head.UPSAMPLE, "MODEL.SEGNET_HEAD.UPSAMPLE")
        shapes = {f: input_shape[f] for f in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES}
        maps = [f for f in shapes if not f.endswith(INDICES_SUFFIX)]
        if len(maps) < 2:
            raise Seg2Error(f"{key}={list(shapes)}: SegNet needs the encoder stages and the decoder input")
        if mode == "unpool":
            have = {shapes[f].stride for f in shapes if f.endswith(INDICES_SUFFIX)}
            strides = sorted(shapes[f].stride for f in maps)
            need = [s for a, s in zip(strides[:-1], strides[1:]) if s > a]
            if not set(need) <= have:
                raise Seg2Error(
                    f"MODEL.SEGNET_HEAD.UPSAMPLE='unpool' needs pooling indices at strides {need}, but "
                    f"{key}={list(shapes)} has them at {sorted(have)}: add the backbone's '*_indices' features "
                    "(VGG: pool1_indices ... pool5_indices) or choose another up-sampling mode"
                )
        if len(head.NUM_CONVS) != len(maps) - 1:
            raise Seg2Error(
                f"MODEL.SEGNET_HEAD.NUM_CONVS={list(head.NUM_CONVS)}: {key} gives {len(maps) - 1} decoder stages"
            )
        ret = super().from_config(cfg, input_shape)
        ret.update(
            input_shape=shapes,
            num_convs=list(head.NUM_CONVS),
            upsample=mode,
            norm=head.NORM,
            classifier_kernel=head.CLASSIFIER_KERNEL,
        )
        return ret

    def layers(self, features):
        """Stride-1 logits of the size of the shallowest stage (times its stride)."""
        x = features[self.decoder_input]
        for f in self.stages:
            indices = features[self.indices_of[f]] if f in self.indices_of else None
            x = self.up[f](x, output_size=features[f].shape[-2:], indices=indices)
            x = self.decoder[f](x)
        return self.final_up(x)
