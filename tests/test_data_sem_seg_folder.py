"""A user's folder of images + folder of label files: index ('L', 'P') and RGB colour-coded masks
decode to the same class maps; bad input is an error naming the file and the problem."""

import os

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import seg2
from seg2.data import (
    MultiTaskDatasetMapper,
    load_sem_seg_folder,
    read_label_map,
    read_sem_seg,
    register_sem_seg_folder,
    sem_seg_format,
)
from seg2.data.label_map import ignore_only, ignore_only_counts
from seg2.data.voc_palette import VOC_PALETTE, palette_colors
from seg2.utils import Seg2Error

CLASSES = ["road", "car", "tree"]
COLORS = [(128, 64, 128), (64, 0, 128), (128, 128, 0)]
VOID_COLOR = (0, 0, 0)
H, W = 12, 16


def _labels(n=3, seed=0):
    """Class maps with values 0..2 and void (255) in blocks, one per image."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        m = rng.integers(0, 3, size=(H // 4, W // 4)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
        m[0, :5] = 255
        maps.append(m)
    return maps


def _colorize(label, colors=COLORS, void_color=VOID_COLOR):
    table = np.zeros((256, 3), np.uint8)
    table[: len(colors)] = colors
    table[255] = void_color
    return table[label]


def _write_dataset(root, labels, kind):
    """``root/images/img<i>.png`` and ``root/<kind>/img<i>.png`` as 'L', 'P' (VOC colours) or RGB."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, kind), exist_ok=True)
    for i, label in enumerate(labels):
        image = os.path.join(root, "images", f"img{i}.png")
        if not os.path.exists(image):
            Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(image)
        path = os.path.join(root, kind, f"img{i}.png")
        if kind == "L":
            Image.fromarray(label, mode="L").save(path)
        elif kind == "P":
            im = Image.fromarray(label, mode="P")
            im.putpalette(VOC_PALETTE)
            im.save(path)
        elif kind == "RGB":
            Image.fromarray(_colorize(label)).save(path)
        elif kind == "RGB_voc":  # colour-coded with VOC's colours (void: VOC's colour 255)
            Image.fromarray(_colorize(label, palette_colors(3), tuple(VOC_PALETTE[765:768]))).save(
                path
            )
    return os.path.join(root, "images"), os.path.join(root, kind)


@pytest.fixture
def dataset(tmp_path):
    labels = _labels()
    roots = {
        kind: _write_dataset(str(tmp_path), labels, kind) for kind in ("L", "P", "RGB", "RGB_voc")
    }
    return labels, roots


def _strip(record):
    return {k: v for k, v in record.items() if k not in ("sem_seg_file_name", "sem_seg_format")}


def test_index_and_rgb_masks_give_identical_records(dataset):
    labels, roots = dataset
    loaded = {
        "L": load_sem_seg_folder(*roots["L"], CLASSES),
        "P": load_sem_seg_folder(*roots["P"], CLASSES),
        "RGB": load_sem_seg_folder(
            *roots["RGB"], CLASSES, "rgb", colors=COLORS, void_colors=[VOID_COLOR]
        ),
        # The colour table taken from a palette (VOC's), and from a palette PNG's palette.
        "RGB_voc": load_sem_seg_folder(
            *roots["RGB_voc"],
            CLASSES,
            "rgb",
            palette=VOC_PALETTE,
            void_colors=[VOC_PALETTE[765:768]],
        ),
        "P as colours": load_sem_seg_folder(
            *roots["P"],
            CLASSES,
            "rgb",
            palette=os.path.join(roots["P"][1], "img0.png"),
            void_colors=[(224, 224, 192)],
        ),
    }
    reference = [_strip(r) for r in loaded["L"]]
    assert [r["image_id"] for r in reference] == ["img0", "img1", "img2"]
    assert reference[0]["height"] == H and reference[0]["width"] == W
    for kind, records in loaded.items():
        assert [_strip(r) for r in records] == reference, kind
        for r, expected in zip(records, labels):
            decoded = read_sem_seg(r)
            assert decoded.dtype == np.uint8, kind
            np.testing.assert_array_equal(decoded, expected, err_msg=kind)
    assert loaded["RGB"][0]["sem_seg_format"] == {
        "type": "rgb",
        "colors": [list(c) for c in COLORS],
        "void_colors": [list(VOID_COLOR)],
    }
    assert loaded["L"][0]["sem_seg_format"] == {"type": "index", "void": []}


