#!/usr/bin/env python3
"""
Speed and peak memory of a seg2 config: training iterations/s, inference images/s, and tiled
against whole-image semantic inference of large images. Prints a table and writes JSON.

    python tools/benchmark.py --config-file configs/quickstart/unet_tiny_shapes_cpu.yaml \
        --tasks train inference --warmup 2 --iters 10 --json output/benchmark.json
    python tools/benchmark.py --config-file configs/quickstart/unet_tiny_shapes_cpu.yaml \
        --tasks tiling --sizes 4096 8192 --whole-max-size 4096 \
        TEST.TILING.TILE_SIZE 512 TEST.TILING.STRIDE 384 TEST.TILING.BATCH_SIZE 4

Peak memory is RSS on the CPU (VmHWM, reset before each measurement) and
torch.cuda.max_memory_allocated on a GPU; see seg2.utils.benchmark.
"""

import argparse
import json
import os
import platform
import sys

import torch

import seg2
from seg2.engine.benchmark import benchmark_train
from seg2.inference.benchmark import benchmark_inference, benchmark_tiling
from seg2.utils.cli import add_debug_argument, run_tool

TASKS = ("train", "inference", "tiling")
MODES = ("tiled_labels", "tiled_logits", "whole")


def get_parser():
    p = argparse.ArgumentParser(description="seg2 benchmark: train it/s, inference images/s, tiled inference")
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=["train", "inference"])
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--sizes", type=int, nargs="+", default=[4096], help="tiling: square image sides")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="tiling: cases to run")
    p.add_argument(
        "--tiling-warmup", type=int, default=1,
        help="tiling: untimed runs per case first (0 times the first call: cuDNN autotuning, allocator)",
    )
    p.add_argument("--tiling-iters", type=int, default=1, help="tiling: timed rounds, the cases taking turns")
    p.add_argument("--whole-max-size", type=int, default=4096, help="tiling: largest side also run whole")
    p.add_argument("--json", default="", help="write the results here (default OUTPUT_DIR/benchmark.json)")
    add_debug_argument(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return p


def setup_cfg(args):
    cfg = seg2.load_seg2_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def format_table(results) -> str:
    lines = [f"{'task':<22} {'rate':>16} {'s/iter':>9} {'peak MB':>9} {'start MB':>9}"]
    for name in ("train", "inference"):
        if name in results:
            r = results[name]
            unit = "it/s" if name == "train" else "img/s"
            lines.append(
                f"{name:<22} {r['per_second']:>11.3f} {unit:<4} {r['seconds_per_iter']:>9.3f} {r['peak_mb']:>9.0f} {r['start_mb']:>9.0f}"
            )
    rows = results.get("tiling", [])
    whole = {r["size"]: r for r in rows if r["mode"] == "whole"}
    for r in rows:
        name = f"{r['size']}px {r['mode']}"
        extra = ""
        if r["mode"] != "whole" and r["size"] in whole:
            w = whole[r["size"]]
            ratio = r["seconds_per_iter"] / w["seconds_per_iter"]
            extra = (
                f"  time x{ratio:.2f} of whole (x{ratio / r['overlap_bound']:.2f} of the overlap bound "
                f"{r['overlap_bound']:.2f}, x{ratio / r['pixel_bound']:.2f} of the tile-pixel bound {r['pixel_bound']:.2f}), "
                f"peak-start x{(r['peak_mb'] - r['start_mb']) / max(w['peak_mb'] - w['start_mb'], 1e-9):.3f} of whole"
            )
        lines.append(
            f"{name:<22} {1.0 / r['seconds_per_iter']:>11.3f} img/s {r['seconds_per_iter']:>9.2f} "
            f"{r['peak_mb']:>9.0f} {r['start_mb']:>9.0f}{extra}"
        )
    return "\n".join(lines)


def run(args) -> int:
    cfg = setup_cfg(args)
    results = {
        "config_file": args.config_file,
        "opts": args.opts,
        "device": cfg.MODEL.DEVICE,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "warmup": args.warmup,
        "iters": args.iters,
        "tiling_warmup": args.tiling_warmup,
        "tiling_iters": args.tiling_iters,
    }
    if "train" in args.tasks:
        results["train"] = benchmark_train(cfg, args.warmup, args.iters)
    if "inference" in args.tasks:
        results["inference"] = benchmark_inference(cfg, args.warmup, args.iters)
    if "tiling" in args.tasks:
        t = cfg.TEST.TILING
        results["tiling_config"] = {k: t[k] for k in ("TILE_SIZE", "STRIDE", "BATCH_SIZE", "BLEND", "MARGIN")}
        results["tiling"] = benchmark_tiling(
            cfg, args.sizes, args.whole_max_size, args.tiling_warmup, args.tiling_iters, modes=args.modes
        )
    print(format_table(results))
    path = args.json or os.path.join(cfg.OUTPUT_DIR, "benchmark.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    return run_tool(run, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
