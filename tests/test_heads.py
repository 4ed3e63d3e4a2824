"""seg2's semantic heads and the shared up-sampling module: shapes, gradients, overfitting."""

import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from fvcore.nn.precise_bn import update_bn_stats
from torch.nn import functional as F

from seg2.modeling import Upsample
from seg2.modeling.backbone import vgg_feature_offsets
from seg2.modeling.losses import SemSegLoss
from seg2.modeling.upsample import bilinear_kernel

from seg2_model_helpers import (
    base_cfg,
    load_records,
    mapped_inputs,
    miou,
    tiny_semantic_cfg,
)  # noqa: F401

# (head, backbone) pairs: every head on its own backbone, on detectron2's ResNet and on the
# DeepLab (dilated, output stride 16) ResNet.
HEAD_BACKBONES = [
    ("FCNHead", "vgg"),
    ("FCNHead", "vgg_pad100"),
    ("FCNHead", "resnet"),
    ("FCNHead", "deeplab_resnet"),
    ("UNetHead", "unet_same"),
    ("UNetHead", "unet_valid"),
    ("UNetHead", "resnet"),
    ("UNetHead", "deeplab_resnet"),
    ("SegNetHead", "vgg"),
    ("SegNetHead", "resnet"),
    ("SegNetHead", "deeplab_resnet"),
    ("Seg2DeepLabV3PlusHead", "deeplab_resnet"),
    ("Seg2DeepLabV3PlusHead", "resnet"),
]


# ---- the up-sampling module ----------------------------------------------------------------
@pytest.mark.parametrize("factor,kernel", [(2, None), (4, None), (8, None), (2, 8)])
def test_bilinear_deconv_matches_interpolate_in_interior(factor, kernel):
    # (2, 8): the SegNet paper's 8x8 kernels for 2x start as the same 2x bilinear interpolation
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 11)
    up = Upsample("deconv", factor, 3, kernel_size=kernel)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    out = up(x)
    assert out.shape == ref.shape == (2, 3, 9 * factor, 11 * factor)
    # Off the border (where the transposed conv sees zero padding, interpolate clamps) they agree.
    m = factor
    torch.testing.assert_close(out[..., m:-m, m:-m], ref[..., m:-m, m:-m], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        out, ref, atol=1e-3
    )  # the borders do differ: the crop above is needed


def test_bilinear_kernel_by_hand():
    # FCN's 4x4 kernel for 2x: outer product of [0.25, 0.75, 0.75, 0.25].
    k = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(bilinear_kernel(4), k[:, None] * k[None, :])
    # an 8x8 kernel for 2x holds it in the centre: [0, 0, .25, .75, .75, .25, 0, 0] per axis
    k8 = torch.tensor([0, 0, 0.25, 0.75, 0.75, 0.25, 0, 0])
    w = Upsample("deconv", 2, 2, kernel_size=8).deconv.weight
    torch.testing.assert_close(w[1, 1], k8[:, None] * k8[None, :])
    assert w[0, 1].abs().max() == 0


@pytest.mark.parametrize("mode", ["bilinear", "nearest_conv", "bilinear_conv", "deconv"])
def test_upsample_modes_shapes_and_output_size(mode):
    x = torch.randn(1, 4, 5, 7)
    up = Upsample(mode, 2, 4, 6)
    assert up(x).shape == (1, 6, 10, 14)
    assert up(x, output_size=(9, 15)).shape == (1, 6, 9, 15)  # crops and pads to the skip's size


def test_unpool_uses_the_pooling_indices():
    x = torch.randn(1, 2, 7, 9)
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    out = Upsample("unpool", 2, 2)(pooled, output_size=x.shape[-2:], indices=indices)
    assert out.shape == x.shape
    # Each pooled maximum goes back to where it came from; everything else is 0.
    assert torch.equal(out, F.max_unpool2d(pooled, indices, 2, 2, output_size=x.shape[-2:]))
    assert torch.equal(out.flatten()[indices.flatten()[:1]], pooled.flatten()[:1])
    with pytest.raises(ValueError, match="indices"):
        Upsample("unpool", 2, 2)(pooled)


def test_unknown_upsample_mode():
    with pytest.raises(ValueError, match="unknown up-sampling mode"):
        Upsample("cubic", 2, 3)


