"""seg2.data.class_weights: median/inverse frequency weights by hand, the cache, the config path."""

import glob
import json
import logging
import os

import numpy as np
import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import seg2
from seg2.data import register_dataset, sem_seg_format, write_label_map
from seg2.data.class_weights import compute_class_weights
from seg2.modeling.losses import build_sem_seg_loss

# SegNet's median-frequency weights for CamVid's 11 classes (REFERENCE.md, full train split).
SEGNET_CAMVID_WEIGHTS = [
    0.2595,
    0.1826,
    4.5640,
    0.1417,
    0.9051,
    0.3826,
    9.6446,
    1.8418,
    0.6823,
    6.2478,
    7.3614,
]
CAMVID_MINI = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "..",
    "shared",
    "datasets",
    "CamVid_mini",
)


@pytest.fixture
def tiny_set(tmp_path):
    """
    Two 2x2 label maps, 4 classes (class 3 never appears), 255 ignored:

        A = [[0, 0], [1, 255]]   labelled 3: class 0 x2, class 1 x1
        B = [[0, 2], [2, 2]]     labelled 4: class 0 x1, class 2 x3
    """
    maps = {"a": [[0, 0], [1, 255]], "b": [[0, 2], [2, 2]]}
    records = []
    for name, label in maps.items():
        path = str(tmp_path / f"{name}.png")
        write_label_map(np.array(label, dtype=np.uint8), path)
        records.append({"file_name": f"{name}.jpg", "sem_seg_file_name": path})
    return records


def test_median_frequency_by_hand(tiny_set, tmp_path, caplog):
    # pixels: c0 = 3, c1 = 1, c2 = 3. Labelled pixels of the images where c appears: c0 in A and B
    # (3 + 4 = 7), c1 in A (3), c2 in B (4). freq = 3/7, 1/3, 3/4; median 3/7;
    # weight = median / freq = 1, (3/7)/(1/3) = 9/7, (3/7)/(3/4) = 4/7; class 3 absent: 0.
    with caplog.at_level(logging.INFO, logger="seg2.data.class_weights"):
        w = compute_class_weights(
            tiny_set,
            4,
            "median_frequency",
            class_names=["bg", "pole", "car", "bike"],
            cache_dir=str(tmp_path / "c"),
        )
    np.testing.assert_allclose(w, [1.0, 9 / 7, 4 / 7, 0.0])
    # the absent class is named in a warning; the per-class table is logged
    assert any(r.levelno == logging.WARNING and "bike" in r.getMessage() for r in caplog.records)
    table = next(r.getMessage() for r in caplog.records if "pixel frequency" in r.getMessage())
    assert "| pole " in table and "1.2857" in table and "0.5714" in table


def test_inverse_frequency_by_hand(tiny_set, tmp_path):
    # total labelled 7, K = 3 present classes: 7 / (3 * 3), 7 / (3 * 1), 7 / (3 * 3); absent: 0
    w = compute_class_weights(tiny_set, 4, "inverse_frequency", cache_dir=str(tmp_path / "c"))
    np.testing.assert_allclose(w, [7 / 9, 7 / 3, 7 / 9, 0.0])
    assert np.isfinite(w).all()


