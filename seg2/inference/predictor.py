"""A ``DefaultPredictor`` for seg2's models: one image array in, ``instances`` and/or ``sem_seg`` out."""

import logging

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import log_first_n
from torch.nn import functional as F

from ..engine.resume import Seg2Checkpointer
from ..modeling.tasks import model_tasks
from ..utils import Seg2Error
from .io import to_uint8_image
from .tiling import TiledSemSegInference
from .tta import build_tta_model

__all__ = ["Seg2Predictor"]


class Seg2Predictor:
    """
    detectron2's ``DefaultPredictor`` for seg2's models, with overlap-tile semantic inference.

    Builds the model of ``cfg``, loads ``cfg.MODEL.WEIGHTS`` ("" keeps the initialisation),
    resizes each image by ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` (0: native resolution) and
    returns the model's outputs at the image's own size. With ``SEG2.TILING.ENABLED`` the
    semantic branch runs tile by tile (:class:`TiledSemSegInference`); instances still come from
    the whole (resized) image. With ``TEST.AUG.ENABLED`` the outputs are test-time augmented
    (:func:`seg2.inference.build_tta_model`; scales of the resized image, each tiled if tiling is on).

    Example::

        predictor = Seg2Predictor(cfg)
        outputs = predictor(cv2.imread("input.jpg"))   # {"sem_seg": (K, H, W)} and/or {"instances"}
    """

    def __init__(self, cfg):
        """
        Args:
            cfg (CfgNode): a config with seg2's keys (``seg2.add_seg2_config``).
        """
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        self.tasks = model_tasks(self.cfg)
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else None
        if cfg.MODEL.WEIGHTS:
            Seg2Checkpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise Seg2Error(f"INPUT.FORMAT={self.input_format!r}: the predictor takes 'RGB' or 'BGR'")
        self.tiler = None
        if cfg.SEG2.TILING.ENABLED:
            if "sem_seg" not in self.tasks:
                raise Seg2Error(
                    f"SEG2.TILING.ENABLED=True but MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} predicts no "
                    "semantic map; tiling applies to semantic models and the semantic branch of multi-task ones"
                )
            self.tiler = TiledSemSegInference(cfg, self.model)
        # TEST.AUG.ENABLED: test-time augmentation (each scale tiled when SEG2.TILING.ENABLED).
        self.tta = build_tta_model(self.cfg, self.model) if cfg.TEST.AUG.ENABLED else None

    @torch.no_grad()
    def __call__(self, original_image: np.ndarray, sem_seg_output: str = "logits") -> dict:
        """
        Args:
            original_image (ndarray): (H, W, 3) in BGR order as ``cv2.imread`` gives, or (H, W)
                grayscale; uint8 or uint16 (scaled to 8 bit), see :func:`seg2.inference.to_uint8_image`.
            sem_seg_output (str): "logits": "sem_seg" is the (K, H, W) logits, as detectron2's
                models give; "labels": "sem_seg_labels" is the (H, W) class-index map instead
                (uint8 for K <= 256; with tiling at native resolution it is computed band by
                band, so the (K, H, W) logits never exist at once).

        Returns:
            dict: "instances" (for models that predict them) and "sem_seg" or "sem_seg_labels";
            "panoptic_seg" ((H, W) segment ids, segments_info) for the multi-task model when it
            combines them (``MODEL.PANOPTIC_FPN.COMBINE.ENABLED`` on panoptic data, see
            :func:`seg2.modeling.tasks.panoptic_output`), also tiled and test-time augmented.
        """
        if sem_seg_output not in ("logits", "labels"):
            raise ValueError(f"sem_seg_output={sem_seg_output!r}: expected 'logits' or 'labels'")
        image = to_uint8_image(original_image)
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        transform = self.aug.get_transform(image)
        resized = transform.apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        inputs = {"image": tensor, "height": height, "width": width}
        if self.tta is not None:
            out = self.tta([inputs])[0]
        elif self.tiler is None:
            out = self.model([inputs])[0]
        else:
            out = {}
            if "instances" in self.tasks:
                # Detection on the whole image, without the whole-image semantic head (of the models
                # with instances, the tiler takes Seg2MultiTaskRCNN, whose inference can leave it out).
                out["instances"] = self.model.inference([inputs], sem_seg=False)[0]["instances"]
            same_size = tuple(resized.shape[:2]) == (height, width)
            if not same_size:
                log_first_n(
                    logging.WARNING,
                    f"SEG2.TILING: images are resized by INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST before tiling (e.g. "
                    f"{width}x{height} -> {resized.shape[1]}x{resized.shape[0]}); INPUT.MIN_SIZE_TEST 0 tiles them "
                    "at their own resolution",
                    name=__name__,
                )
            if same_size and sem_seg_output == "labels":
                out["sem_seg_labels"] = self.tiler(tensor, output="labels")
                return self._add_panoptic(out, out["sem_seg_labels"])
            logits = self.tiler(tensor, output="logits")
            if not same_size:
                logits = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            out["sem_seg"] = logits
            self._add_panoptic(out, logits.argmax(dim=0))
        if sem_seg_output == "labels" and "sem_seg" in out:
            logits = out.pop("sem_seg")
            out["sem_seg_labels"] = logits.max(0).indices.to(torch.uint8 if logits.shape[0] <= 256 else torch.int64)
        return out

    def _add_panoptic(self, out: dict, labels: torch.Tensor) -> dict:
        """Add "panoptic_seg" to the outputs of the tiled path (the model adds it itself otherwise),
        from the whole-image instances and the tiled semantic classes."""
        if "panoptic_seg" in self.tasks and "instances" in out:
            labels = labels.to(torch.int64)
            out["panoptic_seg"] = self.model.combine_panoptic(out["instances"], labels)
        return out
