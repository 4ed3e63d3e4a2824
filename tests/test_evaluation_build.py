"""build_evaluator: every evaluator type detectron2 registers, seg2's evaluators where they compute
the same numbers, detectron2's own otherwise (VOC's AP computed by hand), and the choice is logged."""

import importlib.util
import json
import logging

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_pascal_voc
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    DatasetEvaluators,
    PascalVOCDetectionEvaluator,
)
from detectron2.structures import Boxes, Instances

import seg2
from seg2 import Seg2Error
from seg2.evaluation import EVALUATORS, MaskAPEvaluator, MIoUEvaluator, build_evaluator

from seg2_model_helpers import register_tiny_shapes

LOGGER = "seg2.evaluation.build"
# The types detectron2's tools/train_net.py handles.
D2_TRAIN_NET_TYPES = (
    "sem_seg",
    "coco",
    "coco_panoptic_seg",
    "cityscapes_instance",
    "cityscapes_sem_seg",
    "pascal_voc",
    "lvis",
)


def _cfg(meta_arch, mask_on=True):
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = meta_arch
    cfg.MODEL.MASK_ON = mask_on
    return cfg


def _register_shapes(tiny_shapes_root, name, evaluator_type):
    """The tiny shapes val split (instances and label maps) under ``name`` with ``evaluator_type``."""
    register_tiny_shapes(name, tiny_shapes_root, "val")
    meta = dict(MetadataCatalog.get(name).as_dict(), evaluator_type=evaluator_type)
    del meta["name"]
    MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(**meta)
    return name


def test_every_registered_evaluator_type_is_accepted():
    registered = {
        MetadataCatalog.get(n).get("evaluator_type", None) for n in MetadataCatalog.list()
    } - {None}
    assert set(D2_TRAIN_NET_TYPES) <= registered  # detectron2's builtin datasets carry them all
    assert registered <= set(EVALUATORS), sorted(registered - set(EVALUATORS))


