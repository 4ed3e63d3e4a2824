"""The ablation tool (tools/ablation/, tools/ablate.py): per-seed runs, mean ± std, the
paper's ordering, the protocol check, resume, and both studies end to end on tiny data."""

import json
import os
import statistics
import subprocess

import pytest
import torch

import seg2

from seg2_model_helpers import import_tool, register_tiny_shapes

ablation = import_tool("ablation.runner")
report = import_tool("ablation.report")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOLER_DIR = os.path.join(REPO_ROOT, "configs", "pooler_ablation")
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
    "DATASETS.TRAIN", "('abl_tiny_train',)", "DATASETS.TEST", "('abl_tiny_val',)",
]  # fmt: skip


def _row(variant, seed, ptype, ap, ap50, ap75, status="finished"):
    return {"variant": variant, "seed": seed, "status": status, "pooler_type": ptype, "aggregation": "avg",
            "mask_AP": ap, "mask_AP50": ap50, "mask_AP75": ap75, "box_AP": ap,
            "train_s_per_iter": 1.0, "inference_s_per_image": 0.1}  # fmt: skip


def test_mean_std_and_the_papers_ordering_by_hand():
    rows = [
        _row("align", 1, "ROIAlign", 60.0, 90.0, 70.0), _row("align", 2, "ROIAlign", 58.0, 88.0, 66.0),
        _row("pool", 1, "ROIPool", 50.0, 89.0, 60.0), _row("pool", 2, "ROIPool", 59.0, 87.0, 61.0),
        _row("pool", 3, "ROIPool", float("nan"), float("nan"), float("nan"), status="diverged at iteration 7"),
        _row("align", 3, "ROIAlign", 61.0, 90.0, 72.0),
    ]  # fmt: skip
    aggs = {a["variant"]: a for a in report.aggregate(rows, "poolers")}
    # align: mask AP 60, 58, 61 -> mean 59.667, sample std sqrt(((.333)^2 + (1.667)^2 + (1.333)^2)
    # / 2) = 1.528
    assert aggs["align"]["mask_AP"] == pytest.approx(59.6667, abs=1e-4)
    assert aggs["align"]["mask_AP_std"] == pytest.approx(1.5275, abs=1e-4)
    # pool: the diverged seed is left out: 50, 59 -> mean 54.5, std 6.364; n = 2 of 3 runs
    assert (aggs["pool"]["n"], aggs["pool"]["runs"]) == (2, 3)
    assert aggs["pool"]["mask_AP"] == 54.5 and aggs["pool"]["mask_AP_std"] == pytest.approx(
        statistics.stdev([50, 59])
    )
    verdict = report.pooler_ordering(rows)
    # seed 1: 60 > 50 holds; seed 2: 58 < 59 fails; seed 3: the RoIPool run diverged, left out
    assert (verdict["holds_in_seeds"], verdict["seeds"], verdict["incomplete_seeds"]) == (1, 2, [3])
    # mean gaps: AP 59.667 - 54.5 = 5.167; AP50 89.333 - 88 = 1.333; AP75 69.333 - 60.5 = 8.833
    assert (
        verdict["gaps"]["mask_AP75"] == pytest.approx(8.8333, abs=1e-4)
        and verdict["largest_gap_at_AP75"]
    )
    table = report.markdown_table(list(aggs.values()), "poolers")
    assert "| align | 3/3 | ROIAlign | avg | 59.7 ± 1.5 |" in table and "| pool | 2/3 |" in table


