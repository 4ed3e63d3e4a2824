"""
Export seg2's models to TorchScript and ONNX (``tools/export_model.py`` is the command line).

As detectron2's ``tools/deploy/export_model.py`` does, the model is traced through detectron2's
:class:`~detectron2.export.TracingAdapter`, which flattens the list-of-dicts input into one image
tensor and the outputs (``Instances``, dicts) into a tuple of tensors; its ``outputs_schema``
rebuilds the structured outputs from what the exported model returns.

* :class:`~seg2.modeling.Seg2SemanticSegmentor` (every head): the model's own inference, so the
  output is ``[{"sem_seg": (K, H, W) logits}]`` at the input's size.
* :class:`~seg2.modeling.Seg2MultiTaskRCNN`: ``inference(..., do_postprocess=False)`` as
  detectron2 exports ``GeneralizedRCNN``: ``[{"instances": Instances in the input's coordinates
  (RoI masks 28x28), "sem_seg": (K, H, W) logits cropped to the input}]``.
* Any other ``GeneralizedRCNN``: ``[{"instances"}]``; other models: their forward.

Formats: TorchScript by ``torch.jit.trace``, ONNX by the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``). The default ``dynamo=True`` exporter of torch 2.13
goes through ``torch.export``, which fails on detectron2's ``TracingAdapter`` for every seg2
model tried (FCN, U-Net, SegNet; Mask R-CNN was not tried), while the tracing exporter works on
the same adapter. ``torch.jit.script`` of seg2's models fails (detectron2's ``Conv2d`` with a
functional
activation, heads that index a ``ModuleDict`` by feature name); :func:`export_scripting` reports
that as an error naming the cause.

A traced model is specialised to the sample's size where the model computes with the size in
Python (a "valid"-padding U-Net's overlap-tile geometry, Mask R-CNN's anchors and box clipping):
export with an input of the size you deploy at. Its numerics: see docs/export.md.
"""

import logging
import os
import warnings
from typing import Any, Callable, List, Optional, Sequence

import torch
from detectron2.export import TracingAdapter
from detectron2.modeling import GeneralizedRCNN

from .checkpoint import Seg2Checkpointer
from .modeling import Seg2MultiTaskRCNN
from .utils import Seg2Error

__all__ = [
    "FORMATS",
    "load_weights_for_export",
    "ONNX_OPSET",
    "traceable_inference",
    "tracing_adapter",
    "export_tracing",
    "export_scripting",
    "load_exported",
    "structured",
    "compare_with_eager",
]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
# torchvision's RoIAlign exports (aligned=True) from opset 16; 17 is the newest that the
# TorchScript-based exporter supports fully.
ONNX_OPSET = 17


def load_weights_for_export(
    model: torch.nn.Module, weights: str, allow_random: bool = False
) -> None:
    """
    Load ``weights`` (``MODEL.WEIGHTS``) into ``model`` strictly: every parameter must come from
    the file (:class:`~seg2.checkpoint.Seg2Checkpointer`), else a one-line :class:`Seg2Error`.
    An empty ``weights`` would export the random initialisation: refused unless ``allow_random``
    (``tools/export_model.py --allow-random-weights``, e.g. to try the export of an architecture).
    """
    if not weights:
        if not allow_random:
            raise Seg2Error(
                "MODEL.WEIGHTS is empty: the export would hold a randomly initialised model. Set "
                "MODEL.WEIGHTS "
                "to a trained checkpoint, or pass --allow-random-weights to export the "
                "initialisation on purpose"
            )
        logger.warning(
            "MODEL.WEIGHTS is empty: exporting a randomly initialised model "
            "(--allow-random-weights)"
        )
        return
    Seg2Checkpointer(model, strict=True).load(weights, checkpointables=[])


def traceable_inference(model: torch.nn.Module) -> Optional[Callable]:
    """
    The ``inference_func(model, inputs)`` that :class:`TracingAdapter` traces for ``model``:
    detection models without post-processing (as detectron2's export tool), the multi-task
    model with its semantic logits cropped to the input; None (the forward) for the others.
    """
    if isinstance(model, Seg2MultiTaskRCNN):

        def inference(model, inputs):
            instances, sem_seg = model.inference(inputs, do_postprocess=False)
            h, w = inputs[0]["image"].shape[-2:]
            return [{"instances": instances[0], "sem_seg": sem_seg[0, :, :h, :w]}]

        return inference
    if isinstance(model, GeneralizedRCNN):

        def inference(model, inputs):
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

        return inference
    return None


def tracing_adapter(model: torch.nn.Module, image: torch.Tensor) -> TracingAdapter:
    """detectron2's :class:`TracingAdapter` of ``model`` (in eval mode) for one (C, H, W) image."""
    model.eval()
    # eval() on the adapter too: torch.onnx.export restores the adapter's mode afterwards, and a
    # new module is in training mode, which would put the model back into training.
    return TracingAdapter(model, [{"image": image}], traceable_inference(model)).eval()


