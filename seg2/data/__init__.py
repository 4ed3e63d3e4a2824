"""seg2's datasets: loaders, registration of built-in names, and the multi-task mapper."""

from . import builtin  # noqa: F401  (registers seg2_shapes_*, voc_2012_*, coco_2017_sem_seg_* ...)
from .builtin import (
    COCO_2017_SEM_SEG_SPLITS,
    SHAPES_DATASETS,
    SHAPES_PANOPTIC_DATASETS,
    VOC_2012_INSTANCE_SPLITS,
    VOC_2012_SEM_SEG_SPLITS,
    load_shapes,
    load_shapes_panoptic,
    register_all_coco_2017_sem_seg,
    register_all_voc_2012,
    register_seg2_shapes,
    register_seg2_shapes_panoptic,
)
from .camvid import (
    CAMVID_CLASSES,
    CAMVID_COLORS,
    CAMVID_SPLITS,
    CAMVID_VOID_LABEL,
    camvid_metadata,
    load_camvid,
    register_all_camvid,
    register_camvid,
)
from .catalog import check_dataset_names, register_dataset
from .coco import (
    load_coco_sem_seg,
    load_coco_with_sem_seg,
    register_coco_sem_seg,
    register_coco_with_sem_seg,
)
from .coco_json import check_coco_json
from .dataset_mapper import MultiTaskDatasetMapper
from .image import UINT16_MODES, read_image, to_uint8_image
from .label_map import (
    IGNORE_LABEL,
    check_label_values,
    read_label_map,
    read_sem_seg,
    sem_seg_format,
    write_label_map,
)
from .panoptic import (
    load_coco_panoptic_separated,
    panoptic_metadata,
    register_coco_panoptic_folder,
    separate_coco_panoptic,
)
from .sem_seg_cache import coco_sem_seg_map, generate_coco_sem_seg
from .sem_seg_folder import load_sem_seg_folder, register_sem_seg_folder
from .shapes import SHAPES_CLASSES, default_shapes_root, generate_shapes
from .shapes_panoptic import (
    PANOPTIC_STUFF_CLASSES,
    default_shapes_panoptic_root,
    generate_shapes_panoptic,
)
from .voc import (
    VOC_CLASSES,
    load_voc_instances,
    load_voc_sem_seg,
    load_voc_sem_seg_train_aug,
    register_voc_instances,
    register_voc_sem_seg,
    voc_metadata,
)

__all__ = [
    "separate_coco_panoptic",
    "register_coco_panoptic_folder",
    "panoptic_metadata",
    "load_coco_panoptic_separated",
    "register_seg2_shapes_panoptic",
    "load_shapes_panoptic",
    "generate_shapes_panoptic",
    "default_shapes_panoptic_root",
    "PANOPTIC_STUFF_CLASSES",
    "SHAPES_PANOPTIC_DATASETS",
    "CAMVID_CLASSES",
    "CAMVID_COLORS",
    "CAMVID_SPLITS",
    "CAMVID_VOID_LABEL",
    "IGNORE_LABEL",
    "camvid_metadata",
    "load_camvid",
    "load_sem_seg_folder",
    "register_all_camvid",
    "register_camvid",
    "register_sem_seg_folder",
    "sem_seg_format",
    "COCO_2017_SEM_SEG_SPLITS",
    "SHAPES_CLASSES",
    "SHAPES_DATASETS",
    "VOC_2012_INSTANCE_SPLITS",
    "VOC_2012_SEM_SEG_SPLITS",
    "VOC_CLASSES",
    "check_coco_json",
    "check_dataset_names",
    "check_label_values",
    "coco_sem_seg_map",
    "MultiTaskDatasetMapper",
    "default_shapes_root",
    "generate_coco_sem_seg",
    "generate_shapes",
    "load_coco_sem_seg",
    "load_coco_with_sem_seg",
    "load_shapes",
    "load_voc_instances",
    "load_voc_sem_seg",
    "load_voc_sem_seg_train_aug",
    "read_label_map",
    "read_sem_seg",
    "register_all_coco_2017_sem_seg",
    "register_all_voc_2012",
    "register_coco_sem_seg",
    "register_coco_with_sem_seg",
    "register_dataset",
    "register_seg2_shapes",
    "register_voc_instances",
    "register_voc_sem_seg",
    "voc_metadata",
    "write_label_map",
    "UINT16_MODES",
    "read_image",
    "to_uint8_image",
]
