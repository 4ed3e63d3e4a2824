"""
Ablation studies: train and evaluate a set of config variants under one protocol (same schedule,
data and model but for the keys the study varies), over several seeds, and report mean ± std.

Two studies are built in (:data:`report.STUDIES`):

* ``poolers``: the Mask R-CNN RoI pooling ablation (He et al., ICCV 2017, Table 2c): the variants
  differ in ``MODEL.ROI_{BOX,MASK}_HEAD.POOLER_{TYPE,AGGREGATION}``; metrics mask AP / AP50 / AP75
  and box AP; the report says in how many seeds the paper's ordering holds (RoIAlign above RoIPool
  and RoIWarp in mask AP, the gap largest at AP75).
* ``decoders``: semantic decoder variants (SegNet-Basic / FCN-Basic / bilinear, SegNet paper
  Table 1): the variants differ in head keys (``MODEL.{SEGNET,FCN,UNET,DEEPLAB}_HEAD.*``);
  metrics global accuracy, class-average accuracy and mIoU.

``tools/ablate.py`` is the command line. Each (variant, seed) trains in
``<output-dir>/<variant>/seed<k>/``; a finished one (its ``ablation_result.json``, also written for
a run that diverged) is read back, an unfinished one resumes from its last checkpoint, but only
where the run folder's recorded setting (``ablation_setting.json``: the full merged config, the
seed, seg2's version and git commit, detectron2's version) is the one asked for now: otherwise the
study refuses, naming the folder and the keys that differ, or with ``rerun_changed`` moves the old
folder aside and runs again.
"""

import functools
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
from typing import Dict, List, Sequence

import detectron2
import torch
import yaml
from benchmarks.timing import timed
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch import nn

import seg2
from seg2.config import load_seg2_config
from seg2.data import check_dataset_names
from seg2.engine import Trainer
from seg2.modeling.poolers import POOLER_AGGREGATIONS
from seg2.utils import Seg2Error
from seg2.utils.progress import log_progress

from .report import STUDIES, write_report

logger = logging.getLogger("seg2.ablation")

RESULT_FILE = "ablation_result.json"
SETTING_FILE = "ablation_setting.json"
_ALWAYS_DIFFERENT = ("OUTPUT_DIR", "SEED")


class _TimedModel(nn.Module):
    """Wraps a model for inference_on_dataset and records the wall time of each forward call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seconds, self.images = [], []  # per call

    def forward(self, inputs):
        outputs, seconds = timed(
            lambda: self.model(inputs), "cuda" if torch.cuda.is_available() else "cpu"
        )
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
        return {
            k: v for k, v in _flatten(cfg).items() if k not in _ALWAYS_DIFFERENT and not varies(k)
        }

    ref_flat = fixed(ref)
    for name, cfg in items[1:]:
        flat = fixed(cfg)
        diff = sorted(k for k in set(flat) | set(ref_flat) if flat.get(k) != ref_flat.get(k))
        if diff:
            raise Seg2Error(
                f"{name} and {ref_name} differ in more than the {study} study varies: "
                f"{', '.join(diff)} "
                f"(e.g. {diff[0]}: {flat.get(diff[0])!r} vs {ref_flat.get(diff[0])!r}); an "
                "ablation compares "
                "variants trained with identical schedule and data"
            )


def pooler_of(cfg):
    """(pooler type, aggregation) of the box head; the natural aggregation when none is set."""
    ptype = cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE
    return ptype, cfg.MODEL.ROI_BOX_HEAD.POOLER_AGGREGATION or POOLER_AGGREGATIONS.get(
        ptype, ("avg",)
    )[0]


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


@functools.lru_cache(maxsize=None)
def code_version() -> Dict[str, str]:
    """seg2's and detectron2's versions, and the git commit of the seg2 checkout that is imported
    ("<commit>+dirty.<hash of the diff>" with uncommitted changes to seg2/ or tools/; None where
    seg2 is not imported from a git checkout of its own, e.g. installed from a wheel)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(seg2.__file__)))

    def git(*args):
        out = subprocess.run(
            ["git", "-C", root, *args], capture_output=True, timeout=60, check=True
        )
        return out.stdout

    try:
        if os.path.realpath(
            git("rev-parse", "--show-toplevel").decode().strip()
        ) != os.path.realpath(root):
            commit = None  # seg2 lies inside another project's repository
        else:
            commit = git("rev-parse", "HEAD").decode().strip()
            diff = git("diff", "HEAD", "--no-ext-diff", "--", "seg2", "tools")
            if diff:
                commit += "+dirty." + hashlib.sha1(diff).hexdigest()[:12]
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"seg2": seg2.__version__, "seg2_git": commit, "detectron2": detectron2.__version__}


def _plain(value):
    """``value`` as JSON has it (tuples become lists), so that a setting read back compares equal."""
    return json.loads(json.dumps(value))


def _config_keys(yaml_text: str) -> dict:
    """A dumped config as {"A.B.C": value}, without OUTPUT_DIR (the run folder itself)."""
    flat = _flatten(yaml.safe_load(yaml_text))
    flat.pop("OUTPUT_DIR", None)
    return _plain(flat)


def run_setting(cfg) -> dict:
    """What a (variant, seed) run's figures depend on: the full merged config, the seed and the code
    version (:func:`code_version`). Written as ``ablation_setting.json`` in the run folder."""
    return _plain({"seed": cfg.SEED, **code_version(), "config": _config_keys(cfg.dump())})


