"""Measurement helpers of tools/benchmark.py (seg2.inference.benchmark)."""

import numpy as np
import pytest
from seg2_model_helpers import tiny_semantic_cfg

from seg2.inference.benchmark import PeakMemory, benchmark_tiling, time_iterations


def test_peak_memory_sees_a_freed_allocation():
    with PeakMemory("cpu") as mem:
        a = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        del a
    if not mem.method.startswith("VmHWM"):
        pytest.skip(f"peak RSS cannot be reset here ({mem.method})")
    assert mem.peak_bytes - mem.start_bytes >= 60 * 2**20
    with PeakMemory("cpu") as small:
        np.ones(2**20, dtype=np.uint8)
    assert small.peak_bytes - small.start_bytes < 40 * 2**20  # the reset forgot the 64 MiB


def test_time_iterations_counts_warmup_and_timed_calls():
    calls = []
    r = time_iterations(calls.append, warmup=2, iters=3)
    assert calls == [0, 1, 2, 3, 4]
    assert r["iters"] == 3 and r["seconds"] >= 0 and r["per_second"] > 0 and r["peak_mb"] > 0


def test_benchmark_tiling_rows():
    cfg = tiny_semantic_cfg("UNetHead", "unet_same")
    cfg.SEG2.TILING.TILE_SIZE, cfg.SEG2.TILING.STRIDE, cfg.SEG2.TILING.BATCH_SIZE = 32, 32, 2
    rows = benchmark_tiling(cfg, sizes=[48, 64], whole_max_size=48)
    assert [(r["size"], r["mode"], r["tiles"]) for r in rows] == [
        (48, "tiled_labels", 4), (48, "tiled_logits", 4), (48, "whole", 1),
        (64, "tiled_labels", 4), (64, "tiled_logits", 4),
    ]
    assert all(r["seconds_per_iter"] > 0 and r["peak_mb"] >= r["start_mb"] > 0 for r in rows)
