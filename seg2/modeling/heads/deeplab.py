"""DeepLabV3+ from ``detectron2.projects.deeplab``, with seg2's up-sampling and output convention."""

from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab import DeepLabV3PlusHead
from torch import nn

from ..losses import SemSegLoss, build_sem_seg_loss
from ..norm import check_norm
from ..upsample import Upsample
from .common import check_upsample_mode, final_upsample, sem_seg_loss, sorted_features

__all__ = ["Seg2DeepLabV3PlusHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class Seg2DeepLabV3PlusHead(DeepLabV3PlusHead):
    """
    DeepLabV3+ (Chen et al., ECCV 2018): detectron2's ``DeepLabV3PlusHead`` (ASPP, 48-channel
    low-level projection, two 3x3 fuse convs), with the up-sampling a config choice.

    Why not detectron2's head as is: it hard-codes bilinear interpolation for both of its
    up-samplings, and it up-samples its output by ``scale_factor=common_stride``, so its loss
    needs targets of exactly that size and it assumes the shallowest feature is at
    ``COMMON_STRIDE``; and it sizes ASPP's image pooling to ``INPUT.CROP.SIZE``, which fails on
    test images of other sizes (seg2 pools globally, as the paper at test time). seg2's heads share
    :class:`seg2.modeling.upsample.Upsample` and one
    output convention (stride-1 logits from the input's pixel (0, 0), cropped to the targets, no
    loss on a batch with no labelled pixel), which the multi-task model relies on. The layers and
    their parameter names are detectron2's, so its DeepLab checkpoints load. The loss is seg2's
    (:mod:`seg2.modeling.losses`), as for every seg2 head: ``loss_type`` may be any of its terms.
    """

    @configurable
    def __init__(
        self, input_shape, *, upsample: str = "bilinear", loss: Optional[nn.Module] = None, **kwargs
    ):
        """
        Args:
            input_shape, kwargs: as detectron2's ``DeepLabV3PlusHead``.
            upsample (str): up-sampling mode of the decoder and of the output (DeepLab: bilinear).
            loss (nn.Module or None): ``(logits, targets) -> loss`` (see
            :mod:`seg2.modeling.losses`);
                None: the terms of ``loss_type`` without ``ignore_value``.
        """
        loss_type = kwargs.pop("loss_type", "cross_entropy")
        # detectron2's head knows two loss types and builds its own loss; seg2's replaces it.
        super().__init__(input_shape, loss_type="cross_entropy", **kwargs)
        self.loss_type = loss_type
        if not self.decoder_only:
            self.loss = (
                loss if loss is not None else SemSegLoss(loss_type, ignore_value=self.ignore_value)
            )
        strides = {f: s.stride for f, s in input_shape.items()}
        aspp_channels = self.decoder[self.in_features[-1]]["project_conv"].project.out_channels
        # decoder_up[f]: from the deeper decoder output to feature f's stride (the ASPP output
        # up-sampled 4x into the low-level features in the paper).
        self.decoder_up = nn.ModuleDict()
        prev = self.in_features[-1]
        cur = aspp_channels
        for f in self.in_features[:-1][::-1]:
            self.decoder_up[f] = Upsample(upsample, strides[prev] // strides[f], cur)
            stage = self.decoder[f]["fuse_conv"]
            cur = (
                stage[-1].out_channels
                if isinstance(stage, nn.Sequential)
                else stage.pointwise.out_channels
            )
            prev = f
        out_channels = self.predictor.out_channels if not self.decoder_only else cur
        self.final_up = final_upsample(upsample, strides[self.in_features[0]], out_channels)

    @classmethod
    def from_config(cls, cfg, input_shape):
        sem = cfg.MODEL.SEM_SEG_HEAD
        sorted_features(input_shape, sem.IN_FEATURES)
        # detectron2's head puts MODEL.SEM_SEG_HEAD.NORM after every conv: the low-level
        # projections, ASPP and the fuse convs.
        for channels_key, channels in (
            ("MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", sem.PROJECT_CHANNELS),
            ("MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", [sem.ASPP_CHANNELS]),
            ("MODEL.SEM_SEG_HEAD.CONVS_DIM", [sem.CONVS_DIM]),
        ):
            check_norm(sem.NORM, channels, "MODEL.SEM_SEG_HEAD.NORM", channels_key)
        ret = super().from_config(cfg, input_shape)
        # detectron2 sizes ASPP's image pooling to the training crop, and then refuses inputs
        # whose feature map does not divide that window (VOC's test images, say); pool globally.
        ret["train_size"] = None
        mode = check_upsample_mode(cfg.MODEL.DEEPLAB_HEAD.UPSAMPLE, "MODEL.DEEPLAB_HEAD.UPSAMPLE")
        ret["upsample"] = "bilinear" if mode == "unpool" else mode
        ret["loss"] = build_sem_seg_loss(cfg)
        return ret

    def layers(self, features):
        """Logits at the stride of the shallowest feature (decoder features if decoder-only)."""
        y = None
        for f in self.in_features[::-1]:
            proj_x = self.decoder[f]["project_conv"](features[f])
            if self.decoder[f]["fuse_conv"] is None:  # ASPP
                y = proj_x
            else:
                y = self.decoder_up[f](y, output_size=proj_x.shape[-2:])
                y = self.decoder[f]["fuse_conv"](torch.cat([proj_x, y], dim=1))
        if not self.decoder_only:
            y = self.predictor(y)
        return y

    def forward(self, features, targets=None):
        """
        Returns:
            training: (None, {"loss_sem_seg"}); inference: ((N, C, H, W) stride-1 logits, {}).
        """
        y = self.final_up(self.layers(features))
        if self.decoder_only:
            return y
        if self.training:
            losses = sem_seg_loss(
                y, targets, self.loss, ignore_value=self.ignore_value, loss_weight=self.loss_weight
            )
            return None, losses
        return y, {}
