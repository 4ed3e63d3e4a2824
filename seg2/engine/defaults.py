"""seg2's trainer and the setup of a training run, for ``tools/train_net.py`` and users' own scripts.

from seg2.engine import Trainer, setup

cfg = setup(args)  # args from detectron2's default_argument_parser()
trainer = Trainer(cfg)
trainer.resume_or_load(resume=args.resume)
trainer.train()
"""

import logging
import os
from collections import OrderedDict

from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
    print_instances_class_histogram,
)
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import Seg2Checkpointer
from ..config import load_seg2_config
from ..data import MultiTaskDatasetMapper
from ..data.catalog import check_test_datasets
from ..evaluation import build_evaluator
from ..inference.tta import build_tta_model
from ..resolve import resolve_config
from ..tasks import META_ARCH_TASKS
from ..utils import Seg2Error
from ..utils.cli import check_device
from ..utils.dist import check_same_in_all_processes
from .amp import Seg2AMPTrainer
from .data_order import (
    RESUMABLE_SAMPLERS,
    ResumableTrainLoader,
    RNGStates,
    build_resumable_sampler,
    forked_rng,
)
from .hooks import BestModelTest, build_best_checkpoint_hooks, check_best_checkpoint_config
from .optimizer import build_optimizer
from .resume import trim_metrics_json
from .run_lock import acquire_run_lock

__all__ = ["Trainer", "setup", "check_same_tasks", "train_dataset_dicts"]


