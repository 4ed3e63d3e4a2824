"""PNG plots of semantic segmentation results (matplotlib's Agg canvas, no display needed)."""

import numpy as np
from detectron2.utils.file_io import PathManager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str):
    FigureCanvasAgg(fig)  # Agg whatever the session's pyplot backend is
    with PathManager.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")


def plot_confusion_matrix(conf: np.ndarray, class_names, path: str):
    """
    Confusion matrix normalised per ground-truth class (each column of ``conf[pred, gt]`` sums to
    1), drawn with the ground truth on the rows.

    Args:
        conf (ndarray): (C, C) pixel counts, ``conf[pred, gt]``.
        class_names (list[str]): C names.
        path (str): the PNG to write.
    """
    gt_by_pred = conf.T.astype(float)
    totals = gt_by_pred.sum(axis=1, keepdims=True)
    norm = np.divide(gt_by_pred, totals, out=np.zeros_like(gt_by_pred), where=totals > 0)
    n = len(class_names)
    side = min(4 + 0.35 * n, 30)
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(
        im, ax=ax, fraction=0.046, pad=0.04, label="share of the ground-truth class's pixels"
    )
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(class_names, rotation=90)
    ax.set_yticklabels(class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    ax.set_title("confusion matrix (row-normalised)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    _save(fig, path)


def plot_per_class_iou(iou: np.ndarray, class_names, path: str):
    """
    Bar chart of per-class IoU (percent); classes absent from the ground truth (NaN) are marked
    "n/a".

    Args:
        iou (ndarray): (C,) IoU in percent, NaN for absent classes.
        class_names (list[str]): C names.
        path (str): the PNG to write.
    """
    n = len(class_names)
    values = np.nan_to_num(iou, nan=0.0)
    fig = Figure(figsize=(min(4 + 0.4 * n, 40), 4))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(n), values, color="tab:blue")
    for i, v in enumerate(iou):
        ax.text(
            i,
            (0 if np.isnan(v) else v) + 1,
            "n/a" if np.isnan(v) else f"{v:.1f}",
            ha="center",
            fontsize=7,
        )
    valid = iou[~np.isnan(iou)]
    if valid.size:
        ax.axhline(valid.mean(), color="tab:red", linestyle="--", label=f"mIoU {valid.mean():.2f}")
        ax.legend(loc="upper right")
    ax.set_xticks(range(n))
    ax.set_xticklabels(class_names, rotation=90)
    ax.set_ylim(0, 105)
    ax.set_ylabel("IoU (%)")
    ax.set_title("per-class IoU")
    _save(fig, path)
