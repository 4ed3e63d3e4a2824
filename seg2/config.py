"""seg2's config keys, added to a detectron2 CfgNode by :func:`add_seg2_config`."""

from detectron2.config import CfgNode as CN


def add_seg2_config(cfg):
    """
    Add seg2's config keys to ``cfg`` (in place). Only adds keys; changes no existing value.

    Args:
        cfg (CfgNode): a detectron2 config, e.g. from ``detectron2.config.get_cfg()``.
    """
    cfg.SEG2 = CN()
    # Where the synthetic "seg2_shapes" dataset is generated and cached. Empty: the environment
    # variable SEG2_SHAPES_ROOT, else $DETECTRON2_DATASETS/seg2_shapes (default datasets/seg2_shapes).
    cfg.SEG2.SHAPES_ROOT = ""
    cfg.SEG2.INPUT = CN()
    # Label-map value excluded from semantic losses and metrics (VOC's void).
    cfg.SEG2.INPUT.IGNORE_LABEL = 255
    # With INPUT.CROP.ENABLED: re-draw a training crop (up to 10 times) while one class covers
    # more than this share of its labelled pixels, as DeepLab does. 1.0 turns the check off.
    cfg.SEG2.INPUT.SINGLE_CATEGORY_MAX_AREA = 1.0
