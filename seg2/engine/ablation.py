"""
Ablation studies: train and evaluate a set of config variants under one protocol (same schedule,
data and model but for the keys the study varies), over several seeds, and report mean ± std.

Two studies are built in:

* ``poolers``: the Mask R-CNN RoI pooling ablation (He et al., ICCV 2017, Table 2c): the variants
  differ in ``MODEL.ROI_{BOX,MASK}_HEAD.POOLER_{TYPE,AGGREGATION}``; metrics mask AP / AP50 / AP75
  and box AP; the report says in how many seeds the paper's ordering holds (RoIAlign above RoIPool
  and RoIWarp in mask AP, the gap largest at AP75).
* ``decoders``: semantic decoder variants (SegNet-Basic / FCN-Basic / bilinear, SegNet paper
  Table 1): the variants differ in head keys (``MODEL.{SEGNET,FCN,UNET,DEEPLAB}_HEAD.*``);
  metrics global accuracy, class-average accuracy and mIoU.

``tools/ablate.py`` is the command line. Each (variant, seed) trains in
``<output-dir>/<variant>/seed<k>/``; a finished one (its ``ablation_result.json``, also written for
a run that diverged) is read back, an unfinished one resumes from its last checkpoint.
"""

import json
import logging
import math
import os
import platform
import statistics
from typing import Dict, List, Sequence

import torch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch import nn

from ..config import load_seg2_config
from ..data import check_dataset_names
from ..utils import Seg2Error
from ..utils.benchmark import timed
from ..utils.progress import log_progress
from .defaults import Trainer

__all__ = [
    "STUDIES",
    "AblationTrainer",
    "variant_cfg",
    "detect_study",
    "check_same_protocol",
    "train_s_per_iter",
    "run_variant",
    "aggregate",
    "pooler_ordering",
    "write_report",
    "read_result",
    "run_ablation",
    "evaluation_protocol",
]

logger = logging.getLogger(__name__)

RESULT_FILE = "ablation_result.json"

# Mask R-CNN paper, Table 2c (ResNet-50-C4, COCO minival): mask AP, AP50, AP75.
PAPER_TABLE_2C = {
    ("ROIPool", "max"): (26.9, 48.8, 26.4),
    ("ROIWarp", "max"): (27.2, 49.2, 27.1),
    ("ROIWarp", "avg"): (27.1, 48.9, 27.1),
    ("ROIAlign", "max"): (30.2, 51.0, 31.8),
    ("ROIAlign", "avg"): (30.3, 51.2, 31.5),
}

_HEAD_NODES = ("MODEL.SEGNET_HEAD.", "MODEL.FCN_HEAD.", "MODEL.UNET_HEAD.", "MODEL.DEEPLAB_HEAD.")
_HEAD_CHOICE = ("MODEL.SEM_SEG_HEAD.NAME", "MODEL.SEM_SEG_HEAD.IN_FEATURES")
STUDIES = {
    "poolers": {
        "title": "RoI pooling ablation",
        "varies": lambda k: k.startswith(("MODEL.ROI_BOX_HEAD.POOLER_", "MODEL.ROI_MASK_HEAD.POOLER_"))
        and k.endswith(("_TYPE", "_AGGREGATION")),
        "metrics": [("mask_AP", "segm", "AP"), ("mask_AP50", "segm", "AP50"), ("mask_AP75", "segm", "AP75"),
                    ("box_AP", "bbox", "AP")],  # fmt: skip
    },
    "decoders": {
        "title": "Decoder ablation",
        # the head's own keys, and which head on which backbone features
        "varies": lambda k: k.startswith(_HEAD_NODES) or k in _HEAD_CHOICE,
        "metrics": [("global_acc", "sem_seg", "pACC"), ("class_avg_acc", "sem_seg", "mACC"),
                    ("mIoU", "sem_seg", "mIoU")],  # fmt: skip
    },
}
_ALWAYS_DIFFERENT = ("OUTPUT_DIR", "SEED")


