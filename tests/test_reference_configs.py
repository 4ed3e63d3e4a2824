"""configs/reference/: the papers' architectures, by parameter count and U-Net's 572 -> 388."""

import pytest
import torch
from detectron2.modeling import build_model

from seg2_model_helpers import base_cfg, one_thread  # noqa: F401


def _count(model, skip=None):
    return sum(p.numel() for n, p in model.named_parameters() if not (skip and skip in n))


def _build(config, meta=False):
    cfg = base_cfg(f"reference/{config}")
    if meta:  # shapes only: the same modules, no memory, no initialisation time
        cfg.MODEL.DEVICE = "meta"
        with torch.device("meta"):
            return build_model(cfg)
    return build_model(cfg)


def test_fcn8s_parameter_count_is_the_papers():
    # ../shared/REFERENCE.md: 134,362,751 without the transposed convs' weights, 134,489,759 with
    # (2 x 4x4x21x21 + 16x16x21x21). Built for real once: this is the model users get.
    model = _build("fcn8s_vgg16.yaml")
    assert _count(model) == 134_489_759
    assert _count(model, skip="deconv") == 134_362_751
    assert _count(model) - _count(model, skip="deconv") == 2 * 4 * 4 * 21 * 21 + 16 * 16 * 21 * 21
    # fc6 is the 7x7 convolution of the paper; the last transposed conv is fixed at bilinear.
    assert model.backbone.classifier[0].weight.shape == (4096, 512 * 7 * 7)
    assert not model.sem_seg_head.final_up.deconv.weight.requires_grad


@pytest.mark.parametrize(
    "config,score_layers,deconv_kernels",
    [("fcn16s_vgg16.yaml", [4096, 512], [4, 32]), ("fcn32s_vgg16.yaml", [4096], [64])],
)
def test_fcn16s_fcn32s_parameter_counts(config, score_layers, deconv_kernels):
    vgg16_conv = 14_714_688
    fc6, fc7 = 7 * 7 * 512 * 4096 + 4096, 4096 * 4096 + 4096
    scores = sum(c * 21 + 21 for c in score_layers)
    deconvs = sum(k * k * 21 * 21 for k in deconv_kernels)
    model = _build(config, meta=True)
    assert _count(model) == vgg16_conv + fc6 + fc7 + scores + deconvs


def test_segnet_parameter_count():
    model = _build("segnet_vgg16.yaml")
    convs = sum(
        p.numel()
        for m in model.backbone.modules()
        if isinstance(m, torch.nn.Conv2d)
        for p in m.parameters()
    )
    assert convs == 14_714_688  # VGG16's 13 conv layers
    assert 29_440_000 <= _count(model) <= 29_460_000  # REFERENCE.md: about 29.44M to 29.46M
    assert _count(model) == 29_449_355  # 11 classes, 3x3 classifier, BN after every other conv
    # Max-unpooling, no fully connected layers.
    assert not hasattr(model.backbone, "classifier")
    assert all(model.sem_seg_head.up[f].mode == "unpool" for f in model.sem_seg_head.stages)


def test_unet_parameter_count_and_572_to_388():
    model = _build("unet_isbi.yaml")
    assert _count(model) == 31_030_658
    assert model.backbone.valid_padding and model.sem_seg_head.valid_padding
    # The paper's tile: a 572x572 input gives 388x388 (92 pixels of context on each side).
    assert model.tile_geometry(388) == (572, 92)
    # A real 572x572 forward pass through the same topology at 1/16 of the width (the full one
    # costs ~100 GFLOPs on the CPU): backbone and head map 572 -> 388.
    cfg = base_cfg("reference/unet_isbi.yaml")
    cfg.MODEL.UNET_ENCODER.CHANNELS = [4, 8, 16, 32, 64]
    narrow = build_model(cfg).eval()
    with torch.no_grad():
        out, _ = narrow.sem_seg_head(narrow.backbone(torch.randn(1, 1, 572, 572)))
    assert out.shape == (1, 2, 388, 388)
    # 571 or 574 cannot be tiled exactly (an odd map before a pooling): the encoder says so.
    with pytest.raises(ValueError, match="not even"):
        narrow.backbone(torch.randn(1, 1, 574, 574))
