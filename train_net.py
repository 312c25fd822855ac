#!/usr/bin/env python
"""Train or evaluate a model from a config, with detectron2's command line.

python train_net.py --config-file configs/CondInst/MS_R_50_1x.yaml --num-gpus 8
python train_net.py --config-file configs/CondInst/MS_R_50_1x.yaml --eval-only \\
    MODEL.WEIGHTS model.pth
torchrun --nproc-per-node 8 train_net.py --config-file ...
"""

from boxteacher.engine import default_argument_parser, launch
from boxteacher.engine.trainer import train_or_evaluate

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        train_or_evaluate,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
