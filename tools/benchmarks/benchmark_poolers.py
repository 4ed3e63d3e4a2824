#!/usr/bin/env python3
"""
Forward and backward time of each RoI pooler variant on FPN features, side by side in one run,
as ratios to ROIAlignV2 (detectron2's default, torchvision's roi_align with aligned=True).

    OMP_NUM_THREADS=1 python3 tools/benchmarks/benchmark_poolers.py                  # 512 RoIs,
    256 channels, 7x7
    python3 tools/benchmarks/benchmark_poolers.py --resolution 14 --device cuda

Variants are timed round-robin (each repeat runs every variant once) so that load changes on a
shared machine hit all of them alike; the median over repeats is reported.
"""

import argparse
import json
import statistics

import torch
from detectron2.structures import Boxes
from timing import time_round_robin

from seg2.modeling.poolers import ExtendedROIPooler

VARIANTS = [  # (pooler type, aggregation)
    ("ROIAlignV2", "avg"),  # the reference
    ("ROIAlignV2", "max"),
    ("ROIAlign", "avg"),
    ("ROIAlign", "max"),
    ("ROIWarp", "avg"),
    ("ROIWarp", "max"),
    ("ROIPool", "max"),
]
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)  # FPN p2..p5


def random_boxes(n, height, width, generator):
    """Boxes with log-uniform sizes (16 to 512 px) and aspect ratios (1/3 to 3), inside the image."""
    size = torch.exp(torch.empty(n).uniform_(2.77, 6.24, generator=generator))  # 16 .. 512
    ratio = torch.exp(torch.empty(n).uniform_(-1.1, 1.1, generator=generator))
    w = (size * ratio.sqrt()).clamp(max=width - 1)
    h = (size / ratio.sqrt()).clamp(max=height - 1)
    x0 = torch.rand(n, generator=generator) * (width - w)
    y0 = torch.rand(n, generator=generator) * (height - h)
    return Boxes(torch.stack([x0, y0, x0 + w, y0 + h], dim=1))


def time_variants(args):
    gen = torch.Generator().manual_seed(0)
    device = args.device
    h, w = args.image_size
    feats = [
        torch.randn(args.images, args.channels, int(h * s), int(w * s), generator=gen).to(device)
        for s in SCALES
    ]
    feats = [f.requires_grad_() for f in feats]
    per_image = args.rois // args.images
    boxes = [random_boxes(per_image, h, w, gen).to(device) for _ in range(args.images)]
    poolers = {
        (t, a): ExtendedROIPooler(
            args.resolution, SCALES, args.sampling_ratio, t, aggregation=a
        ).to(device)
        for t, a in VARIANTS
    }
    for pooler in poolers.values():  # checked once, untimed
        pooled = pooler(feats, boxes)
        assert pooled.shape == (
            per_image * args.images,
            args.channels,
            args.resolution,
            args.resolution,
        )
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(pooled.sum(), feats))

    # Each variant's forward, then its backward through that output, are two steps of the round.
    out = {}
    steps = {}
    for key, pooler in poolers.items():
        steps[key + ("forward",)] = lambda _, pooler=pooler: out.update(y=pooler(feats, boxes))
        steps[key + ("backward",)] = lambda _: torch.autograd.grad(out.pop("y").sum(), feats)
    times = time_round_robin(steps, args.warmup, args.repeats, device)
    fwd = {key: times[key + ("forward",)] for key in poolers}
    bwd = {key: times[key + ("backward",)] for key in poolers}
    ref = ("ROIAlignV2", "avg")
    rows = []
    for key in poolers:
        f, b = statistics.median(fwd[key]), statistics.median(bwd[key])
        rows.append(
            {
                "pooler_type": key[0],
                "aggregation": key[1],
                "forward_ms": 1e3 * f,
                "backward_ms": 1e3 * b,
                "forward_ratio": f / statistics.median(fwd[ref]),
                "backward_ratio": b / statistics.median(bwd[ref]),
            }
        )
    return rows


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rois", type=int, default=512, help="RoIs in all (split over --images)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument(
        "--resolution", type=int, default=7, help="bins per side (7: box head, 14: mask head)"
    )
    parser.add_argument("--sampling-ratio", type=int, default=2)
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1088), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = time_variants(args)
    print(
        f"{args.rois} RoIs over {args.images} images of "
        f"{args.image_size[0]}x{args.image_size[1]}, FPN p2-p5, "
        f"{args.channels} channels, {args.resolution}x{args.resolution} bins, sampling ratio "
        f"{args.sampling_ratio}, "
        f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(
        "| pooler | agg. | forward ms | backward ms | forward / ROIAlignV2 | backward / "
        "ROIAlignV2 |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['pooler_type']} | {r['aggregation']} | {r['forward_ms']:.1f} | "
            f"{r['backward_ms']:.1f} | "
            f"{r['forward_ratio']:.2f} | {r['backward_ratio']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
