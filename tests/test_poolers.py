"""Properties of the RoIPool / RoIWarp / RoIAlign / RoIAlignV2 poolers (Mask R-CNN, Table 2c)."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from torchvision.ops import roi_align

import seg2
from seg2.modeling.poolers import BilinearROIPooling, ExtendedROIPooler, quantize_rois
from seg2.modeling.roi_heads import build_extended_pooler

# A linear ramp f(y, x) = A*x + B*y + C: bilinear interpolation reproduces it exactly.
A, B, C = 1.0, 10.0, 3.0
SIZE = 24


def ramp(size=SIZE, channels=1, dtype=torch.float64):
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=dtype), torch.arange(size, dtype=dtype), indexing="ij"
    )
    return (A * xs + B * ys + C).expand(1, channels, size, size).clone()


def ramp_at(y, x):
    return A * x + B * y + C


# Box coordinates below are binary fractions: detectron2's Boxes stores float32.
def pool(pooler_type, boxes, scale=1.0, aggregation="", sampling_ratio=2, size=SIZE, output=4):
    pooler = ExtendedROIPooler(
        output, [scale], sampling_ratio, pooler_type, aggregation=aggregation
    )
    # torchvision's roi_pool needs float32 RoIs (Boxes' dtype) and features; the ramp's integer
    # pixel values are exact in float32, and RoIPool only selects them.
    dtype = torch.float32 if pooler_type == "ROIPool" else torch.float64
    return pooler([ramp(int(size), dtype=dtype)], [Boxes(torch.tensor(boxes))])[:, 0].double()


def bilinear_expected(box, output, sample_offset=0.5, shift=0.0):
    """Ramp value at position ``sample_offset`` (in bins) inside each bin of ``box`` (feature
    coordinates, legacy pixel model), minus ``shift`` pixels (0.5 for ROIAlignV2)."""
    x0, y0, x1, y1 = box
    bw, bh = (x1 - x0) / output, (y1 - y0) / output
    return torch.tensor(
        [
            [
                ramp_at(
                    y0 + (i + sample_offset) * bh - shift, x0 + (j + sample_offset) * bw - shift
                )
                for j in range(output)
            ]
            for i in range(output)
        ],
        dtype=torch.float64,
    )


def roipool_expected(box, output):
    """Fast R-CNN's RoIPool on the ramp: corners rounded, bins of the inclusive pixel range, max
    (the ramp grows with x and y, so the max sits at each bin's last pixel)."""
    x0, y0, x1, y1 = (math.floor(v + 0.5) for v in box)
    bw, bh = (x1 - x0 + 1) / output, (y1 - y0 + 1) / output
    return torch.tensor(
        [
            [
                ramp_at(math.ceil((i + 1) * bh) + y0 - 1, math.ceil((j + 1) * bw) + x0 - 1)
                for j in range(output)
            ]
            for i in range(output)
        ],
        dtype=torch.float64,
    )


# ---------------------------------------------------------------------------------------------
# Exact values on the ramp


@pytest.mark.parametrize("sampling_ratio", [1, 2, 4, 0])
def test_roialign_returns_bin_centre_values_of_a_ramp(sampling_ratio):
    box = [2.25, 4.125, 13.75, 17.875]
    out = pool("ROIAlign", [box], sampling_ratio=sampling_ratio)[0]
    torch.testing.assert_close(out, bilinear_expected(box, 4), rtol=0, atol=1e-9)


def test_roialignv2_differs_from_roialign_by_the_half_pixel_offset():
    box = [2.25, 4.125, 13.75, 17.875]
    v1 = pool("ROIAlign", [box])[0]
    v2 = pool("ROIAlignV2", [box])[0]
    torch.testing.assert_close(v2, bilinear_expected(box, 4, shift=0.5), rtol=0, atol=1e-9)
    # every bin moves by half a pixel along x and y: A/2 + B/2 on the ramp
    torch.testing.assert_close(v1 - v2, torch.full_like(v1, 0.5 * (A + B)), rtol=0, atol=1e-9)


def test_roialign_max_takes_the_largest_sample():
    box = [2.25, 4.125, 13.75, 17.875]
    for s in (2, 3):
        out = pool("ROIAlign", [box], aggregation="max", sampling_ratio=s)[0]
        # samples at (k + 0.5) / s of a bin; the ramp's largest is the last one, (s - 0.5) / s
        torch.testing.assert_close(
            out, bilinear_expected(box, 4, sample_offset=(s - 0.5) / s), rtol=0, atol=1e-9
        )
    avg = pool("ROIAlignV2", [box])[0]
    mx = pool("ROIAlignV2", [box], aggregation="max")[0]
    bw, bh = (box[2] - box[0]) / 4, (box[3] - box[1]) / 4
    torch.testing.assert_close(
        mx - avg, torch.full_like(avg, (A * bw + B * bh) / 4), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("aggregation", ["avg", "max"])
def test_roiwarp_is_bilinear_sampling_of_the_quantised_roi(aggregation):
    box = [
        4.5,
        8.25,
        27.5,
        35.0,
    ]  # image coordinates; stride 2 -> [2.25, 4.125, 13.75, 17.5] -> [2, 4, 14, 18]
    out = pool("ROIWarp", [box], scale=0.5, aggregation=aggregation)[0]
    offset = 0.5 if aggregation == "avg" else 0.75
    torch.testing.assert_close(
        out, bilinear_expected([2, 4, 14, 18], 4, sample_offset=offset), rtol=0, atol=1e-9
    )


def test_roipool_takes_the_max_of_quantised_bins():
    box = [2.25, 4.125, 13.75, 17.875]
    torch.testing.assert_close(
        pool("ROIPool", [box])[0], roipool_expected(box, 4), rtol=0, atol=1e-9
    )


def test_quantize_rounds_halves_away_from_zero_as_roi_pool_does():
    rois = torch.tensor([[0.0, 2.5, 3.5, 5.0, 7.49], [1.0, 0.2, 1.5, 2.51, 3.0]])
    q = quantize_rois(rois, spatial_scale=1.0)
    assert q.tolist() == [[0.0, 3.0, 4.0, 5.0, 7.0], [1.0, 0.0, 2.0, 3.0, 3.0]]


# ---------------------------------------------------------------------------------------------
# Sub-pixel shifts: quantised poolers stay put inside a quantisation cell, RoIAlign follows


def test_subpixel_shift_moves_roialign_but_not_the_quantised_poolers():
    stride = 2  # feature coordinates = image coordinates / 2
    box = [
        6.25,
        8.25,
        26.0,
        30.25,
    ]  # feature [3.125, 4.125, 13.0, 15.125]: rounds to [3, 4, 13, 15]
    for shift in (
        0.25,
        0.5,
        0.625,
    ):  # image px; feature corners move 0.125 .. 0.3125, rounding the same
        moved = [v + shift for v in box]
        for ptype, agg in (("ROIPool", ""), ("ROIWarp", "avg"), ("ROIWarp", "max")):
            before = pool(ptype, [box], scale=1 / stride, aggregation=agg)
            after = pool(ptype, [moved], scale=1 / stride, aggregation=agg)
            assert torch.equal(before, after), (ptype, agg, shift)
        for ptype in ("ROIAlign", "ROIAlignV2"):
            before = pool(ptype, [box], scale=1 / stride)[0]
            after = pool(ptype, [moved], scale=1 / stride)[0]
            # every bilinear sample moves by shift / stride feature px along x and y
            expected = torch.full_like(before, (A + B) * shift / stride)
            torch.testing.assert_close(after - before, expected, rtol=0, atol=1e-9)
            feature_box = [v / stride for v in moved]
            v2 = 0.5 if ptype == "ROIAlignV2" else 0.0
            torch.testing.assert_close(
                after, bilinear_expected(feature_box, 4, shift=v2), rtol=0, atol=1e-9
            )


def test_crossing_a_quantisation_boundary_moves_the_quantised_poolers_by_whole_cells():
    box = [3.375, 4.0, 13.0, 15.0]
    moved = [3.625, 4.0, 13.625, 15.0]  # x0: 3 -> 4, x1: 13 -> 14 (one whole cell)
    for ptype in ("ROIPool", "ROIWarp"):
        diff = pool(ptype, [moved]) - pool(ptype, [box])
        torch.testing.assert_close(diff, torch.full_like(diff, A * 1.0), rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Agreement with torchvision / detectron2 where they overlap


@pytest.mark.parametrize("aligned", [False, True])
def test_max_with_one_sample_equals_torchvision_roi_align(aligned):
    # One sample per bin: max and average coincide, so the max path must reproduce roi_align,
    # including boxes that leave the feature map.
    torch.manual_seed(0)
    x = torch.randn(2, 5, 13, 17)
    rois = torch.tensor(
        [[0, 1.3, 2.7, 25.2, 19.9], [1, -6.0, 4.0, 40.0, 30.5], [1, 10.0, 10.0, 10.8, 11.5]]
    )
    ours = BilinearROIPooling((7, 5), 0.5, 1, aligned=aligned, quantize=False, aggregation="max")(
        x, rois
    )
    torch.testing.assert_close(ours, roi_align(x, rois, (7, 5), 0.5, 1, aligned), rtol=0, atol=1e-6)


def test_max_backward_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.3, 0.7, 14.2, 12.9], [0, 4.0, 2.0, 9.5, 16.0]], dtype=torch.float64)
    for quantize in (False, True):
        op = BilinearROIPooling(3, 0.5, 2, aligned=False, quantize=quantize, aggregation="max")
        assert torch.autograd.gradcheck(lambda t: op(t, rois), (x,))


