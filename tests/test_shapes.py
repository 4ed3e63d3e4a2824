"""The synthetic shapes generator: determinism, agreement of its COCO and VOC views, cache safety."""

import json
import logging
import multiprocessing as mp
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from seg2 import Seg2Error
from seg2.data import generate_shapes
from seg2.data.shapes import MANIFEST, SHAPES_CLASSES, shapes_digest

SPLITS = {"train": 6, "val": 3}


def _gen(root, seed=0):
    return generate_shapes(str(root), splits=SPLITS, image_size=64, seed=seed)


def test_same_seed_gives_byte_identical_files(tmp_path):
    a, b, c = _gen(tmp_path / "a"), _gen(tmp_path / "b"), _gen(tmp_path / "c", seed=1)
    assert shapes_digest(a) == shapes_digest(b)
    assert shapes_digest(a) != shapes_digest(c)
    files = sorted(os.listdir(os.path.join(a, "VOC2012", "JPEGImages")))
    assert len(files) == sum(SPLITS.values())


def test_layouts_are_the_real_ones(tiny_shapes_root):
    voc = os.path.join(tiny_shapes_root, "VOC2012")
    names = open(os.path.join(voc, "ImageSets", "Segmentation", "train.txt")).read().split()
    assert len(names) == 8
    for sub, ext in (
        ("JPEGImages", ".jpg"),
        ("SegmentationClass", ".png"),
        ("SegmentationObject", ".png"),
    ):
        assert all(os.path.isfile(os.path.join(voc, sub, n + ext)) for n in names)
    cls_png = Image.open(os.path.join(voc, "SegmentationClass", names[0] + ".png"))
    assert cls_png.mode == "P"
    # VOC's colour map: class 1 is (128, 0, 0), void (255) is (224, 224, 192).
    pal = cls_png.getpalette()
    assert pal[3:6] == [128, 0, 0] and pal[255 * 3 : 255 * 3 + 3] == [224, 224, 192]
    coco = json.load(
        open(os.path.join(tiny_shapes_root, "coco", "annotations", "instances_train.json"))
    )
    assert [c["name"] for c in coco["categories"]] == list(SHAPES_CLASSES)
    assert len(coco["images"]) == 8
    assert all(
        isinstance(a["segmentation"], list) and len(a["segmentation"][0]) >= 6
        for a in coco["annotations"]
    )


def test_coco_and_voc_views_agree(tiny_shapes_root):
    """Off the void border, every JSON instance mask equals its SegmentationObject region."""
    voc = os.path.join(tiny_shapes_root, "VOC2012")
    overlapping_images = 0
    for split in ("train", "val"):
        coco = json.load(
            open(os.path.join(tiny_shapes_root, "coco", "annotations", f"instances_{split}.json"))
        )
        anns_by_image = {}
        for a in sorted(coco["annotations"], key=lambda a: a["id"]):
            anns_by_image.setdefault(a["image_id"], []).append(a)
        for img in coco["images"]:
            stem = os.path.splitext(img["file_name"])[0]
            obj = np.array(Image.open(os.path.join(voc, "SegmentationObject", stem + ".png")))
            sem = np.array(Image.open(os.path.join(voc, "SegmentationClass", stem + ".png")))
            anns = anns_by_image[img["id"]]
            assert len(anns) >= 1
            assert set(np.unique(obj)) <= set(range(len(anns) + 1)) | {255}
            assert np.array_equal(obj == 255, sem == 255)
            valid = obj != 255
            assert valid.mean() > 0.6  # the void band is a border, not the image
            boxes = []
            for k, a in enumerate(anns, start=1):
                m = mask_util.decode(
                    mask_util.frPyObjects(a["segmentation"], img["height"], img["width"])
                )
                m = m.max(axis=2).astype(bool)
                assert np.array_equal(m & valid, obj == k)
                assert (obj == k).sum() > 0
                assert np.all(sem[obj == k] == a["category_id"])
                assert a["area"] == pytest.approx(m.sum())
                boxes.append(a["bbox"])
            assert np.array_equal((sem != 0) & valid, (obj != 0) & valid)
            # Overlap: some pair of boxes intersects.
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    (x0, y0, w0, h0), (x1, y1, w1, h1) = boxes[i], boxes[j]
                    if min(x0 + w0, x1 + w1) > max(x0, x1) and min(y0 + h0, y1 + h1) > max(y0, y1):
                        overlapping_images += 1
    assert overlapping_images > 0


def _generate_in_child(root):
    generate_shapes(root, splits=SPLITS, image_size=64, seed=0)


def test_two_processes_generating_at_once(tmp_path):
    reference = shapes_digest(_gen(tmp_path / "ref"))
    root = str(tmp_path / "shared")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_generate_in_child, args=(root,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert shapes_digest(root) == reference
    leftovers = [
        n for n in os.listdir(tmp_path) if n.startswith(".tmp-") or n.startswith(".trash-")
    ]
    assert leftovers == []


def test_damaged_or_half_written_cache_is_regenerated(tmp_path, caplog):
    root = _gen(tmp_path / "s")
    reference = shapes_digest(root)
    # A file lost after the fact.
    os.remove(os.path.join(root, "VOC2012", "SegmentationObject", "shapes_train_00002.png"))
    with caplog.at_level(logging.WARNING, logger="seg2.data.shapes"):
        _gen(tmp_path / "s")
    assert "shapes_train_00002.png is missing" in caplog.text
    assert shapes_digest(root) == reference
    # An interrupted run of an older version: files without a manifest.
    os.remove(os.path.join(root, MANIFEST))
    with open(os.path.join(root, "coco", "annotations", "instances_val.json"), "w") as f:
        f.write('{"images": [')
    _gen(tmp_path / "s")
    assert shapes_digest(root) == reference


def test_unwritable_cache_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(Seg2Error, match="cannot write the seg2_shapes cache"):
        generate_shapes(str(blocker / "shapes"), splits=SPLITS, image_size=64)


def test_registered_names_use_a_custom_cache_as_it_is(tiny_shapes_root):
    """SEG2.SHAPES_ROOT pointing at a cache made with other parameters is read, not regenerated."""
    from detectron2.data import DatasetCatalog

    from seg2.data import register_seg2_shapes
    from seg2.data.shapes import default_shapes_root

    before = shapes_digest(tiny_shapes_root)
    register_seg2_shapes(tiny_shapes_root)
    try:
        records = DatasetCatalog.get("seg2_shapes_train")
    finally:
        register_seg2_shapes(default_shapes_root())
    assert len(records) == 8 and all(r["height"] == 64 for r in records)
    assert shapes_digest(tiny_shapes_root) == before
