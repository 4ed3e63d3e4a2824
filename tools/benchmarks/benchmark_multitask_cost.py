#!/usr/bin/env python3
"""
The cost of a semantic head next to Mask R-CNN, side by side in one run on the same data:
detectron2's Mask R-CNN R50-FPN alone (the reference), detectron2's PanopticFPN R50-FPN, and
seg2's Seg2MultiTaskRCNN R50-FPN with each semantic head (FCN-8s, U-Net, DeepLabV3+ as shipped in
configs/multitask/, and SegNet's decoder on the FPN features; see SEGNET_FPN). For each model:
training step (forward, backward, SGD step) and inference (eval forward with post-processing),
in float32 and under autocast (float16, bfloat16), as ratios to Mask R-CNN; fvcore FLOPs of one
inference per module (backbone, RPN, RoI heads, semantic head) and each step's peak memory beside.

    # COCO size on a GPU
    python3 tools/benchmarks/benchmark_multitask_cost.py --device cuda --size 800 1216 --batch 4 \\
        --warmup 5 --iters 20 --json output/multitask_cost.json
    # small sizes on the CPU (bfloat16 only pays off with AVX512-BF16 / AMX)
    OMP_NUM_THREADS=2 python3 tools/benchmarks/benchmark_multitask_cost.py --device cpu \\
        --size 256 384 --batch 2 --precisions fp32 bf16 --warmup 1 --iters 3

Trailing KEY VALUE pairs apply to every model (e.g. a smaller backbone for a quick check). The
models are randomly initialised (nothing is downloaded) and share the detection part's weights
(copied from the Mask R-CNN), so that their RPN and RoI heads do the same work on the same batch;
``ROI_HEADS.SCORE_THRESH_TEST`` is 0 so that every model keeps its 100 detections per image at
inference (the mask head's work of a trained model at its worst), and the learning rate is 0 (the
weights stay as they are). The batch is synthetic: random images with 8 objects each (boxes, bit
masks, classes) and a semantic map painted from them (values valid for every semantic head). All
models stay built and take turns call by call (timing.time_round_robin), so that load from other
jobs hits all of them alike; the median over ``--iters`` rounds is reported. Peak memory: the
step's peak above what was resident before it (CUDA allocator on a GPU, RSS on the CPU).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import torch
from benchmark_heads import C, make_cfg
from detectron2 import model_zoo
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.events import EventStorage
from timing import PeakMemory, inference_step, time_round_robin, train_step

REFERENCE = "mask_rcnn"
# SegNet's decoder on FPN features: ResNet has no pooling indices, so the decoder up-samples
# bilinearly (the SegNet paper's "bilinear" decoder variant), mirroring p5 -> p4 -> p3 -> p2 with
# two 3x3 convs per stage (256 channels, GN as the other heads of configs/multitask/).
SEGNET_FPN = [
    "MODEL.SEM_SEG_HEAD.NAME",
    "SegNetHead",
    "MODEL.SEM_SEG_HEAD.IN_FEATURES",
    "['p2','p3','p4','p5']",
    "MODEL.SEGNET_HEAD.UPSAMPLE",
    "bilinear",
    "MODEL.SEGNET_HEAD.NUM_CONVS",
    "[2,2,2]",
    "MODEL.SEGNET_HEAD.NORM",
    "GN",
]
# key -> (name in the table, config file, overrides)
_D2 = (
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml",
)
MODELS = {
    REFERENCE: ("Mask R-CNN (d2)", model_zoo.get_config_file(_D2[0]), []),
    "panoptic_fpn": ("PanopticFPN (d2)", model_zoo.get_config_file(_D2[1]), []),
    "fcn8s": ("seg2 + FCN-8s", "multitask/mask_rcnn_R50_FPN_fcn8s_1x_coco.yaml", []),
    "unet": ("seg2 + U-Net", "multitask/mask_rcnn_R50_FPN_unet_1x_coco.yaml", []),
    "deeplabv3plus": (
        "seg2 + DeepLabV3+",
        "multitask/mask_rcnn_R50_FPN_deeplabv3plus_1x_coco.yaml",
        [],
    ),
    "segnet": (
        "seg2 + SegNet (bilinear)",
        "multitask/mask_rcnn_R50_FPN_fcn8s_1x_coco.yaml",
        SEGNET_FPN,
    ),
}
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
MODULES = ("backbone", "proposal_generator", "roi_heads", "sem_seg_head")
OBJECTS = 8  # per image
SEM_CLASSES = (
    54  # semantic labels drawn below this: valid for PanopticFPN's 54 and seg2's 81 classes
)


def build_models(args):
    """The models, in MODELS' order, on ``args.device``; the detection part's weights copied from
    the reference into every other model."""
    models = {}
    for name, (_, config, overrides) in MODELS.items():
        if args.models and name not in args.models and name != REFERENCE:
            continue
        cfg = make_cfg(config, overrides + list(args.opts), args.device)
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
        cfg.freeze()
        torch.manual_seed(0)
        model = build_model(cfg)
        if models:
            missing, unexpected = model.load_state_dict(
                models[REFERENCE].state_dict(), strict=False
            )
            if unexpected or any(not k.startswith("sem_seg_head.") for k in missing):
                raise RuntimeError(
                    f"{name}: the detection part differs from {REFERENCE}'s: "
                    f"{unexpected or missing}"
                )
        models[name] = model
    return models


def synthetic_batch(size, batch, num_classes, device, seed=0):
    """``batch`` training inputs of ``size`` (H, W): a random image, OBJECTS instances (boxes, bit
    masks of ellipses, classes below ``num_classes``) and the semantic map painted from them."""
    h, w = size
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        centre = torch.rand(OBJECTS, 2, generator=gen) * torch.tensor([h, w])
        radii = (0.05 + 0.2 * torch.rand(OBJECTS, 2, generator=gen)) * torch.tensor([h, w])
        masks = ((ys[None] - centre[:, 0, None, None]) / radii[:, 0, None, None]) ** 2 + (
            (xs[None] - centre[:, 1, None, None]) / radii[:, 1, None, None]
        ) ** 2 <= 1
        classes = torch.randint(0, num_classes, (OBJECTS,), generator=gen)
        inst = Instances((h, w))
        inst.gt_masks = BitMasks(masks)
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = classes
        sem_seg = torch.zeros((h, w), dtype=torch.long)
        for m, c in zip(masks, classes):
            sem_seg[m] = 1 + int(c) % (SEM_CLASSES - 1)
        out.append(
            {
                "image": image.to(device),
                "height": h,
                "width": w,
                "instances": inst.to(device),
                "sem_seg": sem_seg.to(device),
            }
        )
    return out


def module_gflops(model, image):
    """fvcore's FLOPs of one inference on ``image``, in GFLOPs: "total" and per top-level module
    (NaN where the JIT trace fails)."""
    model.eval()
    flops = FlopCountAnalysis(model, [{"image": image}])
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    try:
        by_module = flops.by_module()
    except (TypeError, RuntimeError) as e:
        print(
            f"FLOPs not counted: the JIT trace failed ({type(e).__name__}: {str(e)[:120]})",
            flush=True,
        )
        return {k: float("nan") for k in ("total",) + MODULES}
    # detectron2's FlopCountAnalysis traces the model inside a TracingAdapter, as its "model"
    return {
        "total": by_module[""] / 1e9,
        **{m: by_module.get(f"model.{m}", 0) / 1e9 for m in MODULES},
    }


def _step_memory_mb(step, device):
    """The peak memory of one call of ``step`` above what was resident before it, in MiB."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as mem:
        step(0)
    return (mem.peak_bytes - mem.start_bytes) / 2**20