def test_vgg_pad100_offsets_reproduce_fcn_caffe_crops():
    # Caffe's FCN-8s (unpadded transposed convs of kernel 2f) crops score_pool4 by 5, score_pool3
    # by 9 and the 8x output by 31. seg2 pads its transposed convs by f/2, which drops f/2 output
    # pixels per side; the crops it derives from the offsets must be the Caffe ones shifted by
    # exactly those dropped pixels.
    off = vgg_feature_offsets(5, fcn_pad100=True)
    assert (off["pool3"], off["pool4"], off["fc7"]) == (-95.5, -91.5, 12.5)

    def up(offset, stride, factor):  # offset after up-sampling by factor (any mode)
        return offset - stride / 2 + stride / (2 * factor)

    o16 = up(off["fc7"], 32, 2)
    crop_pool4 = (o16 - off["pool4"]) / 16
    assert crop_pool4 == 5 + 1  # Caffe's upscore2 is 1 pixel longer on each side
    o8 = up(o16, 16, 2)
    crop_pool3 = (o8 - off["pool3"]) / 8
    # Caffe's fused stride-16 map starts 1 pixel (= 2 at stride 8) earlier, its upscore_pool4 1 more
    assert crop_pool3 == 9 + 2 + 1
    crop_out = -up(o8, 8, 8)
    # Caffe's fused stride-8 map starts 3 pixels (= 24 input pixels) earlier, its upscore8 4 more
    assert crop_out == 31 - 24 - 4
    same = vgg_feature_offsets(5, fcn_pad100=False)
    assert same["pool3"] == 3.5 and same["fc7"] == 15.5  # "same" padding: (stride - 1) / 2


def test_fc_as_conv_equals_the_fully_connected_layer():
    # fc6 keeps torchvision's Linear weight (out, C*k*k) and applies it as a kxk convolution.
    from seg2.modeling.backbone.vgg import FCConv2d

    torch.manual_seed(0)
    fc = FCConv2d(4, 5, kernel_size=3)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fc(x)[:, :, 0, 0], F.linear(x.flatten(1), fc.weight, fc.bias))


def test_vgg_bn_loads_torchvision_checkpoints(tmp_path):
    # The configs name torchvision's ImageNet files with ?matching_heuristics=True; a randomly
    # initialised torchvision VGG16-BN saved the same way must load into seg2's VGG by name.
    import torchvision
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.layers import ShapeSpec as Shape

    from seg2.modeling.backbone import build_vgg_backbone

    from seg2_model_helpers import CONFIGS, base_cfg

    with open(f"{CONFIGS}/semantic/Base-SegNet-VGG16-BN.yaml") as f:
        assert "vgg16_bn-6c64b313.pth?matching_heuristics=True" in f.read()
    cfg = base_cfg("semantic/segnet_vgg16-bn_20k_voc.yaml")
    torch.manual_seed(0)
    ref = torchvision.models.vgg16_bn(weights=None).eval()
    path = tmp_path / "vgg16_bn.pth"
    torch.save(ref.features.state_dict(prefix="features."), path)
    holder = torch.nn.Module()
    holder.backbone = build_vgg_backbone(cfg, Shape(channels=3))
    DetectionCheckpointer(holder).load(f"{path}?matching_heuristics=True")
    holder.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(holder.backbone(x)["pool5"], ref.features(x))


# ---- heads in the segmentor ------------------------------------------------------------------
def _random_inputs(h, w, n=2, with_targets=True):
    g = torch.Generator().manual_seed(h * 1000 + w)
    out = []
    for _ in range(n):
        x = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
        if with_targets:
            t = torch.randint(0, 4, (h, w), generator=g)
            t[0, :3] = 255
            x["sem_seg"] = t
        out.append(x)
    return out


@pytest.mark.parametrize("head,backbone", HEAD_BACKBONES)
def test_head_output_shapes_odd_and_even(head, backbone):
    torch.manual_seed(0)
    model = build_model(tiny_semantic_cfg(head, backbone))
    model.train()
    losses = model(_random_inputs(37, 53))
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    model.eval()
    for h, w in [(64, 48), (37, 53)]:
        inputs = _random_inputs(h, w, with_targets=False)
        inputs[1]["height"], inputs[1]["width"] = 2 * h + 1, w - 5  # a different output size
        with torch.no_grad():
            out = model(inputs)
        assert out[0]["sem_seg"].shape == (4, h, w)
        assert out[1]["sem_seg"].shape == (4, 2 * h + 1, w - 5)
        assert torch.isfinite(out[0]["sem_seg"]).all()


