#!/usr/bin/env python3
"""
seg2's ``pq_compute`` against panopticapi's, side by side in one run, on a generated COCO-like
panoptic set: both must give the same numbers (to 1e-9); prints the speed ratio.

panopticapi is public code that is not on PyPI: clone it (``git clone
https://github.com/cocodataset/panopticapi``) and pass its folder. Its single-core path
(``pq_compute_single_core``, what ``pq_compute`` runs on each core) is timed, with the JSON loading
and averaging of its ``pq_compute`` around it, against seg2's ``pq_compute`` in one process. Runs
take turns, repeat by repeat, so that load from other jobs hits both alike.

Usage::

    PYTHONPATH=$PWD python3 tools/benchmarks/benchmark_pq.py --panopticapi /work/panopticapi
"""

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

NUM_THINGS, NUM_STUFF = 80, 53  # COCO panoptic's category counts


def categories():
    cats = [
        {"id": i + 1, "name": f"thing{i + 1}", "isthing": 1, "supercategory": "t"}
        for i in range(NUM_THINGS)
    ]
    cats += [
        {"id": 101 + i, "name": f"stuff{i + 1}", "isthing": 0, "supercategory": "s"}
        for i in range(NUM_STUFF)
    ]
    return cats


def _voronoi(rng, h, w, seeds):
    """Cell index per pixel of a Voronoi partition (computed at 1/8 and upsampled: blocky stuff)."""
    hs, ws = h // 8, w // 8
    yy, xx = np.mgrid[0:hs, 0:ws]
    d = (yy[None] - seeds[:, 0, None, None] / 8) ** 2 + (
        xx[None] - seeds[:, 1, None, None] / 8
    ) ** 2
    small = d.argmin(0)
    return np.kron(small, np.ones((8, 8), dtype=small.dtype))[:h, :w]


def _draw(rng, h, w, cy, cx, ry, rx, ellipse):
    yy, xx = np.ogrid[0:h, 0:w]
    if ellipse:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)


def _new_id(rng, used):
    while True:
        i = int(rng.integers(1, 256**3))
        if i not in used:
            used.add(i)
            return i


def make_image(rng, h, w):
    """(gt ids, gt segments, pred ids, pred segments) of one image."""
    stuff_cats = rng.choice(
        np.arange(101, 101 + NUM_STUFF), size=int(rng.integers(4, 9)), replace=False
    )
    n_cells = len(stuff_cats) * 2
    seeds = np.stack([rng.uniform(0, h, n_cells), rng.uniform(0, w, n_cells)], 1)
    cell_cat = np.concatenate([stuff_cats, rng.choice(stuff_cats, n_cells - len(stuff_cats))])
    gt_cat_map = cell_cat[_voronoi(rng, h, w, seeds)]
    jitter = seeds + rng.normal(0, 25, seeds.shape)
    pred_cat_map = cell_cat[_voronoi(rng, h, w, jitter)]
    pred_cat_map = np.where(
        rng.random(n_cells)[_voronoi(rng, h, w, jitter)] < 0.1, rng.choice(stuff_cats), pred_cat_map
    )

    gt_seg = np.zeros((h, w), np.int64)  # segment index + 1; 0 void
    pred_seg = np.zeros((h, w), np.int64)
    gt_info, pred_info = [], []  # (category, iscrowd)
    for c in np.unique(gt_cat_map):
        gt_info.append((int(c), 0))
        gt_seg[gt_cat_map == c] = len(gt_info)
    for c in np.unique(pred_cat_map):
        pred_info.append((int(c), 0))
        pred_seg[pred_cat_map == c] = len(pred_info)
    # things on top
    for _ in range(int(rng.integers(14, 32))):
        cat = int(rng.integers(1, NUM_THINGS + 1))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(8, 90), rng.uniform(8, 90)
        ellipse = bool(rng.random() < 0.6)
        m = _draw(rng, h, w, cy, cx, ry, rx, ellipse)
        crowd = int(rng.random() < 0.05)
        gt_info.append((cat, crowd))
        gt_seg[m] = len(gt_info)
        r = rng.random()
        if r < 0.15:
            continue  # missed: a false negative
        s = rng.uniform(0.7, 1.3)
        pm = _draw(
            rng,
            h,
            w,
            cy + rng.normal(0, ry * 0.3),
            cx + rng.normal(0, rx * 0.3),
            ry * s,
            rx * s,
            ellipse,
        )
        pcat = cat if rng.random() > 0.1 else int(rng.integers(1, NUM_THINGS + 1))
        pred_info.append((pcat, 0))
        pred_seg[pm] = len(pred_info)
    for _ in range(int(rng.integers(1, 6))):  # false positives
        m = _draw(
            rng,
            h,
            w,
            rng.uniform(0, h),
            rng.uniform(0, w),
            rng.uniform(5, 40),
            rng.uniform(5, 40),
            True,
        )
        pred_info.append((int(rng.integers(1, NUM_THINGS + 1)), 0))
        pred_seg[m] = len(pred_info)
    # void: thin borders between gt segments, and a few blobs in both
    border = np.zeros((h, w), bool)
    border[:, 1:] |= gt_seg[:, 1:] != gt_seg[:, :-1]
    border[1:, :] |= gt_seg[1:, :] != gt_seg[:-1, :]
    gt_seg[border] = 0
    for _ in range(int(rng.integers(0, 4))):
        gt_seg[
            _draw(
                rng,
                h,
                w,
                rng.uniform(0, h),
                rng.uniform(0, w),
                rng.uniform(5, 50),
                rng.uniform(5, 50),
                True,
            )
        ] = 0
    if rng.random() < 0.3:
        pred_seg[_draw(rng, h, w, rng.uniform(0, h), rng.uniform(0, w), 30, 30, False)] = 0

    def finish(seg, info, with_area):
        used = set()
        ids = np.zeros(len(info) + 1, np.int64)
        segments = []
        areas = np.bincount(seg.ravel(), minlength=len(info) + 1)
        for k, (cat, crowd) in enumerate(info, start=1):
            if areas[k] == 0:
                continue  # fully covered by later segments or void
            ids[k] = _new_id(rng, used)
            s = {"id": int(ids[k]), "category_id": cat, "iscrowd": crowd}
            if with_area:
                s["area"] = int(areas[k])
            segments.append(s)
        return ids[seg], segments

    gt_ids, gt_segments = finish(gt_seg, gt_info, True)
    pred_ids, pred_segments = finish(pred_seg, pred_info, False)
    return gt_ids, gt_segments, pred_ids, pred_segments


