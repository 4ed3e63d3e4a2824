#!/usr/bin/env python3
"""
Speed and peak memory of a seg2 config: training iterations/s, inference images/s, and tiled
against whole-image semantic inference of large images. Prints a table and writes JSON.

    python3 tools/benchmarks/benchmark.py --config-file
    configs/quickstart/unet_tiny_shapes_cpu.yaml \
        --tasks train inference --warmup 2 --iters 10 --json output/benchmark.json
    python3 tools/benchmarks/benchmark.py --config-file
    configs/quickstart/unet_tiny_shapes_cpu.yaml \
        --tasks tiling --sizes 4096 8192 --whole-max-size 4096 \
        TEST.TILING.TILE_SIZE 512 TEST.TILING.STRIDE 384 TEST.TILING.BATCH_SIZE 4

Training is timed on the Trainer's own model, optimizer and loader (batches loaded beforehand);
inference on :class:`Seg2Predictor`; tiling against whole-image inference on random images.
Peak memory is RSS on the CPU (VmHWM, reset before each measurement) and
torch.cuda.max_memory_allocated on a GPU; see timing.py.
"""

import argparse
import itertools
import json
import os
import platform
import sys
from typing import Dict, List

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage
from timing import PeakMemory, time_iterations, timed, train_step

import seg2
from seg2.engine import Trainer
from seg2.inference import Seg2Predictor, TiledSemSegInference, read_image
from seg2.utils.cli import add_debug_argument, run_tool

TASKS = ("train", "inference", "tiling")
MODES = ("tiled_labels", "tiled_logits", "whole")


def benchmark_train(cfg, warmup: int = 2, iters: int = 10) -> Dict[str, float]:
    """Training iterations/s of ``cfg``'s model (forward, backward, optimizer step), built as
    :class:`Trainer` builds it, on batches of ``DATASETS.TRAIN`` loaded beforehand (by the
    Trainer's loader), so that data loading is not timed. Keys: see
    :func:`timing.time_iterations`, and "images_per_iter"."""
    model = Trainer.build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    batches = list(itertools.islice(Trainer.build_train_loader(cfg), min(warmup + iters, 8)))
    step = train_step(model, batches, optimizer, device=cfg.MODEL.DEVICE)
    with EventStorage(0):  # R-CNN models log training statistics to it
        result = time_iterations(step, warmup, iters, cfg.MODEL.DEVICE)
    result["images_per_iter"] = cfg.SOLVER.IMS_PER_BATCH
    return result


def benchmark_inference(cfg, warmup: int = 2, iters: int = 10) -> Dict[str, float]:
    """Inference images/s of :class:`Seg2Predictor` (resize, model, post-processing; tiled when
    ``TEST.TILING.ENABLED``) on images of ``DATASETS.TEST[0]`` read beforehand."""
    predictor = Seg2Predictor(cfg)
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    images = [read_image(r["file_name"], "BGR") for r in records[: min(warmup + iters, 8)]]
    result = time_iterations(
        lambda i: predictor(images[i % len(images)]), warmup, iters, cfg.MODEL.DEVICE
    )
    result["image_size"] = list(images[0].shape[:2])
    return result


def tiling_bounds(tiler: TiledSemSegInference, height: int, width: int) -> Dict[str, float]:
    """
    Compute bounds of tiled against whole-image inference for an image of that size:
    "overlap_bound" ``(TILE_SIZE / STRIDE)**2`` (the cost of the overlap far from the borders, as
    tiles repeat it) and "pixel_bound", the pixels the network sees in all tiles (context
    included) over the image's pixels (what this size costs, border tiles included).
    """
    (th, tw), tiles = tiler.tiles(height, width)
    (top, bottom), (left, right) = tiler.context(th), tiler.context(tw)
    ys, xs = sorted({y for y, _ in tiles}), sorted({x for _, x in tiles})
    stride_y = ys[1] - ys[0] if len(ys) > 1 else th
    stride_x = xs[1] - xs[0] if len(xs) > 1 else tw
    return {
        "overlap_bound": (th / stride_y) * (tw / stride_x),
        "pixel_bound": len(tiles)
        * (th + top + bottom)
        * (tw + left + right)
        / float(height * width),
    }


