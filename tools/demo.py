#!/usr/bin/env python3
"""
Run a seg2 config and weights on images, a folder or a glob; write pictures and files.

    python tools/demo.py --config-file configs/quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml \
        --input "photos/*.jpg" more/ one.png --output demo_out MODEL.WEIGHTS output/model_final.pth

Per input image ``<name>``, in ``--output``:
  <name>_overlay_semantic.png   semantic classes blended over the image, legend on the right
  <name>_sem_seg.png            the raw semantic map, a palette PNG of class indices
  <name>_overlay_instances.png  instance masks, boxes, class and score (detectron2's Visualizer)
  <name>_overlay_panoptic.png   the panoptic segmentation (Visualizer.draw_panoptic_seg)
  <name>_panoptic.png           its segment ids as COCO panoptic colours (R + 256 G + 256^2 B)
for models that predict instances, ``instances_coco.json`` (COCO format, with scores), and for
those that predict panoptic segmentations, ``panoptic_segments.json`` (per image its PNG and
segments_info, category ids as the model gives them: contiguous thing ids, semantic stuff classes).
A file that cannot be read or run is reported at the end; the others are still written; the
exit status is 1 when any failed. Files in an input folder whose extension is not an image's are
skipped, and listed as such. A seg2 error of the setup (config, weights) ends it with one line
``seg2: error: ...`` and exit status 1 (``--debug``: with its traceback). Large images:
``TEST.TILING.ENABLED True INPUT.MIN_SIZE_TEST 0``.
"""

import argparse
import glob
import json
import logging
import os
import sys

import numpy as np
import tqdm
from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger
from PIL import Image

import seg2
from seg2.data import write_label_map
from seg2.data.panoptic import id2rgb
from seg2.inference import UINT16_MODES, Seg2Predictor, read_image
from seg2.inference.visualize import (
    background_indices,
    class_colors,
    class_names,
    draw_instances,
    draw_panoptic,
    draw_sem_seg_overlay,
    instances_to_coco_dataset,
)
from seg2.utils.cli import add_debug_argument, run_tool

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
logger = logging.getLogger("seg2.demo")


def get_parser():
    p = argparse.ArgumentParser(
        description="seg2 demo: predictions of a config on images, as PNGs and COCO JSON"
    )
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="image files, folders (their images) or glob patterns",
    )
    p.add_argument("--output", required=True, help="folder for the outputs (created)")
    p.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of instances drawn and written",
    )
    p.add_argument(
        "--alpha", type=float, default=0.5, help="opacity of semantic colours in the overlay"
    )
    p.add_argument(
        "--uint16", choices=UINT16_MODES, default="scale", help="how 16-bit images become 8-bit"
    )
    p.add_argument(
        "--max-pixels", type=int, default=0, help="refuse images larger than this (0: no limit)"
    )
    add_debug_argument(p)
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    return p


def setup_cfg(args):
    cfg = seg2.load_seg2_config(args.config_file, args.opts)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.freeze()
    return cfg


def expand_inputs(inputs, skipped=None):
    """(image paths in order, without repeats; [(pattern, problem)] for inputs that name nothing).
    Files of a folder that have no image extension are appended to ``skipped`` (a list)."""
    paths, problems = [], []
    for item in inputs:
        if os.path.isdir(item):
            entries = sorted(os.path.join(item, f) for f in os.listdir(item))
            found = [f for f in entries if f.lower().endswith(IMAGE_EXTENSIONS)]
            if skipped is not None:
                skipped += [f for f in entries if os.path.isfile(f) and f not in found]
            if not found:
                problems.append((item, f"folder has no images ({', '.join(IMAGE_EXTENSIONS)})"))
        elif glob.has_magic(item):
            found = sorted(f for f in glob.glob(item, recursive=True) if os.path.isfile(f))
            if not found:
                problems.append((item, "no file matches this pattern"))
        else:
            found = [item]  # read_image reports a missing or unreadable file by name
        for f in found:
            if f not in paths:
                paths.append(f)
    return paths, problems


def output_stem(path, used):
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = stem, 1
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    used.add(name)
    return name


