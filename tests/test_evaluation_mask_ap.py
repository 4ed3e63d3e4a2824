"""MaskAPEvaluator: the shared pycocotools fixture, equality with COCOEvaluator and COCOeval, bad input."""

import contextlib
import io
import json
import math
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data.datasets import load_coco_json
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from seg2 import Seg2Error
from seg2.data import register_dataset
from seg2.evaluation import MaskAPEvaluator, encode_masks

SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _register(name, loader, **meta):
    return register_dataset(name, loader, meta)


def _instances(h, w, masks, boxes_xyxy, scores, classes):
    inst = Instances((h, w))
    inst.pred_masks = torch.as_tensor(np.asarray(masks, dtype=bool).reshape(-1, h, w))
    inst.pred_boxes = Boxes(
        torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4))
    )
    inst.scores = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    inst.pred_classes = torch.as_tensor(np.asarray(classes, dtype=np.int64))
    return inst


def _run(evaluator, inputs, outputs):
    evaluator.reset()
    for i, o in zip(inputs, outputs):
        evaluator.process([i], [o])
    return evaluator.evaluate()


def _same(a, b, keys, tol=0.0):
    for k in keys:
        if math.isnan(b[k]):
            assert math.isnan(a[k]), k
        else:
            assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


# ----------------------------------------------------------------------------- the shared fixture


@pytest.fixture(scope="module")
def coco_shapes(shared_fixtures):
    """The fixture's GT as a registered dataset and its detections as model outputs."""
    folder = os.path.join(shared_fixtures, "coco_shapes")
    gt_file = os.path.join(folder, "gt_dataset.json")
    gt = json.load(open(gt_file))
    cat_ids = sorted(c["id"] for c in gt["categories"])
    name = _register(
        "seg2_test_coco_shapes_fixture",
        lambda: load_coco_json(gt_file, folder),
        json_file=gt_file,
        thing_classes=[c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])],
        thing_dataset_id_to_contiguous_id={cid: i for i, cid in enumerate(cat_ids)},
        evaluator_type="coco",
    )
    dets = json.load(open(os.path.join(folder, "dt_dataset.json")))
    inputs, outputs = [], []
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        mine = [d for d in dets if d["image_id"] == img["id"]]
        masks = [
            mask_util.decode(mask_util.merge(mask_util.frPyObjects(d["segmentation"], h, w)))
            for d in mine
        ]
        boxes = [[x, y, x + bw, y + bh] for x, y, bw, bh in (d["bbox"] for d in mine)]
        inst = _instances(
            h,
            w,
            masks,
            boxes,
            [d["score"] for d in mine],
            [cat_ids.index(d["category_id"]) for d in mine],
        )
        inputs.append({"image_id": img["id"], "file_name": os.path.join(folder, img["file_name"])})
        outputs.append({"instances": inst})
    expected = json.load(open(os.path.join(folder, "expected_pycocotools.json")))
    return name, inputs, outputs, expected, gt_file


@pytest.mark.parametrize("backend", ["pycocotools", "detectron2_fast"])
def test_reproduces_expected_pycocotools(coco_shapes, backend):
    name, inputs, outputs, expected, _ = coco_shapes
    # Default options: the fixture's numbers come from pycocotools on detections carrying a box and
    # a
    # mask, which sizes a segm detection by its box (segm_area="box", the default).
    res = _run(MaskAPEvaluator(name, distributed=False, backend=backend), inputs, outputs)
    for task in ("segm", "bbox"):
        for key in SUMMARY:
            want = expected[task][key]
            got = res[task][key]
            if want == -1.0:
                assert math.isnan(got), (task, key)
            else:
                assert abs(got / 100 - want) <= 5e-7, (task, key, got, want)


def test_mask_area_option_equals_detectron2_and_pycocotools(coco_shapes):
    name, inputs, outputs, expected, gt_file = coco_shapes
    ours = _run(MaskAPEvaluator(name, distributed=False, segm_area="mask"), inputs, outputs)
    for fast in (False, True):
        ref = _run(
            COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, use_fast_impl=fast),
            inputs,
            outputs,
        )
        for task in ("bbox", "segm"):
            assert set(ref[task]) <= set(ours[task])
            # same COCOeval class: bit-identical; C++ against Python accumulate: last-bit rounding
            _same(ours[task], ref[task], ref[task].keys(), tol=0.0 if fast else 1e-9)
    # and pycocotools itself, on the detections without their boxes (mask areas), as COCO's segm
    # format
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        dets = json.load(open(os.path.join(os.path.dirname(gt_file), "dt_dataset.json")))
        for d in dets:
            d.pop("bbox")
            d["segmentation"] = mask_util.merge(mask_util.frPyObjects(d["segmentation"], 256, 256))
        E = COCOeval(gt, gt.loadRes(dets), "segm")
        E.evaluate(), E.accumulate(), E.summarize()
    for key, value in zip(SUMMARY, E.stats):
        assert (
            math.isnan(ours["segm"][key])
            if value < 0
            else abs(ours["segm"][key] / 100 - value) < 1e-12
        ), key
    assert ours["segm"]["APm"] != pytest.approx(
        expected["segm"]["APm"] * 100
    )  # the one size-dependent change


