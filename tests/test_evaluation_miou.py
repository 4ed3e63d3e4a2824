"""MIoUEvaluator: hand-computed numbers, equality with detectron2's SemSegEvaluator, bad input."""

import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from PIL import Image

import seg2  # noqa: F401
from seg2 import Seg2Error
from seg2.data import load_coco_with_sem_seg, read_label_map, register_dataset
from seg2.evaluation import MIoUEvaluator, mask_to_boundary, sem_seg_to_coco_json
from seg2.evaluation.sem_seg_evaluation import argmax_channels


def _register(name, records, **meta):
    return register_dataset(name, lambda: records, meta)


def _write_png(path, arr, palette=True):
    im = Image.fromarray(np.asarray(arr, dtype=np.uint8), mode="P" if palette else "L")
    if palette:
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)
    return path


@pytest.fixture(scope="module")
def shapes_val(tiny_shapes_root):
    """The tiny shapes val split (4 images, 4 stuff classes, palette PNGs with 255 borders)."""
    root = tiny_shapes_root
    records = load_coco_with_sem_seg(
        os.path.join(root, "coco", "annotations", "instances_val.json"),
        os.path.join(root, "coco", "val"),
        os.path.join(root, "VOC2012", "SegmentationClass"),
    )
    return _register(
        "seg2_test_miou_val",
        records,
        stuff_classes=["background", "circle", "square", "triangle"],
        ignore_label=255,
        evaluator_type="sem_seg",
    )


def _noisy_logits(gt, num_classes, generator, noise):
    """Logits favouring the ground truth, with noise so that some pixels are wrong."""
    g = torch.from_numpy(np.where(gt == 255, 0, gt).astype(np.int64))
    logits = torch.nn.functional.one_hot(g, num_classes).permute(2, 0, 1).float()
    return logits + noise * torch.randn(logits.shape, generator=generator)


def _predictions(dataset_name, noise=0.8, seed=0):
    num_classes = len(MetadataCatalog.get(dataset_name).stuff_classes)
    gen = torch.Generator().manual_seed(seed)
    inputs, outputs = [], []
    for r in DatasetCatalog.get(dataset_name):
        gt = read_label_map(r["sem_seg_file_name"])
        inputs.append({"file_name": r["file_name"], "height": gt.shape[0], "width": gt.shape[1]})
        outputs.append({"sem_seg": _noisy_logits(gt, num_classes, gen, noise)})
    return inputs, outputs


def _run(evaluator, inputs, outputs, batch=2):
    evaluator.reset()
    for i in range(0, len(inputs), batch):
        evaluator.process(inputs[i : i + batch], outputs[i : i + batch])
    return evaluator.evaluate()["sem_seg"]


def _assert_same(ours, ref, keys):
    for k in keys:
        a, b = ours[k], ref[k]
        if math.isnan(b):
            assert math.isnan(a), k
        else:
            assert abs(a - b) <= 1e-6, (k, a, b)


def test_hand_computed(tmp_path):
    # GT [[0, 0], [1, 255]], prediction [[0, 1], [1, 1]], 3 classes (class 2 absent).
    gt_path = _write_png(tmp_path / "gt.png", [[0, 0], [1, 255]])
    name = _register(
        "seg2_test_miou_hand",
        [{"file_name": "img.jpg", "sem_seg_file_name": str(gt_path)}],
        stuff_classes=["a", "b", "c"],
        ignore_label=255,
    )
    logits = torch.full((3, 2, 2), -1.0)
    logits[0, 0, 0] = logits[1, 0, 1] = logits[1, 1, 0] = logits[1, 1, 1] = 1.0
    res = _run(
        MIoUEvaluator(name, distributed=False), [{"file_name": "img.jpg"}], [{"sem_seg": logits}]
    )
    # class a: tp 1, gt 2, pred 1 -> IoU 1/2; class b: tp 1, gt 1, pred 2 -> IoU 1/2.
    assert res["IoU-a"] == pytest.approx(50.0) and res["IoU-b"] == pytest.approx(50.0)
    assert math.isnan(res["IoU-c"]) and math.isnan(res["ACC-c"])
    assert res["mIoU"] == pytest.approx(50.0)
    assert res["fwIoU"] == pytest.approx(50.0)
    assert res["mACC"] == pytest.approx(75.0)  # (1/2 + 1/1) / 2
    assert res["pACC"] == pytest.approx(200.0 / 3)  # 2 of 3 labelled pixels


