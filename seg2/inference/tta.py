"""
Test-time augmentation (multi-scale + horizontal flip) of the semantic output, configured by
``TEST.AUG.*`` (``ENABLED``, ``FLIP``, and the scales: seg2's ``SCALE_RATIOS``, ratios of the
test size as MMSegmentation's ``img_ratios``, or detectron2's ``MIN_SIZES`` / ``MAX_SIZE`` in
pixels when ``SCALE_RATIOS`` is empty), built on detectron2's :class:`DatasetMapperTTA`; the
instance branch of :class:`seg2.modeling.meta_arch.Seg2MultiTaskRCNN` and other R-CNNs go
through detectron2's :class:`GeneralizedRCNNWithTTA` with the same scales.

Each augmented image's logits (in the model's inference mode: tiled with ``TEST.TILING``)
are flipped back, resized to the original image size as the model's own post-processing does
(bilinear, ``sem_seg_postprocess``) and averaged. Logits, not probabilities, are averaged: the
output stays what the models output without TTA ((K, H, W) logits, so evaluators and users
take the argmax or a softmax of it as before), and a mean of logits is the normalised geometric
mean of the augmentations' probabilities (a product of experts), which the argmax of the mean
reflects; averaging probabilities instead is a mean of experts. Both are common (detectron2's
instance TTA averages mask probabilities, MMSegmentation softmax outputs).
"""

import copy
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.modeling import DatasetMapperTTA, GeneralizedRCNNWithTTA, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from fvcore.transforms import HFlipTransform
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.image import read_image
from ..modeling.meta_arch.semantic_segmentor import semantic_inference
from ..tasks import model_tasks
from ..utils import Seg2Error

__all__ = [
    "MultiTaskRCNNWithTTA",
    "ScaleRatioMapperTTA",
    "SemanticSegmentorWithTTA",
    "build_tta_model",
]

# detectron2's default TEST.AUG.MIN_SIZES / MAX_SIZE: a config that changes them while
# TEST.AUG.SCALE_RATIOS is set asks for two scale sets.
_D2_MIN_SIZES = (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)
_D2_MAX_SIZE = 4000


class ScaleRatioMapperTTA(DatasetMapperTTA):
    """
    detectron2's ``DatasetMapperTTA`` with scales given as ratios of the test size (as
    MMSegmentation's ``img_ratios``): for each ratio r, the image is resized to r times the size
    ``ResizeShortestEdge(min_size_test, max_size_test)`` gives it (r times its own size where
    ``min_size_test`` is 0), then flipped if ``flip``.
    """

    @configurable
    def __init__(
        self, ratios: Tuple[float, ...], min_size_test: int, max_size_test: int, flip: bool
    ):
        if not ratios or any(not r > 0 for r in ratios):
            raise Seg2Error(f"TEST.AUG.SCALE_RATIOS={tuple(ratios)}: expected positive ratios")
        self.ratios, self.flip = tuple(ratios), flip
        self.min_size_test, self.max_size_test = min_size_test, max_size_test

    @classmethod
    def from_config(cls, cfg):
        return {
            "ratios": tuple(cfg.TEST.AUG.SCALE_RATIOS),
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
            "flip": cfg.TEST.AUG.FLIP,
        }

    def __call__(self, dataset_dict):
        image = dataset_dict["image"].permute(1, 2, 0).numpy()
        h, w = image.shape[:2]
        if self.min_size_test > 0:
            scale = self.min_size_test / min(h, w)
            if self.max_size_test > 0 and max(h, w) * scale > self.max_size_test:
                scale = self.max_size_test / max(h, w)
        else:
            scale = 1.0
        ret = []
        for r in self.ratios:
            nh, nw = max(1, int(h * scale * r + 0.5)), max(1, int(w * scale * r + 0.5))
            for flipped in (False, True) if self.flip else (False,):
                aug = T.AugmentationList([T.Resize((nh, nw))] + ([T.HFlip()] if flipped else []))
                aug_input = T.AugInput(np.copy(image))
                transforms = aug(aug_input)
                d = copy.copy(dataset_dict)
                d["transforms"] = transforms
                d["image"] = torch.from_numpy(
                    np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))
                )
                ret.append(d)
        return ret