def test_rgb_decoding_by_hand(tmp_path):
    rgb = np.array(
        [[COLORS[0], COLORS[1], VOID_COLOR], [COLORS[2], COLORS[2], COLORS[0]]], dtype=np.uint8
    )  # 2x3 pixels
    path = str(tmp_path / "m.png")
    Image.fromarray(rgb).save(path)
    expected = np.array([[0, 1, 255], [2, 2, 0]])
    np.testing.assert_array_equal(
        read_label_map(path, colors=COLORS, void_colors=[VOID_COLOR]), expected
    )
    # An opaque RGBA mask decodes as its RGB; a transparent pixel is an error (it has no class).
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba).save(path)
    np.testing.assert_array_equal(
        read_label_map(path, colors=COLORS, void_colors=[VOID_COLOR]), expected
    )
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(path)
    with pytest.raises(
        Seg2Error, match=r"m.png: RGBA label map has 1 pixel\(s\) that are not opaque"
    ):
        read_label_map(path, colors=COLORS, void_colors=[VOID_COLOR])


def test_index_void_values_become_ignore(tmp_path):
    label = np.array([[0, 1, 7], [2, 7, 255]], np.uint8)
    path = str(tmp_path / "l.png")
    Image.fromarray(label, mode="L").save(path)
    record = {"sem_seg_file_name": path, "sem_seg_format": sem_seg_format("index", void=[7])}
    np.testing.assert_array_equal(read_sem_seg(record), [[0, 1, 255], [2, 255, 255]])
    # Without a format: today's behaviour, values as they are.
    np.testing.assert_array_equal(read_sem_seg({"sem_seg_file_name": path}), label)


def test_unknown_colour_is_an_error_naming_file_colour_and_pixels(dataset, tmp_path):
    labels, roots = dataset
    rgb = _colorize(labels[1])
    rgb[5:7, 2:5] = (10, 20, 30)  # 6 pixels
    rgb[11, 15] = (255, 0, 0)  # 1 pixel
    Image.fromarray(rgb).save(os.path.join(roots["RGB"][1], "img1.png"))
    records = load_sem_seg_folder(
        *roots["RGB"], CLASSES, "rgb", colors=COLORS, void_colors=[VOID_COLOR]
    )
    pattern = (
        r"RGB/img1.png: RGB label map has colour\(s\) .*: \(10, 20, 30\) in 6 pixel\(s\), "
        r"\(255, 0, 0\) in 1 pixel\(s\)"
    )
    with pytest.raises(Seg2Error, match=pattern):
        read_sem_seg(records[1])  # at map time, as the mapper and the evaluator read it
    with pytest.raises(Seg2Error, match=pattern):
        load_sem_seg_folder(
            *roots["RGB"],
            CLASSES,
            "rgb",
            colors=COLORS,
            void_colors=[VOID_COLOR],
            check_labels=True,
        )
    # Without void_colors, the void colour is an unknown colour too: nothing becomes background.
    with pytest.raises(Seg2Error, match=r"img0.png: .*\(0, 0, 0\) in 5 pixel\(s\)"):
        read_sem_seg(load_sem_seg_folder(*roots["RGB"], CLASSES, "rgb", colors=COLORS)[0])


def test_palette_mask_with_unknown_colour(tmp_path):
    im = Image.fromarray(np.array([[0, 1], [3, 3]], np.uint8), mode="P")
    im.putpalette(VOC_PALETTE)
    path = str(tmp_path / "p.png")
    im.save(path)
    # VOC colour 3 is (128, 128, 0): not in a 2-class table.
    with pytest.raises(Seg2Error, match=r"p.png: .*\(128, 128, 0\) in 2 pixel\(s\)"):
        read_label_map(path, colors=palette_colors(2))


