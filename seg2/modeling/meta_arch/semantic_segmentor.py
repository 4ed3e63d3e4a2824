"""The semantic-only meta-architecture: any seg2 (or detectron2) semantic head on a backbone."""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    SemanticSegmentor,
    build_backbone,
    build_sem_seg_head,
)
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch.func import functional_call

from ...tasks import META_ARCH_TASKS
from ...utils import Seg2Error
from ..tiling import TiledSemSegInference, mirror_window, tiling_from_config
from .common import check_head_features, check_registered, sem_seg_targets

__all__ = ["Seg2SemanticSegmentor", "semantic_inference"]

META_ARCH_TASKS["Seg2SemanticSegmentor"] = frozenset({"sem_seg"})

# How far beyond the image the overlap-tile search looks for a size the network tiles exactly.
_MAX_TILE_SEARCH = 4096


def inner_size(images: torch.Tensor, context: Tuple[int, int, int, int]) -> Tuple[int, int]:
    """(height, width) of ``images`` without their ``context`` (top, bottom, left, right)."""
    top, bottom, left, right = context
    h, w = images.shape[-2] - top - bottom, images.shape[-1] - left - right
    if min(context) < 0 or h < 1 or w < 1:
        raise ValueError(
            f"context {tuple(context)} (top, bottom, left, right) does not fit a "
            f"{tuple(images.shape[-2:])} input"
        )
    return h, w


