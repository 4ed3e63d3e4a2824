#!/usr/bin/env python3
"""
The Mask R-CNN RoI pooling ablation (He et al., ICCV 2017, Table 2c): train and evaluate one model
per pooler variant with identical seed, schedule and data, then write a table, a JSON and a chart.

    # the six variants on seg2_shapes, CPU (configs/pooler_ablation/*_R18_FPN_shapes_cpu.yaml)
    OMP_NUM_THREADS=1 python tools/ablate_poolers.py --output-dir output/pooler_ablation_shapes
    # COCO, R50-C4 as in the paper (8 GPUs)
    python tools/ablate_poolers.py --num-gpus 8 --output-dir output/pooler_ablation_c4 \\
        --configs 'configs/pooler_ablation/mask_rcnn_*_R50_C4_1x_coco.yaml'
    # any config key for every variant, e.g. a shorter schedule:
    python tools/ablate_poolers.py ... SOLVER.MAX_ITER 300 SOLVER.STEPS "(240, 280)"

Re-running the same command resumes: finished variants (``<output-dir>/<variant>/ablation_result.json``,
also written for a variant whose training diverged, marked so in the table) are skipped, an unfinished one resumes from its last checkpoint (detectron2's resume; the data
order restarts from the seed). Outputs in ``--output-dir``: ``ablation.md``, ``ablation.json``,
``ablation.png``.
"""

import argparse
import glob
import json
import logging
import os
import platform
import statistics
import sys

import torch
from torch import nn

from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

import seg2
from seg2.data import check_dataset_names
from seg2.engine import Trainer
from seg2.utils.benchmark import timed

logger = logging.getLogger("seg2.ablate_poolers")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = os.path.join(REPO_ROOT, "configs", "pooler_ablation", "mask_rcnn_*_R18_FPN_shapes_cpu.yaml")
RESULT_FILE = "ablation_result.json"

# Mask R-CNN paper, Table 2c (ResNet-50-C4, COCO minival): mask AP, AP50, AP75.
PAPER_TABLE_2C = {
    ("ROIPool", "max"): (26.9, 48.8, 26.4),
    ("ROIWarp", "max"): (27.2, 49.2, 27.1),
    ("ROIWarp", "avg"): (27.1, 48.9, 27.1),
    ("ROIAlign", "max"): (30.2, 51.0, 31.8),
    ("ROIAlign", "avg"): (30.3, 51.2, 31.5),
}
# Keys that may differ between variants; everything else must be identical.
_POOLER_KEYS = (
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
    "MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION",
    "MODEL.ROI_MASK_HEAD.POOLER_AGGREGATION",
    "OUTPUT_DIR",
)


