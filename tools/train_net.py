#!/usr/bin/env python3
"""
seg2 training script: Mask R-CNN, semantic and multi-task models on seg2's datasets.

    python tools/train_net.py --config-file configs/quickstart/mask_rcnn_R18_FPN_shapes_cpu.yaml
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS ... TEST.AUG.ENABLED True \
        TEST.AUG.MIN_SIZES "(288, 360, 432)" TEST.AUG.MAX_SIZE 1000   # also with test-time augmentation

The trainer and the setup are :mod:`seg2.engine`'s, for scripts of your own to reuse.
"""

import sys

from detectron2.engine import default_argument_parser, launch

import seg2
from seg2.engine import Trainer, setup
from seg2.engine.resume import Seg2Checkpointer


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Seg2Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except seg2.Seg2Error as e:
        sys.exit(f"seg2: error: {e}")


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
