"""The SegNet head: a decoder that mirrors the encoder and up-samples with its pooling indices."""

from typing import Dict, List

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.nn import functional as F

from ...utils import Seg2Error
from ..norm import check_norm
from ..upsample import Upsample
from ..weight_init import caffe_msra_fill
from .common import BaseSemSegHead, check_upsample_mode, final_upsample, sorted_features

__all__ = ["SegNetHead"]

INDICES_SUFFIX = "_indices"
SKIP_MODES = ("none", "add")


@SEM_SEG_HEADS_REGISTRY.register()
class SegNetHead(BaseSemSegHead):
    """
    The decoder of SegNet (Badrinarayanan et al., TPAMI 2017): per encoder stage, deepest first,
    max-unpooling with that stage's pooling indices, then 3x3 conv + BN + ReLU layers mirroring
    the stage; the last conv of the last stage is the classifier.

    SegNet-Basic and the paper's decoder variants are settings: ``kernel_size=7``,
    ``decoder_relu=False`` and ``separate_classifier=True`` (a 1x1 classifier after the last
    stage) give SegNet-Basic's decoder; ``upsample="deconv"`` with ``skip="add"`` gives
    FCN-Basic (learned up-sampling, encoder features added); ``upsample="bilinear"`` the fixed
    bilinear decoder.

    ``IN_FEATURES`` lists the encoder stages (e.g. VGG's ``conv1`` ... ``conv5``, whose sizes
    and channels the decoder mirrors), the decoder input (``pool5``) and, for "unpool", the
    indices (``pool1_indices`` ... ``pool5_indices``). On backbones without indices (ResNet)
    choose another up-sampling mode. The convs start from Caffe's "msra" filler (fan-in), as the
    SegNet prototxts initialise them.
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
        kernel_size: int = 3,
        decoder_relu: bool = True,
        separate_classifier: bool = False,
        skip: str = "none",
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
            kernel_size (int): kernel of the other decoder convs (SegNet: 3, SegNet-Basic: 7).
            decoder_relu (bool): ReLU after each decoder conv's norm (SegNet-Basic: none).
            separate_classifier (bool): a classifier conv after the last stage's convs, which
                then keep the stage's channels (SegNet-Basic), instead of the last conv being it.
            skip (str): "none", or "add" the stage's encoder features after up-sampling into it
                (FCN-Basic; a 1x1 conv matches the channels where they differ).
            kwargs: ``ignore_value``, ``loss_weight``, ``loss``: see :class:`BaseSemSegHead`.
        """
        super().__init__(num_classes=num_classes, **kwargs)
        maps = sorted(
            (f for f in input_shape if not f.endswith(INDICES_SUFFIX)),
            key=lambda f: input_shape[f].stride,
        )
        indices = {input_shape[f].stride: f for f in input_shape if f.endswith(INDICES_SUFFIX)}
        self.in_features = maps
        self.decoder_input, stages = maps[-1], maps[:-1][::-1]  # stages deepest first
        if skip not in SKIP_MODES:
            raise ValueError(f"skip must be one of {SKIP_MODES}, got {skip!r}")
        if len(num_convs) != len(stages):
            raise ValueError(
                f"{len(stages)} decoder stages ({stages}) need {len(stages)} conv counts, got "
                f"{list(num_convs)}"
            )
        self.stages, self.up, self.indices_of = stages, nn.ModuleDict(), {}
        self.decoder, self.skip = nn.ModuleDict(), nn.ModuleDict() if skip == "add" else None
        activation = F.relu if decoder_relu else None
        cur, stride = (
            input_shape[self.decoder_input].channels,
            input_shape[self.decoder_input].stride,
        )
        for i, f in enumerate(stages):
            c = input_shape[f].channels
            factor = stride // input_shape[f].stride
            if upsample == "unpool" and factor > 1:
                if stride not in indices:
                    raise ValueError(
                        f"'unpool' into {f!r} needs pooling indices at stride {stride}; got "
                        f"{indices}"
                    )
                self.indices_of[f] = indices[stride]
            self.up[f] = Upsample(upsample, factor, cur)
            if self.skip is not None:
                self.skip[f] = nn.Identity() if c == cur else Conv2d(c, cur, kernel_size=1)
            last_stage = i == len(stages) - 1
            classifier_here = last_stage and not separate_classifier
            out = (
                num_classes
                if classifier_here
                else (c if last_stage else input_shape[stages[i + 1]].channels)
            )
            layers = []
            for j in range(num_convs[i]):
                cin = cur if j == 0 else c
                if j == num_convs[i] - 1 and classifier_here:
                    layers.append(self._classifier(cin, num_classes, classifier_kernel))
                    continue
                cout = out if j == num_convs[i] - 1 else c
                conv = Conv2d(
                    cin,
                    cout,
                    kernel_size,
                    padding=kernel_size // 2,
                    bias=True,
                    norm=get_norm(norm, cout),
                    activation=activation,
                )
                caffe_msra_fill(conv)
                layers.append(conv)
            if last_stage and separate_classifier:
                layers.append(self._classifier(out, num_classes, classifier_kernel))
            self.decoder[f] = nn.Sequential(*layers)
            cur, stride = (num_classes if last_stage else out), input_shape[f].stride
        self.final_up = final_upsample(upsample, stride, num_classes)

    @staticmethod
    def _classifier(in_channels, num_classes, kernel):
        conv = Conv2d(in_channels, num_classes, kernel, padding=kernel // 2)
        caffe_msra_fill(conv)
        return conv

    @classmethod
    def from_config(cls, cfg, input_shape):
        key = "MODEL.SEM_SEG_HEAD.IN_FEATURES"
        sorted_features(input_shape, cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES, key)
        head = cfg.MODEL.SEGNET_HEAD
        mode = check_upsample_mode(head.UPSAMPLE, "MODEL.SEGNET_HEAD.UPSAMPLE")
        shapes = {f: input_shape[f] for f in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES}
        maps = [f for f in shapes if not f.endswith(INDICES_SUFFIX)]
        if len(maps) < 2:
            raise Seg2Error(
                f"{key}={list(shapes)}: SegNet needs the encoder stages and the decoder input"
            )
        if mode == "unpool":
            have = {shapes[f].stride for f in shapes if f.endswith(INDICES_SUFFIX)}
            strides = sorted(shapes[f].stride for f in maps)
            need = [s for a, s in zip(strides[:-1], strides[1:]) if s > a]
            if not set(need) <= have:
                raise Seg2Error(
                    "MODEL.SEGNET_HEAD.UPSAMPLE='unpool' needs pooling indices at strides "
                    f"{need}, but "
                    f"{key}={list(shapes)} has them at {sorted(have)}: add the backbone's "
                    "'*_indices' features "
                    "(VGG: pool1_indices ... pool5_indices) or choose another up-sampling mode"
                )
        if len(head.NUM_CONVS) != len(maps) - 1:
            raise Seg2Error(
                f"MODEL.SEGNET_HEAD.NUM_CONVS={list(head.NUM_CONVS)}: {key} gives {len(maps) - 1} "
                "decoder stages"
            )
        if head.SKIP not in SKIP_MODES:
            raise Seg2Error(f"MODEL.SEGNET_HEAD.SKIP={head.SKIP!r}: must be one of {SKIP_MODES}")
        if head.KERNEL_SIZE % 2 != 1:
            raise Seg2Error(f"MODEL.SEGNET_HEAD.KERNEL_SIZE={head.KERNEL_SIZE}: must be odd")
        # The decoder convs mirror the encoder: they keep the channels of the stages they decode.
        stages = sorted(maps, key=lambda f: shapes[f].stride)[:-1]
        check_norm(
            head.NORM, [shapes[f].channels for f in stages], "MODEL.SEGNET_HEAD.NORM",
            f"the backbone's channels of the encoder stages {stages} "
            "(MODEL.SEM_SEG_HEAD.IN_FEATURES)",
        )  # fmt: skip
        ret = super().from_config(cfg, input_shape)
        ret.update(
            input_shape=shapes,
            num_convs=list(head.NUM_CONVS),
            upsample=mode,
            norm=head.NORM,
            classifier_kernel=head.CLASSIFIER_KERNEL,
            kernel_size=head.KERNEL_SIZE,
            decoder_relu=head.DECODER_RELU,
            separate_classifier=head.SEPARATE_CLASSIFIER,
            skip=head.SKIP,
        )
        return ret

    def layers(self, features):
        """Stride-1 logits of the size of the shallowest stage (times its stride)."""
        x = features[self.decoder_input]
        for f in self.stages:
            indices = features[self.indices_of[f]] if f in self.indices_of else None
            x = self.up[f](x, output_size=features[f].shape[-2:], indices=indices)
            if self.skip is not None:
                x = x + self.skip[f](features[f])
            x = self.decoder[f](x)
        return self.final_up(x)
