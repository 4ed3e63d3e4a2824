"""Pascal VOC 2012 / SBD loaders on tiny hand-made copies of the real layouts."""

import os

import numpy as np
import pytest
import scipy.io
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools import mask as mask_util

from seg2 import Seg2Error
from seg2.data import (
    SHAPES_CLASSES,
    VOC_CLASSES,
    load_coco_with_sem_seg,
    load_voc_instances,
    load_voc_sem_seg,
    load_voc_sem_seg_train_aug,
    read_label_map,
    register_all_voc_2012,
    write_label_map,
)

H, W = 8, 10


def _maps_a():
    """Image 'a': a person (15) block with a void ring, and a car (7) block beside it."""
    cls = np.zeros((H, W), np.uint8)
    obj = np.zeros((H, W), np.uint8)
    cls[0:5, 0:5] = 255  # void ring around the person ...
    obj[0:5, 0:5] = 255
    cls[1:4, 1:4] = 15  # ... whose pixels are rows 1-3, cols 1-3
    obj[1:4, 1:4] = 1
    cls[4:7, 5:9] = 7  # car: rows 4-6, cols 5-8, touching nothing
    obj[4:7, 5:9] = 2
    return cls, obj


def _maps_single(value, h=H, w=W):
    cls = np.zeros((h, w), np.uint8)
    obj = np.zeros((h, w), np.uint8)
    cls[2:5, 2:6] = value
    obj[2:5, 2:6] = 1
    return cls, obj


def _write_image(path, h=H, w=W):
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


def make_voc(root, items=None, splits=None):
    """A VOC2012-style tree. items: id -> (cls, obj) maps; splits: name -> ids."""
    items = items or {"a": _maps_a(), "b": _maps_single(1), "c": _maps_single(20)}
    splits = splits or {"train": ["a", "b"], "val": ["c"]}
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for name, (cls, obj) in items.items():
        _write_image(os.path.join(root, "JPEGImages", name + ".jpg"), *cls.shape)
        write_label_map(cls, os.path.join(root, "SegmentationClass", name + ".png"))
        write_label_map(obj, os.path.join(root, "SegmentationObject", name + ".png"))
    for split, ids in splits.items():
        with open(os.path.join(root, "ImageSets", "Segmentation", split + ".txt"), "w") as f:
            f.write("".join(i + "\n" for i in ids))
    return str(root)


