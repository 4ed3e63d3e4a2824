"""Both evaluators under detectron2's `launch` with 2 CPU processes (gloo) equal one process."""

import math
import os
import pickle

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import launch
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from seg2_model_helpers import leave_process_group

DATASET = "seg2_test_dist_val"


def _register(root):
    from seg2.data import register_coco_with_sem_seg

    register_coco_with_sem_seg(
        DATASET,
        os.path.join(root, "coco", "annotations", "instances_val.json"),
        os.path.join(root, "coco", "val"),
        os.path.join(root, "VOC2012", "SegmentationClass"),
        thing_classes=["circle", "square", "triangle"],
        metadata={"thing_dataset_id_to_contiguous_id": {1: 0, 2: 1, 3: 2}},
    )


def _sample(record, index):
    """Deterministic outputs for one image: noisy logits, and shifted GT masks plus a false positive."""
    from seg2.data import read_label_map

    gen = torch.Generator().manual_seed(index)
    gt = read_label_map(record["sem_seg_file_name"])
    h, w = gt.shape
    logits = torch.nn.functional.one_hot(
        torch.from_numpy(np.where(gt == 255, 0, gt).astype(np.int64)), 4
    )
    logits = logits.permute(2, 0, 1).float() + torch.randn(4, h, w, generator=gen)
    masks, classes = [], []
    for ann in record["annotations"]:
        from pycocotools import mask as mask_util

        m = mask_util.decode(mask_util.merge(mask_util.frPyObjects(ann["segmentation"], h, w)))
        masks.append(np.roll(m, index % 3 - 1, axis=1))
        classes.append(ann["category_id"])
    fp = np.zeros((h, w), np.uint8)
    fp[index * 5 : index * 5 + 12, 10:30] = 1
    masks.append(fp)
    classes.append(index % 3)
    masks = torch.from_numpy(np.stack(masks)).bool()
    inst = Instances((h, w))
    inst.pred_masks = masks
    ys = masks.any(dim=2)
    xs = masks.any(dim=1)
    boxes = [
        [x.nonzero().min(), y.nonzero().min(), x.nonzero().max() + 1, y.nonzero().max() + 1]
        for x, y in zip(xs, ys)
    ]
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.rand(len(masks), generator=gen)
    inst.pred_classes = torch.tensor(classes)
    return {"file_name": record["file_name"], "image_id": record["image_id"]}, {
        "sem_seg": logits,
        "instances": inst,
    }


def _evaluate(root, out_file):
    """Runs in every process: each evaluates its share of the images; the main one saves results."""
    from detectron2.evaluation import DatasetEvaluators

    from seg2.evaluation import MaskAPEvaluator, MIoUEvaluator

    torch.set_num_threads(1)
    _register(root)
    records = DatasetCatalog.get(DATASET)
    evaluator = DatasetEvaluators(
        [MIoUEvaluator(DATASET, boundary_iou=True), MaskAPEvaluator(DATASET)]
    )
    evaluator.reset()
    rank, world = comm.get_rank(), comm.get_world_size()
    for i in range(rank, len(records), world):
        inp, out = _sample(records[i], i)
        evaluator.process([inp], [out])
    results = evaluator.evaluate()
    if comm.is_main_process():
        with open(out_file, "wb") as f:
            pickle.dump({k: dict(v) for k, v in results.items()}, f)
    leave_process_group()


def _load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def test_two_process_run_equals_one_process(tiny_shapes_root, tmp_path):
    single = str(tmp_path / "single.pkl")
    _evaluate(tiny_shapes_root, single)  # no process group: world size 1
    double = str(tmp_path / "double.pkl")
    launch(_evaluate, num_gpus_per_machine=2, dist_url="auto", args=(tiny_shapes_root, double))
    a, b = _load(single), _load(double)
    assert set(a) == {"sem_seg", "bbox", "segm"} and set(a) == set(b)
    for task in a:
        assert a[task].keys() == b[task].keys()
        for k, v in a[task].items():
            assert (math.isnan(v) and math.isnan(b[task][k])) or v == b[task][k], (
                task,
                k,
                v,
                b[task][k],
            )
    assert 0 < a["sem_seg"]["mIoU"] < 100 and 0 < a["segm"]["AP"] < 100
