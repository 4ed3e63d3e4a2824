#!/usr/bin/env python3
"""
Evaluate every saved checkpoint of a training run on one or more datasets, to see how much the
figures move from one checkpoint to the next (for diagnosis: the figure a run reports stays the
one its protocol picks, e.g. ``model_best_test.json``).

    python3 tools/eval_checkpoints.py --run-dir output/camvid/segnet-basic_10k --dataset camvid_val
    python3 tools/eval_checkpoints.py --run-dir output/x --dataset camvid_test MODEL.DEVICE cpu

It reads the run's ``OUTPUT_DIR/config.yaml`` (written by ``tools/train_net.py``), applies the
``KEY VALUE`` overrides given at the end, builds the model once and evaluates each of
``model_*.pth`` (periodic checkpoints, ``model_final.pth``, ``model_best.pth``) with
``seg2.engine.Trainer.test`` and the evaluator ``Trainer.build_evaluator`` picks. The table
(checkpoint, iteration, metrics) is printed and written to ``<output>.json`` and ``<output>.md``
(default ``OUTPUT_DIR/eval_checkpoints_<datasets>``); the evaluators' own files go under
``OUTPUT_DIR/eval_checkpoints/<checkpoint>/<dataset>/``. Bad input (no config, no checkpoint, an
unregistered dataset, an unreadable checkpoint) is one line ``seg2: error: ...``.
"""

import argparse
import glob
import json
import logging
import os
import re

from detectron2.data import DatasetCatalog
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

import seg2  # noqa: F401  (registers seg2's datasets and models)
from seg2.checkpoint import Seg2Checkpointer
from seg2.config import load_seg2_config
from seg2.engine import Trainer
from seg2.utils import Seg2Error
from seg2.utils.cli import add_debug_argument, run_tool

logger = logging.getLogger("seg2.eval_checkpoints")

# Columns of the printed table when present (every flat metric goes to the JSON file).
SUMMARY_METRICS = ("pACC", "mACC", "mIoU", "fwIoU", "AP", "AP50", "AP75", "PQ")
_PERIODIC = re.compile(r"model_(\d+)\.pth$")


def find_checkpoints(run_dir: str) -> list:
    """The ``model_*.pth`` files of ``run_dir``: periodic ones by iteration, then ``model_final``,
    then the rest (``model_best``) by name."""
    files = [p for p in glob.glob(os.path.join(run_dir, "model_*.pth")) if os.path.isfile(p)]

    def order(path):
        name = os.path.basename(path)
        m = _PERIODIC.match(name)
        if m:
            return (0, int(m.group(1)), name)
        return (1 if name == "model_final.pth" else 2, 0, name)

    return sorted(files, key=order)


def iterations_done(saved_iteration: int, max_iter: int) -> int:
    """Iterations trained when a checkpoint was saved: detectron2's checkpointers store the
    trainer's counter, ``k - 1`` after ``k`` iterations (``max_iter`` for a best model saved after
    the last one), as :class:`seg2.engine.hooks.BestModelTest` counts them."""
    return min(saved_iteration + 1, max_iter)


def summary_metrics(flat: dict) -> dict:
    """The whole-dataset figures of flattened results (``sem_seg/mIoU``, ``segm/AP``, ...), not the
    per-class ones (``sem_seg/IoU-Sky``, ``segm/AP-circle``)."""
    return {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] in SUMMARY_METRICS}


