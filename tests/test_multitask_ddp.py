"""Seg2MultiTaskRCNN under DistributedDataParallel with 2 CPU processes (gloo), mixed targets.

One process's batches carry only semantic maps, the other's only instances. DDP averages the two
processes' gradients, so the 2 processes make the update that one process makes from the mean of
the losses of the same two batches, each through its own forward pass: this comparison is exact
(bitwise), since every image meets the same operations in the same batch, the gradients are
summed in the same two terms, a halving is exact in floating point and the missing task's
weight-0 loss adds exact zeros. The two batches as one batch of 4 in one pass are the same
objective (each task's loss is normalised within the images that have its target; GroupNorm is
per image) but not the same floating-point sums: equal within rounding for one step, and after
4 steps ReLU and max-pool near-ties have turned the rounding into weight differences of up to 3e-4
(measured), so that comparison is made for one step.
"""

import datetime
import os
import pickle
import subprocess
import sys

import pytest
import torch
from detectron2.engine import SimpleTrainer, launch
from detectron2.engine.defaults import create_ddp_model
from detectron2.engine.hooks import CallbackHook
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from seg2.engine import Trainer
from seg2.utils import Seg2Error

# one_thread: the test process sums on one thread, as the workers do (the same floating-point sums)
from seg2_model_helpers import (
    base_cfg,
    leave_process_group,
    load_records,
    mapped_inputs,
)  # noqa: F401

STEPS = 4
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def _cfg(head="fcn8s"):
    """A quickstart multi-task model (R18-FPN Mask R-CNN + a semantic head), narrow, with GroupNorm."""
    cfg = base_cfg(f"quickstart/mask_rcnn_R18_FPN_{head}_shapes_cpu.yaml")
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    return cfg


def _batches(root):
    """Per rank, STEPS batches of 2 images: rank 0 semantic maps only, rank 1 instances only."""
    cfg = _cfg()
    inputs = mapped_inputs(cfg, load_records(root)[:8], size=64)
    sem_only = [{k: v for k, v in x.items() if k != "instances"} for x in inputs[:4]]
    inst_only = [{k: v for k, v in x.items() if k != "sem_seg"} for x in inputs[4:]]
    return [
        [part[(2 * s) % 4 : (2 * s) % 4 + 2] for s in range(STEPS)]
        for part in (sem_only, inst_only)
    ]


class _TwoBatches(torch.nn.Module):
    """The one-process reference: the mean of the model's losses on the two processes' batches,
    as DDP's mean of the 2 processes' gradients (a loss missing from a batch counts as 0)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, batches):
        a, b = (self.module(batch) for batch in batches)
        return {
            k: (a[k] * 0.5 if k in a else 0.0) + (b[k] * 0.5 if k in b else 0.0) for k in {**a, **b}
        }


def _train(model, batches):
    """detectron2's SimpleTrainer (forward, sum of losses, backward, metric gathering, SGD step);
    the same random seed before each step, for the RPN's and RoI heads' sampling."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    trainer = SimpleTrainer(model, batches, optimizer)
    trainer.register_hooks([CallbackHook(before_step=lambda t: torch.manual_seed(100 + t.iter))])
    trainer.train(0, len(batches))
    losses = {
        k: [v for v, _ in h.values()]
        for k, h in trainer.storage.histories().items()
        if k.startswith("loss")
    }
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def _ddp_worker(root, out_dir):
    torch.set_num_threads(1)
    batches = _batches(root)[comm.get_rank()]
    torch.manual_seed(0)
    model = Trainer.build_model(_cfg())
    # As detectron2's DefaultTrainer wraps it (no find_unused_parameters); device_ids=None on the
    # CPU.
    model = create_ddp_model(model, broadcast_buffers=False, device_ids=None)
    state, losses = _train(model, batches)
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.pkl"), "wb") as f:
        pickle.dump({"state": state, "losses": losses}, f)
    leave_process_group()


def test_mixed_targets_on_two_processes_equal_one_process_on_both_batches(
    tiny_shapes_root, tmp_path
):
    launch(
        _ddp_worker,
        2,
        dist_url="auto",
        args=(tiny_shapes_root, str(tmp_path)),
        timeout=datetime.timedelta(
            minutes=3
        ),  # a collective that waits fails instead of hanging the suite
    )
    ranks = []
    for r in range(2):
        with open(tmp_path / f"rank{r}.pkl", "rb") as f:
            ranks.append(pickle.load(f))

    # One process: the same initial weights, the mean of the losses of the two ranks' batches.
    sem_batches, inst_batches = _batches(tiny_shapes_root)
    torch.manual_seed(0)
    single = _TwoBatches(Trainer.build_model(_cfg()))
    single_state, single_losses = _train(single, list(zip(sem_batches, inst_batches)))

    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() == single_state.keys()
    torch.manual_seed(0)
    init_state = Trainer.build_model(_cfg()).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # DDP keeps the processes' weights identical
        assert torch.equal(a[k], single_state[k]), (k, (a[k] - single_state[k]).abs().max())
    # Every part moved: the semantic head (trained on rank 0 only), the detector (rank 1 only), the
    # backbone.
    for prefix in (
        "sem_seg_head.",
        "roi_heads.box_predictor.",
        "roi_heads.mask_head.",
        "proposal_generator.",
        "backbone.bottom_up.stem.",
    ):
        assert any(
            not torch.equal(a[k], init_state[k[len("module.") :]])
            for k in a
            if k.startswith("module." + prefix)
        )
    # Every process reported every loss at every step (the missing task's as 0): the main
    # process's mean over the 2 processes is the one-process mean.
    assert (
        set(ranks[0]["losses"])
        == set(single_losses)
        >= {"loss_sem_seg", "loss_rpn_cls", "loss_cls", "loss_mask"}
    )
    for k, v in ranks[0]["losses"].items():
        assert len(v) == STEPS
        torch.testing.assert_close(
            torch.tensor(v), torch.tensor(single_losses[k]), rtol=1e-6, atol=0, msg=k
        )


