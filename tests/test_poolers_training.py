"""Each pooler variant trains a few iterations of Mask R-CNN (FPN and C4 RoI heads) on seg2_shapes."""

import glob
import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import SimpleTrainer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_roi_heads
from detectron2.utils.env import seed_all_rng

import seg2
from seg2.data import MultiTaskDatasetMapper
from seg2.modeling.poolers import POOLER_AGGREGATIONS, ExtendedROIPooler

from seg2_model_helpers import import_tool, register_tiny_shapes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs", "pooler_ablation")
SHAPES_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "mask_rcnn_*_R18_FPN_shapes_cpu.yaml")))


TINY_TRAIN = "seg2_test_poolers_tiny_train"


@pytest.fixture(scope="module")
def tiny_shapes(tiny_shapes_root):
    """The tiny shapes training split under a name of this module's own (seg2_shapes_train stays
    as it is; re-pointing it would regenerate its cache at the default size)."""
    register_tiny_shapes(TINY_TRAIN, tiny_shapes_root, "train")
    # One thread: these models are tiny, and extra threads only spin on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_shapes_root
    torch.set_num_threads(threads)


def tiny_cfg(config_file, *opts):
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(
        [
            "INPUT.MIN_SIZE_TRAIN",
            (64,),
            "INPUT.MAX_SIZE_TRAIN",
            64,
            "SOLVER.IMS_PER_BATCH",
            2,
            "SOLVER.BASE_LR",
            0.01,
            "SOLVER.WARMUP_ITERS",
            0,
            "DATALOADER.NUM_WORKERS",
            0,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            16,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            32,
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
            100,
            "MODEL.BACKBONE.FREEZE_AT",
            0,
            "SEED",
            1,
            "DATASETS.TRAIN",
            (TINY_TRAIN,),
        ]  # fmt: skip
        + list(opts)
    )
    return cfg


def train_three_iterations(cfg):
    seed_all_rng(cfg.SEED)
    model = build_model(cfg)
    loader = build_detection_train_loader(cfg, mapper=MultiTaskDatasetMapper(cfg, True))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.SOLVER.BASE_LR, momentum=0.9)
    before = {k: v.detach().clone() for k, v in model.roi_heads.state_dict().items()}
    trainer = SimpleTrainer(model, loader, optimizer)
    trainer.train(0, 3)
    losses = trainer.storage.history("total_loss").values()
    after = model.roi_heads.state_dict()
    changed = [
        k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])
    ]
    return model, [v for v, _ in losses], trainer.storage.history("loss_mask").values(), changed


def expected_pooler(cfg):
    ptype = cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE
    return ptype, cfg.MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION or POOLER_AGGREGATIONS[ptype][0]


def test_there_is_one_shapes_config_per_variant():
    names = {os.path.basename(p).split("_R18")[0] for p in SHAPES_CONFIGS}
    variants = (
        "roipool",
        "roiwarp_max",
        "roiwarp_avg",
        "roialign_max",
        "roialign_avg",
        "roialignv2",
    )
    assert names == {f"mask_rcnn_{v}" for v in variants}


@pytest.mark.parametrize(
    "config_file", SHAPES_CONFIGS, ids=lambda p: os.path.basename(p).split("_R18")[0][10:]
)
def test_fpn_variant_trains(tiny_shapes, config_file):
    cfg = tiny_cfg(config_file)
    model, losses, mask_losses, changed = train_three_iterations(cfg)
    heads = model.roi_heads
    assert type(heads).__name__ == "ExtendedPoolerStandardROIHeads"
    for pooler in (heads.box_pooler, heads.mask_pooler):
        assert isinstance(pooler, ExtendedROIPooler)
        assert (pooler.pooler_type, pooler.aggregation) == expected_pooler(cfg)
        assert len(pooler.level_poolers) == 4  # p2..p5
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert len(mask_losses) == 3  # the mask head trained on pooled features every iteration
    assert any(k.startswith("mask_head.") for k in changed) and any(
        k.startswith("box_head.") for k in changed
    )