class _TimedModel(nn.Module):
    """Wraps a model for inference_on_dataset and records the wall time of each forward call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seconds, self.images = [], []  # per call

    def forward(self, inputs):
        outputs, seconds = timed(lambda: self.model(inputs), "cuda" if torch.cuda.is_available() else "cpu")
        self.seconds.append(seconds)
        self.images.append(len(inputs))
        return outputs

    def seconds_per_image(self) -> float:
        skip = min(5, len(self.seconds) - 1)  # warm-up, as detectron2's inference_on_dataset skips
        return sum(self.seconds[skip:]) / max(1, sum(self.images[skip:]))


class AblationTrainer(Trainer):
    """seg2's Trainer whose final evaluation also times the model's forward per image."""

    last_seconds_per_image = float("nan")

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        wrapped = _TimedModel(model)
        results = super().test(cfg, wrapped, evaluators)
        AblationTrainer.last_seconds_per_image = wrapped.seconds_per_image()
        return results


def variant_cfg(config_file: str, opts, output_dir: str, seed: int):
    """The frozen config of one (variant, seed): its own output folder ``<variant>/seed<seed>``."""
    cfg = load_seg2_config(config_file, opts)
    cfg.SEED = seed
    variant = os.path.splitext(os.path.basename(config_file))[0]
    cfg.OUTPUT_DIR = os.path.join(output_dir, variant, f"seed{seed}")
    check_dataset_names(cfg)
    cfg.freeze()
    return cfg


def _flatten(node, prefix=""):
    out = {}
    for k, v in node.items():
        key = prefix + k
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def detect_study(cfgs: Dict[str, object]) -> str:
    """``poolers`` for instance models (RoI heads), ``decoders`` for semantic-only ones."""
    metas = {cfg.MODEL.META_ARCHITECTURE for cfg in cfgs.values()}
    return "decoders" if metas <= {"Seg2SemanticSegmentor", "SemanticSegmentor"} else "poolers"


def check_same_protocol(cfgs: Dict[str, object], study: str = None):
    """Raise :class:`Seg2Error` unless the variants differ only in the keys ``study`` varies (the
    same seed, schedule, data and model otherwise)."""
    study = study or detect_study(cfgs)
    varies = STUDIES[study]["varies"]
    items = list(cfgs.items())
    ref_name, ref = items[0]

    def fixed(cfg):
        return {k: v for k, v in _flatten(cfg).items() if k not in _ALWAYS_DIFFERENT and not varies(k)}

    ref_flat = fixed(ref)
    for name, cfg in items[1:]:
        flat = fixed(cfg)
        diff = sorted(k for k in set(flat) | set(ref_flat) if flat.get(k) != ref_flat.get(k))
        if diff:
            raise Seg2Error(
                f"{name} and {ref_name} differ in more than the {study} study varies: {', '.join(diff)} "
                f"(e.g. {diff[0]}: {flat.get(diff[0])!r} vs {ref_flat.get(diff[0])!r}); an ablation compares "
                "variants trained with identical schedule and data"
            )


def pooler_of(cfg):
    """(pooler type, aggregation) of the box head; the natural aggregation when none is set."""
    from ..modeling.poolers import POOLER_AGGREGATIONS

    ptype = cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE
    return ptype, cfg.MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION or POOLER_AGGREGATIONS.get(ptype, ("avg",))[0]


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


def run_variant(name: str, cfg, study: str) -> dict:
    """Train (or resume) and evaluate one (variant, seed); read its result back when it finished."""
    result_path = os.path.join(cfg.OUTPUT_DIR, RESULT_FILE)
    if os.path.exists(result_path):
        logger.info(f"{name} seed {cfg.SEED}: finished before, reading {result_path}")
        with open(result_path) as f:
            return json.load(f)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    seed_all_rng(cfg.SEED)  # identical initial weights and data order for every variant of a seed
    trainer = AblationTrainer(cfg)
    trainer.resume_or_load(resume=True)
    logger.info(f"{name} seed {cfg.SEED}: training from iteration {trainer.start_iter} to {cfg.SOLVER.MAX_ITER}")
    status = "finished"
    try:
        trainer.train()  # ends with the evaluation (detectron2's EvalHook after the last iteration)
        results = trainer._last_eval_results  # what DefaultTrainer.train itself verifies
    except FloatingPointError as e:  # detectron2's "Loss became infinite or NaN"
        logger.error(f"{name} seed {cfg.SEED}: training diverged at iteration {trainer.iter}: {e}")
        status, results = f"diverged at iteration {trainer.iter}", {}
        AblationTrainer.last_seconds_per_image = float("nan")
    if not comm.is_main_process():
        return {}
    row = {"variant": name, "seed": cfg.SEED, "status": status, "evaluated": evaluation_protocol(cfg)}
    if cfg.SEG2.BEST_CHECKPOINT.TEST_DATASETS:  # the best model on val, tested (BestModelTest)
        best = getattr(trainer, "best_model_test", None) if status == "finished" else None
        results = best["results"] if best else {}
        row["selected_iteration"] = best["iteration"] if best else None
    if study == "poolers":
        row["pooler_type"], row["aggregation"] = pooler_of(cfg)
    for column, task, key in STUDIES[study]["metrics"]:
        row[column] = results.get(task, {}).get(key, float("nan"))
    row.update(
        train_s_per_iter=train_s_per_iter(cfg.OUTPUT_DIR),
        inference_s_per_image=AblationTrainer.last_seconds_per_image,
        iterations=cfg.SOLVER.MAX_ITER,
        config=cfg.dump(),
    )
    with open(result_path, "w") as f:
        json.dump(row, f, indent=1)
    return row


def evaluation_protocol(cfg) -> str:
    """What the reported metrics are of: the final model on ``DATASETS.TEST``, or the best model
    by ``SEG2.BEST_CHECKPOINT.METRIC`` on ``DATASETS.TEST`` tested on its ``TEST_DATASETS``."""
    best = cfg.SEG2.BEST_CHECKPOINT
    if best.TEST_DATASETS:
        return (
            f"{', '.join(best.TEST_DATASETS)}: the checkpoint with the best {best.METRIC} on "
            f"{', '.join(cfg.DATASETS.TEST)} (evaluated every {cfg.TEST.EVAL_PERIOD} iterations and at the end)"
        )
    return f"{', '.join(cfg.DATASETS.TEST)}: the final model"


def _mean_std(values: Sequence[float]):
    """Mean and sample std; the std is NaN (not 0) for one value, where there is no spread to tell."""
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def aggregate(rows: List[dict], study: str) -> List[dict]:
    """One row per variant: mean and sample std of each metric over its finished seeds (diverged
    runs are left out and counted), and the mean timings."""
    by_variant = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    out = []
    for variant, runs in by_variant.items():
        ok = [r for r in runs if r["status"] == "finished"]
        agg = {"variant": variant, "n": len(ok), "runs": len(runs), "seeds": sorted(r["seed"] for r in runs)}
        if study == "poolers":
            agg["pooler_type"], agg["aggregation"] = runs[0]["pooler_type"], runs[0]["aggregation"]
        for column, _, _ in STUDIES[study]["metrics"] + [("train_s_per_iter", 0, 0), ("inference_s_per_image", 0, 0)]:
            agg[column], agg[column + "_std"] = _mean_std([r[column] for r in ok])
        out.append(agg)
    return out


def pooler_ordering(rows: List[dict]) -> dict:
    """Whether the paper's ordering holds: per seed, every RoIAlign variant above every RoIPool and
    RoIWarp variant in mask AP; and the RoIAlign gap largest at AP75.

    The per-seed verdict counts only the seeds in which every variant finished (a seed where a
    variant diverged or has not run yet is listed in ``incomplete_seeds``, not judged on the rest).
    The gaps are the mean of the RoIAlign variants' means minus the mean of the other variants'
    means (each variant weighs the same, whatever its number of finished seeds): the table's rows."""
    align = lambda r: r["pooler_type"] in ("ROIAlign", "ROIAlignV2")  # noqa: E731
    variants = {r["variant"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    holds, complete = 0, []
    for s in seeds:
        runs = [r for r in rows if r["seed"] == s and r["status"] == "finished"]
        if {r["variant"] for r in runs} != variants:
            continue
        complete.append(s)
        a = [r["mask_AP"] for r in runs if align(r)]
        b = [r["mask_AP"] for r in runs if not align(r)]
        holds += bool(a and b and min(a) > max(b))
    aggs = aggregate(rows, "poolers")

    def gap(key):
        a = [g[key] for g in aggs if g["pooler_type"] in ("ROIAlign", "ROIAlignV2") and g[key] == g[key]]
        b = [g[key] for g in aggs if g["pooler_type"] not in ("ROIAlign", "ROIAlignV2") and g[key] == g[key]]
        return (statistics.mean(a) - statistics.mean(b)) if a and b else float("nan")

    gaps = {k: gap(k) for k in ("mask_AP", "mask_AP50", "mask_AP75")}
    largest = max(gaps, key=lambda k: -math.inf if gaps[k] != gaps[k] else gaps[k])
    return {
        "holds_in_seeds": holds, "seeds": len(complete), "incomplete_seeds": [s for s in seeds if s not in complete],
        "gaps": gaps, "largest_gap_at_AP75": gaps["mask_AP75"] == gaps["mask_AP75"] and largest == "mask_AP75",
    }  # fmt: skip


def _fmt(mean, std, digits=1):
    if mean != mean:
        return "n/a"
    if std != std:  # one value: the mean alone
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(aggs: List[dict], study: str) -> str:
    metrics = [c for c, _, _ in STUDIES[study]["metrics"]]
    extra = ["pooler", "agg."] if study == "poolers" else []
    head = ["variant", "n"] + extra + metrics + ["train s/iter", "inference s/image"]
    if study == "poolers":
        head.append("paper mask AP / AP50 / AP75 (R50-C4, COCO)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in aggs:
        cells = [a["variant"], f"{a['n']}/{a['runs']}"]
        if study == "poolers":
            cells += [a["pooler_type"], a["aggregation"]]
        cells += [_fmt(a[m], a[m + "_std"]) for m in metrics]
        cells += [_fmt(a["train_s_per_iter"], a["train_s_per_iter_std"], 3)]
        cells += [_fmt(a["inference_s_per_image"], a["inference_s_per_image_std"], 4)]
        if study == "poolers":
            paper = PAPER_TABLE_2C.get((a["pooler_type"], a["aggregation"]))
            cells.append(" / ".join(f"{v:.1f}" for v in paper) if paper else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(aggs: List[dict], study: str, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c, _, _ in STUDIES[study]["metrics"]]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(1.6 * len(aggs) + 2, 4))
    for i, key in enumerate(metrics):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(aggs))]
        means = [0.0 if a[key] != a[key] else a[key] for a in aggs]  # NaN: no bar
        stds = [0.0 if a[key + "_std"] != a[key + "_std"] else a[key + "_std"] for a in aggs]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=key)
    ax.set_xticks(range(len(aggs)))
    ax.set_xticklabels([a["variant"] for a in aggs], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("%  (mean ± std over seeds)")
    ax.set_title(STUDIES[study]["title"])
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(metrics))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(rows: List[dict], study: str, output_dir: str, command: str) -> str:
    """``ablation.md`` (mean ± std table, ordering verdict), ``ablation.json`` (every run) and
    ``ablation.png``; returns the markdown."""
    os.makedirs(output_dir, exist_ok=True)
    aggs = aggregate(rows, study)
    text = markdown_table(aggs, study)
    verdict = None
    if study == "poolers":
        verdict = pooler_ordering(rows)
        g = verdict["gaps"]
        left_out = verdict["incomplete_seeds"]
        text += (
            f"\nPaper's ordering (every RoIAlign variant above RoIPool and RoIWarp in mask AP): holds in "
            f"{verdict['holds_in_seeds']} of {verdict['seeds']} seeds in which every variant finished"
            + (f" (left out: seed {', '.join(map(str, left_out))})" if left_out else "")
            + f". RoIAlign minus the others (mean of the variants' means), mask AP / AP50 / AP75: "
            f"{g['mask_AP']:+.1f} / {g['mask_AP50']:+.1f} / {g['mask_AP75']:+.1f} "
            f"(largest at AP75: {'yes' if verdict['largest_gap_at_AP75'] else 'no'}).\n"
        )
    protocols = sorted({r.get("evaluated", "") for r in rows} - {""})
    if protocols:
        text += "\nMetrics of " + "; ".join(protocols) + ".\n"
    chosen = [r for r in rows if r.get("selected_iteration") is not None]
    if chosen:
        text += "Chosen iterations: " + "; ".join(
            f"{r['variant']} seed {r['seed']}: {r['selected_iteration']}" for r in chosen
        ) + ".\n"  # fmt: skip
    diverged = [r for r in rows if r["status"] != "finished"]
    text += "\nDiverged runs: " + (
        "; ".join(f"{r['variant']} seed {r['seed']} ({r['status']})" for r in diverged) if diverged else "none"
    ) + f" ({len(rows)} runs done).\n"  # fmt: skip
    machine = (
        f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), "
        f"{'GPU: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}"
    )
    title = STUDIES[study]["title"]
    with open(os.path.join(output_dir, "ablation.md"), "w") as f:
        f.write(f"# {title}\n\nCommand: `{command}`\n\nMachine: {machine}\n\n{text}")
    with open(os.path.join(output_dir, "ablation.json"), "w") as f:
        json.dump({"command": command, "machine": machine, "study": study, "variants": aggs,
                   "ordering": verdict, "runs": rows}, f, indent=1)  # fmt: skip
    bar_chart(aggs, study, os.path.join(output_dir, "ablation.png"))
    return text