def test_ordering_only_on_complete_seeds_gaps_of_variant_means_and_single_values():
    rows = [
        _row("align", 1, "ROIAlign", 60.0, 90.0, 70.0), _row("align", 2, "ROIAlign", 50.0, 80.0, 60.0),
        _row("warp", 1, "ROIWarp", 55.0, 89.0, 60.0), _row("warp", 2, "ROIWarp", 45.0, 79.0, 50.0),
        _row("pool", 1, "ROIPool", 40.0, 85.0, 44.0),
        _row("pool", 2, "ROIPool", float("nan"), float("nan"), float("nan"), status="diverged at iteration 85"),
        _row("align", 3, "ROIAlign", 30.0, 60.0, 30.0),  # seed 3: only one variant has run so far
    ]  # fmt: skip
    verdict = report.pooler_ordering(rows)
    # seed 1 (all three finished): 60 > 55 and 40, holds. Seed 2 would hold on the finished runs
    # alone (50 > 45) but pool diverged; seed 3 has one variant: both left out, not judged.
    assert (verdict["holds_in_seeds"], verdict["seeds"], verdict["incomplete_seeds"]) == (
        1,
        1,
        [2, 3],
    )
    # variant means: align AP 46.667, AP50 76.667, AP75 53.333; warp 50 / 84 / 55; pool (n=1) 40 /
    # 85 / 44.
    # Gap = align - mean(warp, pool): AP 46.667 - 45 = 1.667; AP50 76.667 - 84.5 = -7.833;
    # AP75 53.333 - 49.5 = 3.833 (pooling the 3 runs of the others instead would give 53.333 -
    # 51.333 = 2.0)
    assert verdict["gaps"]["mask_AP"] == pytest.approx(1.6667, abs=1e-4)
    assert verdict["gaps"]["mask_AP50"] == pytest.approx(-7.8333, abs=1e-4)
    assert (
        verdict["gaps"]["mask_AP75"] == pytest.approx(3.8333, abs=1e-4)
        and verdict["largest_gap_at_AP75"]
    )
    aggs = report.aggregate(rows, "poolers")
    table = report.markdown_table(aggs, "poolers")
    # one finished seed: the mean alone, no "± 0.0" that would read as a measured zero spread
    assert "| pool | 1/2 | ROIPool | avg | 40.0 | 85.0 | 44.0 | 40.0 |" in table
    assert "| align | 3/3 | ROIAlign | avg | 46.7 ± 15.3 |" in table  # std of 60, 50, 30 = 15.275


def test_ablate_tool_takes_options_right_after_the_seeds():
    tool = import_tool("ablate")
    base = ["--configs", "a.yaml", "--output-dir", "out"]
    args = tool.parse_args(base + ["--seeds", "1", "2", "3", "DATASETS.TEST", "('camvid_test',)"])
    assert args.seeds == [1, 2, 3] and args.opts == ["DATASETS.TEST", "('camvid_test',)"]
    args = tool.parse_args(base + ["--seeds", "4", "--", "SOLVER.MAX_ITER", "10"])
    assert args.seeds == [4] and args.opts == ["SOLVER.MAX_ITER", "10"] and not args.report_only
    args = tool.parse_args(["--report-only"] + base + ["SOLVER.MAX_ITER", "10"])
    assert args.seeds == [1] and args.opts == ["SOLVER.MAX_ITER", "10"] and args.report_only
    with pytest.raises(SystemExit):
        tool.parse_args(base + ["--seeds", "SOLVER.MAX_ITER", "10"])


@pytest.fixture(scope="module")
def tiny_data(tiny_shapes_root):
    for split in ("train", "val"):
        register_tiny_shapes(f"abl_tiny_{split}", tiny_shapes_root, split)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pooler_study_two_seeds_end_to_end_and_resume(tiny_data, tmp_path):
    configs = [
        os.path.join(POOLER_DIR, f"mask_rcnn_{v}_R18_FPN_shapes_cpu.yaml")
        for v in ("roipool", "roialign_avg")
    ]
    opts = TINY_OPTS + [
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "16",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "32",
    ]
    rows = ablation.run_ablation(configs, [1, 2], str(tmp_path), opts, command="test")
    assert [(r["variant"][10:-19], r["seed"]) for r in rows] == [
        ("roipool", 1), ("roialign_avg", 1), ("roipool", 2), ("roialign_avg", 2)
    ]  # fmt: skip
    assert all(r["status"] == "finished" and 0.0 <= r["mask_AP"] <= 100.0 for r in rows)
    report = json.loads((tmp_path / "ablation.json").read_text())
    assert report["study"] == "poolers" and [a["n"] for a in report["variants"]] == [2, 2]
    assert (tmp_path / "ablation.md").read_text().count("2/2") == 2 and (
        tmp_path / "ablation.png"
    ).exists()
    # A second run reads every finished (variant, seed) back instead of training again.
    marker = tmp_path / configs[0].split("/")[-1][:-5] / "seed1" / ablation.RESULT_FILE
    saved = json.loads(marker.read_text())
    saved["mask_AP"] = 12.5
    marker.write_text(json.dumps(saved))
    again = ablation.run_ablation(configs, [1, 2], str(tmp_path), opts, command="test")
    key = lambda r: (r["variant"], r["seed"], r["mask_AP"], r["box_AP"], r["inference_s_per_image"])  # noqa: E731
    assert again[0]["mask_AP"] == 12.5 and [key(r) for r in again[1:]] == [key(r) for r in rows[1:]]
    # --report-only: seed 3 has not run; the report holds the four finished runs and trains nothing
    report = ablation.run_ablation(
        configs, [1, 2, 3], str(tmp_path), opts, command="test", report_only=True
    )
    assert [key(r) for r in report] == [key(r) for r in again]
    assert not (tmp_path / configs[0].split("/")[-1][:-5] / "seed3").exists()
    assert "(4 runs done)" in (tmp_path / "ablation.md").read_text()
    with pytest.raises(seg2.Seg2Error, match="no finished run"):
        ablation.run_ablation(configs, [3], str(tmp_path), opts, command="test", report_only=True)