def _save_sbd_mat(path, seg):
    """An SBD cls/*.mat: struct GTcls with fields Segmentation, Boundaries, CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)  # one (sparse in SBD) edge map per class
    for i in range(20):
        boundaries[i, 0] = np.zeros(seg.shape, np.uint8)
    gt = {
        "Segmentation": seg.astype(np.uint8),
        "Boundaries": boundaries,
        "CategoriesPresent": np.unique(seg[seg > 0]).astype(np.uint8),
    }
    scipy.io.savemat(path, {"GTcls": gt})


@pytest.fixture
def voc_root(tmp_path):
    return make_voc(tmp_path / "VOC2012")


def test_voc_sem_seg_records(voc_root):
    records = load_voc_sem_seg(voc_root, "train", check_labels=True)
    assert [r["image_id"] for r in records] == ["a", "b"]
    r = records[0]
    assert r["file_name"] == os.path.join(voc_root, "JPEGImages", "a.jpg")
    assert (r["height"], r["width"]) == (H, W)
    assert "annotations" not in r  # semantic only: detectron2 does not filter it as "empty"
    label = read_label_map(r["sem_seg_file_name"], expect_palette=True)
    np.testing.assert_array_equal(label, _maps_a()[0])


def test_voc_instances_hand_computed(voc_root):
    records = load_voc_instances(voc_root, "train")
    a = records[0]
    assert a["image_id"] == "a" and "sem_seg_file_name" not in a
    annos = a["annotations"]
    assert len(annos) == 2  # the void ring (255) is not an object
    assert [x["category_id"] for x in annos] == [
        VOC_CLASSES.index("person"),
        VOC_CLASSES.index("car"),
    ]
    assert [x["bbox"] for x in annos] == [[1, 1, 4, 4], [5, 4, 9, 7]]
    assert all(x["bbox_mode"] == BoxMode.XYXY_ABS and x["iscrowd"] == 0 for x in annos)
    person = mask_util.decode(annos[0]["segmentation"])
    expected = np.zeros((H, W), np.uint8)
    expected[1:4, 1:4] = 1
    np.testing.assert_array_equal(person, expected)
    assert int(mask_util.area(annos[1]["segmentation"])) == 12
    with_sem = load_voc_instances(voc_root, "val", with_sem_seg=True)
    assert with_sem[0]["annotations"][0]["category_id"] == 19
    assert with_sem[0]["sem_seg_file_name"].endswith(os.path.join("SegmentationClass", "c.png"))


def test_sbd_train_aug_composition(tmp_path):
    voc = make_voc(
        tmp_path / "VOC2012",
        items={k: _maps_single(v) for k, v in {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}.items()},
        splits={"train": ["a", "b"], "val": ["c"]},
    )
    sbd = tmp_path / "SBD"
    os.makedirs(sbd / "cls")
    sbd_maps = {"b": 9, "c": 9, "d": 11, "e": 12}
    for name, v in sbd_maps.items():
        _save_sbd_mat(str(sbd / "cls" / f"{name}.mat"), _maps_single(v)[0])
    (sbd / "train.txt").write_text("b\nd\n")
    (sbd / "val.txt").write_text("c\ne\n")
    records = load_voc_sem_seg_train_aug(voc, str(sbd))
    # VOC train (a, b) + SBD train/val (b, c, d, e) - VOC val (c): a, b from VOC; d, e from SBD.
    assert [r["image_id"] for r in records] == ["a", "b", "d", "e"]
    assert [os.path.splitext(r["sem_seg_file_name"])[1] for r in records] == [
        ".png",
        ".png",
        ".mat",
        ".mat",
    ]
    assert (
        read_label_map(records[1]["sem_seg_file_name"]).max() == 2
    )  # VOC's label wins over SBD's 9
    np.testing.assert_array_equal(
        read_label_map(records[2]["sem_seg_file_name"]), _maps_single(11)[0]
    )
    assert all(r["file_name"].startswith(os.path.join(voc, "JPEGImages")) for r in records)

    (sbd / "cls" / "e.mat").unlink()
    with pytest.raises(Seg2Error, match=r"e\.mat.*SBD class map for id 'e'"):
        load_voc_sem_seg_train_aug(voc, str(sbd))
    scipy.io.savemat(str(sbd / "cls" / "e.mat"), {"something": np.zeros((2, 2))})
    with pytest.raises(Seg2Error, match=r"e\.mat: not an SBD class file"):
        read_label_map(str(sbd / "cls" / "e.mat"))


def test_shapes_voc_view_agrees_with_coco_view(tiny_shapes_root):
    """The shapes dataset's VOC tree, read by the VOC loader, equals its COCO JSON off the border."""
    voc = os.path.join(tiny_shapes_root, "VOC2012")
    coco = os.path.join(tiny_shapes_root, "coco")
    instances = 0
    for split in ("train", "val"):
        voc_records = load_voc_instances(voc, split, class_names=SHAPES_CLASSES)
        coco_records = load_coco_with_sem_seg(
            os.path.join(coco, "annotations", f"instances_{split}.json"),
            os.path.join(coco, split),
            dataset_name=f"seg2_shapes_{split}",
        )
        assert len(voc_records) == len(coco_records)
        for v, c in zip(voc_records, coco_records):
            assert os.path.basename(v["file_name"]) == os.path.basename(c["file_name"])
            obj = read_label_map(os.path.join(voc, "SegmentationObject", v["image_id"] + ".png"))
            off_border = obj != 255
            assert [a["category_id"] for a in v["annotations"]] == [
                a["category_id"] for a in c["annotations"]
            ]
            for va, ca in zip(v["annotations"], c["annotations"]):
                vm = mask_util.decode(va["segmentation"]).astype(bool)
                cm = mask_util.decode(
                    mask_util.merge(mask_util.frPyObjects(ca["segmentation"], *obj.shape))
                )
                np.testing.assert_array_equal(vm[off_border], cm.astype(bool)[off_border])
                assert not vm[~off_border].any()
                instances += 1
    assert instances >= 12