@pytest.mark.parametrize(
    "head,backbone",
    [
        ("FCNHead", "vgg"),
        ("UNetHead", "unet_same"),
        ("UNetHead", "unet_valid"),
        ("SegNetHead", "vgg"),
        ("Seg2DeepLabV3PlusHead", "deeplab_resnet"),
        ("UNetHead", "resnet"),
    ],
)
def test_gradients_reach_every_parameter(head, backbone):
    torch.manual_seed(0)
    model = build_model(tiny_semantic_cfg(head, backbone))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = _random_inputs(64, 64)
    # Two steps: FCN zero-initialises its score layers (as the paper), so the first backward
    # only reaches them; after one step the whole network gets gradient.
    for _ in range(2):
        opt.zero_grad()
        sum(model(inputs).values()).backward()
        opt.step()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"no gradient reaches {no_grad}"


def test_deeplab_head_equals_detectron2s_with_bilinear_upsampling():
    # Seg2DeepLabV3PlusHead reuses detectron2's layers; with bilinear up-sampling it computes the
    # same logits as detectron2's DeepLabV3PlusHead from the same weights.
    from detectron2.modeling import build_sem_seg_head

    torch.manual_seed(0)
    cfg = tiny_semantic_cfg("Seg2DeepLabV3PlusHead", "deeplab_resnet")
    cfg.MODEL.SEM_SEG_HEAD.NORM = ""
    shapes = {"res2": ShapeSpec(channels=16, stride=4), "res5": ShapeSpec(channels=128, stride=16)}
    ours = build_sem_seg_head(cfg, shapes).eval()
    cfg.MODEL.SEM_SEG_HEAD.NAME = "DeepLabV3PlusHead"
    theirs = build_sem_seg_head(cfg, shapes).eval()
    assert theirs.load_state_dict(ours.state_dict(), strict=False).missing_keys == []
    features = {"res2": torch.randn(2, 16, 16, 24), "res5": torch.randn(2, 128, 4, 6)}
    with torch.no_grad():
        torch.testing.assert_close(ours(features)[0], theirs(features)[0])


def test_deeplab_head_trained_on_crops_infers_on_any_size():
    # detectron2's head sizes ASPP's pooling to INPUT.CROP.SIZE and refuses other test sizes.
    cfg = tiny_semantic_cfg("Seg2DeepLabV3PlusHead", "deeplab_resnet")
    cfg.INPUT.CROP.ENABLED, cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = True, "absolute", [64, 64]
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 48, 80, dtype=torch.uint8)}])
    assert out[0]["sem_seg"].shape == (4, 48, 80)
    cfg.MODEL.SEM_SEG_HEAD.NAME = "DeepLabV3PlusHead"
    with torch.no_grad(), pytest.raises(ValueError, match="pool_kernel_size"):
        build_model(cfg).eval()([{"image": torch.zeros(3, 48, 80, dtype=torch.uint8)}])


# (head, backbone, iterations, Adam learning rate, config edits): narrow models, 2 images.
_WIDER_DEEPLAB = {
    "MODEL.RESNETS.WIDTH_PER_GROUP": 8,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 32,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 32,
    "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS": 32,
}
OVERFIT = [
    ("FCNHead", "vgg", 60, 1e-2, {}),
    ("UNetHead", "unet_same", 60, 1e-2, {}),
    ("SegNetHead", "vgg", 60, 1e-2, {"MODEL.VGG.CHANNELS": [16, 16, 32, 32, 32]}),
    ("Seg2DeepLabV3PlusHead", "deeplab_resnet", 80, 3e-2, _WIDER_DEEPLAB),
]


