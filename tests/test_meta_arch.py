"""seg2's meta-architectures: overlap-tile, the multi-task model, and build-time errors."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.utils.events import EventStorage

import seg2
from seg2.modeling import META_ARCH_TASKS, model_tasks
from seg2.modeling.tiling import mirror_window

from seg2_model_helpers import base_cfg, load_records, mapped_inputs, one_thread, tiny_semantic_cfg  # noqa: F401


def test_tasks_registered():
    assert META_ARCH_TASKS["Seg2SemanticSegmentor"] == frozenset({"sem_seg"})
    assert META_ARCH_TASKS["Seg2MultiTaskRCNN"] == frozenset({"instances", "sem_seg"})
    cfg = base_cfg("quickstart/mask_rcnn_R18_FPN_unet_shapes_cpu.yaml")
    assert model_tasks(cfg) == {"instances", "sem_seg"}


# ---- overlap-tile ------------------------------------------------------------------------------
def test_mirror_window_reflects_and_repeats():
    x = torch.arange(4.0).view(1, 1, 1, 4)
    out = mirror_window(
        x, (0, 1), (-2, 9)
    )  # right padding larger than the map: the reflection repeats
    assert out.flatten().tolist() == [2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2]


def test_valid_unet_overlap_tile_covers_the_image():
    torch.manual_seed(0)
    model = build_model(tiny_semantic_cfg("UNetHead", "unet_valid"))  # 3 levels, unpadded convs
    assert model.overlap_tile
    # 3 levels of two unpadded 3x3 convs: margin 2*(1+2) + 2*4 + 2*(2+1) = 20 per side.
    p, margin = model.tile_geometry(40)
    assert margin == 20 and p == 80
    model.eval()
    image = torch.randint(0, 256, (3, 40, 37), dtype=torch.uint8)
    with torch.no_grad():
        out = model([{"image": image}])[0]["sem_seg"]
    assert out.shape == (4, 40, 37)
    # The output is the network applied to the mirror-padded image: recompute it by hand.
    x = (image.float() - model.pixel_mean) / model.pixel_std
    ph, mh = model.tile_geometry(40)
    padded = mirror_window(x[None], (-mh, ph - mh), (-mh, ph - mh))
    with torch.no_grad():
        direct = model.sem_seg_head(model.backbone(padded))[0][0]
    torch.testing.assert_close(out, direct[:, :40, :37])


def test_sem_seg_logits_context_and_mixed_size_batches():
    torch.manual_seed(0)
    model = build_model(tiny_semantic_cfg("UNetHead", "unet_same")).eval()  # size divisibility 16
    images = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
        for h, w in [(40, 37), (33, 50), (40, 37)]
    ]
    assert model.tile_geometry(40) == (40, 0)  # "same" padding: no context needed
    with torch.no_grad():
        whole = model.sem_seg_logits(images[0][None])
        assert whole.shape == (1, 4, 40, 37)
        # context pixels are seen by the network but cropped: the same network input, a crop
        inner = model.sem_seg_logits(images[0][None], context=(3, 5, 0, 7))
        assert torch.equal(inner, whole[:, :, 3:35, 0:30])
        with pytest.raises(ValueError, match="context"):
            model.sem_seg_logits(images[0][None], context=(20, 20, 0, 0))
        # a mixed-size batch: an image's logits do not depend on the others' sizes
        batch = model([{"image": im} for im in images])
        alone = [model([{"image": im}])[0]["sem_seg"] for im in images]
    assert torch.equal(batch[1]["sem_seg"], alone[1]) and torch.equal(alone[0], whole[0])
    for out, ref in zip(batch, alone):
        torch.testing.assert_close(
            out["sem_seg"], ref, rtol=1e-5, atol=1e-5
        )  # batched with a twin: rounding


# ---- the multi-task model ----------------------------------------------------------------------
def _tiny_multitask_cfg(config="quickstart/mask_rcnn_R18_FPN_unet_shapes_cpu.yaml"):
    cfg = base_cfg(config)
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 64
    return cfg


@pytest.mark.parametrize(
    "config",
    [
        "quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml",
        "quickstart/mask_rcnn_R18_FPN_unet_shapes_cpu.yaml",
        "quickstart/mask_rcnn_R18_FPN_deeplabv3plus_shapes_cpu.yaml",
    ],
)
def test_multitask_trains_and_returns_both_outputs(tiny_shapes_root, config):
    torch.manual_seed(0)
    cfg = _tiny_multitask_cfg(config)
    model = build_model(cfg)
    inputs = mapped_inputs(cfg, load_records(tiny_shapes_root)[:2], size=64)
    assert all("instances" in x and "sem_seg" in x for x in inputs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    with EventStorage(0):
        for _ in range(3):
            losses = model(inputs)
            assert {"loss_sem_seg", "loss_rpn_cls", "loss_cls", "loss_mask"} <= set(losses)
            assert all(torch.isfinite(v) for v in losses.values())
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        out = model([{"image": x["image"], "height": 80, "width": 70} for x in inputs])
    assert set(out[0]) == {"instances", "sem_seg"}
    assert out[0]["sem_seg"].shape == (4, 80, 70)
    assert out[0]["instances"].image_size == (80, 70)


def test_multitask_batches_with_one_target_train(tiny_shapes_root):
    torch.manual_seed(0)
    cfg = _tiny_multitask_cfg(
        "quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml"
    )  # a head without BN
    model = build_model(cfg)
    inputs = mapped_inputs(cfg, load_records(tiny_shapes_root)[:2], size=64)
    no_sem = [{k: v for k, v in x.items() if k != "sem_seg"} for x in inputs]
    no_inst = [{k: v for k, v in x.items() if k != "instances"} for x in inputs]
    mixed = [no_sem[0], no_inst[1]]
    model.train()
    head_params = list(model.sem_seg_head.parameters())
    rpn_params = list(model.proposal_generator.parameters())
    with EventStorage(0):
        for batch, expect_sem, expect_inst in [
            (no_sem, False, True),
            (no_inst, True, False),
            (mixed, True, True),
        ]:
            model.zero_grad(set_to_none=True)
            losses = model(batch)
            assert ("loss_sem_seg" in losses) == expect_sem
            assert ("loss_rpn_cls" in losses and "loss_mask" in losses) == expect_inst
            sum(losses.values()).backward()
            # The skipped task's parameters get no gradient at all (its loss is not faked as 0 * x).
            assert any(p.grad is not None for p in head_params) == expect_sem
            assert any(p.grad is not None for p in rpn_params) == expect_inst

    # The mixed batch's semantic loss is that of the one image with a map, alone.
    model.eval()  # BN on running statistics, so the two computations match
    model.sem_seg_head.train()  # the head (no BN) computes its loss in training mode
    with EventStorage(0):
        features = model.backbone(model.preprocess_image(mixed).tensor)
        t = torch.full(features["p2"].shape[:1] + (64, 64), 255, dtype=torch.long)
        t[1, : inputs[1]["sem_seg"].shape[0], : inputs[1]["sem_seg"].shape[1]] = inputs[1][
            "sem_seg"
        ]
        _, both = model.sem_seg_head(features, t)
        alone_features = {k: v[1:] for k, v in features.items()}
        _, alone = model.sem_seg_head(alone_features, t[1:])
    torch.testing.assert_close(both["loss_sem_seg"], alone["loss_sem_seg"])


def test_multitask_inference_parts_match_the_whole():
    torch.manual_seed(0)
    cfg = _tiny_multitask_cfg("quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml")
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 48, 60), dtype=torch.uint8)
    inputs = [{"image": image, "height": 96, "width": 120}]
    with torch.no_grad():
        full = model(inputs)[0]
        detection = model.inference(inputs, sem_seg=False)[0]
        logits = model.sem_seg_logits(image[None])
        given = model.inference(
            inputs, detected_instances=[model.inference(inputs, do_postprocess=False)[0][0]]
        )[0]
    assert len(full["instances"]) > 0 and set(detection) == {"instances"}
    for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        a, b = full["instances"].get(field), detection["instances"].get(field)
        assert torch.equal(
            a.tensor if field == "pred_boxes" else a, b.tensor if field == "pred_boxes" else b
        )
    # the semantic branch alone, resized as inference resizes it to height x width
    assert logits.shape == (1, 4, 48, 60)
    torch.testing.assert_close(
        sem_seg_postprocess(logits[0], (48, 60), 96, 120), full["sem_seg"], rtol=0, atol=0
    )
    # given boxes: the RoI heads predict masks for exactly those boxes
    assert torch.equal(given["instances"].pred_boxes.tensor, full["instances"].pred_boxes.tensor)
    assert torch.equal(given["instances"].pred_masks, full["instances"].pred_masks)


def test_multitask_rejects_valid_padding():
    cfg = _tiny_multitask_cfg()
    cfg.MODEL.UNET_HEAD.PADDING = "valid"
    with pytest.raises(seg2.Seg2Error, match="PADDING"):
        build_model(cfg)


# ---- bad input: clear errors at build time, naming the config key
# ----------------------------------
def _fcn_cfg():
    return tiny_semantic_cfg("FCNHead", "vgg")


@pytest.mark.parametrize(
    "edit,key",
    [
        (lambda c: setattr(c.MODEL.SEM_SEG_HEAD, "NAME", "NoSuchHead"), "MODEL.SEM_SEG_HEAD.NAME"),
        (
            lambda c: setattr(c.MODEL.BACKBONE, "NAME", "build_no_such_backbone"),
            "MODEL.BACKBONE.NAME",
        ),
        (
            lambda c: setattr(c.MODEL.SEM_SEG_HEAD, "IN_FEATURES", ["pool3", "res4"]),
            "MODEL.SEM_SEG_HEAD.IN_FEATURES",
        ),
        (lambda c: setattr(c.MODEL.FCN_HEAD, "UPSAMPLE", "cubic"), "MODEL.FCN_HEAD.UPSAMPLE"),
        (lambda c: setattr(c.MODEL.VGG, "OUT_FEATURES", ["pool9"]), "MODEL.VGG"),
    ],
)
def test_bad_config_names_the_key(edit, key):
    cfg = _fcn_cfg()
    edit(cfg)
    with pytest.raises(seg2.Seg2Error, match=key.replace(".", r"\.")):
        build_model(cfg)


def test_segnet_unpool_without_indices_is_an_error():
    cfg = tiny_semantic_cfg("SegNetHead", "resnet")
    cfg.MODEL.SEGNET_HEAD.UPSAMPLE = "unpool"
    with pytest.raises(
        seg2.Seg2Error, match=r"MODEL\.SEGNET_HEAD\.UPSAMPLE='unpool' needs pooling indices"
    ):
        build_model(cfg)


def test_num_classes_mismatch_with_dataset_metadata():
    cfg = _fcn_cfg()
    cfg.DATASETS.TRAIN = ("seg2_shapes_train",)  # 4 stuff_classes
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 21
    # The resolve step checks the config against the datasets, before anything is built.
    with pytest.raises(
        seg2.Seg2Error,
        match=r"MODEL\.SEM_SEG_HEAD\.NUM_CLASSES=21 but dataset 'seg2_shapes_train' has 4",
    ):
        seg2.resolve_config(cfg)
    cfg = _tiny_multitask_cfg()
    cfg.DATASETS.TRAIN = ("seg2_shapes_train",)  # 3 thing_classes
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    with pytest.raises(seg2.Seg2Error, match=r"MODEL\.ROI_HEADS\.NUM_CLASSES=80"):
        seg2.resolve_config(cfg)
