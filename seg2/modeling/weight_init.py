"""Caffe's weight fillers, for the models whose authors trained them in Caffe (SegNet)."""

from torch import nn

__all__ = ["caffe_msra_fill"]


def caffe_msra_fill(module: nn.Module) -> None:
    """
    Caffe's ``"msra"`` weight filler with its defaults: N(0, 2 / fan_in), fan_in = input channels
    x kernel area; bias 0. SegNet's prototxts use it for every conv. fvcore's ``c2_msra_fill``
    (detectron2's) divides by fan_out instead, which differs where a conv changes the channels
    (SegNet-Basic's 64 -> 11 classifier: a std of 0.43 instead of Caffe's 0.18).
    """
    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)
