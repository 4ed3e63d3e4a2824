"""A DatasetMapper for records that carry instances, a semantic map, or both."""

import copy
import importlib.util
import logging
from typing import Optional, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.logger import log_first_n

from ..constants import IGNORE_LABEL
from ..tasks import META_ARCH_TASKS, model_tasks
from ..utils import InvalidArgument, Seg2Error, UnreadableFileError, name_config_keys
from .image import read_image_with_orientation
from .label_map import check_label_values, read_sem_seg

__all__ = ["MultiTaskDatasetMapper", "CategoryAreaConstrainedCrop"]

logger = logging.getLogger(__name__)

# fvcore crops polygons with shapely, an optional dependency of detectron2 that DatasetMapper
# fails without; without it, polygons of a cropped image are rasterised first.
_HAS_SHAPELY = importlib.util.find_spec("shapely") is not None


# The share of unreadable files is judged over at least this many distinct files (or the whole
# dataset when smaller), so a bad file among the first few read does not stop a run.
MIN_FILES_FOR_SHARE = 100


class _BadSampleCounter:
    """The unreadable samples one training mapper met (one per DataLoader worker and rank: each
    sees a random share of the dataset, so its own share estimates the dataset's). Files are
    counted once, however often the sampler draws them again."""

    def __init__(self, max_share: float, num_records: Optional[int]):
        self.max_share = max_share
        self.min_files = (
            min(MIN_FILES_FOR_SHARE, num_records) if num_records else MIN_FILES_FOR_SHARE
        )
        self.seen, self.bad = set(), set()

    def read(self, file_name: str):
        self.seen.add(file_name)

    def skip(self, error: UnreadableFileError):
        """Count ``error``'s file; a one-line Seg2Error once the unreadable files are more than
        ``max_share`` of the files read, and of ``min_files``."""
        new = error.path not in self.bad
        self.bad.add(error.path)
        n_bad, n_seen = len(self.bad), len(self.seen)
        if n_bad > self.max_share * max(n_seen, self.min_files):
            raise Seg2Error(
                f"{n_bad} of {n_seen} training files read by this loader are unreadable, more than "
                f"DATALOADER.MAX_BAD_SAMPLE_SHARE={self.max_share:g}; the last: {error}"
            )
        if new:
            logger.warning(
                f"skipping training sample {error} ({n_bad} unreadable of {n_seen} files read by "
                "this loader, "
                f"limit DATALOADER.MAX_BAD_SAMPLE_SHARE={self.max_share:g})"
            )


class CategoryAreaConstrainedCrop(T.RandomCrop_CategoryAreaConstraint):
    """
    detectron2's ``RandomCrop_CategoryAreaConstraint`` (re-draw a crop while one class covers more
    than ``single_category_max_area`` of its labelled pixels, as DeepLab does), which also accepts
    a record without semantic map: the crop is then a plain random crop (detectron2's fails).
    """

    def get_transform(self, image, sem_seg):
        if sem_seg is None:
            return self.crop_aug.get_transform(image)
        return super().get_transform(image, sem_seg)


