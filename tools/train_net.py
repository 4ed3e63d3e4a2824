#!/usr/bin/env python3
"""
seg2 training script: Mask R-CNN, semantic and multi-task models on seg2's datasets.

    python tools/train_net.py --config-file configs/quickstart/mask_rcnn_R18_FPN_shapes_cpu.yaml
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS ... TEST.AUG.ENABLED True
    \
        TEST.AUG.SCALE_RATIOS "(0.75, 1.0, 1.25)"   # also with test-time augmentation

A seg2 error (bad config or data, wherever raised) ends it with one line ``seg2: error: ...`` and
exit status 1; ``--debug`` (or ``SEG2_DEBUG=1``) prints its traceback too.
The trainer and the setup are :mod:`seg2.engine`'s, for scripts of your own to reuse.
"""

from detectron2.engine import default_argument_parser, launch

import seg2  # noqa: F401  (registers seg2's datasets and models)
from seg2.checkpoint import Seg2Checkpointer
from seg2.engine import Trainer, setup
from seg2.utils import Seg2Error
from seg2.utils.cli import add_debug_argument, check_num_gpus, run_tool


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # strict: every parameter must come from the file
        checkpointer = Seg2Checkpointer(model, save_dir=cfg.OUTPUT_DIR)
        if not cfg.MODEL.WEIGHTS and not (args.resume and checkpointer.has_checkpoint()):
            raise Seg2Error(
                "--eval-only with MODEL.WEIGHTS empty would evaluate a randomly initialised "
                "model: set "
                "MODEL.WEIGHTS to a trained checkpoint (or add --resume in an OUTPUT_DIR with "
                "last_checkpoint)"
            )
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _launch(main_func, num_gpus, **kwargs):
    check_num_gpus(num_gpus)
    return launch(main_func, num_gpus, **kwargs)


def invoke_main() -> None:
    args = add_debug_argument(default_argument_parser()).parse_args()
    print("Command Line Args:", args)
    run_tool(
        _launch,
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        debug=args.debug,
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
