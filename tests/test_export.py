"""Export to TorchScript (tracing) and ONNX (run by onnxruntime): the exported models give the
eager model's outputs on tiny inputs, for every semantic head and the multi-task model."""

import os
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances
from torch.nn import functional as F

from seg2.export import export_scripting, export_tracing, load_exported, structured
from seg2.modeling.upsample import max_unpool
from seg2.utils import Seg2Error

from seg2_model_helpers import REPO_ROOT, base_cfg, one_thread, tiny_semantic_cfg  # noqa: F401  (fixture)

pytest.importorskip("onnxruntime")

# Max abs difference of logits (and scores, masks), exported vs eager, float32, relative to the
# largest eager logit where that is above 1. Measured: TorchScript 0 (same kernels); onnxruntime
# up to 4.5e-5 (SegNet-Basic), 1.3e-6 (U-Net), 5e-5 px on boxes: other kernels, other summation
# order. Argmax maps must be equal.
LOGITS_ATOL = 1e-4
BOX_ATOL = 1e-2  # pixels (measured up to 9e-4 px on 128x128 inputs)


def _close(a, b, atol=LOGITS_ATOL):
    return (a - b).abs().max().item() <= atol * max(1.0, b.abs().max().item())


SEMANTIC = [
    ("FCNHead", "vgg"),
    ("UNetHead", "unet_same"),
    ("UNetHead", "unet_valid"),
    ("SegNetHead", "vgg"),
    ("SegNetHead", "segnet_basic"),
    ("Seg2DeepLabV3PlusHead", "deeplab_resnet"),
]


def _semantic_cfg(head, backbone):
    if backbone == "segnet_basic":  # SegNet-Basic (CamVid config), narrow
        cfg = base_cfg(os.path.join("camvid", "segnet-basic_10k_camvid.yaml"))
        cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = ""
        cfg.MODEL.SEGNET_BASIC.CHANNELS = 8
        return cfg
    return tiny_semantic_cfg(head, backbone)


def _image(size=(3, 45, 51), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, size, generator=g).float()


def test_max_unpool_equals_torch_max_unpool2d_and_traces():
    g = torch.Generator().manual_seed(0)
    for h, w, ceil in ((8, 8, False), (7, 9, False), (45, 23, True), (1, 5, True)):
        x = torch.randn(2, 3, h, w, generator=g)
        pooled, indices = F.max_pool2d(x, 2, 2, ceil_mode=ceil, return_indices=True)
        ref = F.max_unpool2d(pooled, indices, 2, 2, output_size=(h, w))
        assert torch.equal(max_unpool(pooled, indices, (h, w)), ref)
    traced = torch.jit.trace(lambda p, i, x: max_unpool(p, i, x.shape[-2:]), (pooled, indices, x))
    assert torch.equal(traced(pooled, indices, x), ref)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("head,backbone", SEMANTIC)
def test_semantic_export_matches_eager(tmp_path, head, backbone, fmt):
    torch.manual_seed(0)
    cfg = _semantic_cfg(head, backbone)
    model = build_model(cfg).eval()
    image = _image()
    path, adapter = export_tracing(model, image, fmt, str(tmp_path))
    with torch.no_grad():
        eager = model([{"image": image}])[0]["sem_seg"]
    out = structured(adapter, load_exported(path)(image))[0]["sem_seg"]
    assert out.shape == eager.shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 45, 51)
    assert _close(out, eager)
    assert torch.equal(out.argmax(0), eager.argmax(0))


def _multitask_cfg():
    cfg = base_cfg("quickstart/mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml")
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    return cfg


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_multitask_export_matches_eager(tmp_path, fmt):
    torch.manual_seed(0)
    model = build_model(_multitask_cfg()).eval()
    image = _image((3, 64, 64))
    path, adapter = export_tracing(model, image, fmt, str(tmp_path))
    with torch.no_grad():
        instances, sem_seg = model.inference([{"image": image}], do_postprocess=False)
    ref, ref_sem = instances[0], sem_seg[0, :, :64, :64]
    out = structured(adapter, load_exported(path)(image))[0]
    got = out["instances"]
    assert isinstance(got, Instances) and len(ref) > 0
    assert len(got) == len(ref)
    assert (got.pred_boxes.tensor - ref.pred_boxes.tensor).abs().max().item() <= BOX_ATOL
    assert torch.equal(got.pred_classes, ref.pred_classes)
    assert _close(got.scores, ref.scores)
    assert _close(got.pred_masks, ref.pred_masks)
    assert out["sem_seg"].shape == ref_sem.shape
    assert _close(out["sem_seg"], ref_sem)
    assert torch.equal(out["sem_seg"].argmax(0), ref_sem.argmax(0))


def test_segnet_flops_are_counted():
    """fvcore's FLOP count traces the model; SegNet's unpooling no longer breaks the trace."""
    from fvcore.nn import FlopCountAnalysis

    model = build_model(_semantic_cfg("SegNetHead", "vgg")).eval()
    flops = FlopCountAnalysis(model, ([{"image": _image((3, 32, 32))}],))
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    # At least the encoder's first conv: 32 * 32 pixels * 8 channels * 3 * 3 * 3 MACs.
    assert flops.total() > 32 * 32 * 8 * 27


def test_scripting_is_a_clear_error(tmp_path):
    model = build_model(_semantic_cfg("FCNHead", "vgg"))
    with pytest.raises(
        Seg2Error, match="torch.jit.script cannot compile Seg2SemanticSegmentor.*tracing"
    ):
        export_scripting(model, str(tmp_path))


def test_export_tool_writes_a_model_that_runs(tmp_path):
    import cv2

    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    try:
        import export_model
    finally:
        sys.path.pop(0)
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "in.png"), image)
    out_dir = tmp_path / "out"
    export_model.main(
        [
            "--config-file",
            os.path.join(REPO_ROOT, "configs/quickstart/unet_tiny_shapes_cpu.yaml"),
            "--format",
            "onnx",
            "--sample-image",
            str(tmp_path / "in.png"),
            "--output",
            str(out_dir),
            "--allow-random-weights",
            "MODEL.WEIGHTS",
            "",
            "INPUT.MIN_SIZE_TEST",
            "0",
        ]
    )
    import onnxruntime as ort

    session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": image.transpose(2, 0, 1).astype(np.float32)})
    assert logits.shape == (4, 40, 48)
