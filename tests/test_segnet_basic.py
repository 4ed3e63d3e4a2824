"""SegNet-Basic (the SegNet authors' CamVid model) and its decoder variants, from configs/camvid/."""

import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer

from seg2.data import MultiTaskDatasetMapper, register_camvid
from seg2_model_helpers import base_cfg, one_thread  # noqa: F401  (fixture)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAMVID_MINI = os.path.join(REPO_ROOT, "..", "shared", "datasets", "CamVid_mini")
VARIANTS = ["segnet-basic", "fcn-basic", "bilinear-basic"]


def _cfg(name):
    cfg = base_cfg(os.path.join("camvid", name + ".yaml"))
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = ""  # no dataset is read by these tests
    return cfg


def test_segnet_basic_parameter_count_matches_the_prototxt():
    # segnet_basic_train.prototxt, layer by layer (conv weights + biases, BN scale + shift):
    #   conv1 3*64*7*7 + 64 = 9,472; conv2..conv4 3 x (64*64*7*7 + 64) = 602,304
    #   conv_decode4..1 4 x 200,768 = 803,072; 8 BN layers x (64 + 64) = 1,024
    #   conv_classifier 64*11 + 11 = 715                          total 1,416,587
    model = build_model(_cfg("segnet-basic_10k_camvid"))
    assert sum(p.numel() for p in model.parameters()) == 1_416_587


def test_input_lrn_is_caffes_formula_by_hand():
    # Caffe's LRN across channels (prototxt: local_size 5, alpha 1e-4, beta 0.75):
    #   y_c = x_c / (1 + alpha / 5 * sum of x_c'^2 over c-2..c+2) ** beta
    # With 3 input channels every window holds all three.
    lrn = build_model(_cfg("segnet-basic_10k_camvid")).backbone.lrn
    x = torch.tensor([100.0, -50.0, 200.0]).view(1, 3, 1, 1)
    squares = 100.0**2 + 50.0**2 + 200.0**2  # 52,500
    expected = x / (1 + 1e-4 / 5 * squares) ** 0.75  # divisor 2.05 ** 0.75 = 1.7132
    torch.testing.assert_close(lrn(x), expected, rtol=1e-6, atol=0)


def test_segnet_basic_covers_odd_sizes_and_the_variants_share_the_encoder():
    models = {v: build_model(_cfg(f"{v}_10k_camvid")).eval() for v in VARIANTS}
    x = [{"image": torch.rand(3, 45, 60) * 255, "height": 45, "width": 60}]  # 45 -> 23 -> ... (ceil)
    encoders = {}
    for v, model in models.items():
        with torch.no_grad():
            out = model(x)[0]["sem_seg"]
        assert out.shape == (11, 45, 60), v
        encoders[v] = {k: tuple(p.shape) for k, p in model.backbone.state_dict().items()}
    assert encoders["segnet-basic"] == encoders["fcn-basic"] == encoders["bilinear-basic"]
    # Only FCN-Basic's decoder learns its up-sampling; the others have none to learn.
    extra = {v: sum(p.numel() for p in m.parameters()) - 1_416_587 for v, m in models.items()}
    assert extra["segnet-basic"] == extra["bilinear-basic"] == 0
    assert extra["fcn-basic"] == 4 * 64 * 64 * 4 * 4  # four 4x4 transposed convs, 64 -> 64, no bias


def test_segnet_basic_learns_on_camvid_mini_with_median_frequency_weights(tmp_path, monkeypatch):
    """A narrow SegNet-Basic (16 channels) on 16 real CamVid images at 120x90, with class weights
    computed by seg2's median-frequency pass and the authors' solver: the loss falls."""
    if not os.path.isdir(CAMVID_MINI):
        pytest.skip(f"{CAMVID_MINI} is absent: CamVid_mini is only in the seg2 team's checkout (../shared)")
    monkeypatch.setenv("SEG2_CACHE", str(tmp_path / "cache"))
    register_camvid("camvid_mini_sb_train", CAMVID_MINI, "train")
    cfg = _cfg("segnet-basic_10k_camvid")
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHT = []
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = "median_frequency"
    cfg.MODEL.SEGNET_BASIC.CHANNELS = 16
    cfg.DATASETS.TRAIN = ("camvid_mini_sb_train",)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (90,), 120
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    mapper = MultiTaskDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get("camvid_mini_sb_train")
    batches = [[mapper(records[(4 * i + j) % len(records)]) for j in range(4)] for i in range(4)]
    model.train()
    losses = []
    for it in range(24):
        loss = model(batches[it % len(batches)])["loss_sem_seg"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
