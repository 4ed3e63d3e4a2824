"""One key per setting: detectron2's keys where it has one; old seg2 keys are errors naming the new."""

import glob
import os
import re

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import seg2
from seg2.data import register_dataset

from seg2_model_helpers import CONFIGS, base_cfg, tiny_semantic_cfg

# old key -> the key that replaced it
RENAMED = {
    "SEG2.INPUT.IGNORE_LABEL": "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",
    "SEG2.INPUT.SINGLE_CATEGORY_MAX_AREA": "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA",
    "SEG2.INPUT.NUM_SEM_SEG_CLASSES": "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
    "SEG2.ROI_POOLER.BOX_AGGREGATION": "MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION",
    "SEG2.ROI_POOLER.MASK_AGGREGATION": "MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION",
    # Issue 22: seg2's keys that have a natural home on detectron2's nodes moved there.
    "SEG2.INPUT.PAD_TO_CROP_SIZE": "INPUT.CROP.PAD_TO_SIZE",
    "SEG2.DATALOADER.MAX_BAD_SAMPLE_SHARE": "DATALOADER.MAX_BAD_SAMPLE_SHARE",
    "SEG2.SOLVER.NORM_BIAS_HYPERPARAMS": "SOLVER.NORM_BIAS_HYPERPARAMS",
    "SEG2.TILING.ENABLED": "TEST.TILING.ENABLED",
    "SEG2.TILING.TILE_SIZE": "TEST.TILING.TILE_SIZE",
    "SEG2.TILING.STRIDE": "TEST.TILING.STRIDE",
}
OLD_VALUES = {
    "IGNORE_LABEL": 0,
    "SINGLE_CATEGORY_MAX_AREA": 0.5,
    "NUM_SEM_SEG_CLASSES": 4,
    "PAD_TO_CROP_SIZE": True,
    "MAX_BAD_SAMPLE_SHARE": 0.1,
    "NORM_BIAS_HYPERPARAMS": repr("norm"),
    "ENABLED": True,
    "TILE_SIZE": 64,
    "STRIDE": 32,
}
BASE = os.path.join(CONFIGS, "quickstart", "unet_tiny_shapes_cpu.yaml")


def _yaml(path, old_key):
    """A config on BASE that sets ``old_key`` the way a YAML file nests it."""
    *nodes, leaf = old_key.split(".")
    lines = [f'_BASE_: "{BASE}"']
    lines += [" " * 2 * i + f"{node}:" for i, node in enumerate(nodes)]
    lines.append(" " * 2 * len(nodes) + f"{leaf}: {OLD_VALUES.get(leaf, repr('max'))}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_old_key_in_a_yaml_file_names_its_replacement(tmp_path, old):
    path = _yaml(tmp_path / "old.yaml", old)
    with pytest.raises(seg2.Seg2Error) as e:
        seg2.load_seg2_config(path)
    message = str(e.value)
    new = RENAMED[old]
    assert path in message and (
        new in message
        or (
            old.startswith("SEG2.TILING.")
            and "SEG2.TILING.<KEY> is now TEST.TILING.<KEY>" in message
        )
    )
    # yacs meets a removed node before its leaves: the message names the node and the new keys.
    reported = ".".join(old.split(".")[:2])
    assert f"Key {reported} was renamed to" in message
    if reported == "SEG2.ROI_POOLER":
        assert (
            "MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION" in message
            and "MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION" in message
        )


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_old_key_in_overrides_names_its_replacement(old):
    with pytest.raises(
        seg2.Seg2Error, match=rf"{re.escape(BASE)}.*Key {old} was renamed to {RENAMED[old]}"
    ):
        seg2.load_seg2_config(BASE, [old, "1"])
    # Without load_seg2_config: yacs' own KeyError, on a clone as on the original.
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    seg2.add_seg2_config(cfg)  # adding the keys twice registers the old names once
    with pytest.raises(KeyError, match=RENAMED[old]):
        cfg.clone().merge_from_list([old, "1"])


def test_new_keys_take_values():
    cfg = seg2.load_seg2_config(BASE, [
        "MODEL.SEM_SEG_HEAD.IGNORE_VALUE", "254", "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA", "0.75",
        "MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION", "max", "MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION", "avg",
    ])  # fmt: skip
    assert (
        cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE == 254
        and cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA == 0.75
    )
    assert (
        cfg.MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION,
        cfg.MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION,
    ) == ("max", "avg")
    assert "INPUT" not in cfg.SEG2 and "ROI_POOLER" not in cfg.SEG2 and "TILING" not in cfg.SEG2


def test_every_shipped_config_loads():
    files = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))
    assert len(files) > 40
    for path in files:
        seg2.load_seg2_config(path)
    semantic = seg2.load_seg2_config(os.path.join(CONFIGS, "Base-Seg2-Semantic.yaml"))
    assert semantic.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA == 0.75
    roiwarp = seg2.load_seg2_config(
        os.path.join(CONFIGS, "pooler_ablation", "mask_rcnn_roiwarp_max_R50_FPN_1x_coco.yaml")
    )
    assert (
        roiwarp.MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION,
        roiwarp.MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION,
    ) == ("max", "max")


