#!/usr/bin/env python
"""Train or evaluate a model from a config, with detectron2's command line.

    python train_net.py --config-file configs/CondInst/MS_R_50_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/CondInst/MS_R_50_1x.yaml --eval-only MODEL.WEIGHTS model.pth
    torchrun --nproc-per-node 8 train_net.py --config-file ...
"""
import logging

from boxteacher.build import build_model
from boxteacher.config import load_config
from boxteacher.engine import Checkpointer, default_argument_parser, default_setup, launch
from boxteacher.engine.trainer import Trainer, evaluate

logger = logging.getLogger("boxteacher.train_net")


def main(args):
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = build_model(cfg)
        if not cfg.MODEL.WEIGHTS and not args.resume:
            logger.warning("--eval-only without MODEL.WEIGHTS: evaluating randomly initialised weights.")
        Checkpointer(model, cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return evaluate(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
