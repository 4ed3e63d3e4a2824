"""Mask R-CNN with a semantic head on its backbone, trained jointly."""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_sem_seg_head
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage

from ...utils import Seg2Error
from ..tasks import META_ARCH_TASKS
from .common import check_head_features, check_num_classes, check_registered, sem_seg_targets
from .semantic_segmentor import inner_size, needs_no_padding

__all__ = ["Seg2MultiTaskRCNN"]

META_ARCH_TASKS["Seg2MultiTaskRCNN"] = frozenset({"instances", "sem_seg"})


@META_ARCH_REGISTRY.register()
class Seg2MultiTaskRCNN(GeneralizedRCNN):
    """
    Mask R-CNN (He et al., ICCV 2017) plus any registered semantic head on the same backbone,
    trained jointly (as Panoptic FPN, Kirillov et al., CVPR 2019, does with its FPN head).

    Each task's loss is weighted (``MODEL.MULTITASK.INSTANCE_LOSS_WEIGHT`` for the RPN and RoI
    heads, ``MODEL.SEM_SEG_HEAD.LOSS_WEIGHT`` for the semantic head). Images without
    "instances" are left out of the detection losses and images without "sem_seg" out of the
    semantic loss, so datasets that give only one of the two targets train; a batch with
    neither target for a task skips that task's loss. Outputs per image: "instances" and
    "sem_seg" ((C, height, width) logits). :meth:`sem_seg_logits` runs the semantic branch
    alone (tiled inference uses it).
    """

    @configurable
    def __init__(self, *, sem_seg_head: torch.nn.Module, instance_loss_weight: float = 1.0, **kwargs):
        """
        Args:
            sem_seg_head (nn.Module): a semantic head in detectron2's interface.
            instance_loss_weight (float): weight of the RPN and RoI-head losses.
            kwargs: the arguments of detectron2's ``GeneralizedRCNN``.
        """
        super().__init__(**kwargs)
        if getattr(sem_seg_head, "valid_padding", False) or getattr(self.backbone, "valid_padding", False):
            raise Seg2Error(
                "Seg2MultiTaskRCNN needs 'same' padding (MODEL.UNET_HEAD.PADDING / MODEL.UNET_ENCODER.PADDING): "
                "'valid' outputs are smaller than the image the detector sees"
            )
        self.sem_seg_head = sem_seg_head
        self.instance_loss_weight = instance_loss_weight

    @classmethod
    def from_config(cls, cfg):
        check_registered(cfg)
        check_num_classes(cfg, instances=True)
        ret = super().from_config(cfg)
        check_head_features(cfg, ret["backbone"].output_shape())
        ret["sem_seg_head"] = build_sem_seg_head(cfg, ret["backbone"].output_shape())
        ret["instance_loss_weight"] = cfg.MODEL.MULTITASK.INSTANCE_LOSS_WEIGHT
        return ret

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """
        Args:
            batched_inputs (list[dict]): "image"; in training "instances" and/or "sem_seg".

        Returns:
            training: dict of losses; inference: list of ``{"instances", "sem_seg"}``.
        """
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        losses = {}

        targets = sem_seg_targets(batched_inputs, images.tensor.shape[-2:], self.sem_seg_head.ignore_value, self.device)
        if targets is not None:
            _, sem_seg_losses = self.sem_seg_head(features, targets)
            losses.update(sem_seg_losses)

        keep = [i for i, x in enumerate(batched_inputs) if "instances" in x]
        if keep:
            if len(keep) < len(batched_inputs):
                index = torch.as_tensor(keep, device=self.device)
                images = ImageList(images.tensor[index], [images.image_sizes[i] for i in keep])
                features = {k: v[index] for k, v in features.items()}
            gt_instances = [batched_inputs[i]["instances"].to(self.device) for i in keep]
            proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
            _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
            if self.vis_period > 0:
                storage = get_event_storage()
                if storage.iter % self.vis_period == 0:
                    self.visualize_training([batched_inputs[i] for i in keep], proposals)
            for k, v in {**proposal_losses, **detector_losses}.items():
                losses[k] = v * self.instance_loss_weight
        if not losses:
            # No labelled pixel and no image with instances: nothing to learn from this batch.
            losses["loss_sem_seg"] = torch.zeros((), device=self.device, requires_grad=True)
        return losses

    def sem_seg_logits(self, images: torch.Tensor, context: Tuple[int, int, int, int] = (0, 0, 0, 0)) -> torch.Tensor:
        """
        Stride-1 semantic logits of a batch of raw images, as :meth:`inference` computes them:
        ``preprocess_image`` (normalisation, padding to the backbone's size divisibility),
        backbone, semantic head, crop; no detection. Arguments and result as
        :meth:`Seg2SemanticSegmentor.sem_seg_logits`: (N, C, H, W) raw pixels, ``context``
        (top, bottom, left, right) -> (N, K, H - top - bottom, W - left - right) logits.
        """
        top, _, left, _ = context
        h, w = inner_size(images, context)
        if needs_no_padding(images.shape[-2:], self.backbone):
            # No padding needed (e.g. tiles of a fitting size): normalise the batch as it is.
            x = (images.to(self.device) - self.pixel_mean) / self.pixel_std
        else:
            x = self.preprocess_image([{"image": x} for x in images]).tensor
        logits, _ = self.sem_seg_head(self.backbone(x), None)
        return logits[:, :, top : top + h, left : left + w]

    def inference(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
        sem_seg: bool = True,
    ):
        """
        Instances and semantic logits from one backbone pass.

        Args:
            batched_inputs, detected_instances, do_postprocess: as ``GeneralizedRCNN.inference``
                (given instances: the RoI heads predict masks for their boxes, no detection).
            sem_seg (bool): False leaves the semantic head out (e.g. when tiled inference gives
                the semantic map).

        Returns:
            do_postprocess: list of ``{"instances"}`` plus ``"sem_seg"`` ((K, height, width)
            logits) when ``sem_seg``; otherwise (list[Instances], (N, K, H', W') padded logits
            or None).
        """
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if detected_instances is None:
            proposals, _ = self.proposal_generator(images, features, None)
            instances, _ = self.roi_heads(images, features, proposals, None)
        else:
            instances = self.roi_heads.forward_with_given_boxes(features, [x.to(self.device) for x in detected_instances])
        sem_seg_results = self.sem_seg_head(features, None)[0] if sem_seg else None
        if not do_postprocess:
            return instances, sem_seg_results
        processed = []
        for i, (x, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            out = {"instances": detector_postprocess(instances[i], height, width)}
            if sem_seg:
                out["sem_seg"] = sem_seg_postprocess(sem_seg_results[i], image_size, height, width)
            processed.append(out)
        return processed
