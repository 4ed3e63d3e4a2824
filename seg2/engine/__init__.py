"""Training: detectron2's ``DefaultTrainer`` with seg2's data mapper and evaluators, and the setup
that ``tools/train_net.py`` runs."""

from .amp import Seg2AMPTrainer
from .defaults import Trainer, check_same_tasks, setup
from .optimizer import build_optimizer
from .resume import trim_metrics_json

__all__ = [
    "Seg2AMPTrainer",
    "Trainer",
    "build_optimizer",
    "check_same_tasks",
    "setup",
    "trim_metrics_json",
]