def test_cache_is_reused_and_invalidated(tiny_set, tmp_path):
    cache_dir = str(tmp_path / "cache")
    compute_class_weights(tiny_set, 4, "median_frequency", cache_dir=cache_dir)
    (path,) = glob.glob(os.path.join(cache_dir, "class_weights", "*.json"))
    with open(path) as f:
        data = json.load(f)
    assert data["pixels"] == [3, 1, 3, 0] and data["image_pixels"] == [7, 3, 4, 0]
    # The second call reads the file: counts edited in it are what it uses.
    data["pixels"] = [1, 1, 1, 1]
    data["image_pixels"] = [1, 2, 4, 8]
    with open(path, "w") as f:
        json.dump(data, f)
    # freq 1, 1/2, 1/4, 1/8; median 3/8; weights 3/8, 3/4, 3/2, 3
    np.testing.assert_allclose(
        compute_class_weights(tiny_set, 4, "median_frequency", cache_dir=cache_dir),
        [3 / 8, 3 / 4, 3 / 2, 3],
    )
    # The key is the label files' content: a new modification time alone keeps it (the edited
    # counts above are still used) ...
    a = tiny_set[0]["sem_seg_file_name"]
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    np.testing.assert_allclose(
        compute_class_weights(tiny_set, 4, "median_frequency", cache_dir=cache_dir),
        [3 / 8, 3 / 4, 3 / 2, 3],
    )
    # ... while other labels of the same byte size, with the old modification time put back, are a
    # new key (issue 15: a size + mtime key would reuse the stale counts). A' = [[0, 1], [1, 255]]:
    # pixels c0 2, c1 2, c2 3; image pixels 7, 3, 4; freq 2/7, 2/3, 3/4, median 2/3.
    write_label_map(np.array([[0, 1], [1, 255]], dtype=np.uint8), a)
    assert os.path.getsize(a) == st.st_size
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    np.testing.assert_allclose(
        compute_class_weights(tiny_set, 4, "median_frequency", cache_dir=cache_dir),
        [7 / 3, 1, 8 / 9, 0],
    )
    assert len(glob.glob(os.path.join(cache_dir, "class_weights", "*.json"))) == 2
    # a corrupt cache file is recomputed, not trusted
    with open(path, "w") as f:
        f.write("{not json")
    write_label_map(
        np.array([[0, 0], [1, 255]], dtype=np.uint8), a
    )  # back to A: the corrupt entry's key
    np.testing.assert_allclose(
        compute_class_weights(tiny_set, 4, "median_frequency", cache_dir=cache_dir),
        [1, 9 / 7, 4 / 7, 0],
    )
    # cache files get the mode of normal files (0o666 less the umask), not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    for p in glob.glob(os.path.join(cache_dir, "class_weights", "*.json")):
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask


def test_bad_label_value_names_the_file(tiny_set, tmp_path):
    write_label_map(np.array([[0, 7], [1, 1]], dtype=np.uint8), tiny_set[1]["sem_seg_file_name"])
    with pytest.raises(seg2.Seg2Error, match=r"b\.png: label map holds value\(s\) 7"):
        compute_class_weights(tiny_set, 4, "median_frequency", cache_dir=str(tmp_path / "c"))


def test_resolve_step_writes_the_weights_into_the_config(tiny_set, tmp_path, monkeypatch):
    """CLASS_WEIGHTING is counted by the resolve step, before the model is built, and handed to
    the loss as numbers in CLASS_WEIGHT (what the run's config.yaml then holds); the loss of a
    config that skipped the resolve step refuses to train, naming the key."""
    monkeypatch.setenv("SEG2_CACHE", str(tmp_path / "seg2_cache"))
    name = "seg2_test_class_weights_tiny"
    register_dataset(
        name,
        lambda: tiny_set,
        {"stuff_classes": ["bg", "pole", "car", "bike"], "ignore_label": 255},
    )
    try:
        cfg = get_cfg()
        seg2.add_seg2_config(cfg)
        cfg.MODEL.META_ARCHITECTURE = "Seg2SemanticSegmentor"
        cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "cross_entropy"
        cfg.DATASETS.TRAIN = (name,)
        cfg.DATASETS.TEST = ()
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
        cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = "median_frequency"
        resolved = seg2.resolve_config(cfg)
        np.testing.assert_allclose(resolved.MODEL.SEM_SEG_HEAD.CLASS_WEIGHT, [1, 9 / 7, 4 / 7, 0])
        assert cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHT == []  # the caller's config is not changed
        saved = yaml.safe_load(resolved.dump())["MODEL"]["SEM_SEG_HEAD"]["CLASS_WEIGHT"]
        np.testing.assert_allclose(saved, [1, 9 / 7, 4 / 7, 0])  # numbers in the saved config.yaml
        assert glob.glob(
            str(tmp_path / "seg2_cache" / "class_weights" / "*.json")
        )  # $SEG2_CACHE is used
        loss = build_sem_seg_loss(resolved)
        torch.testing.assert_close(
            loss.class_weight, torch.tensor([1, 9 / 7, 4 / 7, 0], dtype=torch.float32)
        )
        logits, t = torch.zeros(1, 4, 1, 2), torch.tensor([[[1, 2]]])
        # uniform logits: every pixel costs ln 4, the weighted mean is ln 4 whatever the weights
        assert float(loss(logits, t)) == pytest.approx(np.log(4), rel=1e-6)
        # Built without the resolve step: fine for inference, refused for training.
        unresolved = build_sem_seg_loss(cfg)
        with pytest.raises(seg2.Seg2Error, match="CLASS_WEIGHTING='median_frequency'.*resolve"):
            unresolved(logits, t)
        cfg.DATASETS.TRAIN = ()
        with pytest.raises(
            seg2.Seg2Error, match="CLASS_WEIGHTING='median_frequency'.*DATASETS.TRAIN"
        ):
            seg2.resolve_config(cfg)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_changed_colour_table_recounts(tmp_path):
    """The cache key covers how the label files are decoded: after correcting a wrong colour
    table, the counts are those of the new decoding, not the cached ones of the old."""
    path = str(tmp_path / "rgb.png")
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)  # one red pixel, three black
    Image.fromarray(rgb).save(path)
    wrong = sem_seg_format("rgb", colors=[(255, 0, 0), (0, 0, 0)])  # red is class 0 (wrong)
    right = sem_seg_format("rgb", colors=[(0, 0, 0), (255, 0, 0)])  # black 0, red 1
    cache = str(tmp_path / "cache")

    def weights(fmt):
        records = [{"file_name": "x.jpg", "sem_seg_file_name": path, "sem_seg_format": fmt}]
        return compute_class_weights(records, 2, "inverse_frequency", cache_dir=cache)

    np.testing.assert_allclose(weights(wrong), [4 / (2 * 1), 4 / (2 * 3)])
    np.testing.assert_allclose(weights(right), [4 / (2 * 3), 4 / (2 * 1)])


