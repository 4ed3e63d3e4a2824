"""
The reports of an ablation study: mean ± std per variant over its seeds, the RoI pooler study's
ordering verdict against the Mask R-CNN paper, and ``ablation.md`` / ``ablation.json`` /
``ablation.png``. ``STUDIES`` says, per study, which config keys its variants may differ in and
which metrics it reports.
"""

import json
import math
import os
import platform
import statistics
from typing import List, Sequence

import torch

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
        "varies": lambda k: (
            k.startswith(("MODEL.ROI_BOX_HEAD.POOLER_", "MODEL.ROI_MASK_HEAD.POOLER_"))
            and k.endswith(("_TYPE", "_AGGREGATION"))
        ),
        "metrics": [
            ("mask_AP", "segm", "AP"),
            ("mask_AP50", "segm", "AP50"),
            ("mask_AP75", "segm", "AP75"),
            ("box_AP", "bbox", "AP"),
        ],  # fmt: skip
    },
    "decoders": {
        "title": "Decoder ablation",
        # the head's own keys, and which head on which backbone features
        "varies": lambda k: k.startswith(_HEAD_NODES) or k in _HEAD_CHOICE,
        "metrics": [
            ("global_acc", "sem_seg", "pACC"),
            ("class_avg_acc", "sem_seg", "mACC"),
            ("mIoU", "sem_seg", "mIoU"),
        ],  # fmt: skip
    },
}


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
        agg = {
            "variant": variant,
            "n": len(ok),
            "runs": len(runs),
            "seeds": sorted(r["seed"] for r in runs),
        }
        if study == "poolers":
            agg["pooler_type"], agg["aggregation"] = runs[0]["pooler_type"], runs[0]["aggregation"]
        for column, _, _ in STUDIES[study]["metrics"] + [
            ("train_s_per_iter", 0, 0),
            ("inference_s_per_image", 0, 0),
        ]:
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
        a = [
            g[key]
            for g in aggs
            if g["pooler_type"] in ("ROIAlign", "ROIAlignV2") and g[key] == g[key]
        ]
        b = [
            g[key]
            for g in aggs
            if g["pooler_type"] not in ("ROIAlign", "ROIAlignV2") and g[key] == g[key]
        ]
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
            "\nPaper's ordering (every RoIAlign variant above RoIPool and RoIWarp in mask AP): "
            "holds in "
            f"{verdict['holds_in_seeds']} of {verdict['seeds']} seeds in which every variant "
            "finished"
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