class MultiTaskDatasetMapper(DatasetMapper):
    """
    Like detectron2's ``DatasetMapper``, for records with ``annotations`` (polygons, RLE or
    bitmasks), ``sem_seg_file_name``, or both. The image, the instances and the semantic map go
    through the same geometric augmentations (resize, crop, flip, padding).

    It differs from ``DatasetMapper`` where that falls short for semantic and mixed data:

    * label maps are read as class indices (palette PNGs included; ``DatasetMapper`` converts
      them to luminance; SBD ``.mat`` files too); a label map whose size differs from its image,
      or that holds a value that is neither a class nor ``ignore_label``, is an error naming the
      file;
    * the training crop can cap the share of a single class, as DeepLab does
      (``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA``), ignoring ``ignore_label`` pixels, and works on
      records without semantic map;
    * crops can be padded to the full crop size (``INPUT.CROP.PAD_TO_SIZE``): the image with
      0, the semantic map with ``ignore_label``, instance masks with background;
    * in training, an image or label map that cannot be decoded (missing, empty, truncated, not
      an image) is skipped with a warning naming it: the mapper returns None, so detectron2's
      ``MapDataset`` maps another sample instead; unreadable files are counted, and more than
      ``max_bad_share`` of the files read stop the run with a :class:`Seg2Error`. In inference
      the file is an :class:`UnreadableFileError` (no metric on partial data);
    * an image whose instances mix polygons with RLE or bitmasks gets ``BitMasks`` under
      ``INPUT.MASK_FORMAT="polygon"`` (``DatasetMapper`` fails), and so does a cropped image
      with polygons when shapely (which fvcore needs to crop polygons) is not installed.
    """

    @name_config_keys(
        {"image_format": "INPUT.FORMAT", "max_bad_share": "DATALOADER.MAX_BAD_SAMPLE_SHARE"}
    )
    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        ignore_label: int = IGNORE_LABEL,
        num_classes: Optional[int] = None,
        pad_to_size: Optional[Tuple[int, int]] = None,
        max_bad_share: float = 0.05,
        num_records: Optional[int] = None,
        **kwargs,
    ):
        """
        Args:
            is_train (bool): training (annotations kept and augmented) or inference.
            ignore_label (int): the label-map value that is excluded from losses and metrics
                (``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``; the datasets' metadata ``ignore_label``).
            num_classes (int or None): the semantic class count (``MODEL.SEM_SEG_HEAD.NUM_CLASSES``,
                which the resolve step checked against the datasets' ``stuff_classes``): a label
                value that is neither a class nor ``ignore_label`` is an error naming the file.
                None: the model predicts no semantic map, and label maps are not read.
            pad_to_size (tuple[int, int] or None): pad every training image to at least this
                (height, width) at the bottom and right.
            max_bad_share (float): training: the largest share of unreadable files skipped before
                the run stops (``DATALOADER.MAX_BAD_SAMPLE_SHARE``); 0 stops at the first.
            num_records (int or None): the number of training records, when known (the share is
                judged over at least min(100, num_records) files).
            kwargs: the arguments of detectron2's ``DatasetMapper``.
        """
        super().__init__(is_train, **kwargs)
        if self.image_format not in ("BGR", "RGB"):
            raise InvalidArgument(
                "image_format", self.image_format, "'BGR' or 'RGB' (seg2.data.read_image's orders)"
            )
        if not 0.0 <= max_bad_share < 1.0:
            raise InvalidArgument("max_bad_share", max_bad_share, "in [0, 1)")
        self.ignore_label = ignore_label
        self.num_classes = num_classes
        self.pad_to_size = tuple(pad_to_size) if pad_to_size else None
        self.bad_samples = _BadSampleCounter(max_bad_share, num_records)
        self._rotated_warned = set()

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["pad_to_size"] = None
        if cfg.INPUT.CROP.ENABLED and is_train:
            # Replace DatasetMapper's plain RandomCrop by the class-area-constrained one.
            ret["augmentations"][0] = CategoryAreaConstrainedCrop(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
            if cfg.INPUT.CROP.PAD_TO_SIZE:
                if cfg.INPUT.CROP.TYPE != "absolute":
                    raise Seg2Error(
                        "INPUT.CROP.PAD_TO_SIZE needs INPUT.CROP.TYPE='absolute' (a crop size in "
                        f"pixels), got {cfg.INPUT.CROP.TYPE!r}"
                    )
                ret["pad_to_size"] = tuple(cfg.INPUT.CROP.SIZE)
        ret["ignore_label"] = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        # Label maps are read for models with a semantic output (and models seg2 does not know).
        known = cfg.MODEL.META_ARCHITECTURE in META_ARCH_TASKS
        ret["num_classes"] = (
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            if not known or "sem_seg" in model_tasks(cfg)
            else None
        )
        ret["max_bad_share"] = cfg.DATALOADER.MAX_BAD_SAMPLE_SHARE
        return ret

    def _warn_rotated(self, file_name: str, orientation: int):
        if file_name in self._rotated_warned:
            return
        self._rotated_warned.add(file_name)
        logger.warning(
            f"{file_name}: EXIF orientation {orientation}: the image is read rotated/flipped as "
            "it is shown, and its "
            "label map as stored; they are aligned only if the label map was drawn on the image "
            "as shown"
        )

    def _read_sem_seg(self, record: dict, image: np.ndarray, image_file: str) -> np.ndarray:
        path = record["sem_seg_file_name"]
        sem_seg = read_sem_seg(record)
        if sem_seg.shape != image.shape[:2]:
            raise Seg2Error(
                f"{path}: label map is {sem_seg.shape[1]}x{sem_seg.shape[0]} (WxH) but its image "
                f"{image_file} is {image.shape[1]}x{image.shape[0]}"
            )
        check_label_values(sem_seg, path, self.num_classes, self.ignore_label)
        if sem_seg.dtype != np.uint8:
            # More than 255 classes (read_sem_seg gives uint8 otherwise): detectron2 resizes a
            # non-uint8 map with torch's interpolate, which has no integer kernel; float32 holds
            # the labels exactly (< 2**24), and __call__ returns them as int64.
            sem_seg = sem_seg.astype(np.float32)
        return sem_seg

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): one record in detectron2's dataset format.

        Returns:
            dict or None: ``image`` (C, H, W) uint8 tensor; in training ``instances`` when the
            record has annotations and ``sem_seg`` (H, W) long tensor when it has a semantic map.
            None in training when its image or label map cannot be decoded (counted, see above).
        """
        if not self.is_train:
            return self._map(dataset_dict)
        self.bad_samples.read(dataset_dict["file_name"])
        try:
            return self._map(dataset_dict)
        except UnreadableFileError as e:
            self.bad_samples.skip(e)
            return None

    def _map(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image, orientation = read_image_with_orientation(
            dataset_dict["file_name"], self.image_format
        )
        if orientation != 1 and "sem_seg_file_name" in dataset_dict:
            self._warn_rotated(dataset_dict["file_name"], orientation)
        utils.check_image_size(dataset_dict, image)
        orig_shape = image.shape[:2]

        sem_seg_gt = None
        if "sem_seg_file_name" in dataset_dict and self.is_train and self.num_classes is not None:
            sem_seg_gt = self._read_sem_seg(dataset_dict, image, dataset_dict["file_name"])
        dataset_dict.pop("sem_seg_file_name", None)
        dataset_dict.pop("sem_seg_format", None)

        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        padded_shape = image_shape
        if self.pad_to_size is not None and self.is_train:
            padded_shape = tuple(max(a, b) for a, b in zip(image_shape, self.pad_to_size))
            pad = ((0, padded_shape[0] - image_shape[0]), (0, padded_shape[1] - image_shape[1]))
            image = np.pad(image, pad + ((0, 0),) * (image.ndim - 2), constant_values=0)
            if sem_seg_gt is not None:
                sem_seg_gt = np.pad(sem_seg_gt, pad, constant_values=self.ignore_label)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))

        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(
                dataset_dict, transforms, image_shape, padded_shape, orig_shape
            )
        return dataset_dict

    def _transform_annotations(
        self, dataset_dict, transforms, image_shape, padded_shape=None, orig_shape=None
    ):
        padded_shape = padded_shape or image_shape
        orig_shape = orig_shape or (dataset_dict["height"], dataset_dict["width"])
        rasterise_polygons = not _HAS_SHAPELY and any(
            isinstance(t, T.CropTransform) for t in transforms
        )
        if rasterise_polygons:
            log_first_n(
                logging.WARNING,
                "shapely is not installed: polygons of cropped images are rasterised before the "
                "crop "
                "(pip install shapely to crop them as polygons).",
                n=1,
                name=__name__,
            )
        annos = []
        for obj in dataset_dict.pop("annotations"):
            if obj.get("iscrowd", 0):
                continue  # as DatasetMapper: crowd regions are no training instances
            if not self.use_instance_mask:
                obj.pop("segmentation", None)
            if not self.use_keypoint:
                obj.pop("keypoints", None)
            segm = obj.get("segmentation")
            if rasterise_polygons and isinstance(segm, list):
                obj["segmentation"] = utils.polygons_to_bitmask(segm, *orig_shape)
            bitmask = (
                obj.pop("segmentation") if isinstance(obj.get("segmentation"), np.ndarray) else None
            )
            obj = utils.transform_instance_annotations(
                obj, transforms, image_shape, keypoint_hflip_indices=self.keypoint_hflip_indices
            )
            if bitmask is not None:  # transform_instance_annotations handles polygons and RLE only
                obj["segmentation"] = transforms.apply_segmentation(bitmask.astype(np.uint8))
            annos.append(obj)

        mask_format = self.instance_mask_format
        if mask_format == "polygon" and any(
            not isinstance(a.get("segmentation", []), list) for a in annos
        ):
            log_first_n(
                logging.INFO,
                "Instances given as RLE or bitmasks are kept as BitMasks under "
                "INPUT.MASK_FORMAT='polygon'.",
                n=1,
                name=__name__,
            )
            mask_format = "bitmask"
        if padded_shape != image_shape:
            pad = ((0, padded_shape[0] - image_shape[0]), (0, padded_shape[1] - image_shape[1]))
            for a in annos:
                if isinstance(a.get("segmentation"), np.ndarray):
                    a["segmentation"] = np.pad(a["segmentation"], pad)  # background
        instances = utils.annotations_to_instances(annos, padded_shape, mask_format=mask_format)
        if self.recompute_boxes and instances.has("gt_masks"):
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