@pytest.fixture(scope="module")
def dataset_ignoring_zero():
    name = "t_config_keys_ignore_zero"
    meta = {
        "stuff_classes": ["a", "b", "c", "d"],
        "thing_classes": ["b", "c", "d"],
        "ignore_label": 0,
    }
    return register_dataset(name, lambda: [], meta)


def test_resolve_step_checks_the_datasets_ignore_label(dataset_ignoring_zero):
    expected = rf"dataset '{dataset_ignoring_zero}' has ignore_label=0 .*MODEL.SEM_SEG_HEAD.IGNORE_VALUE=255"
    cfg = tiny_semantic_cfg("FCNHead", "vgg")
    cfg.DATASETS.TEST = (dataset_ignoring_zero,)
    with pytest.raises(seg2.Seg2Error, match=expected):
        seg2.resolve_config(cfg)
    cfg = base_cfg("quickstart/mask_rcnn_R18_FPN_unet_shapes_cpu.yaml")
    cfg.DATASETS.TRAIN = (dataset_ignoring_zero,)
    with pytest.raises(seg2.Seg2Error, match=expected):
        seg2.resolve_config(cfg)
    cfg = tiny_semantic_cfg("FCNHead", "vgg")
    cfg.DATASETS.TRAIN = ("seg2_shapes_train",)  # ignore_label 255, as every seg2 dataset
    assert build_model(seg2.resolve_config(cfg)).sem_seg_head.ignore_value == 255


def test_unknown_head_names_the_registry():
    cfg = tiny_semantic_cfg("FCNHead", "vgg")
    cfg.MODEL.SEM_SEG_HEAD.NAME = "NoSuchHead"
    with pytest.raises(
        seg2.Seg2Error,
        match=r"'NoSuchHead' is not registered in detectron2's SEM_SEG_HEADS_REGISTRY; known: \[.*'FCNHead'",
    ):
        build_model(cfg)


def test_seg2_loss_settings_on_a_head_that_ignores_them_are_an_error():
    from seg2.config import load_seg2_config

    cfg = load_seg2_config(
        os.path.join(CONFIGS, "quickstart", "mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml"),
        ["MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead", "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['p2', 'p3', 'p4', 'p5']",
         "MODEL.SEM_SEG_HEAD.LOSS_TYPE", "cross_entropy+dice", "MODEL.DEVICE", "cpu"],
    )  # fmt: skip
    with pytest.raises(
        seg2.Seg2Error,
        match=r"'SemSegFPNHead' is not a seg2 head and ignores .*LOSS_TYPE='cross_entropy\+dice'",
    ):
        build_model(cfg)
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "cross_entropy"
    build_model(cfg)  # its own loss, nothing asked that it would ignore
