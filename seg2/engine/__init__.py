"""Training: detectron2's ``DefaultTrainer`` with seg2's data mapper and evaluators, the setup
that ``tools/train_net.py`` runs, and the training-speed benchmark of ``tools/benchmark.py``."""

from .defaults import Trainer, check_same_tasks, setup

__all__ = ["Trainer", "check_same_tasks", "setup"]
