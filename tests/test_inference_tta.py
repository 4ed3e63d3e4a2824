"""Semantic test-time augmentation (seg2.inference.tta) on tiny models: identity TTA is the plain
output, flip and multi-scale TTA are the averages computed by hand, each scale can be tiled, the
multi-task model keeps detectron2's instance TTA, and the Trainer evaluates with it."""

import os

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.modeling import GeneralizedRCNNWithTTA, build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess

from seg2 import Seg2Error
from seg2.engine import Trainer
from seg2.inference import (
    MultiTaskRCNNWithTTA,
    Seg2Predictor,
    SemanticSegmentorWithTTA,
    TiledSemSegInference,
    build_tta_model,
)

from seg2_model_helpers import base_cfg, register_tiny_shapes, tiny_semantic_cfg


def _image(h, w, seed=0):
    return torch.randint(
        0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _semantic(seed=0):
    torch.manual_seed(seed)
    cfg = tiny_semantic_cfg("UNetHead", "unet_same")
    return cfg, build_model(cfg).eval()


def _aug(cfg, min_sizes, flip, max_size=1000):
    cfg.TEST.AUG.ENABLED, cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE, cfg.TEST.AUG.FLIP = (
        True,
        min_sizes,
        max_size,
        flip,
    )
    cfg.TEST.AUG.SCALE_RATIOS = ()  # sizes in pixels (detectron2's keys)
    return cfg


def _plain(model, image, height, width):
    with torch.no_grad():
        return model([{"image": image, "height": height, "width": width}])[0]["sem_seg"]


def _resized(image, min_size, max_size=1000):
    hwc = image.permute(1, 2, 0).numpy()
    out = T.ResizeShortestEdge(min_size, max_size).get_transform(hwc).apply_image(hwc)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


@pytest.mark.parametrize("size", [(37, 50), (74, 100)])
def test_identity_tta_is_the_plain_output(size):
    # One scale (the image's own short side), no flip: bit for bit the model's output, also when
    # the output is resized to another "height" x "width".
    cfg, model = _semantic()
    tta = build_tta_model(_aug(cfg, (37,), False), model)
    assert isinstance(tta, SemanticSegmentorWithTTA)
    image = _image(37, 50)
    out = tta([{"image": image, "height": size[0], "width": size[1]}])[0]["sem_seg"]
    assert torch.equal(out, _plain(model, image, *size))


def test_flip_tta_is_the_average_by_hand():
    cfg, model = _semantic(1)
    tta = SemanticSegmentorWithTTA(_aug(cfg, (37,), True), model)
    image = _image(37, 50, seed=1)
    out = tta([{"image": image, "height": 37, "width": 50}])[0]["sem_seg"]
    flipped = _plain(model, image.flip(-1).contiguous(), 37, 50).flip(-1)
    expected = (_plain(model, image, 37, 50) + flipped) / 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, _plain(model, image, 37, 50))  # the flip changed something


def test_multi_scale_flip_tta_is_the_average_by_hand():
    cfg, model = _semantic(2)
    tta = build_tta_model(_aug(cfg, (30, 37, 45), True, max_size=60), model)
    image = _image(37, 50, seed=2)
    out = tta([{"image": image, "height": 37, "width": 50}])[0]["sem_seg"]
    expected = torch.zeros_like(out)
    for s in (30, 37, 45):
        x = _resized(image, s, 60)
        assert x.shape[-1] <= 60  # 45 would be 60.8 wide: MAX_SIZE makes it 44 x 60
        expected += _plain(model, x, 37, 50) + _plain(model, x.flip(-1).contiguous(), 37, 50).flip(
            -1
        )
    torch.testing.assert_close(out, expected / 6, rtol=1e-5, atol=1e-5)


def test_tta_tiles_each_scale():
    """Tiling is the model's inference mode: TTA of a model built with TEST.TILING tiles every
    augmented scale."""
    cfg, whole_model = _semantic(3)
    _aug(cfg, (40, 56), True)
    cfg.TEST.TILING.ENABLED, cfg.TEST.TILING.TILE_SIZE, cfg.TEST.TILING.STRIDE = True, 32, 16
    cfg.TEST.TILING.BLEND, cfg.TEST.TILING.BATCH_SIZE = "linear", 2
    model = build_model(cfg).eval()
    model.load_state_dict(whole_model.state_dict())
    assert isinstance(model.tiler, TiledSemSegInference)
    tta = build_tta_model(cfg, model)
    image = _image(40, 52, seed=3)
    out = tta([{"image": image, "height": 40, "width": 52}])[0]["sem_seg"]
    tiler = TiledSemSegInference(model, tile_size=32, stride=16, batch_size=2, blend="linear")
    expected = torch.zeros_like(out)
    for s in (40, 56):
        x = _resized(image, s)
        assert len(tiler.tiles(*x.shape[-2:])[1]) > 1  # really tiled
        for flip in (False, True):
            logits = tiler(x.flip(-1).contiguous() if flip else x)
            expected += sem_seg_postprocess(
                logits.flip(-1) if flip else logits, x.shape[-2:], 40, 52
            )
    torch.testing.assert_close(out, expected / 4, rtol=1e-5, atol=1e-5)
    # tiles differ from whole images here: the tiled TTA is not the untiled one
    untiled = build_tta_model(cfg, whole_model)([{"image": image, "height": 40, "width": 52}])[0][
        "sem_seg"
    ]
    assert not torch.allclose(out, untiled)