@pytest.mark.parametrize("boundary", [False, True])
def test_equals_detectron2_semseg_evaluator(shapes_val, boundary):
    inputs, outputs = _predictions(shapes_val)
    ref = _run(SemSegEvaluator(shapes_val, distributed=False), inputs, outputs)
    ours = _run(
        MIoUEvaluator(shapes_val, distributed=False, boundary_iou=boundary),
        inputs,
        outputs,
        batch=3,
    )
    if boundary:
        assert set(ours) == set(ref)
    else:
        assert not any(k.startswith("BoundaryIoU") for k in ours)
    _assert_same(ours, ref, ours.keys())
    assert 0 < ours["mIoU"] < 100  # the noise makes a non-trivial case


def test_equals_detectron2_with_absent_class_and_ties(tmp_path):
    # 5 classes, class 3 absent from GT and never predicted; integer logits with many ties.
    rng = np.random.default_rng(1)
    records, inputs, outputs = [], [], []
    for i in range(3):
        gt = rng.choice([0, 1, 2, 4, 255], size=(37, 53)).astype(np.uint8)
        path = _write_png(tmp_path / f"{i}.png", gt)
        records.append({"file_name": f"{i}.jpg", "sem_seg_file_name": str(path)})
        logits = torch.from_numpy(rng.integers(0, 3, size=(5, 37, 53))).float()
        logits[3] = -1
        inputs.append({"file_name": f"{i}.jpg"})
        outputs.append({"sem_seg": logits})
    name = _register("seg2_test_miou_ties", records, stuff_classes=list("vwxyz"), ignore_label=255)
    ref = _run(SemSegEvaluator(name, distributed=False), inputs, outputs)
    ours = _run(MIoUEvaluator(name, distributed=False, boundary_iou=True), inputs, outputs)
    assert math.isnan(ours["IoU-y"]) and math.isnan(ours["ACC-y"])
    _assert_same(ours, ref, ref.keys())


class _SemSegEvaluatorWideBoundary(SemSegEvaluator):
    """detectron2's evaluator with its boundary maps in int64: its own uint8 index arithmetic
    ``(C+1) * b_pred + b_gt`` wraps around modulo 256 from 16 classes on."""

    def _mask_to_boundary(self, mask, dilation_ratio=0.02):
        return super()._mask_to_boundary(mask, dilation_ratio).astype(np.int64)


def test_boundary_iou_21_classes_equals_detectron2_without_uint8_wraparound(tmp_path):
    rng = np.random.default_rng(2)
    records, inputs, outputs = [], [], []
    for i in range(2):
        gt = np.kron(rng.integers(0, 21, (6, 8)), np.ones((9, 9), dtype=np.int64)).astype(np.uint8)
        gt[::13, :] = 255
        path = _write_png(tmp_path / f"{i}.png", gt)
        records.append({"file_name": f"{i}.jpg", "sem_seg_file_name": str(path)})
        inputs.append({"file_name": f"{i}.jpg"})
        outputs.append({"sem_seg": _noisy_logits(gt, 21, torch.Generator().manual_seed(i), 0.7)})
    name = _register(
        "seg2_test_miou_21", records, stuff_classes=[f"c{k}" for k in range(21)], ignore_label=255
    )
    ours = _run(MIoUEvaluator(name, distributed=False, boundary_iou=True), inputs, outputs)
    ref = _run(_SemSegEvaluatorWideBoundary(name, distributed=False), inputs, outputs)
    assert set(ours) == set(ref)
    _assert_same(ours, ref, ref.keys())
    # detectron2 as shipped agrees on everything but the (wrapped-around) boundary numbers
    shipped = _run(SemSegEvaluator(name, distributed=False), inputs, outputs)
    _assert_same(ours, shipped, [k for k in ref if "Boundary" not in k and "B-Iou" not in k])


