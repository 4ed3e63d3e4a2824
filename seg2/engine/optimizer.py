"""
The optimizer of a seg2 run: detectron2's ``build_optimizer``, with the choice of how the biases
(shifts) of normalization layers are treated (``SOLVER.NORM_BIAS_HYPERPARAMS``).

detectron2 applies ``SOLVER.BIAS_LR_FACTOR`` and ``SOLVER.WEIGHT_DECAY_BIAS`` to every parameter
named ``bias``, the shift of a BatchNorm included. Caffe sets them per layer (``lr_mult`` and
``decay_mult`` of each ``param``): SegNet's prototxts double the learning rate of the conv biases
and
take their weight decay away, but leave the BN layers' scale and shift at the defaults (learning
rate and weight decay of the weights). ``"norm"`` gives a norm layer's bias the hyper-parameters of
its weight (``SOLVER.BASE_LR``, ``SOLVER.WEIGHT_DECAY_NORM``), which reproduces that.

Why our own code: detectron2's ``get_default_optimizer_params`` takes overrides keyed by the
parameter's name, which a conv's bias and a norm layer's bias share.
"""

from typing import List

import torch
from detectron2.solver import build_optimizer as d2_build_optimizer

from ..utils import Seg2Error

__all__ = ["NORM_BIAS_HYPERPARAMS", "NORM_MODULE_TYPES", "build_optimizer", "norm_bias_parameters"]

NORM_BIAS_HYPERPARAMS = ("bias", "norm")
# The norm layers whose parameters detectron2's get_default_optimizer_params gives
# SOLVER.WEIGHT_DECAY_NORM (the same list).
NORM_MODULE_TYPES = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)


def norm_bias_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The trainable biases (shifts) of the norm layers of ``model``."""
    return [
        m.bias
        for m in model.modules()
        if isinstance(m, NORM_MODULE_TYPES) and isinstance(getattr(m, "bias", None), torch.nn.Parameter)
        and m.bias.requires_grad
    ]  # fmt: skip


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """
    detectron2's SGD of ``cfg.SOLVER`` (``detectron2.solver.build_optimizer``), where
    ``SOLVER.NORM_BIAS_HYPERPARAMS`` is "bias" (detectron2's behaviour); with "norm", the
    biases of norm layers get ``SOLVER.BASE_LR`` and ``SOLVER.WEIGHT_DECAY_NORM`` instead of
    ``BIAS_LR_FACTOR`` and ``WEIGHT_DECAY_BIAS`` (Caffe's BN layer in SegNet's prototxts).
    """
    mode = cfg.SOLVER.NORM_BIAS_HYPERPARAMS
    if mode not in NORM_BIAS_HYPERPARAMS:
        raise Seg2Error(
            f"SOLVER.NORM_BIAS_HYPERPARAMS={mode!r}: choose one of {list(NORM_BIAS_HYPERPARAMS)}"
        )
    optimizer = d2_build_optimizer(cfg, model)  # gradient clipping and all, as detectron2 builds it
    norm_biases = {id(p) for p in norm_bias_parameters(model)} if mode == "norm" else set()
    if not norm_biases:
        return optimizer
    moved = [p for g in optimizer.param_groups for p in g["params"] if id(p) in norm_biases]
    for g in optimizer.param_groups:  # no step taken yet: the optimizer has no state to move
        g["params"] = [p for p in g["params"] if id(p) not in norm_biases]
    optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
    s = cfg.SOLVER
    optimizer.add_param_group(
        {"params": moved, "lr": s.BASE_LR, "weight_decay": s.WEIGHT_DECAY_NORM}
    )
    return optimizer
