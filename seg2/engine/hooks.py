"""
Keep the best model of a run (``SEG2.BEST_CHECKPOINT``): detectron2's ``BestCheckpointer`` on one
evaluation metric (e.g. ``segm/AP``, ``sem_seg/mIoU``), or on a weighted sum of several for the
multi-task model, which :class:`WeightedMetric` puts in the event storage first; after training,
:class:`BestModelTest` evaluates that best model on held-out datasets (select on val, report on
test).
"""

import copy
import json
import logging
import math
import os
from typing import List, Sequence

from detectron2.engine import hooks
from detectron2.engine.train_loop import HookBase
from detectron2.evaluation import print_csv_format
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import Seg2Checkpointer
from ..utils import Seg2Error
from ..utils.files import atomic_write

__all__ = [
    "WeightedMetric",
    "BestModelTest",
    "build_best_checkpoint_hooks",
    "check_best_checkpoint_config",
    "BEST_MODEL_TEST_FILE",
]

# In OUTPUT_DIR: the results of BestModelTest.
BEST_MODEL_TEST_FILE = "model_best_test.json"

logger = logging.getLogger(__name__)


class WeightedMetric(HookBase):
    """
    After each evaluation (the same schedule as detectron2's ``EvalHook``, which must run before
    it), put ``sum(w * storage[m])`` into the event storage under ``name``. detectron2 has no such
    hook: ``BestCheckpointer`` tracks one stored scalar only.
    """

    def __init__(
        self, eval_period: int, name: str, metrics: Sequence[str], weights: Sequence[float]
    ):
        self._period = eval_period
        self.name = name
        self.metrics = list(metrics)
        self.weights = [float(w) for w in weights]

    def _combine(self):
        latest = self.trainer.storage.latest()
        missing = [m for m in self.metrics if m not in latest]
        if missing:
            logger.warning(
                f"SEG2.BEST_CHECKPOINT.METRICS: {missing} are not among the evaluation results "
                f"({sorted(k for k in latest if '/' in k)}); {self.name} is not computed."
            )
            return
        value = math.fsum(w * latest[m][0] for m, w in zip(self.metrics, self.weights))
        self.trainer.storage.put_scalar(self.name, value, smoothing_hint=False)
        terms = " + ".join(
            f"{w:g} * {m} ({latest[m][0]:.4f})" for m, w in zip(self.metrics, self.weights)
        )
        logger.info(f"{self.name} = {terms} = {value:.4f}")

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if (
            self._period > 0
            and next_iter % self._period == 0
            and next_iter != self.trainer.max_iter
        ):
            self._combine()

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._combine()


class BestModelTest(HookBase):
    """
    After the last iteration, the best model that ``BestCheckpointer`` kept (``model_best.pth``,
    with the BN statistics it was evaluated with, ``TEST.PRECISE_BN`` included) is evaluated on
    ``SEG2.BEST_CHECKPOINT.TEST_DATASETS``: the model is chosen on ``DATASETS.TEST`` (a validation
    set) and reported once on data it was not chosen on. The results are logged, written to
    ``OUTPUT_DIR/model_best_test.json`` (with the iteration and the metric it was chosen by) and
    kept as the trainer's ``best_model_test`` attribute. The trainer's own model stays the final
    one.
    Runs in every process (the evaluation is distributed); place it after ``BestCheckpointer``.
    """

    def __init__(self, cfg, trainer_cls):
        """
        Args:
            cfg: the run's config.
            trainer_cls: the trainer class whose ``build_evaluator`` and ``test`` evaluate (e.g.
                :class:`seg2.engine.Trainer`; a hook sees its trainer through a weak proxy only).
        """
        self.trainer_cls = trainer_cls
        self.cfg = cfg.clone()
        self.cfg.defrost()
        self.cfg.DATASETS.TEST = tuple(cfg.SEG2.BEST_CHECKPOINT.TEST_DATASETS)
        self.cfg.freeze()

    def after_train(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:
            return  # training stopped early: no final best model
        comm.synchronize()  # the main process has written model_best.pth
        cfg, best = self.cfg, self.cfg.SEG2.BEST_CHECKPOINT
        path = os.path.join(cfg.OUTPUT_DIR, "model_best.pth")
        if not os.path.isfile(path):
            logger.warning(
                f"SEG2.BEST_CHECKPOINT.TEST_DATASETS: no {path} (was {best.METRIC} ever "
                "evaluated?); the best model "
                f"is not evaluated on {list(cfg.DATASETS.TEST)}"
            )
            self.trainer.best_model_test = None
            return
        model = self.trainer.model
        model = copy.deepcopy(model.module if isinstance(model, DistributedDataParallel) else model)
        saved_at = Seg2Checkpointer(model).load(path, checkpointables=[]).get("iteration", -1)
        # BestCheckpointer saves the trainer's counter: k - 1 after k iterations, max_iter at the
        # end
        iteration = min(saved_at + 1, self.trainer.max_iter)
        logger.info(
            f"Evaluating the best model by {best.METRIC} (after {iteration} iterations, {path}) on "
            f"{tuple(cfg.DATASETS.TEST)}"
        )
        trainer_cls = self.trainer_cls
        evaluators = [
            trainer_cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_best", name)
            )
            for name in cfg.DATASETS.TEST
        ]
        results = trainer_cls.test(cfg, model, evaluators)
        record = {"checkpoint": path, "iteration": iteration, "selected_by": best.METRIC,
                  "selected_on": list(self.trainer.cfg.DATASETS.TEST), "datasets": list(cfg.DATASETS.TEST),
                  "results": results}  # fmt: skip
        self.trainer.best_model_test = record
        if comm.is_main_process():
            print_csv_format(results)
            with atomic_write(os.path.join(cfg.OUTPUT_DIR, BEST_MODEL_TEST_FILE), "w") as f:
                json.dump(record, f, indent=1)


