"""Timing and memory helpers (tools/benchmarks/timing.py) and the model benchmarks of
tools/benchmarks/benchmark.py."""

import json
import math
import mmap
import time

import numpy as np
import pytest
from detectron2.modeling import build_model

from seg2.inference import TiledSemSegInference

from seg2_model_helpers import import_tool, register_tiny_shapes, tiny_semantic_cfg

timing = import_tool("timing", "tools/benchmarks")
benchmark = import_tool("benchmark", "tools/benchmarks")
PeakMemory, rss_mb, timed = timing.PeakMemory, timing.rss_mb, timing.timed
time_iterations, time_round_robin = timing.time_iterations, timing.time_round_robin
benchmark_train, benchmark_tiling, tiling_bounds = (
    benchmark.benchmark_train,
    benchmark.benchmark_tiling,
    benchmark.tiling_bounds,
)


def _touched_pages(size):
    """``size`` bytes of fresh anonymous memory, every page written: always new resident memory
    (np.ones may be served by malloc from memory an earlier test freed and left resident)."""
    m = mmap.mmap(-1, size)
    np.frombuffer(m, dtype=np.uint8)[:] = 1
    return m


def test_peak_memory_sees_a_freed_allocation():
    with PeakMemory("cpu") as mem:
        a = _touched_pages(64 * 2**20)
        a.close()
    if not mem.method.startswith("VmHWM"):
        pytest.skip(f"peak RSS cannot be reset here ({mem.method})")
    assert mem.peak_bytes - mem.start_bytes >= 60 * 2**20
    with PeakMemory("cpu") as small:
        np.ones(2**20, dtype=np.uint8)
    assert small.peak_bytes - small.start_bytes < 40 * 2**20  # the reset forgot the 64 MiB


def test_rss_counts_touched_memory():
    before = rss_mb()
    if before != before:
        pytest.skip("no /proc/self/status here")
    a = _touched_pages(64 * 2**20)
    assert rss_mb() - before >= 60
    a.close()


def test_timed_returns_the_result_and_the_wall_time():
    result, seconds = timed(lambda: time.sleep(0.02) or 7)
    assert result == 7 and 0.02 <= seconds < 1.0


def test_time_iterations_counts_warmup_and_timed_calls():
    calls = []
    r = time_iterations(calls.append, warmup=2, iters=3)
    assert calls == [0, 1, 2, 3, 4]
    assert r["iters"] == 3 and r["seconds"] >= 0 and r["per_second"] > 0 and r["peak_mb"] > 0


def test_time_round_robin_interleaves_the_steps_and_drops_warmup_rounds():
    calls = []
    steps = {
        "fast": lambda i: calls.append(("fast", i)),
        "slow": lambda i: calls.append(("slow", i)) or time.sleep(0.01),
    }
    times = time_round_robin(steps, warmup=1, repeats=2)
    assert calls == [("fast", 0), ("slow", 0), ("fast", 1), ("slow", 1), ("fast", 2), ("slow", 2)]
    assert list(times) == ["fast", "slow"] and all(len(t) == 2 for t in times.values())
    assert min(times["slow"]) >= 0.01 > max(times["fast"])


def test_benchmark_train_times_the_trainers_model_and_loader(tiny_shapes_root):
    name = "seg2_test_benchmark_train"
    register_tiny_shapes(name, tiny_shapes_root, "train")
    cfg = tiny_semantic_cfg("UNetHead", "unet_same")
    cfg.DATASETS.TRAIN = (name,)
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = 2, 0
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.CROP.ENABLED = (64,), 64, False
    r = benchmark_train(cfg, warmup=1, iters=2)
    assert r["iters"] == 2 and r["images_per_iter"] == 2
    assert r["seconds"] > 0 and r["seconds_per_iter"] > 0 and r["peak_mb"] >= r["start_mb"] > 0


