"""Every shipped config builds, trains one step and infers; a config that cannot build names its key."""

import glob
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from PIL import Image

import seg2
from seg2.engine import build_optimizer  # the Trainer's (SOLVER.NORM_BIAS_HYPERPARAMS)

from seg2_model_helpers import CONFIGS, base_cfg, one_thread, tiny_semantic_cfg  # noqa: F401  (fixture)

# Every config under configs/ except the _BASE_-only files (Base-*.yaml), found anew on each run.
SHIPPED = sorted(
    os.path.relpath(p, CONFIGS)
    for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)
SIZE = 64  # a multiple of every shipped model's size divisibility (32 for the FPNs)


def test_the_glob_finds_every_config_family():
    folders = {os.path.dirname(p) for p in SHIPPED}
    assert folders == {
        "camvid",
        "multitask",
        "pooler_ablation",
        "quickstart",
        "reference",
        "semantic",
    }
    assert len(SHIPPED) >= 50


@pytest.fixture(scope="module")
def label_datasets(tmp_path_factory):
    """``name(K)``: a registered one-image dataset with a K-class label map, for configs that
    compute their class weights from DATASETS.TRAIN (CLASS_WEIGHTING) on the first step."""
    root = tmp_path_factory.mktemp("labels")

    def name(num_classes):
        dataset = f"seg2_test_shipped_configs_{num_classes}"
        if dataset not in DatasetCatalog.list():
            label = root / f"{num_classes}.png"
            Image.fromarray(
                (np.arange(16 * 16).reshape(16, 16) % num_classes).astype(np.uint8)
            ).save(label)
            record = {
                "file_name": str(label),
                "sem_seg_file_name": str(label),
                "height": 16,
                "width": 16,
                "image_id": 0,
            }
            DatasetCatalog.register(dataset, lambda: [dict(record)])
            MetadataCatalog.get(dataset).set(ignore_label=255)
        return dataset

    return name


def shipped_cfg(config):
    """``config`` as shipped, weights off (no download), no dataset; SyncBN -> BN, the one change
    allowed (SyncBN only works across several processes)."""
    cfg = base_cfg(config)
    if cfg.MODEL.RESNETS.NORM == "SyncBN":
        cfg.MODEL.RESNETS.NORM = "BN"
    if cfg.MODEL.SEM_SEG_HEAD.NORM == "SyncBN":
        cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
    return cfg


