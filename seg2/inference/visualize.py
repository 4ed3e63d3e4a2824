"""Pictures and files of predictions: semantic overlays with a legend, instance overlays (detectron2's
``Visualizer``), palette PNGs of semantic maps and COCO JSON of instances."""

from typing import List, Optional, Sequence

import numpy as np
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

from ..data.voc_palette import palette_colors

__all__ = [
    "BACKGROUND_NAMES",
    "background_indices",
    "class_colors",
    "class_names",
    "draw_instances",
    "draw_panoptic",
    "draw_sem_seg_overlay",
    "instances_to_coco_dataset",
]

# Semantic classes left undrawn in overlays.
BACKGROUND_NAMES = ("background", "__background__", "_background_", "bg")


def class_colors(metadata, num_classes: int) -> List[tuple]:
    """``num_classes`` RGB colours: the metadata's ``stuff_colors`` where it has enough, else
    Pascal VOC's colour map (what the palette PNGs of VOC and seg2_shapes use)."""
    colors = metadata.get("stuff_colors", None) if metadata is not None else None
    if colors is not None and len(colors) >= num_classes:
        return [tuple(int(v) for v in c) for c in colors[:num_classes]]
    return palette_colors(num_classes)


def class_names(metadata, num_classes: int) -> List[str]:
    names = metadata.get("stuff_classes", None) if metadata is not None else None
    if names is not None and len(names) >= num_classes:
        return list(names[:num_classes])
    return [f"class {i}" for i in range(num_classes)]


def background_indices(names: Sequence[str]) -> List[int]:
    """Indices of the classes named as background (:data:`BACKGROUND_NAMES`)."""
    return [i for i, n in enumerate(names) if str(n).lower() in BACKGROUND_NAMES]


def draw_sem_seg_overlay(
    image_rgb: np.ndarray,
    labels: np.ndarray,
    colors: Sequence[tuple],
    names: Sequence[str],
    background: Sequence[int] = (),
    alpha: float = 0.5,
) -> np.ndarray:
    """
    The image with each non-background class blended in its colour (``round(alpha * colour +
    (1 - alpha) * pixel)``), background pixels untouched, and a legend of the classes present
    (colour, name, share of pixels) in a panel to the right. The image occupies
    ``[:H, :W]`` of the result.

    Args:
        image_rgb (ndarray): (H, W, 3) uint8 RGB.
        labels (ndarray): (H, W) class indices.
        colors (list[tuple]): RGB per class.
        names (list[str]): name per class.
        background (list[int]): classes not drawn.
        alpha (float): opacity of the class colours.
    """
    h, w = labels.shape
    palette = np.asarray(colors, dtype=np.float32)
    fg = ~np.isin(labels, list(background))
    out = image_rgb.copy()
    blended = alpha * palette[labels[fg]] + (1 - alpha) * image_rgb[fg].astype(np.float32)
    out[fg] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    present, counts = np.unique(labels, return_counts=True)
    title = "classes (share of pixels)"
    lines = [
        f"{names[c]} {100.0 * n / labels.size:.1f}%" + (" (not drawn)" if c in background else "")
        for c, n in zip(present, counts)
    ]
    row, pad, swatch = 16, 6, 18
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    panel_w = 2 * pad + swatch + int(max(measure.textlength(t) for t in [title] + lines))
    canvas = Image.new(
        "RGB", (w + panel_w, max(h, pad * 2 + row * (len(lines) + 1))), (255, 255, 255)
    )
    canvas.paste(Image.fromarray(out), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((w + pad, pad), title, fill=(0, 0, 0))
    for i, (c, line) in enumerate(zip(present, lines)):
        y = pad + row * (i + 1)
        draw.rectangle(
            [w + pad, y + 2, w + pad + 12, y + 12], fill=tuple(colors[c]), outline=(0, 0, 0)
        )
        draw.text((w + pad + swatch, y), line, fill=(0, 0, 0))
    return np.asarray(canvas)


def draw_instances(image_rgb: np.ndarray, instances, metadata) -> np.ndarray:
    """Instance masks, boxes, class names and scores drawn by detectron2's ``Visualizer`` (RGB)."""
    vis = Visualizer(image_rgb, metadata, scale=1.0, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(instances).get_image()


def draw_panoptic(image_rgb: np.ndarray, panoptic_seg, segments_info, metadata) -> np.ndarray:
    """A panoptic segmentation ((H, W) segment ids and segments_info, as detectron2's PanopticFPN
    and seg2's multi-task model return it) drawn by detectron2's ``Visualizer.draw_panoptic_seg``
    (RGB): things by ``thing_classes``, stuff by ``stuff_classes`` of the separated layout."""
    vis = Visualizer(image_rgb, metadata, scale=1.0, instance_mode=ColorMode.IMAGE)
    return vis.draw_panoptic_seg(panoptic_seg, segments_info).get_image()


def instances_to_coco_dataset(
    records: List[dict], metadata, categories: Optional[List[dict]] = None
) -> dict:
    """
    A COCO-format dict ("images", "annotations" with "score", "categories") of predictions.

    Args:
        records (list[dict]): per image "file_name", "height", "width", "instances" (CPU).
        metadata: with ``thing_classes`` and optionally ``thing_dataset_id_to_contiguous_id``
            (predicted contiguous ids are mapped back to the dataset's ids, as COCOEvaluator does).
    """
    names = list(metadata.get("thing_classes", [])) if metadata is not None else []
    to_dataset = {
        v: k
        for k, v in (
            metadata.get("thing_dataset_id_to_contiguous_id", {}) if metadata is not None else {}
        ).items()
    }
    images, annotations = [], []
    num_classes = len(names)
    for image_id, r in enumerate(records, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": r["file_name"],
                "height": r["height"],
                "width": r["width"],
            }
        )
        for ann in instances_to_coco_json(r["instances"], image_id):
            c = ann["category_id"]
            num_classes = max(num_classes, c + 1)
            ann["category_id"] = to_dataset.get(c, c + 1 if not to_dataset else c)
            ann["id"] = len(annotations) + 1
            ann["iscrowd"] = 0
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            if "segmentation" in ann:
                ann["area"] = float(mask_util.area(ann["segmentation"]))
            annotations.append(ann)
    if categories is None:
        categories = [
            {
                "id": to_dataset.get(i, i + 1 if not to_dataset else i),
                "name": names[i] if i < len(names) else f"class {i}",
            }
            for i in range(num_classes)
        ]
    return {"images": images, "annotations": annotations, "categories": categories}
