#!/usr/bin/env python3
"""
Side-by-side benchmark of seg2's evaluators against detectron2's, on the same synthetic predictions.

* ``miou``: MIoUEvaluator vs SemSegEvaluator, per-image time of ``process``, the two taking turns
  image by image, with and without boundary IoU (detectron2's evaluator always computes it; it is
  switched off on its instance for the "without" rows), and the largest metric difference; on a
  quiet CPU and with ``--load N`` busy processes that the benchmark starts (a shared CPU).
* ``memory``: memory growth of each evaluator over a long run (tracemalloc peak of Python/numpy
  allocations, and process RSS), 500 images by default for MIoUEvaluator.
* ``ap``: MaskAPEvaluator vs COCOEvaluator end to end (process + evaluate, bbox and segm) with many
  instances per image, and the largest metric difference.

Examples::

    python tools/benchmarks/benchmark_evaluators.py miou --images 8 --sizes 512x512x21 --load 0 2
    python tools/benchmarks/benchmark_evaluators.py memory --images 500 --size 256x256x21
    python tools/benchmarks/benchmark_evaluators.py ap --images 20 --detections 100
"""

import argparse
import contextlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

import cv2
import numpy as np
import torch
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator
from detectron2.structures import Boxes, Instances
from PIL import Image
from timing import rss_mb, time_round_robin, timed

from seg2.data import register_dataset
from seg2.evaluation import MaskAPEvaluator, MIoUEvaluator
from seg2.evaluation.coco_evaluation import encode_masks


class SemSegEvaluatorWideBoundary(SemSegEvaluator):
    """detectron2's SemSegEvaluator with int64 boundary maps: the shipped one computes
    ``(C+1) * b_pred + b_gt`` in uint8, which wraps around from 16 classes on. Only used to check
    seg2's boundary numbers, never timed."""

    def _mask_to_boundary(self, mask, dilation_ratio=0.02):
        return super()._mask_to_boundary(mask, dilation_ratio).astype(np.int64)


def _max_diff(ours, ref):
    worst = 0.0
    for k, b in ref.items():
        a = ours[k]
        if math.isnan(a) or math.isnan(b):
            if not (math.isnan(a) and math.isnan(b)):
                return float("inf")
            continue
        worst = max(worst, abs(a - b))
    return worst


# --------------------------------------------------------------------------------------- mIoU


def _label_maps(folder, n_distinct, h, w, num_classes, seed=0):
    """Blocky palette label maps with 255 (ignore) borders between blocks, as VOC has."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_distinct):
        small = rng.integers(0, num_classes, (max(1, h // 48), max(1, w // 48))).astype(np.uint8)
        gt = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
        edges = cv2.morphologyEx(gt, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        gt[edges] = 255
        im = Image.fromarray(gt, mode="P")
        im.putpalette([v for j in range(256) for v in (j, (37 * j) % 256, (91 * j) % 256)])
        path = os.path.join(folder, f"gt_{h}x{w}_{i}.png")
        im.save(path)
        paths.append((path, gt))
    return paths


def _sem_seg_setup(folder, n_images, h, w, num_classes, n_distinct=4, name=None):
    n_distinct = max(1, min(n_distinct, n_images))
    maps = _label_maps(folder, n_distinct, h, w, num_classes)
    records = [
        {"file_name": f"img_{i}.jpg", "sem_seg_file_name": maps[i % n_distinct][0]}
        for i in range(n_images)
    ]
    name = name or f"bench_sem_seg_{h}x{w}x{num_classes}_{n_images}"
    register_dataset(
        name,
        lambda: records,
        {"stuff_classes": [f"class{c}" for c in range(num_classes)], "ignore_label": 255},
    )
    gen = torch.Generator().manual_seed(0)
    logits = []
    for _, gt in maps:
        g = torch.from_numpy(np.where(gt == 255, 0, gt).astype(np.int64))
        x = torch.nn.functional.one_hot(g, num_classes).permute(2, 0, 1).float()
        logits.append((x + 0.9 * torch.randn(x.shape, generator=gen)).contiguous())
    inputs = [{"file_name": r["file_name"]} for r in records]
    return name, inputs, logits


def _run_sem_seg(evaluator, inputs, logits):
    def process():
        for i, inp in enumerate(inputs):
            evaluator.process([inp], [{"sem_seg": logits[i % len(logits)]}])

    evaluator.reset()
    _, process_s = timed(process)
    res, evaluate_s = timed(evaluator.evaluate)
    return res["sem_seg"], process_s / len(inputs), evaluate_s


@contextlib.contextmanager
def _spinning_processes(n):
    """``n`` background processes that spin on the CPU for as long as the block runs: a CPU
    shared with other busy jobs, reproducibly (on top of whatever else runs on the machine)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if procs:
            time.sleep(1.0)  # let them be scheduled
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _miou_row(name, inputs, logits, boundary, rounds):
    """Both evaluators side by side: in each round each processes the same next image (round
    robin, so both see the same load), then both evaluate. Returns the per-image times (s) and
    the results."""
    ref_ev = SemSegEvaluator(name, distributed=False)
    ref_ev._compute_boundary_iou = boundary
    ours_ev = MIoUEvaluator(name, distributed=False, boundary_iou=boundary)
    ref_ev.reset()
    ours_ev.reset()

    def step(evaluator):
        def run(r):
            evaluator.process([inputs[r % len(inputs)]], [{"sem_seg": logits[r % len(logits)]}])

        return run

    times = time_round_robin({"d2": step(ref_ev), "seg2": step(ours_ev)}, warmup=1, repeats=rounds)
    return times, ref_ev.evaluate()["sem_seg"], ours_ev.evaluate()["sem_seg"]


