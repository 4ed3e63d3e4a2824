"""seg2.modeling.losses: each loss against a value computed by hand, the ignore label, the config."""

import math
import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.projects.deeplab.loss import DeepLabCE
from torch.nn import functional as F

import seg2
from seg2.modeling.losses import (
    LOSS_TERMS,
    SemSegLoss,
    build_sem_seg_loss,
    cross_entropy_loss,
    dice_loss,
    focal_loss,
    hard_pixel_mining_loss,
    lovasz_softmax_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def _tiny():
    """
    (1, 3, 1, 4) logits and (1, 1, 4) labels; class 2 is absent, the 4th pixel is ignored (255):

        pixel  logits          softmax            label  p_t
        a      (0, ln2, 0)     (1/4, 1/2, 1/4)    1      1/2
        b      (ln2, 0, 0)     (1/2, 1/4, 1/4)    0      1/2
        c      (0, 0, 0)       (1/3, 1/3, 1/3)    0      1/3
        d      (9, -4, 7)      -                  255    -
    """
    logits = torch.tensor([[0.0, LN2, 0.0], [LN2, 0.0, 0.0], [0.0, 0.0, 0.0], [9.0, -4.0, 7.0]])
    return logits.t().reshape(1, 3, 1, 4).contiguous(), torch.tensor([[[1, 0, 0, 255]]])


W = torch.tensor([1.0, 2.0, 5.0])  # class weights for the weighted cases


def test_cross_entropy_by_hand():
    logits, t = _tiny()
    # -(ln 1/2 + ln 1/2 + ln 1/3) / 3 = (2 ln2 + ln3) / 3
    assert float(cross_entropy_loss(logits, t)) == pytest.approx((2 * LN2 + LN3) / 3, rel=1e-6)
    # weighted mean: (2 ln2 [a, w=2] + ln2 [b, w=1] + ln3 [c, w=1]) / (2 + 1 + 1)
    assert float(cross_entropy_loss(logits, t, class_weight=W)) == pytest.approx(
        (3 * LN2 + LN3) / 4, rel=1e-6
    )
    # PyTorch's own weighted, ignore_index cross-entropy is the reference
    ref = F.cross_entropy(logits, t, weight=W, ignore_index=255)
    torch.testing.assert_close(cross_entropy_loss(logits, t, class_weight=W), ref)


def test_pixel_normalization_is_segnets_caffe_loss_by_hand():
    logits, t = _tiny()
    # SegNet's Caffe SoftmaxWithLoss: sum of w[y] * nll over the labelled pixels / their count (3)
    expected = (3 * LN2 + LN3) / 3
    assert float(
        cross_entropy_loss(logits, t, class_weight=W, normalization="pixels")
    ) == pytest.approx(expected)
    # the same sum, unnormalised, from PyTorch, divided by the pixel count
    ref = F.cross_entropy(logits, t, weight=W, ignore_index=255, reduction="sum") / 3
    torch.testing.assert_close(
        cross_entropy_loss(logits, t, class_weight=W, normalization="pixels"), ref
    )
    a, c = LN2 / 4, 4 * LN3 / 9
    got = focal_loss(logits, t, gamma=2.0, class_weight=W, normalization="pixels")
    assert float(got) == pytest.approx((3 * a + c) / 3, rel=1e-6)
    # without class weights both normalisations are the plain mean
    assert float(cross_entropy_loss(logits, t, normalization="pixels")) == pytest.approx(
        (2 * LN2 + LN3) / 3
    )
    loss = build_sem_seg_loss(
        _cfg(
            LOSS_TYPE="cross_entropy",
            CLASS_WEIGHT=[1.0, 2.0, 5.0],
            CLASS_WEIGHT_NORMALIZATION="pixels",
        )
    )
    assert float(loss(logits, t)) == pytest.approx(expected, rel=1e-6)


def test_focal_by_hand():
    logits, t = _tiny()
    # -(1 - p_t)^2 ln p_t: a, b: (1/2)^2 ln2 = ln2 / 4; c: (2/3)^2 ln3 = 4 ln3 / 9
    a, c = LN2 / 4, 4 * LN3 / 9
    assert float(focal_loss(logits, t, gamma=2.0)) == pytest.approx((2 * a + c) / 3, rel=1e-6)
    # weighted (alpha_t = class weight): (2a + a + c) / (2 + 1 + 1)
    assert float(focal_loss(logits, t, gamma=2.0, class_weight=W)) == pytest.approx(
        (3 * a + c) / 4, rel=1e-6
    )
    # gamma 0 is cross-entropy, weighted or not
    for w in (None, W):
        torch.testing.assert_close(
            focal_loss(logits, t, gamma=0.0, class_weight=w),
            cross_entropy_loss(logits, t, class_weight=w),
        )


def test_hard_pixel_mining_by_hand_and_against_detectron2():
    logits, t = _tiny()
    # per-pixel CE: a ln2, b ln2, c ln3; top 70% of 3 labelled pixels = int(2.1) = 2: (ln3 + ln2) /
    # 2
    assert float(hard_pixel_mining_loss(logits, t, top_k=0.7)) == pytest.approx(
        (LN3 + LN2) / 2, rel=1e-6
    )
    # weighted per-pixel losses 2 ln2, ln2, ln3: the top 2 are 2 ln2 and ln3
    assert float(hard_pixel_mining_loss(logits, t, top_k=0.7, class_weight=W)) == pytest.approx(
        (2 * LN2 + LN3) / 2, rel=1e-6
    )
    # 20% of 3 pixels is 0 pixels: at least the hardest one is kept (no NaN)
    assert float(hard_pixel_mining_loss(logits, t, top_k=0.2)) == pytest.approx(LN3, rel=1e-6)
    # Without ignored pixels it is detectron2's DeepLabCE, which it reuses.
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 8, 9), torch.randint(0, 5, (2, 8, 9))
    torch.testing.assert_close(
        hard_pixel_mining_loss(x, y, top_k=0.2),
        DeepLabCE(ignore_label=255, top_k_percent_pixels=0.2)(x, y),
    )