def check_best_checkpoint_config(cfg) -> None:
    """A :class:`Seg2Error` naming the key for a bad ``SEG2.BEST_CHECKPOINT`` value."""
    best = cfg.SEG2.BEST_CHECKPOINT
    if best.MODE not in ("max", "min"):
        raise Seg2Error(f'SEG2.BEST_CHECKPOINT.MODE must be "max" or "min", not {best.MODE!r}')
    if len(best.METRICS) != len(best.WEIGHTS):
        raise Seg2Error(
            f"SEG2.BEST_CHECKPOINT.METRICS ({list(best.METRICS)}) and SEG2.BEST_CHECKPOINT.WEIGHTS "
            f"({list(best.WEIGHTS)}) must have the same length"
        )
    if best.METRICS and best.METRIC in best.METRICS:
        raise Seg2Error(
            f"SEG2.BEST_CHECKPOINT.METRIC ({best.METRIC!r}) names the weighted sum of "
            "SEG2.BEST_CHECKPOINT.METRICS: give it a name of its own, e.g. 'combined/score'"
        )
    if best.TEST_DATASETS and not best.METRIC:
        raise Seg2Error(
            f"SEG2.BEST_CHECKPOINT.TEST_DATASETS={list(best.TEST_DATASETS)} evaluates the best "
            "model, but "
            "SEG2.BEST_CHECKPOINT.METRIC is empty: name the metric that chooses it (e.g. "
            "'sem_seg/mIoU')"
        )
    overlap = sorted(set(best.TEST_DATASETS) & set(cfg.DATASETS.TEST))
    if overlap:
        raise Seg2Error(
            f"SEG2.BEST_CHECKPOINT.TEST_DATASETS and DATASETS.TEST share {overlap}: the best "
            "model would be "
            "reported on the data it was chosen on; choose on a validation set (DATASETS.TEST) "
            "and test on another"
        )
    if best.METRICS and not best.METRIC:
        raise Seg2Error(
            "SEG2.BEST_CHECKPOINT.METRICS is set but SEG2.BEST_CHECKPOINT.METRIC is empty: name "
            "the "
            "weighted sum there (e.g. 'combined/score') to keep the best model by it"
        )


def build_best_checkpoint_hooks(cfg, checkpointer) -> List[HookBase]:
    """
    The hooks that keep ``<OUTPUT_DIR>/model_best.pth`` by ``cfg.SEG2.BEST_CHECKPOINT``; none if
    its METRIC is empty. Place them right after detectron2's ``EvalHook``.

    Raises:
        Seg2Error: a bad ``SEG2.BEST_CHECKPOINT`` key, named.
    """
    check_best_checkpoint_config(cfg)
    best = cfg.SEG2.BEST_CHECKPOINT
    if not best.METRIC:
        return []
    period = cfg.TEST.EVAL_PERIOD
    ret: List[HookBase] = []
    if best.METRICS:
        ret.append(WeightedMetric(period, best.METRIC, best.METRICS, best.WEIGHTS))
    ret.append(
        hooks.BestCheckpointer(
            period, checkpointer, best.METRIC, mode=best.MODE, file_prefix="model_best"
        )
    )
    when = (
        f"every {period} iterations and at the end"
        if period > 0
        else "at the end (TEST.EVAL_PERIOD is 0)"
    )
    logger.info(
        f"Keeping the best model by {best.METRIC} ({best.MODE}), evaluated {when}, in "
        "model_best.pth"
    )
    return ret
