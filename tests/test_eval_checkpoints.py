"""tools/eval_checkpoints.py: every checkpoint of a tiny run evaluated in one command, its figures
equal to the run's own evaluations at the same iterations; bad input is one line naming it."""

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from detectron2.engine import default_argument_parser

from seg2_model_helpers import register_tiny_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "eval_checkpoints.py")
CONFIG = os.path.join(REPO, "configs", "quickstart", "unet_tiny_shapes_cpu.yaml")


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tiny_shapes_root, tmp_path_factory):
    """A U-Net trained 4 iterations on generated shapes by tools/train_net.py, a checkpoint and a
    camvid-style val evaluation every 2 iterations, the best model by val mIoU kept."""
    for split in ("train", "val"):
        register_tiny_shapes(f"evck_tiny_{split}", tiny_shapes_root, split)
    out = str(tmp_path_factory.mktemp("run"))
    train_net = _load(os.path.join(REPO, "tools", "train_net.py"), "seg2_train_net_for_evck")
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, "DATASETS.TRAIN", "('evck_tiny_train',)", "DATASETS.TEST", "('evck_tiny_val',)",
         "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
         "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "0",
         "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0",
         "SEG2.BEST_CHECKPOINT.METRIC", "sem_seg/mIoU", "SEED", "3", "OUTPUT_DIR", out]
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # train_net's setup_logger stops propagation (caplog of later tests would see nothing); the
    # autouse _restore_loggers of conftest.py runs after this module-scoped fixture, so undo it
    # here.
    loggers = [logging.getLogger(n) for n in ("seg2", "detectron2", "fvcore", "d2")]
    saved = [(lg, list(lg.handlers), lg.propagate, lg.level) for lg in loggers]
    try:
        train_net.main(args)
    finally:
        torch.set_num_threads(threads)
        for lg, handlers, propagate, level in saved:
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level)
    return out


def test_every_checkpoint_is_evaluated_as_the_run_evaluated_it(tiny_run):
    tool = _load(TOOL, "seg2_eval_checkpoints")
    assert {"config.yaml", "model_0000001.pth", "model_0000003.pth", "model_best.pth"} <= set(
        os.listdir(tiny_run)
    )
    args = tool.build_parser().parse_args(
        ["--run-dir", tiny_run, "--dataset", "evck_tiny_val", "MODEL.DEVICE", "cpu"]
    )
    assert (args.dataset, args.opts) == (["evck_tiny_val"], ["MODEL.DEVICE", "cpu"])
    rows = tool.main(args)
    # periodic checkpoints by iteration, then model_final, then model_best
    assert [(r["checkpoint"], r["iteration"]) for r in rows] == [
        ("model_0000001.pth", 2), ("model_0000003.pth", 4), ("model_final.pth", 4),
        ("model_best.pth", rows[3]["iteration"])
    ]  # fmt: skip
    assert rows[3]["iteration"] in (2, 4)

    # The run's own evaluations on val (metrics.json), at iterations 2 and 4, are the figures of the
    # checkpoints saved there: the same weights, the same evaluator.
    with open(os.path.join(tiny_run, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    # (the storage's counter: 1 after 2 iterations; 4 for the evaluation after the last one)
    during = {tool.iterations_done(r["iteration"], 4): r for r in records if "sem_seg/mIoU" in r}
    assert sorted(during) == [2, 4]
    for r in rows:
        got = r["metrics"]["evck_tiny_val"]
        for key in ("sem_seg/mIoU", "sem_seg/pACC", "sem_seg/mACC"):
            assert got[key] == pytest.approx(during[r["iteration"]][key], abs=1e-9), (
                r["checkpoint"],
                key,
            )
    # model_best is the checkpoint with the best val mIoU of the run
    assert rows[3]["metrics"]["evck_tiny_val"]["sem_seg/mIoU"] == pytest.approx(
        max(v["sem_seg/mIoU"] for v in during.values()), abs=1e-9
    )

    # the files: JSON with every flat metric (per class too), markdown with the summary table
    with open(os.path.join(tiny_run, "eval_checkpoints_evck_tiny_val.json")) as f:
        saved = json.load(f)
    assert saved["rows"] == rows and saved["datasets"] == ["evck_tiny_val"]
    assert any(k.startswith("sem_seg/IoU-") for k in rows[0]["metrics"]["evck_tiny_val"])
    with open(os.path.join(tiny_run, "eval_checkpoints_evck_tiny_val.md")) as f:
        md = f.read()
    assert (
        "| checkpoint" in md
        and "| model_final.pth " in md
        and "sem_seg/mIoU" in md
        and "IoU-" not in md
    )
    assert "the figure the run reports is the one its protocol picks" in md


def _run_tool(*args):
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, TOOL, *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_bad_input_is_one_line_naming_it(tmp_path, tiny_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run_tool("--run-dir", str(empty), "--dataset", "seg2_shapes_val")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"seg2: error: --run-dir {empty}: no config.yaml (tools/train_net.py writes it into "
        "OUTPUT_DIR); "
        "is this a run's output folder?"
    )
    shutil.copy(os.path.join(tiny_run, "config.yaml"), empty / "config.yaml")
    tool = _load(TOOL, "seg2_eval_checkpoints_bad")
    import seg2

    with pytest.raises(
        seg2.Seg2Error, match=r"--run-dir .*empty: no checkpoint \(model_\*.pth\) to evaluate"
    ):
        tool.main(
            tool.build_parser().parse_args(
                ["--run-dir", str(empty), "--dataset", "seg2_shapes_val"]
            )
        )
    with pytest.raises(
        seg2.Seg2Error, match=r"--dataset 'camvid_vall' is not a registered dataset"
    ):
        tool.main(
            tool.build_parser().parse_args(["--run-dir", tiny_run, "--dataset", "camvid_vall"])
        )
