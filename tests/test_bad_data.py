"""Bad data during a run (issue 15, cases 1-3 and the demo): an unreadable training file is skipped
through detectron2's retry, named, counted and capped; in evaluation it is an error naming it; the
COCO loaders reject an empty or non-image file at load; every Seg2Error, a DataLoader worker's
included, ends a tool with one line and exit status 1."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import traceback

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from PIL import Image

import seg2
from seg2 import Seg2Error
from seg2.data import MultiTaskDatasetMapper, load_coco_with_sem_seg, write_label_map
from seg2.utils import UnreadableFileError
from seg2.utils.cli import run_tool, seg2_error_message

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
UNET = os.path.join(REPO, "configs", "quickstart", "unet_tiny_shapes_cpu.yaml")
S = 32  # image side


def _image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (S, S, 3), dtype=np.uint8)).save(path, quality=95)


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _label(path, value=1):
    label = np.zeros((S, S), np.uint8)
    label[8:24, 8:24] = value
    write_label_map(label, path)


def _folder(root, n=6, bad=()):
    """``n`` JPEG images with label PNGs in images/ and labels/; ``bad``: {index: kind} with kind
    "truncated" (first half of the JPEG), "empty" (0 bytes), "text" (a text file named .jpg),
    "label_truncated" (first half of the label PNG) or "label_value" (a label value 9 of 2 classes)."""
    bad = dict(bad)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    records = []
    for i in range(n):
        img, lbl = (
            os.path.join(root, "images", f"{i:02d}.jpg"),
            os.path.join(root, "labels", f"{i:02d}.png"),
        )
        _image(img, i)
        _label(lbl, 9 if bad.get(i) == "label_value" else 1)
        kind = bad.get(i)
        if kind == "truncated":
            _truncate(img)
        elif kind == "empty":
            open(img, "wb").close()
        elif kind == "text":
            with open(img, "w") as f:
                f.write("not an image\n")
        elif kind == "label_truncated":
            _truncate(lbl)
        records.append(
            {"file_name": img, "sem_seg_file_name": lbl, "height": S, "width": S, "image_id": i}
        )
    return records


def _cfg(**keys):
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (S,), S
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = S, S
    cfg.MODEL.META_ARCHITECTURE = "Seg2SemanticSegmentor"  # reads the label maps
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 2
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    for k, v in keys.items():
        cfg.merge_from_list([k, v])
    return cfg


KINDS = {1: "truncated", 2: "empty", 3: "text", 4: "label_truncated"}
REASONS = {
    1: "image file is truncated",
    2: "cannot identify image file",
    3: "cannot identify image file",
    4: "cannot read the label map",
}


def test_training_skips_undecodable_files_with_one_counted_warning_each(tmp_path, caplog):
    records = _folder(str(tmp_path), n=6, bad=KINDS)
    mapper = MultiTaskDatasetMapper(_cfg(), is_train=True)
    with caplog.at_level(logging.WARNING, logger="seg2"):
        assert mapper(records[0])["sem_seg"].shape == (S, S)
        for i in KINDS:
            assert mapper(records[i]) is None  # detectron2's MapDataset maps another sample
        assert mapper(records[1]) is None  # drawn again: skipped, no second warning
    warnings = [
        r.getMessage() for r in caplog.records if "skipping training sample" in r.getMessage()
    ]
    assert len(warnings) == 4
    for (i, reason), message in zip(REASONS.items(), warnings):
        path = records[i]["sem_seg_file_name"] if i == 4 else records[i]["file_name"]
        assert (
            message.startswith(f"skipping training sample {path}: cannot read the ")
            and reason in message
        )
    assert (
        "4 unreadable of 5 files read" in warnings[-1]
        and "MAX_BAD_SAMPLE_SHARE=0.05" in warnings[-1]
    )
    assert mapper.bad_samples.bad == {records[i]["file_name"] for i in (1, 2, 3)} | {
        records[4]["sem_seg_file_name"]
    }

    # Evaluation: the same file is an error naming it.
    test_mapper = MultiTaskDatasetMapper(_cfg(), is_train=False)
    assert test_mapper(records[0])["image"].shape == (3, S, S)
    for i in (1, 2, 3):
        with pytest.raises(
            UnreadableFileError,
            match=f"{records[i]['file_name']}: cannot read the image .*{REASONS[i]}",
        ):
            test_mapper(records[i])
    # A label value out of range is a data error, not an unreadable file: never skipped.
    (oor,) = _folder(str(tmp_path / "oor"), n=1, bad={0: "label_value"})
    with pytest.raises(Seg2Error, match=r"00\.png: label map holds value\(s\) 9"):
        mapper(oor)


def test_bad_share_over_the_limit_stops_training(tmp_path):
    records = _folder(str(tmp_path), n=4, bad={1: "truncated", 2: "empty", 3: "text"})
    cfg = _cfg(**{"DATALOADER.MAX_BAD_SAMPLE_SHARE": 0.5})
    mapper = MultiTaskDatasetMapper(cfg, is_train=True, num_records=4)
    # Judged over max(files read, 4 records): 2 of 4 bad is not more than half; the third is.
    assert [mapper(records[i]) is None for i in (0, 1, 2)] == [False, True, True]
    with pytest.raises(
        Seg2Error,
        match=r"^3 of 4 training files read by this loader are unreadable, more than "
        r"DATALOADER.MAX_BAD_SAMPLE_SHARE=0.5; the last: .*03\.jpg: cannot read the image",
    ):
        mapper(records[3])
    strict = MultiTaskDatasetMapper(_cfg(**{"DATALOADER.MAX_BAD_SAMPLE_SHARE": 0.0}), is_train=True)
    with pytest.raises(Seg2Error, match="1 of 1 training files"):
        strict(records[1])
    with pytest.raises(
        Seg2Error, match=r"^DATALOADER.MAX_BAD_SAMPLE_SHARE=1.0: expected in \[0, 1\)"
    ):
        MultiTaskDatasetMapper(_cfg(**{"DATALOADER.MAX_BAD_SAMPLE_SHARE": 1.0}), is_train=True)


def test_detectron2_loader_retries_a_skipped_sample(tmp_path):
    records = _folder(str(tmp_path), n=5, bad={2: "truncated"})
    cfg = _cfg(
        **{
            "SOLVER.IMS_PER_BATCH": 2,
            "DATALOADER.NUM_WORKERS": 0,
            "SEED": 3,
            "DATALOADER.MAX_BAD_SAMPLE_SHARE": 0.3,
        }
    )
    mapper = MultiTaskDatasetMapper(cfg, is_train=True, num_records=len(records))
    loader = iter(build_detection_train_loader(cfg, mapper=mapper, dataset=records))
    seen = [x["file_name"] for _ in range(15) for x in next(loader)]
    # Every batch is full, of readable images only; the truncated one was drawn and skipped.
    assert len(seen) == 30 and records[2]["file_name"] not in seen
    assert mapper.bad_samples.bad == {records[2]["file_name"]}
    assert set(seen) == {r["file_name"] for i, r in enumerate(records) if i != 2}


def test_coco_loader_rejects_empty_and_non_image_files_at_load(tmp_path):
    records = _folder(str(tmp_path), n=3, bad={1: "empty", 2: "text"})
    images = [
        {"id": i + 1, "file_name": os.path.basename(r["file_name"]), "width": S, "height": S}
        for i, r in enumerate(records)
    ]
    annotations = [
        {
            "id": i + 1,
            "image_id": i + 1,
            "category_id": 1,
            "iscrowd": 0,
            "area": 64.0,
            "bbox": [8, 8, 8, 8],
            "segmentation": [[8, 8, 16, 8, 16, 16, 8, 16]],
        }
        for i in range(3)
    ]
    json_file = str(tmp_path / "instances.json")
    for drop, bad in ((None, 1), (1, 2)):  # each bad file in turn
        keep = [k for k in range(3) if k != drop]
        with open(json_file, "w") as f:
            json.dump(
                {
                    "images": [images[k] for k in keep],
                    "annotations": [annotations[k] for k in keep],
                    "categories": [{"id": 1, "name": "thing"}],
                },
                f,
            )
        with pytest.raises(
            Seg2Error,
            match=rf"{records[bad]['file_name']}: cannot read the image for id {bad + 1} "
            rf"listed in .*instances\.json \(cannot identify image file",
        ):
            load_coco_with_sem_seg(json_file, str(tmp_path / "images"))
        assert len(
            load_coco_with_sem_seg(json_file, str(tmp_path / "images"), check_images=False)
        ) == len(keep)


class _RaisesInWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise Seg2Error(f"labels/{i:02d}.png: label map holds value(s) 9")


def test_seg2_error_of_a_dataloader_worker_is_one_line(capsys, monkeypatch):
    loader = torch.utils.data.DataLoader(_RaisesInWorker(), num_workers=1)
    with pytest.raises(Seg2Error) as info:
        next(iter(loader))
    assert "Traceback" in str(info.value)  # torch's wrapping: the worker's whole traceback
    assert (
        seg2_error_message(info.value)
        == "labels/00.png: label map holds value(s) 9 (in DataLoader worker process 0)"
    )
    assert seg2_error_message(ValueError("x")) is None

    def fails():
        next(iter(torch.utils.data.DataLoader(_RaisesInWorker(), num_workers=1)))

    monkeypatch.delenv("SEG2_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_tool(fails)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert (
        err
        == "seg2: error: labels/00.png: label map holds value(s) 9 (in DataLoader worker process 0)\n"
    )
    with pytest.raises(SystemExit):
        run_tool(fails, debug=True)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith(
        "seg2: error: labels/00.png: label map holds value(s) 9 (in DataLoader worker process 0)\n"
    )
    assert run_tool(lambda: 3) == 3
    with pytest.raises(ValueError):  # not a seg2 error: Python's own report
        run_tool(int, "x")


def test_seg2_error_of_a_launched_process_is_one_line():
    # detectron2's launch with several GPUs spawns processes; torch.multiprocessing's spawn
    # re-raises
    # a process's error as ProcessRaisedException carrying its formatted traceback, as here.
    try:
        raise Seg2Error("labels/00.png: label map holds value(s) 9")
    except Seg2Error:
        tb = traceback.format_exc()
    e = torch.multiprocessing.ProcessRaisedException(
        f"\n\n-- Process 1 terminated with the following error:\n{tb}", 1, 4321
    )
    assert seg2_error_message(e) == "labels/00.png: label map holds value(s) 9"
    e = torch.multiprocessing.ProcessRaisedException(
        "\n\n-- Process 1 terminated ...\nValueError: x\n", 1, 4321
    )
    assert seg2_error_message(e) is None


# tools/train_net.py end to end, on datasets registered by a small launcher script.
_LAUNCHER = """
import runpy, sys
from seg2.data import register_sem_seg_folder
for name, root in {datasets!r}.items():
    register_sem_seg_folder(name, root + "/images", root + "/labels", ["bg", "fg"])