def test_size_mismatch_is_an_error_at_load(dataset):
    labels, roots = dataset
    Image.fromarray(labels[2][:, :10], mode="L").save(os.path.join(roots["L"][1], "img2.png"))
    with pytest.raises(
        Seg2Error, match=r"L/img2.png: label map is 10x12 \(WxH\) but its image .*img2.png is 16x12"
    ):
        load_sem_seg_folder(*roots["L"], CLASSES)


def test_unpaired_files_are_errors(dataset):
    _, roots = dataset
    image_root, label_root = roots["L"]
    os.rename(os.path.join(label_root, "img1.png"), os.path.join(label_root, "other.png"))
    with pytest.raises(
        Seg2Error, match=r"images/img1.png: image has no label file <stem>.png in .*L"
    ):
        load_sem_seg_folder(image_root, label_root, CLASSES)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(os.path.join(image_root, "img1.jpg"))
    with pytest.raises(
        Seg2Error, match=r"images/img1.png: two files have the stem 'img1' \(also .*img1.jpg\)"
    ):
        load_sem_seg_folder(image_root, label_root, CLASSES)
    os.remove(os.path.join(image_root, "img1.jpg"))
    os.rename(os.path.join(label_root, "other.png"), os.path.join(label_root, "img1.png"))
    os.remove(os.path.join(image_root, "img2.png"))
    with pytest.raises(Seg2Error, match=r"L/img2.png: label file has no image"):
        load_sem_seg_folder(image_root, label_root, CLASSES)


def test_labels_beside_images_with_a_suffix(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, label in enumerate(_labels(2)):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / f"f{i}.png")
        Image.fromarray(_colorize(label)).save(folder / f"f{i}_L.png")
    records = load_sem_seg_folder(
        str(folder),
        str(folder),
        CLASSES,
        "rgb",
        colors=COLORS,
        void_colors=[VOID_COLOR],
        label_ext="_L.png",
    )
    assert [
        (os.path.basename(r["file_name"]), os.path.basename(r["sem_seg_file_name"]))
        for r in records
    ] == [
        ("f0.png", "f0_L.png"),
        ("f1.png", "f1_L.png"),
    ]


def test_values_beyond_the_class_count(dataset):
    labels, roots = dataset
    bad = labels[0].copy()
    bad[3, 4:7] = 5
    Image.fromarray(bad, mode="L").save(os.path.join(roots["L"][1], "img0.png"))
    with pytest.raises(
        Seg2Error,
        match=r"L/img0.png: label map holds value\(s\) 5 in 3 pixel\(s\), which are neither",
    ):
        load_sem_seg_folder(*roots["L"], CLASSES, check_labels=True)
    # At map time: the training mapper checks against the class count, which the resolve step
    # checked against the dataset's stuff_classes.
    register_sem_seg_folder("seg2_test_folder_bad", *roots["L"], CLASSES)
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "Seg2MultiTaskRCNN"  # reads label maps
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("seg2_test_folder_bad",), ()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.ROI_HEADS.NUM_CLASSES = (
        len(CLASSES),
        len(CLASSES) - 1,
    )
    mapper = MultiTaskDatasetMapper(seg2.resolve_config(cfg), is_train=True)
    with pytest.raises(
        Seg2Error, match=r"L/img0.png: label map holds value\(s\) 5 in 3 pixel\(s\)"
    ):
        mapper(DatasetCatalog.get("seg2_test_folder_bad")[0])


