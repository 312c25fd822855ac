#!/usr/bin/env python
"""Parameters and FLOPs, per module, of the network of a config in inference mode.

    python tools/analyze_model.py --config-file configs/coco/boxteacher_r50_1x.yaml
    python tools/analyze_model.py --config-file configs/quickstart/condinst_shapes.yaml \
        --short-side 128 MODEL.WEIGHTS output/quickstart_condinst/model_final.pth

The network runs its inference (``model.eval()``) on one random image of S x 4S/3 pixels
(``--short-side`` S, COCO's usual 3:4 aspect), traced by fvcore's ``FlopCountAnalysis``. FLOPs
are counted as fvcore does: one multiply-add is one flop; element-wise operations are not
counted (they are listed). The dynamic mask head runs once per detection, so its FLOPs depend
on the weights (``MODEL.WEIGHTS``) and the image. BoxTeacher's teacher and student are the same
network: the tables are of one of them (the student); the model holds two copies.
"""

from __future__ import annotations

import logging
import math

import torch
from fvcore.nn import FlopCountAnalysis, flop_count_table
from fvcore.nn.jit_handles import bmm_flop_jit
from torch import nn

from boxteacher.build import architecture_spec, build_model
from boxteacher.config import ArchitectureSpec
from boxteacher.engine import (
    build_trained_model,
    default_argument_parser,
    setup_config,
    setup_tool_logging,
)


class InferenceOnImage(nn.Module):
    """Traceable inference of a detector: an image tensor in, the output tensors out.

    ``forward``: uint8 (3, H, W) image in the input format -> boxes (M, 4), scores (M,),
    labels (M,), masks bool (M, H, W).
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        height, width = image.shape[-2:]
        instances = self.network([{"image": image, "height": height, "width": width}])[0][
            "instances"
        ]
        return tuple(instances[k] for k in ("boxes", "scores", "labels", "masks"))


def baddbmm_flop_jit(inputs: list, outputs: list) -> int:
    """FLOPs of ``baddbmm(bias, batch1, batch2)``: those of ``bmm(batch1, batch2)`` (the dynamic
    mask head's layers)."""
    return bmm_flop_jit(inputs[1:3], outputs)


def network_to_analyze(model: nn.Module, spec: ArchitectureSpec) -> nn.Module:
    """The single network of a model (a teacher-student model such as BoxTeacher: its student,
    whose trainable parameters are those of training), in eval mode."""
    if spec.teacher_student:
        model = model.student
    return model.eval()


def flop_analysis(network: nn.Module, image: torch.Tensor) -> FlopCountAnalysis:
    """fvcore's FLOP count of ``network``'s inference on ``image`` (uint8 (3, H, W))."""
    analysis = FlopCountAnalysis(InferenceOnImage(network), (image,))
    analysis.set_op_handle("aten::baddbmm", baddbmm_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings(
        "none"
    )
    return analysis


def summary_lines(
    model: nn.Module,
    network: nn.Module,
    analysis: FlopCountAnalysis,
    image: torch.Tensor,
    num_detections: int,
) -> list[str]:
    """Parameter counts of ``network``, total FLOPs and the operators fvcore did not count."""
    total = sum(p.numel() for p in network.parameters())
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    lines = []
    if network is not model:
        lines.append(
            f"{type(model).__name__}: teacher and student are the same network; below is one of "
            f"them (the student). The model holds both: "
            f"{sum(p.numel() for p in model.parameters()):,} parameters."
        )
    unsupported = ", ".join(sorted(analysis.unsupported_ops()))
    lines += [
        f"parameters: {total:,} total, {trainable:,} trainable",
        f"FLOPs: {analysis.total():,} ({analysis.total() / 1e9:.3f} GFLOPs) on one image of "
        f"{image.shape[-2]}x{image.shape[-1]} with {num_detections} detections",
        f"not counted (no FLOP formula): {unsupported or 'none'}",
    ]
    return lines


def main() -> None:
    parser = default_argument_parser(description=__doc__, config="required", training=False)
    parser.add_argument(
        "--short-side", type=int, default=800, help="short side S of the image (S x 4S/3)"
    )
    parser.add_argument("--max-depth", type=int, default=3, help="module depth of the table")
    args = parser.parse_args()
    setup_tool_logging(logging.WARNING)

    cfg = setup_config(args.config_file, args.opts)
    model = build_trained_model(cfg) if cfg.MODEL.WEIGHTS else build_model(cfg)
    # BoxTeacher's teacher and student are the same network: analyse one.
    network = network_to_analyze(model, architecture_spec(cfg))
    height, width = args.short_side, math.ceil(args.short_side * 4 / 3)
    image = torch.randint(
        0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    image = image.to(next(network.parameters()).device)
    with torch.no_grad():
        num_detections = len(InferenceOnImage(network)(image)[0])
        analysis = flop_analysis(network, image)
        analysis.total()  # runs the trace
    print("\n".join(summary_lines(model, network, analysis, image, num_detections)))
    print()
    print(flop_count_table(analysis, max_depth=args.max_depth, show_param_shapes=False))


if __name__ == "__main__":
    main()