def measure(models, batch, args):
    """Rows per model: parameters, FLOPs, and per precision and mode the median seconds and the
    peak memory."""
    rows = {
        name: {
            "model": MODELS[name][0],
            "key": name,
            "params_M": sum(p.numel() for p in m.parameters()) / 1e6,
            "head_params_M": sum(p.numel() for p in m.sem_seg_head.parameters()) / 1e6
            if hasattr(m, "sem_seg_head")
            else 0.0,
        }
        for name, m in models.items()
    }
    if not args.no_flops:
        for name, m in models.items():
            rows[name]["gflops"] = module_gflops(m, batch[0]["image"])
            print(f"{name}: {rows[name]['gflops']['total']:.2f} GFLOPs", flush=True)
    test_batch = [{k: x[k] for k in ("image", "height", "width")} for x in batch]
    for precision in args.precisions:
        dtype = PRECISIONS[precision]
        for mode in ("train", "inference"):
            steps = {}
            for name, m in models.items():
                if mode == "train":
                    steps[name] = train_step(m, [batch], amp_dtype=dtype, device=args.device)
                else:
                    steps[name] = inference_step(
                        m, [test_batch], amp_dtype=dtype, device=args.device
                    )
                try:
                    with EventStorage(0):
                        steps[name](0)
                except Exception as e:  # e.g. an op without a kernel for this dtype on this device
                    print(
                        f"{name} {mode} {precision}: fails ({type(e).__name__}: {str(e)[:160]})",
                        flush=True,
                    )
                    rows[name][f"{mode}_{precision}"] = {
                        "error": f"{type(e).__name__}: {str(e)[:300]}"
                    }
                    del steps[name]
            if not steps:
                continue
            with EventStorage(0):
                times = time_round_robin(steps, args.warmup, args.iters, args.device)
                for name, step in steps.items():
                    rows[name][f"{mode}_{precision}"] = {
                        "seconds": statistics.median(times[name]),
                        "all_seconds": times[name],
                        "peak_mb": _step_memory_mb(step, args.device),
                    }
            print(
                f"{mode} {precision}: "
                + ", ".join(
                    f"{n} {rows[n][f'{mode}_{precision}']['seconds']:.3f} s" for n in steps
                ),
                flush=True,
            )
    return list(rows.values())