def test_camvid_mini_median_frequency_close_to_segnets(tmp_path):
    """On the 16 real CamVid training images of CamVid_mini, the weights are those SegNet computed
    on the full 367-image split, up to sampling: 10 of 11 within a factor 1.25, the same rare classes."""
    if not os.path.isdir(CAMVID_MINI):
        pytest.skip(f"{CAMVID_MINI} is absent: the shared data is only in the seg2 team's checkout")
    records = [
        {
            "file_name": p,
            "sem_seg_file_name": p.replace(
                os.sep + "train" + os.sep, os.sep + "trainannot" + os.sep
            ),
        }
        for p in sorted(glob.glob(os.path.join(CAMVID_MINI, "train", "*.png")))
    ]
    w = compute_class_weights(
        records, 11, "median_frequency", ignore_label=11, cache_dir=str(tmp_path)
    )
    ratio = w / np.array(SEGNET_CAMVID_WEIGHTS)
    assert (np.abs(np.log(ratio)) < np.log(1.25)).sum() >= 10, np.round(ratio, 2)
    rare = {2, 6, 7, 9, 10}  # Pole, SignSymbol, Fence, Pedestrian, Bicyclist: weight > 1 in both
    assert {c for c in range(11) if w[c] > 1.5} == rare


def test_interrupted_count_resumes_where_it_stopped(tiny_set, tmp_path, monkeypatch, caplog):
    """Ctrl-C during the counting pass (here after 2 of 3 maps) keeps the running counts in
    ``<cache>.partial``; the next call counts only the rest and gives the uninterrupted weights."""
    import seg2.data.class_weights as cw

    path = str(tmp_path / "c.png")
    write_label_map(np.array([[3, 3], [0, 255]], dtype=np.uint8), path)
    records = tiny_set + [{"file_name": "c.jpg", "sem_seg_file_name": path}]
    expected = compute_class_weights(
        records, 4, "median_frequency", cache_dir=str(tmp_path / "fresh")
    )

    class CtrlC(logging.Handler):
        def emit(self, record):
            if "label maps read: 2/3" in record.getMessage():
                raise KeyboardInterrupt

    monkeypatch.setattr(cw, "_PROGRESS_SECONDS", 0.0)  # save the running counts after every map
    handler = CtrlC()
    cw.logger.addHandler(handler)
    cache_dir = str(tmp_path / "c")
    try:
        with caplog.at_level(logging.INFO, logger="seg2"), pytest.raises(KeyboardInterrupt):
            compute_class_weights(records, 4, "median_frequency", cache_dir=cache_dir)
    finally:
        cw.logger.removeHandler(handler)
    (partial,) = glob.glob(os.path.join(cache_dir, "class_weights", "*.json.partial"))
    assert json.load(open(partial))["done"] == 2
    assert not glob.glob(os.path.join(cache_dir, "class_weights", "*.json"))  # no cache entry yet

    with caplog.at_level(logging.INFO, logger="seg2"):
        w = compute_class_weights(records, 4, "median_frequency", cache_dir=cache_dir)
    assert "resuming an interrupted count after 2 of 3 label maps" in caplog.text
    assert "label maps read: 1/1 done" in caplog.text  # only the third map was read again
    np.testing.assert_array_equal(w, expected)
    assert not os.path.exists(partial)