def test_wrong_kind_of_label_file(dataset):
    _, roots = dataset
    with pytest.raises(
        Seg2Error, match=r"RGB/img0.png: label map has PIL mode 'RGB'.*label_format='rgb'"
    ):
        load_sem_seg_folder(*roots["RGB"], CLASSES)  # colour masks loaded as index maps
    with pytest.raises(
        Seg2Error,
        match=r"L/img0.png: label map has PIL mode 'L'; this dataset's label format is 'rgb'",
    ):
        load_sem_seg_folder(*roots["L"], CLASSES, "rgb", colors=COLORS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(label_format="rgb"), "needs the colour of each class"),
        (
            dict(label_format="rgb", colors=COLORS[:2]),
            "colors has 2 colours but there are 3 class_names",
        ),
        (
            dict(label_format="rgb", colors=[COLORS[0], COLORS[1], COLORS[0]]),
            r"colour \(128, 64, 128\) is given twice: to class 0 and to class 2",
        ),
        (
            dict(label_format="rgb", colors=COLORS, void_colors=[COLORS[1]]),
            "given twice: to class 1 and to void colour 0",
        ),
        (
            dict(label_format="rgb", colors=[(1, 2), (3, 4, 5), (6, 7, 8)]),
            r"\(1, 2\) is not an \(r, g, b\) colour",
        ),
        (
            dict(label_format="rgb", colors=COLORS, void=[3]),
            "give void_colors instead of void values",
        ),
        (
            dict(label_format="index", void_colors=[VOID_COLOR]),
            "colors / void_colors need label_format='rgb'",
        ),
        (dict(label_format="gray"), "label_format must be 'index' or 'rgb'"),
        (dict(colors=COLORS, palette=VOC_PALETTE), "not both"),
        (dict(value_map={255: 300}), "mapped to 300, which is neither a class index"),
        (dict(value_map={-1: 1}), "-1 is not a pixel value"),
        (dict(value_map={7: 1}, void=[7]), "7 is both in void and in value_map"),
        (dict(value_map="255:1"), "not a mapping of pixel values to class indices"),
        (dict(label_format="rgb", colors=COLORS, value_map={1: 2}), "rgb. has colors"),
    ],
)
def test_bad_label_formats(tmp_path, kwargs, message):
    with pytest.raises(Seg2Error, match=message):
        register_sem_seg_folder(
            "seg2_test_folder_format", str(tmp_path), str(tmp_path), CLASSES, **kwargs
        )


def test_register_sem_seg_folder_metadata(dataset):
    _, roots = dataset
    register_sem_seg_folder(
        "seg2_test_folder_rgb",
        *roots["RGB"],
        CLASSES,
        "rgb",
        colors=COLORS,
        void_colors=[VOID_COLOR],
    )
    meta = MetadataCatalog.get("seg2_test_folder_rgb")
    assert meta.stuff_classes == CLASSES and meta.stuff_colors == COLORS
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert meta.image_root == roots["RGB"][0] and meta.sem_seg_root == roots["RGB"][1]
    assert len(DatasetCatalog.get("seg2_test_folder_rgb")) == 3
    register_sem_seg_folder("seg2_test_folder_index", *roots["L"], CLASSES)
    assert MetadataCatalog.get("seg2_test_folder_index").stuff_colors == palette_colors(3)


def test_mapper_reads_every_format_alike(dataset):
    """The training mapper gives the same image and the same sem_seg (void -> 255) for the three
    kinds of label files (needs the mapper to read maps with read_sem_seg)."""
    labels, roots = dataset
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "Seg2MultiTaskRCNN"  # reads label maps
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (H,), W
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(CLASSES)
    mapper = MultiTaskDatasetMapper(cfg, is_train=True)
    outputs = {}
    for kind, kwargs in (
        ("L", {}),
        ("P", {}),
        ("RGB", dict(label_format="rgb", colors=COLORS, void_colors=[VOID_COLOR])),
    ):
        records = load_sem_seg_folder(*roots[kind], CLASSES, **kwargs)
        np.random.seed(0)  # the same flips
        outputs[kind] = [mapper(r) for r in records]
        assert all("sem_seg_format" not in out for out in outputs[kind])
    for kind in ("P", "RGB"):
        for a, b in zip(outputs["L"], outputs[kind]):
            assert (a["image"] == b["image"]).all() and (a["sem_seg"] == b["sem_seg"]).all(), kind
    assert sorted(np.unique(outputs["RGB"][0]["sem_seg"].numpy())) == sorted(np.unique(labels[0]))


