"""
The up-sampling module every seg2 head uses, so the up-sampling method is one config choice.

Modes (the choices named in FCN, U-Net, SegNet and the "deconvolution and checkerboard artifacts"
notes of Odena et al. 2016):

* ``"deconv"``: a transposed convolution, stride = factor, kernel ``2 * factor`` unless given
  (FCN: 4, 16, 64; U-Net's 2x2 "up-conv": kernel 2), padding ``(kernel - factor) / 2`` so the
  output is exactly ``factor`` times the input. With equal input and output channels the weights
  start as bilinear interpolation by ``factor`` (per channel), as in FCN; a kernel larger than
  ``2 * factor`` holds that filter in its centre, zeros around it (the SegNet paper's 8x8 kernels
  for 2x: Caffe's "bilinear" filler would fill 8x8 with the 4x filter, which at stride 2 sums to 4
  per output pixel, and four such steps multiply the logits by 256).
* ``"bilinear"``: ``F.interpolate(..., "bilinear", align_corners=False)``, no weights.
* ``"nearest_conv"`` / ``"bilinear_conv"``: resize, then a 3x3 convolution (no checkerboard).
* ``"unpool"``: max-unpooling with the encoder's pooling indices (SegNet).

In every mode output pixel ``o`` sits at input coordinate ``(o + 0.5) / factor - 0.5``, so heads
can mix modes without re-aligning. Where the channels change and the mode has no convolution of
its own (``bilinear``, ``unpool``), a 1x1 convolution follows.
"""

from typing import Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import Conv2d, get_norm
from torch import nn
from torch.nn import functional as F

__all__ = [
    "UPSAMPLE_MODES",
    "Upsample",
    "bilinear_kernel",
    "match_size",
    "center_crop",
    "max_unpool",
]

UPSAMPLE_MODES = ("deconv", "bilinear", "nearest_conv", "bilinear_conv", "unpool")


def bilinear_kernel(kernel_size: int) -> torch.Tensor:
    """The (k, k) bilinear interpolation filter FCN initialises its transposed convs with."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float32)
    filt = 1 - (og - center).abs() / factor
    return filt[:, None] * filt[None, :]


def match_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the bottom/right of ``x`` to ``size`` (H, W), or replicate-pad it where it is smaller."""
    h, w = int(size[0]), int(size[1])
    x = x[..., :h, :w]
    pad_h, pad_w = h - x.shape[-2], w - x.shape[-1]
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, max(pad_w, 0), 0, max(pad_h, 0)), mode="replicate")
    return x


