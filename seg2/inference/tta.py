"""
Test-time augmentation (multi-scale + horizontal flip) of the semantic output, configured by
detectron2's own ``TEST.AUG.*`` keys (``ENABLED``, ``MIN_SIZES``, ``MAX_SIZE``, ``FLIP``) and
built on detectron2's :class:`DatasetMapperTTA`; the instance branch of
:class:`seg2.modeling.meta_arch.Seg2MultiTaskRCNN` goes through detectron2's
:class:`GeneralizedRCNNWithTTA`.

Each augmented image's logits (tiled with ``SEG2.TILING`` when enabled: every scale is tiled)
are flipped back, resized to the original image size as the model's own post-processing does
(bilinear, ``sem_seg_postprocess``) and averaged. Logits, not probabilities, are averaged: the
output stays what the models output without TTA ((K, H, W) logits, so evaluators and users
take the argmax or a softmax of it as before), and a mean of logits is the normalised geometric
mean of the augmentations' probabilities (a product of experts), which the argmax of the mean
reflects; averaging probabilities instead is a mean of experts. Both are common (detectron2's
instance TTA averages mask probabilities, MMSegmentation softmax outputs).
"""

from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data.detection_utils import read_image
from detectron2.modeling import DatasetMapperTTA, GeneralizedRCNNWithTTA
from detectron2.modeling.postprocessing import sem_seg_postprocess
from fvcore.transforms import HFlipTransform
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..modeling.tasks import model_tasks
from ..utils import Seg2Error
from .tiling import TiledSemSegInference, _sem_seg_logits_of

__all__ = ["MultiTaskRCNNWithTTA", "SemanticSegmentorWithTTA", "build_tta_model"]


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
    def __init__(self, model, *, tta_mapper, tiler: Optional[TiledSemSegInference] = None, input_format: str = "BGR"):
        """
        Args:
            model (nn.Module): in eval mode; ``Seg2SemanticSegmentor``, ``Seg2MultiTaskRCNN``
                (its semantic branch), any model with ``sem_seg_logits(images, context)``, or
                detectron2's ``SemanticSegmentor``.
            tta_mapper (callable): a dataset dict -> its augmented versions, each with
                "transforms" (detectron2's :class:`DatasetMapperTTA`: resizes and flips).
            tiler (TiledSemSegInference or None): tiles each augmented image when given.
            input_format (str): of images read from "file_name" when "image" is missing.
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.model = model
        self.sem_seg_logits = _sem_seg_logits_of(model)
        self.tta_mapper = tta_mapper
        self.tiler = tiler
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg, model):
        return {
            "model": model,
            "tta_mapper": DatasetMapperTTA(cfg),
            "tiler": TiledSemSegInference(cfg, model) if cfg.SEG2.TILING.ENABLED else None,
            "input_format": cfg.INPUT.FORMAT,
        }

    @torch.no_grad()
    def sem_seg(self, dataset_dict: dict) -> torch.Tensor:
        """(K, height, width) logits of one input (with "image", "height", "width"): the mean over
        its augmented versions of their logits, flipped back and resized to height x width."""
        height, width = dataset_dict["height"], dataset_dict["width"]
        augmented = self.tta_mapper(dataset_dict)
        flips = [any(isinstance(t, HFlipTransform) for t in x.pop("transforms").transforms) for x in augmented]
        # Untiled: the augmented images of one size (a scale and its flip) run as one batch.
        by_size: Dict[tuple, List[int]] = {}
        for i, x in enumerate(augmented):
            by_size.setdefault(tuple(x["image"].shape[-2:]), []).append(i)
        total = None
        for (h, w), index in by_size.items():
            if self.tiler is not None:
                batch = [self.tiler(augmented[i]["image"], output="logits") for i in index]
            else:
                batch = self.sem_seg_logits(torch.stack([augmented[i]["image"] for i in index]), (0, 0, 0, 0))
            for i, logits in zip(index, batch):
                if flips[i]:
                    logits = logits.flip(-1)
                logits = sem_seg_postprocess(logits, (h, w), height, width)
                total = logits if total is None else total.add_(logits)
        return total.div_(len(augmented))

    def forward(self, batched_inputs: List[dict]) -> List[dict]:
        return [{"sem_seg": self.sem_seg(_with_image(x, self.input_format))} for x in batched_inputs]


class MultiTaskRCNNWithTTA(GeneralizedRCNNWithTTA):
    """
    Test-time augmentation of :class:`seg2.modeling.meta_arch.Seg2MultiTaskRCNN` (Mask R-CNN,
    He et al., ICCV 2017, plus a semantic head): instances by detectron2's
    ``GeneralizedRCNNWithTTA`` (boxes merged over the augmentations, masks averaged), the
    semantic logits by :class:`SemanticSegmentorWithTTA` with the same ``TEST.AUG`` augmentations;
    "panoptic_seg", when the model combines them, is its merge of those two augmented outputs.
    """

    def __init__(self, cfg, model, tta_mapper=None, batch_size=3):
        super().__init__(cfg, model, tta_mapper=tta_mapper, batch_size=batch_size)
        self.semantic = SemanticSegmentorWithTTA(cfg, self.model)
        if tta_mapper is not None:
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
    if not cfg.TEST.AUG.MIN_SIZES:
        raise Seg2Error("TEST.AUG.MIN_SIZES=(): test-time augmentation needs at least one scale")
    tasks = model_tasks(cfg)
    if "sem_seg" in tasks and "instances" in tasks:
        if not hasattr(model, "sem_seg_logits"):
            raise Seg2Error(
                f"TEST.AUG.ENABLED: MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} has no semantic TTA; "
                "use Seg2MultiTaskRCNN for instances + semantic logits"
            )
        return MultiTaskRCNNWithTTA(cfg, model)
    if "sem_seg" in tasks:
        try:
            return SemanticSegmentorWithTTA(cfg, model)
        except ValueError as e:
            raise Seg2Error(f"TEST.AUG.ENABLED: MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r}: {e}") from None
    return GeneralizedRCNNWithTTA(cfg, model)
