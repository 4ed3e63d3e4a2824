"""
Inference speed and peak memory (``tools/benchmark.py --tasks inference tiling``): images/s of
:class:`Seg2Predictor`, and tiled against whole-image semantic inference. The timing and memory
helpers are :mod:`seg2.utils.benchmark`; the training benchmark is :mod:`seg2.engine.benchmark`.
"""

from typing import Dict, List

import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from ..engine.resume import Seg2Checkpointer
from ..utils.benchmark import time_iterations
from .io import read_image
from .predictor import Seg2Predictor
from .tiling import TiledSemSegInference

__all__ = ["benchmark_inference", "benchmark_tiling"]


def benchmark_inference(cfg, warmup: int = 2, iters: int = 10) -> Dict[str, float]:
    """Inference images/s of :class:`Seg2Predictor` (resize, model, post-processing; tiled when
    ``SEG2.TILING.ENABLED``) on images of ``DATASETS.TEST[0]`` read beforehand."""
    predictor = Seg2Predictor(cfg)
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    images = [read_image(r["file_name"], "BGR") for r in records[: min(warmup + iters, 8)]]
    result = time_iterations(lambda i: predictor(images[i % len(images)]), warmup, iters, cfg.MODEL.DEVICE)
    result["image_size"] = list(images[0].shape[:2])
    return result


def benchmark_tiling(
    cfg,
    sizes: List[int],
    whole_max_size: int,
    warmup: int = 0,
    iters: int = 1,
    seed: int = 0,
    modes=("tiled_labels", "tiled_logits", "whole"),
) -> List[dict]:
    """
    Tiled (``SEG2.TILING``, logits and band-wise labels) against whole-image semantic inference
    of ``cfg``'s model on random square images of each side in ``sizes``; whole-image inference
    only up to ``whole_max_size``; ``modes``: which of "tiled_labels", "tiled_logits", "whole".
    Rows: size, mode, tiles, seconds per image, peak and start memory.
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
        for mode in [m for m in modes if m != "whole" or size <= whole_max_size]:
            if mode == "whole":
                def run(_):
                    with torch.no_grad():
                        model([{"image": image}])[0]["sem_seg"].max(0).indices
            else:
                out = "labels" if mode == "tiled_labels" else "logits"

                def run(_, out=out):
                    r = tiler(image, output=out)
                    if out == "logits":
                        r.max(0).indices

            r = time_iterations(run, warmup, iters, device)
            r.update({"size": size, "mode": mode, "tiles": len(tiles) if mode != "whole" else 1})
            rows.append(r)
            if device != "cpu":
                torch.cuda.empty_cache()
        del image
    return rows