# ----------------------------------------------------------------------------- tiny shapes


@pytest.fixture(scope="module")
def shapes_val(tiny_shapes_root):
    json_file = os.path.join(tiny_shapes_root, "coco", "annotations", "instances_val.json")
    image_root = os.path.join(tiny_shapes_root, "coco", "val")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
    cat_ids = sorted(gt.getCatIds())
    meta = dict(
        thing_classes=[gt.cats[c]["name"] for c in cat_ids],
        thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(cat_ids)},
    )
    with_json = _register(
        "seg2_test_ap_val",
        lambda: load_coco_json(json_file, image_root),
        json_file=json_file,
        **meta,
    )
    nojson = "seg2_test_ap_val_nojson"  # records with contiguous category ids, as load_coco_json gives them
    without_json = _register(nojson, lambda: load_coco_json(json_file, image_root, nojson), **meta)
    return with_json, without_json, gt


def _perturbed_predictions(gt, seed=0, extra=6):
    """Per image: every GT mask shifted by a few pixels plus random false positives, random scores."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(gt.getCatIds())
    inputs, outputs = [], []
    for img_id in sorted(gt.getImgIds()):
        img = gt.imgs[img_id]
        h, w = img["height"], img["width"]
        masks, classes = [], []
        for ann in gt.loadAnns(gt.getAnnIds(imgIds=img_id)):
            masks.append(
                np.roll(gt.annToMask(ann), int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))
            )
            classes.append(cat_ids.index(ann["category_id"]))
        for _ in range(extra):
            m = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            m[y : y + rng.integers(3, 20), x : x + rng.integers(3, 20)] = 1
            masks.append(m)
            classes.append(int(rng.integers(0, len(cat_ids))))
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append(
                [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 1, 1]
            )
        scores = np.round(rng.random(len(masks)), 1)  # rounded: many score ties
        inputs.append({"image_id": img_id})
        outputs.append({"instances": _instances(h, w, masks, boxes, scores, classes)})
    return inputs, outputs


def test_backends_and_detectron2_agree(shapes_val):
    name, _, gt = shapes_val
    inputs, outputs = _perturbed_predictions(gt)
    slow = _run(MaskAPEvaluator(name, distributed=False, backend="pycocotools"), inputs, outputs)
    fast = _run(
        MaskAPEvaluator(name, distributed=False, backend="detectron2_fast"), inputs, outputs
    )
    # detectron2's COCOEvaluator sizes segm detections by their mask: compare it with
    # segm_area="mask".
    slow_mask_area = _run(
        MaskAPEvaluator(name, distributed=False, backend="pycocotools", segm_area="mask"),
        inputs,
        outputs,
    )
    ref = _run(
        COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, use_fast_impl=False),
        inputs,
        outputs,
    )
    for task in ("bbox", "segm"):
        _same(fast[task], slow[task], slow[task].keys(), tol=1e-9)
        _same(slow_mask_area[task], ref[task], ref[task].keys())
        _same(slow[task], ref[task], ("AP", "AP50", "AP75"))  # the size-independent numbers
        assert 5 < slow[task]["AP"] < 95


def test_converted_dataset_equals_json_dataset(shapes_val):
    with_json, without_json, gt = shapes_val
    inputs, outputs = _perturbed_predictions(gt, seed=1)
    a = _run(MaskAPEvaluator(with_json, distributed=False), inputs, outputs)
    b = _run(MaskAPEvaluator(without_json, distributed=False), inputs, outputs)
    for task in ("bbox", "segm"):
        _same(b[task], a[task], a[task].keys())


def test_only_processed_images_and_misses(shapes_val):
    name, _, gt = shapes_val
    img_ids = sorted(gt.getImgIds())
    inputs, outputs = [], []
    cat_ids = sorted(gt.getCatIds())
    for img_id in img_ids:  # perfect predictions
        img = gt.imgs[img_id]
        anns = gt.loadAnns(gt.getAnnIds(imgIds=img_id))
        masks = [gt.annToMask(a) for a in anns]
        boxes = [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns
        ]
        inst = _instances(
            img["height"],
            img["width"],
            masks,
            boxes,
            np.linspace(0.9, 0.5, len(anns)),
            [cat_ids.index(a["category_id"]) for a in anns],
        )
        inputs.append({"image_id": img_id})
        outputs.append({"instances": inst})
    ev = MaskAPEvaluator(name, distributed=False, tasks=("segm",))
    two = _run(ev, inputs[:2], outputs[:2])["segm"]
    assert two["AP"] == pytest.approx(100.0)  # the two unprocessed images do not count
    # a third image processed with no detection: its objects are misses
    empty = _instances(gt.imgs[img_ids[2]]["height"], gt.imgs[img_ids[2]]["width"], [], [], [], [])
    three = _run(ev, inputs[:2] + [inputs[2]], outputs[:2] + [{"instances": empty}])["segm"]
    assert three["AR100"] < 100.0 and three["AP"] < 100.0
    n_missed = len(gt.getAnnIds(imgIds=img_ids[2]))
    assert n_missed > 0
    # no detection at all: AP 0 over images that have objects
    none = _run(ev, [inputs[2]], [{"instances": empty}])["segm"]
    assert none["AP"] == 0.0 and none["AR100"] == 0.0


@pytest.mark.parametrize("shape", [(17, 23), (16, 24), (1, 8), (9, 1), (40, 64)])
def test_encode_masks_equals_pycocotools(shape):
    h, w = shape
    rng = np.random.default_rng(h * w)
    masks = np.concatenate(
        [(rng.random((3, h, w)) < p).astype(np.uint8) for p in (0.05, 0.5, 0.95)]
    )
    edge = np.zeros((5, h, w), np.uint8)
    edge[1] = 1  # full
    edge[2, -1, -1] = 1  # last pixel only
    edge[3, :, -1] = 1  # last column, full height
    edge[4, :, : (w + 1) // 2] = 1  # full-height block: runs continue across columns
    masks = np.concatenate([masks, edge])  # edge[0] stays empty
    ref = [mask_util.encode(np.asfortranarray(m)) for m in masks]
    assert encode_masks(torch.from_numpy(masks).bool()) == ref
    assert encode_masks(torch.from_numpy(masks)) == ref  # uint8 0/1 as well


def test_bad_input(shapes_val, tmp_path):
    name, _, gt = shapes_val
    inputs, outputs = _perturbed_predictions(gt)
    ev = MaskAPEvaluator(name, distributed=False)
    inst = outputs[0]["instances"]
    h, w = inst.image_size
    with pytest.raises(ValueError, match=r"pred_classes \[3\]"):
        bad = _instances(h, w, inst.pred_masks[:1], inst.pred_boxes.tensor[:1], [0.5], [3])
        ev.process(inputs[:1], [{"instances": bad}])
    with pytest.raises(ValueError, match="do not match the image size"):
        bad = _instances(h - 1, w, inst.pred_masks[:1, 1:], inst.pred_boxes.tensor[:1], [0.5], [0])
        ev.process(inputs[:1], [{"instances": bad}])
    with pytest.raises(ValueError, match="NaN"):
        ev.process(
            inputs[:1],
            [
                {
                    "instances": _instances(
                        h, w, inst.pred_masks[:1], inst.pred_boxes.tensor[:1], [float("nan")], [0]
                    )
                }
            ],
        )
    with pytest.raises(ValueError, match="bool"):
        soft = inst[:1]
        soft.pred_masks = soft.pred_masks.float() * 0.7
        ev.process(inputs[:1], [{"instances": soft}])
    with pytest.raises(Seg2Error, match="not in dataset"):
        ev.process([{"image_id": 987654}], outputs[:1])
    assert ev.evaluate() == {}  # nothing was recorded by the failed calls
    ev.process(inputs[:1], outputs[:1])
    with pytest.raises(ValueError, match="twice"):
        ev.process(inputs[:1], outputs[:1])
    # an empty dataset
    empty_json = tmp_path / "empty.json"
    empty_json.write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]})
    )
    empty = _register(
        "seg2_test_ap_empty", lambda: [], json_file=str(empty_json), thing_classes=["a"]
    )
    with pytest.raises(Seg2Error, match="no images"):
        MaskAPEvaluator(empty)


# ----------------------------------------------------------------------------- max detections per
# image


@pytest.mark.parametrize("backend", ["pycocotools", "detectron2_fast"])
def test_max_dets_per_image_equals_detectron2(shapes_val, backend):
    name, _, gt = shapes_val
    inputs, outputs = _perturbed_predictions(
        gt, seed=2, extra=60
    )  # ~20 false positives per class and image
    k = 12
    ours = _run(
        MaskAPEvaluator(
            name, distributed=False, backend=backend, segm_area="mask", max_dets_per_image=k
        ),
        inputs,
        outputs,
    )
    ref = _run(
        COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, max_dets_per_image=k),
        inputs,
        outputs,
    )
    default = _run(
        MaskAPEvaluator(name, distributed=False, backend=backend, segm_area="mask"), inputs, outputs
    )
    for task in ("bbox", "segm"):
        _same(ours[task], ref[task], ref[task].keys(), tol=1e-9)
        assert f"AR{k}" in ours[task] and "AR100" not in ours[task]
        assert (
            ours[task]["AR1"] == default[task]["AR1"]
            and ours[task]["AR10"] == default[task]["AR10"]
        )
        # fewer detections counted: recall at k cannot exceed recall at 100, and here it is lower
        assert ours[task][f"AR{k}"] < default[task]["AR100"]
    for bad in (0, 9, 12.5, True):
        with pytest.raises(
            ValueError, match=f"max_dets_per_image={bad!r}: a number of detections per image >= 10"
        ):
            MaskAPEvaluator(name, max_dets_per_image=bad)


def test_max_dets_per_image_by_hand(shapes_val):
    """One image, its objects found with the lowest scores behind k false positives of each of their
    classes (COCOeval applies maxDets per image and category): with k detections counted nothing is
    found (AP 0); with k + objects all of them are (AR 100)."""
    name, _, gt = shapes_val
    img_id = sorted(gt.getImgIds())[0]
    img = gt.imgs[img_id]
    h, w = img["height"], img["width"]
    cat_ids = sorted(gt.getCatIds())
    anns = gt.loadAnns(gt.getAnnIds(imgIds=img_id))
    present = sorted({cat_ids.index(a["category_id"]) for a in anns})
    k = 12
    far = np.zeros((h, w), np.uint8)
    far[:2, :2] = 1  # a tiny square no object covers
    masks = [far] * (k * len(present)) + [gt.annToMask(a) for a in anns]
    boxes = [[0, 0, 2, 2]] * (k * len(present))
    boxes += [
        [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
        for a in anns
    ]
    scores = [0.9] * (k * len(present)) + [0.1] * len(anns)
    classes = [c for c in present for _ in range(k)] + [
        cat_ids.index(a["category_id"]) for a in anns
    ]
    out = [{"instances": _instances(h, w, masks, boxes, scores, classes)}]
    n = k + len(anns)
    few = _run(
        MaskAPEvaluator(name, distributed=False, tasks=("segm",), max_dets_per_image=k),
        [{"image_id": img_id}],
        out,
    )
    enough = _run(
        MaskAPEvaluator(name, distributed=False, tasks=("segm",), max_dets_per_image=n),
        [{"image_id": img_id}],
        out,
    )
    assert few["segm"]["AP"] == 0.0 and few["segm"][f"AR{k}"] == 0.0
    assert enough["segm"][f"AR{n}"] == pytest.approx(100.0) and enough["segm"]["AP"] > 0


# ----------------------------------------------------------------------------- per-class AP table


def test_per_class_ap_follows_category_ids_not_their_order(shapes_val, tiny_shapes_root):
    """Contiguous ids in another order than the COCO category ids: AP-<class> stays with its class
    (detectron2's _derive_coco_results assumes sorted ids and would swap the names)."""
    name, _, gt = shapes_val
    json_file = os.path.join(tiny_shapes_root, "coco", "annotations", "instances_val.json")
    cat_ids = sorted(gt.getCatIds())
    names = [gt.cats[c]["name"] for c in cat_ids]
    reversed_name = _register(
        "seg2_test_ap_val_reversed",
        lambda: [],
        json_file=json_file,
        thing_classes=names[::-1],
        thing_dataset_id_to_contiguous_id={c: len(cat_ids) - 1 - i for i, c in enumerate(cat_ids)},
    )
    inputs, outputs = _perturbed_predictions(gt, seed=3)
    flipped = []
    for o in outputs:
        inst = o["instances"]
        inst2 = inst[torch.arange(len(inst))]
        inst2.pred_classes = len(cat_ids) - 1 - inst.pred_classes
        flipped.append({"instances": inst2})
    a = _run(MaskAPEvaluator(name, distributed=False), inputs, outputs)
    b = _run(MaskAPEvaluator(reversed_name, distributed=False), inputs, flipped)
    for task in ("bbox", "segm"):
        _same(b[task], a[task], a[task].keys())
        assert len({a[task][f"AP-{n}"] for n in names}) == len(names)  # the classes do differ


def test_class_count_mismatch_is_an_error(shapes_val, tiny_shapes_root):
    json_file = os.path.join(tiny_shapes_root, "coco", "annotations", "instances_val.json")
    bad = _register(
        "seg2_test_ap_two_names",
        lambda: [],
        json_file=json_file,
        thing_classes=["circle", "square"],
    )
    with pytest.raises(Seg2Error, match="2 thing_classes .* 3 categories"):
        MaskAPEvaluator(bad)