def test_decoder_study_reports_accuracies_and_refuses_other_keys(tiny_data, tmp_path):
    base = os.path.join(REPO_ROOT, "configs", "quickstart", "unet_tiny_shapes_cpu.yaml")
    configs = []
    for mode in ("deconv", "bilinear"):
        path = tmp_path / f"unet_{mode}.yaml"
        path.write_text(f'_BASE_: "{base}"\nMODEL:\n  UNET_HEAD:\n    UPSAMPLE: "{mode}"\n')
        configs.append(str(path))
    rows = ablation.run_ablation(configs, [1], str(tmp_path / "out"), TINY_OPTS, command="test")
    assert all(r["status"] == "finished" for r in rows)
    for r in rows:  # percent, from MIoUEvaluator's sem_seg results
        assert 0.0 <= r["mIoU"] <= r["global_acc"] <= 100.0 and 0.0 <= r["class_avg_acc"] <= 100.0
    assert "global_acc" in (tmp_path / "out" / "ablation.md").read_text()
    other = tmp_path / "unet_lr.yaml"
    other.write_text(f'_BASE_: "{configs[0]}"\nSOLVER:\n  BASE_LR: 0.5\n')
    with pytest.raises(
        seg2.Seg2Error, match=r"differ in more than the decoders study varies: SOLVER.BASE_LR"
    ):
        ablation.run_ablation(
            [configs[0], str(other)], [1], str(tmp_path / "bad"), TINY_OPTS, command="test"
        )


def test_decoder_study_reports_the_val_best_checkpoint_on_the_test_set(tiny_data, tmp_path):
    """As configs/camvid/ run it: evaluated on val every iteration, the best checkpoint by mIoU is
    tested on another dataset after training, and those are the figures the study reports."""
    base = os.path.join(REPO_ROOT, "configs", "quickstart", "unet_tiny_shapes_cpu.yaml")
    config = tmp_path / "unet_deconv.yaml"
    config.write_text(f'_BASE_: "{base}"\n')
    opts = TINY_OPTS + ["SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "1", "SEG2.BEST_CHECKPOINT.METRIC", "sem_seg/mIoU",
                        "SEG2.BEST_CHECKPOINT.TEST_DATASETS", "('abl_tiny_train',)"]  # fmt: skip
    (row,) = ablation.run_ablation([str(config)], [1], str(tmp_path / "out"), opts, command="test")
    run_dir = tmp_path / "out" / "unet_deconv" / "seed1"
    record = json.loads((run_dir / "model_best_test.json").read_text())
    assert record["datasets"] == ["abl_tiny_train"] and record["selected_on"] == ["abl_tiny_val"]
    assert row["selected_iteration"] == record["iteration"] in (1, 2, 3)
    assert (row["global_acc"], row["class_avg_acc"], row["mIoU"]) == tuple(
        record["results"]["sem_seg"][k] for k in ("pACC", "mACC", "mIoU")
    )
    report = (tmp_path / "out" / "ablation.md").read_text()
    assert (
        "Metrics of abl_tiny_train: the checkpoint with the best sem_seg/mIoU on abl_tiny_val"
        in report
    )
    assert f"unet_deconv seed 1: {record['iteration']}" in report