def save_png(array, path):
    Image.fromarray(array).save(path)


def run(args) -> int:
    setup_logger(name="seg2")
    logger.setLevel(logging.INFO)
    cfg = setup_cfg(args)
    predictor = Seg2Predictor(cfg)
    metadata = predictor.metadata or MetadataCatalog.get("__unused")
    os.makedirs(args.output, exist_ok=True)
    skipped = []
    paths, failures = expand_inputs(args.input, skipped)
    for f in skipped:
        logger.warning("%s: skipped: not an image file name (%s)", f, ", ".join(IMAGE_EXTENSIONS))
    records, panoptic, used, done = [], [], set(), 0
    for path in tqdm.tqdm(paths, desc="demo", unit="image", file=sys.stderr):
        try:
            bgr = read_image(path, "BGR", uint16=args.uint16, max_pixels=args.max_pixels)
            try:
                out = predictor(bgr, sem_seg_output="labels")
            except (RuntimeError, ValueError) as e:
                raise seg2.Seg2Error(
                    f"{path}: inference failed on an image of {bgr.shape[1]}x{bgr.shape[0]} ({e})"
                ) from e
            rgb = np.ascontiguousarray(bgr[:, :, ::-1])
            stem = output_stem(path, used)
            if "sem_seg_labels" in out:
                labels = out["sem_seg_labels"].cpu().numpy()
                k = predictor.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
                colors, names = class_colors(metadata, k), class_names(metadata, k)
                if labels.dtype == np.uint8:
                    flat = [v for c in colors for v in c]
                    write_label_map(
                        labels,
                        os.path.join(args.output, f"{stem}_sem_seg.png"),
                        flat + [0] * (768 - len(flat)),
                    )
                else:
                    logger.warning(
                        "%s: %d classes do not fit a palette PNG; no %s_sem_seg.png written",
                        path,
                        k,
                        stem,
                    )
                overlay = draw_sem_seg_overlay(
                    rgb, labels, colors, names, background_indices(names), args.alpha
                )
                save_png(overlay, os.path.join(args.output, f"{stem}_overlay_semantic.png"))
            if "instances" in out:
                instances = out["instances"].to("cpu")
                save_png(
                    draw_instances(rgb, instances, metadata),
                    os.path.join(args.output, f"{stem}_overlay_instances.png"),
                )
                records.append(
                    {
                        "file_name": path,
                        "height": rgb.shape[0],
                        "width": rgb.shape[1],
                        "instances": instances,
                    }
                )
            if "panoptic_seg" in out:
                segment_ids, segments_info = out["panoptic_seg"]
                segment_ids = segment_ids.to("cpu")
                drawn = draw_panoptic(rgb, segment_ids, segments_info, metadata)
                save_png(drawn, os.path.join(args.output, f"{stem}_overlay_panoptic.png"))
                png = f"{stem}_panoptic.png"
                save_png(id2rgb(segment_ids.numpy()), os.path.join(args.output, png))
                entry = {"file_name": path, "panoptic_png": png, "segments_info": segments_info}
                panoptic.append(entry)
            done += 1
        except seg2.Seg2Error as e:
            failures.append((path, str(e)))
            logger.error("%s", e)
        except Exception as e:  # an unexpected failure on one file must not stop the others
            failures.append((path, f"{type(e).__name__}: {e}"))
            logger.exception("%s: failed", path)
    if records:
        with open(os.path.join(args.output, "instances_coco.json"), "w") as f:
            json.dump(instances_to_coco_dataset(records, metadata), f)
    if panoptic:
        with open(os.path.join(args.output, "panoptic_segments.json"), "w") as f:
            json.dump(panoptic, f)
    summary = f"demo: {done} image(s) written to {args.output}, {len(failures)} failed"
    print(summary + (":" if failures else ""))
    for path, problem in failures:
        print(f"  {path}: {problem}" if not problem.startswith(str(path)) else f"  {problem}")
    if skipped:
        print(f"demo: {len(skipped)} file(s) in the input folders skipped, not image file names:")
        for f in skipped:
            print(f"  {f}")
    return 1 if failures else 0


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    return run_tool(run, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
