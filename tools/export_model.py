#!/usr/bin/env python3
"""
Export a seg2 model to TorchScript or ONNX, in the shape of detectron2's
``tools/deploy/export_model.py``:

    python3 tools/export_model.py --config-file
    configs/quickstart/segnet_vgg16-tiny_shapes_cpu.yaml \\
        --format onnx --sample-image image.png --output output/export MODEL.WEIGHTS model_final.pth

The model is traced on the sample image (``--sample-image``, resized as the predictor does;
default: the first image of ``DATASETS.TEST``) and takes (C, H, W) float images of that size in
``INPUT.FORMAT``. ``--check`` runs the exported file on the sample and prints its max abs
difference to the eager model; ``--benchmark N`` then times both side by side. What each format
gives and the measured numerics: docs/export.md. The logic is in :mod:`seg2.export`.
"""

import argparse
import json
import logging

import torch
from benchmarks.timing import time_round_robin  # tools/benchmarks/timing.py
from detectron2.data import build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import seg2
from seg2.data import MultiTaskDatasetMapper, read_image
from seg2.export import (
    FORMATS,
    compare_with_eager,
    export_scripting,
    export_tracing,
    load_exported,
    load_weights_for_export,
)
from seg2.utils import Seg2Error
from seg2.utils.cli import add_debug_argument, check_device, run_tool

logger = logging.getLogger("seg2.export")


def setup_cfg(args):
    cfg = seg2.load_seg2_config(args.config_file, args.opts)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg = seg2.resolve_config(cfg, class_weights=False)
    cfg.freeze()
    check_device(cfg.MODEL.DEVICE)
    return cfg


def sample_image(cfg, path):
    """The (C, H, W) float image to trace on: ``path`` resized as ``Seg2Predictor`` does, or the
    first image of ``DATASETS.TEST`` as the test loader gives it."""
    if path is None:
        if not cfg.DATASETS.TEST:
            raise Seg2Error(
                "no --sample-image and DATASETS.TEST is empty: give an image to trace on"
            )
        mapper = MultiTaskDatasetMapper(cfg, False)
        return next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0], mapper=mapper)))[0][
            "image"
        ].float()
    image = read_image(path, format=cfg.INPUT.FORMAT)
    if cfg.INPUT.MIN_SIZE_TEST > 0:
        aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        image = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def check(model, adapter, path, image, repeats):
    """Print the exported model's difference to the eager model and, with ``repeats``, both
    latencies (median of calls taking turns, after one warm-up round) and their ratio."""
    run = load_exported(path, torch.get_num_threads())
    print(json.dumps({"check": compare_with_eager(model, adapter, run, image)}), flush=True)
    if repeats > 0:
        import numpy as np

        with torch.no_grad():
            times = time_round_robin(
                {"eager": lambda _: adapter(image), "exported": lambda _: run(image)}, 1, repeats
            )
        eager, exported = (float(np.median(times[k])) for k in ("eager", "exported"))
        print(
            json.dumps(
                {
                    "eager_s": eager,
                    "exported_s": exported,
                    "exported_over_eager": exported / eager,
                    "threads": torch.get_num_threads(),
                    "size": list(image.shape),
                }
            ),
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a seg2 model for deployment.")
    parser.add_argument("--format", choices=FORMATS, default="torchscript", help="output format")
    parser.add_argument(
        "--export-method",
        choices=["tracing", "scripting"],
        default="tracing",
        help="tracing (TorchScript and ONNX) or scripting (TorchScript; fails for seg2's models)",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--sample-image", default=None, help="image to trace on (default: first of DATASETS.TEST)"
    )
    parser.add_argument("--output", required=True, help="output directory for the exported model")
    parser.add_argument(
        "--check",
        action="store_true",
        help="run the exported model on the sample and print its max abs difference to the eager model",
    )
    parser.add_argument(
        "--benchmark",
        type=int,
        default=0,
        metavar="N",
        help="with --check: time N calls of eager and exported, side by side (CPU)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads of torch and onnxruntime (0: default)"
    )
    parser.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="export even with MODEL.WEIGHTS empty (a randomly initialised model)",
    )
    add_debug_argument(parser)
    parser.add_argument(
        "opts", default=None, nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    return run_tool(export, args, debug=args.debug)


def export(args):
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    setup_logger(name="seg2")
    setup_logger()
    cfg = setup_cfg(args)
    model = build_model(cfg)
    load_weights_for_export(model, cfg.MODEL.WEIGHTS, allow_random=args.allow_random_weights)
    model.eval()
    if args.export_method == "scripting":
        if args.format != "torchscript":
            raise Seg2Error(
                "--export-method scripting gives TorchScript only: use --format torchscript"
            )
        path = export_scripting(model, args.output)
    else:
        image = sample_image(cfg, args.sample_image)
        path, adapter = export_tracing(model, image, args.format, args.output)
        logger.info("Inputs schema: %s", adapter.inputs_schema)
        logger.info("Outputs schema: %s", adapter.outputs_schema)
        if args.check:
            check(model, adapter, path, image, args.benchmark)
    logger.info("Wrote %s", path)
    return path


if __name__ == "__main__":
    main()