def test_a_run_folder_is_reused_only_with_its_whole_setting(tiny_data, tmp_path):
    """A rerun in the same --output-dir reads a run back only where its recorded setting (merged
    config, seed, code version) is the one asked for now; otherwise it refuses in one line naming
    the folder and the keys, or with rerun_changed moves the folder aside and trains again."""
    base = os.path.join(REPO_ROOT, "configs", "quickstart", "unet_tiny_shapes_cpu.yaml")
    config = tmp_path / "unet.yaml"
    config.write_text(f'_BASE_: "{base}"\n')
    out = tmp_path / "out"
    cfg = ablation.variant_cfg(str(config), TINY_OPTS, str(out), seed=1)
    run_dir = out / "unet" / "seed1"
    run_dir.mkdir(parents=True)
    setting = ablation.run_setting(cfg)
    version = ablation.code_version()
    assert (
        setting["seed"] == 1
        and setting["seg2"] == seg2.__version__
        and "OUTPUT_DIR" not in setting["config"]
    )
    assert setting["config"]["SOLVER.MAX_ITER"] == 2 and setting["config"][
        "INPUT.MIN_SIZE_TRAIN"
    ] == [64]
    head = subprocess.run(
        ["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if (
        head.returncode == 0
    ):  # a git checkout: the commit, and a hash of uncommitted changes to seg2/ or tools/
        assert version["seg2_git"].startswith(head.stdout.strip())
    marker = {"variant": "unet", "seed": 1, "status": "finished", "global_acc": 12.5, "class_avg_acc": 10.0,
              "mIoU": 5.0, "train_s_per_iter": 1.0, "inference_s_per_image": 0.1}  # fmt: skip
    (run_dir / ablation.RESULT_FILE).write_text(json.dumps(marker))
    (run_dir / ablation.SETTING_FILE).write_text(json.dumps(setting))
    # the same setting: read back, nothing trains
    (row,) = ablation.run_ablation([str(config)], [1], str(out), TINY_OPTS, command="test")
    assert row == marker
    # another config value: refused, naming the folder and the key with both values
    with pytest.raises(seg2.Seg2Error, match=rf"^{run_dir}: a run made with another setting: SOLVER.BASE_LR: "
                       rf"{cfg.SOLVER.BASE_LR} recorded, 0.5 now; .*--rerun-changed"):  # fmt: skip
        ablation.run_ablation(
            [str(config)], [1], str(out), TINY_OPTS + ["SOLVER.BASE_LR", "0.5"], command="test"
        )
    # another code version or seed recorded: refused, the code keys named first
    for key, value in (("seg2_git", "0" * 40), ("detectron2", "0.1"), ("seed", 7)):
        (run_dir / ablation.SETTING_FILE).write_text(json.dumps(dict(setting, **{key: value})))
        with pytest.raises(seg2.Seg2Error, match=rf"another setting: {key}: {value!r} recorded"):
            ablation.run_ablation([str(config)], [1], str(out), TINY_OPTS, command="test")
    # a folder of seg2 before settings were recorded: compared on its config.yaml
    (run_dir / ablation.SETTING_FILE).unlink()
    (run_dir / "config.yaml").write_text(cfg.dump())
    assert ablation.run_ablation([str(config)], [1], str(out), TINY_OPTS, command="test") == [
        marker
    ]
    with pytest.raises(
        seg2.Seg2Error, match=r"another setting: SOLVER.MAX_ITER: 2 recorded, 3 now"
    ):
        ablation.run_ablation(
            [str(config)], [1], str(out), TINY_OPTS + ["SOLVER.MAX_ITER", "3"], command="test"
        )
    # rerun_changed: the old folder is kept aside, the run trains with the new setting and records
    # it
    opts = TINY_OPTS + ["SOLVER.MAX_ITER", "3"]
    (row,) = ablation.run_ablation(
        [str(config)], [1], str(out), opts, command="test", rerun_changed=True
    )
    assert json.loads((out / "unet" / "seed1.old1" / ablation.RESULT_FILE).read_text()) == marker
    assert (
        row["status"] == "finished"
        and row["iterations"] == 3
        and row["global_acc"] != marker["global_acc"]
    )
    recorded = json.loads((run_dir / ablation.SETTING_FILE).read_text())
    assert recorded == ablation.run_setting(
        ablation.variant_cfg(str(config), opts, str(out), seed=1)
    )
    # and the new run is read back by the same command
    assert ablation.run_ablation([str(config)], [1], str(out), opts, command="test") == [row]
