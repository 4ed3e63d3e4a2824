#!/usr/bin/env python3
"""
Speed and FLOPs of seg2's semantic models, side by side with detectron2's own semantic heads.

    python3 tools/benchmarks/benchmark_heads.py              # full-size VOC models, 256x256, CPU
    python3 tools/benchmarks/benchmark_heads.py --preset tiny --size 128 --iters 5
    python3 tools/benchmarks/benchmark_heads.py --device cuda --size 512 --batch 8 --iters 20

Per-iteration train time (forward + backward + SGD step) and inference time of each model at one
input size, and fvcore FLOPs of one inference; ratios are to detectron2's DeepLabV3PlusHead model
(the same ResNet-50 / size / batch, measured in the same run). Models are randomly initialised
(no download); timings exclude data loading. The cost of a semantic head next to Mask R-CNN is
benchmark_multitask_cost.py.
"""

import argparse
import json
import os

import torch
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.events import EventStorage
from timing import inference_step, time_iterations, train_step

import seg2

C = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)

# name -> (config, overrides). detectron2's own heads run in detectron2's SemanticSegmentor.
SEMANTIC_FULL = {
    "d2 DeepLabV3PlusHead R50 (ref)": (
        "semantic/deeplabv3plus_R50-os16_20k_voc.yaml",
        [
            "MODEL.META_ARCHITECTURE",
            "SemanticSegmentor",
            "MODEL.SEM_SEG_HEAD.NAME",
            "DeepLabV3PlusHead",
        ],
    ),
    "d2 SemSegFPNHead R50-FPN": (
        "semantic/unet_R50_20k_voc.yaml",
        [
            "MODEL.META_ARCHITECTURE",
            "SemanticSegmentor",
            "MODEL.BACKBONE.NAME",
            "build_resnet_fpn_backbone",
            "MODEL.FPN.IN_FEATURES",
            "['res2','res3','res4','res5']",
            "MODEL.SEM_SEG_HEAD.NAME",
            "SemSegFPNHead",
            "MODEL.SEM_SEG_HEAD.IN_FEATURES",
            "['p2','p3','p4','p5']",
            "MODEL.SEM_SEG_HEAD.CONVS_DIM",
            "128",
            "MODEL.SEM_SEG_HEAD.NORM",
            "GN",
            "MODEL.SEM_SEG_HEAD.COMMON_STRIDE",
            "4",
        ],
    ),
    "seg2 DeepLabV3+ R50": ("semantic/deeplabv3plus_R50-os16_20k_voc.yaml", []),
    "seg2 FCN-8s VGG16": ("semantic/fcn8s_vgg16_20k_voc.yaml", []),
    "seg2 U-Net R50": ("semantic/unet_R50_20k_voc.yaml", []),
    "seg2 SegNet VGG16-BN": ("semantic/segnet_vgg16-bn_20k_voc.yaml", []),
}
SEMANTIC_TINY = {
    "d2 DeepLabV3PlusHead R50-tiny (ref)": (
        "quickstart/deeplabv3plus_R50-tiny-os16_shapes_cpu.yaml",
        [
            "MODEL.META_ARCHITECTURE",
            "SemanticSegmentor",
            "MODEL.SEM_SEG_HEAD.NAME",
            "DeepLabV3PlusHead",
        ],
    ),
    "seg2 DeepLabV3+ R50-tiny": ("quickstart/deeplabv3plus_R50-tiny-os16_shapes_cpu.yaml", []),
    "seg2 FCN-8s VGG16-tiny": ("quickstart/fcn8s_vgg16-tiny_shapes_cpu.yaml", []),
    "seg2 U-Net tiny": ("quickstart/unet_tiny_shapes_cpu.yaml", []),
    "seg2 U-Net-valid tiny": ("quickstart/unet-valid_tiny_shapes_cpu.yaml", []),
    "seg2 SegNet VGG16-tiny": ("quickstart/segnet_vgg16-tiny_shapes_cpu.yaml", []),
}


def make_cfg(config, overrides, device, bn_only=True):
    cfg = seg2.load_seg2_config(os.path.join(C, config), overrides)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    cfg.INPUT.CROP.ENABLED = False  # detectron2's DeepLab head would size ASPP pooling to the crop
    if bn_only:  # SyncBN needs a process group; one process here
        for node in (cfg.MODEL.RESNETS, cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.UNET_HEAD):
            if node.NORM == "SyncBN":
                node.NORM = "BN"
    return cfg


def time_train(model, inputs, iters, warmup, device):
    """Median seconds of a train step (forward, backward, SGD step) on ``inputs``."""
    with EventStorage(0):
        return time_iterations(train_step(model, [inputs], device=device), warmup, iters, device)[
            "seconds_per_iter"
        ]


def time_inference(model, inputs, iters, warmup, device):
    """Median seconds of an inference forward on ``inputs``."""
    return time_iterations(inference_step(model, [inputs], device=device), warmup, iters, device)[
        "seconds_per_iter"
    ]


def gflops(model, inputs):
    """fvcore's FLOP count (a JIT trace), or NaN where the model cannot be traced. SegNet's
    unpooling traces since it scatters (``seg2.modeling.upsample.max_unpool``); fvcore counts
    no FLOPs for the scatter itself, as none for ``max_unpool2d``."""
    model.eval()
    flops = FlopCountAnalysis(model, [{"image": inputs[0]["image"]}])
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    try:
        return flops.total() / 1e9
    except (TypeError, RuntimeError) as e:
        print(
            f"FLOPs not counted: the JIT trace failed ({type(e).__name__}: {str(e)[:120]})",
            flush=True,
        )
        return float("nan")


def semantic(args):
    specs = SEMANTIC_TINY if args.preset == "tiny" else SEMANTIC_FULL
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (config, overrides) in specs.items():
        if args.only and not any(o in name for o in args.only):
            continue
        torch.manual_seed(0)
        cfg = make_cfg(config, overrides, args.device)
        model = build_model(cfg)
        c = len(cfg.MODEL.PIXEL_MEAN)
        inputs = [
            {
                "image": torch.randint(
                    0, 256, (c, args.size, args.size), generator=g, dtype=torch.uint8
                ),
                "sem_seg": torch.randint(
                    0, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, (args.size, args.size), generator=g
                ),
            }
            for _ in range(args.batch)
        ]
        row = {
            "model": name,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "GFLOPs": gflops(model, inputs),
            "train_s": time_train(model, inputs, args.iters, args.warmup, args.device),
            "infer_s": time_inference(
                model, [{"image": x["image"]} for x in inputs], args.iters, args.warmup, args.device
            ),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    ref = rows[0]
    print(
        f"\nSemantic models, {args.size}x{args.size}, batch {args.batch}, {args.device}; ratios "
        f"to {ref['model']}"
    )
    print(
        f"{'model':40s} {'params(M)':>9s} {'GFLOPs':>8s} {'train s/it':>10s} {'x':>6s} "
        f"{'infer s/it':>10s} {'x':>6s}"
    )
    for r in rows:
        print(
            f"{r['model']:40s} {r['params_M']:9.2f} {r['GFLOPs']:8.2f} {r['train_s']:10.3f} "
            f"{r['train_s'] / ref['train_s']:6.2f} {r['infer_s']:10.3f} "
            f"{r['infer_s'] / ref['infer_s']:6.2f}"
        )
    return rows


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=["full", "tiny"], default="full")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)"
    )
    p.add_argument(
        "--only", nargs="*", help="run the semantic models whose name contains one of these"
    )
    p.add_argument("--json", help="write all rows here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"args": vars(args), "semantic": semantic(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
