"""VGG as FCN and SegNet use it, registered in detectron2's ``BACKBONE_REGISTRY``."""

from typing import Dict, List, Optional, Sequence

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torch.nn import functional as F
from torchvision.models.vgg import cfgs as TORCHVISION_VGG_CFGS
from torchvision.models.vgg import make_layers

from ...utils import Seg2Error
from ..norm import check_norm

__all__ = ["VGG", "FCConv2d", "build_vgg_backbone", "vgg_feature_offsets"]

# torchvision's layer lists by depth; "M" is a 2x2 max-pool.
_VGG_CFG_BY_DEPTH = {11: "A", 13: "B", 16: "D", 19: "E"}


class FCConv2d(nn.Linear):
    """
    A fully connected layer applied as a convolution (FCN's "convolutionalised" fc6/fc7).

    Its weight keeps the ``nn.Linear`` shape (out, in_channels * k * k), so torchvision's
    ImageNet VGG checkpoints load unchanged; the forward views it as a (out, in, k, k) kernel,
    the same flattening order as torchvision's ``x.flatten(1)`` of a (C, k, k) map.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__(in_channels * kernel_size * kernel_size, out_channels)
        self.in_channels, self.kernel_size, self.padding = in_channels, kernel_size, padding

    def forward(self, x):
        w = self.weight.view(
            self.out_features, self.in_channels, self.kernel_size, self.kernel_size
        )
        return F.conv2d(x, w, self.bias, padding=self.padding)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_features}, kernel_size={self.kernel_size}, padding={self.padding}"


def vgg_feature_offsets(num_stages: int = 5, fcn_pad100: bool = False) -> Dict[str, float]:
    """
    Input-pixel coordinate of the centre of pixel (0, 0) of each VGG feature.

    With "same" padding a stride-s feature sits at ``(s - 1) / 2``. FCN's pad-100 variant shifts
    every map (conv1_1 padded by 100, fc6 unpadded); the FCN head crops by these offsets, which
    reproduces the crop offsets of the paper's Caffe models.
    """
    pad1 = 100 if fcn_pad100 else 1
    offset = 1.0 - pad1  # conv1_1: 3x3, padding pad1; the later 3x3 convs (padding 1) keep it
    offsets = {}
    for i in range(1, num_stages + 1):
        stride = 2 ** (i - 1)
        offsets[f"conv{i}"] = offset
        offset += 0.5 * stride  # 2x2 max-pool, stride 2
        offsets[f"pool{i}"] = offsets[f"pool{i}_indices"] = offset
    fc6_pad = 0 if fcn_pad100 else 3
    offsets["fc7"] = offset + (3 - fc6_pad) * 2**num_stages  # fc6: 7x7 conv
    return offsets


class VGG(Backbone):
    """
    VGG (Simonyan & Zisserman, ICLR 2015) conv layers with FCN's fc6/fc7-as-convolutions and the
    max-pooling indices SegNet up-samples with.

    Features: ``conv{i}`` (stage i after its last ReLU, stride 2**(i-1)), ``pool{i}`` (stride
    2**i), ``pool{i}_indices`` (the argmax of that pooling) and ``fc7`` (stride 32). The layers of
    ``features`` and ``classifier`` are numbered as in torchvision, so torchvision's ImageNet
    checkpoints (``vgg16-397923af.pth``, ``vgg16_bn-6c64b313.pth``) load by name.
    """

    def __init__(
        self,
        *,
        depth: int = 16,
        in_channels: int = 3,
        stage_channels: Sequence[int] = (64, 128, 256, 512, 512),
        norm: str = "",
        fc_dim: int = 4096,
        fc_dropout: float = 0.5,
        fcn_pad100: bool = False,
        out_features: Optional[List[str]] = None,
    ):
        """
        Args:
            depth (int): 11, 13, 16 or 19.
            in_channels (int): channels of the input image.
            stage_channels (list[int]): channels of the 5 stages (VGG: 64, 128, 256, 512, 512).
            norm (str): normalization after each conv ("" as VGG/FCN, "BN" as SegNet/VGG-BN).
            fc_dim (int): channels of fc6 and fc7 (4096); 0 builds no fc layers (SegNet).
            fc_dropout (float): dropout after fc6 and after fc7 (FCN: 0.5).
            fcn_pad100 (bool): FCN's pad-100-and-crop: conv1_1 padded by 100, ceil-mode pooling,
                fc6 unpadded, so any input size gives an output that covers it.
            out_features (list[str] or None): features to return; None: all.
        """
        super().__init__()
        if depth not in _VGG_CFG_BY_DEPTH:
            raise ValueError(f"VGG depth must be one of {sorted(_VGG_CFG_BY_DEPTH)}, got {depth}")
        if len(stage_channels) != 5:
            raise ValueError(f"VGG needs 5 stage widths, got {list(stage_channels)}")
        layer_cfg, stage = [], 0
        for v in TORCHVISION_VGG_CFGS[_VGG_CFG_BY_DEPTH[depth]]:
            if v == "M":
                layer_cfg.append("M")
                stage += 1
            else:
                layer_cfg.append(int(stage_channels[stage]))
        # Reuse torchvision's layer builder (same indices as its checkpoints), then adapt it:
        # the input channels, conv1_1's padding, detectron2 norms, pooling with indices.
        features = make_layers(layer_cfg, batch_norm=bool(norm))
        first = features[0]
        if in_channels != 3 or fcn_pad100:
            features[0] = nn.Conv2d(
                in_channels, first.out_channels, 3, padding=100 if fcn_pad100 else 1
            )
        for i, layer in enumerate(features):
            if isinstance(layer, nn.BatchNorm2d) and norm != "BN":
                features[i] = get_norm(norm, layer.num_features)
            elif isinstance(layer, nn.MaxPool2d):
                features[i] = nn.MaxPool2d(2, 2, ceil_mode=fcn_pad100, return_indices=True)
        for m in features.modules():  # torchvision VGG's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.features = features
        self.fc_dim = fc_dim
        if fc_dim > 0:
            # Named and numbered as torchvision's classifier: fc6, relu, dropout, fc7, relu,
            # dropout.
            self.classifier = nn.Sequential(
                FCConv2d(stage_channels[-1], fc_dim, 7, padding=0 if fcn_pad100 else 3),
                nn.ReLU(inplace=True),
                nn.Dropout(fc_dropout),
                FCConv2d(fc_dim, fc_dim, 1),
                nn.ReLU(inplace=True),
                nn.Dropout(fc_dropout),
            )
            for m in self.classifier.modules():
                if isinstance(m, FCConv2d):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)
        self.fcn_pad100 = fcn_pad100
        self.feature_offsets = vgg_feature_offsets(5, fcn_pad100)

        self._out_feature_strides, self._out_feature_channels = {}, {}
        for i, c in enumerate(stage_channels, start=1):
            for name, stride in (
                (f"conv{i}", 2 ** (i - 1)),
                (f"pool{i}", 2**i),
                (f"pool{i}_indices", 2**i),
            ):
                self._out_feature_strides[name], self._out_feature_channels[name] = stride, c
        if fc_dim > 0:
            self._out_feature_strides["fc7"], self._out_feature_channels["fc7"] = 32, fc_dim
        all_features = list(self._out_feature_strides)
        self._out_features = list(out_features) if out_features else all_features
        unknown = [f for f in self._out_features if f not in all_features]
        if unknown:
            raise ValueError(f"VGG has no features {unknown}; it gives {all_features}")

    @property
    def size_divisibility(self) -> int:
        # "same" padding: 5 exact 2x poolings. pad-100: ceil-mode pooling covers any size.
        return 0 if self.fcn_pad100 else 32

    def forward(self, x):
        outputs, stage = {}, 1
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                outputs[f"conv{stage}"] = x
                x, indices = layer(x)
                outputs[f"pool{stage}"], outputs[f"pool{stage}_indices"] = x, indices
                stage += 1
            else:
                x = layer(x)
        if self.fc_dim > 0 and "fc7" in self._out_features:
            outputs["fc7"] = self.classifier(x)
        return {k: outputs[k] for k in self._out_features}


@BACKBONE_REGISTRY.register()
def build_vgg_backbone(cfg, input_shape: ShapeSpec):
    """A :class:`VGG` from ``cfg.MODEL.VGG``."""
    vgg = cfg.MODEL.VGG
    check_norm(vgg.NORM, vgg.CHANNELS, "MODEL.VGG.NORM", "MODEL.VGG.CHANNELS")
    try:
        return VGG(
            depth=vgg.DEPTH,
            in_channels=input_shape.channels,
            stage_channels=vgg.CHANNELS,
            norm=vgg.NORM,
            fc_dim=vgg.FC_DIM,
            fc_dropout=vgg.FC_DROPOUT,
            fcn_pad100=vgg.FCN_PAD100,
            out_features=vgg.OUT_FEATURES,
        )
    except ValueError as e:
        raise Seg2Error(f"MODEL.VGG: {e}") from e