def evaluate_checkpoints(cfg, checkpoints, datasets, eval_dir: str) -> list:
    """One row per checkpoint: ``{"checkpoint", "iteration", "metrics": {dataset: results}}``
    (results flattened as ``sem_seg/mIoU``)."""
    model = Trainer.build_model(cfg)
    rows = []
    for path in checkpoints:
        name = os.path.splitext(os.path.basename(path))[0]
        extra = Seg2Checkpointer(model).load(path, checkpointables=[])
        saved = extra.get("iteration")
        iteration = iterations_done(int(saved), cfg.SOLVER.MAX_ITER) if saved is not None else None
        logger.info(f"Evaluating {path} (after {iteration} iterations) on {list(datasets)}")
        evaluators = [
            Trainer.build_evaluator(cfg, d, output_folder=os.path.join(eval_dir, name, d))
            for d in datasets
        ]
        results = Trainer.test(cfg, model, evaluators)
        if len(datasets) == 1:  # detectron2's test() drops the dataset level for one dataset
            results = {datasets[0]: results}
        metrics = {
            d: {k: float(v) for k, v in flatten_results_dict(results[d]).items()} for d in datasets
        }
        rows.append(
            {"checkpoint": os.path.basename(path), "iteration": iteration, "metrics": metrics}
        )
    return rows


def markdown_table(rows, datasets) -> str:
    """The rows as a markdown table: checkpoint, iteration and each dataset's summary figures."""
    columns = []
    for d in datasets:
        keys = []
        for r in rows:
            keys += [k for k in summary_metrics(r["metrics"][d]) if k not in keys]
        columns += [(d, k) for k in keys]
    prefix = len(datasets) > 1
    headers = ["checkpoint", "iteration"] + [f"{d} {k}" if prefix else k for d, k in columns]
    body = [
        [r["checkpoint"], "" if r["iteration"] is None else r["iteration"]]
        + [r["metrics"][d].get(k, float("nan")) for d, k in columns]
        for r in rows
    ]
    return tabulate(body, headers=headers, tablefmt="pipe", floatfmt=".2f")


def main(args):
    run_dir = args.run_dir
    config_file = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_file):
        raise Seg2Error(
            f"--run-dir {run_dir}: no config.yaml (tools/train_net.py writes it into OUTPUT_DIR); "
            "is this a run's output folder?"
        )
    checkpoints = find_checkpoints(run_dir)
    if not checkpoints:
        raise Seg2Error(f"--run-dir {run_dir}: no checkpoint (model_*.pth) to evaluate")
    cfg = load_seg2_config(config_file, args.opts)
    registered = DatasetCatalog.list()
    for d in args.dataset:
        if d not in registered:
            raise Seg2Error(
                f"--dataset {d!r} is not a registered dataset (seg2's names: docs/datasets.md)"
            )
    cfg.DATASETS.TEST = tuple(args.dataset)
    cfg.OUTPUT_DIR = run_dir
    cfg.freeze()
    setup_logger(name="seg2")
    setup_logger(name="detectron2")

    rows = evaluate_checkpoints(
        cfg, checkpoints, list(args.dataset), os.path.join(run_dir, "eval_checkpoints")
    )
    table = markdown_table(rows, args.dataset)
    output = args.output or os.path.join(run_dir, "eval_checkpoints_" + "+".join(args.dataset))
    with open(output + ".json", "w") as f:
        json.dump(
            {
                "run_dir": run_dir,
                "datasets": list(args.dataset),
                "opts": list(args.opts),
                "rows": rows,
            },
            f,
            indent=1,
        )
    note = (
        f"Checkpoints of {run_dir} on {', '.join(args.dataset)} (tools/eval_checkpoints.py). For "
        "diagnosis: the figure the run reports is the one its protocol picks "
        "(model_best_test.json)."
    )
    with open(output + ".md", "w") as f:
        f.write(note + "\n\n" + table + "\n")
    print(table)
    print(f"written: {output}.json, {output}.md")
    return rows


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--run-dir", required=True, help="a training run's OUTPUT_DIR (holds config.yaml)"
    )
    parser.add_argument(
        "--dataset",
        action="append",
        required=True,
        help="a registered dataset to evaluate on (repeat for more)",
    )
    parser.add_argument("--output", default="", help="path prefix of the .json and .md files")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return add_debug_argument(parser)


def invoke_main() -> None:
    args = build_parser().parse_args()
    run_tool(main, args, debug=args.debug)


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