class _TimedModel(nn.Module):
    """Wraps a model for inference_on_dataset and records the wall time of each forward call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seconds = []  # per call
        self.images = []  # per call

    def forward(self, inputs):
        outputs, seconds = timed(lambda: self.model(inputs), "cuda" if torch.cuda.is_available() else "cpu")
        self.seconds.append(seconds)
        self.images.append(len(inputs))
        return outputs

    def seconds_per_image(self) -> float:
        # Skip the first calls as detectron2's inference_on_dataset does (warm-up).
        skip = min(5, len(self.seconds) - 1)
        return sum(self.seconds[skip:]) / max(1, sum(self.images[skip:]))


class AblationTrainer(Trainer):
    """seg2's Trainer whose final evaluation also times the model's forward per image."""

    last_seconds_per_image = float("nan")

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        timed = _TimedModel(model)
        results = super().test(cfg, timed, evaluators)
        AblationTrainer.last_seconds_per_image = timed.seconds_per_image()
        return results


def variant_cfg(config_file: str, opts, output_dir: str, seed: int):
    """The frozen config of one variant, with the shared seed and its own output folder."""
    cfg = seg2.load_seg2_config(config_file, opts)
    cfg.SEED = seed
    cfg.OUTPUT_DIR = os.path.join(output_dir, os.path.splitext(os.path.basename(config_file))[0])
    check_dataset_names(cfg)
    cfg.freeze()
    return cfg


def _flatten(node, prefix=""):
    out = {}
    for k, v in node.items():
        key = prefix + k
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_same_protocol(cfgs: dict):
    """Raise Seg2Error unless the variants differ only in their pooler keys (same seed, schedule,
    data, model otherwise)."""
    items = list(cfgs.items())
    ref_name, ref = items[0]
    ref_flat = {k: v for k, v in _flatten(ref).items() if k not in _POOLER_KEYS}
    for name, cfg in items[1:]:
        flat = {k: v for k, v in _flatten(cfg).items() if k not in _POOLER_KEYS}
        diff = sorted(k for k in set(flat) | set(ref_flat) if flat.get(k) != ref_flat.get(k))
        if diff:
            raise seg2.Seg2Error(
                f"{name} and {ref_name} differ in more than the pooler: {', '.join(diff)} "
                f"(e.g. {diff[0]}: {flat.get(diff[0])!r} vs {ref_flat.get(diff[0])!r}); an ablation compares "
                "variants trained with identical seed, schedule and data"
            )


def pooler_of(cfg):
    """(pooler type, aggregation) of the box head; the natural aggregation when none is set."""
    from seg2.modeling.poolers import POOLER_AGGREGATIONS

    ptype = cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE
    agg = cfg.MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION or POOLER_AGGREGATIONS.get(ptype, ("avg",))[0]
    return ptype, agg


def train_s_per_iter(output_dir: str) -> float:
    """Median of detectron2's per-iteration ``time`` (data + step) over the run, from metrics.json.

    metrics.json is appended to by every session; where the iteration goes back (a resume from an
    earlier checkpoint, or a restart), the later session's records replace the earlier ones."""
    path = os.path.join(output_dir, "metrics.json")
    times = {}  # iteration -> time
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "time" in record:
                    it = record["iteration"]
                    times = {k: v for k, v in times.items() if k < it}
                    times[it] = record["time"]
    return statistics.median(times.values()) if times else float("nan")


def run_variant(name: str, cfg) -> dict:
    """Train (or resume) and evaluate one variant; reuse its result when it already finished."""
    result_path = os.path.join(cfg.OUTPUT_DIR, RESULT_FILE)
    if os.path.exists(result_path):
        logger.info(f"{name}: finished before, reading {result_path}")
        with open(result_path) as f:
            return json.load(f)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    seed_all_rng(cfg.SEED)  # identical initial weights and data order for every variant
    trainer = AblationTrainer(cfg)
    trainer.resume_or_load(resume=True)
    logger.info(f"{name}: training from iteration {trainer.start_iter} to {cfg.SOLVER.MAX_ITER}")
    status = "finished"
    try:
        trainer.train()  # ends with the evaluation (detectron2's EvalHook after the last iteration)
        results = trainer._last_eval_results  # what DefaultTrainer.train itself verifies
    except FloatingPointError as e:  # detectron2's "Loss became infinite or NaN" / "Training has diverged"
        logger.error(f"{name}: training diverged at iteration {trainer.iter}: {e}")
        status, results = f"diverged at iteration {trainer.iter}", {}
        AblationTrainer.last_seconds_per_image = float("nan")
    if not comm.is_main_process():
        return {}
    ptype, agg = pooler_of(cfg)
    segm, bbox = results.get("segm", {}), results.get("bbox", {})
    row = {
        "variant": name,
        "status": status,
        "pooler_type": ptype,
        "aggregation": agg,
        "mask_pooler_type": cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE,
        "sampling_ratio": cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
        "mask_AP": segm.get("AP", float("nan")),
        "mask_AP50": segm.get("AP50", float("nan")),
        "mask_AP75": segm.get("AP75", float("nan")),
        "box_AP": bbox.get("AP", float("nan")),
        "train_s_per_iter": train_s_per_iter(cfg.OUTPUT_DIR),
        "inference_s_per_image": AblationTrainer.last_seconds_per_image,
        "iterations": cfg.SOLVER.MAX_ITER,
        "config": cfg.dump(),
    }
    with open(result_path, "w") as f:
        json.dump(row, f, indent=1)
    return row


