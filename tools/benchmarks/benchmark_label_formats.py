#!/usr/bin/env python3
"""
Cost of colour-coded (RGB) label masks against index masks, side by side in one run, on the same
real images (CamVid): the same labels written as single-channel ('L') index PNGs with void 11 (as
CamVid ships them), as palette ('P') PNGs, and as RGB PNGs in SegNet's CamVid colours with void
(0, 0, 0). For each format: decoding alone (:func:`seg2.data.read_sem_seg`, ms per map) and the
training mapper (:class:`~seg2.data.MultiTaskDatasetMapper`: image read, label read, flip, at
CamVid's 480x360), images/s, and the time ratio against the index masks. The formats take turns
pass by pass (best of ``--repeats``) so that load from other jobs hits them alike.

    OMP_NUM_THREADS=1 python3 tools/benchmarks/benchmark_label_formats.py [--root datasets/CamVid]
    [--images 64]

``--root`` defaults to ``$DETECTRON2_DATASETS/CamVid``, else the team's
``../shared/datasets/CamVid_mini``.
"""

import argparse
import os
import shutil
import sys
import tempfile

import cv2
import numpy as np
import torch
from detectron2.config import get_cfg
from PIL import Image
from timing import best_of_rounds

import seg2
from seg2.data import (
    CAMVID_CLASSES,
    CAMVID_COLORS,
    CAMVID_VOID_LABEL,
    MultiTaskDatasetMapper,
    load_camvid,
    read_sem_seg,
)
from seg2.data.label_map import sem_seg_format
from seg2.utils import Seg2Error

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOID_COLOR = (0, 0, 0)


def _default_root():
    full = os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "CamVid")
    return (
        full
        if os.path.isdir(full)
        else os.path.join(REPO, "..", "shared", "datasets", "CamVid_mini")
    )


def _format_records(records, out_dir):
    """The records three times: CamVid's 'L' maps, and copies of them as 'P' and as RGB PNGs."""
    colours = np.zeros((256, 3), np.uint8)
    colours[: len(CAMVID_COLORS)] = CAMVID_COLORS
    colours[CAMVID_VOID_LABEL] = VOID_COLOR
    rgb_format = sem_seg_format("rgb", colors=CAMVID_COLORS, void_colors=[VOID_COLOR])
    palette = colours.reshape(-1).tolist()
    by_format = {"index ('L')": records, "palette ('P')": [], "RGB": []}
    for kind in ("P", "RGB"):
        os.makedirs(os.path.join(out_dir, kind))
    for r in records:
        label = np.asarray(Image.open(r["sem_seg_file_name"]))
        name = os.path.basename(r["sem_seg_file_name"])
        p = Image.fromarray(label, mode="P")
        p.putpalette(palette)
        p.save(os.path.join(out_dir, "P", name))
        Image.fromarray(colours[label]).save(os.path.join(out_dir, "RGB", name))
        by_format["palette ('P')"].append(
            dict(r, sem_seg_file_name=os.path.join(out_dir, "P", name))
        )
        by_format["RGB"].append(
            dict(r, sem_seg_file_name=os.path.join(out_dir, "RGB", name), sem_seg_format=rgb_format)
        )
    return by_format


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=_default_root(), help="a CamVid folder (SegNet's layout)")
    parser.add_argument("--split", default="train")
    parser.add_argument(
        "--images", type=int, default=64, help="at most this many images of the split"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    records = load_camvid(args.root, args.split)[: args.images]
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (360,), 480  # CamVid's own size
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(CAMVID_CLASSES)
    mapper = MultiTaskDatasetMapper(cfg, is_train=True)

    tmp = tempfile.mkdtemp(prefix="seg2-bench-formats-")
    try:
        by_format = _format_records(records, tmp)
        try:
            for rs in by_format.values():
                mapper(rs[0])
        except Seg2Error as e:
            sys.exit(
                f"the mapper cannot read this label format ({e}); it must read label maps with "
                "read_sem_seg(record)"
            )
        for rs in by_format.values():  # every format decodes to the same class map
            assert all(
                np.array_equal(read_sem_seg(a), read_sem_seg(b))
                for a, b in zip(by_format["RGB"], rs)
            )

        # one untimed round first warms caches (files, the colour table)
        decode = best_of_rounds(
            {k: lambda rs=rs: [read_sem_seg(r) for r in rs] for k, rs in by_format.items()},
            args.repeats,
        )
        mapped = best_of_rounds(
            {k: lambda rs=rs: [mapper(r) for r in rs] for k, rs in by_format.items()}, args.repeats
        )
        n, ref = len(records), "index ('L')"
        print(f"{n} CamVid {args.split} images of 480x360 from {args.root}, best of {args.repeats}")
        print(
            f"{'label files':16s} {'decode ms/map':>13s} {'ratio':>6s} {'mapper img/s':>13s} "
            f"{'time ratio':>10s}"
        )
        for name in by_format:
            print(
                f"{name:16s} {1e3 * decode[name] / n:13.2f} {decode[name] / decode[ref]:6.2f} "
                f"{n / mapped[name]:13.1f} {mapped[name] / mapped[ref]:10.3f}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
