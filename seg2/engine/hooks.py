"""
Keep the best model of a run (``SEG2.BEST_CHECKPOINT``): detectron2's ``BestCheckpointer`` on one
evaluation metric (e.g. ``segm/AP``, ``sem_seg/mIoU``), or on a weighted sum of several for the
multi-task model, which :class:`WeightedMetric` puts in the event storage first.
"""

import logging
import math
from typing import List, Sequence

from detectron2.engine import hooks
from detectron2.engine.train_loop import HookBase

from ..utils import Seg2Error

__all__ = ["WeightedMetric", "build_best_checkpoint_hooks"]

logger = logging.getLogger(__name__)


class WeightedMetric(HookBase):
    """
    After each evaluation (the same schedule as detectron2's ``EvalHook``, which must run before
    it), put ``sum(w * storage[m])`` into the event storage under ``name``. detectron2 has no such
    hook: ``BestCheckpointer`` tracks one stored scalar only.
    """

    def __init__(self, eval_period: int, name: str, metrics: Sequence[str], weights: Sequence[float]):
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
        terms = " + ".join(f"{w:g} * {m} ({latest[m][0]:.4f})" for m, w in zip(self.metrics, self.weights))
        logger.info(f"{self.name} = {terms} = {value:.4f}")

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            self._combine()

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._combine()


def _check_config(cfg) -> None:
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
    if best.METRICS and not best.METRIC:
        raise Seg2Error(
            "SEG2.BEST_CHECKPOINT.METRICS is set but SEG2.BEST_CHECKPOINT.METRIC is empty: name the "
            "weighted sum there (e.g. 'combined/score') to keep the best model by it"
        )


def build_best_checkpoint_hooks(cfg, checkpointer) -> List[HookBase]:
    """
    The hooks that keep ``<OUTPUT_DIR>/model_best.pth`` by ``cfg.SEG2.BEST_CHECKPOINT``; none if
    its METRIC is empty. Place them right after detectron2's ``EvalHook``.

    Raises:
        Seg2Error: a bad ``SEG2.BEST_CHECKPOINT`` key, named.
    """
    _check_config(cfg)
    best = cfg.SEG2.BEST_CHECKPOINT
    if not best.METRIC:
        return []
    period = cfg.TEST.EVAL_PERIOD
    ret: List[HookBase] = []
    if best.METRICS:
        ret.append(WeightedMetric(period, best.METRIC, best.METRICS, best.WEIGHTS))
    ret.append(hooks.BestCheckpointer(period, checkpointer, best.METRIC, mode=best.MODE, file_prefix="model_best"))
    when = f"every {period} iterations and at the end" if period > 0 else "at the end (TEST.EVAL_PERIOD is 0)"
    logger.info(f"Keeping the best model by {best.METRIC} ({best.MODE}), evaluated {when}, in model_best.pth")
    return ret
