"""Tiny configs and data for the model tests (test_heads, test_meta_arch); the tools' modules
for their tests (:func:`import_tool`)."""

import importlib
import os
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils import comm

import seg2
from seg2.data import MultiTaskDatasetMapper, load_coco_with_sem_seg

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "configs")

VGG_MAPS = ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"]
VGG_INDICES = [f"pool{i}_indices" for i in range(1, 6)]


@pytest.fixture(autouse=True)
def one_thread():
    """Run a model test on one thread: on the shared 2-core test machine two OpenMP threads
    fight over busy cores and are several times slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def base_cfg(config_file=None):
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    if config_file:
        cfg.merge_from_file(os.path.join(CONFIGS, config_file))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    return cfg


def _vgg(cfg, out_features, fc_dim=32, pad100=False):
    cfg.MODEL.BACKBONE.NAME = "build_vgg_backbone"
    cfg.MODEL.VGG.CHANNELS = [8, 8, 16, 16, 16]
    cfg.MODEL.VGG.NORM = "BN"
    cfg.MODEL.VGG.FC_DIM = fc_dim
    cfg.MODEL.VGG.FC_DROPOUT = 0.0
    cfg.MODEL.VGG.FCN_PAD100 = pad100
    cfg.MODEL.VGG.OUT_FEATURES = out_features


def _resnet(cfg, out_features, deeplab=False):
    cfg.MODEL.BACKBONE.NAME = (
        "build_resnet_deeplab_backbone" if deeplab else "build_resnet_backbone"
    )
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    r = cfg.MODEL.RESNETS
    r.NORM, r.OUT_FEATURES = "BN", out_features
    if deeplab:  # detectron2.projects.deeplab's ResNet: bottleneck depths only; narrow R50
        r.DEPTH, r.STEM_OUT_CHANNELS, r.WIDTH_PER_GROUP, r.RES2_OUT_CHANNELS = 50, 8, 4, 16
        r.STEM_TYPE, r.RES5_DILATION, r.RES5_MULTI_GRID = "basic", 2, [1, 2, 4]
    else:  # detectron2's ResNet-18 (RES2_OUT_CHANNELS must be 64 there)
        r.DEPTH, r.RES2_OUT_CHANNELS = 18, 64


def _unet_encoder(cfg, padding, channels=(8, 8, 16, 16, 16)):
    cfg.MODEL.BACKBONE.NAME = "build_unet_encoder_backbone"
    cfg.MODEL.UNET_ENCODER.CHANNELS = list(channels)
    cfg.MODEL.UNET_ENCODER.PADDING = padding
    cfg.MODEL.UNET_ENCODER.NORM = "BN"


def tiny_semantic_cfg(head: str, backbone: str, num_classes: int = 4):
    """A Seg2SemanticSegmentor config with narrow layers: ``head`` on ``backbone``."""
    cfg = base_cfg()
    cfg.MODEL.META_ARCHITECTURE = "Seg2SemanticSegmentor"
    cfg.MODEL.PIXEL_STD = [57.0, 57.0, 57.0]
    sem = cfg.MODEL.SEM_SEG_HEAD
    sem.NAME = head
    sem.NUM_CLASSES, sem.IGNORE_VALUE, sem.LOSS_TYPE, sem.NORM = (
        num_classes,
        255,
        "cross_entropy",
        "BN",
    )
    res = ["res2", "res3", "res4", "res5"]
    if head == "FCNHead":
        if backbone in ("vgg", "vgg_pad100"):
            _vgg(cfg, ["pool3", "pool4", "fc7"], pad100=backbone == "vgg_pad100")
            sem.IN_FEATURES = ["pool3", "pool4", "fc7"]
        else:
            _resnet(cfg, res, deeplab=backbone == "deeplab_resnet")
            sem.IN_FEATURES = ["res3", "res4", "res5"]
    elif head == "UNetHead":
        if backbone.startswith("unet"):
            padding = backbone.split("_")[1]
            _unet_encoder(cfg, padding, (8, 8, 16) if padding == "valid" else (8, 8, 16, 16, 16))
            sem.IN_FEATURES = [
                f"enc{i}" for i in range(1, len(cfg.MODEL.UNET_ENCODER.CHANNELS) + 1)
            ]
            cfg.MODEL.UNET_HEAD.PADDING = padding
        else:
            _resnet(cfg, res, deeplab=backbone == "deeplab_resnet")
            sem.IN_FEATURES = res
            cfg.MODEL.UNET_HEAD.DECODER_CHANNELS = [16, 16, 16]
        cfg.MODEL.UNET_HEAD.NORM = "BN"
    elif head == "SegNetHead":
        if backbone == "vgg":
            _vgg(cfg, VGG_MAPS + VGG_INDICES, fc_dim=0)
            sem.IN_FEATURES = VGG_MAPS + VGG_INDICES
        else:
            _resnet(cfg, res, deeplab=backbone == "deeplab_resnet")
            sem.IN_FEATURES = res
            cfg.MODEL.SEGNET_HEAD.NUM_CONVS = [2, 2, 2]
            cfg.MODEL.SEGNET_HEAD.UPSAMPLE = "bilinear"
    elif head == "Seg2DeepLabV3PlusHead":
        _resnet(cfg, ["res2", "res5"], deeplab=backbone == "deeplab_resnet")
        sem.IN_FEATURES, sem.PROJECT_FEATURES, sem.PROJECT_CHANNELS = (
            ["res2", "res5"],
            ["res2"],
            [8],
        )
        sem.ASPP_CHANNELS, sem.CONVS_DIM, sem.ASPP_DILATIONS, sem.ASPP_DROPOUT = (
            16,
            16,
            [2, 4, 6],
            0.0,
        )
        sem.COMMON_STRIDE = 4
    else:
        raise ValueError(head)
    return cfg


def load_records(root, split="train"):
    return load_coco_with_sem_seg(
        os.path.join(root, "coco", "annotations", f"instances_{split}.json"),
        os.path.join(root, "coco", split),
        os.path.join(root, "VOC2012", "SegmentationClass"),
    )


def mapped_inputs(cfg, records, size=64):
    """Records through seg2's training mapper, at their own size, without random flips."""
    cfg = cfg.clone()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (size,), size
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.CROP.ENABLED = False
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = (
        4  # background + the 3 shapes: the label values the mapper accepts
    )
    mapper = MultiTaskDatasetMapper(cfg, True)
    return [mapper(r) for r in records]