def setting_differences(old: dict, new: dict) -> List[str]:
    """The keys in which two settings differ, the seed and the code version first, then the config
    keys in order (as "SOLVER.BASE_LR: 0.01 recorded, 0.02 now")."""
    out = []
    for key in ("seed", "seg2", "seg2_git", "detectron2"):
        if old.get(key, "not recorded") != new.get(key):
            out.append(f"{key}: {old.get(key, 'not recorded')!r} recorded, {new.get(key)!r} now")
    a, b = old.get("config", {}), new.get("config", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key, "absent") != b.get(key, "absent"):
            out.append(f"{key}: {a.get(key, 'absent')!r} recorded, {b.get(key, 'absent')!r} now")
    return out


def check_run_folder(cfg, rerun_changed: bool = False):
    """
    Raise :class:`Seg2Error` where ``cfg.OUTPUT_DIR`` holds a run made with another setting than
    :func:`run_setting` of ``cfg``, naming the folder and the first differing keys; a folder
    without a recorded setting (seg2 before settings were recorded) is compared on its
    ``config.yaml``. With ``rerun_changed`` such a folder is moved aside to
    ``<folder>.old<k>`` instead (nothing is deleted), so that the run starts afresh.
    """
    folder = cfg.OUTPUT_DIR
    if not os.path.isdir(folder) or not os.listdir(folder):
        return
    new = run_setting(cfg)
    path = os.path.join(folder, SETTING_FILE)
    if os.path.exists(path):
        with open(path) as f:
            diffs = setting_differences(json.load(f), new)
    elif os.path.exists(os.path.join(folder, "config.yaml")):
        with open(os.path.join(folder, "config.yaml")) as f:
            diffs = setting_differences({"config": _config_keys(f.read())}, new)
        diffs = [
            d for d in diffs if d.split(":")[0] not in ("seed", "seg2", "seg2_git", "detectron2")
        ]
        if not diffs:
            logger.warning(f"{folder}: made before run settings were recorded; its config.yaml is the one asked "
                           "for now (code version unknown): reusing it")  # fmt: skip
    else:
        diffs = [f"no {SETTING_FILE} or config.yaml"]
    if not diffs:
        return
    if rerun_changed:
        k = 1
        while os.path.exists(f"{folder}.old{k}"):
            k += 1
        if comm.is_main_process():
            shutil.move(folder, f"{folder}.old{k}")
            logger.warning(
                f"{folder}: made with another setting ({diffs[0]}); moved to {folder}.old{k}, "
                "running again"
            )
        comm.synchronize()
        return
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise Seg2Error(
        f"{folder}: a run made with another setting: {'; '.join(diffs[:3])}{more}; its figures "
        "would be "
        "reported under this study's header: choose another --output-dir, or --rerun-changed to "
        "move such "
        "folders aside and run them again"
    )


def run_variant(name: str, cfg, study: str) -> dict:
    """Train (or resume) and evaluate one (variant, seed); read its result back when it finished."""
    result_path = os.path.join(cfg.OUTPUT_DIR, RESULT_FILE)
    if os.path.exists(result_path):
        logger.info(f"{name} seed {cfg.SEED}: finished before, reading {result_path}")
        with open(result_path) as f:
            return json.load(f)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    if comm.is_main_process():
        with open(os.path.join(cfg.OUTPUT_DIR, SETTING_FILE), "w") as f:
            json.dump(run_setting(cfg), f, indent=1)
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    seed_all_rng(cfg.SEED)  # identical initial weights and data order for every variant of a seed
    trainer = AblationTrainer(cfg)
    trainer.resume_or_load(resume=True)
    logger.info(
        f"{name} seed {cfg.SEED}: training from iteration {trainer.start_iter} to "
        f"{cfg.SOLVER.MAX_ITER}"
    )
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
    row = {
        "variant": name,
        "seed": cfg.SEED,
        "status": status,
        "evaluated": evaluation_protocol(cfg),
    }
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
            f"{', '.join(cfg.DATASETS.TEST)} (evaluated every {cfg.TEST.EVAL_PERIOD} iterations "
            "and at the end)"
        )
    return f"{', '.join(cfg.DATASETS.TEST)}: the final model"


def read_result(cfg):
    """The result of a finished (variant, seed), or None where it has not finished."""
    path = os.path.join(cfg.OUTPUT_DIR, RESULT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_ablation(
    config_files: Sequence[str], seeds: Sequence[int], output_dir: str, opts=(), study="auto", command="",
    report_only=False, rerun_changed=False,
):  # fmt: skip
    """Every (variant, seed) of ``config_files`` x ``seeds``, seed-major (all variants of a seed
    before the next seed); the report is rewritten after every run, so that it always holds the
    runs done so far. ``report_only``: train nothing, report the runs already finished (e.g. while
    the study still runs in another process). Every run folder that exists is checked against its
    setting before anything trains (:func:`check_run_folder`; ``rerun_changed``: move the changed
    ones aside and run them again). Returns the per-run rows."""
    per_seed = {
        s: {
            os.path.splitext(os.path.basename(p))[0]: variant_cfg(p, opts, output_dir, s)
            for p in config_files
        }
        for s in seeds
    }
    first = per_seed[seeds[0]]
    study = detect_study(first) if study == "auto" else study
    if study not in STUDIES:
        raise Seg2Error(f"--study {study!r}: choose auto or one of {sorted(STUDIES)}")
    check_same_protocol(first, study)
    runs = [(name, cfg) for s in seeds for name, cfg in per_seed[s].items()]
    for _, cfg in runs:  # before anything trains
        check_run_folder(cfg, rerun_changed and not report_only)
    rows = []
    if report_only:
        rows = [r for r in (read_result(cfg) for _, cfg in runs) if r is not None]
        logger.info(
            f"ablation: {len(rows)} of {len(runs)} runs finished; reporting those, training nothing"
        )
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
