"""Issue 22: each decision made in one place. The same pixels in training, evaluation and the
predictor for every kind of image file; tiling is the model's inference mode (Trainer.test, the
predictor and TTA agree; bad geometry is refused when the model is built); the resolve step
checks the config against the data once, before anything is built."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

import seg2
from seg2 import Seg2Error
from seg2.data import MultiTaskDatasetMapper, read_image
from seg2.inference import Seg2Predictor
from seg2.utils import UnreadableFileError

from seg2_model_helpers import tiny_semantic_cfg


def _rgb(h=20, w=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_kinds(d):
    """One file of every kind of image seg2 reads, and what its (RGB) pixels must be."""
    rgb = _rgb()
    kinds = {}
    Image.fromarray(rgb).save(d / "rgb.png")
    kinds["rgb.png"] = rgb
    grey = rgb[:, :, 0]
    Image.fromarray(grey).save(d / "grey.png")
    kinds["grey.png"] = np.repeat(grey[:, :, None], 3, 2)
    pal = Image.fromarray(grey).convert("P")
    pal.save(d / "palette.png")
    kinds["palette.png"] = np.asarray(pal.convert("RGB"))
    rgba = np.dstack(
        [rgb, np.full(rgb.shape[:2], 7, np.uint8)]
    )  # nearly transparent: alpha dropped
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    kinds["rgba.png"] = rgb
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(d / "cmyk.tif")
    kinds["cmyk.tif"] = np.asarray(cmyk.convert("RGB"))
    g16 = (np.arange(20 * 28, dtype=np.uint32).reshape(20, 28) * 100 + 1000).astype(np.uint16)
    Image.fromarray(g16).save(d / "grey16.png")  # PIL mode I;16
    g8 = ((g16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # 0..65535 -> 0..255
    kinds["grey16.png"] = np.repeat(g8[:, :, None], 3, 2)
    f = rgb[:, :, 1].astype(np.float32) / 255.0
    Image.fromarray(f, "F").save(d / "float.tif")
    kinds["float.tif"] = np.repeat(
        np.floor(f.astype(np.float64) * 255 + 0.5).astype(np.uint8)[:, :, None], 3, 2
    )
    # EXIF orientation 6 (rotate 90 degrees clockwise to show): read as shown, 28 x 20.
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(d / "exif6.png", exif=exif)
    kinds["exif6.png"] = np.rot90(rgb, k=-1)
    return kinds


def test_every_kind_of_image_gives_the_same_pixels_to_training_and_the_predictor(tmp_path):
    kinds = _write_kinds(tmp_path)
    cfg = tiny_semantic_cfg("FCNHead", "resnet")
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 24, 64
    mapper = MultiTaskDatasetMapper(cfg, False)
    predictor = Seg2Predictor(cfg)
    for name, expected_rgb in kinds.items():
        path = str(tmp_path / name)
        # What the file is, by hand: 8-bit RGB pixels (16-bit scaled, float x 255, EXIF applied).
        np.testing.assert_array_equal(read_image(path, "RGB"), expected_rgb, err_msg=name)
        h, w = expected_rgb.shape[:2]
        # Training and evaluation: the dataset mapper. The predictor: the demo's read_image, then
        # the predictor's own preprocessing. The model sees the same array.
        mapped = mapper({"file_name": path, "height": h, "width": w, "image_id": 0})["image"]
        predicted = predictor.preprocess(read_image(path, "BGR"))["image"]
        assert torch.equal(mapped, predicted), name
        assert mapped.shape[-2:] != (h, w) or min(h, w) == 24  # resized by MIN_SIZE_TEST
    # A 16-bit image is not saturated (detectron2's reader made it all white): 1000 -> 4.
    grey16 = read_image(str(tmp_path / "grey16.png"), "RGB")
    assert grey16[0, 0, 0] == (1000 * 255 + 32767) // 65535 == 4 and grey16.max() < 255


def test_float_image_outside_0_1_is_named(tmp_path):
    Image.fromarray(np.full((4, 4), 300.0, np.float32), "F").save(tmp_path / "hdr.tif")
    with pytest.raises(
        Seg2Error, match=r"hdr\.tif: floating-point image with values in \[300, 300\]"
    ):
        read_image(str(tmp_path / "hdr.tif"))


def _tiled_cfg(tile=32, stride=16):
    cfg = tiny_semantic_cfg("UNetHead", "unet_same")  # (FCN's score layers start at 0)
    cfg.TEST.TILING.ENABLED, cfg.TEST.TILING.TILE_SIZE, cfg.TEST.TILING.STRIDE = True, tile, stride
    cfg.TEST.TILING.BLEND = "linear"
    cfg.INPUT.MIN_SIZE_TEST = 0  # native resolution
    return cfg


def test_tiling_is_the_models_inference_mode():
    """Trainer.test runs the model's forward; the predictor and TTA call it too: one answer."""
    torch.manual_seed(0)
    cfg = _tiled_cfg()
    model = build_model(cfg).eval()
    assert model.tiler is not None and (model.tiler.tile_size, model.tiler.stride) == (32, 16)
    image = torch.randint(
        0, 256, (3, 48, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        forward = model([{"image": image}])[0][
            "sem_seg"
        ]  # what Trainer.test / inference_on_dataset get
        tiled = model.tiler(image)
        whole = model.sem_seg_logits(image[None])[0]
    assert torch.equal(forward, tiled)
    assert not torch.allclose(
        forward, whole
    )  # really tiled: tile borders differ from the whole image
    predictor = Seg2Predictor(cfg)
    predictor.model.load_state_dict(model.state_dict())
    assert cfg.INPUT.FORMAT == "BGR"
    bgr = image.permute(1, 2, 0).numpy()  # the predictor takes BGR arrays, as the model
    torch.testing.assert_close(predictor(np.ascontiguousarray(bgr))["sem_seg"], forward)
    labels = predictor(np.ascontiguousarray(bgr), sem_seg_output="labels")["sem_seg_labels"]
    assert torch.equal(labels.long(), forward.argmax(0))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("STRIDE", 40, "TEST.TILING.STRIDE=40: expected in 1 .. tile size (32)"),
        ("TILE_SIZE", 0, "TEST.TILING.TILE_SIZE=0: expected >= 1"),
        ("BLEND", "cosine", "TEST.TILING.BLEND='cosine'"),
        ("BATCH_SIZE", 0, "TEST.TILING.BATCH_SIZE=0"),
        ("MARGIN", -1, "TEST.TILING.MARGIN=-1"),
    ],
)
def test_bad_tile_geometry_is_refused_when_the_model_is_built(key, value, message):
    cfg = _tiled_cfg()
    cfg.TEST.TILING[key] = value
    with pytest.raises(Seg2Error) as e:
        build_model(cfg)
    assert str(e.value).startswith(message)
    cfg.TEST.TILING.ENABLED = False  # whole-image inference: the tile keys are not used
    build_model(cfg)