def export_tracing(model: torch.nn.Module, image: torch.Tensor, fmt: str, output_dir: str):
    """
    Trace ``model`` on ``image`` and save it to ``output_dir/model.ts`` (TorchScript) or
    ``output_dir/model.onnx`` (ONNX, input "image", outputs "output0", ...).

    Returns:
        (path, adapter): the file written, and the :class:`TracingAdapter` whose
        ``outputs_schema(outputs)`` turns the exported model's outputs back into seg2's.
    """
    if fmt not in FORMATS:
        raise Seg2Error(f"export format {fmt!r}: choose one of {FORMATS}")
    os.makedirs(output_dir, exist_ok=True)
    adapter = tracing_adapter(model, image)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python number it freezes (sizes, loops): expected here.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # One eager run first: it counts the outputs and fills the caches the model computes in
        # Python (a "valid" U-Net's tile geometry), so that the trace records no search.
        outputs = adapter(image)
        if fmt == "torchscript":
            path = os.path.join(output_dir, "model.ts")
            torch.jit.save(torch.jit.trace(adapter, (image,), check_trace=False), path)
        else:
            path = os.path.join(output_dir, "model.onnx")
            torch.onnx.export(
                adapter,
                (image,),
                path,
                opset_version=ONNX_OPSET,
                dynamo=False,
                input_names=["image"],
                output_names=[f"output{i}" for i in range(len(outputs))],
            )
    logger.info(
        "Exported %s to %s; outputs schema: %s", type(model).__name__, path, adapter.outputs_schema
    )
    return path, adapter


def export_scripting(model: torch.nn.Module, output_dir: str) -> str:
    """
    ``torch.jit.script`` of the model, saved to ``output_dir/model.ts``; a :class:`Seg2Error`
    naming torch's reason where the model cannot be scripted (seg2's models today).
    """
    model.eval()
    try:
        scripted = torch.jit.script(model)
    except Exception as e:  # torch raises RuntimeError / NotSupportedError / frontend errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Seg2Error(
            f"torch.jit.script cannot compile {type(model).__name__} ({type(e).__name__}: "
            f"{first[:200]}); "
            "export it with --export-method tracing instead"
        ) from e
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model.ts")
    torch.jit.save(scripted, path)
    return path


def load_exported(path: str, threads: int = 0) -> Callable[[torch.Tensor], List[torch.Tensor]]:
    """
    A callable ``image (C, H, W) float tensor -> list of output tensors`` running an exported
    ``model.ts`` (TorchScript) or ``model.onnx`` (onnxruntime on the CPU); the outputs go
    through the adapter's ``outputs_schema`` to get seg2's structured outputs back.
    ``threads``: onnxruntime's intra-op threads (0: its default, one per core).
    """
    if path.endswith(".onnx"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(image: torch.Tensor) -> List[torch.Tensor]:
            return [
                torch.from_numpy(o) for o in session.run(None, {name: image.detach().cpu().numpy()})
            ]

        return run_onnx
    module = torch.jit.load(path, map_location="cpu")

    def run_ts(image: torch.Tensor) -> List[torch.Tensor]:
        with torch.no_grad():
            out = module(image)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return run_ts


def structured(adapter: TracingAdapter, outputs: Sequence[torch.Tensor]) -> Any:
    """The exported model's flat outputs as the model's own (``adapter.outputs_schema``)."""
    return adapter.outputs_schema(tuple(outputs))


def _eager(model: torch.nn.Module, adapter: TracingAdapter, image: torch.Tensor):
    with torch.no_grad():
        return adapter.outputs_schema(adapter(image))


def compare_with_eager(
    model: torch.nn.Module, adapter: TracingAdapter, run: Callable, image: torch.Tensor
) -> dict:
    """
    The exported model (``run``, from :func:`load_exported`) against the eager one on ``image``:
    ``{"sem_seg_max_abs", "sem_seg_argmax_equal", "instances", "instances_eager",
    "boxes_max_abs", "scores_max_abs"}`` (the keys its outputs have).
    """
    ref = _eager(model, adapter, image)[0]
    got = structured(adapter, run(image))[0]
    report = {}
    if "sem_seg" in ref:
        report["sem_seg_max_abs"] = (got["sem_seg"] - ref["sem_seg"]).abs().max().item()
        report["sem_seg_argmax_equal"] = bool(
            torch.equal(got["sem_seg"].argmax(0), ref["sem_seg"].argmax(0))
        )
    if "instances" in ref:
        a, b = got["instances"], ref["instances"]
        report["instances"], report["instances_eager"] = len(a), len(b)
        if len(a) == len(b) and len(a):
            report["boxes_max_abs"] = (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max().item()
            report["scores_max_abs"] = (a.scores - b.scores).abs().max().item()
    return report
