"""COCO loading with checks, semantic maps derived from instances, and their cache."""

import json
import logging
import multiprocessing as mp
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from PIL import Image
from pycocotools import mask as mask_util

from seg2 import Seg2Error
from seg2.data import (
    COCO_2017_SEM_SEG_SPLITS,
    check_coco_json,
    coco_sem_seg_map,
    generate_coco_sem_seg,
    load_coco_sem_seg,
    load_coco_with_sem_seg,
    read_label_map,
    register_all_coco_2017_sem_seg,
    register_coco_sem_seg,
)

S = 10  # images are S x S


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _box(r0, r1, c0, c1):
    return [c0, r0, c1 - c0, r1 - r0]


def coco_dict(categories=({"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}), cat=1, dog=3):
    small = np.zeros((S, S), np.uint8)
    small[4:6, 4:6] = 1
    rle = mask_util.encode(np.asfortranarray(small))
    rle["counts"] = rle["counts"].decode("ascii")
    crowd = np.zeros((S, S), np.uint8)
    crowd[5:9, :] = 1
    return {
        "images": [
            {"id": 1, "file_name": "img1.jpg", "height": S, "width": S},
            {"id": 2, "file_name": "img2.jpg", "height": S, "width": S},
        ],
        "annotations": [
            # a dog square (rows/cols 1-5), a smaller cat (RLE) partly on it, a crowd band below
            {
                "id": 1,
                "image_id": 1,
                "category_id": dog,
                "iscrowd": 0,
                "area": 25,
                "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]],
                "bbox": _box(1, 6, 1, 6),
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": cat,
                "iscrowd": 0,
                "area": 4,
                "segmentation": rle,
                "bbox": _box(4, 6, 4, 6),
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": cat,
                "iscrowd": 1,
                "area": 40,
                "segmentation": _uncompressed_rle(crowd),
                "bbox": _box(5, 9, 0, 10),
            },
        ],
        "categories": list(categories),
    }


def expected_map(dog_value=2, cat_value=1):
    sem = np.zeros((S, S), np.uint8)
    sem[5:9, :] = 255  # crowd, where no instance covers it
    sem[1:6, 1:6] = dog_value
    sem[4:6, 4:6] = cat_value  # smaller instance on top
    return sem


def write_coco(root, data=None, json_name="instances.json", image_dir="images"):
    os.makedirs(os.path.join(root, image_dir), exist_ok=True)
    data = data or coco_dict()
    for img in data["images"]:
        Image.fromarray(np.full((img["height"], img["width"], 3), 120, np.uint8)).save(
            os.path.join(root, image_dir, img["file_name"])
        )
    json_file = os.path.join(root, json_name)
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file, os.path.join(root, image_dir)


def test_semantic_map_rule_hand_computed(tmp_path):
    json_file, image_root = write_coco(str(tmp_path))
    records = load_coco_sem_seg(
        json_file, image_root, str(tmp_path / "cache"), dataset_name="t_coco_sem"
    )
    assert [os.path.basename(r["file_name"]) for r in records] == ["img1.jpg", "img2.jpg"]
    assert all("annotations" not in r for r in records)
    img = Image.open(records[0]["sem_seg_file_name"])
    assert img.mode == "P"
    np.testing.assert_array_equal(np.asarray(img), expected_map())
    np.testing.assert_array_equal(
        read_label_map(records[1]["sem_seg_file_name"]), np.zeros((S, S))
    )  # no objects
    meta = MetadataCatalog.get("t_coco_sem")
    assert meta.thing_classes == ["cat", "dog"] and meta.stuff_classes == [
        "background",
        "cat",
        "dog",
    ]
    assert meta.ignore_label == 255

    multi = load_coco_sem_seg(json_file, image_root, str(tmp_path / "cache"), with_instances=True)
    assert (
        len(multi[0]["annotations"]) == 3
        and multi[0]["sem_seg_file_name"] == records[0]["sem_seg_file_name"]
    )


def test_cache_is_reused_resumed_and_tied_to_its_source(tmp_path):
    json_file, image_root = write_coco(str(tmp_path))
    records = load_coco_with_sem_seg(json_file, image_root, dataset_name="t_coco_cache")
    cache = str(tmp_path / "cache")
    source = {"json_file": "instances.json", "json_bytes": 1}
    assert generate_coco_sem_seg(records, cache, source=source) == 2
    first = os.path.join(cache, "img1.png")
    mtime = os.stat(first).st_mtime_ns
    assert generate_coco_sem_seg(records, cache, source=source) == 0  # reused as it is
    assert os.stat(first).st_mtime_ns == mtime
    os.remove(first)  # as if the first run had been killed before writing it
    assert generate_coco_sem_seg(records, cache, source=source) == 1
    np.testing.assert_array_equal(read_label_map(first), expected_map())
    assert sorted(os.listdir(cache)) == [
        "img1.png",
        "img2.png",
        "seg2_source.json",
    ]  # no temp files left
    with pytest.raises(Seg2Error, match=r"cache holds semantic maps made from .*Delete the folder"):
        generate_coco_sem_seg(records, cache, source=dict(source, json_bytes=2))


def _generate_in_child(records, cache, queue):
    queue.put(generate_coco_sem_seg(records, cache, num_workers=2))


def test_generation_from_several_processes(tmp_path):
    json_file, image_root = write_coco(str(tmp_path))
    base = load_coco_with_sem_seg(json_file, image_root, dataset_name="t_coco_mp")[0]
    records = [dict(base, file_name=f"img{i}.jpg") for i in range(40)]
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_generate_in_child, args=(records, cache, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    written = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert sum(written) >= 40  # both may write a file; every file is written at least once
    assert sorted(os.listdir(cache)) == sorted(f"img{i}.png" for i in range(40))
    for i in range(40):
        np.testing.assert_array_equal(
            read_label_map(os.path.join(cache, f"img{i}.png")), expected_map()
        )


def test_shared_coco_shapes_fixture_loads_and_maps(shared_fixtures):
    from detectron2.config import get_cfg

    import seg2
    from seg2.data import MultiTaskDatasetMapper

    root = os.path.join(shared_fixtures, "coco_shapes")
    gt = json.load(open(os.path.join(root, "gt_dataset.json")))
    records = load_coco_with_sem_seg(
        os.path.join(root, "gt_dataset.json"), root, dataset_name="t_coco_shapes_fixture"
    )
    assert (
        len(records) == 3
        and sum(len(r["annotations"]) for r in records) == len(gt["annotations"]) == 9
    )
    assert MetadataCatalog.get("t_coco_shapes_fixture").thing_classes == [
        "cloud",
        "heart",
        "arrow",
        "star",
    ]
    for r in records:
        sem = coco_sem_seg_map(r)
        for a in r["annotations"]:
            m = mask_util.decode(
                mask_util.merge(mask_util.frPyObjects(a["segmentation"], 256, 256))
            ).astype(bool)
            # Shapes of an image do not overlap here, so each keeps all its pixels.
            assert (sem[m] == a["category_id"] + 1).all() and abs(
                int(m.sum()) - a.get("area", m.sum())
            ) <= 0.02 * m.sum()
        assert set(np.unique(sem)) == {0} | {a["category_id"] + 1 for a in r["annotations"]}

    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.MODEL.MASK_ON = True
    cfg.DATASETS.TRAIN = ("t_coco_shapes_fixture",)
    mapper = MultiTaskDatasetMapper(cfg, is_train=True)
    for r in records:
        out = mapper(r)
        inst = out["instances"]
        assert out["image"].shape == (3, 128, 128) and len(inst) == len(r["annotations"])
        assert inst.gt_classes.tolist() == [a["category_id"] for a in r["annotations"]]
        assert (inst.gt_masks.area() > 0).all()


# ---- bad input ----


def test_json_that_does_not_parse(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n{"id": 1,}\n')
    with pytest.raises(Seg2Error, match=r"broken\.json: not valid JSON \(.* at line 2"):
        load_coco_with_sem_seg(str(path), str(tmp_path))
    with pytest.raises(Seg2Error, match=r"missing\.json: COCO annotation file not found"):
        check_coco_json(str(tmp_path / "missing.json"))


def test_duplicate_image_ids(tmp_path):
    data = coco_dict()
    data["images"][1]["id"] = 1
    json_file, image_root = write_coco(str(tmp_path), data)
    with pytest.raises(
        Seg2Error,
        match=r"instances\.json: image id 1 appears twice \('img1\.jpg' and 'img2\.jpg'\)",
    ):
        load_coco_with_sem_seg(json_file, image_root)


def test_box_outside_the_image(tmp_path):
    data = coco_dict()
    data["annotations"][0]["bbox"] = [6.5, 1, 5, 5]  # x + w = 11.5: beyond the 1-pixel tolerance
    json_file, image_root = write_coco(str(tmp_path), data)
    with pytest.raises(
        Seg2Error,
        match=r"annotation 1 \(image id 1, 'img1\.jpg', 10x10\): bbox \[6\.5, 1, 5, 5\] \(XYWH\) lies outside",
    ):
        load_coco_with_sem_seg(json_file, image_root)
    data["annotations"][0]["bbox"] = [6, 1, 5, 5]  # within the 1-pixel tolerance for rounding
    json_file, image_root = write_coco(str(tmp_path), data)
    assert len(load_coco_with_sem_seg(json_file, image_root)[0]["annotations"]) == 3


def test_polygons_with_fewer_than_3_points_are_a_counted_skip(tmp_path, caplog):
    data = coco_dict()
    data["annotations"][0]["segmentation"].append([1, 1, 2, 2])  # 2 points, beside a valid polygon
    data["annotations"].append(
        {
            "id": 7,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 0,
            "area": 2,
            "segmentation": [[1, 1, 3, 3]],
            "bbox": [1, 1, 2, 2],
        }
    )
    json_file, image_root = write_coco(str(tmp_path), data)
    with caplog.at_level(logging.WARNING):
        records = load_coco_with_sem_seg(json_file, image_root)
    ours = [r for r in caplog.records if "fewer than 3 points" in r.getMessage()]
    stats = check_coco_json(json_file)
    assert stats["short_polygons"] == 2 and stats["annotations_without_valid_polygon"] == 1
    assert (
        len(ours) == 1
        and "skipping 2 polygon(s)" in ours[0].getMessage()
        and "ids 7" in ours[0].getMessage()
    )
    assert [a["id"] for a in records[0]["annotations"]] == [1, 2, 3] and records[1][
        "annotations"
    ] == []
    assert records[0]["annotations"][0]["segmentation"] == [[1, 1, 6, 1, 6, 6, 1, 6]]


def test_rle_of_wrong_size_and_missing_image(tmp_path):
    data = coco_dict()
    data["annotations"][2]["segmentation"]["size"] = [S, S + 1]
    json_file, image_root = write_coco(str(tmp_path / "a"), data)
    with pytest.raises(Seg2Error, match=r"annotation 3 .*RLE size \[10, 11\] is not the image's"):
        load_coco_with_sem_seg(json_file, image_root)
    json_file, image_root = write_coco(str(tmp_path / "b"))
    os.remove(os.path.join(image_root, "img2.jpg"))
    with pytest.raises(
        Seg2Error, match=r"img2\.jpg: image for id 2 listed in .*instances\.json not found"
    ):
        load_coco_with_sem_seg(json_file, image_root)


def test_images_without_annotations_are_kept_then_skipped_in_training_with_a_count(
    tmp_path, caplog
):
    json_file, image_root = write_coco(str(tmp_path))
    register_coco_sem_seg(
        "t_coco_multitask", json_file, image_root, str(tmp_path / "cache"), with_instances=True
    )
    assert check_coco_json(json_file)["images_without_annotations"] == 1
    assert len(DatasetCatalog.get("t_coco_multitask")) == 2  # evaluation sees every image
    with caplog.at_level(logging.INFO):
        train = get_detection_dataset_dicts(["t_coco_multitask"], filter_empty=True)
    assert [os.path.basename(r["file_name"]) for r in train] == ["img1.jpg"]
    assert any(
        "Removed 1 images with no usable annotations" in r.getMessage() for r in caplog.records
    )
    assert MetadataCatalog.get("t_coco_multitask").evaluator_type == "coco_sem_seg"


def test_builtin_coco_2017_names(tmp_path):
    for name, (_, _, with_instances) in COCO_2017_SEM_SEG_SPLITS.items():
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == ("coco_sem_seg" if with_instances else "sem_seg")
        assert (
            len(meta.thing_classes) == 80
            and meta.stuff_classes[0] == "background"
            and len(meta.stuff_classes) == 81
        )
        assert meta.ignore_label == 255 and len(meta.stuff_colors) == 81
        # COCO's things as detectron2 registers them for its own coco_2017_* names
        for key in ("thing_classes", "thing_colors", "thing_dataset_id_to_contiguous_id"):
            assert meta.get(key) == MetadataCatalog.get("coco_2017_val").get(key), (name, key)
        assert meta.stuff_classes[1:] == meta.thing_classes
    for name in ("coco_2017_train", "coco_2017_val"):
        # detectron2's own names are left as detectron2 registers them: nothing semantic added
        meta = MetadataCatalog.get(name).as_dict()
        assert not {"stuff_classes", "stuff_colors", "ignore_label", "sem_seg_root"} & set(meta), (
            name,
            sorted(meta),
        )
        assert meta["evaluator_type"] == "coco" and len(meta["thing_classes"]) == 80

    # A tiny copy of the real layout under $DETECTRON2_DATASETS/coco, with COCO's own category ids.
    things = [c for c in COCO_CATEGORIES if c["isthing"]]
    dog, cat = (
        [c["id"] for c in things if c["name"] == "dog"][0],
        [c["id"] for c in things if c["name"] == "cat"][0],
    )
    data = coco_dict(
        categories=[{"id": c["id"], "name": c["name"]} for c in things], cat=cat, dog=dog
    )
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "coco", "annotations"))
    write_coco(
        os.path.join(root, "coco"),
        data,
        json_name="annotations/instances_val2017.json",
        image_dir="val2017",
    )
    default_json = MetadataCatalog.get("coco_2017_multitask_val").json_file
    register_all_coco_2017_sem_seg(root)
    try:
        sem = DatasetCatalog.get("coco_2017_sem_seg_val")
        multi = DatasetCatalog.get("coco_2017_multitask_val")
        names = MetadataCatalog.get("coco_2017_sem_seg_val").thing_classes
        expected = expected_map(dog_value=names.index("dog") + 1, cat_value=names.index("cat") + 1)
        np.testing.assert_array_equal(read_label_map(sem[0]["sem_seg_file_name"]), expected)
        assert sem[0]["sem_seg_file_name"] == os.path.join(
            root, "coco", "seg2_sem_seg", "val2017", "img1.png"
        )
        assert all("annotations" in r and "sem_seg_file_name" in r for r in multi)
    finally:
        register_all_coco_2017_sem_seg(
            os.path.dirname(os.path.dirname(os.path.dirname(default_json)))
        )
    assert MetadataCatalog.get("coco_2017_multitask_val").json_file == default_json


# ---- faults found at load, not after training (issue 23) ----


def test_annotation_without_area_is_an_error_at_load(tmp_path):
    """pycocotools' COCOeval needs every annotation's area (KeyError at evaluation, after
    training): an error at load naming the file, the ids and the count."""
    data = coco_dict()
    del data["annotations"][0]["area"]
    del data["annotations"][2]["area"]
    json_file, image_root = write_coco(str(tmp_path / "a"), data)
    with pytest.raises(
        Seg2Error, match=r"instances\.json: 2 annotation\(s\) have no 'area' \(ids 1, 3\)"
    ):
        load_coco_with_sem_seg(json_file, image_root)
    data = coco_dict()
    data["annotations"][1]["area"] = "4"
    json_file, image_root = write_coco(str(tmp_path / "b"), data)
    with pytest.raises(
        Seg2Error, match=r"annotation 2 \(image id 1.*area '4' is not a non-negative number"
    ):
        load_coco_with_sem_seg(json_file, image_root)


def test_image_size_differing_from_the_json_is_an_error_at_load(tmp_path):
    json_file, image_root = write_coco(str(tmp_path))
    Image.fromarray(np.zeros((S, S + 2, 3), np.uint8)).save(os.path.join(image_root, "img2.jpg"))
    with pytest.raises(
        Seg2Error,
        match=r"img2\.jpg: image is 12x10 \(WxH.*instances\.json gives image id 2 as 10x10",
    ):
        load_coco_with_sem_seg(json_file, image_root)
    # check_images=False leaves it to the mapper (detectron2's SizeMismatchError), as documented
    assert len(load_coco_with_sem_seg(json_file, image_root, check_images=False)) == 2


def test_image_size_is_compared_after_exif_orientation(tmp_path):
    """A JPEG stored 14x10 with EXIF orientation 6 (rotate 90) is 10x14 for detectron2's
    read_image, which the JSON must give; the stored size is then an error."""
    from detectron2.data.detection_utils import read_image

    data = coco_dict()
    data["images"][1].update(width=10, height=14)
    json_file, image_root = write_coco(str(tmp_path), data)
    path = os.path.join(image_root, "img2.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(path, exif=exif)
    assert read_image(path).shape[:2] == (14, 10)  # (H, W) as detectron2 reads it
    assert len(load_coco_with_sem_seg(json_file, image_root)) == 2
    data["images"][1].update(width=14, height=10)
    with open(json_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(
        Seg2Error, match=r"img2\.jpg: image is 10x14 \(WxH, after its EXIF orientation\)"
    ):
        load_coco_with_sem_seg(json_file, image_root)


def test_polygon_outside_the_image_is_an_error_at_load(tmp_path):
    data = coco_dict()
    # Inside its (in-image) box but drawn in another scale: rasterising would cut it off silently.
    data["annotations"][0]["segmentation"] = [[1, 1, 60, 1, 60, 6, 1, 6]]
    json_file, image_root = write_coco(str(tmp_path / "a"), data)
    with pytest.raises(
        Seg2Error,
        match=r"annotation 1 \(image id 1, 'img1\.jpg', 10x10\): polygon 0 has 2 of its 4 "
        r"points outside .*\(60, 1\)",
    ):
        load_coco_with_sem_seg(json_file, image_root)
    data["annotations"][0]["segmentation"] = [[1, 1, 6, 1, 6, "6", 1, 6]]
    json_file, image_root = write_coco(str(tmp_path / "b"), data)
    with pytest.raises(Seg2Error, match=r"annotation 1 .*polygon 0 is not a flat list of numbers"):
        load_coco_with_sem_seg(json_file, image_root)
    data["annotations"][0]["segmentation"] = [
        [-0.5, 1, 10.5, 1, 10.5, 6, 1, 6]
    ]  # within 1 px: kept
    json_file, image_root = write_coco(str(tmp_path / "c"), data)
    assert len(load_coco_with_sem_seg(json_file, image_root)[0]["annotations"]) == 3


def test_json_without_images_or_with_malformed_images(tmp_path):
    data = coco_dict()
    data["images"], data["annotations"] = [], []
    json_file, image_root = write_coco(str(tmp_path / "a"), data)
    with pytest.raises(Seg2Error, match=r"instances\.json: no images \(an empty split\)"):
        load_coco_with_sem_seg(json_file, image_root)
    for key, value, message in [
        ("height", None, "image id 2 has no 'height'"),
        ("width", 10.0, r"image id 2: width 10\.0 is not a positive integer"),
    ]:
        data = coco_dict()
        json_file, image_root = write_coco(str(tmp_path / key), data)
        if value is None:
            del data["images"][1][key]
        else:
            data["images"][1][key] = value
        with open(json_file, "w") as f:
            json.dump(data, f)
        with pytest.raises(Seg2Error, match=message):
            check_coco_json(json_file)


def test_empty_or_broken_test_split_is_an_error_before_training(tmp_path):
    """seg2.engine.setup (tools/train_net.py) loads the test splits before anything is built:
    an empty split (detectron2 asserts "Dataset is empty" after training) and a test JSON that
    fails the checks are one Seg2Error each, before training starts."""
    from detectron2.engine import default_argument_parser

    from seg2.data import register_coco_with_sem_seg, register_dataset
    from seg2.engine import setup

    classes = {"stuff_classes": ["background", "circle", "square", "triangle"], "ignore_label": 255}
    register_dataset(
        "seg2_test_empty_split",
        lambda: [],
        dict(classes),  # the config's 4 classes
    )
    data = coco_dict()
    del data["annotations"][1]["area"]
    json_file, image_root = write_coco(str(tmp_path / "coco"), data)
    register_coco_with_sem_seg(
        "seg2_test_broken_split",
        json_file,
        image_root,
        str(tmp_path / "none"),
        metadata=dict(classes),
    )
    config = os.path.join(
        os.path.dirname(__file__), "..", "configs", "quickstart", "unet_tiny_shapes_cpu.yaml"
    )
    for name, message in [
        (
            "seg2_test_empty_split",
            r"DATASETS\.TEST names 'seg2_test_empty_split', which has no records",
        ),
        ("seg2_test_broken_split", r"instances\.json: 1 annotation\(s\) have no 'area' \(ids 2\)"),
    ]:
        args = default_argument_parser().parse_args(
            [
                "--config-file",
                config,
                "OUTPUT_DIR",
                str(tmp_path / name),
                "DATASETS.TEST",
                f"('{name}',)",
            ]
        )
        with pytest.raises(Seg2Error, match=message):
            setup(args)


def test_semantic_maps_holding_only_0_and_255_are_warned_about_at_load(tmp_path, caplog):
    """COCO images with user label maps saved as 0/255 (255 is void): one warning at load."""
    json_file, image_root = write_coco(str(tmp_path))
    sem_root = tmp_path / "sem"
    os.makedirs(sem_root)
    for name in ("img1", "img2"):
        m = np.zeros((S, S), np.uint8)
        m[2:5, 2:5] = 255
        Image.fromarray(m, mode="L").save(sem_root / f"{name}.png")
    with caplog.at_level(logging.WARNING, logger="seg2.data.label_map"):
        load_coco_with_sem_seg(json_file, image_root, str(sem_root))
    warnings = [r.getMessage() for r in caplog.records if "only non-zero value" in r.getMessage()]
    assert len(warnings) == 1 and "img1.png" in warnings[0] and "value_map={255: 1}" in warnings[0]