sys.argv = [{train_net!r}] + sys.argv[1:]
runpy.run_path({train_net!r}, run_name="__main__")
"""


def _train_net(tmp_path, datasets, *args):
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(_LAUNCHER.format(datasets=datasets, train_net=TRAIN_NET)))
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    env.pop("SEG2_DEBUG", None)
    common = [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        "2",
        "INPUT.MIN_SIZE_TRAIN",
        f"({S},)",
        "INPUT.MAX_SIZE_TRAIN",
        str(S),
        "INPUT.MIN_SIZE_TEST",
        str(S),
        "INPUT.MAX_SIZE_TEST",
        str(S),
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.WARMUP_ITERS",
        "1",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    ]
    return subprocess.run(
        [sys.executable, str(script), "--config-file", UNET, *args[:-1], *common, *args[-1]],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )


def test_train_net_skips_a_truncated_jpeg_and_evaluation_names_it(tmp_path):
    records = _folder(str(tmp_path / "data"), n=3, bad={1: "truncated"})
    datasets = {"t_bad_jpeg": str(tmp_path / "data")}
    train = ["DATASETS.TRAIN", "('t_bad_jpeg',)", "DATALOADER.NUM_WORKERS", "0", "SEED", "1"]
    r = _train_net(
        tmp_path,
        datasets,
        train
        + ["DATASETS.TEST", "()", "SOLVER.MAX_ITER", "3", "DATALOADER.MAX_BAD_SAMPLE_SHARE", "0.5"],
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert (tmp_path / "out" / "model_final.pth").is_file()
    skips = [line for line in log.splitlines() if "skipping training sample" in line]
    # Drawn in the 6 samples of 3 iterations (seed 1), once named, then known.
    assert (
        len(skips) == 1
        and f"{records[1]['file_name']}: cannot read the image (image file is truncated" in skips[0]
    )
    assert "(1 unreadable of" in skips[0]

    # Evaluation: the same file ends the tool with one line naming it, no metric.
    r = _train_net(
        tmp_path,
        datasets,
        "--eval-only",
        train
        + [
            "DATASETS.TEST",
            "('t_bad_jpeg',)",
            "MODEL.WEIGHTS",
            str(tmp_path / "out" / "model_final.pth"),
        ],
    )
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith(
        f"seg2: error: {records[1]['file_name']}: cannot read the image (image file is truncated"
    )
    assert "Traceback" not in r.stdout + r.stderr and "mIoU" not in r.stdout


def test_train_net_reports_a_worker_seg2_error_in_one_line(tmp_path):
    records = _folder(str(tmp_path / "data"), n=4, bad={k: "label_value" for k in range(4)})
    r = _train_net(
        tmp_path,
        {"t_bad_label": str(tmp_path / "data")},
        [
            "DATASETS.TRAIN",
            "('t_bad_label',)",
            "DATASETS.TEST",
            "()",
            "DATALOADER.NUM_WORKERS",
            "1",
            "SOLVER.MAX_ITER",
            "2",
        ],
    )
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("seg2: error:")]
    assert line.endswith(
        "label map holds value(s) 9 in 256 pixel(s), which are neither a class index (0..1) nor "
        "the "
        "ignore label 255 (in DataLoader worker process 0)"
    )
    assert any(line.startswith(f"seg2: error: {x['sem_seg_file_name']}: ") for x in records)