def test_tta_scale_ratios_are_relative_to_the_test_size():
    """TEST.AUG.SCALE_RATIOS scale the test size (MMSegmentation's img_ratios): a 40-px test
    size gives 20..70-px scales, not detectron2's 400-1200-px COCO scales; giving both
    SCALE_RATIOS and MIN_SIZES is an error naming both keys."""
    cfg, model = _semantic(1)
    cfg.TEST.AUG.ENABLED, cfg.TEST.AUG.FLIP = True, False
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 40, 1000
    tta = build_tta_model(cfg, model)
    image = _image(40, 52, seed=2)
    sizes = [
        tuple(x["image"].shape[-2:])
        for x in tta.tta_mapper({"image": image, "height": 40, "width": 52})
    ]
    # 40 x 52 at ratios 0.5 .. 1.75, rounded as int(x + 0.5)
    assert sizes == [(20, 26), (30, 39), (40, 52), (50, 65), (60, 78), (70, 91)]
    cfg.INPUT.MIN_SIZE_TEST = 0  # native resolution: ratios of the image's own size
    cfg.TEST.AUG.SCALE_RATIOS = (1.0, 2.0)
    tta = build_tta_model(cfg, model)
    sizes = [
        tuple(x["image"].shape[-2:])
        for x in tta.tta_mapper({"image": image, "height": 40, "width": 52})
    ]
    assert sizes == [(40, 52), (80, 104)]
    cfg.TEST.AUG.MIN_SIZES = (288, 360)
    with pytest.raises(Seg2Error, match="TEST.AUG.SCALE_RATIOS=.*TEST.AUG.MIN_SIZES=.*both"):
        build_tta_model(cfg, model)


def test_multitask_tta_instances_by_detectron2_and_semantic_by_seg2():
    torch.manual_seed(0)
    cfg = base_cfg("quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml")
    model = build_model(cfg).eval()
    tta = build_tta_model(_aug(cfg, (64,), False), model)
    assert isinstance(tta, MultiTaskRCNNWithTTA) and isinstance(tta, GeneralizedRCNNWithTTA)
    image = _image(64, 80, seed=4)
    out = tta([{"image": image, "height": 64, "width": 80}])[0]
    with torch.no_grad():
        plain = model([{"image": image, "height": 64, "width": 80}])[0]
    assert torch.equal(out["sem_seg"], plain["sem_seg"])  # identity TTA of the semantic branch
    inst = out["instances"]
    assert (
        inst.image_size == (64, 80)
        and inst.has("pred_masks")
        and inst.pred_masks.shape[-2:] == (64, 80)
    )
    assert len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE


def test_tta_config_errors():
    cfg, model = _semantic()
    with pytest.raises(Seg2Error, match=r"TEST.AUG.MIN_SIZES=\(\)"):
        build_tta_model(_aug(cfg, (), True), model)


def test_trainer_evaluates_with_tta(tiny_shapes_root, tmp_path):
    for split in ("train", "val"):
        register_tiny_shapes(f"seg2_test_tta_{split}", tiny_shapes_root, split)
    cfg, model = _semantic(5)
    cfg.DATASETS.TEST = ("seg2_test_tta_val",)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 64
    cfg.DATALOADER.NUM_WORKERS, cfg.OUTPUT_DIR = 0, str(tmp_path)
    plain = Trainer.test(cfg, model)
    identity = Trainer.test_with_TTA(_aug(cfg, (64,), False, max_size=64), model)
    assert set(identity) == {"sem_seg_TTA"} and identity["sem_seg_TTA"] == plain["sem_seg"]
    flip = Trainer.test_with_TTA(_aug(cfg, (48, 64), True, max_size=64), model)
    assert 0.0 <= flip["sem_seg_TTA"]["mIoU"] <= 100.0 and flip["sem_seg_TTA"] != plain["sem_seg"]
    assert os.path.isdir(tmp_path / "inference_TTA" / "seg2_test_tta_val")


def test_predictor_with_tta():
    torch.manual_seed(6)
    cfg = tiny_semantic_cfg("UNetHead", "unet_same")
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 40, 1000
    plain = Seg2Predictor(cfg)
    bgr = np.random.default_rng(6).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    ref = plain(bgr)["sem_seg"]
    identity = Seg2Predictor(_aug(cfg.clone(), (40,), False))
    identity.model.load_state_dict(plain.model.state_dict())
    assert torch.equal(identity(bgr)["sem_seg"], ref)
    flip = Seg2Predictor(_aug(cfg.clone(), (40,), True))
    flip.model.load_state_dict(plain.model.state_dict())
    by_hand = (ref + plain(np.ascontiguousarray(bgr[:, ::-1]))["sem_seg"].flip(-1)) / 2
    torch.testing.assert_close(flip(bgr)["sem_seg"], by_hand, rtol=1e-5, atol=1e-5)