def _binary_mask_dataset(root, n=3):
    """Images and binary masks saved as 0/255, the most common mask format: a square of
    foreground (255) on background (0), as single-channel PNGs."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    masks = []
    for i in range(n):
        mask = np.zeros((H, W), np.uint8)
        mask[2 : 6 + i, 3 : 9 + i] = 255
        Image.fromarray(np.full((H, W, 3), 30 * i, np.uint8)).save(
            os.path.join(root, "images", f"m{i}.png")
        )
        Image.fromarray(mask, mode="L").save(os.path.join(root, "masks", f"m{i}.png"))
        masks.append(mask)
    return os.path.join(root, "images"), os.path.join(root, "masks"), masks


def test_binary_0_255_masks_are_warned_about_at_load_once_per_folder(tmp_path, caplog):
    images, masks_dir, masks = _binary_mask_dataset(str(tmp_path))
    register_sem_seg_folder(
        "seg2_test_binary_void", images, masks_dir, ["background", "foreground"]
    )
    with caplog.at_level("WARNING", logger="seg2.data.label_map"):
        records = DatasetCatalog.get("seg2_test_binary_void")
        DatasetCatalog.get("seg2_test_binary_void")  # loaded again: no second warning
        for r in records:
            read_sem_seg(r)  # as the mapper and the evaluator read them: counted, not re-warned
    warnings = [r.getMessage() for r in caplog.records if "only non-zero value" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert (
        "m0.png" in warnings[0]
        and "value_map={255: 1}" in warnings[0]
        and "0/255 binary masks?" in warnings[0]
    )
    read, ignore_only = ignore_only_counts()[os.path.abspath(masks_dir)]
    assert read == ignore_only >= len(masks)  # every map read is 0/255 only, every one counted


def test_value_map_decodes_0_255_masks_as_two_classes(tmp_path, caplog):
    images, masks_dir, masks = _binary_mask_dataset(str(tmp_path))
    with caplog.at_level("WARNING", logger="seg2.data.label_map"):
        records = load_sem_seg_folder(
            images, masks_dir, ["background", "foreground"], value_map={255: 1}
        )
    assert records[0]["sem_seg_format"] == {"type": "index", "void": [], "value_map": [[255, 1]]}
    for r, mask in zip(records, masks):
        label = read_sem_seg(r)
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, (mask == 255).astype(np.uint8))
    assert "only non-zero value" not in caplog.text
    # value_map and void together, applied at once: 7 -> void, 255 -> 1, 1 -> 2 (not then 2 -> ...)
    label = np.array([[0, 1, 7], [255, 2, 255]], np.uint8)
    path = str(tmp_path / "mixed.png")
    Image.fromarray(label, mode="L").save(path)
    fmt = sem_seg_format("index", void=[7], value_map={255: 1, 1: 2, 2: 0})
    np.testing.assert_array_equal(
        read_sem_seg({"sem_seg_file_name": path, "sem_seg_format": fmt}), [[0, 2, 255], [1, 0, 1]]
    )


def test_16bit_index_png(tmp_path):
    """A real 16-bit PNG: read as uint8 where its values fit (what detectron2's resize needs),
    with void and value_map applied to its 16-bit values; int64 beyond."""
    label = np.array([[0, 1, 1000], [2, 65535, 3]], np.uint16)
    path = str(tmp_path / "l16.png")
    Image.fromarray(label).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    fmt = sem_seg_format("index", void=[65535], value_map={1000: 4})
    out = read_sem_seg({"sem_seg_file_name": path, "sem_seg_format": fmt})
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 1, 4], [2, 255, 3]])
    wide = read_label_map(path)
    assert wide.dtype == np.int64 and wide.max() == 65535


@pytest.mark.parametrize(
    "values, expected",
    [
        ((0, 255), True),
        ((255,), True),
        ((0,), False),
        ((0, 1, 255), False),
        ((0, 254, 255), False),
        ((1, 255), False),
        ((0, 7), False),
    ],
)
def test_ignore_only(values, expected):
    """The maps whose only non-zero value is 255, uint8 (fast path) and int64 alike."""
    label = np.array(values * 6, np.uint8).reshape(len(values), 6)
    assert bool(ignore_only(label)) == expected
    assert bool(ignore_only(label.astype(np.int64))) == expected