def test_union_batch_gives_the_mean_gradient_of_the_two_batches(tiny_shapes_root):
    """The first step's gradient from the two batches as one batch of 4 (one process, loss / 2)
    is the two batches' mean gradient, within float rounding: the same objective."""
    sem_batches, inst_batches = _batches(tiny_shapes_root)
    torch.manual_seed(0)
    model = Trainer.build_model(_cfg()).train()
    grads = []
    with EventStorage(0):
        for run in (
            lambda: _TwoBatches(model)((sem_batches[0], inst_batches[0])),
            lambda: {k: v * 0.5 for k, v in model(sem_batches[0] + inst_batches[0]).items()},
        ):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(100)
            sum(run().values()).backward()
            grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)


def test_weight_zero_branches_in_one_process(tiny_shapes_root):
    """``keep_all_branches`` (on by itself in several processes): a task without targets keeps
    its loss names at 0 and gives each of its parameters a zero gradient; the other task's
    gradients are those of the skipping model, bit for bit."""
    sem_batches, inst_batches = _batches(tiny_shapes_root)
    torch.manual_seed(0)
    model = Trainer.build_model(_cfg()).train()
    assert model.keep_all_branches is None
    branch = {"sem_seg": ("sem_seg_head.",), "instances": ("proposal_generator.", "roi_heads.")}
    with EventStorage(0):
        for batch, missing in [
            (sem_batches[0], "instances"),
            (inst_batches[0], "sem_seg"),
            (sem_batches[1], "instances"),
            ([{"image": sem_batches[0][0]["image"]}], "both"),
        ]:
            grads = []
            for keep_all in (False, True):
                model.keep_all_branches = keep_all
                model.zero_grad(set_to_none=True)
                torch.manual_seed(1)
                losses = model(batch)
                sum(losses.values()).backward()
                grads.append({k: p.grad for k, p in model.named_parameters()})
            assert model._communicates is False
            assert set(losses) == {
                "loss_sem_seg",
                "loss_rpn_cls",
                "loss_rpn_loc",
                "loss_cls",
                "loss_box_reg",
                "loss_mask",
            }
            skipped = branch.get(missing, branch["sem_seg"] + branch["instances"])
            for k, g in grads[1].items():
                assert g is not None, k  # every parameter is in the graph (what DDP needs)
                if k.startswith(skipped):
                    assert grads[0][k] is None and not g.any(), k
                elif (
                    grads[0][k] is None
                ):  # the backbone without any target / parts only the skipped task uses
                    assert (missing == "both" or k.startswith("backbone.fpn_")) and not g.any(), k
                else:
                    assert torch.equal(g, grads[0][k]), k
            for name in model._loss_keys["instances" if missing == "instances" else "sem_seg"]:
                assert losses[name].item() == 0.0
        # under autocast (SOLVER.AMP.ENABLED: bfloat16 features, float32 parameters)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(sem_batches[1])
        sum(losses.values()).backward()
        assert (
            losses["loss_mask"].item() == 0.0
            and not model.roi_heads.mask_head.predictor.weight.grad.any()
        )


# ---- bad input, and branches that communicate in their forward ---------------------------------
def _other_runs_worker(root, out_dir):
    """Runs in each of 2 processes: (1) the processes load different configs, (2) a model that
    skips a task without targets (``keep_all_branches=False``, the old behaviour) on mixed
    targets, (3) mixed targets with synchronised batch norm in both branches."""
    torch.set_num_threads(1)
    rank = comm.get_rank()
    batches = _batches(root)[rank]
    out = {}
    cfg = _cfg()
    if rank == 1:
        cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    try:
        Trainer.build_model(cfg)
    except Seg2Error as e:
        out["configs"] = str(e)

    torch.manual_seed(0)
    model = Trainer.build_model(_cfg())
    model.keep_all_branches = False
    model = create_ddp_model(model, broadcast_buffers=False, device_ids=None)
    try:
        with EventStorage(0):
            model(batches[0])
    except Seg2Error as e:
        out["skipping"] = str(e)

    cfg = _cfg("unet")
    cfg.MODEL.UNET_HEAD.NORM = "naiveSyncBN"
    cfg.MODEL.ROI_MASK_HEAD.NORM = "naiveSyncBN_N"  # "N": a process may have no foreground RoI
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    out["sync_bn_init"] = {k: v.clone() for k, v in model.state_dict().items()}
    model = create_ddp_model(model, broadcast_buffers=False, device_ids=None)
    out["sync_bn"], _ = _train(model, batches[:2])
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    leave_process_group()


