"""Mask R-CNN with a semantic head on its backbone, trained jointly."""

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_sem_seg_head
from detectron2.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ...tasks import META_ARCH_TASKS
from ...utils import Seg2Error
from ...utils.dist import check_same_in_all_processes
from ..tiling import TiledSemSegInference, tiling_from_config
from .common import check_head_features, check_registered, sem_seg_targets
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
    semantic loss, so datasets that give only one of the two targets train. A batch with no
    target for a task has no loss for that task: in one process the task is skipped; in several
    processes (``keep_all_branches``) it gets a loss of weight 0 that keeps its branch in the graph
    (see :meth:`forward`). Outputs per image: "instances" and "sem_seg" ((C, height, width)
    logits), and with ``combine_enabled`` "panoptic_seg" exactly as detectron2's PanopticFPN gives
    it (:meth:`combine_panoptic`; the semantic classes in detectron2's separated layout, class 0 =
    all things). :meth:`sem_seg_logits` runs the semantic branch alone (tiled inference uses it).
    """

    @configurable
    def __init__(
        self,
        *,
        sem_seg_head: torch.nn.Module,
        instance_loss_weight: float = 1.0,
        keep_all_branches: Optional[bool] = None,
        tiling: Optional[dict] = None,
        combine_enabled: bool = False,
        combine_overlap_thresh: float = 0.5,
        combine_stuff_area_thresh: float = 4096,
        combine_instances_score_thresh: float = 0.5,
        **kwargs,
    ):
        """
        Args:
            sem_seg_head (nn.Module): a semantic head in detectron2's interface.
            instance_loss_weight (float): weight of the RPN and RoI-head losses.
            keep_all_branches (bool or None): give a task without targets in the batch a loss of
                weight 0 that keeps its parameters in the graph (what DistributedDataParallel
                without ``find_unused_parameters`` needs) instead of skipping it. None: when
                training in several processes (``comm.get_world_size() > 1``).
            combine_enabled (bool): also return "panoptic_seg" (see :meth:`combine_panoptic`);
                the semantic head's class 0 must be all things folded, 1.. the stuff classes.
            combine_overlap_thresh, combine_stuff_area_thresh, combine_instances_score_thresh:
                detectron2's PanopticFPN arguments (``MODEL.PANOPTIC_FPN.COMBINE.OVERLAP_THRESH``,
                ``STUFF_AREA_LIMIT``, ``INSTANCES_CONFIDENCE_THRESH``): an instance is dropped
                when more than this share of it is already taken, stuff regions smaller than this
                many pixels are dropped, instances below this score are dropped.
            kwargs: the arguments of detectron2's ``GeneralizedRCNN``.
        """
        super().__init__(**kwargs)
        if getattr(sem_seg_head, "valid_padding", False) or getattr(
            self.backbone, "valid_padding", False
        ):
            raise Seg2Error(
                "Seg2MultiTaskRCNN needs 'same' padding (MODEL.UNET_HEAD.PADDING / "
                "MODEL.UNET_ENCODER.PADDING): "
                "'valid' outputs are smaller than the image the detector sees"
            )
        self.sem_seg_head = sem_seg_head
        self.instance_loss_weight = instance_loss_weight
        self.keep_all_branches = keep_all_branches
        head_classes = getattr(sem_seg_head, "num_classes", None)
        if combine_enabled and head_classes is not None and head_classes < 2:
            raise Seg2Error(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={head_classes}: the panoptic output "
                "(combine_enabled) needs the separated layout's class 0 = all things and at least "
                "one stuff class"
            )
        self.combine_enabled = combine_enabled
        self.combine_overlap_thresh = combine_overlap_thresh
        self.combine_stuff_area_thresh = combine_stuff_area_thresh
        self.combine_instances_score_thresh = combine_instances_score_thresh
        # Loss names per task, as the branches return them; the detection names are learnt from the
        # first batch that runs the RPN and RoI heads (they depend on the heads: cascade,
        # keypoints).
        self._loss_keys = {"sem_seg": ("loss_sem_seg",), "instances": None}
        self._loss_keys_checked = False
        # A model with synchronised batch norm makes collective calls in its forward and backward
        # passes, which every process must make in the same order: there a branch without targets
        # runs as usual, on stand-in targets, at weight 0 (see forward). Found at the first
        # training step, after any conversion (nn.SyncBatchNorm.convert_sync_batchnorm).
        self._communicates = None
        self.tiler = TiledSemSegInference(self, **tiling) if tiling else None

    # The meta-architecture reads TEST.TILING itself (see Seg2SemanticSegmentor).
    tiles_in_inference = True

    @classmethod
    def from_config(cls, cfg):
        check_registered(cfg)
        tiling = tiling_from_config(cfg)
        ret = super().from_config(cfg)
        check_head_features(cfg, ret["backbone"].output_shape())
        ret["sem_seg_head"] = build_sem_seg_head(cfg, ret["backbone"].output_shape())
        ret["instance_loss_weight"] = cfg.MODEL.MULTITASK.INSTANCE_LOSS_WEIGHT
        ret["tiling"] = tiling
        # Whether to merge a panoptic output is the data's decision, made by the resolve step
        # (seg2.resolve_config), which also checks the class layout: a plain value here.
        combine = cfg.MODEL.PANOPTIC_FPN.COMBINE
        ret["combine_enabled"] = combine.ENABLED
        ret["combine_overlap_thresh"] = combine.OVERLAP_THRESH
        ret["combine_stuff_area_thresh"] = combine.STUFF_AREA_LIMIT
        ret["combine_instances_score_thresh"] = combine.INSTANCES_CONFIDENCE_THRESH
        return ret

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """
        Args:
            batched_inputs (list[dict]): "image"; in training "instances" and/or "sem_seg".

        Returns:
            training: dict of losses; inference: list of ``{"instances", "sem_seg"}`` (and
            "panoptic_seg" with ``combine_enabled``).

        Training in several processes, a task without any target in this process's batch gets
        its usual loss names with the value 0 and a zero gradient for each of its parameters
        (0 x the sum of its parameters and of the backbone features). DistributedDataParallel
        then sees the same parameters used in every process (it needs no
        ``find_unused_parameters``, which detectron2's trainers do not set and which costs a walk
        of the autograd graph at every step) and averages the other processes' gradients with
        these zeros, as it averages any gradient; every process returns the same loss names, as
        detectron2's metric gathering needs. In a model with synchronised batch norm, whose
        forward and backward passes make collective calls that must come in the same order in
        every process, the branch instead runs as usual at weight 0, on stand-in targets (no
        object; every pixel labelled 0). A batch with both targets runs exactly as in one process.
        """
        if not self.training:
            return self.inference(batched_inputs)
        keep_all = (
            self.keep_all_branches
            if self.keep_all_branches is not None
            else comm.get_world_size() > 1
        )
        if self._communicates is None:
            self._communicates = _communicates(self)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        losses = {}

        ignore = self.sem_seg_head.ignore_value
        targets = sem_seg_targets(batched_inputs, images.tensor.shape[-2:], ignore, self.device)
        if (
            keep_all
            and self._communicates
            and targets is not None
            and not bool((targets != ignore).any())
        ):
            targets = None  # no labelled pixel: the head runs once, in the weight-0 pass below
        sem_seg_losses = {}
        if targets is not None:
            _, sem_seg_losses = self.sem_seg_head(features, targets)
            if sem_seg_losses:
                self._loss_keys["sem_seg"] = tuple(sem_seg_losses)
        if not sem_seg_losses and keep_all:
            if self._communicates:
                stand_in = torch.full_like(
                    images.tensor[:, 0], 1 if ignore == 0 else 0, dtype=torch.long
                )
                sem_seg_losses = {
                    k: v * 0.0 for k, v in self.sem_seg_head(features, stand_in)[1].items()
                }
            else:
                zero = _zero_gradient_term([self.sem_seg_head], features)
                sem_seg_losses = {k: zero for k in self._loss_keys["sem_seg"]}
        losses.update(sem_seg_losses)

        keep = [i for i, x in enumerate(batched_inputs) if "instances" in x]
        if keep:
            if len(keep) < len(batched_inputs):
                index = torch.as_tensor(keep, device=self.device)
                images = ImageList(images.tensor[index], [images.image_sizes[i] for i in keep])
                features = {k: v[index] for k, v in features.items()}
            gt_instances = [batched_inputs[i]["instances"].to(self.device) for i in keep]
            proposals, instance_losses = self._instance_losses(images, features, gt_instances)
            if self.vis_period > 0:
                storage = get_event_storage()
                if storage.iter % self.vis_period == 0:
                    self.visualize_training([batched_inputs[i] for i in keep], proposals)
            losses.update({k: v * self.instance_loss_weight for k, v in instance_losses.items()})
        elif keep_all:
            losses.update(self._zero_instance_losses(images, features))
        if not losses:
            # No labelled pixel and no image with instances: nothing to learn from this batch.
            losses["loss_sem_seg"] = torch.zeros((), device=self.device, requires_grad=True)
        if comm.get_world_size() > 1 and not (keep_all and self._loss_keys_checked):
            # With keep_all the names are the same at every step: checking the first one suffices.
            self._check_loss_keys(losses)
        return losses

    def _instance_losses(self, images: ImageList, features, gt_instances: List[Instances]):
        """(proposals, the RPN and RoI-head losses, unweighted); remembers the loss names."""
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        losses = {**proposal_losses, **detector_losses}
        self._loss_keys["instances"] = tuple(losses)
        return proposals, losses

    def _zero_instance_losses(self, images: ImageList, features) -> Dict[str, torch.Tensor]:
        """The detection losses at weight 0 for a batch without instances (several processes)."""
        if self._loss_keys["instances"] is None or self._communicates:
            # Learn the loss names (first time) / make the collective calls: run the RPN and RoI
            # heads on images without objects (detectron2 supports empty targets) at weight 0.
            empty = [
                Instances(
                    size,
                    gt_boxes=Boxes(images.tensor.new_zeros((0, 4))),
                    gt_classes=torch.zeros(0, dtype=torch.long, device=self.device),
                )
                for size in images.image_sizes
            ]
            _, losses = self._instance_losses(images, features, empty)
            return {k: v * 0.0 for k, v in losses.items()}
        zero = _zero_gradient_term([self.proposal_generator, self.roi_heads], features)
        return {k: zero for k in self._loss_keys["instances"]}

    def _check_loss_keys(self, losses: Dict[str, torch.Tensor]):
        """
        In several processes, a :class:`Seg2Error` in every process when the processes' loss
        names differ: detectron2's metric gathering would fail in the main process and leave the
        others waiting in the next step's gradient reduction. One gather of the names, at the
        first step (at every step when ``keep_all_branches`` is False).
        """
        self._loss_keys_checked = True
        check_same_in_all_processes(
            sorted(losses),
            "the task set of Seg2MultiTaskRCNN (its loss names)",
            "every process must build the same model from the same config",
        )

    def sem_seg_logits(
        self, images: torch.Tensor, context: Tuple[int, int, int, int] = (0, 0, 0, 0)
    ) -> torch.Tensor:
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
            sem_seg (bool): False leaves the semantic head out (e.g. when TTA gives the semantic
                map). With tiling (``TEST.TILING``) the semantic logits come tile by tile.

        Returns:
            do_postprocess: list of ``{"instances"}`` plus ``"sem_seg"`` ((K, height, width)
            logits) when ``sem_seg``, and ``"panoptic_seg"`` (:meth:`combine_panoptic`) when also
            ``combine_enabled``; otherwise (list[Instances], (N, K, H', W') padded logits
            or None).
        """
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if detected_instances is None:
            proposals, _ = self.proposal_generator(images, features, None)
            instances, _ = self.roi_heads(images, features, proposals, None)
        else:
            instances = self.roi_heads.forward_with_given_boxes(
                features, [x.to(self.device) for x in detected_instances]
            )
        tiled = sem_seg and self.tiler is not None
        sem_seg_results = self.sem_seg_head(features, None)[0] if sem_seg and not tiled else None
        if not do_postprocess:
            return instances, sem_seg_results
        processed = []
        for i, (x, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            out = {"instances": detector_postprocess(instances[i], height, width)}
            if tiled:
                logits = self.tiler(x["image"], output="logits")
                out["sem_seg"] = sem_seg_postprocess(logits, image_size, height, width)
            elif sem_seg:
                out["sem_seg"] = sem_seg_postprocess(sem_seg_results[i], image_size, height, width)
            if sem_seg and self.combine_enabled:
                labels = out["sem_seg"].argmax(dim=0)
                out["panoptic_seg"] = self.combine_panoptic(out["instances"], labels)
            processed.append(out)
        return processed

    def combine_panoptic(self, instances: Instances, sem_seg_labels: torch.Tensor):
        """
        The panoptic segmentation of one image, as detectron2's PanopticFPN makes it: its
        ``combine_semantic_and_instance_outputs`` with this model's thresholds.

        Args:
            instances (Instances): post-processed detections with "pred_masks", "scores",
                "pred_classes" (contiguous thing ids).
            sem_seg_labels (Tensor): (H, W) semantic classes (the argmax of the logits) in
                detectron2's separated layout: 0 = any thing, k >= 1 = the k-th stuff class.

        Returns:
            (panoptic_seg, segments_info): (H, W) int32 segment ids (0: no segment) and per
            segment a dict "id", "isthing", "category_id" (thing: contiguous thing id, with
            "score" and "instance_id"; stuff: the semantic class k >= 1, with "area").
        """
        return combine_semantic_and_instance_outputs(
            instances,
            sem_seg_labels,
            self.combine_overlap_thresh,
            self.combine_stuff_area_thresh,
            self.combine_instances_score_thresh,
        )


def _communicates(module: torch.nn.Module) -> bool:
    """Whether a module makes collective calls in its forward and backward passes
    (synchronised batch norm)."""
    return any(
        isinstance(m, (torch.nn.SyncBatchNorm, NaiveSyncBatchNorm)) for m in module.modules()
    )


def _zero_gradient_term(
    modules: Iterable[torch.nn.Module], features: Dict[str, torch.Tensor]
) -> torch.Tensor:
    """
    0 x (the sum of the trainable parameters of ``modules`` and of the floating-point
    ``features``): a loss of value 0 whose gradient is 0 for each of them. One sum per tensor;
    it costs no convolution, unlike a forward pass of the branch at weight 0.
    """
    sums = [p.sum().float() for m in modules for p in m.parameters() if p.requires_grad]
    # float32 sums: under autocast the features are half precision
    sums += [
        f.sum().float() for f in features.values() if f.is_floating_point() and f.requires_grad
    ]
    if not sums:
        return torch.zeros(())
    return torch.stack(sums).sum() * 0.0
