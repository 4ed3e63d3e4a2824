"""tools/demo.py on seg2_shapes images with randomly initialised weights (nothing downloaded)."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from PIL import Image
from pycocotools import mask as mask_util

from seg2 import Seg2Error
from seg2.data import read_label_map
from seg2.data.voc_palette import VOC_PALETTE
from seg2.inference import Seg2Predictor, read_image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_demo():
    spec = importlib.util.spec_from_file_location(
        "seg2_tools_demo", os.path.join(REPO_ROOT, "tools", "demo.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


def _weights(args, path, seed):
    """Randomly initialised weights of the model the demo will build, saved to ``path``.pth."""
    cfg = demo.setup_cfg(args)
    torch.manual_seed(seed)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(os.path.basename(path))
    return path + ".pth"


def _inputs(tiny_shapes_root, folder, n=2):
    os.makedirs(folder)
    val = os.path.join(tiny_shapes_root, "coco", "val")
    names = sorted(os.listdir(val))[:n]
    for name in names:
        shutil.copy(os.path.join(val, name), folder)
    return [os.path.join(folder, n) for n in names]


SEMANTIC_OPTS = [
    "MODEL.UNET_ENCODER.CHANNELS",
    "[8, 8, 16]",
    "MODEL.SEM_SEG_HEAD.IN_FEATURES",
    '["enc1", "enc2", "enc3"]',
    "INPUT.MIN_SIZE_TEST",
    "0",
    "TEST.TILING.ENABLED",
    "True",
    "TEST.TILING.TILE_SIZE",
    "32",
    "TEST.TILING.STRIDE",
    "24",
]


def test_demo_semantic_overlay_palette_and_bad_files(tiny_shapes_root, tmp_path, capsys):
    folder = str(tmp_path / "in")
    good = _inputs(tiny_shapes_root, folder)
    # bad and odd inputs: a truncated JPEG, a text file named .png, a 16-bit grayscale PNG smaller
    # than a tile
    with open(good[0], "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 3])
    with open(os.path.join(folder, "notes.png"), "w") as f:
        f.write("not an image")
    with open(
        os.path.join(folder, "readme.txt"), "w"
    ) as f:  # no image extension: skipped, and said so
        f.write("about these images")
    gray16 = (np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 137).astype(np.uint16)
    Image.fromarray(gray16).save(os.path.join(folder, "gray16.png"))

    out = str(tmp_path / "out")
    config = os.path.join(REPO_ROOT, "configs", "quickstart", "unet_tiny_shapes_cpu.yaml")
    argv = ["--config-file", config, "--input", folder, "--output", out]
    args = demo.get_parser().parse_args(argv + SEMANTIC_OPTS)
    weights = _weights(args, str(tmp_path / "model"), seed=9)  # predicts ~65% background
    status = demo.main(argv + SEMANTIC_OPTS + ["MODEL.WEIGHTS", weights])
    printed = capsys.readouterr().out

    assert status == 1  # two files failed ...
    assert "3 image(s) written" in printed and "2 failed" in printed
    assert (
        "truncated.jpg: cannot read the image" in printed
        and "notes.png: cannot read the image" in printed
    )
    assert (
        "demo: 1 file(s) in the input folders skipped, not image file names:\n  "
        f"{folder}/readme.txt\n" in printed
    )
    stems = ["gray16"] + [os.path.splitext(os.path.basename(p))[0] for p in good]
    assert sorted(os.listdir(out)) == sorted(
        f"{s}_{k}.png" for s in stems for k in ("sem_seg", "overlay_semantic")
    )

    # ... the others are written: the raw map is the predictor's, the overlay differs from the
    # input exactly where the predicted class is not background (class 0)
    args = demo.get_parser().parse_args(argv + SEMANTIC_OPTS + ["MODEL.WEIGHTS", weights])
    predictor = Seg2Predictor(demo.setup_cfg(args))
    for path in good + [os.path.join(folder, "gray16.png")]:
        stem = os.path.splitext(os.path.basename(path))[0]
        bgr = read_image(path, "BGR")
        expected = predictor(bgr, sem_seg_output="labels")["sem_seg_labels"].numpy()
        labels = read_label_map(os.path.join(out, f"{stem}_sem_seg.png"), expect_palette=True)
        assert np.array_equal(labels, expected), stem
        with Image.open(os.path.join(out, f"{stem}_sem_seg.png")) as im:
            assert im.getpalette()[:12] == VOC_PALETTE[:12]  # seg2_shapes' stuff_colors
        overlay = np.asarray(
            Image.open(os.path.join(out, f"{stem}_overlay_semantic.png")).convert("RGB")
        )
        h, w = labels.shape
        assert overlay.shape[0] >= h and overlay.shape[1] > w  # legend on the right
        rgb = bgr[:, :, ::-1].astype(int)
        changed = (overlay[:h, :w].astype(int) != rgb).any(axis=2)
        fg = labels != 0
        colour = np.asarray(VOC_PALETTE[:12]).reshape(4, 3)[labels]
        distinct = (np.abs(colour - rgb) > 2).any(
            axis=2
        )  # else blending may round back to the pixel
        assert not (changed & ~fg).any(), stem
        assert np.array_equal(changed & distinct, fg & distinct), stem
        if stem != "gray16":
            assert fg.any() and (~fg).any(), (
                "random weights should predict both background and shapes"
            )


def test_demo_instances_json_and_overlay(tiny_shapes_root, tmp_path, capsys):
    good = _inputs(tiny_shapes_root, str(tmp_path / "in"), n=1)
    out = str(tmp_path / "out")
    config = os.path.join(
        REPO_ROOT, "configs", "quickstart", "mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml"
    )
    glob_arg = os.path.join(str(tmp_path / "in"), "*.jpg")
    argv = [
        "--config-file",
        config,
        "--input",
        glob_arg,
        str(tmp_path / "missing.png"),
        "--output",
        out,
        "--confidence-threshold",
        "0.0",
    ]
    opts = [
        "INPUT.MIN_SIZE_TEST",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "64",
        "TEST.DETECTIONS_PER_IMAGE",
        "5",
    ]
    weights = _weights(demo.get_parser().parse_args(argv + opts), str(tmp_path / "model"), seed=0)
    status = demo.main(argv + opts + ["MODEL.WEIGHTS", weights])
    printed = capsys.readouterr().out
    assert status == 1 and "missing.png: cannot read the image (no such file)" in printed

    stem = os.path.splitext(os.path.basename(good[0]))[0]
    for suffix in ("overlay_instances", "overlay_semantic", "sem_seg"):
        assert os.path.isfile(os.path.join(out, f"{stem}_{suffix}.png"))
    with open(os.path.join(out, "instances_coco.json")) as f:
        coco = json.load(f)
    assert [im["file_name"] for im in coco["images"]] == good
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle"]
    anns = coco["annotations"]
    assert 1 <= len(anns) <= 5 and all(
        a["category_id"] in (1, 2, 3) and 0 <= a["score"] <= 1 for a in anns
    )
    rgb = read_image(good[0], "RGB").astype(int)
    overlay = np.asarray(
        Image.open(os.path.join(out, f"{stem}_overlay_instances.png")).convert("RGB")
    ).astype(int)
    assert overlay.shape == rgb.shape
    union = np.zeros(rgb.shape[:2], bool)
    for a in anns:
        m = mask_util.decode(a["segmentation"]).astype(bool)
        assert m.shape == rgb.shape[:2] and abs(m.sum() - a["area"]) < 1e-6
        union |= m
    changed = (overlay != rgb).any(axis=2)
    if union.any():
        assert changed[union].mean() > 0.9  # masks are drawn where the objects are
    assert changed.any()


def test_read_image_bad_and_odd_files(tmp_path):
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 2], rgba[..., 3] = 10, 200, 7
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    bgr = read_image(str(tmp_path / "rgba.png"), "BGR")
    assert bgr.shape == (5, 6, 3) and (bgr[..., 0] == 200).all() and (bgr[..., 2] == 10).all()
    Image.fromarray(np.full((3, 4), 65535, np.uint16)).save(tmp_path / "white16.png")
    assert (read_image(str(tmp_path / "white16.png")) == 255).all()
    ramp = np.array([[1000, 1100, 1200]], np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert read_image(str(tmp_path / "ramp16.png"), uint16="minmax")[0, :, 0].tolist() == [
        0,
        128,
        255,
    ]
    Image.fromarray(np.full((3, 3), 2.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(
        Seg2Error, match=r"float.tif: floating-point image with values in \[2.5, 2.5\]"
    ):
        read_image(str(tmp_path / "float.tif"))
    with pytest.raises(Seg2Error, match=r"nothing.jpg: cannot read the image \(no such file\)"):
        read_image(str(tmp_path / "nothing.jpg"))


def test_demo_setup_error_is_one_line_and_status_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(
            [
                "--config-file",
                str(tmp_path / "missing.yaml"),
                "--input",
                str(tmp_path),
                "--output",
                str(tmp_path / "o"),
            ]
        )
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    assert (
        err.startswith("seg2: error: bad config (")
        and "missing.yaml" in err
        and len(err.splitlines()) == 1
    )