def read_result(cfg):
    """The result of a finished (variant, seed), or None where it has not finished."""
    path = os.path.join(cfg.OUTPUT_DIR, RESULT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_ablation(
    config_files: Sequence[str], seeds: Sequence[int], output_dir: str, opts=(), study="auto", command="",
    report_only=False,
):  # fmt: skip
    """Every (variant, seed) of ``config_files`` x ``seeds``, seed-major (all variants of a seed
    before the next seed); the report is rewritten after every run, so that it always holds the
    runs done so far. ``report_only``: train nothing, report the runs already finished (e.g. while
    the study still runs in another process). Returns the per-run rows."""
    per_seed = {
        s: {os.path.splitext(os.path.basename(p))[0]: variant_cfg(p, opts, output_dir, s) for p in config_files}
        for s in seeds
    }
    first = per_seed[seeds[0]]
    study = detect_study(first) if study == "auto" else study
    if study not in STUDIES:
        raise Seg2Error(f"--study {study!r}: choose auto or one of {sorted(STUDIES)}")
    check_same_protocol(first, study)
    runs = [(name, cfg) for s in seeds for name, cfg in per_seed[s].items()]
    rows = []
    if report_only:
        rows = [r for r in (read_result(cfg) for _, cfg in runs) if r is not None]
        logger.info(f"ablation: {len(rows)} of {len(runs)} runs finished; reporting those, training nothing")
        if not rows:
            raise Seg2Error(f"{output_dir}: no finished run ({RESULT_FILE}) to report yet")
    else:
        # a line with the ETA after every run (period 0): runs take minutes each; finished runs are
        # read back from their result file, so an interrupted ablation resumes where it stopped
        for name, cfg in log_progress(runs, len(runs), "ablation runs", logger, 0.0):
            rows.append(run_variant(name, cfg, study))
            if comm.is_main_process() and len(rows) < len(runs):
                write_report(rows, study, output_dir, command)
    if comm.is_main_process():
        text = write_report(rows, study, output_dir, command)
        logger.info(f"{STUDIES[study]['title']}:\n" + text)
    return rows