def test_argmax_channels_matches_torch_argmax_on_ties():
    x = torch.randint(0, 3, (7, 20, 30)).float()
    pred, has_nan = argmax_channels(x)
    assert not has_nan and pred.dtype == torch.uint8
    assert torch.equal(pred.long(), x.argmax(dim=0))


@pytest.mark.parametrize("shape", [(5, 7), (64, 64), (40, 130)])
def test_boundary_torch_equals_opencv(shape):
    gen = torch.Generator().manual_seed(shape[0])
    # Blocky maps with a few label values, as label maps are.
    small = torch.randint(
        0, 6, (shape[0] // 4 + 1, shape[1] // 4 + 1), generator=gen, dtype=torch.uint8
    )
    mask = (
        small.repeat_interleave(4, 0).repeat_interleave(4, 1)[: shape[0], : shape[1]].contiguous()
    )
    a = mask_to_boundary(mask, use_cv2=True)
    b = mask_to_boundary(mask, use_cv2=False)
    assert torch.equal(a, b)
    assert a.any()


def test_outputs_written(shapes_val, tmp_path, caplog):
    inputs, outputs = _predictions(shapes_val)
    out = tmp_path / "eval"
    ev = MIoUEvaluator(shapes_val, distributed=False, output_dir=str(out))
    with caplog.at_level(logging.INFO, logger="seg2.evaluation.sem_seg_evaluation"):
        res = _run(ev, inputs, outputs)
    saved = json.loads((out / "sem_seg_evaluation.json").read_text())
    assert saved["sem_seg"]["mIoU"] == pytest.approx(res["mIoU"])
    conf = np.array(saved["confusion_matrix_pred_by_gt"])
    assert conf.shape == (4, 4)
    # pACC is the trace of the matrix over its total.
    assert 100 * np.trace(conf) / conf.sum() == pytest.approx(res["pACC"])
    for png in ("sem_seg_confusion_matrix.png", "sem_seg_iou_per_class.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert not (out / "sem_seg_predictions.json").exists()  # nothing per image unless asked
    assert "| circle" in caplog.text  # the per-class table


@pytest.mark.parametrize("dataset_ids", [False, True])
def test_predictions_json_equals_detectron2(shapes_val, tmp_path, dataset_ids):
    """sem_seg_predictions.json on request, entry for entry what detectron2's SemSegEvaluator writes
    (with the dataset's category ids where the metadata maps them)."""
    name = shapes_val
    if dataset_ids:
        meta = MetadataCatalog.get(shapes_val)
        name = _register(
            "seg2_test_miou_val_ids",
            DatasetCatalog.get(shapes_val),
            stuff_classes=meta.stuff_classes,
            ignore_label=255,
            stuff_dataset_id_to_contiguous_id={10 * (i + 1): i for i in range(4)},
        )
    inputs, outputs = _predictions(name)
    ev = MIoUEvaluator(
        name,
        distributed=False,
        output_dir=str(tmp_path / "seg2"),
        save_predictions_json=True,
        plots=False,
    )
    _run(ev, inputs, outputs)
    _run(SemSegEvaluator(name, distributed=False, output_dir=str(tmp_path / "d2")), inputs, outputs)
    ours = json.loads((tmp_path / "seg2" / "sem_seg_predictions.json").read_text())
    ref = json.loads((tmp_path / "d2" / "sem_seg_predictions.json").read_text())
    assert ours == ref
    assert {p["file_name"] for p in ours} == {i["file_name"] for i in inputs}
    assert {p["category_id"] for p in ours} == ({10, 20, 30, 40} if dataset_ids else {0, 1, 2, 3})
    with pytest.raises(Seg2Error, match="x.png: predicted class 5 has no entry"):
        sem_seg_to_coco_json(np.array([[0, 5]]), "x.png", {0: 10})


def test_bad_input(shapes_val, tmp_path):
    inputs, outputs = _predictions(shapes_val)
    ev = MIoUEvaluator(shapes_val, distributed=False)
    # a prediction of another size than its ground truth
    with pytest.raises(ValueError, match=r"ground truth .* is \(64, 64\)"):
        ev.process(inputs[:1], [{"sem_seg": outputs[0]["sem_seg"][:, :32, :]}])
    # NaN logits
    bad = outputs[0]["sem_seg"].clone()
    bad[2, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ev.process(inputs[:1], [{"sem_seg": bad}])
    # a channel count that is not the dataset's number of classes
    with pytest.raises(ValueError, match="5 channels"):
        ev.process(inputs[:1], [{"sem_seg": torch.zeros(5, 64, 64)}])
    # an image that is not in the dataset
    with pytest.raises(Seg2Error, match="not a record"):
        ev.process([{"file_name": "elsewhere.jpg"}], outputs[:1])
    # nothing was counted by the failed calls
    assert ev.evaluate() == {}

    # a label map with ids outside the dataset (7 is neither a class nor 255)
    gt = np.zeros((8, 8), np.uint8)
    gt[2, 3] = 7
    path = _write_png(tmp_path / "bad.png", gt)
    name = _register(
        "seg2_test_miou_badgt",
        [{"file_name": "b.jpg", "sem_seg_file_name": str(path)}],
        stuff_classes=["a", "b"],
        ignore_label=255,
    )
    with pytest.raises(Seg2Error, match=r"bad.png.*\[7\]"):
        MIoUEvaluator(name, distributed=False).process(
            [{"file_name": "b.jpg"}], [{"sem_seg": torch.zeros(2, 8, 8)}]
        )

    # an empty dataset
    empty = _register("seg2_test_miou_empty", [], stuff_classes=["a"], ignore_label=255)
    with pytest.raises(Seg2Error, match="no records"):
        MIoUEvaluator(empty)


def test_all_pixels_ignored_gives_nan(tmp_path):
    path = _write_png(tmp_path / "void.png", np.full((4, 4), 255))
    name = _register(
        "seg2_test_miou_void",
        [{"file_name": "v.jpg", "sem_seg_file_name": str(path)}],
        stuff_classes=["a", "b"],
        ignore_label=255,
    )
    res = _run(
        MIoUEvaluator(name, distributed=False),
        [{"file_name": "v.jpg"}],
        [{"sem_seg": torch.randn(2, 4, 4)}],
    )
    assert res.pop("classes_without_gt") == 2 and res.pop("noGT-a") == res.pop("noGT-b") == 1
    assert all(math.isnan(v) for v in res.values())


def test_binary_0_255_masks_name_the_class_without_ground_truth(tmp_path, caplog):
    """0/255 masks with two classes declared: 255 is void, so 'foreground' has no pixel and a
    model that predicts background everywhere scores mIoU 100 / pACC 100 (detectron2's numbers).
    The evaluator names the class in a warning, with the 0/255 hint, and in its results; with
    value_map={255: 1} the same predictions score what they are worth."""
    from seg2.data import register_sem_seg_folder

    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    inputs, outputs = [], []
    for i in range(3):
        mask = np.zeros((10, 14), np.uint8)
        mask[2:6, 3 : 8 + i] = 255
        Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(mask, mode="L").save(tmp_path / "masks" / f"{i}.png")
        inputs.append({"file_name": str(tmp_path / "images" / f"{i}.png")})
        logits = torch.zeros(2, 10, 14)
        logits[0] = 1.0  # background everywhere
        outputs.append({"sem_seg": logits})
    classes = ["background", "foreground"]
    register_sem_seg_folder(
        "seg2_test_miou_binary", str(tmp_path / "images"), str(tmp_path / "masks"), classes
    )
    with caplog.at_level(logging.WARNING, logger="seg2.evaluation.sem_seg_evaluation"):
        res = _run(MIoUEvaluator("seg2_test_miou_binary", distributed=False), inputs, outputs)
    ref = _run(SemSegEvaluator("seg2_test_miou_binary", distributed=False), inputs, outputs)
    _assert_same(
        res, ref, [k for k in ref if "Boundary" not in k and "B-Iou" not in k]
    )  # d2's numbers ...
    assert res["mIoU"] == res["pACC"] == 100.0
    assert (
        res["classes_without_gt"] == 1.0 and res["noGT-foreground"] == 1.0
    )  # ... but not silently
    assert "noGT-background" not in res
    line = next(r.getMessage() for r in caplog.records if "no ground-truth pixel" in r.getMessage())
    assert "\n" not in line
    assert (
        "1 of 2 classes have no ground-truth pixel in the 3 evaluated images: 'foreground'" in line
    )
    assert "3 of the 3 ground-truth maps" in line and "value_map={255: 1}" in line

    register_sem_seg_folder(
        "seg2_test_miou_binary_mapped",
        str(tmp_path / "images"),
        str(tmp_path / "masks"),
        classes,
        value_map={255: 1},
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="seg2.evaluation.sem_seg_evaluation"):
        res = _run(
            MIoUEvaluator("seg2_test_miou_binary_mapped", distributed=False), inputs, outputs
        )
    fg = 4 * (5 + 6 + 7)  # foreground pixels, all predicted background
    total = 3 * 10 * 14
    assert res["IoU-foreground"] == 0.0
    assert res["IoU-background"] == pytest.approx(100 * (total - fg) / total)
    assert res["mIoU"] == pytest.approx(res["IoU-background"] / 2)
    assert "classes_without_gt" not in res and "no ground-truth pixel" not in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_argmax_channels_equals_torch_argmax(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(19, 33, 47, generator=gen).to(dtype)
    x[:, :5] = x[:, :5].round()  # ties
    pred, has_nan = argmax_channels(x)
    assert not has_nan and pred.dtype == torch.uint8
    assert torch.equal(pred.long(), x.float().argmax(dim=0))
    x[7, 3, 4] = float("nan")
    assert argmax_channels(x)[1]


def test_16bit_ground_truth_equals_detectron2(tmp_path):
    """16-bit index PNGs as ground truth (read as uint8 where they fit): detectron2's numbers."""
    rng = np.random.default_rng(4)
    records, inputs, outputs = [], [], []
    for i in range(2):
        gt = rng.choice([0, 1, 2, 255], size=(21, 17)).astype(np.uint16)
        path = tmp_path / f"{i}.png"
        Image.fromarray(gt).save(path)
        records.append({"file_name": f"{i}.jpg", "sem_seg_file_name": str(path)})
        inputs.append({"file_name": f"{i}.jpg"})
        outputs.append(
            {
                "sem_seg": _noisy_logits(
                    gt.astype(np.uint8), 3, torch.Generator().manual_seed(i), 0.8
                )
            }
        )
    name = _register(
        "seg2_test_miou_16bit", records, stuff_classes=["a", "b", "c"], ignore_label=255
    )
    ours = _run(MIoUEvaluator(name, distributed=False, boundary_iou=True), inputs, outputs)
    ref = _run(SemSegEvaluator(name, distributed=False), inputs, outputs)
    _assert_same(ours, ref, ref.keys())


def test_torch_path_equals_numpy_path(shapes_val):
    """The torch counting (GPU predictions; on the CPU for integer logits) gives the numbers of
    the numpy counting (CPU float logits), boundary IoU included."""
    inputs, outputs = _predictions(shapes_val, noise=2.0)
    as_int = [{"sem_seg": (o["sem_seg"] * 4).round().long()} for o in outputs]
    as_float = [{"sem_seg": o["sem_seg"].float()} for o in as_int]
    ev_numpy = MIoUEvaluator(shapes_val, distributed=False, boundary_iou=True)
    numpy_res = _run(ev_numpy, inputs, as_float)
    ev = MIoUEvaluator(shapes_val, distributed=False, boundary_iou=True)
    torch_res = _run(ev, inputs, as_int)
    assert ev._conf is None and ev._conf_device is not None  # the torch path was taken
    _assert_same(torch_res, numpy_res, numpy_res.keys())
    assert 0 < numpy_res["mIoU"] < 100
