"""seg2's config keys, added to a detectron2 CfgNode by :func:`add_seg2_config`."""

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_seg2_config(cfg):
    """
    Add seg2's config keys to ``cfg`` (in place). Only adds keys; changes no existing value.

    Args:
        cfg (CfgNode): a detectron2 config, e.g. from ``detectron2.config.get_cfg()``.
    """
    cfg.SEG2 = CN()
    # Where the synthetic "seg2_shapes" dataset is generated and cached. Empty: the environment
    # variable SEG2_SHAPES_ROOT, else $DETECTRON2_DATASETS/seg2_shapes (default
    # datasets/seg2_shapes).
    # The panoptic variant (seg2_shapes_panoptic_*) goes beside it, into <that folder>_panoptic.
    cfg.SEG2.SHAPES_ROOT = ""
    # Training data (seg2.data.MultiTaskDatasetMapper): an image or label map that cannot be
    # decoded (empty, truncated, not an image) is skipped with a warning naming it, and detectron2
    # maps another sample instead. More unreadable files than this share of the files a loader
    # read (judged over at least 100 files, or the whole dataset if smaller) stop the run with an
    # error; 0 stops at the first. Evaluation always stops at an unreadable file.
    cfg.DATALOADER.MAX_BAD_SAMPLE_SHARE = 0.05
    # With INPUT.CROP.ENABLED and TYPE "absolute": pad each training crop to the full crop size
    # (image with 0, semantic map with MODEL.SEM_SEG_HEAD.IGNORE_VALUE), as DeepLab does for
    # images smaller than it. INPUT.CROP.SINGLE_CATEGORY_MAX_AREA is detectron2's DeepLab key.
    cfg.INPUT.CROP.PAD_TO_SIZE = False
    # Evaluation (seg2.evaluation, used by build_evaluator / tools/train_net.py).
    cfg.SEG2.EVALUATION = CN()
    # MIoUEvaluator: also report detectron2's boundary IoU per class.
    cfg.SEG2.EVALUATION.BOUNDARY_IOU = False
    # MaskAPEvaluator: "detectron2_fast" (C++ COCOeval_opt) or "pycocotools" (reference COCOeval).
    cfg.SEG2.EVALUATION.MASK_AP_BACKEND = "detectron2_fast"
    # MaskAPEvaluator: size range (APs/APm/APl) of a segm detection by its "box" area (pycocotools'
    # COCOeval on results with a box and a mask) or its "mask" area (detectron2's COCOEvaluator).
    cfg.SEG2.EVALUATION.SEGM_AREA = "box"
    # The semantic inference mode of seg2's meta-architectures (as MMSegmentation's
    # test_cfg.mode): whole image, or overlap-tile ("slide") with ENABLED. Read by the model
    # itself, so Trainer.test, TTA, the predictor, the demo and the benchmarks give one answer.
    # Tiles of TILE_SIZE output pixels every STRIDE pixels, BATCH_SIZE tiles per forward pass,
    # overlapping logits blended by BLEND ("average", "linear" or "gaussian": weights falling off
    # towards the tile edges). STRIDE is rounded down to a multiple of the backbone's largest
    # feature stride (when that fits in a tile) so tiles keep the pooling grid of the whole image.
    # MARGIN: context pixels around each tile of a "same"-padding model (mirror-padded outside
    # the image); "valid"-padding U-Nets use their own. Bad geometry fails when the model is built.
    cfg.TEST.TILING = CN()
    cfg.TEST.TILING.ENABLED = False
    cfg.TEST.TILING.TILE_SIZE = 512
    cfg.TEST.TILING.STRIDE = 384
    cfg.TEST.TILING.BATCH_SIZE = 4
    cfg.TEST.TILING.BLEND = "gaussian"
    cfg.TEST.TILING.MARGIN = 0
    # Test-time augmentation (TEST.AUG.ENABLED): scales as ratios of the test size (of the size
    # INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST resize to, or of the image's own size where
    # MIN_SIZE_TEST is 0), as MMSegmentation's img_ratios (its default here), for every model;
    # () uses detectron2's TEST.AUG.MIN_SIZES / MAX_SIZE (pixels) instead. Setting both is an error.
    cfg.TEST.AUG.SCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    # The optimizer (seg2.engine.optimizer.build_optimizer, which seg2's Trainer uses): what the
    # biases (shifts) of norm layers get. "bias": SOLVER.BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS, as
    # detectron2 gives every parameter named "bias"; "norm": SOLVER.BASE_LR and WEIGHT_DECAY_NORM,
    # as their weights (Caffe's BN layer in SegNet's prototxts, whose conv biases alone have
    # lr_mult 2 and decay_mult 0).
    cfg.SOLVER.NORM_BIAS_HYPERPARAMS = "bias"
    # Keep the best model of a run in OUTPUT_DIR/model_best.pth (detectron2's BestCheckpointer),
    # judged after each evaluation (TEST.EVAL_PERIOD, and at the end). METRIC: a key of the
    # flattened evaluation results, e.g. "segm/AP" or "sem_seg/mIoU" ("<dataset>/segm/AP" with
    # several test sets); empty: off. MODE: "max" or "min". METRICS and WEIGHTS (same length):
    # track the weighted sum of these results instead, stored under the name METRIC (e.g.
    # "combined/score" for 0.5 * segm/AP + 0.5 * sem_seg/mIoU of the multi-task model).
    cfg.SEG2.BEST_CHECKPOINT = CN()
    cfg.SEG2.BEST_CHECKPOINT.METRIC = ""
    cfg.SEG2.BEST_CHECKPOINT.MODE = "max"
    cfg.SEG2.BEST_CHECKPOINT.METRICS = []
    cfg.SEG2.BEST_CHECKPOINT.WEIGHTS = []
    # After training, evaluate the best model (model_best.pth) on these datasets, which must not be
    # in DATASETS.TEST: choose on a validation set, report once on a test set (results in
    # OUTPUT_DIR/model_best_test.json; tools/ablate.py reports them). Empty: off.
    cfg.SEG2.BEST_CHECKPOINT.TEST_DATASETS = ()
    _add_modeling_config(cfg)
    _register_renamed_keys(cfg)


