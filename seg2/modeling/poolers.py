"""
RoI poolers of the Mask R-CNN ablation (He et al., ICCV 2017, Table 2c/2d): RoIPool, RoIWarp,
RoIAlign and RoIAlignV2, with average or max aggregation of the bilinear samples.

detectron2's :class:`~detectron2.modeling.poolers.ROIPooler` knows ``ROIPool``, ``ROIAlign``,
``ROIAlignV2`` and ``ROIAlignRotated``, each with its fixed aggregation (max for RoIPool, average
for the RoIAlign family). :class:`ExtendedROIPooler` adds ``ROIWarp`` and max aggregation; it keeps
detectron2's level assignment and forward and only swaps the per-level ops.
"""

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.modeling.poolers import ROIPooler
from torch import nn
from torchvision.ops import roi_align

__all__ = ["POOLER_AGGREGATIONS", "BilinearROIPooling", "ExtendedROIPooler", "quantize_rois"]

# pooler type -> the aggregations it can have; the first is its natural one (what "" means).
POOLER_AGGREGATIONS = {
    "ROIPool": ("max",),  # Fast R-CNN: quantised RoI and bins, max over the pixels of a bin
    "ROIWarp": ("avg", "max"),  # quantised RoI, bilinear samples (legacy pixel model)
    "ROIAlign": ("avg", "max"),  # exact RoI, bilinear samples, legacy pixel model (aligned=False)
    "ROIAlignV2": ("avg", "max"),  # exact RoI, bilinear samples, half-pixel aligned (aligned=True)
    "ROIAlignRotated": ("avg",),  # detectron2's, for rotated boxes
}
# (type, aggregation) pairs detectron2's ROIPooler builds itself.
_DETECTRON2_POOLERS = {
    ("ROIPool", "max"),
    ("ROIAlign", "avg"),
    ("ROIAlignV2", "avg"),
    ("ROIAlignRotated", "avg"),
}


def quantize_rois(rois: torch.Tensor, spatial_scale: float) -> torch.Tensor:
    """
    Scale (batch index, x0, y0, x1, y1) RoIs to the feature map and round the corners to whole
    feature cells, the way torchvision's ``roi_pool`` does (``std::round``: halves away from zero).

    Args:
        rois (Tensor): (R, 5) RoIs in image coordinates.
        spatial_scale (float): 1 / stride of the feature map.

    Returns:
        Tensor: (R, 5) RoIs in feature-map coordinates with integer corners.
    """
    corners = rois[:, 1:] * spatial_scale
    # torch.round rounds halves to even; roi_pool's C++ kernel rounds them away from zero.
    corners = torch.sign(corners) * torch.floor(corners.abs() + 0.5)
    return torch.cat([rois[:, :1], corners], dim=1)