def test_seg2_evaluators_where_they_compute_the_same(tiny_shapes_root, caplog):
    name = _register_shapes(tiny_shapes_root, "seg2_test_build_eval", "coco_sem_seg")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert isinstance(build_evaluator(_cfg("GeneralizedRCNN"), name, None), MaskAPEvaluator)
    assert (
        "instances by MaskAPEvaluator (seg2's, the numbers of detectron2's COCOEvaluator)"
        in caplog.text
    )
    assert "GeneralizedRCNN predicts no sem_seg; not evaluated" in caplog.text
    both = build_evaluator(_cfg("PanopticFPN"), name, None)
    assert isinstance(both, DatasetEvaluators)
    assert [type(e).__name__ for e in both._evaluators] == ["MaskAPEvaluator", "MIoUEvaluator"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert isinstance(build_evaluator(_cfg("SemanticSegmentor"), name, None), MIoUEvaluator)
    assert (
        "sem_seg by MIoUEvaluator (seg2's, the numbers of detectron2's SemSegEvaluator)"
        in caplog.text
    )

    for evaluator_type in ("sem_seg", "coco"):
        name = _register_shapes(
            tiny_shapes_root, f"seg2_test_build_eval_{evaluator_type}", evaluator_type
        )
        with pytest.raises(Seg2Error, match=f"{name!r} \\({evaluator_type}\\) has no target that"):
            build_evaluator(
                _cfg("SemanticSegmentor" if evaluator_type == "coco" else "GeneralizedRCNN"),
                name,
                None,
            )


def test_coco_panoptic_type_evaluates_what_the_model_predicts(tiny_shapes_root, caplog, tmp_path):
    name = _register_shapes(tiny_shapes_root, "seg2_test_build_eval_panoptic", "coco_panoptic_seg")
    gt_json = tmp_path / "panoptic_val.json"
    gt_json.write_text(
        json.dumps({"categories": [{"id": 1, "name": "circle", "isthing": 1}], "annotations": []})
    )
    MetadataCatalog.get(name).set(panoptic_json=str(gt_json), panoptic_root=str(tmp_path))
    # PanopticFPN without combining its outputs predicts no panoptic maps
    separate = _cfg("PanopticFPN")
    separate.MODEL.PANOPTIC_FPN.COMBINE.ENABLED = False
    with caplog.at_level(logging.INFO, logger=LOGGER):
        both = build_evaluator(separate, name, None)
    assert [type(e).__name__ for e in both._evaluators] == ["MaskAPEvaluator", "MIoUEvaluator"]
    assert "PanopticFPN predicts no panoptic_seg; not evaluated" in caplog.text
    # With detectron2's default (combined) it does: box AP, mask AP, mIoU and PQ in one pass, PQ by
    # seg2's evaluator (no panopticapi needed).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ev = build_evaluator(_cfg("PanopticFPN"), name, None)
    assert [type(e).__name__ for e in ev._evaluators] == [
        "MaskAPEvaluator",
        "MIoUEvaluator",
        "Seg2PanopticEvaluator",
    ]
    assert (
        "panoptic_seg by Seg2PanopticEvaluator (seg2's, the PQ of detectron2's "
        "COCOPanopticEvaluator)" in caplog.text
    )


def test_keypoints_go_to_detectron2_coco_evaluator(tiny_shapes_root, caplog, tmp_path):
    name = _register_shapes(tiny_shapes_root, "seg2_test_build_eval_kpt", "coco")
    cfg = _cfg("GeneralizedRCNN")
    cfg.MODEL.KEYPOINT_ON = True
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert isinstance(build_evaluator(cfg, name, str(tmp_path)), COCOEvaluator)
    assert (
        "instances by COCOEvaluator (detectron2's: MaskAPEvaluator has no keypoint AP)"
        in caplog.text
    )


def test_max_detections_beyond_coco_are_logged(tiny_shapes_root, caplog):
    name = _register_shapes(tiny_shapes_root, "seg2_test_build_eval_dets", "coco")
    cfg = _cfg("GeneralizedRCNN")
    cfg.TEST.DETECTIONS_PER_IMAGE = 300
    with caplog.at_level(logging.INFO, logger=LOGGER):
        build_evaluator(cfg, name, None)
    assert (
        "AP counts the 100 highest-scoring of the TEST.DETECTIONS_PER_IMAGE=300 detections"
        in caplog.text
    )


@pytest.mark.parametrize(
    "name, evaluator, package",
    [
        ("cityscapes_fine_sem_seg_val", CityscapesSemSegEvaluator, "cityscapesscripts"),
        ("cityscapes_fine_instance_seg_val", CityscapesInstanceEvaluator, "cityscapesscripts"),
        ("lvis_v1_val", None, "lvis"),
    ],
)
def test_official_protocols_use_detectron2_evaluators(name, evaluator, package, caplog):
    """detectron2's builtin Cityscapes and LVIS names: their own evaluators, or an error at build
    time naming the package they need (not after a whole inference run)."""
    cfg = _cfg("SemanticSegmentor" if "sem_seg" in name else "GeneralizedRCNN")
    if importlib.util.find_spec(package) is None:
        with pytest.raises(
            Seg2Error, match=f"needs the '{package}' package: pip install {package}"
        ):
            build_evaluator(cfg, name, None)
    elif evaluator is None:
        pytest.skip(f"{package} is installed; LVISEvaluator would read {name}'s JSON, absent here")
    else:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            assert isinstance(build_evaluator(cfg, name, None), evaluator)
        assert f"by {evaluator.__name__} (detectron2's: Cityscapes' official" in caplog.text


def _write_voc_xml(path, objects):
    objs = "".join(
        f"<object><name>{c}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for c, b, d in objects
    )
    path.write_text(
        f"<annotation><size><width>80</width><height>64</height></size>{objs}</annotation>"
    )


def _boxes_instances(boxes, scores, classes):
    inst = Instances((64, 80))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.tensor(scores)
    inst.pred_classes = torch.tensor(classes)
    return inst


def test_pascal_voc_type_uses_voc_ap(tmp_path, caplog):
    """VOC's protocol (AP per class over the precision envelope, 'difficult' objects ignored) on a
    tiny VOC folder, computed by hand: cat 2/2 found first -> AP 1; dog found after a false positive
    -> precision 1/2 at recall 1 -> AP 0.5; mean 75. COCO's AP would count the difficult cat."""
    root = tmp_path / "VOC2012"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("a\nb\n")
    _write_voc_xml(root / "Annotations" / "a.xml", [("cat", (11, 11, 40, 40), 0)])
    _write_voc_xml(
        root / "Annotations" / "b.xml",
        [("dog", (6, 6, 30, 30), 0), ("cat", (41, 41, 60, 60), 0), ("cat", (1, 41, 20, 60), 1)],
    )
    name = "seg2_test_voc_boxes"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_pascal_voc(name, str(root), "test", 2012, class_names=("cat", "dog"))
    MetadataCatalog.get(name).evaluator_type = "pascal_voc"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ev = build_evaluator(_cfg("GeneralizedRCNN", mask_on=False), name, None)
    assert isinstance(ev, PascalVOCDetectionEvaluator)
    assert "instances by PascalVOCDetectionEvaluator (detectron2's: VOC box AP" in caplog.text
    # Boxes as detectron2's VOC loader gives them (0-based corners: xmin - 1, ymin - 1).
    ev.reset()
    ev.process(
        [{"image_id": "a"}], [{"instances": _boxes_instances([[10, 10, 40, 40]], [0.9], [0])}]
    )
    ev.process(
        [{"image_id": "b"}],
        [
            {
                "instances": _boxes_instances(
                    [[59, 5, 79, 25], [5, 5, 30, 30], [40, 40, 60, 60]], [0.95, 0.8, 0.7], [1, 1, 0]
                )
            }
        ],
    )
    res = ev.evaluate()["bbox"]
    assert (
        res["AP50"] == pytest.approx(75.0)
        and res["AP75"] == pytest.approx(75.0)
        and res["AP"] == pytest.approx(75.0)
    )


def test_unknown_evaluator_type_is_an_error(tiny_shapes_root):
    name = _register_shapes(tiny_shapes_root, "seg2_test_build_eval_unknown", "my_metric")
    with pytest.raises(
        Seg2Error, match="evaluator_type='my_metric'; seg2 evaluates .*'cityscapes_sem_seg'"
    ):
        build_evaluator(_cfg("GeneralizedRCNN"), name, None)
