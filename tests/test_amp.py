"""SOLVER.AMP.ENABLED on the CPU: bfloat16 autocast steps for every head family, SegNet-Basic, the
multi-task models and Mask R-CNN; seg2's Trainer picks Seg2AMPTrainer."""

import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import seg2
from seg2.engine import Seg2AMPTrainer, Trainer

from seg2_model_helpers import (
    CONFIGS,
    base_cfg,
    load_records,
    mapped_inputs,
    register_tiny_shapes,
    tiny_semantic_cfg,
)  # noqa: F401

# One model per semantic head family (SegNet with max-unpooling on VGG's indices), and the
# multi-task Mask R-CNN with an FCN-8s and a U-Net head.
FAMILIES = [
    ("FCNHead", "vgg"),
    ("UNetHead", "unet_same"),
    ("SegNetHead", "vgg"),
    ("Seg2DeepLabV3PlusHead", "resnet"),
]
# ... and Mask R-CNN alone with seg2's RoIWarp-max pooler (max over roi_align samples).
RCNN = [
    "quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml",
    "quickstart/mask_rcnn_R18_FPN_unet_shapes_cpu.yaml",
    "pooler_ablation/mask_rcnn_roiwarp_max_R18_FPN_shapes_cpu.yaml",
]


def _semantic_batch(num_classes=4, n=2, size=64):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(3, size, size, generator=g) * 255,
            "sem_seg": torch.randint(0, num_classes, (size, size), generator=g),
        }
        for _ in range(n)
    ]


def _amp_steps(model, batch, steps=2, lr=0.01):
    """``steps`` iterations of Seg2AMPTrainer on ``batch``; returns (per-step loss dicts, dtypes
    of every conv output in the forward passes, parameters before)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    trainer = Seg2AMPTrainer(model, iter([batch] * steps), optimizer)
    assert trainer.precision == torch.bfloat16 and not trainer.grad_scaler.is_enabled()
    conv_dtypes, loss_dicts = set(), []
    hooks = [m.register_forward_hook(lambda m, i, o: conv_dtypes.add(o.dtype)) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d)]  # fmt: skip
    hooks.append(model.register_forward_hook(lambda m, i, o: loss_dicts.append(o)))
    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    trainer.train(0, steps)
    for h in hooks:
        h.remove()
    return loss_dicts, conv_dtypes, before


@pytest.mark.parametrize("head,backbone", FAMILIES, ids=[h for h, _ in FAMILIES])
def test_semantic_head_trains_under_bf16_autocast(head, backbone):
    cfg = tiny_semantic_cfg(head, backbone)
    torch.manual_seed(0)
    model = build_model(cfg)
    loss_dicts, conv_dtypes, before = _amp_steps(model, _semantic_batch())
    assert torch.bfloat16 in conv_dtypes  # the convolutions ran in bfloat16
    for losses in loss_dicts:
        assert losses["loss_sem_seg"].dtype == torch.float32  # seg2's loss in float32
        assert torch.isfinite(losses["loss_sem_seg"])
    changed = [
        k
        for k, p in model.named_parameters()
        if k in before and not torch.equal(before[k], p.detach())
    ]
    assert any(k.startswith("sem_seg_head.") for k in changed) and any(
        k.startswith("backbone.") for k in changed
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32


def test_every_loss_term_is_float32_and_finite_under_autocast():
    cfg = tiny_semantic_cfg("SegNetHead", "vgg")
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "cross_entropy+hard_pixel_mining+focal+dice+lovasz"
    torch.manual_seed(0)
    model = build_model(cfg)
    loss_dicts, _, _ = _amp_steps(model, _semantic_batch(), steps=1)
    (losses,) = loss_dicts
    assert losses["loss_sem_seg"].dtype == torch.float32 and torch.isfinite(losses["loss_sem_seg"])
    # The loss ignores autocast: on given float32 logits it equals its value outside autocast
    # (CPU autocast would otherwise run the softmax of focal, Dice and Lovasz in bfloat16).
    loss_fn = model.sem_seg_head.loss
    logits = torch.randn(2, 4, 16, 16)
    targets = torch.randint(0, 4, (2, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_value = loss_fn(logits, targets)
    assert amp_value.dtype == torch.float32
    assert torch.equal(amp_value, loss_fn(logits, targets))


def test_segnet_basic_trains_under_bf16_autocast():
    """SegNet-Basic (input LRN, 7x7 convs, max-unpooling) at 16 channels instead of 64."""
    cfg = base_cfg(
        "camvid/segnet-basic-tutorial-weights_10k_camvid.yaml"
    )  # fixed weights: no data read
    cfg.MODEL.SEGNET_BASIC.CHANNELS = 16
    torch.manual_seed(0)
    model = build_model(cfg)
    loss_dicts, conv_dtypes, before = _amp_steps(model, _semantic_batch(num_classes=11, size=48))
    assert torch.bfloat16 in conv_dtypes
    assert all(
        torch.isfinite(d["loss_sem_seg"]) and d["loss_sem_seg"].dtype == torch.float32
        for d in loss_dicts
    )
    assert any(
        not torch.equal(before[k], p.detach()) for k, p in model.named_parameters() if k in before
    )


@pytest.mark.parametrize("config", RCNN, ids=lambda c: os.path.basename(c))
def test_rcnn_models_train_under_bf16_autocast(config, tiny_shapes_root):
    cfg = base_cfg(config)
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 32, 64
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = mapped_inputs(cfg, load_records(tiny_shapes_root)[:2])
    loss_dicts, conv_dtypes, before = _amp_steps(model, batch)
    assert torch.bfloat16 in conv_dtypes
    multitask = hasattr(model, "sem_seg_head")
    for losses in loss_dicts:
        assert {"loss_rpn_cls", "loss_cls", "loss_box_reg", "loss_mask"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        assert not multitask or losses["loss_sem_seg"].dtype == torch.float32
    changed = {
        k.split(".")[0]
        for k, p in model.named_parameters()
        if k in before and not torch.equal(before[k], p.detach())
    }
    assert {"backbone", "roi_heads", "proposal_generator"} | (
        {"sem_seg_head"} if multitask else set()
    ) <= changed


def test_trainer_with_amp_enabled_trains_on_the_cpu(tiny_shapes_root, tmp_path):
    """seg2's Trainer (tools/train_net.py) with SOLVER.AMP.ENABLED on the CPU: detectron2's
    AMPTrainer would assert CUDA; seg2's runs the steps in bfloat16 autocast."""
    for split in ("train", "val"):
        register_tiny_shapes(f"seg2_test_amp_{split}", tiny_shapes_root, split)
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.merge_from_file(
        os.path.join(CONFIGS, "quickstart", "mask_rcnn_R18_FPN_unet_shapes_cpu.yaml")
    )
    cfg.merge_from_list([
        "SOLVER.AMP.ENABLED", True, "DATASETS.TRAIN", ("seg2_test_amp_train",), "DATASETS.TEST", (),
        "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.MAX_ITER", 2, "DATALOADER.NUM_WORKERS", 0, "SEG2.BEST_CHECKPOINT.METRIC", "",
        "SEG2.BEST_CHECKPOINT.METRICS", [],
        "SEG2.BEST_CHECKPOINT.WEIGHTS", [],
        "TEST.EVAL_PERIOD", 0, "OUTPUT_DIR", str(tmp_path), "MODEL.DEVICE", "cpu",
    ])  # fmt: skip
    trainer = Trainer(cfg)
    assert (
        isinstance(trainer._trainer, Seg2AMPTrainer)
        and trainer._trainer.precision == torch.bfloat16
    )
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