def _boundary_check(label, name, inputs, logits):
    """Boundary numbers against detectron2 without its uint8 wrap-around (untimed)."""
    ours_ev = MIoUEvaluator(name, distributed=False, boundary_iou=True)
    ours, _, _ = _run_sem_seg(ours_ev, inputs, logits)
    wide, _, _ = _run_sem_seg(SemSegEvaluatorWideBoundary(name, distributed=False), inputs, logits)
    b_keys = [k for k in wide if "B-Iou" in k or "Boundary" in k]
    b_diff = _max_diff({k: ours[k] for k in b_keys}, {k: wide[k] for k in b_keys})
    print(f"{label}: boundary IoU max abs diff against detectron2 on int64 maps: {b_diff:.1e}")


def bench_miou(args):
    """Per-image ``process()`` time of SemSegEvaluator and MIoUEvaluator taking turns image by
    image, on a quiet CPU and with ``--load`` spinning processes started here, and the ratio."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        setups = []
        for spec in args.sizes:
            h, w, c = (int(v) for v in spec.split("x"))
            name, inputs, logits = _sem_seg_setup(folder, max(args.images, 1), h, w, c)
            setups.append((f"{h}x{w}, {c} classes", name, inputs, logits))
        for load in args.load:
            with _spinning_processes(load):
                for label, name, inputs, logits in setups:
                    for boundary in (False, True):
                        times, ref, ours = _miou_row(name, inputs, logits, boundary, args.images)
                        plain = [k for k in ref if "B-Iou" not in k and "Boundary" not in k]
                        diff = _max_diff({k: ours[k] for k in plain}, {k: ref[k] for k in plain})
                        d2_ms, seg2_ms = (1000 * float(np.median(times[k])) for k in ("d2", "seg2"))
                        loadavg = f"{os.getloadavg()[0]:.1f}"
                        yes_no = "yes" if boundary else "no"
                        ratio = d2_ms / seg2_ms
                        rows.append((load, loadavg, label, yes_no, d2_ms, seg2_ms, ratio, diff))
        if args.check_boundary:
            for setup in setups:
                _boundary_check(*setup)
    print(
        f"\nmIoU, median per-image process() time over {args.images} images taking turns, "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs"
    )
    print(
        "| spinning processes | load avg (1 min) | size | boundary IoU | SemSegEvaluator ms/img "
        "| MIoUEvaluator ms/img | speed-up | max abs diff mIoU..ACC |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.1f}x "
            f"| {r[7]:.1e} |"
        )


def bench_memory(args):
    h, w, c = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        name, inputs, logits = _sem_seg_setup(
            folder, args.images, h, w, c, name="bench_sem_seg_memory"
        )
        print(
            f"\nmemory over a run at {h}x{w}, {c} classes (tracemalloc: Python and numpy "
            "allocations; RSS: process)"
        )
        print(
            "| evaluator | images | traced after 10% (MB) | traced at end (MB) | traced peak (MB) "
            "| RSS after 10% / at end (MB) |"
        )
        print("|---|---|---|---|---|---|")
        for label, n, make in (
            ("MIoUEvaluator", args.images, lambda: MIoUEvaluator(name, distributed=False)),
            (
                "MIoUEvaluator, boundary IoU",
                args.images,
                lambda: MIoUEvaluator(name, distributed=False, boundary_iou=True),
            ),
            (
                "SemSegEvaluator",
                args.reference_images,
                lambda: SemSegEvaluator(name, distributed=False),
            ),
        ):
            if n <= 0:
                continue
            ev = make()
            ev.reset()
            tracemalloc.start()
            early = None
            for i, inp in enumerate(inputs[:n]):
                ev.process([inp], [{"sem_seg": logits[i % len(logits)]}])
                if i + 1 == max(1, n // 10):
                    early = (tracemalloc.get_traced_memory()[0] / 2**20, rss_mb())
            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            rss_end = rss_mb()
            ev.evaluate()
            print(
                f"| {label} | {n} | {early[0]:.2f} | {current / 2**20:.2f} | {peak / 2**20:.2f} | "
                f"{early[1]:.0f} / {rss_end:.0f} |"
            )
            del ev


# --------------------------------------------------------------------------------------- AP


def _ellipse(h, w, rng):
    m = np.zeros((h, w), np.uint8)
    cx, cy = int(rng.integers(10, w - 10)), int(rng.integers(10, h - 10))
    ax, ay = (int(v) for v in rng.integers(4, max(6, min(h, w) // 6), 2))
    cv2.ellipse(m, (cx, cy), (ax, ay), int(rng.integers(0, 180)), 0, 360, 1, -1)
    return m


def _ap_setup(folder, n_images, h, w, n_gt, n_det, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    images, anns, gt_masks = [], [], {}
    for img_id in range(1, n_images + 1):
        images.append({"id": img_id, "width": w, "height": h, "file_name": f"{img_id}.jpg"})
        gt_masks[img_id] = []
        for _ in range(n_gt):
            m = _ellipse(h, w, rng)
            cat = int(rng.integers(1, num_classes + 1))
            rle = encode_masks(torch.from_numpy(m[None]).bool())[0]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": cat,
                    "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(m.sum()),
                    "bbox": [float(v) for v in cv2.boundingRect(m)],
                }
            )
            gt_masks[img_id].append((m, cat))
    json_file = os.path.join(folder, "bench_instances.json")
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    name = "bench_instances"
    register_dataset(
        name,
        lambda: [],
        {
            "json_file": json_file,
            "thing_classes": [c["name"] for c in cats],
            "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
        },
    )
    inputs, outputs = [], []
    for img_id in range(1, n_images + 1):
        masks, classes = [], []
        for k in range(n_det):
            if k < len(gt_masks[img_id]):  # a shifted copy of a GT object
                m, cat = gt_masks[img_id][k]
                m = np.roll(m, int(rng.integers(-4, 5)), axis=int(rng.integers(0, 2)))
                cls = cat - 1
            else:  # a false positive
                m, cls = _ellipse(h, w, rng), int(rng.integers(0, num_classes))
            masks.append(m)
            classes.append(cls)
        masks = torch.from_numpy(np.stack(masks)).bool()
        boxes = [cv2.boundingRect(m.numpy().astype(np.uint8)) for m in masks]
        inst = Instances((h, w))
        inst.pred_masks = masks
        inst.pred_boxes = Boxes(
            torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in boxes], dtype=torch.float32)
        )
        inst.scores = torch.from_numpy(rng.random(n_det).astype(np.float32))
        inst.pred_classes = torch.tensor(classes)
        inputs.append({"image_id": img_id, "file_name": f"{img_id}.jpg"})
        outputs.append({"instances": inst})
    return name, inputs, outputs


def _run_ap(evaluator, inputs, outputs):
    def process():
        for i, o in zip(inputs, outputs):
            evaluator.process([i], [o])

    evaluator.reset()
    _, process_s = timed(process)
    with contextlib.redirect_stdout(io.StringIO()):
        res, evaluate_s = timed(evaluator.evaluate)
    return res, process_s, evaluate_s


def bench_ap(args):
    h, w = (int(v) for v in args.image_size.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        name, inputs, outputs = _ap_setup(
            folder, args.images, h, w, args.gt, args.detections, args.classes
        )
        # segm_area="mask" sizes segm detections as COCOEvaluator does, so every key can be
        # compared.
        pairs = [
            (
                "COCOEvaluator (use_fast_impl=True)",
                lambda: COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False),
                "MaskAPEvaluator (detectron2_fast)",
                lambda: MaskAPEvaluator(name, distributed=False, segm_area="mask"),
            ),
            (
                "COCOEvaluator (use_fast_impl=False)",
                lambda: COCOEvaluator(
                    name, tasks=("bbox", "segm"), distributed=False, use_fast_impl=False
                ),
                "MaskAPEvaluator (pycocotools)",
                lambda: MaskAPEvaluator(
                    name, distributed=False, backend="pycocotools", segm_area="mask"
                ),
            ),
        ]
        print(
            f"\nmask/box AP: {args.images} images {h}x{w}, {args.detections} detections and "
            f"{args.gt} objects per image, "
            f"{args.classes} classes, torch threads {torch.get_num_threads()}; process + evaluate "
            "(bbox and segm)"
        )
        print(
            "| reference | seconds (process + evaluate) | seg2 | seconds (process + evaluate) | "
            "speed-up | max abs AP diff |"
        )
        print("|---|---|---|---|---|---|")
        for ref_label, make_ref, our_label, make_ours in pairs:
            ref, rp, re_ = _run_ap(make_ref(), inputs, outputs)
            ours, op, oe = _run_ap(make_ours(), inputs, outputs)
            diff = max(_max_diff(ours[t], ref[t]) for t in ("bbox", "segm"))
            print(
                f"| {ref_label} | {rp + re_:.2f} ({rp:.2f} + {re_:.2f}) | {our_label} | "
                f"{op + oe:.2f} ({op:.2f} + {oe:.2f}) | "
                f"{(rp + re_) / (op + oe):.1f}x | {diff:.1e} |"
            )
            print(
                f"|   AP segm / bbox | {ref['segm']['AP']:.4f} / {ref['bbox']['AP']:.4f} | | "
                f"{ours['segm']['AP']:.4f} / {ours['bbox']['AP']:.4f} | | |"
            )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0, the default: one per core, as in training)",
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("miou")
    p.add_argument("--images", type=int, default=8, help="timed images per row (per evaluator)")
    p.add_argument("--sizes", nargs="+", default=["512x512x21"], help="HxWxCLASSES")
    p.add_argument(
        "--load",
        type=int,
        nargs="+",
        default=[0, 2],
        help="a row per value: this many spinning processes started by the benchmark",
    )
    p.add_argument(
        "--check-boundary",
        action="store_true",
        help="also compare boundary IoU with detectron2's on int64 maps (untimed)",
    )
    p = sub.add_parser("memory")
    p.add_argument("--images", type=int, default=500)
    p.add_argument(
        "--reference-images", type=int, default=100, help="images for SemSegEvaluator (0: skip it)"
    )
    p.add_argument("--size", default="256x256x21", help="HxWxCLASSES")
    p = sub.add_parser("ap")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--image-size", default="480x640")
    p.add_argument("--detections", type=int, default=100)
    p.add_argument("--gt", type=int, default=15)
    p.add_argument("--classes", type=int, default=20)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    {"miou": bench_miou, "memory": bench_memory, "ap": bench_ap}[args.bench](args)


if __name__ == "__main__":
    main()
