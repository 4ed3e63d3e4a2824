"""Evaluators, and the choice of evaluators for a dataset and a model."""

from .build import build_evaluator

__all__ = ["build_evaluator"]
