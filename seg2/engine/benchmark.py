"""Training speed and peak memory of a config (``tools/benchmark.py --tasks train``)."""

import itertools
from typing import Dict

from detectron2.utils.events import EventStorage

from ..utils.benchmark import time_iterations
from .defaults import Trainer

__all__ = ["benchmark_train"]


def benchmark_train(cfg, warmup: int = 2, iters: int = 10) -> Dict[str, float]:
    """Training iterations/s of ``cfg``'s model (forward, backward, optimizer step), built as
    :class:`Trainer` builds it, on batches of ``DATASETS.TRAIN`` loaded beforehand (by the
    Trainer's loader), so that data loading is not timed. Keys: see
    :func:`seg2.utils.benchmark.time_iterations`, and "images_per_iter"."""
    model = Trainer.build_model(cfg)
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)
    batches = list(itertools.islice(Trainer.build_train_loader(cfg), min(warmup + iters, 8)))

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
