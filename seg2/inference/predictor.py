"""A ``DefaultPredictor`` for seg2's models: one image array in, ``instances`` and/or ``sem_seg`` out."""

import logging

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import log_first_n

from ..checkpoint import Seg2Checkpointer
from ..data.image import to_uint8_image
from ..resolve import resolve_config
from ..tasks import model_tasks
from ..utils import Seg2Error
from .tta import build_tta_model

__all__ = ["Seg2Predictor"]


class Seg2Predictor:
    """
    detectron2's ``DefaultPredictor`` for seg2's models, with overlap-tile semantic inference.

    Builds the model of ``cfg``, loads ``cfg.MODEL.WEIGHTS`` ("" keeps the initialisation),
    resizes each image by ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` (0: native resolution) and
    returns the model's outputs at the image's own size. The config goes through the resolve step
    first (:func:`seg2.resolve_config`, without counting class weights). The model infers in its
    own mode: with ``TEST.TILING.ENABLED`` its semantic branch runs tile by tile
    (:class:`~seg2.modeling.tiling.TiledSemSegInference`); instances still come from the whole
    (resized) image. With ``TEST.AUG.ENABLED`` the outputs are test-time augmented
    (:func:`seg2.inference.build_tta_model`; scales of the resized image, each tiled if tiling is
    on).
    Images are converted as :func:`seg2.data.read_image` converts files for training.

    Example::

        predictor = Seg2Predictor(cfg)
        outputs = predictor(cv2.imread("input.jpg"))   # {"sem_seg": (K, H, W)} and/or {"instances"}
    """

    def __init__(self, cfg):
        """
        Args:
            cfg (CfgNode): a config with seg2's keys (``seg2.add_seg2_config``).
        """
        self.cfg = resolve_config(cfg, class_weights=False)
        self.model = build_model(self.cfg)
        self.model.eval()
        self.tasks = model_tasks(self.cfg)
        self.metadata = (
            MetadataCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else None
        )
        if cfg.MODEL.WEIGHTS:
            Seg2Checkpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise Seg2Error(
                f"INPUT.FORMAT={self.input_format!r}: the predictor takes 'RGB' or 'BGR'"
            )
        # The model's own tiler (TEST.TILING); the predictor uses it directly only for "labels"
        # output at native resolution, computed band by band.
        self.tiler = getattr(self.model, "tiler", None)
        # TEST.AUG.ENABLED: test-time augmentation (each scale tiled when TEST.TILING.ENABLED).
        self.tta = build_tta_model(self.cfg, self.model) if cfg.TEST.AUG.ENABLED else None

    @torch.no_grad()
    def __call__(self, original_image: np.ndarray, sem_seg_output: str = "logits") -> dict:
        """
        Args:
            original_image (ndarray): (H, W, 3) in BGR order as ``cv2.imread`` gives, or (H, W)
                grayscale; uint8 or uint16 (scaled to 8 bit), see
                :func:`seg2.inference.to_uint8_image`.
            sem_seg_output (str): "logits": "sem_seg" is the (K, H, W) logits, as detectron2's
                models give; "labels": "sem_seg_labels" is the (H, W) class-index map instead
                (uint8 for K <= 256; with tiling at native resolution it is computed band by
                band, so the (K, H, W) logits never exist at once).

        Returns:
            dict: "instances" (for models that predict them) and "sem_seg" or "sem_seg_labels";
            "panoptic_seg" ((H, W) segment ids, segments_info) for the multi-task model when it
            combines them (``MODEL.PANOPTIC_FPN.COMBINE.ENABLED`` on panoptic data, see
            :func:`seg2.resolve.panoptic_output`), also tiled and test-time augmented.
        """
        if sem_seg_output not in ("logits", "labels"):
            raise ValueError(f"sem_seg_output={sem_seg_output!r}: expected 'logits' or 'labels'")
        inputs = self.preprocess(original_image)
        height, width = inputs["height"], inputs["width"]
        resized = inputs["image"].shape[-2:]
        if self.tiler is not None and tuple(resized) != (height, width):
            log_first_n(
                logging.WARNING,
                "TEST.TILING: images are resized by INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST before "
                "tiling (e.g. "
                f"{width}x{height} -> {resized[1]}x{resized[0]}); INPUT.MIN_SIZE_TEST 0 tiles them "
                "at their own resolution",
                name=__name__,
            )
        if self.tta is not None:
            out = self.tta([inputs])[0]
        elif (
            self.tiler is not None
            and sem_seg_output == "labels"
            and tuple(resized) == (height, width)
        ):
            # Class indices band by band: the (K, H, W) logits of a large image never exist at once.
            out = {}
            if "instances" in self.tasks:
                out["instances"] = self.model.inference([inputs], sem_seg=False)[0]["instances"]
            out["sem_seg_labels"] = self.tiler(inputs["image"], output="labels")
            return self._add_panoptic(out, out["sem_seg_labels"])
        else:
            out = self.model([inputs])[0]  # the model's own inference mode (whole image or tiles)
        if sem_seg_output == "labels" and "sem_seg" in out:
            logits = out.pop("sem_seg")
            out["sem_seg_labels"] = logits.max(0).indices.to(
                torch.uint8 if logits.shape[0] <= 256 else torch.int64
            )
        return out

    def preprocess(self, original_image: np.ndarray) -> dict:
        """The model's input for one image array: converted as :func:`seg2.data.read_image`
        converts files (8-bit, 3 channels), in ``INPUT.FORMAT``, resized by
        ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``: ``{"image", "height", "width"}``."""
        image = to_uint8_image(original_image)
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    def _add_panoptic(self, out: dict, labels: torch.Tensor) -> dict:
        """Add "panoptic_seg" to the outputs of the tiled path (the model adds it itself otherwise),
        from the whole-image instances and the tiled semantic classes."""
        if "panoptic_seg" in self.tasks and "instances" in out:
            labels = labels.to(torch.int64)
            out["panoptic_seg"] = self.model.combine_panoptic(out["instances"], labels)
        return out
