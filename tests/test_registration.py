"""`import seg2` registers seg2's names; add_seg2_config only adds keys; missing detectron2 is explained."""

import os
import subprocess
import sys

import numpy as np
import pytest
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import seg2
from seg2 import Seg2Error
from seg2.data import MultiTaskDatasetMapper, load_coco_with_sem_seg, read_label_map


def _flatten(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, CfgNode):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def test_import_registers_shapes_datasets():
    for name in ("seg2_shapes_train", "seg2_shapes_val"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["circle", "square", "triangle"]
        assert meta.stuff_classes == ["background", "circle", "square", "triangle"]
        assert meta.ignore_label == 255
        assert meta.evaluator_type == "coco_sem_seg"


def test_add_seg2_config_only_adds_keys():
    before = _flatten(get_cfg())
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    after = _flatten(cfg)
    for key, value in before.items():
        assert after[key] == value, key
    added = set(after) - set(before)
    assert added and all(
        k.split(".")[0] in ("SEG2", "MODEL", "INPUT", "SOLVER", "DATALOADER", "TEST") for k in added
    )
    assert after["SEG2.SHAPES_ROOT"] == ""


def _import_seg2_in_child(prelude):
    code = prelude + "\nimport seg2\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_without_detectron2_says_what_to_install():
    r = _import_seg2_in_child("import sys; sys.modules['detectron2'] = None")
    assert r.returncode != 0
    assert "seg2 needs detectron2" in r.stderr and "pip install --no-build-isolation" in r.stderr


def test_import_with_old_detectron2_says_which_version():
    r = _import_seg2_in_child("import detectron2; detectron2.__version__ = '0.5'")
    assert r.returncode != 0
    assert "seg2 needs detectron2 >= 0.6, found 0.5" in r.stderr


def test_records_carry_both_views_and_the_mapper_reads_palette_indices(tiny_shapes_root):
    root = tiny_shapes_root
    records = load_coco_with_sem_seg(
        os.path.join(root, "coco", "annotations", "instances_train.json"),
        os.path.join(root, "coco", "train"),
        os.path.join(root, "VOC2012", "SegmentationClass"),
        dataset_name="seg2_test_records",  # maps COCO category ids 1..3 to contiguous 0..2
    )
    assert len(records) == 8
    assert all(r["annotations"] and r["sem_seg_file_name"].endswith(".png") for r in records)

    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "Seg2MultiTaskRCNN"  # reads label maps
    cfg.merge_from_list(
        [
            "INPUT.MIN_SIZE_TRAIN",
            (64,),
            "INPUT.MAX_SIZE_TRAIN",
            64,
            "MODEL.MASK_ON",
            True,
            "INPUT.RANDOM_FLIP",
            "none",
        ]
    )
    mapper = MultiTaskDatasetMapper(cfg, True)
    out = mapper(records[0])
    expected = np.array(Image.open(records[0]["sem_seg_file_name"]))
    assert out["image"].shape == (3, 64, 64)
    assert np.array_equal(out["sem_seg"].numpy(), expected)
    assert set(np.unique(expected)) <= {0, 1, 2, 3, 255} and (expected > 0).any()
    assert len(out["instances"]) == len(records[0]["annotations"])
    # Label changes of the class map are never lost: the classes present equal the instances'
    # classes.
    classes = set(out["instances"].gt_classes.tolist())
    assert {c + 1 for c in classes} == set(np.unique(expected)) - {0, 255}


def test_label_map_errors_name_the_file(tmp_path, tiny_shapes_root):
    rgb = tmp_path / "rgb_mask.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(rgb)
    with pytest.raises(Seg2Error, match="rgb_mask.png: label map has PIL mode 'RGB'"):
        read_label_map(str(rgb))

    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(small)
    records = load_coco_with_sem_seg(
        os.path.join(tiny_shapes_root, "coco", "annotations", "instances_val.json"),
        os.path.join(tiny_shapes_root, "coco", "val"),
    )
    rec = dict(records[0], sem_seg_file_name=str(small))
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "Seg2MultiTaskRCNN"  # reads label maps
    with pytest.raises(
        Seg2Error, match=r"small.png: label map is 48x32 \(WxH\) but its image .* is 64x64"
    ):
        MultiTaskDatasetMapper(cfg, True)(rec)