def center_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centre ``size`` (H, W) window of ``x`` (U-Net's cropping of skip features)."""
    h, w = int(size[0]), int(size[1])
    if x.shape[-2] < h or x.shape[-1] < w:
        raise ValueError(f"cannot centre-crop a {tuple(x.shape[-2:])} map to {(h, w)}")
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def max_unpool(x: torch.Tensor, indices: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """
    ``F.max_unpool2d(x, indices, output_size=size)``, written as a scatter into the flattened
    (H * W) plane: every value of ``x`` goes to the position its pooling index names, zeros
    elsewhere. The result is the same, bit for bit (the same writes; 2x2 stride-2 pooling gives
    distinct indices), but it traces: torch's JIT tracer, and so TorchScript tracing, ONNX
    export and fvcore's FLOP count, fail inside ``max_unpool2d`` with an explicit
    ``output_size`` (its size check compares traced sizes as Python bools), and without it
    the output of a ceil-mode pooled odd size cannot be given. ONNX: ``ScatterElements``.
    """
    n, c = x.shape[0], x.shape[1]
    h, w = size[0], size[1]
    out = x.new_zeros((n, c, h * w))
    return out.scatter(2, indices.flatten(2), x.flatten(2)).view(n, c, h, w)


class Upsample(nn.Module):
    """Up-sample a feature map by an integer factor with one of :data:`UPSAMPLE_MODES`."""

    def __init__(
        self,
        mode: str,
        factor: int,
        in_channels: int,
        out_channels: Optional[int] = None,
        *,
        kernel_size: Optional[int] = None,
        bias: bool = False,
        learnable: bool = True,
        norm: str = "",
    ):
        """
        Args:
            mode (str): one of :data:`UPSAMPLE_MODES`.
            factor (int): the scale factor (>= 1; 1 only changes channels if asked).
            in_channels (int): channels of the input.
            out_channels (int or None): channels of the output; None keeps ``in_channels``.
            kernel_size (int or None): kernel of the transposed conv ("deconv"); default 2*factor.
            bias (bool): whether the transposed conv has a bias (FCN: no; U-Net's up-conv: yes).
            learnable (bool): False freezes the transposed conv at bilinear (FCN's last one).
            norm (str): normalization after the convolutions of "*_conv" modes ("" for none).
        """
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"unknown up-sampling mode {mode!r}; choose one of {UPSAMPLE_MODES}")
        factor = int(factor)
        if factor < 1:
            raise ValueError(f"up-sampling factor must be >= 1, got {factor}")
        out_channels = in_channels if out_channels is None else out_channels
        self.mode, self.factor = mode, factor
        self.in_channels, self.out_channels = in_channels, out_channels
        self.deconv = self.conv = None
        if factor == 1:
            self.mode = "identity"
            if in_channels != out_channels:
                self.conv = Conv2d(in_channels, out_channels, kernel_size=1)
                weight_init.c2_msra_fill(self.conv)
            return
        if mode == "deconv":
            k = 2 * factor if kernel_size is None else int(kernel_size)
            if k < factor or (k - factor) % 2:
                raise ValueError(
                    f"transposed-conv kernel {k} does not fit factor {factor}: need k >= factor, "
                    "k - factor even"
                )
            self.deconv = nn.ConvTranspose2d(
                in_channels, out_channels, k, stride=factor, padding=(k - factor) // 2, bias=bias
            )
            self.reset_bilinear()
            self.deconv.weight.requires_grad_(learnable)
        elif mode in ("nearest_conv", "bilinear_conv"):
            self.conv = Conv2d(
                in_channels,
                out_channels,
                kernel_size=3,
                padding=1,
                bias=not norm,
                norm=get_norm(norm, out_channels),
            )
            weight_init.c2_msra_fill(self.conv)
        elif in_channels != out_channels:  # "bilinear", "unpool"
            self.conv = Conv2d(in_channels, out_channels, kernel_size=1)
            weight_init.c2_msra_fill(self.conv)

    def reset_bilinear(self):
        """Initialise the transposed conv: bilinear per channel when channels are kept, else MSRA."""
        w = self.deconv.weight
        with torch.no_grad():
            if self.in_channels == self.out_channels:
                w.zero_()
                k, f = w.shape[-1], self.factor
                if (
                    k > 2 * f and (k - 2 * f) % 2 == 0
                ):  # this factor's 2f x 2f bilinear filter, centred
                    kernel = F.pad(bilinear_kernel(2 * f), ((k - 2 * f) // 2,) * 4).to(w)
                else:
                    kernel = bilinear_kernel(k).to(w)
                for c in range(self.in_channels):
                    w[c, c] = kernel
            else:
                nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
            if self.deconv.bias is not None:
                self.deconv.bias.zero_()

    def forward(
        self, x, output_size: Optional[Sequence[int]] = None, indices: Optional[torch.Tensor] = None
    ):
        """
        Args:
            x (Tensor): (N, C, H, W).
            output_size ((int, int) or None): crop or pad the result to this (H, W); for
                "unpool" it is the size of the map the indices were pooled from.
            indices (Tensor or None): max-pooling indices, required by "unpool".
        """
        if self.mode == "identity":
            pass
        elif self.mode == "deconv":
            x = self.deconv(x)
        elif self.mode == "unpool":
            if indices is None:
                raise ValueError("up-sampling mode 'unpool' needs the encoder's pooling indices")
            size = (
                output_size if output_size is not None else [s * self.factor for s in x.shape[-2:]]
            )
            x = max_unpool(x, indices, size)
        else:
            interp = "nearest" if self.mode == "nearest_conv" else "bilinear"
            kwargs = {} if interp == "nearest" else {"align_corners": False}
            x = F.interpolate(x, scale_factor=self.factor, mode=interp, **kwargs)
        if self.conv is not None:
            x = self.conv(x)
        if output_size is not None:
            x = match_size(x, output_size)
        return x

    def extra_repr(self):
        return f"mode={self.mode}, factor={self.factor}"