def _fmt(x, digits=1):
    return "n/a" if x != x else f"{x:.{digits}f}"  # NaN-safe


def markdown_table(rows) -> str:
    lines = [
        "| variant | pooler | agg. | mask AP | AP50 | AP75 | box AP | train s/iter | inference s/image "
        "| paper mask AP / AP50 / AP75 (R50-C4, COCO) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        paper = PAPER_TABLE_2C.get((r["pooler_type"], r["aggregation"]))
        paper_txt = " / ".join(f"{v:.1f}" for v in paper) if paper else "—"
        status = "" if r.get("status", "finished") == "finished" else f" ({r['status']})"
        lines.append(
            f"| {r['variant']}{status} | {r['pooler_type']} | {r['aggregation']} | {_fmt(r['mask_AP'])} | "
            f"{_fmt(r['mask_AP50'])} | {_fmt(r['mask_AP75'])} | {_fmt(r['box_AP'])} | "
            f"{_fmt(r['train_s_per_iter'], 3)} | {_fmt(r['inference_s_per_image'], 4)} | {paper_txt} |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(rows, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("mask_AP", "mask AP"), ("mask_AP75", "mask AP75"), ("box_AP", "box AP")]
    labels = [f"{r['pooler_type']}\n({r['aggregation']})" for r in rows]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    for i, (key, title) in enumerate(metrics):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [0.0 if r[key] != r[key] else r[key] for r in rows], width, label=title)  # NaN: no bar
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("AP (COCO, %)")
    ax.set_title("RoI pooling ablation")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(metrics))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(rows, output_dir: str, command: str):
    os.makedirs(output_dir, exist_ok=True)
    table = markdown_table(rows)
    machine = (
        f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), "
        f"{'GPU: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}"
    )
    with open(os.path.join(output_dir, "ablation.md"), "w") as f:
        f.write(f"# RoI pooling ablation\n\nCommand: `{command}`\n\nMachine: {machine}\n\n{table}")
    with open(os.path.join(output_dir, "ablation.json"), "w") as f:
        json.dump({"command": command, "machine": machine, "variants": rows}, f, indent=1)
    bar_chart(rows, os.path.join(output_dir, "ablation.png"))
    return table


def main(args):
    setup_logger(os.path.join(args.output_dir, "log.txt"), distributed_rank=comm.get_rank())
    setup_logger(os.path.join(args.output_dir, "log.txt"), distributed_rank=comm.get_rank(), name="seg2")
    configs = []
    for pattern in args.configs or [DEFAULT_CONFIGS]:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise seg2.Seg2Error(f"--configs {pattern}: no such config file")
        configs += matches
    cfgs = {
        os.path.splitext(os.path.basename(p))[0]: variant_cfg(p, args.opts, args.output_dir, args.seed) for p in configs
    }
    check_same_protocol(cfgs)
    rows = [run_variant(name, cfg) for name, cfg in cfgs.items()]
    if comm.is_main_process():
        table = write_report(rows, args.output_dir, " ".join([sys.executable.split("/")[-1]] + sys.argv))
        logger.info("RoI pooling ablation:\n" + table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        action="append",
        help=f"a variant config or a quoted glob of them; repeatable (default: '{DEFAULT_CONFIGS}')",
    )
    parser.add_argument("--output-dir", default="output/pooler_ablation_shapes")
    parser.add_argument("--seed", type=int, default=1, help="SEED of every variant")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs applied to every variant")
    return parser.parse_args(argv)


def invoke_main():
    args = parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    try:
        launch(main, args.num_gpus, args=(args,))
    except seg2.Seg2Error as e:
        sys.exit(f"seg2: error: {e}")


if __name__ == "__main__":
    invoke_main()
