"""Issue 15, cases 6 and 7: after a resume, metrics.json holds one record per iteration (the
resumed run's); a truncated checkpoint given to --resume is named in a one-line error."""

import json
import logging
import os

import pytest
import torch

from seg2 import Seg2Error
from seg2.checkpoint import Seg2Checkpointer
from seg2.engine import Trainer
from seg2.engine.resume import trim_metrics_json
from seg2.inference import Seg2Predictor

from test_train_net import _register_tiny, _run_cli, _tiny_cfg


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _cfg(root, output_dir, max_iter):
    _register_tiny(root)
    cfg = _tiny_cfg(output_dir, max_iter=max_iter)
    cfg.merge_from_list(
        [
            "SOLVER.CHECKPOINT_PERIOD",
            10,
            "SOLVER.IMS_PER_BATCH",
            1,
            "DATASETS.TEST",
            (),
            "SEG2.BEST_CHECKPOINT.METRIC",
            "",
        ]
    )
    return cfg


def test_metrics_json_has_one_record_per_iteration_after_a_resume(
    tiny_shapes_root, tmp_path, caplog
):
    # Run 1 trains 22 iterations: detectron2 writes metrics.json records at iterations 19 (every
    # 20) and 21 (the last), and checkpoints after iterations 9 and 19. A kill after the record of
    # iteration 21 but before the final checkpoint leaves what we make by hand below: no
    # model_final.pth, last_checkpoint naming model_0000019.pth, and half a record being written.
    cfg = _cfg(tiny_shapes_root, tmp_path, max_iter=22)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    metrics = tmp_path / "metrics.json"
    first = _records(metrics)
    assert [r["iteration"] for r in first] == [19, 21]
    os.remove(tmp_path / "model_final.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000019.pth")
    with open(metrics, "a") as f:
        f.write('{"data_time": 0.01, "iter')

    # Run 2 resumes from iteration 20 and writes iteration 21 again.
    trainer = Trainer(cfg)
    with caplog.at_level(logging.WARNING, logger="seg2"):
        trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 20
    assert (
        f"{metrics}: dropped 1 record(s) at iterations >= 20, which this run (starting at "
        "iteration 20) "
        "writes again, and 1 line(s) that are not JSON records (a write cut short); 1 kept. "
        f"The dropped lines are in {metrics}.dropped"
    ) in caplog.text
    # Nothing is lost: run 1's record of iteration 21 and the broken line are kept aside.
    dropped = (tmp_path / "metrics.json.dropped").read_text().splitlines()
    assert json.loads(dropped[0]) == first[1] and dropped[1] == '{"data_time": 0.01, "iter'
    trainer.train()

    rows = _records(metrics)
    assert [r["iteration"] for r in rows] == [
        19,
        21,
    ]  # was 19, 21, (broken line), 21 before the fix
    assert rows[0] == first[0]  # run 1's record before the checkpoint stays as it was
    # The record of iteration 21 is the resumed run's: JSONWriter writes the median of the last 20
    # values of total_loss, and run 2's storage holds its own iterations 20 and 21 only.
    resumed_losses = trainer.storage.history("total_loss")
    assert [it for _, it in resumed_losses.values()] == [20, 21]
    assert rows[1]["total_loss"] == pytest.approx(resumed_losses.median(20))


def test_trim_metrics_json_keeps_the_order_and_earlier_records(tmp_path):
    path = tmp_path / "metrics.json"
    # A session resumed from iteration 20 after one that reached 39 (the old file, not trimmed).
    lines = [{"iteration": i, "x": n} for n, i in enumerate([19, 39, 29, 39, 40])]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert trim_metrics_json(str(path), 30) == (2, 3)
    assert _records(path) == [lines[0], lines[2]]
    assert _records(str(path) + ".dropped") == [lines[1], lines[3], lines[4]]
    assert trim_metrics_json(str(path), 30) == (2, 0)  # nothing more to drop
    assert len(_records(str(path) + ".dropped")) == 3
    assert trim_metrics_json(str(tmp_path / "none.json"), 0) == (0, 0)


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_truncated_checkpoint_is_named(tiny_shapes_root, tmp_path):
    cfg = _cfg(tiny_shapes_root, tmp_path, max_iter=1)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = tmp_path / "model_final.pth"
    assert torch.load(final, map_location="cpu", weights_only=False)["iteration"] == 0
    _truncate(final)
    size = os.path.getsize(final)

    # The Trainer's resume (tools/train_net.py --resume) and an explicit MODEL.WEIGHTS.
    with pytest.raises(Seg2Error) as e:
        Trainer(cfg).resume_or_load(resume=True)
    message = str(e.value)
    assert message.startswith(
        f"cannot read the checkpoint {final} ({size} bytes): PytorchStreamReader failed"
    )
    assert "\n" not in message and "last_checkpoint" in message
    with pytest.raises(Seg2Error, match=r"^cannot read the checkpoint .*model_final.pth"):
        Seg2Checkpointer(Trainer.build_model(cfg)).load(str(final))
    # The predictor (tools/demo.py) loads MODEL.WEIGHTS the same way.
    cfg = cfg.clone()
    cfg.MODEL.WEIGHTS = str(final)
    with pytest.raises(Seg2Error, match=r"^cannot read the checkpoint .*model_final.pth"):
        Seg2Predictor(cfg)


def test_cli_resume_from_truncated_checkpoint_stops_in_one_line(tiny_shapes_root, tmp_path):
    # A real checkpoint of the quickstart model, cut in half, as an interrupted copy leaves it.
    r = _run_cli(
        "SEG2.SHAPES_ROOT",
        tiny_shapes_root,
        "OUTPUT_DIR",
        str(tmp_path),
        "SOLVER.MAX_ITER",
        "1",
        "DATASETS.TEST",
        "()",
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "INPUT.MAX_SIZE_TRAIN",
        "64",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp_path / "model_final.pth"
    _truncate(final)
    r = _run_cli(
        "--resume",
        "SEG2.SHAPES_ROOT",
        tiny_shapes_root,
        "OUTPUT_DIR",
        str(tmp_path),
        "SOLVER.MAX_ITER",
        "2",
        "DATASETS.TEST",
        "()",
    )
    assert r.returncode == 1
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"seg2: error: cannot read the checkpoint {final} ({os.path.getsize(final)} bytes): "
            "PytorchStreamReader failed"
        )
    )
    assert "Traceback" not in r.stderr