# Keys of earlier seg2 versions -> (the key that replaced it, a note). A user's config that still
# sets one gets yacs' KeyError naming the replacement (load_seg2_config: a Seg2Error). A YAML file
# that nests a removed node reaches yacs as that node's key, hence SEG2.ROI_POOLER itself.
_TILING_KEYS = ("ENABLED", "TILE_SIZE", "STRIDE", "BATCH_SIZE", "BLEND", "MARGIN")
_RENAMED_KEYS = {
    "SEG2.INPUT.IGNORE_LABEL": (
        "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",
        "detectron2's key, which the semantic head's loss and seg2's mapper read; it must equal "
        "the "
        "datasets' metadata ignore_label (255 for seg2's datasets).",
    ),
    "SEG2.INPUT.SINGLE_CATEGORY_MAX_AREA": (
        "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA",
        "the key of detectron2's DeepLab project (add_deeplab_config), which seg2 adds.",
    ),
    "SEG2.INPUT.NUM_SEM_SEG_CLASSES": (
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        "seg2 has no class count of its own any more: the resolve step checks it against the "
        "datasets' metadata stuff_classes.",
    ),
    "SEG2.INPUT.PAD_TO_CROP_SIZE": ("INPUT.CROP.PAD_TO_SIZE", None),
    "SEG2.INPUT": (
        "detectron2's nodes",
        "SEG2.INPUT.PAD_TO_CROP_SIZE is now INPUT.CROP.PAD_TO_SIZE, SEG2.INPUT.IGNORE_LABEL "
        "MODEL.SEM_SEG_HEAD.IGNORE_VALUE, SEG2.INPUT.SINGLE_CATEGORY_MAX_AREA "
        "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA, SEG2.INPUT.NUM_SEM_SEG_CLASSES "
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES.",
    ),
    "SEG2.DATALOADER.MAX_BAD_SAMPLE_SHARE": ("DATALOADER.MAX_BAD_SAMPLE_SHARE", None),
    "SEG2.DATALOADER": (
        "DATALOADER.MAX_BAD_SAMPLE_SHARE",
        "SEG2.DATALOADER.MAX_BAD_SAMPLE_SHARE is now DATALOADER.MAX_BAD_SAMPLE_SHARE.",
    ),
    "SEG2.SOLVER.NORM_BIAS_HYPERPARAMS": ("SOLVER.NORM_BIAS_HYPERPARAMS", None),
    "SEG2.SOLVER": (
        "SOLVER.NORM_BIAS_HYPERPARAMS",
        "SEG2.SOLVER.NORM_BIAS_HYPERPARAMS is now SOLVER.NORM_BIAS_HYPERPARAMS.",
    ),
    **{f"SEG2.TILING.{k}": (f"TEST.TILING.{k}", None) for k in _TILING_KEYS},
    "SEG2.TILING": ("TEST.TILING", "every SEG2.TILING.<KEY> is now TEST.TILING.<KEY>."),
    "SEG2.ROI_POOLER.BOX_AGGREGATION": ("MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION", None),
    "SEG2.ROI_POOLER.MASK_AGGREGATION": ("MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION", None),
    "SEG2.ROI_POOLER": (
        "MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION and MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION",
        "SEG2.ROI_POOLER.BOX_AGGREGATION is now MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION, "
        "SEG2.ROI_POOLER.MASK_AGGREGATION is now MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION.",
    ),
}