class Trainer(DefaultTrainer):
    """DefaultTrainer with seg2's mapper (instances and label maps) and evaluator choice, keeping
    the best model by ``SEG2.BEST_CHECKPOINT`` (and testing it on its ``TEST_DATASETS`` after
    training); the optimizer of :func:`seg2.engine.optimizer.build_optimizer`;
    ``SOLVER.AMP.ENABLED`` also trains on the CPU (bfloat16 autocast, :class:`Seg2AMPTrainer`);
    :meth:`test_with_TTA` evaluates with ``TEST.AUG``.
    The config goes through the resolve step (:func:`seg2.resolve_config`: class counts and
    ignore value checked against the datasets, class weights counted) before anything is built;
    a checkpoint that cannot be read is named in a :class:`seg2.Seg2Error`; a resumed run keeps
    one ``metrics.json`` record per iteration."""

    def __init__(self, cfg):
        cfg = resolve_config(cfg)
        # One run per OUTPUT_DIR (seg2.engine.run_lock), before anything is written there; the
        # main process holds it (shared with setup()'s in the same process) until train() ends.
        self._run_lock = (
            acquire_run_lock(cfg.OUTPUT_DIR) if comm.is_main_process() and cfg.OUTPUT_DIR else None
        )
        super().__init__(cfg)
        if (
            cfg.SOLVER.AMP.ENABLED
        ):  # detectron2's AMPTrainer requires CUDA; this one defers to it there
            t = self._trainer
            self._trainer = Seg2AMPTrainer(t.model, t.data_loader, t.optimizer)

    def build_hooks(self):
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before calling this; the hooks
        # (periodic and best checkpoints) and resume_or_load use ours, which names a bad file,
        # refuses weights of another model (MODEL.WEIGHTS of which nothing fits; any mismatch on a
        # resume) and saves atomically.
        # For an exact resume, also the train loader's position and the RNG states
        # (seg2.engine.data_order).
        old = self.checkpointer
        extra = {"rng": RNGStates()}
        if isinstance(self._trainer.data_loader, ResumableTrainLoader):
            extra["data_order"] = self._trainer.data_loader
        self.checkpointer = Seg2Checkpointer(
            old.model,
            old.save_dir,
            save_to_disk=old.save_to_disk,
            strict=False,
            **old.checkpointables,
            **extra,
        )
        ret = super().build_hooks()
        # After the EvalHook, which puts the flattened results ("segm/AP") in the storage.
        at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)) + 1
        check_best_checkpoint_config(
            self.cfg
        )  # in every process, so that none waits for a failed one
        best = (
            build_best_checkpoint_hooks(self.cfg, self.checkpointer)
            if comm.is_main_process()
            else []
        )
        if (
            self.cfg.SEG2.BEST_CHECKPOINT.TEST_DATASETS
        ):  # in every process: a distributed evaluation
            best.append(BestModelTest(self.cfg, type(self)))
        ret[at:at] = best
        return ret

    def resume_or_load(self, resume=True):
        """detectron2's, then the records of ``metrics.json`` at iterations this run writes again
        (from a run that was killed after its last checkpoint) are dropped
        (:func:`~seg2.engine.resume.trim_metrics_json`)."""
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.restored = False
        super().resume_or_load(resume=resume)
        if (
            resume
            and self.start_iter > 0
            and isinstance(loader, ResumableTrainLoader)
            and not loader.restored
        ):
            loader.start_at_iteration(self.start_iter)
            logging.getLogger(__name__).warning(
                "The checkpoint holds no train loader state (saved by an older seg2 or by "
                "detectron2): the data "
                f"stream resumes at position {loader.position} (iteration {self.start_iter} x "
                f"{loader.batch_size} images), exact only without "
                "DATALOADER.ASPECT_RATIO_GROUPING; the RNG "
                "states are not restored, so the resumed run differs from an uninterrupted one"
            )
        if comm.is_main_process():
            trim_metrics_json(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter)

    def train(self):
        try:
            return super().train()
        finally:
            if self._run_lock is not None:
                self._run_lock.release()

    @classmethod
    def build_model(cls, cfg):
        """detectron2's model of ``cfg`` after the resolve step (:func:`seg2.resolve_config`,
        idempotent: a config from :func:`setup` passes unchanged) and :func:`check_same_tasks`
        (several processes)."""
        cfg = resolve_config(cfg, class_weights=False)
        check_same_tasks(cfg)
        return super().build_model(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's optimizer, with ``SOLVER.NORM_BIAS_HYPERPARAMS``
        (:func:`seg2.engine.optimizer.build_optimizer`)."""
        return build_optimizer(cfg, model)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's, with the global RNG states restored afterwards: an evaluation during
        training (``TEST.EVAL_PERIOD``) runs after the checkpoint of its iteration, so anything
        it drew would make the training after it differ from a run resumed from that checkpoint."""
        with forked_rng():
            return super().test(cfg, model, evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluation with test-time augmentation (``TEST.AUG``, :func:`seg2.inference.build_tta_model`),
        as detectron2's ``tools/train_net.py`` does it: results under "<dataset>_TTA", outputs in
        OUTPUT_DIR/inference_TTA."""
        logging.getLogger("seg2").info("Running inference with test-time augmentation ...")
        tta_model = build_tta_model(cfg, model)
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name)
            )
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, tta_model, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())

    @classmethod
    def build_train_loader(cls, cfg):
        # The records as detectron2's build_detection_train_loader loads them (mixed-target
        # datasets included), so the mapper knows the dataset's size when it judges the share of
        # unreadable files.
        dataset = train_dataset_dicts(cfg)
        mapper = MultiTaskDatasetMapper(cfg, True, num_records=len(dataset))
        # The loader whose position a checkpoint saves (seg2.engine.data_order): detectron2's
        # sampler and aspect-ratio grouping, each sample's augmentation seeded by its position.
        sampler = build_resumable_sampler(cfg, dataset)
        if sampler is None:
            logging.getLogger(__name__).warning(
                f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN} has no seeded stream: "
                "detectron2's "
                "loader, whose data order a resume restarts (not exact; exact: "
                f"{', '.join(RESUMABLE_SAMPLERS)})"
            )
            return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)
        world = comm.get_world_size()
        if cfg.SOLVER.IMS_PER_BATCH % world:
            raise Seg2Error(
                f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} must be divisible by the number "
                "of "
                f"processes ({world})"
            )
        return ResumableTrainLoader(
            dataset,
            mapper,
            sampler,
            cfg.SOLVER.IMS_PER_BATCH // world,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            seed=cfg.SEED,
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=MultiTaskDatasetMapper(cfg, False)
        )


def train_dataset_dicts(cfg) -> list:
    """
    The records of ``DATASETS.TRAIN``, as detectron2's ``get_detection_dataset_dicts`` gives them
    to its train loader, for datasets that mix records with instances and records with only a
    semantic map (``DATASETS.TRAIN: ("coco_instances", "semantic_only")``, say). detectron2
    decides from the first record whether the records have "annotations" and then filters and
    counts all of them as such (a KeyError on the first semantic-only record); here
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` drops the records with "annotations" but no
    non-crowd object, as detectron2 does, and keeps the records without "annotations".
    """
    names = cfg.DATASETS.TRAIN
    dicts = get_detection_dataset_dicts(
        names,
        filter_empty=False,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
        if cfg.MODEL.KEYPOINT_ON
        else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        check_consistency=False,
    )
    with_instances = [d for d in dicts if "annotations" in d]
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS and with_instances:
        before = len(dicts)
        dicts = [
            d
            for d in dicts
            if "annotations" not in d or any(a.get("iscrowd", 0) == 0 for a in d["annotations"])
        ]
        logging.getLogger(__name__).info(
            f"Removed {before - len(dicts)} images with annotations but no usable object; "
            f"{len(dicts)} images left "
            f"({before - len(with_instances)} without annotations, kept for their semantic maps)."
        )
        with_instances = [d for d in dicts if "annotations" in d]
    classes = [MetadataCatalog.get(n).get("thing_classes") for n in names]
    classes = [c for c in classes if c is not None]
    if classes and any(c != classes[0] for c in classes):
        raise Seg2Error(
            f"DATASETS.TRAIN={tuple(names)}: the datasets' thing_classes differ: {classes}"
        )
    if classes and with_instances:
        print_instances_class_histogram(with_instances, classes[0])
    if not dicts:
        raise Seg2Error(f"DATASETS.TRAIN={tuple(names)}: no record left to train on")
    return dicts


def _task_set(cfg) -> dict:
    """What a process trains, as its config says: the meta-architecture, its tasks and their heads."""
    name = cfg.MODEL.META_ARCHITECTURE
    tasks = sorted(META_ARCH_TASKS.get(name, ()))
    ret = {"MODEL.META_ARCHITECTURE": name, "tasks": tasks}
    if "instances" in tasks:
        ret.update({"MODEL.MASK_ON": cfg.MODEL.MASK_ON, "MODEL.KEYPOINT_ON": cfg.MODEL.KEYPOINT_ON})
    if "sem_seg" in tasks:
        ret["MODEL.SEM_SEG_HEAD.NAME"] = cfg.MODEL.SEM_SEG_HEAD.NAME
    return ret


def check_same_tasks(cfg):
    """
    In several processes, a :class:`Seg2Error` in every process when they do not train the same
    task set (meta-architecture, tasks, heads): before DistributedDataParallel wraps the model,
    where such a run would fail on mismatched parameters or wait forever in a gradient reduction
    that the other processes never join. One gather of a small dict, once; nothing in one process.
    """
    check_same_in_all_processes(
        _task_set(cfg),
        "the task set",
        "every process must load the same config (the same --config-file and opts)",
    )


# The run locks that setup() took: held for the life of the process (the run).
_SETUP_LOCKS = []


def setup(args):
    """
    The frozen, resolved config of a run from detectron2's command-line ``args``
    (``--config-file`` and ``opts``): loaded, through the resolve step
    (:func:`seg2.resolve_config`; ``--eval-only`` counts no class weights), then detectron2's
    ``default_setup`` (output folder, logs, seed; its ``config.yaml`` holds the resolved values,
    the class weights as numbers); seg2's loggers write to the same console and log file. Raises
    :class:`seg2.Seg2Error` for a bad config or one that does not fit its datasets, or when
    another run holds ``OUTPUT_DIR`` (:mod:`seg2.engine.run_lock`; ``--eval-only`` runs too),
    or for a test dataset that is empty or fails its loader's checks (loaded here, before
    training: :func:`seg2.data.catalog.check_test_datasets`).
    """
    cfg = load_seg2_config(args.config_file, args.opts)
    check_device(cfg.MODEL.DEVICE)
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        # Before anything writes config.yaml or log.txt there; held until the process ends.
        _SETUP_LOCKS.append(acquire_run_lock(cfg.OUTPUT_DIR))
    # seg2's loggers (default_setup configures detectron2's only) before the resolve step, whose
    # lines (class weights) go to the same console and log file.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="seg2")
    cfg = resolve_config(cfg, class_weights=not getattr(args, "eval_only", False))
    cfg.freeze()
    default_setup(cfg, args)
    check_test_datasets(cfg)  # an empty or broken test split fails now, not after training
    return cfg
