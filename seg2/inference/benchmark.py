"""
Speed and peak-memory measurements (used by ``tools/benchmark.py`` and other benchmark scripts):
training iterations/s, inference images/s, and tiled against whole-image semantic inference.

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the process's peak
resident set size (``VmHWM``), reset before each measurement through ``/proc/self/clear_refs``
(Linux >= 4.0), else the lifetime peak ``ru_maxrss``.
"""

import itertools
import resource
import time
from typing import Callable, Dict, List

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from ..data import MultiTaskDatasetMapper
from .io import read_image
from .predictor import Seg2Predictor
from .tiling import TiledSemSegInference

__all__ = ["PeakMemory", "time_iterations", "benchmark_train", "benchmark_inference", "benchmark_tiling"]


def _status_kb(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """
    Context manager measuring the peak memory of what runs inside it.

    Attributes after exit: ``peak_bytes`` (absolute peak: RSS on CPU, allocated on GPU),
    ``start_bytes`` (at entry), ``method`` (how it was measured).
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.method = "VmHWM (reset via /proc/self/clear_refs)"
            except OSError:
                self.method = "ru_maxrss (process lifetime peak)"
            self.start_bytes = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            self.peak_bytes = _status_kb("VmHWM") * 1024
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False


def time_iterations(step: Callable[[int], None], warmup: int, iters: int, device="cpu") -> Dict[str, float]:
    """
    Run ``step(i)`` ``warmup`` times untimed, then ``iters`` times timed (CUDA synchronised),
    inside a :class:`PeakMemory`.

    Returns:
        dict: "iters", "seconds" (total of the timed ones), "per_second", "seconds_per_iter"
        (median), "peak_mb", "start_mb", "memory".
    """
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with PeakMemory(device) as mem:
        for i in range(warmup):
            step(i)
        sync()
        times = []
        for i in range(iters):
            t0 = time.perf_counter()
            step(warmup + i)
            sync()
            times.append(time.perf_counter() - t0)
    total = float(sum(times))
    return {
        "iters": iters,
        "seconds": total,
        "per_second": iters / total if total > 0 else float("inf"),
        "seconds_per_iter": float(np.median(times)) if times else float("nan"),
        "peak_mb": mem.peak_bytes / 2**20,
        "start_mb": mem.start_bytes / 2**20,
        "memory": mem.method,
    }


def benchmark_train(cfg, warmup: int = 2, iters: int = 10) -> Dict[str, float]:
    """Training iterations/s of ``cfg``'s model (forward, backward, optimizer step) on batches of
    ``DATASETS.TRAIN`` loaded beforehand, so that data loading is not timed."""
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    loader = build_detection_train_loader(cfg, mapper=MultiTaskDatasetMapper(cfg, True))
    batches = list(itertools.islice(loader, min(warmup + iters, 8)))

    def step(i):
        losses = model(batches[i % len(batches)])
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with EventStorage(0):  # R-CNN models log training statistics to it
        result = time_iterations(step, warmup, iters, cfg.MODEL.DEVICE)
    result["images_per_iter"] = cfg.SOLVER.IMS_PER_BATCH
    return result


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
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
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

