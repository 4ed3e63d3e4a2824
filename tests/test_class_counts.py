"""Issue 15, case 4: a class count below the training data's is a one-line error naming the config
key for every meta-architecture the Trainer builds (plain Mask R-CNN, RetinaNet, detectron2's
SemanticSegmentor, seg2's), also when the classes are only known once the dataset is loaded."""

import os

import pytest

import seg2
from seg2 import Seg2Error
from seg2.engine import Trainer

from seg2_model_helpers import register_tiny_shapes
from test_train_net import _register_tiny, _run_cli, _tiny_cfg


def test_plain_mask_rcnn_with_too_few_classes_is_named(tiny_shapes_root, tmp_path):
    _register_tiny(tiny_shapes_root)
    cfg = _tiny_cfg(tmp_path, max_iter=2)
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 2])
    with pytest.raises(Seg2Error) as e:
        Trainer(cfg)
    assert str(e.value) == (
        "MODEL.ROI_HEADS.NUM_CLASSES=2 but dataset 'seg2_test_tiny_train' has 3 thing_classes "
        "(['circle', 'square', 'triangle']); set MODEL.ROI_HEADS.NUM_CLASSES: 3"
    )
    # Too many is as wrong (a class that never appears in training).
    cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 4])
    with pytest.raises(Seg2Error, match=r"MODEL.ROI_HEADS.NUM_CLASSES=4 but dataset"):
        Trainer.build_model(cfg)


def test_classes_learned_when_the_dataset_loads_are_checked(tiny_shapes_root, tmp_path):
    # Registered without thing_classes: the metadata gets them from the JSON when the Trainer
    # loads the training data, after the model is built.
    for split in ("train", "val"):
        register_tiny_shapes(f"seg2_test_lazy_{split}", tiny_shapes_root, split, thing_classes=None)
    cfg = _tiny_cfg(tmp_path, max_iter=2)
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN",
            ("seg2_test_lazy_train",),
            "DATASETS.TEST",
            ("seg2_test_lazy_val",),
            "MODEL.ROI_HEADS.NUM_CLASSES",
            2,
        ]
    )
    with pytest.raises(
        Seg2Error, match=r"^MODEL.ROI_HEADS.NUM_CLASSES=2 but dataset 'seg2_test_lazy_train' has 3 "
    ):
        Trainer(cfg)


def test_retinanet_class_count_is_named(tiny_shapes_root, tmp_path):
    _register_tiny(tiny_shapes_root)
    cfg = _tiny_cfg(tmp_path, max_iter=2)
    cfg.merge_from_list(
        [
            "MODEL.META_ARCHITECTURE",
            "RetinaNet",
            "MODEL.BACKBONE.NAME",
            "build_retinanet_resnet_fpn_backbone",
            "MODEL.RESNETS.OUT_FEATURES",
            ["res3", "res4", "res5"],
            "MODEL.FPN.IN_FEATURES",
            ["res3", "res4", "res5"],
            "MODEL.MASK_ON",
            False,
            "MODEL.RETINANET.NUM_CLASSES",
            2,
        ]
    )
    with pytest.raises(
        Seg2Error, match=r"^MODEL.RETINANET.NUM_CLASSES=2 but dataset 'seg2_test_tiny_train' has 3 "
    ):
        Trainer.build_model(cfg)
    cfg.merge_from_list(["MODEL.RETINANET.NUM_CLASSES", 3])
    Trainer.build_model(cfg)  # the right count builds


def test_detectron2_semantic_segmentor_class_count_is_named(tiny_shapes_root, tmp_path):
    _register_tiny(tiny_shapes_root)
    cfg = _tiny_cfg(tmp_path, max_iter=2)
    # detectron2's own SemanticSegmentor and SemSegFPNHead: stuff_classes are background + 3 shapes.
    cfg.merge_from_list(
        [
            "MODEL.META_ARCHITECTURE",
            "SemanticSegmentor",
            "MODEL.MASK_ON",
            False,
            "MODEL.SEM_SEG_HEAD.NAME",
            "SemSegFPNHead",
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
            3,
            "MODEL.SEM_SEG_HEAD.CONVS_DIM",
            32,
        ]
    )
    with pytest.raises(Seg2Error) as e:
        Trainer(cfg)
    assert str(e.value).startswith(
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES=3 but dataset 'seg2_test_tiny_train' has 4 stuff_classes "
        "(['background', 'circle', 'square', 'triangle'])"
    )


def test_seg2_semantic_segmentor_class_count_is_named(tiny_shapes_root, tmp_path):
    _register_tiny(tiny_shapes_root)
    cfg = seg2.load_seg2_config(
        os.path.join(
            os.path.dirname(__file__), "..", "configs", "quickstart", "unet_tiny_shapes_cpu.yaml"
        ),
        [
            "DATASETS.TRAIN",
            ("seg2_test_tiny_train",),
            "DATASETS.TEST",
            ("seg2_test_tiny_val",),
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
            5,
            "OUTPUT_DIR",
            str(tmp_path),
        ],
    )
    with pytest.raises(
        Seg2Error,
        match=r"^MODEL.SEM_SEG_HEAD.NUM_CLASSES=5 but dataset 'seg2_test_tiny_train' has 4 ",
    ):
        Trainer.build_model(cfg)


def test_cli_quickstart_with_two_classes_stops_in_one_line(tiny_shapes_root, tmp_path):
    # The registered seg2_shapes_train, read from the tiny cache (its manifest gives its size).
    r = _run_cli(
        "SEG2.SHAPES_ROOT",
        tiny_shapes_root,
        "OUTPUT_DIR",
        str(tmp_path),
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "2",
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "seg2: error: MODEL.ROI_HEADS.NUM_CLASSES=2 but dataset 'seg2_shapes_train' has 3 "
        "thing_classes "
        "(['circle', 'square', 'triangle']); set MODEL.ROI_HEADS.NUM_CLASSES: 3"
    )
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "metrics.json").exists()  # stopped before training