def _launch_other_runs(root, out_dir):
    launch(
        _other_runs_worker,
        2,
        dist_url="auto",
        args=(root, out_dir),
        timeout=datetime.timedelta(minutes=2),
    )


@pytest.fixture(scope="module")
def other_runs(tiny_shapes_root, tmp_path_factory):
    """The 2-process runs of :func:`_other_runs_worker`, in a child process with a time limit, so
    that a run that hangs fails the tests instead of hanging the suite."""
    out_dir = str(tmp_path_factory.mktemp("ddp_other_runs"))
    code = (
        f"import sys; sys.path[:0] = [{TESTS_DIR!r}, {REPO_ROOT!r}]; import test_multitask_ddp as "
        "t; "
        f"t._launch_other_runs({tiny_shapes_root!r}, {out_dir!r})"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=400
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the 2-process runs did not end within {e.timeout} s (a hang): {e.stderr}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = []
    for r in range(2):
        with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
            ranks.append(pickle.load(f))
    return ranks


def test_processes_that_disagree_on_the_task_set_fail_with_the_cause(other_runs):
    for out in other_runs:
        # Different configs: found before DDP wraps the model, in every process.
        assert "disagree on the task set" in out["configs"]
        assert "rank 0: {'MODEL.META_ARCHITECTURE': 'Seg2MultiTaskRCNN'" in out["configs"]
        assert "rank 1: {'MODEL.META_ARCHITECTURE': 'GeneralizedRCNN'" in out["configs"]
        # Processes that skip different tasks: their loss names, at the first step, in every
        # process.
        assert "disagree on the task set" in out["skipping"]
        assert "rank 0: ['loss_sem_seg']" in out["skipping"]
        assert (
            "rank 1: ['loss_box_reg', 'loss_cls', 'loss_mask', 'loss_rpn_cls', 'loss_rpn_loc']"
            in out["skipping"]
        )


def test_sync_batch_norm_branches_train_on_mixed_targets(other_runs):
    """With synchronised batch norm in the semantic head and the mask head, the branch without
    targets still runs its forward in its process (at weight 0), so that the collective calls of
    the 2 processes match; the run ends with the same weights in both, every branch trained."""
    a, b = (out["sync_bn"] for out in other_runs)
    init = other_runs[0]["sync_bn_init"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for prefix in ("sem_seg_head.", "roi_heads.mask_head.", "proposal_generator."):
        assert any(
            not torch.equal(a[k], init[k[len("module.") :]])
            for k in a
            if k.startswith("module." + prefix)
        )


def test_train_loader_mixes_instance_and_semantic_only_datasets(tiny_shapes_root):
    """DATASETS.TRAIN with an instance-only dataset first and a semantic-only one second (detectron2's
    own loader fails on this: it filters every record as if it had "annotations")."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from seg2.data import SHAPES_CLASSES
    from seg2.engine.defaults import train_dataset_dicts

    records = load_records(tiny_shapes_root)
    inst, sem = "seg2_test_mixed_instances", "seg2_test_mixed_semantic"
    for name in (inst, sem):
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)
    # the instance dataset: 4 records without their semantic map, one of them without any object
    inst_records = [{k: v for k, v in r.items() if k != "sem_seg_file_name"} for r in records[:4]]
    for (
        r
    ) in inst_records:  # COCO ids 1..3 -> contiguous 0..2, as a registered COCO dataset maps them
        r["annotations"] = [{**a, "category_id": a["category_id"] - 1} for a in r["annotations"]]
    inst_records[3]["annotations"] = []
    DatasetCatalog.register(inst, lambda: [dict(r) for r in inst_records])
    MetadataCatalog.get(inst).set(thing_classes=list(SHAPES_CLASSES))
    DatasetCatalog.register(
        sem, lambda: [{k: v for k, v in r.items() if k != "annotations"} for r in records[4:]]
    )
    MetadataCatalog.get(sem).set(
        stuff_classes=["background"] + list(SHAPES_CLASSES), ignore_label=255
    )

    cfg = _cfg()
    cfg.DATASETS.TRAIN = (inst, sem)
    dicts = train_dataset_dicts(cfg)
    assert [("annotations" in d, "sem_seg_file_name" in d) for d in dicts] == [
        (True, False)
    ] * 3 + [(False, True)] * 4
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = 7, 0
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    batch = next(iter(Trainer.build_train_loader(cfg)))
    assert (
        sorted(("instances" in x, "sem_seg" in x) for x in batch)
        == [(False, True)] * 4 + [(True, False)] * 3
    )
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    assert len(train_dataset_dicts(cfg)) == 8
    MetadataCatalog.get(sem).set(thing_classes=["other"])
    with pytest.raises(Seg2Error, match="thing_classes differ"):
        train_dataset_dicts(cfg)
