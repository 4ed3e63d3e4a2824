#!/usr/bin/env python3
"""
Ablation studies (the harness is tools/ablation/): train and evaluate every config variant under one
protocol, over several seeds, and report mean ± std per variant.

    # the Mask R-CNN RoI pooler ablation on seg2_shapes, CPU, 5 seeds (6 variants)
    OMP_NUM_THREADS=1 python3 tools/ablate.py --configs
    'configs/pooler_ablation/mask_rcnn_*_R18_FPN_shapes_cpu.yaml' \\
        --seeds 1 2 3 4 5 --output-dir output/pooler_ablation_shapes
    # COCO, R50-C4 as in the paper (8 GPUs)
    python3 tools/ablate.py --num-gpus 8 --configs
    'configs/pooler_ablation/mask_rcnn_*_R50_C4_1x_coco.yaml' \\
        --output-dir output/pooler_ablation_c4
    # SegNet-Basic and its decoder variants on CamVid (the SegNet paper's Table 1), one GPU: each
    # run keeps its best checkpoint on camvid_val and is reported on camvid_test
    python3 tools/ablate.py --configs 'configs/camvid/*-basic_10k_camvid.yaml' --seeds 1 2 3 \\
        --output-dir output/camvid_decoders

Trailing KEY VALUE pairs apply to every variant (also right after --seeds). The study (which keys
may differ between the
variants, which metrics to report) is chosen from the configs (--study auto) or named. Running the
same command again resumes: finished runs are read back, an unfinished one resumes from its last
checkpoint, each only where its recorded setting (merged config, seed, seg2 version and git commit,
detectron2 version) is the one asked for now; another setting in the same --output-dir is refused,
naming the folder and the keys (--rerun-changed moves such folders aside and runs them again).
Outputs in --output-dir: ablation.md, ablation.json, ablation.png, rewritten after every run;
--report-only rewrites them from the finished runs without training (while a study runs).
"""

import argparse
import glob
import os
import sys

from ablation.report import STUDIES
from ablation.runner import run_ablation
from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import seg2
from seg2.utils.cli import add_debug_argument, run_tool


def main(args):
    for name in ("detectron2", "seg2"):
        setup_logger(
            os.path.join(args.output_dir, "log.txt"), distributed_rank=comm.get_rank(), name=name
        )
    configs = []
    for pattern in args.configs:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise seg2.Seg2Error(f"--configs {pattern}: no such config file")
        configs += matches
    command = " ".join(["python3"] + sys.argv)
    run_ablation(
        configs, args.seeds, args.output_dir, args.opts, study=args.study, command=command,
        report_only=args.report_only, rerun_changed=args.rerun_changed,
    )  # fmt: skip


def parse_args(argv=None, default_configs=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", action="append", required=default_configs is None,
        help="a variant config or a quoted glob of them; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", nargs="+", default=["1"],
        help="SEED values; every variant runs each (KEY VALUE pairs right after them are options, not seeds)",
    )  # fmt: skip
    parser.add_argument("--study", default="auto", choices=["auto"] + sorted(STUDIES))
    parser.add_argument("--output-dir", required=default_configs is None, default=None)
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument(
        "--report-only", action="store_true",
        help="train nothing: write the report from the runs finished so far (e.g. while the study runs)",
    )  # fmt: skip
    parser.add_argument(
        "--rerun-changed", action="store_true",
        help="a run folder made with another setting (config, seed, code version) is moved aside to "
        "<folder>.old<k> and run again (default: refuse, naming the folder and the keys that "
        "differ)",
    )  # fmt: skip
    add_debug_argument(parser)
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs applied to every variant"
    )
    args = parser.parse_args(argv)
    args.configs = args.configs or default_configs
    # argparse gives `--seeds 1 2 KEY VALUE` all four words: the leading integers are the seeds, the
    # rest are KEY VALUE options (detectron2's config keys never parse as integers)
    words = args.seeds
    n = next((i for i, w in enumerate(words) if not _is_int(w)), len(words))
    if n == 0:
        parser.error(f"argument --seeds: expected integers, got {words[0]!r}")
    args.seeds, extra = [int(w) for w in words[:n]], words[n:]
    opts = args.opts[1:] if args.opts[:1] == ["--"] else args.opts  # `--seeds 1 2 -- KEY VALUE` too
    args.opts = extra + opts
    return args


def _is_int(word):
    try:
        int(word)
        return True
    except ValueError:
        return False


def invoke_main(args=None):
    args = args or parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    run_tool(launch, main, args.num_gpus, args=(args,), debug=args.debug)


if __name__ == "__main__":
    invoke_main()
