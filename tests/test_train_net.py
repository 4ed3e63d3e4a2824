"""seg2.engine's Trainer and tools/train_net.py end to end: the Trainer overfits and evaluates; the
CLI trains, resumes, evaluates, and reports bad input without a traceback."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from detectron2.config import get_cfg

import seg2
from seg2.engine import Trainer

from seg2_model_helpers import register_tiny_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_R18_FPN_shapes_cpu.yaml")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


def _register_tiny(root):
    for split in ("train", "val"):
        register_tiny_shapes(f"seg2_test_tiny_{split}", root, split)


def _tiny_cfg(output_dir, max_iter):
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN",
            ("seg2_test_tiny_train",),
            "DATASETS.TEST",
            ("seg2_test_tiny_val",),
            "INPUT.MIN_SIZE_TRAIN",
            (64,),
            "INPUT.MAX_SIZE_TRAIN",
            64,
            "INPUT.MIN_SIZE_TEST",
            64,
            "INPUT.MAX_SIZE_TEST",
            64,
            "INPUT.RANDOM_FLIP",
            "none",
            "SOLVER.IMS_PER_BATCH",
            4,
            "SOLVER.MAX_ITER",
            max_iter,
            "SOLVER.BASE_LR",
            0.01,
            "SOLVER.WARMUP_ITERS",
            10,
            "SOLVER.CLIP_GRADIENTS.ENABLED",
            True,
            "SOLVER.STEPS",
            (),
            "DATALOADER.NUM_WORKERS",
            0,
            "SEED",
            7,
            "OUTPUT_DIR",
            str(output_dir),
        ]
    )
    return cfg


def test_trainer_overfits_tiny_shapes_and_evaluates(tiny_shapes_root, tmp_path):
    _register_tiny(tiny_shapes_root)
    cfg = _tiny_cfg(tmp_path, max_iter=40)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    # Every iteration's loss, as detectron2's EventStorage recorded it.
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 40
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.75 * first, (first, last)
    # detectron2's writers: metrics.json and tensorboard events.
    with open(tmp_path / "metrics.json") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [19, 39]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))

    results = Trainer.test(cfg, trainer.model)
    assert set(results) >= {"segm", "bbox"}
    for task in ("segm", "bbox"):
        assert set(results[task]) >= {"AP", "AP50", "AP75"}
        assert 0.0 <= results[task]["AP"] <= 100.0 and np.isfinite(results[task]["AP"])


def _run_cli(*args, timeout=600):
    # The tool imports the seg2 of this checkout, whichever seg2 is installed.
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", PYTHONPATH=pythonpath)
    return subprocess.run(
        [sys.executable, TRAIN_NET, "--config-file", QUICKSTART, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def cli_shapes_root(tmp_path_factory):
    # The registered seg2_shapes_* at their default size, in a folder of this module's own.
    return str(tmp_path_factory.mktemp("cli") / "seg2_shapes")


def test_cli_trains_resumes_and_evaluates(tmp_path, cli_shapes_root):
    common = [
        "SEG2.SHAPES_ROOT",
        cli_shapes_root,
        "OUTPUT_DIR",
        str(tmp_path),
        "SOLVER.IMS_PER_BATCH",
        "2",
        "DATALOADER.NUM_WORKERS",
        "0",
        "INPUT.MIN_SIZE_TRAIN",
        "(96,)",
        "INPUT.MAX_SIZE_TRAIN",
        "96",
    ]
    r = _run_cli(*common, "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "model_final.pth").is_file()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"

    r = _run_cli("--resume", *common, "SOLVER.MAX_ITER", "5", "DATASETS.TEST", "()")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Starting training from iteration 3" in r.stdout + r.stderr  # detectron2 logs to stdout
    with open(tmp_path / "metrics.json") as f:
        iters = [json.loads(line)["iteration"] for line in f if line.strip()]
    assert max(iters) == 4

    r = _run_cli("--eval-only", *common, "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"))
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "Evaluation results for segm" in log and "Evaluation results for bbox" in log


def test_cli_unknown_dataset_is_a_clear_error(tmp_path):
    r = _run_cli("DATASETS.TRAIN", "('seg2_shapes_trian',)", "OUTPUT_DIR", str(tmp_path))
    assert r.returncode != 0
    assert (
        "seg2: error: DATASETS.TRAIN names 'seg2_shapes_trian', which is not a registered dataset"
        in r.stderr
    )
    assert "Did you mean 'seg2_shapes_train'" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_override_is_a_clear_error(tmp_path):
    r = _run_cli("MODEL.NO_SUCH_KEY", "1", "OUTPUT_DIR", str(tmp_path))
    assert r.returncode != 0
    assert "seg2: error: bad config (" in r.stderr and "MODEL.NO_SUCH_KEY" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_unwritable_cache_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    r = _run_cli("SEG2.SHAPES_ROOT", str(blocker / "shapes"), "OUTPUT_DIR", str(tmp_path / "out"))
    assert r.returncode != 0
    assert "seg2: error: cannot write the seg2_shapes cache" in r.stderr
    assert "Traceback" not in r.stderr
