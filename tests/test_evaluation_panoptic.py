"""Panoptic quality: each of COCO's rules on hand-computed 1-row images, panopticapi's result dict,
bad input, and Seg2PanopticEvaluator on detectron2-style outputs (1 and 2 processes)."""

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import launch
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from PIL import Image

from seg2 import Seg2Error
from seg2.evaluation import Seg2PanopticEvaluator, pq_compute
from seg2.evaluation.panoptic_evaluation import id2rgb, rgb2id

from seg2_model_helpers import leave_process_group

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
    {"id": 4, "name": "grass", "isthing": 0},
    {"id": 5, "name": "road", "isthing": 0},  # never in gt nor predicted
]
NAN = float("nan")


def _seg(i, cat, crowd=0):
    return {"id": i, "category_id": cat, "iscrowd": crowd}


def _write(root, name, images, categories=CATEGORIES):
    """``images``: [(row of segment ids, segments_info)]; writes ``root/name.json`` and PNGs in
    ``root/name/`` (panopticapi's default folder), as COCO panoptic does."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    anns = []
    for image_id, (row, segments) in enumerate(images):
        ids = np.array([row], np.int64)
        file_name = f"{image_id:04d}.png"
        Image.fromarray(id2rgb(ids)).save(os.path.join(folder, file_name))
        segs = (
            [dict(s, area=int((ids == s["id"]).sum())) for s in segments]
            if name == "gt"
            else segments
        )
        anns.append({"image_id": image_id, "file_name": file_name, "segments_info": segs})
    path = os.path.join(root, name + ".json")
    with open(path, "w") as f:
        json.dump({"categories": categories, "annotations": anns, "images": []}, f)
    return path


def _pq(tmp_path, gt_images, pred_images):
    gt = _write(str(tmp_path), "gt", gt_images)
    pred = _write(str(tmp_path), "pred", pred_images)
    return pq_compute(gt, pred)  # folders default to gt/ and pred/, as panopticapi's


def _close(a, b):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-12


def _check(res, per_class, groups):
    for cid, want in per_class.items():
        assert all(_close(res["per_class"][cid][k], v) for k, v in zip(("pq", "sq", "rq"), want)), (
            cid,
            res["per_class"][cid],
        )
    for name, want in groups.items():
        got = res[name]
        assert got["n"] == want[3] and all(
            _close(got[k], v) for k, v in zip(("pq", "sq", "rq"), want[:3])
        ), (name, got)


def test_rgb_ids_round_trip():
    ids = np.array([[0, 1, 255, 256, 65536, 256**3 - 1]])
    assert (rgb2id(id2rgb(ids)) == ids).all()
    assert tuple(id2rgb(np.array([[1 + 2 * 256 + 3 * 65536]]))[0, 0]) == (
        1,
        2,
        3,
    )  # R + 256 G + 256^2 B


# 1 = person (thing), 2 = car (thing) in gt; px 9 is void.
GT_MATCH = ([1, 1, 1, 1, 2, 2, 2, 2, 2, 0], [_seg(1, 1), _seg(2, 2)])
# person: IoU 2/4 = 0.5 exactly: no match (FP + FN); car: IoU 3/5 = 0.6: a match.
PRED_MATCH = ([11, 11, 0, 0, 12, 12, 12, 0, 0, 0], [_seg(11, 1), _seg(12, 2)])


def test_match_needs_iou_above_one_half(tmp_path):
    res = _pq(tmp_path, [GT_MATCH], [PRED_MATCH])
    _check(
        res,
        {1: (0.0, 0.0, 0.0), 2: (0.6, 0.6, 1.0), 3: (0.0, 0.0, 0.0)},
        # stuff: no category has any gt or prediction: NaN with n = 0 (panopticapi divides by zero)
        {"All": (0.3, 0.3, 0.5, 2), "Things": (0.3, 0.3, 0.5, 2), "Stuff": (NAN, NAN, NAN, 0)},
    )


def test_void_pixels_leave_the_union(tmp_path):
    # The prediction (5 px) covers the 4 px gt person and 2 void px: IoU = 3 / (5 + 4 - 3 - 2) =
    # 0.75 (with void in the union it would be 3 / 6 = 0.5: no match).
    res = _pq(tmp_path, [([0, 0, 1, 1, 1, 1], [_seg(1, 1)])], [([7, 7, 7, 7, 7, 0], [_seg(7, 1)])])
    _check(res, {1: (0.75, 0.75, 1.0)}, {"All": (0.75, 0.75, 1.0, 1)})


def test_crowd_regions_neither_match_nor_count(tmp_path):
    # px 0-5: a crowd of cars; px 6-9: a person.
    gt = ([5, 5, 5, 5, 5, 5, 1, 1, 1, 1], [_seg(5, 2, crowd=1), _seg(1, 1)])
    # 21: a car on the crowd of cars (IoU 0.5 with it, and crowds never match): ignored, not FP;
    # 23: a person on the crowd of cars: FP; 22: the person, IoU 1.
    pred = ([21, 21, 21, 23, 23, 23, 22, 22, 22, 22], [_seg(21, 2), _seg(23, 1), _seg(22, 1)])
    res = _pq(tmp_path, [gt], [pred])
    # car: the crowd is no FN and the prediction on it no FP: the category is not counted.
    _check(
        res, {1: (1 / 1.5, 1.0, 1 / 1.5), 2: (0.0, 0.0, 0.0)}, {"All": (1 / 1.5, 1.0, 1 / 1.5, 1)}
    )


def test_unmatched_prediction_over_half_void_or_crowd_is_no_false_positive(tmp_path):
    # px 0-2 void, px 3-4 a crowd of cars, px 5-11 sky (stuff).
    gt = ([0, 0, 0, 5, 5, 1, 1, 1, 1, 1, 1, 1], [_seg(5, 2, crowd=1), _seg(1, 3)])
    # A (car): 1 void + 1 crowd-of-cars px of 3 = 2/3 > 0.5: ignored (neither alone is over half);
    # B (car): 1 crowd px of 2 = 0.5: FP; C (person): all void: ignored; D (sky): IoU 5/7.
    row = [3, 3, 1, 1, 2, 1, 2, 4, 4, 4, 4, 4]
    pred = (
        [[0, 101, 102, 103, 104][v] for v in row],
        [_seg(101, 2), _seg(102, 2), _seg(103, 1), _seg(104, 3)],
    )
    res = _pq(tmp_path, [gt], [pred])
    _check(
        res,
        {1: (0.0, 0.0, 0.0), 2: (0.0, 0.0, 0.0), 3: (5 / 7, 5 / 7, 1.0)},
        {
            "All": (5 / 14, 5 / 14, 0.5, 2),
            "Things": (0.0, 0.0, 0.0, 1),
            "Stuff": (5 / 7, 5 / 7, 1.0, 1),
        },
    )


# Image 2: sky (4 px) and grass (4 px) in gt; predicted sky 5 px (IoU 4/5), grass 3 px (IoU 3/4).
GT_STUFF = ([3, 3, 3, 3, 4, 4, 4, 4], [_seg(3, 3), _seg(4, 4)])
PRED_STUFF = ([30, 30, 30, 30, 30, 40, 40, 40], [_seg(30, 3), _seg(40, 4)])
# Over both images: person 0/0/0, car .6/.6/1, sky .8/.8/1, grass .75/.75/1, road empty.
TWO_IMAGES = {
    "All": (2.15 / 4, 2.15 / 4, 0.75, 4),
    "Things": (0.3, 0.3, 0.5, 2),
    "Stuff": (0.775, 0.775, 1.0, 2),
}


def test_things_stuff_per_class_and_an_empty_category(tmp_path):
    res = _pq(tmp_path, [GT_MATCH, GT_STUFF], [PRED_MATCH, PRED_STUFF])
    assert set(res) == {"All", "Things", "Stuff", "per_class"}
    assert set(res["per_class"]) == {1, 2, 3, 4, 5}
    _check(
        res,
        # road: no gt, no prediction: 0.0 in per_class (as panopticapi) and not in the averages
        {1: (0, 0, 0), 2: (0.6, 0.6, 1), 3: (0.8, 0.8, 1), 4: (0.75, 0.75, 1), 5: (0, 0, 0)},
        TWO_IMAGES,
    )
    # a process pool gives the same numbers
    again = pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), num_workers=2)
    assert again == res


def _expect_error(tmp_path, gt_images, pred_images, pattern, categories=CATEGORIES):
    gt = _write(str(tmp_path), "gt", gt_images, categories)
    pred = _write(str(tmp_path), "pred", pred_images, categories)
    with pytest.raises(Seg2Error, match=pattern) as e:
        pq_compute(gt, pred)
    assert "\n" not in str(e.value)


def test_bad_input_is_one_line_naming_file_and_id(tmp_path):
    gt = ([1, 1, 2, 2], [_seg(1, 1), _seg(2, 3)])
    pred_png = os.path.join(str(tmp_path), "pred", "0000.png")
    gt_png = os.path.join(str(tmp_path), "gt", "0000.png")
    # a PNG id that its JSON does not list
    _expect_error(
        tmp_path,
        [gt],
        [([7, 7, 9, 9], [_seg(7, 1)])],
        f"{pred_png}: predicted PNG has segment id 9, which is not in",
    )
    _expect_error(
        tmp_path, [([1, 1, 6, 6], [_seg(1, 1)])], [gt], f"{gt_png}: gt PNG has segment id 6"
    )
    # a JSON segment absent from the PNG
    _expect_error(
        tmp_path,
        [gt],
        [([7, 7, 7, 7], [_seg(7, 1), _seg(8, 3)])],
        f"{pred_png}: predicted JSON segment id 8 is not in its PNG",
    )
    # an unknown category
    _expect_error(
        tmp_path,
        [gt],
        [([7, 7, 7, 7], [_seg(7, 42)])],
        f"{pred_png}: segment id 7 has category_id 42, which is not among",
    )
    # one category id both a thing and stuff
    both = CATEGORIES + [{"id": 3, "name": "sky-thing", "isthing": 1}]
    _expect_error(
        tmp_path, [gt], [gt], "gt.json: category id 3 is listed as a thing and as stuff", both
    )
    # a missing PNG
    _write(str(tmp_path), "gt", [gt])
    _write(str(tmp_path), "pred", [gt])
    os.remove(pred_png)
    with pytest.raises(Seg2Error, match=f"{pred_png}: cannot read the panoptic PNG"):
        pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"))
    # an image without prediction
    _write(str(tmp_path), "pred", [])
    with pytest.raises(Seg2Error, match="pred.json: no prediction for image_id 0"):
        pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"))


# --- the evaluator on detectron2-style outputs --------------------------------------------------

THING_MAP = {1: 0, 2: 1}  # dataset id -> contiguous id, as detectron2's panoptic metadata
STUFF_MAP = {3: 1, 4: 2, 5: 3}  # contiguous 0: "things", as register_coco_panoptic_separated


def _register(root, name):
    gt_json = os.path.join(root, "gt.json")
    if not os.path.exists(gt_json):  # written once, before any worker process starts
        _write(root, "gt", [GT_MATCH, GT_STUFF])
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(
        panoptic_json=gt_json,
        panoptic_root=os.path.join(root, "gt"),
        evaluator_type="coco_panoptic_seg",
        thing_dataset_id_to_contiguous_id=THING_MAP,
        stuff_dataset_id_to_contiguous_id=STUFF_MAP,
        label_divisor=1000,
    )


def _outputs(contiguous=True):
    """PanopticFPN-style (panoptic_img, segments_info) of both images: contiguous category ids and
    isthing, or (``contiguous=False``) dataset ids without isthing."""
    out = []
    for image_id, (row, segments) in enumerate([PRED_MATCH, PRED_STUFF]):
        infos = []
        for s in segments:
            cat = s["category_id"]
            if contiguous:
                isthing = cat in THING_MAP
                infos.append(
                    {
                        "id": s["id"],
                        "category_id": (THING_MAP if isthing else STUFF_MAP)[cat],
                        "isthing": isthing,
                    }
                )
            else:
                infos.append({"id": s["id"], "category_id": cat})
        img = torch.tensor([row], dtype=torch.int32)
        out.append(
            (
                {"image_id": image_id, "file_name": f"/data/images/{image_id:04d}.jpg"},
                {"panoptic_seg": (img, infos)},
            )
        )
    return out


def test_evaluator_on_detectron2_outputs(tmp_path):
    _register(str(tmp_path), "seg2_test_panoptic_eval")
    out_dir = str(tmp_path / "inference")
    for contiguous in (True, False):
        ev = Seg2PanopticEvaluator(
            "seg2_test_panoptic_eval", output_dir=out_dir if contiguous else None
        )
        ev.reset()
        for inp, out in _outputs(contiguous):
            ev.process([inp], [out])
        res = ev.evaluate()["panoptic_seg"]
        for key, group in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
            for i, m in enumerate(("PQ", "SQ", "RQ")):
                assert abs(res[m + key] - 100 * TWO_IMAGES[group][i]) < 1e-9, (
                    m + key,
                    res[m + key],
                )
        assert (
            abs(res["PQ-car"] - 60) < 1e-9
            and abs(res["SQ-sky"] - 80) < 1e-9
            and res["RQ-person"] == 0
        )
        assert math.isnan(res["PQ-road"])  # no gt and no prediction
        assert "panoptic_seg/PQ" in flatten_results_dict(
            {"panoptic_seg": res}
        )  # SEG2.BEST_CHECKPOINT.METRIC
    # what it wrote is panopticapi's input, and gives the same numbers
    files = pq_compute(str(tmp_path / "gt.json"), os.path.join(out_dir, "predictions.json"))
    assert sorted(os.listdir(os.path.join(out_dir, "predictions"))) == ["0000.png", "0001.png"]
    assert abs(files["All"]["pq"] - TWO_IMAGES["All"][0]) < 1e-12


def test_evaluator_bad_outputs(tmp_path):
    _register(str(tmp_path), "seg2_test_panoptic_eval_bad")
    ev = Seg2PanopticEvaluator("seg2_test_panoptic_eval_bad")
    ev.reset()
    inp, out = _outputs()[0]
    img, infos = out["panoptic_seg"]
    with pytest.raises(
        Seg2Error, match="0000.jpg: segment id 11 has contiguous thing category_id 7"
    ):
        ev.process([inp], [{"panoptic_seg": (img, [dict(infos[0], category_id=7), infos[1]])}])
    with pytest.raises(
        Seg2Error, match="prediction for /data/images/0000.jpg: predicted PNG has segment id 12"
    ):
        ev.process([inp], [{"panoptic_seg": (img, infos[:1])}])
    with pytest.raises(Seg2Error, match="no annotation for image_id 9"):
        ev.process([dict(inp, image_id=9)], [out])
    MetadataCatalog.get("seg2_test_panoptic_eval_none").set(evaluator_type="coco_panoptic_seg")
    with pytest.raises(
        Seg2Error, match="'seg2_test_panoptic_eval_none': metadata has no 'panoptic_json'"
    ):
        Seg2PanopticEvaluator("seg2_test_panoptic_eval_none")


def _evaluate(root, out_file):
    """Runs in every process: each evaluates its share of the images; the main one saves results."""
    torch.set_num_threads(1)
    _register(root, "seg2_test_panoptic_dist")
    ev = Seg2PanopticEvaluator("seg2_test_panoptic_dist")
    ev.reset()
    pairs = _outputs()
    for i in range(comm.get_rank(), len(pairs), comm.get_world_size()):
        ev.process([pairs[i][0]], [pairs[i][1]])
    res = ev.evaluate()
    if comm.is_main_process():
        with open(out_file, "wb") as f:
            pickle.dump(dict(res["panoptic_seg"]), f)
    leave_process_group()


def test_two_processes_equal_one(tmp_path):
    single, double = str(tmp_path / "single.pkl"), str(tmp_path / "double.pkl")
    _evaluate(str(tmp_path), single)
    launch(_evaluate, num_gpus_per_machine=2, dist_url="auto", args=(str(tmp_path), double))
    with open(single, "rb") as f:
        a = pickle.load(f)
    with open(double, "rb") as f:
        b = pickle.load(f)
    assert a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    assert abs(a["PQ"] - 100 * TWO_IMAGES["All"][0]) < 1e-9
