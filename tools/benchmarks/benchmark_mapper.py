#!/usr/bin/env python3
"""
Data-pipeline benchmarks, measured side by side in one run:

1. ``MultiTaskDatasetMapper`` vs detectron2's ``DatasetMapper`` on the same instance-only records
   (training mode, the same augmentations, the same random seed), in images/s and as a ratio:
   COCO-view records (polygons, ``INPUT.MASK_FORMAT=polygon``) and VOC-view records (RLE masks
   from ``load_voc_instances``, ``INPUT.MASK_FORMAT=bitmask``). The multi-task mapper on records
   with both views (instances + semantic map) is reported too.
2. COCO semantic-map generation (:func:`seg2.data.generate_coco_sem_seg`), images/s, on the
   shapes records scaled to COCO's size (640x640), with 1 and with ``--workers`` processes.

    OMP_NUM_THREADS=1 python3 tools/benchmarks/benchmark_mapper.py [--images 64] [--repeats 3]
    [--workers 2]
"""

import argparse
import copy
import os
import shutil
import tempfile

import cv2
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper
from timing import best_of_rounds, timed

import seg2
from seg2.data import (
    SHAPES_CLASSES,
    MultiTaskDatasetMapper,
    generate_coco_sem_seg,
    generate_shapes,
    load_coco_with_sem_seg,
    load_voc_instances,
)


def _cfg(mask_format):
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = mask_format
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = (
        len(SHAPES_CLASSES) + 1
    )  # the label values the mapper accepts
    return cfg  # detectron2's default training augmentation: shortest edge 640-800, flip


def _images_per_s(mappers, records, repeats):
    """Images/s of each mapper: best of ``repeats`` passes over ``records``, the mappers taking
    turns pass by pass so that load from other jobs hits them alike (one warm-up pass each)."""
    best = best_of_rounds(
        {i: lambda m=m: [m(r) for r in records] for i, m in enumerate(mappers)}, repeats
    )
    return [len(records) / best[i] for i in range(len(mappers))]


def _scaled(record, factor):
    r = copy.deepcopy(record)
    r["height"], r["width"] = r["height"] * factor, r["width"] * factor
    for a in r["annotations"]:
        a["segmentation"] = [[v * factor for v in p] for p in a["segmentation"]]
        a["bbox"] = [v * factor for v in a["bbox"]]
    return r


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64, help="records per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="processes for the map generation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    tmp = tempfile.mkdtemp(prefix="seg2-bench-")
    try:
        root = generate_shapes(
            os.path.join(tmp, "shapes"), splits={"train": args.images}, image_size=128, seed=0
        )
        coco = load_coco_with_sem_seg(
            os.path.join(root, "coco", "annotations", "instances_train.json"),
            os.path.join(root, "coco", "train"),
            os.path.join(root, "VOC2012", "SegmentationClass"),
            dataset_name="seg2_shapes_train",
        )
        voc = load_voc_instances(os.path.join(root, "VOC2012"), "train", class_names=SHAPES_CLASSES)
        instances_only = [{k: v for k, v in r.items() if k != "sem_seg_file_name"} for r in coco]

        print(
            f"mapper throughput, {args.images} images of 128x128 resized to 640-800 px, training "
            f"mode, best of {args.repeats}"
        )
        print(f"{'records':34s} {'DatasetMapper':>14s} {'MultiTask':>10s} {'ratio':>6s}")
        for label, records, mask_format in (
            ("COCO view, polygons (instances)", instances_only, "polygon"),
            ("VOC view, RLE (instances)", voc, "bitmask"),
        ):
            cfg = _cfg(mask_format)
            ref, ours = _images_per_s(
                [DatasetMapper(cfg, is_train=True), MultiTaskDatasetMapper(cfg, is_train=True)],
                records,
                args.repeats,
            )
            print(f"{label:34s} {ref:12.1f}/s {ours:8.1f}/s {ours / ref:6.2f}")
        (both,) = _images_per_s(
            [MultiTaskDatasetMapper(_cfg("polygon"), is_train=True)], coco, args.repeats
        )
        print(f"{'COCO view + semantic map':34s} {'-':>14s} {both:8.1f}/s")

        big = [_scaled(r, 5) for r in coco]
        print(
            f"\nCOCO semantic-map generation, {len(big)} records of 640x640 (polygons), fresh "
            "cache each run"
        )
        for workers in sorted({0, args.workers}):
            best = float("inf")
            for i in range(args.repeats):
                out = os.path.join(tmp, f"sem_{workers}_{i}")
                n, seconds = timed(lambda: generate_coco_sem_seg(big, out, num_workers=workers))
                best = min(best, seconds)
                assert n == len(big)
            print(f"  {max(workers, 1)} process(es): {len(big) / best:8.1f} images/s")
        _, seconds = timed(lambda: generate_coco_sem_seg(big, out))
        print(
            f"  cache already complete: {len(big) / seconds:8.1f} images/s (existence checks only)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
