#!/usr/bin/env python3
"""
Training-step time of Seg2MultiTaskRCNN (forward, backward, SGD step) before and after the
weight-0 losses that let mixed-target datasets train on several processes, side by side in one
run, as ratios to "before" (the forward of seg2 before that change, kept below as the reference).

    OMP_NUM_THREADS=1 python tools/benchmark_multitask_step.py               # quickstart FCN-8s, CPU
    python tools/benchmark_multitask_step.py --device cuda --config-file CONFIG [KEY VALUE ...]

Variants on a batch with both targets (what must not get slower):
  before                    the reference forward (a task without targets is skipped)
  after, 1 process          the model as it trains in one process (keep_all_branches off)
  after, several processes  keep_all_branches on, as in several processes
  DDP find_unused=False     the model in DistributedDataParallel (world size 1, gloo), as detectron2 wraps it
  DDP find_unused=True      the alternative mechanism: DDP walks the autograd graph at every step
On a batch with semantic maps only: "before" (detection skipped) against "after, several
processes" (detection losses at weight 0: sums of the parameters and features). Every variant
runs once per round, in turn (seg2.utils.benchmark.time_round_robin), each round starting with
the next variant, so that load from other jobs hits all alike; the median over rounds is
reported. Before timing, the tool checks that "before" and "after" give the same losses, bit for
bit, on the batch with both targets.
"""

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

from seg2.config import load_seg2_config
from seg2.engine import Trainer
from seg2.modeling.meta_arch.common import sem_seg_targets
from seg2.utils.benchmark import time_round_robin

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart",
    "mask_rcnn_R18_FPN_fcn8s_shapes_cpu.yaml",
)


def reference_forward(model, batched_inputs):
    """Seg2MultiTaskRCNN.forward in training before the weight-0 losses (seg2 d3f5c1f), verbatim
    but for visualisation: the "before" of this benchmark."""
    images = model.preprocess_image(batched_inputs)
    features = model.backbone(images.tensor)
    losses = {}
    targets = sem_seg_targets(batched_inputs, images.tensor.shape[-2:], model.sem_seg_head.ignore_value, model.device)
    if targets is not None:
        _, sem_seg_losses = model.sem_seg_head(features, targets)
        losses.update(sem_seg_losses)
    keep = [i for i, x in enumerate(batched_inputs) if "instances" in x]
    if keep:
        if len(keep) < len(batched_inputs):
            index = torch.as_tensor(keep, device=model.device)
            images = ImageList(images.tensor[index], [images.image_sizes[i] for i in keep])
            features = {k: v[index] for k, v in features.items()}
        gt_instances = [batched_inputs[i]["instances"].to(model.device) for i in keep]
        proposals, proposal_losses = model.proposal_generator(images, features, gt_instances)
        _, detector_losses = model.roi_heads(images, features, proposals, gt_instances)
        for k, v in {**proposal_losses, **detector_losses}.items():
            losses[k] = v * model.instance_loss_weight
    if not losses:
        losses["loss_sem_seg"] = torch.zeros((), device=model.device, requires_grad=True)
    return losses


def get_parser():
    p = argparse.ArgumentParser(description="Seg2MultiTaskRCNN training step: before/after the weight-0 losses")
    p.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds")
    p.add_argument("--no-ddp", action="store_true", help="leave out the DistributedDataParallel variants")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return p


def _step(model, optimizer, batch, forward=None, keep_all=None):
    def run(_):
        if keep_all is not None:
            model.keep_all_branches = keep_all
        losses = forward(model, batch) if forward else model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return run


@contextlib.contextmanager
def _process_group(enabled: bool):
    """A gloo process group of world size 1 for the DDP variants (nothing when not ``enabled``)."""
    if not enabled:
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _rotating_round_robin(steps, warmup, repeats, device):
    """:func:`time_round_robin`, one round at a time, each round starting one variant later, so
    that no variant always runs first (after the others' memory traffic) or last."""
    keys = list(steps)
    times = {k: [] for k in keys}
    for rnd in range(warmup + repeats):
        order = keys[rnd % len(keys):] + keys[: rnd % len(keys)]
        got = time_round_robin({k: steps[k] for k in order}, 0, 1, device)
        if rnd >= warmup:
            for k, v in got.items():
                times[k] += v
    return times


def benchmark(args):
    cfg = load_seg2_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).train()
    batch = next(iter(Trainer.build_train_loader(cfg)))
    if not all("instances" in x and "sem_seg" in x for x in batch):
        raise SystemExit(f"{cfg.DATASETS.TRAIN}: the batch needs both targets per image")
    sem_only = [{k: v for k, v in x.items() if k != "instances"} for x in batch]

    with EventStorage(0):
        checks = []
        for forward, keep_all in ((reference_forward, None), (None, False), (None, True)):
            model.keep_all_branches = keep_all
            torch.manual_seed(1)
            checks.append({k: v.detach() for k, v in (forward(model, batch) if forward else model(batch)).items()})
        for other in checks[1:]:
            if other.keys() != checks[0].keys() or any(not torch.equal(other[k], checks[0][k]) for k in other):
                raise SystemExit("the losses after the change differ from the reference on a batch with both targets")

        # lr 0: every variant does the optimizer's work, the weights stay as they are
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        both = {
            "before": _step(model, optimizer, batch, forward=reference_forward),
            "after, 1 process": _step(model, optimizer, batch, keep_all=False),
            "after, several processes": _step(model, optimizer, batch, keep_all=True),
        }
        single = {
            "before": _step(model, optimizer, sem_only, forward=reference_forward),
            "after, several processes": _step(model, optimizer, sem_only, keep_all=True),
        }
        with _process_group(enabled=not args.no_ddp):
            if not args.no_ddp:
                for find_unused in (False, True):
                    ddp = DistributedDataParallel(copy.deepcopy(model), find_unused_parameters=find_unused)
                    ddp.module.keep_all_branches = True
                    opt = torch.optim.SGD(ddp.parameters(), lr=0.0, momentum=0.9)
                    both[f"DDP find_unused={find_unused}"] = _step(ddp, opt, batch)
            steps = {("both_targets", k): v for k, v in both.items()}
            steps.update({("semantic_only", k): v for k, v in single.items()})
            times = _rotating_round_robin(steps, args.warmup, args.repeats, args.device)

    def table(part):
        ref = statistics.median(times[(part, "before")])
        return {
            k: {"median_s": statistics.median(v), "ratio_to_before": statistics.median(v) / ref}
            for (p, k), v in times.items() if p == part
        }

    return {
        "config": args.config_file,
        "images_per_batch": len(batch),
        "image_size": list(batch[0]["image"].shape[-2:]),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "both_targets": table("both_targets"),
        "semantic_only": table("semantic_only"),
    }


def main(argv=None):
    args = get_parser().parse_args(argv)
    result = benchmark(args)
    for part in ("both_targets", "semantic_only"):
        print(f"{part} ({result['images_per_batch']} images {result['image_size']}, {result['device']}, "
              f"{result['threads']} threads, median of {result['repeats']}):")
        for k, v in result[part].items():
            print(f"  {k:28s} {v['median_s'] * 1000:9.1f} ms   x{v['ratio_to_before']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
