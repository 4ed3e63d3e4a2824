"""Overlap-tile semantic inference (seg2.inference.tiling) and the predictor on tiny models."""

import itertools

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from torch.nn import functional as F

import seg2
from seg2 import Seg2Error
from seg2.inference import (
    Seg2Predictor,
    TiledSemSegInference,
    blend_window,
    reflect_indices,
    tile_starts,
)
from seg2.modeling.tiling import mirror_window

from seg2_model_helpers import base_cfg, tiny_semantic_cfg


def _model(head, backbone, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_semantic_cfg(head, backbone)
    return cfg, build_model(cfg).eval()


def _image(h, w, seed=0):
    return torch.randint(
        0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _whole(model, image):
    with torch.no_grad():
        return model([{"image": image}])[0]["sem_seg"]


def test_tile_starts_by_hand():
    assert tile_starts(10, 4, 3) == [0, 3, 6]  # last tile ends at the border
    assert tile_starts(11, 4, 4) == [0, 4, 7]
    assert tile_starts(8, 4, 4) == [0, 4]
    assert tile_starts(4, 4, 1) == [0] and tile_starts(3, 8, 2) == [0]
    # period 4: stride 6 -> 4, tiles reach past the border instead of shifting off the grid
    assert tile_starts(10, 8, 6, period=4) == [0, 4]
    assert tile_starts(13, 8, 6, period=4) == [0, 4, 8]
    # a period larger than the tile cannot be kept: plain tiling
    assert tile_starts(10, 4, 3, period=8) == [0, 3, 6]


def test_tile_starts_cover_every_pixel():
    for length, tile, stride, period in itertools.product(
        [1, 5, 17, 64], [1, 4, 16], [1, 3, 4, 16], [1, 2, 4]
    ):
        if stride > tile:
            continue
        starts = tile_starts(length, tile, stride, period)
        side = min(tile, length)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + side] = True
        assert covered.all(), (length, tile, stride, period, starts)
        assert starts == sorted(set(starts)) and starts[0] == 0
        if 1 < period <= side < length:
            assert all(s % period == 0 for s in starts)
        else:
            assert starts[-1] + side == length


def _reflect_pad(x, top, bottom, left, right):
    """Reference: torch's reflect padding, applied again while the padding exceeds the map."""
    while top or bottom or left or right:
        h, w = x.shape[-2:]
        t, b, lf, r = min(top, h - 1), min(bottom, h - 1), min(left, w - 1), min(right, w - 1)
        x = F.pad(x, (lf, r, t, b), mode="reflect")
        top, bottom, left, right = top - t, bottom - b, left - lf, right - r
    return x


def test_mirror_window_is_reflect_padding():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    for top, bottom, left, right in [(2, 3, 1, 6), (4, 4, 0, 0), (9, 13, 20, 2), (0, 0, 0, 0)]:
        expected = _reflect_pad(x, top, bottom, left, right)
        assert torch.equal(mirror_window(x, (-top, 5 + bottom), (-left, 7 + right)), expected)
    assert torch.equal(mirror_window(x, (1, 4), (2, 7)), x[..., 1:4, 2:7])  # inside: a plain crop
    assert torch.equal(
        mirror_window(x, (3, 8), (0, 7)), x[..., [3, 4, 3, 2, 1], :]
    )  # past the bottom
    # by hand: 2 pixels reflect back and forth, 1 pixel repeats
    assert reflect_indices(-3, 5, 2).tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert reflect_indices(-2, 3, 1).tolist() == [0] * 5


def test_blend_windows():
    assert torch.equal(blend_window(3, "average"), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(
        blend_window(4, "linear"), torch.tensor([0.5, 1.0, 1.0, 0.5], dtype=torch.float64)
    )
    assert torch.allclose(
        blend_window(5, "linear"), torch.tensor([1, 2, 3, 2, 1], dtype=torch.float64) / 3
    )
    g = blend_window(64, "gaussian")
    assert torch.allclose(g, g.flip(0)) and g.min() > np.exp(-8.0) and g.argmax() in (31, 32)
    assert abs(g[0].item() - np.exp(-0.5 * (31.5 / 8.0) ** 2)) < 1e-12
    with pytest.raises(ValueError, match="blend"):
        blend_window(4, "max")


@pytest.mark.parametrize(
    "head,backbone", [("UNetHead", "unet_same"), ("UNetHead", "unet_valid"), ("FCNHead", "vgg")]
)
def test_one_tile_equals_whole_image(head, backbone):
    _, model = _model(head, backbone)
    image = _image(37, 50)
    whole = _whole(model, image)
    # tile larger than the image: clamped to it, one tile; its weight must not change the logits
    tiler = TiledSemSegInference(model, tile_size=64, stride=48, batch_size=2, blend="gaussian")
    assert tiler.tiles(37, 50) == ((37, 50), [(0, 0)])
    assert torch.equal(tiler(image), whole)
    assert torch.equal(tiler(image, output="labels").long(), whole.argmax(0))


def test_one_tile_equals_whole_image_multitask():
    torch.manual_seed(0)
    cfg = base_cfg("quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml")
    model = build_model(cfg).eval()
    image = _image(40, 52, seed=1)
    with torch.no_grad():
        whole = model([{"image": image}])[0]["sem_seg"]
    tiled = TiledSemSegInference(model, tile_size=64, stride=64, blend="linear")(image)
    assert torch.equal(tiled, whole)


def test_detectron2_semantic_segmentor_is_refused_tiling():
    """detectron2's SemanticSegmentor has no tiled inference mode: asking for TEST.TILING is an
    error naming the meta-architectures that have one (no silent whole-image inference)."""
    cfg = tiny_semantic_cfg("FCNHead", "resnet")
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"  # detectron2's own, with seg2's FCN head
    cfg.TEST.TILING.ENABLED = True
    with pytest.raises(
        Seg2Error,
        match="MODEL.META_ARCHITECTURE='SemanticSegmentor' does not tile.*Seg2SemanticSegmentor",
    ):
        seg2.resolve_config(cfg)
    model = build_model(cfg).eval()
    with pytest.raises(Seg2Error, match="model='SemanticSegmentor'.*sem_seg_logits"):
        TiledSemSegInference(model, tile_size=64, stride=64)


def test_panoptic_fpn_is_not_tiled():
    cfg = base_cfg("quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml")
    cfg.MODEL.META_ARCHITECTURE = "PanopticFPN"
    cfg.MODEL.SEM_SEG_HEAD.NAME, cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = (
        "SemSegFPNHead",
        ["p2", "p3", "p4", "p5"],
    )
    cfg.TEST.TILING.ENABLED = True
    with pytest.raises(Seg2Error, match="MODEL.META_ARCHITECTURE='PanopticFPN'.*Seg2MultiTaskRCNN"):
        Seg2Predictor(cfg)


def test_valid_unet_tiles_equal_whole_image():
    # Unpadded convs see only the image (mirror-extended at the borders) and tiles keep the pooling
    # grid: every tile's logits equal the whole image's, so any blend must give them back.
    _, model = _model("UNetHead", "unet_valid")
    image = _image(29, 37, seed=2)
    whole = _whole(model, image)
    for blend in ("average", "linear", "gaussian"):
        tiler = TiledSemSegInference(model, tile_size=16, stride=10, batch_size=5, blend=blend)
        (th, tw), tiles = tiler.tiles(29, 37)
        assert (th, tw) == (16, 16) and len(tiles) == 3 * 4  # stride 10 -> 8 (pooling period 4)
        p, before = model.tile_geometry(16)
        assert tiler.context(16) == (before, p - 16 - before)  # what the network needs, no more
        tiled = tiler(image)
        assert tiled.shape == whole.shape
        assert (tiled - whole).abs().max().item() < 1e-4, blend


def test_labels_are_argmax_of_blended_logits_and_tiles_differ_from_whole():
    _, model = _model("UNetHead", "unet_same")
    image = _image(50, 40, seed=3)
    tiler = TiledSemSegInference(
        model, tile_size=32, stride=20, batch_size=3, blend="gaussian", margin=4
    )
    assert len(tiler.tiles(50, 40)[1]) == 3 * 2  # stride 20 -> 16 (pooling period 16)
    logits = tiler(image)
    for batch_size in (2, 4):  # a batch ends inside a row of tiles, or spans two rows
        tiler.batch_size = batch_size
        labels = tiler(image, output="labels")
        assert labels.dtype == torch.uint8 and labels.shape == (50, 40)
        assert torch.equal(labels.long(), logits.argmax(0))
    # zero padding at tile edges changes same-padding logits: tiling is really used here
    assert not torch.allclose(logits, _whole(model, image))


def test_tiles_equal_stitching_by_hand_and_band_wraps_around():
    # Reference: each tile cut with mirror_window, run alone, weighted and summed by hand in a
    # full (K, H, W) buffer. The tiler cuts tiles from one mirror-padded copy of the image and
    # keeps only a band of rows (a ring buffer): same logits, same labels.
    _, model = _model("UNetHead", "unet_same")
    image = _image(83, 45, seed=5)
    tiler = TiledSemSegInference(
        model, tile_size=32, stride=16, batch_size=3, blend="linear", margin=5
    )
    (th, tw), tiles = tiler.tiles(83, 45)
    ys, xs = sorted({y for y, _ in tiles}), sorted({x for _, x in tiles})
    assert ys == [0, 16, 32, 48, 64] and xs == [0, 16]  # the last row/column reach past the image
    band = tiler._band_rows(tiles, 3, th, 83)
    assert (
        band == 48
    )  # batches [(0,0),(0,16),(16,0)], [(16,16),(32,0),(32,16)], ...: 0..47 open at most
    w = blend_window(32, "linear")
    w2d = (w[:, None] * w[None, :]).float()
    acc, norm = torch.zeros(4, 83 + 32, 45 + 32), torch.zeros(83 + 32, 45 + 32)
    with torch.no_grad():
        for y, x in tiles:
            window = mirror_window(image, (y - 5, y + 32 + 5), (x - 5, x + 32 + 5))
            logits = model.sem_seg_logits(window[None], (5, 5, 5, 5))[0]
            acc[:, y : y + 32, x : x + 32] += logits * w2d
            norm[y : y + 32, x : x + 32] += w2d
    expected = (acc / norm)[:, :83, :45]
    logits = tiler(image)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(tiler(image, output="labels").long(), logits.argmax(0))


def test_tiling_config_errors_name_the_key():
    cfg, model = _model("UNetHead", "unet_same")
    cfg.TEST.TILING.TILE_SIZE, cfg.TEST.TILING.STRIDE = 32, 48
    with pytest.raises(Seg2Error, match="TEST.TILING.STRIDE=48"):
        TiledSemSegInference(cfg, model)
    cfg.TEST.TILING.STRIDE, cfg.TEST.TILING.BLEND = 16, "median"
    with pytest.raises(Seg2Error, match="TEST.TILING.BLEND='median'"):
        TiledSemSegInference(cfg, model)


def test_predictor_tiled_equals_whole_and_takes_gray_and_16bit():
    torch.manual_seed(0)
    cfg = tiny_semantic_cfg("UNetHead", "unet_same")
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 0, 4096  # native resolution
    whole = Seg2Predictor(cfg)
    cfg.TEST.TILING.ENABLED, cfg.TEST.TILING.TILE_SIZE, cfg.TEST.TILING.STRIDE = True, 64, 48
    tiled = Seg2Predictor(cfg)
    tiled.model.load_state_dict(whole.model.state_dict())
    gray = np.random.default_rng(0).integers(0, 256, (30, 41), dtype=np.uint8)
    ref = whole(np.repeat(gray[:, :, None], 3, axis=2))["sem_seg"]
    assert ref.shape == (4, 30, 41)
    assert torch.equal(tiled(gray)["sem_seg"], ref)
    assert torch.equal(
        tiled(gray.astype(np.uint16) * 257)["sem_seg"], ref
    )  # 16 bit, scaled back to 8
    assert torch.equal(tiled(gray, sem_seg_output="labels")["sem_seg_labels"].long(), ref.argmax(0))
    with pytest.raises(Seg2Error, match="shape"):
        tiled(np.zeros((4, 4, 2), np.uint8))


def test_predictor_tiled_multitask_keeps_whole_image_instances():
    torch.manual_seed(0)
    cfg = base_cfg("quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml")
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 0, 4096  # native resolution
    whole = Seg2Predictor(cfg)
    cfg.TEST.TILING.ENABLED, cfg.TEST.TILING.TILE_SIZE, cfg.TEST.TILING.STRIDE = True, 64, 64
    tiled = Seg2Predictor(cfg)
    tiled.model.load_state_dict(whole.model.state_dict())
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    ref, out = whole(image), tiled(image)
    assert len(ref["instances"]) > 0
    assert torch.equal(out["instances"].pred_boxes.tensor, ref["instances"].pred_boxes.tensor)
    assert torch.equal(out["instances"].pred_masks, ref["instances"].pred_masks)
    assert torch.equal(out["sem_seg"], ref["sem_seg"])  # one tile: the whole image's logits


def test_predictor_resizes_back_and_rejects_tiling_without_sem_seg():
    torch.manual_seed(0)
    cfg = tiny_semantic_cfg("FCNHead", "vgg")
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 64
    cfg.TEST.TILING.ENABLED, cfg.TEST.TILING.TILE_SIZE, cfg.TEST.TILING.STRIDE = True, 32, 32
    out = Seg2Predictor(cfg)(np.zeros((20, 30, 3), np.uint8))
    assert out["sem_seg"].shape == (4, 20, 30)
    cfg = base_cfg("quickstart/mask_rcnn_R18_FPN_shapes_cpu.yaml")
    cfg.TEST.TILING.ENABLED = True
    with pytest.raises(Seg2Error, match="TEST.TILING.ENABLED"):
        Seg2Predictor(cfg)
