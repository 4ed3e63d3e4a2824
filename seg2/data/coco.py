"""COCO-format loading with an optional per-pixel semantic map per image."""

import os

from detectron2.data.datasets import load_coco_json

from ..utils import Seg2Error


def load_coco_with_sem_seg(json_file: str, image_root: str, sem_seg_root: str = None, dataset_name: str = None):
    """
    Load a COCO instances JSON with detectron2's ``load_coco_json`` and, when ``sem_seg_root`` is
    given, attach to every record the semantic map ``<sem_seg_root>/<image stem>.png`` as
    ``sem_seg_file_name``, so one record feeds both Mask R-CNN and a semantic head.

    Args:
        json_file (str): path to the COCO instances JSON.
        image_root (str): folder the JSON's ``file_name`` entries are relative to.
        sem_seg_root (str or None): folder of label-map PNGs named after the images.
        dataset_name (str or None): if given, thing classes and id mapping go into its metadata.

    Returns:
        list[dict]: detectron2's standard dataset dicts.
    """
    if not os.path.isfile(json_file):
        raise Seg2Error(f"{json_file}: COCO annotation file not found")
    records = load_coco_json(json_file, image_root, dataset_name)
    if sem_seg_root is not None:
        for r in records:
            stem = os.path.splitext(os.path.basename(r["file_name"]))[0]
            path = os.path.join(sem_seg_root, stem + ".png")
            if not os.path.isfile(path):
                raise Seg2Error(f"{path}: semantic map for image {r['file_name']} (id {r['image_id']}) not found")
            r["sem_seg_file_name"] = path
    return records