def miou(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore: int = 255) -> float:
    """Mean IoU over the classes present in prediction or ground truth (ignore excluded)."""
    valid = gt != ignore
    ious = []
    for c in range(num_classes):
        p, g = (pred == c) & valid, (gt == c) & valid
        union = (p | g).sum().item()
        if union:
            ious.append((p & g).sum().item() / union)
    return sum(ious) / len(ious)


def register_tiny_shapes(name: str, root: str, split: str, thing_classes=seg2.data.SHAPES_CLASSES):
    """Register the ``split`` of a generated shapes ``root`` (``tiny_shapes_root``) as a COCO
    dataset with label maps under ``name``; ``thing_classes=None`` leaves them to the JSON."""
    return seg2.data.register_coco_with_sem_seg(
        name,
        os.path.join(root, "coco", "annotations", f"instances_{split}.json"),
        os.path.join(root, "coco", split),
        os.path.join(root, "VOC2012", "SegmentationClass"),
        thing_classes=thing_classes,
    )


def leave_process_group():
    """The end of a worker under detectron2's ``launch``: every process waits for the others, the
    process groups are destroyed and the worker process ends there (exit status 0). Nothing
    without a process group (the same function run in the test's own process).

    A worker that returns normally tears its gloo groups down in interpreter finalization:
    ``launch`` never destroys them, and even after ``destroy_process_group`` detectron2's ``comm``
    keeps references (its local group, its cached gloo group), so the last reference goes only
    then, and gloo's threads can abort the process ("terminate called without an active
    exception", SIGABRT; seen in 1 of 8 runs of test_evaluation_distributed.py with the destroy
    alone). Whatever a worker has to hand back it writes to a file before this."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        comm.synchronize()
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def import_tool(module: str, folder: str = "tools"):
    """A module of ``tools/`` imported as its script sees it: ``folder`` (relative to the checkout)
    first on ``sys.path`` while it imports, so that its sibling imports resolve, e.g.
    ``import_tool("ablation.runner")``, ``import_tool("benchmark", "tools/benchmarks")``."""
    path = os.path.join(REPO_ROOT, folder)
    sys.path.insert(0, path)
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(path)