def write_set(root, num_images, h, w, seed):
    from seg2.evaluation.panoptic_evaluation import id2rgb

    rng = np.random.default_rng(seed)
    cats = categories()
    gt_json = {"categories": cats, "images": [], "annotations": []}
    pred_json = {"categories": cats, "annotations": []}
    for d in ("gt", "pred"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i in range(num_images):
        gt_ids, gt_segments, pred_ids, pred_segments = make_image(rng, h, w)
        name = f"{i:06d}.png"
        Image.fromarray(id2rgb(gt_ids)).save(os.path.join(root, "gt", name))
        Image.fromarray(id2rgb(pred_ids)).save(os.path.join(root, "pred", name))
        gt_json["images"].append({"id": i, "file_name": f"{i:06d}.jpg", "height": h, "width": w})
        gt_json["annotations"].append(
            {"image_id": i, "file_name": name, "segments_info": gt_segments}
        )
        pred_json["annotations"].append(
            {"image_id": i, "file_name": name, "segments_info": pred_segments}
        )
    for d, data in (("gt", gt_json), ("pred", pred_json)):
        with open(os.path.join(root, d + ".json"), "w") as f:
            json.dump(data, f)
    return os.path.join(root, "gt.json"), os.path.join(root, "pred.json")


def panopticapi_single_core(evaluation, gt_json_file, pred_json_file, gt_folder, pred_folder):
    """panopticapi's pq_compute with its per-core function run once in this process."""
    with open(gt_json_file) as f:
        gt_json = json.load(f)
    with open(pred_json_file) as f:
        pred_json = json.load(f)
    cats = {el["id"]: el for el in gt_json["categories"]}
    pred_annotations = {el["image_id"]: el for el in pred_json["annotations"]}
    pairs = [(a, pred_annotations[a["image_id"]]) for a in gt_json["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        pq_stat = evaluation.pq_compute_single_core(0, pairs, gt_folder, pred_folder, cats)
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = pq_stat.pq_average(cats, isthing=isthing)
        if name == "All":
            results["per_class"] = per_class
    return results


def read_all_pngs(folders):
    """What both must do at least: decode every PNG (PIL), the floor of both timings."""
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            np.asarray(Image.open(os.path.join(folder, name)))


def evaluators(gt_json, gt_folder, pred_json, pred_folder):
    """detectron2's COCOPanopticEvaluator (PNG encoding in process(), panopticapi's pq_compute on
    all cores in evaluate()) and seg2's Seg2PanopticEvaluator, on the same model outputs."""
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import COCOPanopticEvaluator

    from seg2.evaluation import Seg2PanopticEvaluator
    from seg2.evaluation.panoptic_evaluation import read_panoptic_png

    cats = categories()
    name = "seg2_benchmark_pq"
    MetadataCatalog.get(name).set(
        panoptic_json=gt_json,
        panoptic_root=gt_folder,
        evaluator_type="coco_panoptic_seg",
        thing_dataset_id_to_contiguous_id={
            c["id"]: i for i, c in enumerate(c for c in cats if c["isthing"])
        },
        stuff_dataset_id_to_contiguous_id={
            c["id"]: i for i, c in enumerate(c for c in cats if not c["isthing"])
        },
    )
    with open(pred_json) as f:
        anns = json.load(f)["annotations"]
    # PanopticFPN's output: an int32 id map and segments_info (dataset category ids, no isthing)
    samples = [
        (
            {"image_id": a["image_id"], "file_name": a["file_name"].replace(".png", ".jpg")},
            torch.from_numpy(
                read_panoptic_png(os.path.join(pred_folder, a["file_name"])).astype(np.int32)
            ),
            a["segments_info"],
        )
        for a in anns
    ]

    def run(cls):
        ev = cls(name)
        ev.reset()
        for inp, img, infos in samples:
            ev.process([inp], [{"panoptic_seg": (img, [dict(s) for s in infos])}])
        with contextlib.redirect_stdout(io.StringIO()):
            return ev.evaluate()["panoptic_seg"]

    return {
        "detectron2 COCOPanopticEvaluator": lambda: run(COCOPanopticEvaluator),
        "seg2 Seg2PanopticEvaluator": lambda: run(Seg2PanopticEvaluator),
    }


def compare(a, b, tol=1e-9):
    for group in ("All", "Things", "Stuff"):
        assert a[group]["n"] == b[group]["n"], (group, a[group], b[group])
        for k in ("pq", "sq", "rq"):
            assert abs(a[group][k] - b[group][k]) <= tol, (group, k, a[group][k], b[group][k])
    assert set(a["per_class"]) == set(b["per_class"])
    for cid in a["per_class"]:
        for k in ("pq", "sq", "rq"):
            assert abs(a["per_class"][cid][k] - b["per_class"][cid][k]) <= tol, (cid, k)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--panopticapi", required=True, help="folder of a panopticapi clone")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=0, help="also time seg2 with this many processes"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-evaluators", action="store_true", help="skip the evaluator comparison"
    )
    args = parser.parse_args()

    sys.path.insert(0, os.path.abspath(args.panopticapi))
    from panopticapi import evaluation
    from timing import timed  # tools/benchmarks/timing.py: this script's folder is on sys.path

    from seg2.evaluation.panoptic_evaluation import pq_compute

    with tempfile.TemporaryDirectory(prefix="seg2_bench_pq") as root:
        t0 = time.perf_counter()
        gt_json, pred_json = write_set(root, args.images, args.height, args.width, args.seed)
        segs = [len(a["segments_info"]) for a in json.load(open(gt_json))["annotations"]]
        print(
            f"{args.images} images {args.height}x{args.width}, gt segments per image "
            f"{min(segs)}-{max(segs)} "
            f"(mean {np.mean(segs):.1f}), written in {time.perf_counter() - t0:.1f} s"
        )
        gt_folder, pred_folder = os.path.join(root, "gt"), os.path.join(root, "pred")
        runs = {
            "panopticapi (single core)": lambda: panopticapi_single_core(
                evaluation, gt_json, pred_json, gt_folder, pred_folder
            ),
            "seg2 pq_compute": lambda: pq_compute(gt_json, pred_json, gt_folder, pred_folder),
        }
        if args.workers:
            runs[f"seg2 pq_compute ({args.workers} workers)"] = lambda: pq_compute(
                gt_json, pred_json, gt_folder, pred_folder, num_workers=args.workers
            )
        runs["PNG decoding alone (PIL)"] = lambda: read_all_pngs([gt_folder, pred_folder])
        evs = {} if args.no_evaluators else evaluators(gt_json, gt_folder, pred_json, pred_folder)
        runs.update(evs)
        times = {k: [] for k in runs}
        results = {}
        for _ in range(args.repeats):
            for name, fn in runs.items():  # taking turns (timing.time_round_robin), keeping results
                results[name], seconds = timed(fn)
                times[name].append(seconds)
        ref = results["panopticapi (single core)"]
        for name, res in results.items():
            if name.startswith("seg2 pq_compute"):
                compare(ref, res)
        for name in evs:
            for key, group in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
                for m in ("pq", "sq", "rq"):
                    got, want = results[name][m.upper() + key], 100 * ref[group][m]
                    assert abs(got - want) <= 1e-7, (name, m.upper() + key, got, want)
        print(
            "equal to 1e-9: PQ {pq:.6f} SQ {sq:.6f} RQ {rq:.6f} (n={n}); "
            "things PQ {tpq:.6f}, stuff PQ {spq:.6f}".format(
                **{k: ref["All"][k] * (100 if k != "n" else 1) for k in ("pq", "sq", "rq", "n")},
                tpq=100 * ref["Things"]["pq"],
                spq=100 * ref["Stuff"]["pq"],
            )
        )
        med = {k: float(np.median(t)) for k, t in times.items()}
        base = med["panopticapi (single core)"]
        floor = med.pop("PNG decoding alone (PIL)")
        for name, m in med.items():
            ref_time = med["detectron2 COCOPanopticEvaluator"] if "Evaluator" in name else base
            print(
                f"{name:36s} median {m:7.3f} s ({1000 * m / args.images:6.2f} ms/image) "
                f"over {len(times[name])} runs; speed-up {ref_time / m:5.2f}x"
            )
        print(
            f"{'PNG decoding alone (PIL, gt + pred)':36s} median {floor:7.3f} s: "
            "the floor of both pq_compute"
        )
        seg2 = med["seg2 pq_compute"]
        print(
            f"beyond PNG decoding: panopticapi {base - floor:.3f} s, seg2 {seg2 - floor:.3f} s: "
            f"speed-up {(base - floor) / max(seg2 - floor, 1e-9):.2f}x"
        )


if __name__ == "__main__":
    main()