def synthetic_batch(cfg, model, n=2, size=SIZE):
    """``n`` random images with the targets the model trains on: a label map (semantic head) and
    two boxes with masks (RoI heads)."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(n):
        x = {
            "image": torch.rand(len(cfg.MODEL.PIXEL_MEAN), size, size, generator=g) * 255,
            "height": size,
            "width": size,
        }
        if hasattr(model, "sem_seg_head"):
            x["sem_seg"] = torch.randint(
                0, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, (size, size), generator=g
            )
        if hasattr(model, "roi_heads"):
            boxes = torch.tensor([[8.0, 8.0, 40.0, 48.0], [20.0, 16.0, 60.0, 60.0]]) * size / 64
            masks = torch.zeros(2, size, size, dtype=torch.bool)
            for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
                m[y0:y1, x0:x1] = True
            inst = Instances((size, size))
            inst.gt_boxes, inst.gt_masks = Boxes(boxes), BitMasks(masks)
            inst.gt_classes = torch.tensor([0, min(1, cfg.MODEL.ROI_HEADS.NUM_CLASSES - 1)])
            x["instances"] = inst
        batch.append(x)
    return batch


@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_config_trains_one_step_and_infers(config, label_datasets, tmp_path, monkeypatch):
    """The model of ``config`` with its own solver: one training step on random 64x64 images
    (finite loss, parameters move), then inference of one image at its size."""
    cfg = shipped_cfg(config)
    if cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING:  # counted from DATASETS.TRAIN by the resolve step
        monkeypatch.setenv("SEG2_CACHE", str(tmp_path / "cache"))
        cfg.DATASETS.TRAIN = (label_datasets(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES),)
        cfg.DATASETS.TEST, cfg.SEG2.BEST_CHECKPOINT.TEST_DATASETS = (), ()
        cfg = seg2.resolve_config(cfg)
        assert len(cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHT) == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    # Two images where a BatchNorm trains (one value per channel cannot be normalised: ASPP's
    # pooled branch), else one: the VGG16 FCNs are the slowest models here.
    batch_norms = [
        m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    batch = synthetic_batch(cfg, model, n=2 if batch_norms else 1)
    head = model.sem_seg_head if hasattr(model, "sem_seg_head") else model.roi_heads
    before = [p.detach().clone() for p in head.parameters() if p.requires_grad]
    model.train()
    with EventStorage(0):
        losses = model(batch)
    if hasattr(model, "sem_seg_head"):
        assert "loss_sem_seg" in losses
    if hasattr(model, "roi_heads"):
        assert {"loss_rpn_cls", "loss_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    loss = sum(losses.values())
    assert torch.isfinite(loss), losses
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    after = [p.detach() for p in head.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))

    model.eval()
    with torch.no_grad():
        (out,) = model(batch[:1])
    if hasattr(model, "sem_seg_head"):
        assert out["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, SIZE, SIZE)
        assert torch.isfinite(out["sem_seg"]).all()
    if hasattr(model, "roi_heads"):
        assert out["instances"].image_size == (SIZE, SIZE)


@pytest.mark.parametrize("config", [c for c in SHIPPED if c.startswith("camvid" + os.sep)])
def test_every_camvid_config_tunes_on_val_and_reports_test_once(config):
    cfg = seg2.load_seg2_config(os.path.join(CONFIGS, config))  # as shipped, datasets kept
    assert cfg.DATASETS.TRAIN == ("camvid_train",) and cfg.DATASETS.TEST == ("camvid_val",)
    # SegNet-Basic and its variants as the SegNet paper selects them (val global accuracy)
    basic = cfg.MODEL.BACKBONE.NAME == "build_segnet_basic_backbone"
    assert cfg.SEG2.BEST_CHECKPOINT.METRIC == ("sem_seg/pACC" if basic else "sem_seg/mIoU")
    assert cfg.SEG2.BEST_CHECKPOINT.TEST_DATASETS == ("camvid_test",)
    assert cfg.TEST.EVAL_PERIOD > 0


# A norm that cannot normalise a layer's channels: a Seg2Error at build time naming the norm's key
# and the key the channel count comes from (before: torch's GroupNorm ValueError, no key).
@pytest.mark.parametrize(
    "config,opts,norm_key,channels_key",
    [
        # The multi-task DeepLabV3+ as shipped before: the base's GN on its 48-channel projection.
        ("multitask/mask_rcnn_R50_FPN_deeplabv3plus_1x_coco.yaml", ["MODEL.SEM_SEG_HEAD.NORM", "GN"],
         "MODEL.SEM_SEG_HEAD.NORM='GN'", "48 channels set by MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS"),
        ("multitask/mask_rcnn_R50_FPN_deeplabv3plus_1x_coco.yaml",
         ["MODEL.SEM_SEG_HEAD.NORM", "GN", "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", [64],
          "MODEL.SEM_SEG_HEAD.CONVS_DIM", 200],
         "MODEL.SEM_SEG_HEAD.NORM='GN'", "200 channels set by MODEL.SEM_SEG_HEAD.CONVS_DIM"),
        ("multitask/mask_rcnn_R50_FPN_unet_1x_coco.yaml", ["MODEL.UNET_HEAD.DECODER_CHANNELS", [256, 128, 48]],
         "MODEL.UNET_HEAD.NORM='GN'", "48 channels set by MODEL.UNET_HEAD.DECODER_CHANNELS"),
        ("quickstart/unet_tiny_shapes_cpu.yaml", ["MODEL.UNET_HEAD.NORM", "GN"],
         "MODEL.UNET_HEAD.NORM='GN'", "set by MODEL.UNET_HEAD.DECODER_CHANNELS=[] (the channels of the skip features"),
        ("quickstart/segnet_vgg16-tiny_shapes_cpu.yaml", ["MODEL.SEGNET_HEAD.NORM", "GN"],
         "MODEL.SEGNET_HEAD.NORM='GN'", "the backbone's channels of the encoder stages"),
        ("quickstart/segnet_vgg16-tiny_shapes_cpu.yaml", ["MODEL.VGG.NORM", "GN"],
         "MODEL.VGG.NORM='GN'", "set by MODEL.VGG.CHANNELS"),
        ("camvid/segnet-basic_10k_camvid.yaml", ["MODEL.SEGNET_BASIC.NORM", "GN", "MODEL.SEGNET_BASIC.CHANNELS", 48],
         "MODEL.SEGNET_BASIC.NORM='GN'", "48 channels set by MODEL.SEGNET_BASIC.CHANNELS"),
        ("quickstart/unet-valid_tiny_shapes_cpu.yaml", ["MODEL.UNET_ENCODER.NORM", "GN"],
         "MODEL.UNET_ENCODER.NORM='GN'", "set by MODEL.UNET_ENCODER.CHANNELS"),
    ],
)  # fmt: skip
def test_a_norm_that_does_not_fit_the_channels_names_both_keys(
    config, opts, norm_key, channels_key
):
    cfg = base_cfg(config)
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = ""
    cfg.merge_from_list(opts)
    with pytest.raises(seg2.Seg2Error) as e:
        build_model(cfg)
    message = str(e.value)
    assert norm_key in message and channels_key in message, message
    assert "multiple of 32" in message


def test_an_unknown_norm_names_its_key():
    cfg = tiny_semantic_cfg("Seg2DeepLabV3PlusHead", "resnet")
    cfg.MODEL.SEM_SEG_HEAD.NORM = "XN"
    with pytest.raises(
        seg2.Seg2Error,
        match=r"MODEL.SEM_SEG_HEAD.NORM='XN' is not a norm detectron2's get_norm knows",
    ):
        build_model(cfg)
    # The same head with norms that fit: builds (GN on 32-channel layers, BN on anything).
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS, cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = [32], 32
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 64
    head = build_model(cfg).sem_seg_head
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)


@pytest.mark.parametrize("config", [c for c in SHIPPED if "panoptic" in c])
def test_panoptic_configs_merge_on_their_datasets(config):
    """The panoptic configs with their datasets' metadata (registered; no file is read): the
    model checks the separated class layout at build time and returns "panoptic_seg"."""
    from seg2.modeling import model_tasks

    cfg = shipped_cfg(config)
    kept = seg2.load_seg2_config(os.path.join(CONFIGS, config))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = kept.DATASETS.TRAIN, kept.DATASETS.TEST
    assert (
        cfg.MODEL.PANOPTIC_FPN.COMBINE.ENABLED
        and cfg.SEG2.BEST_CHECKPOINT.METRIC == "panoptic_seg/PQ"
    )
    assert model_tasks(cfg) == {"instances", "sem_seg", "panoptic_seg"}
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.combine_enabled
    (x,) = synthetic_batch(cfg, model, n=1)
    with torch.no_grad():
        (out,) = model([{k: x[k] for k in ("image", "height", "width")}])
    ids, segments_info = out["panoptic_seg"]
    assert ids.shape == (SIZE, SIZE) and ids.dtype == torch.int32
    assert set(torch.unique(ids).tolist()) - {0} == {s["id"] for s in segments_info}
