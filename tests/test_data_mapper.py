"""MultiTaskDatasetMapper: one geometry for image, instances and semantic map; checks on label maps."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, PolygonMasks
from PIL import Image
from pycocotools import mask as mask_util

import seg2
from seg2 import Seg2Error
from seg2.data import MultiTaskDatasetMapper, register_dataset, write_label_map
from seg2.data.dataset_mapper import _HAS_SHAPELY, CategoryAreaConstrainedCrop

H, W = 16, 24
# (rows, cols) of three disjoint objects of classes 0, 1, 2 (label values 1, 2, 3)
RECTS = [((2, 7), (3, 10)), ((8, 14), (12, 21)), ((1, 5), (15, 23))]
VOID = (slice(14, 16), slice(0, 4))


def _rect_mask(rows, cols, h=H, w=W):
    m = np.zeros((h, w), np.uint8)
    m[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return m


def make_record(tmp_path, segm_kinds=("polygon", "rle", "bitmask"), sem=True, name="r"):
    """Image whose red channel encodes the label (20 * value, 200 on void), green/blue the position."""
    label = np.zeros((H, W), np.uint8)
    annotations = []
    for cls, ((r0, r1), (c0, c1)) in enumerate(RECTS):
        label[r0:r1, c0:c1] = cls + 1
        m = _rect_mask((r0, r1), (c0, c1))
        kind = segm_kinds[cls]
        if kind == "polygon":
            segm = [[c0, r0, c1, r0, c1, r1, c0, r1]]
        elif kind == "rle":
            segm = mask_util.encode(np.asfortranarray(m))
        else:
            segm = m.astype(bool)
        annotations.append(
            {
                "bbox": [c0, r0, c1 - c0, r1 - r0],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": cls,
                "segmentation": segm,
                "iscrowd": 0,
            }
        )
    # A crowd region is not a training instance.
    annotations.append(
        {
            "bbox": [0, 0, 2, 2],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 0,
            "iscrowd": 1,
            "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]],
        }
    )
    label[VOID] = 255
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = np.where(label == 255, 200, label * 20)
    image[..., 1] = np.arange(W)[None, :] * 10
    image[..., 2] = np.arange(H)[:, None] * 10
    path = str(tmp_path / f"{name}.png")
    Image.fromarray(image).save(path)  # lossless, so colours encode labels exactly
    record = {
        "file_name": path,
        "height": H,
        "width": W,
        "image_id": name,
        "annotations": annotations,
    }
    if sem:
        record["sem_seg_file_name"] = str(tmp_path / f"{name}_label.png")
        write_label_map(label, record["sem_seg_file_name"])
    return record


def _direct_mapper(augs, mask_format="polygon", **kwargs):
    return MultiTaskDatasetMapper(
        is_train=True,
        augmentations=augs,
        image_format="RGB",
        use_instance_mask=True,
        instance_mask_format=mask_format,
        num_classes=4,
        **kwargs,
    )


def _dense_masks(gt_masks, shape):
    if isinstance(gt_masks, BitMasks):
        return gt_masks.tensor.numpy()
    from detectron2.structures.masks import polygons_to_bitmask

    return np.stack([polygons_to_bitmask(p, *shape) for p in gt_masks.polygons])


@pytest.mark.parametrize(
    "kinds,mask_format,mask_type",
    [
        (("polygon", "rle", "bitmask"), "polygon", BitMasks),  # mixed: kept as bitmasks
        # Cropping polygons needs shapely; without it they are rasterised before the crop.
        (("polygon", "polygon", "polygon"), "polygon", PolygonMasks if _HAS_SHAPELY else BitMasks),
        (("polygon", "rle", "bitmask"), "bitmask", BitMasks),
    ],
)
def test_one_geometry_for_image_instances_and_semantic_map(tmp_path, kinds, mask_format, mask_type):
    record = make_record(tmp_path, kinds)
    np.random.seed(0)
    augs = [
        T.Resize((32, 48), interp=Image.NEAREST),
        T.RandomFlip(prob=1.0),
        T.RandomCrop("absolute", (26, 36)),
    ]
    mapper = _direct_mapper(augs, mask_format)
    for _ in range(3):
        out = mapper(record)
        image, sem = out["image"].numpy(), out["sem_seg"].numpy()
        assert image.shape == (3, 26, 36) and sem.shape == (26, 36)
        # The red channel went through the same resize, flip and crop as the label map.
        np.testing.assert_array_equal(np.where(sem == 255, 200, sem * 20), image[0])
        assert (np.diff(image[1].astype(int), axis=1) <= 0).all()  # flipped: columns decrease
        inst = out["instances"]
        assert isinstance(inst.gt_masks, mask_type) and inst.image_size == (26, 36)
        masks = _dense_masks(inst.gt_masks, (26, 36))
        present = sorted(set(np.unique(sem)) - {0, 255})
        assert (
            inst.gt_classes + 1
        ).tolist() == present  # crowd dropped, cropped-away objects dropped
        for m, cls, box in zip(masks, inst.gt_classes.tolist(), inst.gt_boxes.tensor.numpy()):
            np.testing.assert_array_equal(m.astype(bool), sem == cls + 1)
            ys, xs = np.nonzero(m)
            np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def _cfg(**input_opts):
    cfg = get_cfg()
    seg2.add_seg2_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.META_ARCHITECTURE = "Seg2MultiTaskRCNN"  # instances and label maps
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    for k, v in input_opts.items():
        node, key = (cfg.INPUT.CROP, k[5:]) if k.startswith("CROP_") else (cfg.INPUT, k)
        setattr(node, key, v)
    return cfg


def test_semantic_only_and_instance_only_records(tmp_path):
    full = make_record(tmp_path)
    mapper = MultiTaskDatasetMapper(_cfg(), is_train=True)
    sem_only = {k: v for k, v in full.items() if k != "annotations"}
    out = mapper(sem_only)
    assert "instances" not in out and out["sem_seg"].shape == (H, W)
    inst_only = {k: v for k, v in full.items() if k != "sem_seg_file_name"}
    out = mapper(inst_only)
    assert "sem_seg" not in out and len(out["instances"]) == 3
    test_out = MultiTaskDatasetMapper(_cfg(), is_train=False)(full)
    assert set(test_out) >= {"image", "height", "width"} and not {
        "instances",
        "sem_seg",
        "annotations",
    } & set(test_out)


def test_crop_caps_single_class_share(tmp_path):
    label = np.zeros((20, 32), np.uint8)
    label[:, :16], label[:, 16:] = 1, 2
    label[0, :] = 255  # ignored pixels count for neither class
    write_label_map(label, str(tmp_path / "halves.png"))
    Image.fromarray(np.zeros((20, 32, 3), np.uint8)).save(str(tmp_path / "halves.jpg"))
    record = {
        "file_name": str(tmp_path / "halves.jpg"),
        "sem_seg_file_name": str(tmp_path / "halves.png"),
        "height": 20,
        "width": 32,
    }

    def max_shares(max_area):
        cfg = _cfg()  # the 20x16 crop keeps its size (short side 16)
        cfg.INPUT.CROP.ENABLED, cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = (
            True,
            "absolute",
            [20, 16],
        )
        cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = max_area
        mapper = MultiTaskDatasetMapper(cfg, is_train=True)
        np.random.seed(1)
        shares = []
        for _ in range(40):
            sem = mapper(record)["sem_seg"].numpy()
            counts = np.bincount(sem[sem != 255].ravel(), minlength=3)
            shares.append(counts.max() / counts.sum())
        return np.array(shares)

    assert (max_shares(0.9) < 0.9).all()
    assert (max_shares(1.0) >= 0.9).sum() >= 3  # without the cap, near-single-class crops happen

    # Records without a semantic map get a plain random crop (detectron2's constraint would fail).
    cfg = _cfg()
    cfg.INPUT.CROP.ENABLED, cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = True, "absolute", [8, 8]
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.5
    cfg.INPUT.MIN_SIZE_TRAIN = (8,)
    inst_only = {k: v for k, v in make_record(tmp_path).items() if k != "sem_seg_file_name"}
    out = MultiTaskDatasetMapper(cfg, is_train=True)(inst_only)
    assert out["image"].shape == (3, 8, 8) and "sem_seg" not in out
    boxes = out["instances"].gt_boxes.tensor
    assert ((boxes >= 0) & (boxes <= 8)).all()


def test_pad_to_crop_size_pads_label_with_ignore_and_masks_with_background(tmp_path):
    cfg = _cfg(CROP_PAD_TO_SIZE=True, MASK_FORMAT="bitmask")
    cfg.INPUT.CROP.ENABLED, cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = True, "absolute", [24, 40]
    out = MultiTaskDatasetMapper(cfg, is_train=True)(make_record(tmp_path))
    image, sem, inst = out["image"].numpy(), out["sem_seg"].numpy(), out["instances"]
    assert image.shape == (3, 24, 40) and inst.image_size == (24, 40)
    assert (image[:, H:, :] == 0).all() and (image[:, :, W:] == 0).all()
    assert (sem[H:, :] == 255).all() and (sem[:, W:] == 255).all()
    assert inst.gt_masks.tensor.shape == (3, 24, 40) and not inst.gt_masks.tensor[:, H:, :].any()
    for m, cls in zip(inst.gt_masks.tensor.numpy(), inst.gt_classes.tolist()):
        np.testing.assert_array_equal(m, sem == cls + 1)
    cfg.INPUT.CROP.TYPE = "relative"
    with pytest.raises(Seg2Error, match="INPUT.CROP.PAD_TO_SIZE needs INPUT.CROP.TYPE='absolute'"):
        MultiTaskDatasetMapper(cfg, is_train=True)


def test_label_values_checked_against_the_class_count(tmp_path):
    record = make_record(tmp_path)
    label = np.asarray(Image.open(record["sem_seg_file_name"])).copy()
    label[0, 0] = 7
    write_label_map(label, record["sem_seg_file_name"])
    # No dataset: the semantic head's class count (a larger value would break its loss).
    with pytest.raises(
        Seg2Error, match=r"r_label\.png: label map holds value\(s\) 7 in 1 pixel\(s\), .*0\.\.3"
    ):
        MultiTaskDatasetMapper(_cfg(), is_train=True)(record)
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 8
    assert MultiTaskDatasetMapper(cfg, is_train=True)(record)["sem_seg"].max() == 255

    # The datasets' stuff_classes are checked against NUM_CLASSES once, by the resolve step
    # (tests/test_class_counts.py); the mapper takes the plain number.
    # A model without a semantic output reads no label map (a broken one is not even opened).
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(record["sem_seg_file_name"])
    out = MultiTaskDatasetMapper(cfg, is_train=True)(record)
    assert "sem_seg" not in out and len(out["instances"]) == 3


def test_ignore_value_is_the_heads_and_must_match_the_datasets(tmp_path):
    # MODEL.SEM_SEG_HEAD.IGNORE_VALUE is the void value the mapper accepts and pads with.
    record = make_record(tmp_path)
    label = np.asarray(Image.open(record["sem_seg_file_name"])).copy()
    label[label == 255] = 254
    write_label_map(label, record["sem_seg_file_name"])
    cfg = _cfg(CROP_PAD_TO_SIZE=True)
    cfg.INPUT.CROP.ENABLED, cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = True, "absolute", [24, 40]
    with pytest.raises(Seg2Error, match=r"value\(s\) 254 .*nor the ignore label 255"):
        MultiTaskDatasetMapper(cfg, is_train=True)(record)
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 254
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.9
    mapper = MultiTaskDatasetMapper(cfg, is_train=True)
    crop = mapper.augmentations.augs[0]  # the crop constraint skips the same pixels
    assert isinstance(crop, CategoryAreaConstrainedCrop)
    assert (crop.single_category_max_area, crop.ignored_category) == (0.9, 254)
    sem = mapper(record)["sem_seg"].numpy()
    assert (sem[VOID] == 254).all() and (sem[H:, :] == 254).all() and (sem[:, W:] == 254).all()
    assert set(np.unique(sem)) == {0, 1, 2, 3, 254}

    # A dataset whose metadata ignore_label differs: the resolve step names it and the key.
    register_dataset(
        "t_mapper_ignore_zero",
        lambda: [],
        {"stuff_classes": ["a", "b", "c", "d"], "ignore_label": 0},
    )
    cfg.DATASETS.TRAIN = ("t_mapper_ignore_zero",)
    with pytest.raises(
        Seg2Error,
        match=r"'t_mapper_ignore_zero' has ignore_label=0 .*MODEL.SEM_SEG_HEAD.IGNORE_VALUE=254",
    ):
        seg2.resolve_config(cfg)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ("t_mapper_ignore_zero",)  # evaluated on: as wrong
    with pytest.raises(Seg2Error, match="t_mapper_ignore_zero"):
        seg2.resolve_config(cfg)


def test_label_map_of_wrong_size_or_colour(tmp_path):
    record = make_record(tmp_path)
    write_label_map(np.zeros((H, W + 1), np.uint8), record["sem_seg_file_name"])
    with pytest.raises(
        Seg2Error, match=r"r_label\.png: label map is 25x16 \(WxH\) but its image .*r\.png is 24x16"
    ):
        MultiTaskDatasetMapper(_cfg(), is_train=True)(record)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(record["sem_seg_file_name"])
    with pytest.raises(Seg2Error, match=r"r_label\.png: label map has PIL mode 'RGB'"):
        MultiTaskDatasetMapper(_cfg(), is_train=True)(record)


def _write_16bit_label(path, label):
    """A real 16-bit single-channel PNG (PIL mode 'I;16') holding ``label``."""
    im = Image.fromarray(np.asarray(label, dtype=np.uint16))
    assert im.mode == "I;16"
    im.save(path)
    with Image.open(path) as check:  # written as 16 bits, not narrowed
        assert check.mode in ("I;16", "I;16B", "I")
        assert np.asarray(check).max() == np.asarray(label).max()
    return str(path)


@pytest.mark.parametrize("num_classes, high", [(4, 3), (300, 299)])
def test_16bit_label_png_trains_through_resize_and_crop(tmp_path, num_classes, high):
    """16-bit index PNGs (listed as supported) go through a resize and a crop: detectron2 resizes
    a non-uint8 map with torch's interpolate, which has no int64 kernel. Values fitting in 8 bits
    are read as uint8; a map with more than 255 classes goes through as float32."""
    rec = make_record(tmp_path, sem=True)
    label = np.asarray(Image.open(rec["sem_seg_file_name"])).astype(np.int64)
    label[label == 3] = high  # class 'high' where the third object is
    rec["sem_seg_file_name"] = _write_16bit_label(tmp_path / "label16.png", label)
    # Nearest for the image too, so that its red channel still encodes each pixel's label.
    augs = [T.Resize((2 * H, 2 * W), interp=Image.NEAREST), T.RandomCrop("absolute", (H, W))]
    mapper = MultiTaskDatasetMapper(
        is_train=True, augmentations=augs, image_format="RGB", num_classes=num_classes
    )
    for _ in range(4):
        out = mapper(dict(rec, annotations=[]))
        sem = out["sem_seg"]
        assert sem.dtype == torch.long and tuple(sem.shape) == (H, W)
        # Nearest resize and crop keep labels: each pixel's label is what its red channel encodes.
        red = out["image"][0].numpy().astype(np.int64)
        expected = np.where(red == 200, 255, red // 20)
        expected[expected == 3] = high
        assert np.array_equal(sem.numpy(), expected)
        assert set(np.unique(sem.numpy())) <= {0, 1, 2, high, 255}