def needs_no_padding(size, backbone) -> bool:
    """Whether ``ImageList.from_tensors`` would leave a batch of this (H, W) unpadded: a multiple
    of the backbone's size divisibility and no square-size constraint."""
    d = backbone.size_divisibility
    square = (getattr(backbone, "padding_constraints", None) or {}).get("square_size", 0)
    return square == 0 and (d <= 1 or (size[0] % d == 0 and size[1] % d == 0))


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
    The inference mode is the model's own (``TEST.TILING``): whole images, or overlap tiles
    (:class:`seg2.modeling.tiling.TiledSemSegInference`); both go through :meth:`sem_seg_logits`.
    """

    # The meta-architecture reads TEST.TILING itself (the resolve step refuses tiling for those
    # that do not).
    tiles_in_inference = True

    @configurable
    def __init__(
        self, *, backbone, sem_seg_head, pixel_mean, pixel_std, tiling: Optional[dict] = None
    ):
        """
        Args:
            backbone (Backbone): a detectron2 backbone.
            sem_seg_head (nn.Module): a head in detectron2's interface (``forward(features,
                targets) -> (logits or None, losses)``) with an ``ignore_value``.
            pixel_mean, pixel_std (tuple[float]): per-channel input normalization.
            tiling (dict or None): :class:`~seg2.modeling.tiling.TilingSpec` arguments: infer
                tile by tile; None or empty: whole images.
        """
        super().__init__(
            backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        self.overlap_tile = bool(
            getattr(backbone, "valid_padding", False)
            or getattr(sem_seg_head, "valid_padding", False)
        )
        self._tile_cache: Dict[int, Tuple[int, int]] = {}
        self.tiler = TiledSemSegInference(self, **tiling) if tiling else None

    @classmethod
    def from_config(cls, cfg):
        check_registered(cfg)
        tiling = tiling_from_config(cfg)
        backbone = build_backbone(cfg)
        check_head_features(cfg, backbone.output_shape())
        return {
            "backbone": backbone,
            "sem_seg_head": build_sem_seg_head(cfg, backbone.output_shape()),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "tiling": tiling,
        }

    # ---- overlap-tile geometry -------------------------------------------------------------
    def _output_size(self, size: int):
        """The output side for a square input of side ``size``, computed on the "meta" device
        (shapes only, no arithmetic); None when the network cannot take that size."""
        x = torch.empty(1, len(self.pixel_mean), size, size, device="meta")
        was_training = self.training
        self.eval()
        try:
            b_state = {
                k: torch.empty_like(v, device="meta")
                for k, v in self.backbone.state_dict(keep_vars=True).items()
            }
            h_state = {
                k: torch.empty_like(v, device="meta")
                for k, v in self.sem_seg_head.state_dict(keep_vars=True).items()
            }
            features = functional_call(self.backbone, b_state, (x,))
            out = functional_call(self.sem_seg_head, h_state, (features,))[0]
            return int(out.shape[-2]) if out.shape[-2] == out.shape[-1] else None
        except (ValueError, RuntimeError):
            return None
        finally:
            self.train(was_training)

    def tile_geometry(self, size: int) -> Tuple[int, int]:
        """
        (network input side, context before the output) for ``size`` output pixels along a side.
        "Same"-padding networks: ``(size, 0)``. "Valid"-padding ones: the smallest input the
        network takes whose centred output covers ``size`` pixels (U-Net paper: 388 -> (572, 92));
        the context after the output is ``input side - size - context before``.
        """
        if not self.overlap_tile:
            return size, 0
        # Under torch.jit.trace, sizes are traced tensors: the geometry is a Python-side constant
        # of the traced size (an exported "valid" U-Net takes that size only).
        size = int(size)
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
            f"no input size up to {size + _MAX_TILE_SEARCH} gives a 'valid'-padding output of "
            f"{size} pixels; "
            "check MODEL.UNET_ENCODER / MODEL.UNET_HEAD"
        )

    def _network_input(self, images, context=(0, 0, 0, 0)) -> torch.Tensor:
        """
        The backbone's (N, C, H', W') input from normalised (C, H_i, W_i) images (a list, or an
        (N, C, H, W) batch, which is used as it is when it needs no padding) whose outer
        ``context`` (top, bottom, left, right) pixels are context only.
        "Valid" padding: each image's window that the network needs for the largest image's
        output (:meth:`tile_geometry`), mirrored beyond the image; the output's top-left pixel is
        the first pixel after the context. Otherwise: zero-padded to the largest image and to
        the backbone's size divisibility, as detectron2's ``SemanticSegmentor`` does; the output
        is aligned with the input, context included.
        """
        if not self.overlap_tile:
            bb = self.backbone
            if isinstance(images, torch.Tensor) and needs_no_padding(images.shape[-2:], bb):
                return images  # a batch that needs no padding: no copy (tiles of a fitting size)
            return ImageList.from_tensors(
                list(images), bb.size_divisibility, padding_constraints=bb.padding_constraints
            ).tensor
        top, bottom, left, right = context
        (ph, mh) = self.tile_geometry(max(im.shape[-2] for im in images) - top - bottom)
        (pw, mw) = self.tile_geometry(max(im.shape[-1] for im in images) - left - right)
        return torch.stack(
            [
                mirror_window(im, (top - mh, top - mh + ph), (left - mw, left - mw + pw))
                for im in images
            ]
        )

    def sem_seg_logits(
        self, images: torch.Tensor, context: Tuple[int, int, int, int] = (0, 0, 0, 0)
    ) -> torch.Tensor:
        """
        Stride-1 semantic logits of a batch of raw images: normalisation, the backbone's padding
        (or a "valid" network's mirrored overlap-tile context), backbone, head, crop. The model's
        own inference and :class:`seg2.inference.TiledSemSegInference` both use it.

        Args:
            images (Tensor): (N, C, H, W) pixel values as the "image" input takes them (in
                ``INPUT.FORMAT``, not normalised), any device.
            context (tuple[int]): (top, bottom, left, right): that many outer pixels of each
                side are context only; the network sees them but gives no logits for them.
                A "valid"-padding network takes the context it needs (:meth:`tile_geometry`)
                from them and mirrors what they lack.

        Returns:
            Tensor: (N, K, H - top - bottom, W - left - right) logits.
        """
        top, _, left, _ = context
        h, w = inner_size(images, context)
        x = (images.to(self.device) - self.pixel_mean) / self.pixel_std
        logits, _ = self.sem_seg_head(self.backbone(self._network_input(x, context)), None)
        y0, x0 = (0, 0) if self.overlap_tile else (top, left)
        return logits[:, :, y0 : y0 + h, x0 : x0 + w]

    def forward(self, batched_inputs):
        """
        Args:
            batched_inputs (list[dict]): "image" (C, H, W); in training "sem_seg" (H, W) long;
                optionally "height", "width" (the output size).

        Returns:
            training: dict of losses; inference: list of ``{"sem_seg": (C, height, width)}``.
            In inference, images of one size go through :meth:`sem_seg_logits` together, so an
            image's logits do not depend on the size of the others in its batch.
        """
        if not self.training:
            return self.inference(batched_inputs)
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        tensor = self._network_input(images)
        # "valid": outputs cover the largest image; otherwise the padded input.
        target_size = (
            [max(im.shape[d] for im in images) for d in (-2, -1)]
            if self.overlap_tile
            else tensor.shape[-2:]
        )
        targets = sem_seg_targets(
            batched_inputs, target_size, self.sem_seg_head.ignore_value, self.device
        )
        if targets is None:
            raise Seg2Error(
                f"{type(self).__name__} trains on label maps, but no image of this batch has "
                "'sem_seg' "
                f"(e.g. {batched_inputs[0].get('file_name', '?')}); its dataset needs "
                "sem_seg_file_name"
            )
        _, losses = self.sem_seg_head(self.backbone(tensor), targets)
        # A batch whose pixels are all ignore_value has no loss; report 0 rather than fail.
        return losses or {"loss_sem_seg": torch.zeros((), device=self.device, requires_grad=True)}

    def inference(
        self, batched_inputs: List[Dict[str, torch.Tensor]]
    ) -> List[Dict[str, torch.Tensor]]:
        """``[{"sem_seg": (K, height, width) logits}]``: :func:`semantic_inference` of each group
        of same-size images, resized to the input's "height" x "width" (default: its own size)."""
        by_size: Dict[Tuple[int, int], List[int]] = {}
        for i, x in enumerate(batched_inputs):
            by_size.setdefault(tuple(x["image"].shape[-2:]), []).append(i)
        processed: List[Dict[str, torch.Tensor]] = [{} for _ in batched_inputs]
        for (h, w), index in by_size.items():
            logits = semantic_inference(
                self, torch.stack([batched_inputs[i]["image"] for i in index])
            )
            for i, result in zip(index, logits):
                height, width = (
                    batched_inputs[i].get("height", h),
                    batched_inputs[i].get("width", w),
                )
                processed[i]["sem_seg"] = sem_seg_postprocess(result, (h, w), height, width)
        return processed


def semantic_inference(model, images: torch.Tensor) -> torch.Tensor:
    """
    (N, K, H, W) stride-1 semantic logits of (N, C, H, W) raw images in ``model``'s inference
    mode: tile by tile with its ``tiler`` (``TEST.TILING``), else :meth:`sem_seg_logits` of the
    whole batch. The one place seg2's meta-architectures, TTA and the predictor choose it.
    """
    if getattr(model, "tiler", None) is not None:
        return torch.stack([model.tiler(image, output="logits") for image in images])
    return model.sem_seg_logits(images)
