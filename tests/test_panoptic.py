"""Panoptic output of Seg2MultiTaskRCNN (detectron2's PanopticFPN merge), its class-layout check,
COCO panoptic folders and the panoptic shapes dataset."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.panoptic_fpn import (
    PanopticFPN,
    combine_semantic_and_instance_outputs,
)
from detectron2.utils.events import EventStorage
from PIL import Image

import seg2
from seg2.data import (
    MultiTaskDatasetMapper,
    generate_shapes_panoptic,
    register_coco_panoptic_folder,
)
from seg2.data.panoptic import id2rgb, rgb2id
from seg2.data.shapes import shapes_digest
from seg2.modeling import model_tasks

from seg2_model_helpers import base_cfg, one_thread  # noqa: F401  (fixture)

QUICKSTART = "quickstart/mask_rcnn_R18_FPN_fcn8s_shapes-panoptic_cpu.yaml"


@pytest.fixture(scope="module")
def tiny_panoptic(tmp_path_factory):
    """A small panoptic shapes set (6 train, 3 val images of 64x64) registered as
    seg2_test_panoptic_{train,val}."""
    from seg2.data.builtin import _shapes_panoptic_paths

    root = str(tmp_path_factory.mktemp("pan") / "shapes_panoptic")
    generate_shapes_panoptic(root, splits={"train": 6, "val": 3}, image_size=64, seed=2)
    for split in ("train", "val"):
        register_coco_panoptic_folder(
            f"seg2_test_panoptic_{split}", **_shapes_panoptic_paths(root, split)
        )
    return root


def _quickstart_cfg(config=QUICKSTART, head_opts=()):
    cfg = base_cfg(config)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (
        ("seg2_test_panoptic_train",),
        ("seg2_test_panoptic_val",),
    )
    cfg.merge_from_list(list(head_opts))
    return cfg


# ---------------------------------------------------------------------------------------------
# Panoptic output


def _image(cfg, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(3, size, size, generator=g) * 255, "height": size, "width": size}


def test_panoptic_output_equals_detectron2s_panoptic_fpn(tiny_panoptic):
    """With detectron2's own FPN semantic head, the same weights in detectron2's PanopticFPN give
    the same instances, semantic map and panoptic segmentation, segment for segment."""
    cfg = _quickstart_cfg()
    cfg.merge_from_list(
        [
            "MODEL.SEM_SEG_HEAD.NAME",
            "SemSegFPNHead",
            "MODEL.SEM_SEG_HEAD.IN_FEATURES",
            ["p2", "p3", "p4", "p5"],
            "MODEL.SEM_SEG_HEAD.CONVS_DIM",
            32,
            "MODEL.SEM_SEG_HEAD.COMMON_STRIDE",
            4,
            "MODEL.SEM_SEG_HEAD.NORM",
            "GN",
        ]
    )
    # low thresholds, so that instances and small stuff regions of an untrained model take part
    cfg.merge_from_list(
        [
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            0.0,
            "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH",
            0.02,
            "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT",
            8,
            "MODEL.PANOPTIC_FPN.COMBINE.OVERLAP_THRESH",
            0.3,
        ]
    )
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    assert ours.combine_enabled and ours.combine_stuff_area_thresh == 8
    ref_cfg = cfg.clone()
    ref_cfg.MODEL.META_ARCHITECTURE = "PanopticFPN"
    ref = build_model(ref_cfg).eval()
    assert isinstance(ref, PanopticFPN)
    ref.load_state_dict(ours.state_dict())
    batch = [_image(cfg, 0), _image(cfg, 1)]
    with torch.no_grad():
        got, expected = ours(batch), ref(batch)
    for g, e in zip(got, expected):
        assert torch.equal(g["sem_seg"], e["sem_seg"])
        assert torch.equal(g["instances"].pred_masks, e["instances"].pred_masks)
        (ids, info), (ref_ids, ref_info) = g["panoptic_seg"], e["panoptic_seg"]
        assert torch.equal(ids, ref_ids) and info == ref_info
    assert any(s["isthing"] for _, info in (g["panoptic_seg"] for g in got) for s in info)
    assert any(not s["isthing"] for _, info in (g["panoptic_seg"] for g in got) for s in info)


@pytest.mark.parametrize(
    "config",
    [
        QUICKSTART,
        "quickstart/mask_rcnn_R18_FPN_unet_shapes_cpu.yaml",
        "quickstart/mask_rcnn_R18_FPN_deeplabv3plus_shapes_cpu.yaml",
    ],
)
def test_every_seg2_head_gives_detectron2s_panoptic_format(config, tiny_panoptic):
    """FCN-8s, U-Net and DeepLabV3+ heads: "panoptic_seg" is detectron2's merge of the model's own
    instances and semantic argmax, in its format: (H, W) int32 ids 1..n, one segments_info entry per
    id, thing classes in [0, #things), stuff classes in [1, #stuff], each stuff segment where the
    semantic argmax is its class, no segment under STUFF_AREA_LIMIT."""
    cfg = _quickstart_cfg(
        config,
        [
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
            3,
            "MODEL.PANOPTIC_FPN.COMBINE.ENABLED",
            True,
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            0.0,
            "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH",
            0.02,
            "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT",
            16,
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model_tasks(cfg) == {"instances", "sem_seg", "panoptic_seg"}
    with torch.no_grad():
        (out,) = model([_image(cfg, 3)])
    ids, info = out["panoptic_seg"]
    labels = out["sem_seg"].argmax(0)
    ref_ids, ref_info = combine_semantic_and_instance_outputs(
        out["instances"], labels, 0.5, 16, 0.02
    )
    assert torch.equal(ids, ref_ids) and info == ref_info
    assert ids.shape == (64, 64) and ids.dtype == torch.int32
    assert [s["id"] for s in info] == list(range(1, len(info) + 1))
    assert set(torch.unique(ids).tolist()) - {0} == {s["id"] for s in info}
    for s in info:
        mask = ids == s["id"]
        if s["isthing"]:
            assert 0 <= s["category_id"] < 3 and s["score"] >= 0.02
            assert s["category_id"] == int(out["instances"].pred_classes[s["instance_id"]])
        else:
            assert 1 <= s["category_id"] <= 2 and s["area"] == int(mask.sum()) >= 16
            assert bool((labels[mask] == s["category_id"]).all())


def test_no_panoptic_output_unless_enabled_on_panoptic_data(tiny_panoptic):
    cfg = _quickstart_cfg()
    cfg.MODEL.PANOPTIC_FPN.COMBINE.ENABLED = False
    assert not build_model(cfg).combine_enabled and model_tasks(cfg) == {"instances", "sem_seg"}
    # detectron2's default ENABLED=True on seg2_shapes (background + things, no panoptic metadata)
    cfg = base_cfg("quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("seg2_shapes_train",), ("seg2_shapes_val",)
    cfg.MODEL.PANOPTIC_FPN.COMBINE.ENABLED = True
    cfg = seg2.resolve_config(cfg)  # the data decides: not panoptic
    assert not cfg.MODEL.PANOPTIC_FPN.COMBINE.ENABLED
    model = build_model(cfg).eval()
    assert not model.combine_enabled and model_tasks(cfg) == {"instances", "sem_seg"}
    with torch.no_grad():
        assert set(model([_image(cfg)])[0]) == {"instances", "sem_seg"}


# ---------------------------------------------------------------------------------------------
# The semantic head's classes


def _metadata_only(name, **meta):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(**meta)
    return name


def test_head_classes_are_checked_against_the_datasets(tiny_panoptic):
    cfg = _quickstart_cfg()
    # the separated layout, one class too many
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    with pytest.raises(
        seg2.Seg2Error, match=r"MODEL.SEM_SEG_HEAD.NUM_CLASSES=4.*'seg2_test_panoptic_train'"
    ):
        seg2.resolve_config(cfg)
    # detectron2's "standard" layout (every class a semantic class), as coco_2017_val_panoptic
    standard = _metadata_only(
        "seg2_test_panoptic_standard",
        thing_classes=["a", "b"],
        stuff_classes=["a", "b", "sky"],
        thing_dataset_id_to_contiguous_id={1: 0, 2: 1},
        stuff_dataset_id_to_contiguous_id={3: 2},
        panoptic_json="x.json",
        evaluator_type="coco_panoptic_seg",
        ignore_label=255,
    )
    cfg = _quickstart_cfg()
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = (standard,)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    with pytest.raises(seg2.Seg2Error) as e:
        seg2.resolve_config(cfg)
    message = str(e.value)
    assert (
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES=3" in message
        and repr(standard) in message
        and "separated" in message
    )
    assert "\n" not in message
    # panoptic data mixed with a semantic set whose classes mean something else
    cfg = _quickstart_cfg()
    cfg.DATASETS.TEST = (
        "seg2_test_panoptic_val",
        _metadata_only("seg2_test_plain", stuff_classes=["bg", "a", "b"]),
    )
    with pytest.raises(
        seg2.Seg2Error, match=r"MODEL.SEM_SEG_HEAD.NUM_CLASSES=3: DATASETS mix .*'seg2_test_plain'"
    ):
        seg2.resolve_config(cfg)
    # no masks to merge
    cfg = _quickstart_cfg()
    cfg.MODEL.MASK_ON = False
    with pytest.raises(seg2.Seg2Error, match="MODEL.MASK_ON"):
        seg2.resolve_config(cfg)


def test_model_from_plain_arguments_checks_its_head(tiny_panoptic):
    from seg2.modeling.meta_arch import Seg2MultiTaskRCNN

    cfg = _quickstart_cfg()
    cfg.MODEL.PANOPTIC_FPN.COMBINE.ENABLED = False
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 1
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    assert not Seg2MultiTaskRCNN(cfg).combine_enabled
    with pytest.raises(
        seg2.Seg2Error, match=r"NUM_CLASSES=1: the panoptic output .* at least one stuff class"
    ):
        Seg2MultiTaskRCNN(cfg, combine_enabled=True)


# ---------------------------------------------------------------------------------------------
# Data


def test_coco_panoptic_separated_metadata_fits_the_check():
    """detectron2's own coco_2017_*_panoptic_separated (metadata only: no COCO here) are panoptic,
    in the separated layout: the COCO panoptic configs combine."""
    for name in ("coco_2017_train_panoptic_separated", "coco_2017_val_panoptic_separated"):
        meta = MetadataCatalog.get(name)
        assert len(meta.stuff_classes) == 54 and meta.evaluator_type == "coco_panoptic_seg"
    for head in ("fcn8s", "unet", "deeplabv3plus"):
        cfg = base_cfg(f"multitask/mask_rcnn_R50_FPN_{head}_1x_coco-panoptic.yaml")
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (
            ("coco_2017_train_panoptic_separated",),
            ("coco_2017_val_panoptic_separated",),
        )
        assert model_tasks(cfg) == {"instances", "sem_seg", "panoptic_seg"}, head


def _write_folder(root, extra_png_id=False, missing_segment=False, duplicate_category=False):
    """Two 8x6 images. Things: "dog" (id 7), "cat" (3); stuff: "sky" (20), "grass" (11)."""
    os.makedirs(root / "images", exist_ok=True)
    os.makedirs(root / "panoptic", exist_ok=True)
    categories = [
        {"id": 20, "name": "sky", "isthing": 0},
        {"id": 7, "name": "dog", "isthing": 1},
        {"id": 11, "name": "grass", "isthing": 0},
        {"id": 3, "name": "cat", "isthing": 1},
    ]
    if duplicate_category:
        categories.append({"id": 11, "name": "tree", "isthing": 1})
    ids = np.zeros((2, 6, 8), dtype=np.int64)
    ids[0, :3] = 300  # sky
    ids[0, 3:] = 301  # grass
    ids[0, 1:4, 2:5] = 5000  # a dog (3 x 3)
    ids[0, 4:6, 6:8] = 70000  # a cat (2 x 2), crowd
    ids[0, 0, 0] = 0  # void
    ids[1] = 301
    ids[1, 2:5, 0:2] = 99  # another cat
    if extra_png_id:
        ids[1, 0, 7] = 123
    segments = [
        [
            {"id": 300, "category_id": 20},
            {"id": 301, "category_id": 11},
            {"id": 5000, "category_id": 7},
            {"id": 70000, "category_id": 3, "iscrowd": 1},
        ],
        [{"id": 301, "category_id": 11}, {"id": 99, "category_id": 3}],
    ]
    if missing_segment:
        segments[1].append({"id": 77, "category_id": 20})
    images, annotations = [], []
    for i in range(2):
        Image.fromarray(np.full((6, 8, 3), 100 + i, np.uint8)).save(root / "images" / f"im{i}.jpg")
        Image.fromarray(id2rgb(ids[i])).save(root / "panoptic" / f"im{i}.png")
        images.append({"id": 10 + i, "file_name": f"im{i}.jpg", "height": 6, "width": 8})
        annotations.append(
            {"image_id": 10 + i, "file_name": f"im{i}.png", "segments_info": segments[i]}
        )
    with open(root / "panoptic.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return dict(
        image_root=str(root / "images"),
        panoptic_root=str(root / "panoptic"),
        panoptic_json=str(root / "panoptic.json"),
    )


def test_register_a_panoptic_folder(tmp_path):
    paths = _write_folder(tmp_path)
    name = register_coco_panoptic_folder(
        "seg2_test_panoptic_folder", **paths, cache_dir=str(tmp_path / "cache")
    )
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["cat", "dog"] and meta.thing_dataset_id_to_contiguous_id == {
        3: 0,
        7: 1,
    }
    assert meta.stuff_classes == ["things", "grass", "sky"]
    assert meta.stuff_dataset_id_to_contiguous_id == {0: 0, 11: 1, 20: 2}
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.ignore_label == 255
    assert (meta.panoptic_root, meta.panoptic_json) == (
        paths["panoptic_root"],
        paths["panoptic_json"],
    )
    records = DatasetCatalog.get(name)
    assert [r["image_id"] for r in records] == [10, 11]
    assert records[0]["file_name"] == os.path.join(paths["image_root"], "im0.jpg")
    anns = sorted(records[0]["annotations"], key=lambda a: a["category_id"])
    assert [(a["category_id"], a["iscrowd"], list(a["bbox"])) for a in anns] == [
        (0, 1, [6, 4, 2, 2]),
        (1, 0, [2, 1, 3, 3]),
    ]
    sem = np.asarray(Image.open(records[0]["sem_seg_file_name"]))
    expected = np.full((6, 8), 2, np.uint8)
    expected[3:] = 1
    expected[1:4, 2:5] = 0
    expected[4:6, 6:8] = 0
    expected[0, 0] = 255
    assert np.array_equal(sem, expected)
    # the mapper reads the separated maps as they are and the RLE instances as masks
    cfg = base_cfg(QUICKSTART)
    cfg.DATASETS.TRAIN = (name,)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.RANDOM_FLIP = (6,), 8, "none"
    mapped = MultiTaskDatasetMapper(cfg, is_train=True)(records[1])
    assert np.array_equal(
        mapped["sem_seg"].numpy(), np.asarray(Image.open(records[1]["sem_seg_file_name"]))
    )
    assert mapped["instances"].gt_classes.tolist() == [0]
    assert mapped["instances"].gt_masks.tensor[0].sum() == 6
    # registered again (another folder): records and metadata replaced
    other = _write_folder(tmp_path / "other")
    register_coco_panoptic_folder(name, **other, cache_dir=str(tmp_path / "cache2"))
    assert DatasetCatalog.get(name)[0]["file_name"].startswith(other["image_root"])


@pytest.mark.parametrize(
    "bad,pattern",
    [
        (
            "extra_png_id",
            r"im1.png: segment id 123 is in the PNG but not in the segments_info of image 11",
        ),
        (
            "missing_segment",
            r"panoptic.json: segment id 77 \(category 20\) of image 11 has no pixel in .*im1.png",
        ),
        (
            "duplicate_category",
            r"panoptic.json: category id 11 is given twice \('grass' as stuff, 'tree' as thing\)",
        ),
    ],
)
def test_bad_panoptic_folders_are_one_line_errors(tmp_path, bad, pattern):
    paths = _write_folder(tmp_path, **{bad: True})
    with pytest.raises(seg2.Seg2Error, match=pattern) as e:
        register_coco_panoptic_folder(
            "seg2_test_bad_panoptic", **paths, cache_dir=str(tmp_path / "cache")
        )
        DatasetCatalog.get("seg2_test_bad_panoptic")
    assert "\n" not in str(e.value)


def test_shapes_panoptic_segments_in_png_equal_json(tiny_panoptic):
    from pycocotools import mask as mask_util

    coco = os.path.join(tiny_panoptic, "coco")
    for split in ("train", "val"):
        panoptic = json.load(open(os.path.join(coco, "annotations", f"panoptic_{split}.json")))
        instances = json.load(open(os.path.join(coco, "annotations", f"instances_{split}.json")))
        assert {c["name"]: c["isthing"] for c in panoptic["categories"]} == {
            "circle": 1,
            "square": 1,
            "triangle": 1,
            "sky": 0,
            "ground": 0,
        }
        assert panoptic["images"] == instances["images"]
        for ann in panoptic["annotations"]:
            ids = rgb2id(
                np.asarray(Image.open(os.path.join(coco, f"panoptic_{split}", ann["file_name"])))
            )
            sem = np.asarray(
                Image.open(os.path.join(coco, f"panoptic_stuff_{split}", ann["file_name"]))
            )
            segments = {s["id"]: s for s in ann["segments_info"]}
            assert set(np.unique(ids).tolist()) - {0} == set(segments)
            things = [a for a in instances["annotations"] if a["image_id"] == ann["image_id"]]
            assert len(things) == sum(s["category_id"] <= 3 for s in segments.values())
            assert {s["category_id"] for s in segments.values() if s["category_id"] > 3} == {
                4,
                5,
            }  # sky and ground
            for s in segments.values():
                m = ids == s["id"]
                ys, xs = np.nonzero(m)
                assert s["area"] == m.sum() and s["bbox"] == [
                    xs.min(),
                    ys.min(),
                    np.ptp(xs) + 1,
                    np.ptp(ys) + 1,
                ]
                assert (sem[m] == (0 if s["category_id"] <= 3 else s["category_id"] - 3)).all()
            assert (sem[ids == 0] == 255).all()
            # each thing segment is its instance polygon less the void where polygons overlap
            for a, s in zip(things, [s for s in segments.values() if s["category_id"] <= 3]):
                poly = mask_util.decode(
                    mask_util.merge(mask_util.frPyObjects(a["segmentation"], 64, 64))
                ).astype(bool)
                assert a["category_id"] == s["category_id"]
                assert np.array_equal(poly & (ids != 0), ids == s["id"])


def test_shapes_panoptic_is_deterministic_and_leaves_seg2_shapes_alone(
    tiny_panoptic, tmp_path, tiny_shapes_root
):
    before = shapes_digest(tiny_shapes_root)
    again = generate_shapes_panoptic(
        str(tmp_path / "again"), splits={"train": 6, "val": 3}, image_size=64, seed=2
    )
    assert shapes_digest(again) == shapes_digest(tiny_panoptic)
    assert shapes_digest(tiny_shapes_root) == before
    assert MetadataCatalog.get("seg2_shapes_panoptic_train").stuff_classes == [
        "things",
        "sky",
        "ground",
    ]
    assert MetadataCatalog.get("seg2_shapes_train").stuff_classes == [
        "background",
        "circle",
        "square",
        "triangle",
    ]


# ---------------------------------------------------------------------------------------------
# The quickstart


def test_panoptic_quickstart_builds_and_trains_one_step(tiny_panoptic):
    from seg2.engine import Trainer

    cfg = _quickstart_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 2
    assert (
        cfg.MODEL.PANOPTIC_FPN.COMBINE.ENABLED
        and cfg.SEG2.BEST_CHECKPOINT.METRIC == "panoptic_seg/PQ"
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = next(iter(Trainer.build_train_loader(cfg)))
    assert all(x["sem_seg"].max() <= 2 or x["sem_seg"].max() == 255 for x in batch)
    assert all(set(torch.unique(x["sem_seg"]).tolist()) <= {0, 1, 2, 255} for x in batch)
    model.train()
    with EventStorage(0):
        losses = model(batch)
    assert {"loss_sem_seg", "loss_mask", "loss_cls"} <= set(losses)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    model.eval()
    with torch.no_grad():
        (out,) = model([_image(cfg)])
    assert set(out) == {"instances", "sem_seg", "panoptic_seg"}


# ---------------------------------------------------------------------------------------------
# Predictor (whole and tiled), TTA, demo

LOW_THRESHOLDS = [
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    0.0,
    "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH",
    0.02,
    "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT",
    16,
]


def _merged(model, instances, labels):
    return combine_semantic_and_instance_outputs(
        instances,
        labels,
        model.combine_overlap_thresh,
        model.combine_stuff_area_thresh,
        model.combine_instances_score_thresh,
    )


def _assert_same_panoptic(a, b):
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


@pytest.mark.parametrize("tiled", [False, True])
def test_predictor_returns_the_merge_of_its_outputs(tiny_panoptic, tiled):
    from seg2.inference import Seg2Predictor

    cfg = _quickstart_cfg(head_opts=LOW_THRESHOLDS + ["INPUT.MIN_SIZE_TEST", 0])
    if tiled:
        cfg.merge_from_list(
            ["TEST.TILING.ENABLED", True, "TEST.TILING.TILE_SIZE", 32, "TEST.TILING.STRIDE", 32]
        )
    torch.manual_seed(0)
    predictor = Seg2Predictor(cfg)
    image = np.random.default_rng(0).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    out = predictor(image)
    ids, info = out["panoptic_seg"]
    assert ids.shape == (64, 96) and info
    _assert_same_panoptic(
        out["panoptic_seg"], _merged(predictor.model, out["instances"], out["sem_seg"].argmax(0))
    )
    labels = predictor(image, sem_seg_output="labels")
    _assert_same_panoptic(labels["panoptic_seg"], out["panoptic_seg"])


def test_tta_merges_the_augmented_outputs(tiny_panoptic):
    from seg2.inference import build_tta_model

    cfg = _quickstart_cfg(head_opts=LOW_THRESHOLDS)
    cfg.merge_from_list(
        [
            "TEST.AUG.ENABLED",
            True,
            "TEST.AUG.SCALE_RATIOS",
            (),
            "TEST.AUG.MIN_SIZES",
            (64, 80),
            "TEST.AUG.MAX_SIZE",
            200,
            "TEST.AUG.FLIP",
            True,
        ]
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    (out,) = build_tta_model(cfg, model)([_image(cfg, 5)])
    assert out["sem_seg"].shape == (3, 64, 64)
    _assert_same_panoptic(
        out["panoptic_seg"], _merged(model, out["instances"], out["sem_seg"].argmax(0))
    )


def test_demo_draws_and_writes_the_panoptic_segmentation(tiny_panoptic, tmp_path, capsys):
    from test_demo import _weights, demo

    src = os.path.join(tiny_panoptic, "coco", "val", "shapes_val_00000.jpg")
    out = str(tmp_path / "out")
    config = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", QUICKSTART
    )
    argv = [
        "--config-file",
        config,
        "--input",
        src,
        "--output",
        out,
        "--confidence-threshold",
        "0.0",
    ]
    opts = [
        "DATASETS.TRAIN",
        "('seg2_test_panoptic_train',)",
        "DATASETS.TEST",
        "('seg2_test_panoptic_val',)",
        "INPUT.MIN_SIZE_TEST",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "64",
        "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH",
        "0.0",
        "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT",
        "4",
    ]
    weights = _weights(demo.get_parser().parse_args(argv + opts), str(tmp_path / "model"), seed=0)
    assert demo.main(argv + opts + ["MODEL.WEIGHTS", weights]) == 0, capsys.readouterr().out
    with open(os.path.join(out, "panoptic_segments.json")) as f:
        (entry,) = json.load(f)
    assert entry["file_name"] == src and entry["panoptic_png"] == "shapes_val_00000_panoptic.png"
    ids = rgb2id(np.asarray(Image.open(os.path.join(out, entry["panoptic_png"]))))
    assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in entry["segments_info"]} != set()
    overlay = np.asarray(
        Image.open(os.path.join(out, "shapes_val_00000_overlay_panoptic.png")).convert("RGB")
    )
    image = np.asarray(Image.open(src).convert("RGB"))
    changed = (overlay != image).any(axis=2)
    assert overlay.shape == image.shape and changed[ids != 0].mean() > 0.9  # segments are drawn


def test_mapper_reads_detectron2s_separated_registration(tiny_panoptic):
    """Records of detectron2's own register_coco_panoptic_separated (how it registers
    coco_2017_*_panoptic_separated), here on the COCO-layout panoptic shapes: the mapper reads the
    single-channel stuff maps as class indices, unchanged, and the instances from the polygons."""
    from detectron2.data.datasets import register_coco_panoptic_separated

    from seg2.data import panoptic_metadata
    from seg2.data.builtin import _shapes_panoptic_paths
    from seg2.data.shapes_panoptic import PANOPTIC_CATEGORIES

    p = _shapes_panoptic_paths(tiny_panoptic, "val")
    name = "seg2_test_d2_panoptic"
    if name + "_separated" not in DatasetCatalog.list():
        register_coco_panoptic_separated(
            name, panoptic_metadata(PANOPTIC_CATEGORIES), p["image_root"], p["panoptic_root"],
            p["panoptic_json"], p["sem_seg_root"], p["instances_json"],
        )  # fmt: skip
    records = DatasetCatalog.get(name + "_separated")
    assert len(records) == 3 and all("sem_seg_file_name" in r and r["annotations"] for r in records)
    cfg = _quickstart_cfg()
    cfg.DATASETS.TRAIN = (name + "_separated",)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.RANDOM_FLIP = (64,), 64, "none"
    mapper = MultiTaskDatasetMapper(cfg, is_train=True)
    for r in records:
        mapped = mapper(r)
        stuff = np.asarray(Image.open(r["sem_seg_file_name"]))
        assert Image.open(r["sem_seg_file_name"]).mode == "L"
        assert np.array_equal(mapped["sem_seg"].numpy(), stuff)
        assert set(np.unique(stuff).tolist()) <= {0, 1, 2, 255}
        assert len(mapped["instances"]) == len(r["annotations"])