# ---- bad input: each gets an error naming the file and the problem ----


def test_missing_image_for_id_in_split_file(voc_root):
    os.remove(os.path.join(voc_root, "JPEGImages", "b.jpg"))
    for load in (load_voc_sem_seg, load_voc_instances):
        with pytest.raises(
            Seg2Error, match=r"b\.jpg: image for id 'b' listed in .*train\.txt not found"
        ):
            load(voc_root, "train")


def test_duplicate_id_in_split_file(voc_root):
    with open(os.path.join(voc_root, "ImageSets", "Segmentation", "train.txt"), "a") as f:
        f.write("a\n")
    with pytest.raises(
        Seg2Error, match=r"train\.txt: image id 'a' is listed twice \(lines 1 and 3\)"
    ):
        load_voc_sem_seg(voc_root, "train")


def test_mask_size_differs_from_image(voc_root):
    write_label_map(
        np.zeros((H + 1, W), np.uint8), os.path.join(voc_root, "SegmentationObject", "b.png")
    )
    with pytest.raises(
        Seg2Error,
        match=r"SegmentationObject/b\.png: mask is 10x9 \(WxH\) but its image .*b\.jpg is 10x8",
    ):
        load_voc_instances(voc_root, "train")
    write_label_map(
        np.zeros((H, W + 2), np.uint8), os.path.join(voc_root, "SegmentationClass", "b.png")
    )
    with pytest.raises(Seg2Error, match=r"SegmentationClass/b\.png: mask is 12x8"):
        load_voc_sem_seg(voc_root, "train")


def test_label_value_neither_class_nor_void(voc_root):
    cls, obj = _maps_single(1)
    cls[0, 0] = 37  # VOC has 21 classes
    write_label_map(cls, os.path.join(voc_root, "SegmentationClass", "b.png"))
    with pytest.raises(
        Seg2Error, match=r"b\.png: label map holds value\(s\) 37 in 1 pixel\(s\).*0\.\.20.*255"
    ):
        load_voc_instances(voc_root, "train")
    with pytest.raises(Seg2Error, match=r"b\.png: label map holds value\(s\) 37"):
        load_voc_sem_seg(voc_root, "train", check_labels=True)
    # An object whose pixels say "background" in SegmentationClass is inconsistent, not an object.
    cls, obj = _maps_single(1)
    cls[2, 2] = 0
    write_label_map(cls, os.path.join(voc_root, "SegmentationClass", "b.png"))
    with pytest.raises(
        Seg2Error, match=r"SegmentationObject/b\.png: object 1 covers class value\(s\) \[0, 1\]"
    ):
        load_voc_instances(voc_root, "train")


def test_rgb_or_grayscale_mask_where_palette_expected(voc_root):
    cls, _ = _maps_single(1)
    path = os.path.join(voc_root, "SegmentationClass", "b.png")
    Image.fromarray(np.stack([cls * 128] * 3, axis=-1)).save(path)  # a colour-coded mask
    with pytest.raises(Seg2Error, match=r"b\.png: label map has PIL mode 'RGB'"):
        load_voc_sem_seg(voc_root, "train")
    Image.fromarray(cls, mode="L").save(path)  # indices, but not VOC's palette format
    with pytest.raises(
        Seg2Error,
        match=r"b\.png: label map has PIL mode 'L' but this dataset's label PNGs are palette",
    ):
        load_voc_instances(voc_root, "train")
    assert len(load_voc_sem_seg(voc_root, "train", require_palette=False, check_labels=True)) == 2