def test_dice_by_hand():
    logits, t = _tiny()
    # present classes 0 and 1 (class 2 is absent and left out):
    # class 0: g = (0, 1, 1), p = (1/4, 1/2, 1/3): 2 (1/2 + 1/3) / ((1/4 + 1/2 + 1/3) + 2) = 20/37
    # class 1: g = (1, 0, 0), p = (1/2, 1/4, 1/3): 2 (1/2) / ((1/2 + 1/4 + 1/3) + 1) = 12/25
    assert float(dice_loss(logits, t)) == pytest.approx(1 - (20 / 37 + 12 / 25) / 2, rel=1e-6)


def test_lovasz_softmax_by_hand():
    logits, t = _tiny()
    # class 0: fg (0, 1, 1), errors |fg - p| = (1/4, 1/2, 2/3); sorted c, b, a: fg (1, 1, 0);
    #   Jaccard loss along the sort 1 - I/U: (1 - 1/2, 1 - 0/2, 1 - 0/3) = (1/2, 1, 1);
    #   increments (1/2, 1/2, 0): 2/3 * 1/2 + 1/2 * 1/2 = 7/12
    # class 1: fg (1, 0, 0), errors (1/2, 1/4, 1/3); sorted a, c, b: fg (1, 0, 0);
    #   1 - I/U = (1 - 0/1, 1 - 0/2, 1 - 0/3) = (1, 1, 1); increments (1, 0, 0): 1/2
    assert float(lovasz_softmax_loss(logits, t)) == pytest.approx((7 / 12 + 1 / 2) / 2, rel=1e-6)


def test_lovasz_matches_the_reference_loop_on_random_data():
    # The authors' reference, one class at a time (lovasz_softmax_flat, classes="present").
    def reference(probas, labels):
        losses = []
        for c in range(probas.shape[1]):
            fg = (labels == c).float()
            if fg.sum() == 0:
                continue
            errors_sorted, perm = torch.sort((fg - probas[:, c]).abs(), 0, descending=True)
            gt_sorted = fg[perm]
            gts = gt_sorted.sum()
            jaccard = 1.0 - (gts - gt_sorted.cumsum(0)) / (gts + (1 - gt_sorted).cumsum(0))
            jaccard[1:] = jaccard[1:] - jaccard[:-1]
            losses.append(torch.dot(errors_sorted, jaccard))
        return sum(losses) / len(losses)

    torch.manual_seed(0)
    x, y = torch.randn(2, 6, 7, 5), torch.randint(0, 4, (2, 7, 5))  # classes 4, 5 absent
    y[0, :2] = 255
    valid = y != 255
    probas = F.softmax(x, 1).movedim(1, -1)[valid]
    torch.testing.assert_close(lovasz_softmax_loss(x, y), reference(probas, y[valid]))


