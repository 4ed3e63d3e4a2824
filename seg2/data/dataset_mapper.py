"""A DatasetMapper for records that carry instances, a semantic map, or both."""

import copy

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..utils import Seg2Error
from .label_map import read_label_map

__all__ = ["MultiTaskDatasetMapper"]


class MultiTaskDatasetMapper(DatasetMapper):
    """
    Like detectron2's ``DatasetMapper``, for records with ``annotations`` (polygons, RLE or
    bitmasks), ``sem_seg_file_name``, or both. The image, the instances and the semantic map go
    through the same geometric augmentations.

    It differs from ``DatasetMapper`` where that falls short for semantic data:

    * label maps are read as class indices (palette PNGs included; ``DatasetMapper`` converts
      them to luminance), and a label map whose size differs from its image is an error naming
      the file;
    * the training crop can cap the share of a single class, as DeepLab does
      (``SEG2.INPUT.SINGLE_CATEGORY_MAX_AREA``), ignoring ``ignore_label`` pixels.
    """

    @configurable
    def __init__(self, is_train: bool, *, ignore_label: int = 255, **kwargs):
        """
        Args:
            is_train (bool): training (annotations kept and augmented) or inference.
            ignore_label (int): the label-map value that is excluded from losses and metrics.
            kwargs: the arguments of detectron2's ``DatasetMapper``.
        """
        super().__init__(is_train, **kwargs)
        self.ignore_label = ignore_label

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if cfg.INPUT.CROP.ENABLED and is_train:
            # Replace DatasetMapper's plain RandomCrop by the class-area-constrained one.
            ret["augmentations"][0] = T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.SEG2.INPUT.SINGLE_CATEGORY_MAX_AREA,
                cfg.SEG2.INPUT.IGNORE_LABEL,
            )
        ret["ignore_label"] = cfg.SEG2.INPUT.IGNORE_LABEL
        return ret

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): one record in detectron2's dataset format.

        Returns:
            dict: ``image`` (C, H, W) uint8 tensor; in training ``instances`` when the record has
            annotations and ``sem_seg`` (H, W) long tensor when it has a semantic map.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        sem_seg_gt = None
        sem_seg_file = dataset_dict.pop("sem_seg_file_name", None)
        if sem_seg_file is not None and self.is_train:
            sem_seg_gt = read_label_map(sem_seg_file)
            if sem_seg_gt.shape != image.shape[:2]:
                raise Seg2Error(
                    f"{sem_seg_file}: label map is {sem_seg_gt.shape[1]}x{sem_seg_gt.shape[0]} (WxH) but "
                    f"its image {dataset_dict['file_name']} is {image.shape[1]}x{image.shape[0]}"
                )

        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict

