"""seg2's datasets: loaders, registration of built-in names, and the multi-task mapper."""

from . import builtin  # noqa: F401  (registers seg2_shapes_{train,val})
from .builtin import SHAPES_DATASETS, load_shapes, register_seg2_shapes
from .catalog import check_dataset_names
from .coco import load_coco_with_sem_seg
from .dataset_mapper import MultiTaskDatasetMapper
from .label_map import read_label_map
from .shapes import SHAPES_CLASSES, default_shapes_root, generate_shapes

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_DATASETS",
    "check_dataset_names",
    "MultiTaskDatasetMapper",
    "default_shapes_root",
    "generate_shapes",
    "load_coco_with_sem_seg",
    "load_shapes",
    "read_label_map",
    "register_seg2_shapes",
]