def _labelled(module, prefix):
    """Forward hooks that wrap each direct child of ``module`` in a profiler range named
    ``prefix.<child>``; returns the hook handles (remove them after profiling)."""
    handles = []
    for name, child in module.named_children():
        ranges = []

        def pre(_, __, name=name, ranges=ranges):
            r = torch.profiler.record_function(f"{prefix}.{name}")
            r.__enter__()
            ranges.append(r)

        def post(_, __, ___, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [child.register_forward_pre_hook(pre), child.register_forward_hook(post)]
    return handles


def profile_heads(models, batch, args, top=8):
    """
    Where a semantic head's cost goes, per model with one: the head alone on the backbone's
    features of the batch (training: forward, loss, backward into the features; inference:
    forward), under torch.profiler: the time of each child module's forward, and the ops taking
    the most self time (CPU time on the CPU, device time on a GPU).
    """
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, model in models.items():
        if not hasattr(model, "sem_seg_head"):
            continue
        model.train()
        with torch.no_grad():
            images = model.preprocess_image(batch)
            features = model.backbone(images.tensor)
        features = {k: v.detach().requires_grad_() for k, v in features.items()}
        targets = torch.full(
            images.tensor.shape[:1] + images.tensor.shape[-2:],
            255,
            dtype=torch.long,
            device=images.tensor.device,
        )
        for i, x in enumerate(batch):
            h, w = x["sem_seg"].shape
            targets[i, :h, :w] = x["sem_seg"]
        head = model.sem_seg_head

        def train():
            _, losses = head(features, targets)
            sum(losses.values()).backward()

        def infer():
            with torch.no_grad():
                head.eval()
                head(features, None)
                head.train()

        for fn in (train, infer, train, infer):  # warm-up
            fn()
        handles = _labelled(head, "head")
        try:
            result = {}
            for mode, fn in (("train", train), ("inference", infer)):
                activities = [ProfilerActivity.CPU] + (
                    [ProfilerActivity.CUDA] if args.device != "cpu" else []
                )
                with profile(activities=activities) as prof:
                    fn()
                events = prof.key_averages()
                kind = "cpu" if args.device == "cpu" else "device"
                total, own = (
                    (lambda e: getattr(e, f"{kind}_time_total")),
                    (lambda e: getattr(e, f"self_{kind}_time_total")),
                )
                modules = {e.key: total(e) / 1e3 for e in events if e.key.startswith("head.")}
                ops = sorted(
                    (e for e in events if not e.key.startswith("head.")), key=lambda e: -own(e)
                )
                result[mode] = {
                    "time": kind,
                    "total_ms": sum(own(e) for e in events if not e.key.startswith("head.")) / 1e3,
                    "forward_ms_by_child": modules,
                    "top_ops_self_ms": {e.key: own(e) / 1e3 for e in ops[:top]},
                }
        finally:
            for h in handles:
                h.remove()
        out[name] = result
        print(
            f"\n{MODELS[name][0]}: semantic head alone, {tuple(images.tensor.shape)} padded batch"
        )
        for mode, r in result.items():
            print(f"  {mode}: {r['total_ms']:.1f} ms {r['time']} time in all")
            print(
                "    forward by child: "
                + ", ".join(f"{k[5:]} {v:.1f}" for k, v in r["forward_ms_by_child"].items())
            )
            print(
                "    top ops (self ms): "
                + ", ".join(f"{k} {v:.1f}" for k, v in r["top_ops_self_ms"].items())
            )
    return out


def add_ratios(rows):
    """Each figure over the reference's (the first row): "<key>_ratio"."""
    ref = rows[0]
    for r in rows:
        if "gflops" in r:
            r["gflops_ratio"] = r["gflops"]["total"] / ref["gflops"]["total"]
        for key, value in list(r.items()):
            if isinstance(value, dict) and "seconds" in value:
                base = ref.get(key, {})
                value["ratio"] = (
                    value["seconds"] / base["seconds"] if "seconds" in base else float("nan")
                )
                if "peak_mb" in base:
                    value["peak_ratio"] = (
                        value["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else float("nan")
                    )
    return rows


def markdown(rows, precisions) -> str:
    """The table: params, FLOPs (total, semantic head), and per precision train / inference
    seconds with their ratio to the reference, and the train step's peak memory."""
    head = ["model", "params M (head)", "GFLOPs (head)", "FLOPs ratio"]
    for p in precisions:
        head += [f"train {p} s (ratio)", f"infer {p} s (ratio)", f"train {p} peak MB (ratio)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def timing(cell):
        if cell is None:
            return "—"
        if "error" in cell:
            return "fails"
        return f"{cell['seconds']:.3f} ({cell['ratio']:.2f})"

    for r in rows:
        g = r.get("gflops")
        cells = [r["model"], f"{r['params_M']:.1f} ({r['head_params_M']:.2f})"]
        cells += [
            f"{g['total']:.3g} ({g['sem_seg_head']:.3g})" if g else "—",
            f"{r['gflops_ratio']:.2f}" if g else "—",
        ]
        for p in precisions:
            train, infer = r.get(f"train_{p}"), r.get(f"inference_{p}")
            cells += [timing(train), timing(infer)]
            cells.append(
                f"{train['peak_mb']:.0f} ({train['peak_ratio']:.2f})"
                if train and "peak_mb" in train
                else "—"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _commit():
    try:
        out = subprocess.run(
            ["git", "-C", C, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="image size (default: 800 1216 on a GPU, 256 384 on the CPU)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images per step (default: 4 on a GPU, 2 on the CPU)",
    )
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=list(PRECISIONS),
        default=None,
        help="default: fp32 fp16 bf16 on a GPU, fp32 bf16 on the CPU",
    )
    p.add_argument(
        "--models", nargs="+", choices=list(MODELS), help="a subset (the reference always runs)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--iters", type=int, default=5, help="timed rounds (the models taking turns)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)"
    )
    p.add_argument("--no-flops", action="store_true", help="leave out fvcore's FLOP count")
    p.add_argument(
        "--no-timing", action="store_true", help="leave out the timed steps (e.g. with --profile)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile each semantic head alone (torch.profiler)",
    )
    p.add_argument("--json", help="also write the rows here")
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides for every model, KEY VALUE ... (after -- when they follow a list)",
    )
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.opts = args.opts[1:] if args.opts[:1] == ["--"] else args.opts
    gpu = torch.device(args.device).type == "cuda"
    args.size = args.size or ([800, 1216] if gpu else [256, 384])
    args.batch = args.batch or (4 if gpu else 2)
    args.precisions = args.precisions or (["fp32", "fp16", "bf16"] if gpu else ["fp32", "bf16"])
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build_models(args)
    num_classes = models[REFERENCE].roi_heads.num_classes
    batch = synthetic_batch(args.size, args.batch, num_classes, args.device)
    if args.no_timing:
        args.precisions = []
    rows = add_ratios(measure(models, batch, args))
    profiles = profile_heads(models, batch, args) if args.profile else None
    machine = (
        torch.cuda.get_device_name(args.device)
        if gpu
        else f"{platform.processor() or 'CPU'}, {os.cpu_count()} CPUs"
    )
    title = (
        f"{args.batch} images of {args.size[0]}x{args.size[1]}, {args.device} ({machine}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, median of {args.iters} rounds, "
        f"commit {_commit()}"
    )
    table = markdown(rows, args.precisions)
    print(f"\n{title}; ratios to {REFERENCE}\n\n{table}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "title": title, "rows": rows, "profiles": profiles},
                f,
                indent=1,
                default=str,
            )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
