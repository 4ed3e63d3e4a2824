"""
Inference speed and peak memory (``tools/benchmark.py --tasks inference tiling``): images/s of
:class:`Seg2Predictor`, and tiled against whole-image semantic inference. The timing and memory
helpers are :mod:`seg2.utils.benchmark`; the training benchmark is :mod:`seg2.engine.benchmark`.
"""

from typing import Dict, List

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from ..checkpoint import Seg2Checkpointer
from ..utils.benchmark import PeakMemory, time_iterations, timed
from ..data.image import read_image
from .predictor import Seg2Predictor
from ..modeling.tiling import TiledSemSegInference

__all__ = ["benchmark_inference", "benchmark_tiling", "tiling_bounds"]


def benchmark_inference(cfg, warmup: int = 2, iters: int = 10) -> Dict[str, float]:
    """Inference images/s of :class:`Seg2Predictor` (resize, model, post-processing; tiled when
    ``TEST.TILING.ENABLED``) on images of ``DATASETS.TEST[0]`` read beforehand."""
    predictor = Seg2Predictor(cfg)
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    images = [read_image(r["file_name"], "BGR") for r in records[: min(warmup + iters, 8)]]
    result = time_iterations(lambda i: predictor(images[i % len(images)]), warmup, iters, cfg.MODEL.DEVICE)
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
        "pixel_bound": len(tiles) * (th + top + bottom) * (tw + left + right) / float(height * width),
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
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        Seg2Checkpointer(model).load(cfg.MODEL.WEIGHTS)
    tiler = TiledSemSegInference(cfg, model)
    device = cfg.MODEL.DEVICE
    rows = []
    for size in sizes:
        gen = torch.Generator().manual_seed(seed)
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)
        (th, tw), tiles = tiler.tiles(size, size)
        steps = {}
        for mode in [m for m in modes if m != "whole" or size <= whole_max_size]:
            if mode == "whole":
                def run():
                    with torch.no_grad():
                        model([{"image": image}])[0]["sem_seg"].max(0).indices
            else:
                out = "labels" if mode == "tiled_labels" else "logits"

                def run(out=out):
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
        del image
    return rows