def test_c4_variant_trains(tiny_shapes):
    # R18-C4 with the shared Res5 pooler: RoIWarp, max of 2x2 samples.
    cfg = tiny_cfg(
        os.path.join(CONFIG_DIR, "mask_rcnn_roiwarp_max_R18_FPN_shapes_cpu.yaml"),
        "MODEL.BACKBONE.NAME", "build_resnet_backbone",
        "MODEL.RESNETS.OUT_FEATURES", ["res4"], "MODEL.RPN.IN_FEATURES", ["res4"],
        "MODEL.ROI_HEADS.IN_FEATURES", ["res4"], "MODEL.ROI_HEADS.NAME", "ExtendedPoolerRes5ROIHeads",
        "MODEL.ANCHOR_GENERATOR.SIZES", [[8, 16, 32]], "MODEL.RESNETS.WIDTH_PER_GROUP", 8,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 6, "MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION", "",
    )  # fmt: skip
    model, losses, mask_losses, changed = train_three_iterations(cfg)
    pooler = model.roi_heads.pooler
    assert isinstance(pooler, ExtendedROIPooler) and (pooler.pooler_type, pooler.aggregation) == (
        "ROIWarp",
        "max",
    )
    assert [p.spatial_scale for p in pooler.level_poolers] == [1 / 16]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and len(mask_losses) == 3
    assert any(k.startswith("res5.") for k in changed) and any(
        k.startswith("mask_head.") for k in changed
    )


def test_c4_rejects_a_mask_aggregation_it_cannot_use():
    cfg = tiny_cfg(
        os.path.join(CONFIG_DIR, "mask_rcnn_roialign_max_R18_FPN_shapes_cpu.yaml"),
        "MODEL.ROI_HEADS.IN_FEATURES", ["res4"], "MODEL.ROI_HEADS.NAME", "ExtendedPoolerRes5ROIHeads",
    )  # fmt: skip
    with pytest.raises(
        seg2.Seg2Error, match="MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION='max' has no effect"
    ):
        build_roi_heads(cfg, {"res4": ShapeSpec(channels=256, stride=16)})


def test_ablation_tool_refuses_variants_trained_differently(tmp_path):
    tool = import_tool("ablation.runner")

    pool, align = SHAPES_CONFIGS[3], SHAPES_CONFIGS[0]  # roipool, roialign_avg
    same = {
        n: tool.variant_cfg(p, [], str(tmp_path), seed=1)
        for n, p in (("pool", pool), ("align", align))
    }
    assert tool.detect_study(same) == "poolers"
    tool.check_same_protocol(same)  # only pooler keys differ
    assert same["pool"].OUTPUT_DIR == os.path.join(
        str(tmp_path), os.path.basename(pool)[:-5], "seed1"
    )
    other = dict(
        same, align=tool.variant_cfg(align, ["SOLVER.MAX_ITER", "10"], str(tmp_path), seed=1)
    )
    with pytest.raises(seg2.Seg2Error, match=r"SOLVER.MAX_ITER: 10 vs 300"):
        tool.check_same_protocol(other)


def test_ablation_tool_reads_the_last_session_of_a_resumed_run(tmp_path):
    tool = import_tool("ablation.runner")

    # a first session stopped at iteration 59; the restart from scratch reached 99
    records = [
        (19, 9.0),
        (39, 9.0),
        (59, 9.0),
        (19, 1.0),
        (39, 2.0),
        (59, 3.0),
        (79, 4.0),
        (99, 5.0),
    ]
    with open(tmp_path / "metrics.json", "w") as f:
        for it, t in records:
            f.write(f'{{"iteration": {it}, "time": {t}}}\n')
    assert tool.train_s_per_iter(str(tmp_path)) == 3.0  # median of 1..5