def benchmark_tiling(
    cfg,
    sizes: List[int],
    whole_max_size: int,
    warmup: int = 1,
    iters: int = 1,
    seed: int = 0,
    modes=("tiled_labels", "tiled_logits", "whole"),
) -> List[dict]:
    """
    Tiled (``TEST.TILING``, logits and band-wise labels) against whole-image semantic inference
    of ``cfg``'s model on random square images of each side in ``sizes``; whole-image inference
    only up to ``whole_max_size``; ``modes``: which of "tiled_labels", "tiled_logits", "whole".
    Each mode runs ``warmup`` untimed times first (cuDNN autotuning, allocator, caches), then the
    modes take turns for ``iters`` timed rounds (so that load from other jobs hits them alike).
    Rows: size, mode, tiles, median seconds per image, peak and start memory (of the call with
    the largest peak), and for the tiled modes :func:`tiling_bounds`.
    """
    whole_cfg = cfg.clone()
    whole_cfg.defrost()
    whole_cfg.TEST.TILING.ENABLED = False  # the "whole" mode; the tiler is built beside it
    model = Seg2Predictor(whole_cfg).model  # built, loaded and in eval mode as the predictor has it
    tiler = TiledSemSegInference(cfg, model)  # TEST.TILING's geometry
    device = cfg.MODEL.DEVICE
    rows = []
    for size in sizes:
        gen = torch.Generator().manual_seed(seed)
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)
        (th, tw), tiles = tiler.tiles(size, size)
        steps = {}
        for mode in [m for m in modes if m != "whole" or size <= whole_max_size]:
            if mode == "whole":

                def run(image=image):
                    with torch.no_grad():
                        model([{"image": image}])[0]["sem_seg"].max(0).indices
            else:
                out = "labels" if mode == "tiled_labels" else "logits"

                def run(out=out, image=image):
                    r = tiler(image, output=out)
                    if out == "logits":
                        r.max(0).indices

            steps[mode] = run
        for run in steps.values():
            for _ in range(warmup):
                run()
        times = {mode: [] for mode in steps}
        peaks = {mode: (0.0, 0.0, "") for mode in steps}
        for _ in range(iters):
            for mode, run in steps.items():
                with PeakMemory(device) as mem:
                    _, seconds = timed(run, device)
                times[mode].append(seconds)
                if mem.peak_bytes - mem.start_bytes >= peaks[mode][0] - peaks[mode][1]:
                    peaks[mode] = (mem.peak_bytes, mem.start_bytes, mem.method)
                if device != "cpu":
                    torch.cuda.empty_cache()
        for mode in steps:
            peak, start, method = peaks[mode]
            r = {
                "size": size,
                "mode": mode,
                "tiles": len(tiles) if mode != "whole" else 1,
                "iters": iters,
                "warmup": warmup,
                "seconds": float(sum(times[mode])),
                "seconds_per_iter": float(np.median(times[mode])),
                "peak_mb": peak / 2**20,
                "start_mb": start / 2**20,
                "memory": method,
            }
            if mode != "whole":
                r.update(tiling_bounds(tiler, size, size))
            rows.append(r)
        del image, steps  # the next size's image is allocated without this one
    return rows


def get_parser():
    p = argparse.ArgumentParser(
        description="seg2 benchmark: train it/s, inference images/s, tiled inference"
    )
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=["train", "inference"])
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[4096], help="tiling: square image sides"
    )
    p.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="tiling: cases to run"
    )
    p.add_argument(
        "--tiling-warmup",
        type=int,
        default=1,
        help="tiling: untimed runs per case first (0 times the first call: cuDNN autotuning, allocator)",
    )
    p.add_argument(
        "--tiling-iters", type=int, default=1, help="tiling: timed rounds, the cases taking turns"
    )
    p.add_argument(
        "--whole-max-size", type=int, default=4096, help="tiling: largest side also run whole"
    )
    p.add_argument(
        "--json", default="", help="write the results here (default OUTPUT_DIR/benchmark.json)"
    )
    add_debug_argument(p)
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
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
                f"{name:<22} {r['per_second']:>11.3f} {unit:<4} {r['seconds_per_iter']:>9.3f} "
                f"{r['peak_mb']:>9.0f} {r['start_mb']:>9.0f}"
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
                f"  time x{ratio:.2f} of whole (x{ratio / r['overlap_bound']:.2f} of the overlap "
                "bound "
                f"{r['overlap_bound']:.2f}, x{ratio / r['pixel_bound']:.2f} of the tile-pixel "
                f"bound {r['pixel_bound']:.2f}), "
                "peak-start "
                f"x{(r['peak_mb'] - r['start_mb']) / max(w['peak_mb'] - w['start_mb'], 1e-9):.3f} "
                "of whole"
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
        results["tiling_config"] = {
            k: t[k] for k in ("TILE_SIZE", "STRIDE", "BATCH_SIZE", "BLEND", "MARGIN")
        }
        results["tiling"] = benchmark_tiling(
            cfg,
            args.sizes,
            args.whole_max_size,
            args.tiling_warmup,
            args.tiling_iters,
            modes=args.modes,
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