class BilinearROIPooling(nn.Module):
    """
    RoI pooling by bilinear sampling (Mask R-CNN, He et al. ICCV 2017, Sec. 3 and Table 2c):
    RoIWarp (``quantize=True``) or RoIAlign (``quantize=False``), averaging or taking the max of
    ``sampling_ratio`` x ``sampling_ratio`` regularly spaced samples per bin.
    """

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
        quantize: bool,
        aggregation: str = "avg",
    ):
        """
        Args:
            output_size (int or (int, int)): bins per RoI, (height, width).
            spatial_scale (float): 1 / stride of the feature map.
            sampling_ratio (int): samples per bin along each side; 0 lets torchvision pick
                ``ceil(roi_size / output_size)`` per RoI (average aggregation only).
            aligned (bool): shift sample positions by -0.5 px (detectron2's ROIAlignV2) instead of
                the legacy pixel model of Detectron / the paper (pixel i's value at coordinate i).
            quantize (bool): round RoI corners to whole feature cells first (RoIWarp).
            aggregation (str): "avg" or "max" over the samples of a bin.
        """
        super().__init__()
        if aggregation not in ("avg", "max"):
            raise ValueError(f"aggregation={aggregation!r}: expected 'avg' or 'max'")
        if aggregation == "max" and sampling_ratio <= 0:
            raise ValueError(
                "max aggregation needs a fixed number of samples per bin, got "
                f"sampling_ratio={sampling_ratio} "
                "(adaptive); set a positive sampling ratio (the paper uses 2, i.e. 4 samples per "
                "bin)"
            )
        if quantize and aligned:
            raise ValueError(
                "quantize=True (RoIWarp) uses the legacy pixel model: aligned must be False"
            )
        self.output_size = (
            (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        )
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.quantize = quantize
        self.aggregation = aggregation

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input (Tensor): (N, C, H, W) feature map.
            rois (Tensor): (R, 5) RoIs (batch index, x0, y0, x1, y1) in image coordinates.

        Returns:
            Tensor: (R, C, output_height, output_width).
        """
        rois = rois.to(dtype=input.dtype)
        scale = self.spatial_scale
        if self.quantize:
            rois, scale = quantize_rois(rois, scale), 1.0
        if self.aggregation == "avg":
            return roi_align(
                input, rois, self.output_size, scale, self.sampling_ratio, self.aligned
            )
        # torchvision's roi_align only averages. With s samples per side, sample k of bin j lies at
        # start + (j + (k + 0.5) / s) * bin_size = start + (j * s + k + 0.5) * (bin_size / s): the
        # single centre sample of bin (j * s + k) when the same RoI is pooled to s times as many
        # bins. So roi_align at (s*H, s*W) with one sample per bin gives every bilinear sample
        # exactly (forward and backward in torchvision's kernels), and a max over s x s blocks
        # is the max aggregation of the paper.
        s = self.sampling_ratio
        fine = roi_align(
            input, rois, (self.output_size[0] * s, self.output_size[1] * s), scale, 1, self.aligned
        )
        return F.max_pool2d(fine, kernel_size=s, stride=s)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, "
            f"quantize={self.quantize}, "
            f"aggregation={self.aggregation!r}"
        )


class ExtendedROIPooler(ROIPooler):
    """
    detectron2's multi-level ROIPooler with the pooling ops of the Mask R-CNN ablation
    (He et al., ICCV 2017, Table 2c): adds ``ROIWarp`` and max aggregation of bilinear samples.
    """

    def __init__(
        self,
        output_size: Union[int, Sequence[int]],
        scales: Sequence[float],
        sampling_ratio: int,
        pooler_type: str,
        aggregation: str = "",
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ):
        """
        Args:
            output_size (int or (int, int)): bins per RoI.
            scales (list[float]): 1 / stride of each feature level, as in ROIPooler.
            sampling_ratio (int): bilinear samples per bin along each side (0: adaptive, average
            only).
            pooler_type (str): one of ``POOLER_AGGREGATIONS``: "ROIPool", "ROIWarp", "ROIAlign",
                "ROIAlignV2", "ROIAlignRotated".
            aggregation (str): "avg", "max", or "" for the type's natural one (max for ROIPool,
                avg for the others).
            canonical_box_size (int): as in ROIPooler (FPN level assignment).
            canonical_level (int): as in ROIPooler.
        """
        if pooler_type not in POOLER_AGGREGATIONS:
            raise ValueError(
                f"pooler_type={pooler_type!r}: expected one of {sorted(POOLER_AGGREGATIONS)}"
            )
        choices = POOLER_AGGREGATIONS[pooler_type]
        aggregation = aggregation or choices[0]
        if aggregation not in choices:
            raise ValueError(
                f"pooler_type={pooler_type!r} cannot aggregate by {aggregation!r}; it supports "
                f"{list(choices)}"
            )
        native = (pooler_type, aggregation) in _DETECTRON2_POOLERS
        # For new combinations let ROIPooler check the scales and set up the levels with a type it
        # knows, then replace its per-level ops: level assignment and forward stay detectron2's.
        super().__init__(
            output_size,
            scales,
            sampling_ratio,
            pooler_type if native else "ROIAlign",
            canonical_box_size=canonical_box_size,
            canonical_level=canonical_level,
        )
        self.pooler_type = pooler_type
        self.aggregation = aggregation
        if not native:
            self.level_poolers = nn.ModuleList(
                BilinearROIPooling(
                    self.output_size,
                    spatial_scale=scale,
                    sampling_ratio=sampling_ratio,
                    aligned=pooler_type == "ROIAlignV2",
                    quantize=pooler_type == "ROIWarp",
                    aggregation=aggregation,
                )
                for scale in scales
            )
