"""SEG2.BEST_CHECKPOINT: a real (tiny) training run keeps model_best.pth at the iteration whose
evaluation was best, by one metric or by a weighted sum of several, and tests it on
TEST_DATASETS after training; bad keys are named errors."""

import json
import logging
import math

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine.hooks import BestCheckpointer

import seg2
from seg2.data import check_dataset_names
from seg2.engine import Trainer
from seg2.engine.hooks import BEST_MODEL_TEST_FILE, build_best_checkpoint_hooks

from seg2_model_helpers import register_tiny_shapes
from test_train_net import _register_tiny, _tiny_cfg


def _cfg(root, output_dir, *opts):
    _register_tiny(root)
    cfg = _tiny_cfg(output_dir, max_iter=30)
    cfg.merge_from_list(["TEST.EVAL_PERIOD", 10, *opts])
    return cfg


def _train(cfg):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def _expected_best_iter(history, mode="max"):
    """BestCheckpointer's rule by hand: the first evaluation, then each strictly better one."""
    best_value, best_iter = None, None
    for value, it in history:
        if best_value is None or (value > best_value if mode == "max" else value < best_value):
            best_value, best_iter = value, it
    return best_iter


def test_weighted_sum_is_tracked_and_best_model_kept(tiny_shapes_root, tmp_path, caplog):
    metrics, weights = ["segm/AP", "bbox/AP50"], [0.75, 0.25]
    cfg = _cfg(
        tiny_shapes_root,
        tmp_path,
        "SEG2.BEST_CHECKPOINT.METRIC",
        "combined/score",
        "SEG2.BEST_CHECKPOINT.METRICS",
        metrics,
        "SEG2.BEST_CHECKPOINT.WEIGHTS",
        weights,
    )
    with caplog.at_level(logging.INFO):
        trainer = _train(cfg)
    assert "Keeping the best model by combined/score (max)" in caplog.text

    storage = trainer.storage
    combined = storage.history("combined/score").values()
    # Evaluated after iterations 10, 20 and at the end: the EvalHook's schedule (storage
    # iterations 9 and 19, then 30, where the trainer's counter stands after the last step).
    assert [it for _, it in combined] == [9, 19, 30]
    parts = [dict((it, v) for v, it in storage.history(m).values()) for m in metrics]
    for value, it in combined:
        assert math.isclose(
            value, 0.75 * parts[0][it] + 0.25 * parts[1][it], rel_tol=1e-9, abs_tol=1e-12
        )

    best = torch.load(tmp_path / "model_best.pth", map_location="cpu", weights_only=False)
    assert best["iteration"] == _expected_best_iter(combined)
    assert set(best["model"]) == set(trainer.model.state_dict())


def test_off_by_default_and_single_metric_hooks(tiny_shapes_root, tmp_path):
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    assert cfg.SEG2.BEST_CHECKPOINT.METRIC == ""
    assert build_best_checkpoint_hooks(cfg, checkpointer=None) == []
    cfg.merge_from_list(
        ["SEG2.BEST_CHECKPOINT.METRIC", "sem_seg/mIoU", "SEG2.BEST_CHECKPOINT.MODE", "min"]
    )
    (hook,) = build_best_checkpoint_hooks(cfg, checkpointer=None)
    assert isinstance(hook, BestCheckpointer) and hook._val_metric == "sem_seg/mIoU"
    # The quickstart keeps its best model by mask AP; the multi-task quickstarts by AP and mIoU.
    assert _cfg(tiny_shapes_root, tmp_path).SEG2.BEST_CHECKPOINT.METRIC == "segm/AP"


@pytest.mark.parametrize(
    "opts, key",
    [
        (["SEG2.BEST_CHECKPOINT.METRIC", "segm/AP", "SEG2.BEST_CHECKPOINT.MODE", "best"], "MODE"),
        (
            ["SEG2.BEST_CHECKPOINT.METRIC", "c", "SEG2.BEST_CHECKPOINT.METRICS", ["segm/AP"]],
            "WEIGHTS",
        ),
        (
            [
                "SEG2.BEST_CHECKPOINT.METRIC",
                "",
                "SEG2.BEST_CHECKPOINT.METRICS",
                ["segm/AP"],
                "SEG2.BEST_CHECKPOINT.WEIGHTS",
                [1.0],
            ],
            "METRIC is empty",
        ),
        (
            ["SEG2.BEST_CHECKPOINT.METRICS", ["segm/AP"], "SEG2.BEST_CHECKPOINT.WEIGHTS", [1.0]],
            "a name of its own",
        ),
    ],
)
def test_bad_keys_are_named(tiny_shapes_root, tmp_path, opts, key):
    cfg = _cfg(tiny_shapes_root, tmp_path, *opts)
    with pytest.raises(seg2.Seg2Error, match=key):
        build_best_checkpoint_hooks(cfg, checkpointer=None)