def test_builtin_voc_names_read_detectron2_datasets_layout(tmp_path):
    make_voc(tmp_path / "VOC2012")
    os.makedirs(tmp_path / "SBD" / "cls")
    _save_sbd_mat(str(tmp_path / "SBD" / "cls" / "x.mat"), _maps_single(3)[0])
    _write_image(str(tmp_path / "VOC2012" / "JPEGImages" / "x.jpg"))
    (tmp_path / "SBD" / "train.txt").write_text("x\n")
    (tmp_path / "SBD" / "val.txt").write_text("c\n")
    default_root = MetadataCatalog.get("voc_2012_sem_seg_val").dirname
    register_all_voc_2012(str(tmp_path))
    try:
        expected = {
            "voc_2012_sem_seg_train": (2, "sem_seg"),
            "voc_2012_sem_seg_val": (1, "sem_seg"),
            "voc_2012_sem_seg_train_aug": (3, "sem_seg"),
            "voc_2012_instance_train": (2, "coco_sem_seg"),
            "voc_2012_instance_val": (1, "coco_sem_seg"),
        }
        for name, (n, evaluator_type) in expected.items():
            records = DatasetCatalog.get(name)
            meta = MetadataCatalog.get(name)
            assert len(records) == n, name
            assert meta.evaluator_type == evaluator_type
            assert meta.thing_classes == list(VOC_CLASSES) and len(meta.stuff_classes) == 21
            assert (
                meta.ignore_label == 255
                and len(meta.stuff_colors) == 21
                and len(meta.thing_colors) == 20
            )
            has_inst, has_sem = "instance" in name, True
            assert all(
                ("annotations" in r) == has_inst and ("sem_seg_file_name" in r) == has_sem
                for r in records
            )
    finally:
        register_all_voc_2012(os.path.dirname(default_root))
    assert MetadataCatalog.get("voc_2012_sem_seg_val").dirname == default_root


def test_voc_instances_evaluate_with_detectron2_coco_evaluator(tmp_path):
    """Mask R-CNN is evaluated on VOC through COCOEvaluator: the records convert to COCO JSON, and
    predictions equal to the ground truth score AP 100 (box and mask)."""
    import torch
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    from seg2.data import register_voc_instances

    voc = make_voc(tmp_path / "VOC2012")
    register_voc_instances("t_voc_instance_eval", voc, "train")
    records = DatasetCatalog.get("t_voc_instance_eval")
    evaluator = COCOEvaluator(
        "t_voc_instance_eval", tasks=("bbox", "segm"), output_dir=str(tmp_path / "eval")
    )
    evaluator.reset()
    for r in records:
        annos = r["annotations"]
        inst = Instances((r["height"], r["width"]))
        inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in annos], dtype=torch.float32))
        inst.scores = torch.ones(len(annos))
        inst.pred_classes = torch.tensor([a["category_id"] for a in annos])
        inst.pred_masks = torch.stack(
            [torch.from_numpy(mask_util.decode(a["segmentation"])).bool() for a in annos]
        )
        evaluator.process(
            [{"image_id": r["image_id"], "file_name": r["file_name"]}], [{"instances": inst}]
        )
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0) and results["bbox"]["AP"] == pytest.approx(
        100.0
    )


def test_voc_sem_seg_evaluates_with_detectron2_sem_seg_evaluator(tmp_path):
    """The metadata suits SemSegEvaluator: ground truth as prediction gives mIoU 100 over the
    classes present; void pixels are not counted."""
    import torch
    from detectron2.evaluation import SemSegEvaluator

    from seg2.data import register_voc_sem_seg

    voc = make_voc(tmp_path / "VOC2012")
    register_voc_sem_seg("t_voc_sem_seg_eval", voc, "train")
    evaluator = SemSegEvaluator("t_voc_sem_seg_eval", distributed=False, output_dir=None)
    evaluator.reset()
    for r in DatasetCatalog.get("t_voc_sem_seg_eval"):
        label = torch.from_numpy(read_label_map(r["sem_seg_file_name"]).astype(np.int64))
        logits = torch.nn.functional.one_hot(label.clamp(max=20), 21).permute(2, 0, 1).float()
        logits[:, label == 255] = 0
        logits[0, label == 255] = 1  # void predicted as background: must not count as an error
        evaluator.process([{"file_name": r["file_name"]}], [{"sem_seg": logits}])
    res = evaluator.evaluate()["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0) and res["pACC"] == pytest.approx(100.0)
    assert res["IoU-person"] == pytest.approx(100.0)