@pytest.mark.parametrize("head,backbone,iters,lr,edits", OVERFIT)
def test_tiny_model_overfits_shapes_images(tiny_shapes_root, head, backbone, iters, lr, edits):
    torch.manual_seed(0)
    cfg = tiny_semantic_cfg(head, backbone)
    cfg.merge_from_list([x for kv in edits.items() for x in (kv[0], str(kv[1]))])
    inputs = mapped_inputs(cfg, load_records(tiny_shapes_root)[:2], size=64)
    model = build_model(cfg)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = None
    for _ in range(iters):
        loss = sum(model(inputs).values())
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    # BN statistics of exactly these images (fvcore's precise BN), then predict in eval mode.
    with torch.no_grad():
        update_bn_stats(model, [inputs] * 2, 2)
    model.eval()
    with torch.no_grad():
        out = model([{"image": x["image"]} for x in inputs])
    pred = torch.stack([o["sem_seg"].argmax(0) for o in out])
    gt = torch.stack([x["sem_seg"] for x in inputs])
    score = miou(pred, gt, 4)
    chance = miou(torch.zeros_like(gt), gt, 4)  # all background
    assert float(loss) < 0.5 * first
    assert score > 0.6 and score > chance + 0.3, (score, chance)


# ---- the loss every head shares (seg2.modeling.losses) ---------------------------------------
LOSS_TYPES = ["cross_entropy", "hard_pixel_mining", "focal", "dice", "lovasz", "cross_entropy+dice"]
LOSS_HEADS = [
    ("FCNHead", "vgg"),
    ("UNetHead", "unet_same"),
    ("SegNetHead", "vgg"),
    ("Seg2DeepLabV3PlusHead", "deeplab_resnet"),
]


@pytest.mark.parametrize("head,backbone", LOSS_HEADS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_head_trains_with_every_loss(tiny_shapes_root, head, backbone, loss_type):
    torch.manual_seed(0)
    cfg = tiny_semantic_cfg(head, backbone)
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = loss_type
    if loss_type in ("cross_entropy", "hard_pixel_mining", "focal"):
        cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHT = [0.5, 1.0, 2.0, 4.0]
    model = build_model(cfg)
    assert model.sem_seg_head.loss.loss_type == loss_type
    model.train()
    inputs = mapped_inputs(cfg, load_records(tiny_shapes_root)[:2], size=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(6):
        losses = model(inputs)
        assert set(losses) == {"loss_sem_seg"}
        values.append(float(losses["loss_sem_seg"].detach()))
        opt.zero_grad()
        losses["loss_sem_seg"].backward()
        opt.step()
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0], values


def test_head_parameter_names_do_not_depend_on_the_loss():
    # Class weights are a non-persistent buffer and the loss holds no parameter: checkpoints of
    # models trained with any loss load into each other, and detectron2's DeepLab ones still do.
    names = {}
    for loss_type, weight in [
        ("cross_entropy", []),
        ("focal", [1.0, 2.0, 3.0, 4.0]),
        ("lovasz", []),
    ]:
        cfg = tiny_semantic_cfg("Seg2DeepLabV3PlusHead", "deeplab_resnet")
        cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE, cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHT = loss_type, weight
        names[loss_type] = sorted(build_model(cfg).state_dict())
    assert names["cross_entropy"] == names["focal"] == names["lovasz"]
    assert not [n for n in names["focal"] if ".loss." in n or "class_weight" in n]


def test_multitask_model_uses_the_configured_loss(tiny_shapes_root):
    torch.manual_seed(0)
    cfg = base_cfg("quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml")
    cfg.MODEL.FPN.OUT_CHANNELS, cfg.MODEL.ROI_BOX_HEAD.FC_DIM, cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = (
        32,
        64,
        16,
    )
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "focal+lovasz"
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHT = [0.5, 1.0, 2.0, 4.0]
    model = build_model(cfg)
    head = model.sem_seg_head
    assert isinstance(head.loss, SemSegLoss) and head.loss.terms == ("focal", "lovasz")
    inputs = mapped_inputs(cfg, load_records(tiny_shapes_root)[:2], size=64)
    with EventStorage(0):
        losses = model(inputs)
        # the semantic loss is the head's: recompute it from the same features
        features = model.backbone(model.preprocess_image(inputs).tensor)
        head.eval()
        logits = head(features)[0]
    t = torch.full(logits.shape[:1] + logits.shape[-2:], 255, dtype=torch.long)
    for i, x in enumerate(inputs):
        t[i, : x["sem_seg"].shape[0], : x["sem_seg"].shape[1]] = x["sem_seg"]
    expect = head.loss(logits, t) * cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT
    torch.testing.assert_close(losses["loss_sem_seg"], expect)