def _plain(results):
    """Results as JSON has them, NaN as a string (NaN != NaN)."""
    return json.loads(json.dumps(results), parse_constant=str)


def test_best_model_is_tested_on_the_test_datasets_after_training(tiny_shapes_root, tmp_path):
    """Chosen on DATASETS.TEST (val), reported on TEST_DATASETS: the figures in model_best_test.json
    are those of model_best.pth evaluated on the test set, and the trainer keeps its final model."""
    register_tiny_shapes(
        "seg2_test_tiny_heldout", tiny_shapes_root, "train"
    )  # data it is not chosen on
    cfg = _cfg(
        tiny_shapes_root, tmp_path,
        "SEG2.BEST_CHECKPOINT.METRIC", "segm/AP", "SEG2.BEST_CHECKPOINT.TEST_DATASETS", ("seg2_test_tiny_heldout",),
    )  # fmt: skip
    trainer = _train(cfg)
    record = json.loads((tmp_path / BEST_MODEL_TEST_FILE).read_text())
    chosen = trainer.storage.history("segm/AP").values()
    best = torch.load(tmp_path / "model_best.pth", map_location="cpu", weights_only=False)
    assert best["iteration"] == _expected_best_iter(chosen)
    assert record["iteration"] == min(best["iteration"] + 1, 30)
    assert record["selected_by"] == "segm/AP" and record["selected_on"] == ["seg2_test_tiny_val"]
    assert record["datasets"] == ["seg2_test_tiny_heldout"]
    assert _plain(trainer.best_model_test["results"]) == _plain(record["results"])

    # The same checkpoint, loaded and evaluated on its own, gives the same figures.
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(str(tmp_path / "model_best.pth"))
    test_cfg = cfg.clone()
    test_cfg.DATASETS.TEST = ("seg2_test_tiny_heldout",)
    again = Trainer.test(test_cfg, model)
    assert _plain(again) == _plain(record["results"]) and {"bbox", "segm"} <= set(again)
    # ... and on the validation set, the value it was chosen by
    val_cfg = cfg.clone()
    val_cfg.DATASETS.TEST = ("seg2_test_tiny_val",)
    assert Trainer.test(val_cfg, model)["segm"]["AP"] == pytest.approx(
        max(v for v, _ in chosen), abs=1e-9
    )

    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)[
        "model"
    ]
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v.cpu(), final[k]), k


@pytest.mark.parametrize(
    "opts, match",
    [
        (["SEG2.BEST_CHECKPOINT.METRIC", "", "SEG2.BEST_CHECKPOINT.TEST_DATASETS", ("seg2_test_tiny_train",)],
         "METRIC is empty"),
        (["SEG2.BEST_CHECKPOINT.METRIC", "segm/AP", "SEG2.BEST_CHECKPOINT.TEST_DATASETS", ("seg2_test_tiny_val",)],
         r"share \['seg2_test_tiny_val'\]: the best model would be reported on the data it was "
         r"chosen on"),
    ],
)  # fmt: skip
def test_test_datasets_need_a_metric_and_other_data(tiny_shapes_root, tmp_path, opts, match):
    cfg = _cfg(tiny_shapes_root, tmp_path, *opts)
    with pytest.raises(seg2.Seg2Error, match=match):
        build_best_checkpoint_hooks(cfg, checkpointer=None)


def test_unregistered_test_dataset_is_named_before_training(tiny_shapes_root, tmp_path):
    cfg = _cfg(
        tiny_shapes_root, tmp_path,
        "SEG2.BEST_CHECKPOINT.METRIC", "segm/AP", "SEG2.BEST_CHECKPOINT.TEST_DATASETS", ("camvid_tset",),
    )  # fmt: skip
    with pytest.raises(
        seg2.Seg2Error,
        match="SEG2.BEST_CHECKPOINT.TEST_DATASETS names 'camvid_tset'.*'camvid_test'",
    ):
        check_dataset_names(cfg)