@pytest.mark.parametrize("loss_type", list(LOSS_TERMS) + ["cross_entropy+dice", "focal+lovasz"])
def test_ignored_pixels_change_nothing(loss_type):
    torch.manual_seed(0)
    loss = SemSegLoss(loss_type, ignore_value=255, class_weight=[1.0, 3.0, 0.5, 2.0], top_k=0.3)
    x, y = torch.randn(2, 4, 6, 7), torch.randint(0, 4, (2, 6, 7))
    y[:, :2] = 255
    x1 = x.clone().requires_grad_()
    x2 = x.clone()
    x2[:, :, :2] = 50 * torch.randn(2, 4, 2, 7)  # other logits at the ignored pixels only
    l1 = loss(x1, y)
    torch.testing.assert_close(l1, loss(x2, y))
    l1.backward()
    assert torch.isfinite(l1) and float(x1.grad[:, :, :2].abs().max()) == 0  # no gradient there
    assert float(x1.grad[:, :, 2:].abs().max()) > 0


def test_sum_of_terms_and_empty_targets():
    logits, t = _tiny()
    both = SemSegLoss("cross_entropy+dice", ignore_value=255)(logits, t)
    torch.testing.assert_close(both, cross_entropy_loss(logits, t) + dice_loss(logits, t))
    all_ignored = torch.full_like(t, 255)
    for loss_type in LOSS_TERMS:
        x = logits.clone().requires_grad_()
        out = SemSegLoss(loss_type, class_weight=W if loss_type != "dice" else None)(x, all_ignored)
        out.backward()
        assert float(out.detach()) == 0 and float(x.grad.abs().sum()) == 0
    # labelled pixels whose classes all weigh 0: 0, not 0/0
    assert float(cross_entropy_loss(logits, t, class_weight=torch.tensor([0.0, 0.0, 1.0]))) == 0
    assert float(focal_loss(logits, t, class_weight=torch.tensor([0.0, 0.0, 1.0]))) == 0


def _cfg(**sem):
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    for k, v in sem.items():
        setattr(cfg.MODEL.SEM_SEG_HEAD, k, v)
    return cfg


def test_build_from_config():
    loss = build_sem_seg_loss(
        _cfg(LOSS_TYPE="focal", FOCAL_GAMMA=0.0, CLASS_WEIGHT=[1.0, 2.0, 5.0])
    )
    logits, t = _tiny()
    assert loss.terms == ("focal",) and float(loss(logits, t)) == pytest.approx(
        (3 * LN2 + LN3) / 4, rel=1e-6
    )
    # Class weights are not part of a checkpoint (they load into models with other weights).
    assert loss.state_dict() == {}
    loss = build_sem_seg_loss(_cfg(LOSS_TYPE="hard_pixel_mining", LOSS_TOP_K=0.7))
    assert float(loss(logits, t)) == pytest.approx((LN3 + LN2) / 2, rel=1e-6)


@pytest.mark.parametrize(
    "sem,key",
    [
        ({"LOSS_TYPE": "softmax"}, "MODEL.SEM_SEG_HEAD.LOSS_TYPE='softmax'"),
        ({"LOSS_TYPE": "dice+dice"}, "MODEL.SEM_SEG_HEAD.LOSS_TYPE='dice+dice'"),
        ({"LOSS_TOP_K": 0.0}, "MODEL.SEM_SEG_HEAD.LOSS_TOP_K=0.0"),
        ({"FOCAL_GAMMA": -1.0}, "MODEL.SEM_SEG_HEAD.FOCAL_GAMMA=-1.0"),
        ({"CLASS_WEIGHT": [1.0, 2.0]}, "MODEL.SEM_SEG_HEAD.CLASS_WEIGHT=[1.0, 2.0]"),
        ({"CLASS_WEIGHT": [1.0, float("nan"), 1.0]}, "MODEL.SEM_SEG_HEAD.CLASS_WEIGHT="),
        ({"CLASS_WEIGHT": [0.0, 0.0, 0.0]}, "not all 0"),
        (
            {"LOSS_TYPE": "dice", "CLASS_WEIGHT": [1.0, 1.0, 1.0]},
            "LOSS_TYPE='dice' has no term it weights",
        ),
        (
            {"CLASS_WEIGHT_NORMALIZATION": "count"},
            "MODEL.SEM_SEG_HEAD.CLASS_WEIGHT_NORMALIZATION='count'",
        ),
    ],
)
def test_bad_config_names_the_key(sem, key):
    with pytest.raises(seg2.Seg2Error, match=re.escape(key)):
        build_sem_seg_loss(_cfg(**sem))


def test_bad_class_weighting_is_named_by_the_resolve_step():
    cfg = _cfg(CLASS_WEIGHTING="median")
    cfg.MODEL.META_ARCHITECTURE = "Seg2SemanticSegmentor"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("seg2_shapes_train",), ()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    with pytest.raises(
        seg2.Seg2Error, match=re.escape("MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING='median'")
    ):
        seg2.resolve_config(cfg)