def test_resolve_step_leaves_plain_values_and_is_idempotent():
    cfg = tiny_semantic_cfg("FCNHead", "resnet")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("seg2_shapes_train",), ("seg2_shapes_val",)
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHT = [1.0, 2.0, 2.0, 2.0]
    cfg.freeze()
    resolved = seg2.resolve_config(cfg)
    assert resolved.is_frozen() and resolved == cfg  # nothing to resolve: unchanged
    assert seg2.resolve_config(resolved) == resolved
    bad = cfg.clone()
    bad.defrost()
    bad.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 0
    with pytest.raises(
        Seg2Error, match="dataset 'seg2_shapes_train' has ignore_label=255 .*IGNORE_VALUE=0"
    ):
        seg2.resolve_config(bad)
    bad.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    bad.DATASETS.TEST = ("seg2_shapes_vall",)
    with pytest.raises(
        Seg2Error, match="DATASETS.TEST names 'seg2_shapes_vall'.*Did you mean 'seg2_shapes_val'"
    ):
        seg2.resolve_config(bad)


def test_image_beyond_the_pixel_limit_is_named(tmp_path):
    """PIL's decompression-bomb guard: one line naming the file and how to raise the limit (an
    UnreadableFileError, so training counts and skips such a file and evaluation stops)."""
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "big.png")
    with pytest.raises(
        UnreadableFileError, match=r"big\.png: cannot read the image \(.*max_pixels"
    ):
        read_image(str(tmp_path / "big.png"), max_pixels=100)  # 400 pixels > 2 x 100
    assert read_image(str(tmp_path / "big.png"), max_pixels=0).shape == (20, 20, 3)  # 0: no limit