def build_tta_mapper(cfg):
    """The TTA mapper of ``TEST.AUG``: :class:`ScaleRatioMapperTTA` when ``SCALE_RATIOS`` is set,
    else detectron2's ``DatasetMapperTTA`` (``MIN_SIZES`` / ``MAX_SIZE``)."""
    aug = cfg.TEST.AUG
    if not aug.SCALE_RATIOS:
        if not aug.MIN_SIZES:
            raise Seg2Error(
                "TEST.AUG.MIN_SIZES=() with TEST.AUG.SCALE_RATIOS=(): test-time augmentation "
                "needs a scale"
            )
        return DatasetMapperTTA(cfg)
    if tuple(aug.MIN_SIZES) != _D2_MIN_SIZES or aug.MAX_SIZE != _D2_MAX_SIZE:
        raise Seg2Error(
            f"TEST.AUG.SCALE_RATIOS={tuple(aug.SCALE_RATIOS)} and "
            f"TEST.AUG.MIN_SIZES={tuple(aug.MIN_SIZES)} / "
            f'MAX_SIZE={aug.MAX_SIZE} both give the TTA scales: set TEST.AUG.SCALE_RATIOS "()" to use sizes in pixels'
        )
    return ScaleRatioMapperTTA(cfg)


def _semantic_inference_of(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """(N, C, H, W) raw images -> (N, K, H, W) logits in ``model``'s inference mode: seg2's
    meta-architectures (:func:`semantic_inference`), or detectron2's ``SemanticSegmentor``
    through its own forward."""
    if hasattr(model, "sem_seg_logits"):
        return lambda images: semantic_inference(model, images)
    if isinstance(model, SemanticSegmentor):
        return lambda images: torch.stack(
            [out["sem_seg"] for out in model([{"image": x} for x in images])]
        )
    raise ValueError(
        f"{type(model).__name__} has no semantic TTA: it takes Seg2SemanticSegmentor, "
        "Seg2MultiTaskRCNN and "
        "detectron2's SemanticSegmentor"
    )


def _with_image(dataset_dict: dict, input_format: str) -> dict:
    """A shallow copy of ``dataset_dict`` with "image" (read from "file_name" where missing) and
    "height", "width" (the image's own size where missing), as GeneralizedRCNNWithTTA does."""
    ret = dict(dataset_dict)
    if "image" not in ret:
        image = read_image(ret["file_name"], input_format)
        ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    ret.setdefault("height", ret["image"].shape[-2])
    ret.setdefault("width", ret["image"].shape[-1])
    return ret


class SemanticSegmentorWithTTA(nn.Module):
    """
    Multi-scale + horizontal-flip test-time augmentation of a semantic model's logits (as in
    DeepLab, Chen et al., ECCV 2018). ``__call__`` has the interface of the model's forward in
    inference: list of dicts in, ``[{"sem_seg": (K, height, width) logits}]`` out.
    """

    @configurable
    def __init__(self, model, *, tta_mapper, input_format: str = "BGR"):
        """
        Args:
            model (nn.Module): in eval mode; ``Seg2SemanticSegmentor``, ``Seg2MultiTaskRCNN``
                (its semantic branch; both in their own inference mode, tiled with
                ``TEST.TILING``), or detectron2's ``SemanticSegmentor``.
            tta_mapper (callable): a dataset dict -> its augmented versions, each with
                "transforms" (:func:`build_tta_mapper`: resizes and flips).
            input_format (str): of images read from "file_name" when "image" is missing.
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.model = model
        self.infer = _semantic_inference_of(model)
        self.tta_mapper = tta_mapper
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg, model):
        return {
            "model": model,
            "tta_mapper": build_tta_mapper(cfg),
            "input_format": cfg.INPUT.FORMAT,
        }

    @torch.no_grad()
    def sem_seg(self, dataset_dict: dict) -> torch.Tensor:
        """(K, height, width) logits of one input (with "image", "height", "width"): the mean over
        its augmented versions of their logits, flipped back and resized to height x width."""
        height, width = dataset_dict["height"], dataset_dict["width"]
        augmented = self.tta_mapper(dataset_dict)
        flips = [
            any(isinstance(t, HFlipTransform) for t in x.pop("transforms").transforms)
            for x in augmented
        ]
        # The augmented images of one size (a scale and its flip) run as one batch.
        by_size: Dict[tuple, List[int]] = {}
        for i, x in enumerate(augmented):
            by_size.setdefault(tuple(x["image"].shape[-2:]), []).append(i)
        total = None
        for (h, w), index in by_size.items():
            batch = self.infer(torch.stack([augmented[i]["image"] for i in index]))
            for i, logits in zip(index, batch):
                if flips[i]:
                    logits = logits.flip(-1)
                logits = sem_seg_postprocess(logits, (h, w), height, width)
                total = logits if total is None else total.add_(logits)
        return total.div_(len(augmented))

    def forward(self, batched_inputs: List[dict]) -> List[dict]:
        return [
            {"sem_seg": self.sem_seg(_with_image(x, self.input_format))} for x in batched_inputs
        ]


class MultiTaskRCNNWithTTA(GeneralizedRCNNWithTTA):
    """
    Test-time augmentation of :class:`seg2.modeling.meta_arch.Seg2MultiTaskRCNN` (Mask R-CNN,
    He et al., ICCV 2017, plus a semantic head): instances by detectron2's
    ``GeneralizedRCNNWithTTA`` (boxes merged over the augmentations, masks averaged), the
    semantic logits by :class:`SemanticSegmentorWithTTA` with the same ``TEST.AUG`` augmentations;
    "panoptic_seg", when the model combines them, is its merge of those two augmented outputs.
    """

    def __init__(self, cfg, model, tta_mapper=None, batch_size=3):
        tta_mapper = tta_mapper if tta_mapper is not None else build_tta_mapper(cfg)
        super().__init__(cfg, model, tta_mapper=tta_mapper, batch_size=batch_size)
        self.semantic = SemanticSegmentorWithTTA(cfg, self.model)
        self.semantic.tta_mapper = tta_mapper

    @torch.no_grad()
    def _batch_inference(self, batched_inputs, detected_instances=None):
        # As GeneralizedRCNNWithTTA's, through Seg2MultiTaskRCNN.inference without its semantic
        # head (which returns (instances, sem_seg) when not post-processing); without autograd
        # also outside inference_on_dataset.
        if detected_instances is None:
            detected_instances = [None] * len(batched_inputs)
        outputs = []
        for i in range(0, len(batched_inputs), self.batch_size):
            inputs = batched_inputs[i : i + self.batch_size]
            given = detected_instances[i : i + self.batch_size]
            instances, _ = self.model.inference(
                inputs, given if given[0] is not None else None, do_postprocess=False, sem_seg=False
            )
            outputs.extend(instances)
        return outputs

    def _inference_one_image(self, input):
        out = super()._inference_one_image(input)
        out["sem_seg"] = self.semantic.sem_seg(input)
        if getattr(self.model, "combine_enabled", False):
            # The panoptic merge of the augmented outputs, as the model merges its own.
            labels = out["sem_seg"].argmax(dim=0)
            out["panoptic_seg"] = self.model.combine_panoptic(out["instances"], labels)
        return out


def build_tta_model(cfg, model) -> nn.Module:
    """The ``TEST.AUG`` test-time augmentation of ``model`` for its outputs: semantic models ->
    :class:`SemanticSegmentorWithTTA`, ``Seg2MultiTaskRCNN`` -> :class:`MultiTaskRCNNWithTTA`,
    other ``GeneralizedRCNN`` models -> detectron2's ``GeneralizedRCNNWithTTA``."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    tasks = model_tasks(cfg)
    if "sem_seg" in tasks and "instances" in tasks:
        if not hasattr(model, "sem_seg_logits"):
            raise Seg2Error(
                f"TEST.AUG.ENABLED: MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} has "
                "no semantic TTA; "
                "use Seg2MultiTaskRCNN for instances + semantic logits"
            )
        return MultiTaskRCNNWithTTA(cfg, model)
    if "sem_seg" in tasks:
        try:
            return SemanticSegmentorWithTTA(cfg, model)
        except ValueError as e:
            raise Seg2Error(
                f"TEST.AUG.ENABLED: MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r}: {e}"
            ) from None
    return GeneralizedRCNNWithTTA(cfg, model, tta_mapper=build_tta_mapper(cfg))