def test_benchmark_tiling_rows():
    cfg = tiny_semantic_cfg("UNetHead", "unet_same")
    cfg.TEST.TILING.TILE_SIZE, cfg.TEST.TILING.STRIDE, cfg.TEST.TILING.BATCH_SIZE = 32, 32, 2
    rows = benchmark_tiling(cfg, sizes=[48, 64], whole_max_size=48)
    assert [(r["size"], r["mode"], r["tiles"]) for r in rows] == [
        (48, "tiled_labels", 4),
        (48, "tiled_logits", 4),
        (48, "whole", 1),
        (64, "tiled_labels", 4),
        (64, "tiled_logits", 4),
    ]
    assert all(r["seconds_per_iter"] > 0 and r["peak_mb"] >= r["start_mb"] > 0 for r in rows)
    assert all(r["warmup"] == 1 and r["iters"] == 1 for r in rows)
    # 4 tiles of 32 x 32 (stride 32, no overlap) cover 64 x 64 pixels of a 48 x 48 image
    assert rows[0]["overlap_bound"] == 1.0 and rows[0]["pixel_bound"] == 4 * 32 * 32 / 48**2


def test_tiling_bounds_by_hand():
    cfg = tiny_semantic_cfg("UNetHead", "unet_same")  # largest feature stride 16
    model = build_model(cfg).eval()
    tiler = TiledSemSegInference(model, tile_size=64, stride=48, margin=8)
    b = tiling_bounds(tiler, 160, 112)  # rows 0, 48, 96; columns 0, 48: 6 tiles of 80 x 80 seen
    assert b["overlap_bound"] == (64 / 48) ** 2
    assert b["pixel_bound"] == 6 * 80 * 80 / (160 * 112)


def test_multitask_cost_table_at_a_tiny_size(tmp_path):
    """tools/benchmarks/benchmark_multitask_cost.py on the CPU at a tiny size (R18-FPN, narrow
    heads): one row per model, Mask R-CNN first with ratio 1, every ratio finite and positive,
    FLOPs per module summing to at most the total, and the heads' own profile."""
    tool = import_tool("benchmark_multitask_cost", "tools/benchmarks")
    out = tmp_path / "cost.json"
    tiny = [
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
        "MODEL.UNET_HEAD.DECODER_CHANNELS", "[32,32,32]", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.NUM_CLASSES", "4",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "8", "TEST.DETECTIONS_PER_IMAGE", "10",
    ]  # fmt: skip
    rows = tool.main(["--device", "cpu", "--size", "64", "96", "--batch", "1", "--precisions", "fp32",
                      "--warmup", "0", "--iters", "1", "--profile", "--json", str(out), "--"] + tiny)  # fmt: skip
    assert [r["key"] for r in rows] == list(tool.MODELS)
    assert (
        rows[0]["train_fp32"]["ratio"]
        == rows[0]["inference_fp32"]["ratio"]
        == rows[0]["gflops_ratio"]
        == 1.0
    )
    for r in rows:
        for key in ("train_fp32", "inference_fp32"):
            assert r[key]["seconds"] > 0 and math.isfinite(r[key]["ratio"]) and r[key]["ratio"] > 0
        g = r["gflops"]
        assert math.isfinite(r["gflops_ratio"]) and 0 < sum(g[m] for m in tool.MODULES) <= g[
            "total"
        ] * (1 + 1e-6)
        assert (g["sem_seg_head"] > 0) == (r["key"] != "mask_rcnn") and (
            r["head_params_M"] > 0
        ) == (g["sem_seg_head"] > 0)
    table = tool.markdown(rows, ["fp32"])
    assert table.count("\n") == 2 + len(rows) and all(r["model"] in table for r in rows)
    saved = json.loads(out.read_text())
    assert set(saved["profiles"]) == set(tool.MODELS) - {"mask_rcnn"}
    for prof in saved["profiles"].values():
        assert prof["train"]["total_ms"] > 0 and prof["train"]["forward_ms_by_child"]