def _register_renamed_keys(cfg):
    """Register :data:`_RENAMED_KEYS` with yacs (once per config)."""
    for old, (new, note) in _RENAMED_KEYS.items():
        if not cfg.key_is_renamed(old):
            cfg.register_renamed_key(old, new, message=note)


def _add_modeling_config(cfg):
    """Keys of seg2's backbones, semantic and RoI heads and meta-architectures (seg2.modeling)."""
    # detectron2.projects.deeplab's keys (ASPP, low-level projection, DeepLab ResNet), which the
    # DeepLabV3+ heads read; added only where absent so add_deeplab_config may come first.
    if not hasattr(cfg.MODEL.SEM_SEG_HEAD, "ASPP_CHANNELS"):
        from detectron2.projects.deeplab import add_deeplab_config

        add_deeplab_config(cfg)
    # RoI pooler aggregation of ExtendedPoolerStandardROIHeads / ExtendedPoolerRes5ROIHeads, next
    # to detectron2's POOLER_TYPE (which may also be "ROIWarp" there): "avg", "max", or "" for the
    # type's natural one (max for ROIPool, avg for the bilinear types).
    cfg.MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION = ""
    cfg.MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION = ""
    # VGG (build_vgg_backbone), as FCN (fc6/fc7 as convs) and SegNet (pooling indices) use it.
    cfg.MODEL.VGG = CN()
    cfg.MODEL.VGG.DEPTH = 16
    cfg.MODEL.VGG.CHANNELS = [64, 128, 256, 512, 512]  # per stage
    cfg.MODEL.VGG.NORM = ""  # "" (VGG, FCN) or "BN" (VGG-BN, SegNet), or any detectron2 norm
    cfg.MODEL.VGG.FC_DIM = 4096  # fc6/fc7 channels; 0: no fc layers
    cfg.MODEL.VGG.FC_DROPOUT = 0.5
    # FCN's pad-100-and-crop: conv1_1 padded by 100, ceil-mode pooling, fc6 unpadded.
    cfg.MODEL.VGG.FCN_PAD100 = False
    # conv{1..5}, pool{1..5}, pool{1..5}_indices, fc7; [] for all.
    cfg.MODEL.VGG.OUT_FEATURES = []
    # The classic U-Net contracting path (build_unet_encoder_backbone).
    cfg.MODEL.UNET_ENCODER = CN()
    cfg.MODEL.UNET_ENCODER.CHANNELS = [
        64,
        128,
        256,
        512,
        1024,
    ]  # enc1 (stride 1) ... enc5 (stride 16)
    cfg.MODEL.UNET_ENCODER.PADDING = "valid"  # "valid" (the paper) or "same"
    cfg.MODEL.UNET_ENCODER.NORM = ""
    cfg.MODEL.UNET_ENCODER.OUT_FEATURES = []  # [] for all
    # Heads (MODEL.SEM_SEG_HEAD.NAME); NUM_CLASSES, IN_FEATURES, IGNORE_VALUE, LOSS_WEIGHT are
    # detectron2's MODEL.SEM_SEG_HEAD keys. UPSAMPLE: "deconv" (transposed conv, bilinear init),
    # "bilinear", "nearest_conv", "bilinear_conv" (resize then 3x3 conv) or "unpool" (SegNet).
    cfg.MODEL.FCN_HEAD = CN()
    cfg.MODEL.FCN_HEAD.UPSAMPLE = "deconv"
    cfg.MODEL.FCN_HEAD.LEARN_FINAL_UPSAMPLE = True  # the paper keeps the last one fixed (False)
    # UPSAMPLE "deconv": each transposed conv's kernel is this times its factor (FCN's 2: 4, 16, 64;
    # the SegNet paper's FCN-Basic: 4, i.e. 8x8 for its 2x steps).
    cfg.MODEL.FCN_HEAD.DECONV_KERNEL_MULTIPLE = 2
    cfg.MODEL.UNET_HEAD = CN()
    cfg.MODEL.UNET_HEAD.UPSAMPLE = "deconv"  # the paper's 2x2 up-conv
    cfg.MODEL.UNET_HEAD.PADDING = "same"  # or "valid" (with Seg2SemanticSegmentor's overlap-tile)
    cfg.MODEL.UNET_HEAD.DECODER_CHANNELS = []  # per up step, deepest first; []: the skips' channels
    cfg.MODEL.UNET_HEAD.NORM = ""
    cfg.MODEL.SEGNET_HEAD = CN()
    cfg.MODEL.SEGNET_HEAD.UPSAMPLE = "unpool"
    cfg.MODEL.SEGNET_HEAD.NUM_CONVS = [3, 3, 3, 2, 2]  # per decoder stage, deepest first (VGG16)
    cfg.MODEL.SEGNET_HEAD.CLASSIFIER_KERNEL = 3
    cfg.MODEL.SEGNET_HEAD.NORM = "BN"
    # SegNet-Basic's decoder: KERNEL_SIZE 7, no ReLU after the decoder convs, and a separate
    # classifier (CLASSIFIER_KERNEL) after the last stage's convs instead of its last conv being it.
    cfg.MODEL.SEGNET_HEAD.KERNEL_SIZE = 3
    cfg.MODEL.SEGNET_HEAD.DECODER_RELU = True
    cfg.MODEL.SEGNET_HEAD.SEPARATE_CLASSIFIER = False
    # "none", or "add": after up-sampling into a stage, add that stage's encoder features (FCN-Basic
    # of the SegNet paper, with UPSAMPLE "deconv"); a 1x1 conv matches channels where they differ.
    cfg.MODEL.SEGNET_HEAD.SKIP = "none"
    # The SegNet-Basic encoder (build_segnet_basic_backbone): input LRN, NUM_STAGES x [conv
    # KERNEL_SIZE x KERNEL_SIZE, CHANNELS + NORM + ReLU + 2x2 max-pool with indices].
    cfg.MODEL.SEGNET_BASIC = CN()
    cfg.MODEL.SEGNET_BASIC.CHANNELS = 64
    cfg.MODEL.SEGNET_BASIC.KERNEL_SIZE = 7
    cfg.MODEL.SEGNET_BASIC.NUM_STAGES = 4
    cfg.MODEL.SEGNET_BASIC.INPUT_LRN = True
    cfg.MODEL.SEGNET_BASIC.NORM = "BN"
    cfg.MODEL.SEGNET_BASIC.OUT_FEATURES = []  # [] for all
    cfg.MODEL.DEEPLAB_HEAD = CN()
    cfg.MODEL.DEEPLAB_HEAD.UPSAMPLE = "bilinear"  # Seg2DeepLabV3PlusHead
    # Seg2MultiTaskRCNN: weight of the RPN + RoI-head losses (the semantic loss is weighted by
    # MODEL.SEM_SEG_HEAD.LOSS_WEIGHT).
    cfg.MODEL.MULTITASK = CN()
    cfg.MODEL.MULTITASK.INSTANCE_LOSS_WEIGHT = 1.0
    # The semantic loss of every seg2 head (seg2.modeling.losses), also inside Seg2MultiTaskRCNN.
    # detectron2's MODEL.SEM_SEG_HEAD.LOSS_TYPE picks it: "cross_entropy", "hard_pixel_mining",
    # "focal", "dice", "lovasz" or a sum such as "cross_entropy+dice"; IGNORE_VALUE is left out.
    # LOSS_TOP_K: fraction of the labelled pixels "hard_pixel_mining" keeps (detectron2's DeepLab:
    # 0.2).
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TOP_K = 0.2
    # FOCAL_GAMMA: the focusing parameter of "focal" (Lin et al.: 2).
    cfg.MODEL.SEM_SEG_HEAD.FOCAL_GAMMA = 2.0
    # Class weights of the per-pixel terms (cross_entropy, hard_pixel_mining, focal): CLASS_WEIGHT,
    # one value per class, or CLASS_WEIGHTING "median_frequency" (SegNet) / "inverse_frequency":
    # counted from DATASETS.TRAIN's label maps by the resolve step (seg2.resolve_config) before the
    # model is built, cached (seg2.data.class_weights), and written into CLASS_WEIGHT, so a run's
    # config.yaml holds the weights it used; a config with both keeps CLASS_WEIGHT as given.
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHT = []
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = ""
    # What class-weighted cross_entropy / focal divide by: "weights" (PyTorch: sum of the weights
    # of the labelled pixels) or "pixels" (SegNet's Caffe SoftmaxWithLoss: their count).
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHT_NORMALIZATION = "weights"


def load_seg2_config(config_file: str, opts=()):
    """
    The config of ``config_file`` with ``opts`` (``KEY VALUE ...``) applied, unfrozen: detectron2's
    defaults, seg2's keys, then the file. The tools share this.

    Raises:
        Seg2Error: an unknown key, an odd override list or a type mismatch, naming the file.
    """
    from .utils import Seg2Error

    cfg = get_cfg()
    add_seg2_config(cfg)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError, OSError) as e:
        # yacs reports unknown or renamed keys, odd override lists and type mismatches this way.
        detail = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) adds quotes
        raise Seg2Error(f"bad config ({config_file}, overrides {list(opts)}): {detail}") from e
    return cfg
