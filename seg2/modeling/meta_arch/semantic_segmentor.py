"""The semantic-only meta-architecture: any seg2 (or detectron2) semantic head on a backbone."""

from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor, build_backbone, build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch.func import functional_call
from torch.nn import functional as F

from ...utils import Seg2Error
from ..tasks import META_ARCH_TASKS
from .common import check_head_features, check_num_classes, check_registered, sem_seg_targets

__all__ = ["Seg2SemanticSegmentor", "mirror_pad"]

META_ARCH_TASKS["Seg2SemanticSegmentor"] = frozenset({"sem_seg"})

# How far beyond the image the overlap-tile search looks for a size the network tiles exactly.
_MAX_TILE_SEARCH = 4096


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Mirror-pad the last two dims of ``x`` by any amount (the reflection repeats where the
    padding exceeds the map), as U-Net's overlap-tile strategy extrapolates missing context."""
    while top > 0 or bottom > 0 or left > 0 or right > 0:
        h, w = x.shape[-2:]
        if (h == 1 and (top or bottom)) or (w == 1 and (left or right)):
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        t, b, l, r = min(top, h - 1), min(bottom, h - 1), min(left, w - 1), min(right, w - 1)
        x = F.pad(x, (l, r, t, b), mode="reflect")
        top, bottom, left, right = top - t, bottom - b, left - l, right - r
    return x


@META_ARCH_REGISTRY.register()
class Seg2SemanticSegmentor(SemanticSegmentor):
    """
    Semantic segmentation with any registered head on any compatible backbone (FCN, Long et al.,
    CVPR 2015; U-Net, Ronneberger et al., MICCAI 2015; SegNet; DeepLabV3+), as detectron2's
    ``SemanticSegmentor`` with build-time checks and U-Net's overlap-tile input.

    When the backbone or head uses "valid" (unpadded) convolutions, the output is smaller than
    the input: each image is mirror-padded, as the U-Net paper's overlap-tile strategy does, to
    the smallest size whose output covers the whole image, and the output is cropped back.
    Outputs: ``{"sem_seg": (C, height, width) logits}`` per image, at the input's original size.
    """

    @configurable
    def __init__(self, *, backbone, sem_seg_head, pixel_mean, pixel_std):
        """
        Args:
            backbone (Backbone): a detectron2 backbone.
            sem_seg_head (nn.Module): a head in detectron2's interface (``forward(features,
                targets) -> (logits or None, losses)``) with an ``ignore_value``.
            pixel_mean, pixel_std (tuple[float]): per-channel input normalization.
        """
        super().__init__(backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.overlap_tile = bool(getattr(backbone, "valid_padding", False) or getattr(sem_seg_head, "valid_padding", False))
        self._tile_cache: Dict[int, Tuple[int, int]] = {}

    @classmethod
    def from_config(cls, cfg):
        check_registered(cfg)
        check_num_classes(cfg)
        backbone = build_backbone(cfg)
        check_head_features(cfg, backbone.output_shape())
        return {
            "backbone": backbone,
            "sem_seg_head": build_sem_seg_head(cfg, backbone.output_shape()),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    # ---- overlap-tile geometry -------------------------------------------------------------
    def _output_size(self, size: int):
        """The output side for a square input of side ``size``, computed on the "meta" device
        (shapes only, no arithmetic); None when the network cannot take that size."""
        x = torch.empty(1, len(self.pixel_mean), size, size, device="meta")
        was_training = self.training
        self.eval()
        try:
            b_state = {k: torch.empty_like(v, device="meta") for k, v in self.backbone.state_dict(keep_vars=True).items()}
            h_state = {k: torch.empty_like(v, device="meta") for k, v in self.sem_seg_head.state_dict(keep_vars=True).items()}
            features = functional_call(self.backbone, b_state, (x,))
            out = functional_call(self.sem_seg_head, h_state, (features,))[0]
            return int(out.shape[-2]) if out.shape[-2] == out.shape[-1] else None
        except (ValueError, RuntimeError):
            return None
        finally:
            self.train(was_training)

    def tile_geometry(self, size: int) -> Tuple[int, int]:
        """
        (padded input side, leading margin) for an image side ``size``: the smallest input the
        network takes whose centred output covers ``size`` pixels (U-Net paper: 572 -> 388).
        """
        if size in self._tile_cache:
            return self._tile_cache[size]
        p = size
        while p < size + _MAX_TILE_SEARCH:
            out = self._output_size(p)
            if out is None:
                p += 1
            elif out < size:
                p += max(size - out, 1)
            elif (p - out) % 2:
                p += 1
            else:
                self._tile_cache[size] = (p, (p - out) // 2)
                return self._tile_cache[size]
        raise Seg2Error(
            f"no input size up to {size + _MAX_TILE_SEARCH} gives a 'valid'-padding output of {size} pixels; "
            "check MODEL.UNET_ENCODER / MODEL.UNET_HEAD"
        )

    def _tiled_inputs(self, images: List[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        sizes = [tuple(im.shape[-2:]) for im in images]
        max_h, max_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        (ph, mh), (pw, mw) = self.tile_geometry(max_h), self.tile_geometry(max_w)
        padded = [mirror_pad(im[None], mh, ph - h - mh, mw, pw - w - mw)[0] for im, (h, w) in zip(images, sizes)]
        return torch.stack(padded), sizes

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, batched_inputs):
        """
        Args:
            batched_inputs (list[dict]): "image" (C, H, W); in training "sem_seg" (H, W) long;
                optionally "height", "width" (the output size).

        Returns:
            training: dict of losses; inference: list of ``{"sem_seg": (C, height, width)}``.
        """
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        if self.overlap_tile:
            tensor, image_sizes = self._tiled_inputs(images)
            target_size = (max(s[0] for s in image_sizes), max(s[1] for s in image_sizes))
        else:
            image_list = ImageList.from_tensors(
                images, self.backbone.size_divisibility, padding_constraints=self.backbone.padding_constraints
            )
            tensor, image_sizes = image_list.tensor, image_list.image_sizes
            target_size = tensor.shape[-2:]
        features = self.backbone(tensor)

        if self.training:
            targets = sem_seg_targets(batched_inputs, target_size, self.sem_seg_head.ignore_value, self.device)
            if targets is None:
                raise Seg2Error(
                    f"{type(self).__name__} trains on label maps, but no image of this batch has 'sem_seg' "
                    f"(e.g. {batched_inputs[0].get('file_name', '?')}); its dataset needs sem_seg_file_name"
                )
            _, losses = self.sem_seg_head(features, targets)
            # A batch whose pixels are all ignore_value has no loss; report 0 rather than fail.
            return losses or {"loss_sem_seg": torch.zeros((), device=self.device, requires_grad=True)}

        results, _ = self.sem_seg_head(features, None)
        processed = []
        for result, x, image_size in zip(results, batched_inputs, image_sizes):
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            processed.append({"sem_seg": sem_seg_postprocess(result, image_size, height, width)})
        return processed