def test_multilevel_max_pooler_uses_detectron2_level_assignment():
    # FPN levels p2..p5: the extended pooler's max path with one sample must equal detectron2's
    # ROIAlign pooler box for box, so boxes go to the same levels.
    torch.manual_seed(0)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    feats = [torch.randn(2, 3, 256 // s, 256 // s) for s in (4, 8, 16, 32)]
    boxes = [
        Boxes(
            torch.tensor(
                [[10.0, 10.0, 30.0, 40.0], [0.0, 0.0, 250.0, 200.0], [50.0, 60.0, 170.0, 150.0]]
            )
        ),
        Boxes(torch.tensor([[5.0, 7.0, 12.0, 9.5], [100.0, 20.0, 230.0, 240.0]])),
    ]
    ours = ExtendedROIPooler(7, scales, 1, "ROIAlign", aggregation="max", canonical_box_size=64)(
        feats, boxes
    )
    ref = ROIPooler(7, scales, 1, "ROIAlign", canonical_box_size=64)(feats, boxes)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert ours.shape == (5, 3, 7, 7)


# ---------------------------------------------------------------------------------------------
# Bad settings


def test_bad_pooler_arguments_are_errors():
    with pytest.raises(ValueError, match="ROIMagic"):
        ExtendedROIPooler(7, [0.25], 2, "ROIMagic")
    with pytest.raises(ValueError, match="'ROIPool' cannot aggregate by 'avg'"):
        ExtendedROIPooler(7, [0.25], 2, "ROIPool", aggregation="avg")
    with pytest.raises(ValueError, match="sampling_ratio=0"):
        ExtendedROIPooler(7, [0.25], 0, "ROIAlign", aggregation="max")


def _cfg(**pooler):
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3"]
    for key, value in pooler.items():
        node, _, leaf = key.rpartition("__")
        cfg.MODEL[node][leaf] = value
    return cfg


SHAPES = {"p2": ShapeSpec(channels=8, stride=4), "p3": ShapeSpec(channels=8, stride=8)}


def test_config_errors_name_the_key():
    cfg = _cfg(ROI_BOX_HEAD__POOLER_TYPE="ROIMagic")
    with pytest.raises(seg2.Seg2Error, match=r"MODEL.ROI_BOX_HEAD.POOLER_TYPE='ROIMagic'"):
        build_extended_pooler(cfg, "ROI_BOX_HEAD", SHAPES)
    cfg = _cfg(ROI_MASK_HEAD__POOLER_TYPE="ROIPool", ROI_MASK_HEAD__POOLER_AGGREGATION="avg")
    with pytest.raises(seg2.Seg2Error, match=r"MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION='avg'"):
        build_extended_pooler(cfg, "ROI_MASK_HEAD", SHAPES)
    cfg = _cfg(
        ROI_BOX_HEAD__POOLER_TYPE="ROIWarp",
        ROI_BOX_HEAD__POOLER_SAMPLING_RATIO=0,
        ROI_BOX_HEAD__POOLER_AGGREGATION="max",
    )
    with pytest.raises(seg2.Seg2Error, match=r"MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO > 0"):
        build_extended_pooler(cfg, "ROI_BOX_HEAD", SHAPES)


def test_config_builds_the_requested_pooler():
    cfg = _cfg(
        ROI_BOX_HEAD__POOLER_TYPE="ROIWarp",
        ROI_BOX_HEAD__POOLER_SAMPLING_RATIO=2,
        ROI_BOX_HEAD__POOLER_AGGREGATION="max",
    )
    pooler = build_extended_pooler(cfg, "ROI_BOX_HEAD", SHAPES)
    assert (pooler.pooler_type, pooler.aggregation) == ("ROIWarp", "max")
    assert [p.spatial_scale for p in pooler.level_poolers] == [0.25, 0.125]
    assert all(isinstance(p, BilinearROIPooling) and p.quantize for p in pooler.level_poolers)
