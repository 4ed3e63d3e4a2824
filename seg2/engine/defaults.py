"""seg2's trainer and the setup of a training run, for ``tools/train_net.py`` and users' own scripts.

    from seg2.engine import Trainer, setup

    cfg = setup(args)  # args from detectron2's default_argument_parser()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
"""

import os

from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import load_seg2_config
from ..data import MultiTaskDatasetMapper, check_dataset_names
from ..evaluation import build_evaluator
from .hooks import build_best_checkpoint_hooks

__all__ = ["Trainer", "setup"]


class Trainer(DefaultTrainer):
    """DefaultTrainer with seg2's mapper (instances and label maps) and evaluator choice, keeping
    the best model by ``SEG2.BEST_CHECKPOINT``."""

    def build_hooks(self):
        ret = super().build_hooks()
        if comm.is_main_process():
            # After the EvalHook, which puts the flattened results ("segm/AP") in the storage.
            at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)) + 1
            ret[at:at] = build_best_checkpoint_hooks(self.cfg, self.checkpointer)
        return ret

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        # The records as detectron2's build_detection_train_loader loads them, so the mapper knows
        # the dataset's size when it judges the share of unreadable files.
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        mapper = MultiTaskDatasetMapper(cfg, True, num_records=len(dataset))
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=MultiTaskDatasetMapper(cfg, False))


def setup(args):
    """
    The frozen config of a run from detectron2's command-line ``args`` (``--config-file`` and
    ``opts``), after detectron2's ``default_setup`` (output folder, logs, seed); seg2's loggers
    write to the same console and log file. Raises :class:`seg2.Seg2Error` for a bad config or
    an unregistered dataset name.
    """
    cfg = load_seg2_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup configures detectron2's loggers only.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="seg2")
    check_dataset_names(cfg)
    return cfg
