#!/usr/bin/env python
"""Time BoxTeacher's teacher post-processing (masks upsampled to the student's input size,
mask-aware scores) with every detection kept, as the release does, and with only the
detections that can be assigned to a ground-truth box (``TeacherPass.candidate_iou``, the
default unless ``MODEL.BOX_TEACHER.LEGACY_ASSIGNMENT``; the dynamic mask head, not timed here,
then also runs for these only). Prints a markdown table.

    python tools/benchmark_teacher_postprocess.py --teacher-size 800 1066 --student-size 720 960 \
        --detections 100 --boxes 7 --near-fraction 0.3 [--device cuda]

Each image gets ``--boxes`` ground-truth boxes and ``--detections`` teacher detections, a
``--near-fraction`` of them jittered copies of the boxes (as a trained teacher gives) and the
rest elsewhere, with random stride-4 mask probabilities. The network pass is not included: see
``tools/benchmark_speed.py`` for whole training steps. A second table times the pseudo labels
built from these outputs (assignment, binarisation) without and with the guided-filter
refinement of the assigned masks (``MODEL.BOX_TEACHER.REFINE_RADIUS``, ``--refine-radius``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

from boxteacher.engine import default_argument_parser
from boxteacher.modeling.guided_filter import MaskRefinement
from boxteacher.modeling.pseudo_labels import PseudoLabeler
from boxteacher.modeling.teacher import (
    TeacherPass,
    assignable_detections,
    teacher_outputs,
    to_student_frame,
)


def synthetic_image(
    args: argparse.Namespace, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One image's detections (teacher frame, ``mask_probs`` over the 32-padded frame at stride
    4) and its ground-truth boxes (N, 4) in the student frame."""
    (th, tw), (sh, sw) = args.teacher_size, args.student_size

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    corner = rand(args.boxes, 2) * torch.tensor([sw * 0.6, sh * 0.6])
    gt = torch.cat(
        [corner, corner + 20 + rand(args.boxes, 2) * torch.tensor([sw * 0.3, sh * 0.3])], dim=1
    )
    to_teacher = torch.tensor([tw / sw, th / sh, tw / sw, th / sh])
    near = round(args.detections * args.near_fraction)
    picked = gt[torch.randint(0, args.boxes, (near,), generator=generator)] * to_teacher
    jittered = picked + (rand(near, 4) - 0.5) * 0.1 * (picked[:, 2:] - picked[:, :2]).repeat(1, 2)
    corner = rand(args.detections - near, 2) * torch.tensor([tw * 0.9, th * 0.9])
    elsewhere = torch.cat([corner, corner + 8 + rand(args.detections - near, 2) * 60], dim=1)
    m = args.detections
    padded = ((th + 31) // 32 * 32, (tw + 31) // 32 * 32)
    detections = {
        "boxes": torch.cat([jittered, elsewhere]),
        "scores": rand(m),
        "labels": torch.randint(0, 80, (m,), generator=generator),
        "mask_probs": rand(m, 1, padded[0] // 4, padded[1] // 4),
    }
    return {k: v.to(args.device) for k, v in detections.items()}, gt.to(args.device)


def timed(function, device: str, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after one warm-up call, and the last result."""
    times, result = [], None
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), result


def refinement_table(
    args: argparse.Namespace, outputs: list[dict], gt_boxes: list[torch.Tensor]
) -> str:
    """Pseudo labels of every image from the teacher ``outputs``, without and with refinement."""
    generator = torch.Generator().manual_seed(1)
    guides = [
        torch.randint(0, 256, (3, *args.student_size), generator=generator, dtype=torch.uint8).to(
            args.device
        )
        for _ in outputs
    ]
    rows, base = [], None
    for name, refinement in (
        ("assigned masks as they are", None),
        (f"guided filter, radius {args.refine_radius}", MaskRefinement(args.refine_radius)),
    ):

        def label():
            return PseudoLabeler(args.iou, refinement=refinement).label(outputs, gt_boxes, guides)

        seconds, labels = timed(label, args.device, args.repeats)
        base = base or seconds
        matched = sum(int((x["assigned"] >= 0).sum()) for x in labels) / len(labels)
        rows.append([name, f"{matched:.1f}", f"{1000 * seconds:.1f}", f"{seconds / base:.2f}x"])
    return tabulate(
        rows,
        headers=["pseudo labels", "masks per image", "ms per batch", "time"],
        tablefmt="github",
    )


def main() -> None:
    parser = default_argument_parser(
        description=__doc__, config="none", overrides=False, training=False
    )
    parser.add_argument(
        "--teacher-size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W")
    )
    parser.add_argument("--student-size", type=int, nargs=2, default=[720, 960], metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=2, help="images per batch")
    parser.add_argument("--detections", type=int, default=100, help="teacher detections per image")
    parser.add_argument("--boxes", type=int, default=7, help="ground-truth boxes per image")
    parser.add_argument(
        "--near-fraction", type=float, default=0.3, help="share of detections on a box"
    )
    parser.add_argument("--iou", type=float, default=0.5, help="MODEL.BOX_TEACHER.IOU_THR")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--refine-radius", type=int, default=4, help="MODEL.BOX_TEACHER.REFINE_RADIUS"
    )
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    images = [synthetic_image(args, generator) for _ in range(args.images)]
    gt_boxes = [g for _, g in images]
    detections = {k: torch.cat([d[k] for d, _ in images]) for k in images[0][0]}
    detections["im_inds"] = torch.arange(args.images, device=args.device).repeat_interleave(
        args.detections
    )
    sizes = dict(
        input_sizes=[tuple(args.teacher_size)] * args.images,
        student_sizes=[tuple(args.student_size)] * args.images,
    )
    rows, seconds = [], {}
    for name, select in (
        ("every detection (release)", False),
        ("assignable detections only", True),
    ):

        def post_process():
            selected = detections
            if select:
                student_boxes = to_student_frame(
                    detections["boxes"], detections["im_inds"], **sizes
                )
                selected = assignable_detections(detections, student_boxes, gt_boxes, args.iou)
            return teacher_outputs(selected, mask_stride=4, settings=TeacherPass(), **sizes)

        seconds[name], outputs = timed(post_process, args.device, args.repeats)
        kept = sum(o["scores"].numel() for o in outputs)
        rows.append([name, f"{kept / args.images:.1f}", f"{1000 * seconds[name]:.1f}"])
    base = seconds["every detection (release)"]
    for row, name in zip(rows, seconds):
        row.append(f"{base / seconds[name]:.2f}x")
    print(
        f"{args.images} images, teacher {args.teacher_size[0]}x{args.teacher_size[1]} -> student "
        f"{args.student_size[0]}x{args.student_size[1]}, {args.detections} detections and "
        f"{args.boxes} boxes per image, device {args.device}"
    )
    print(
        tabulate(
            rows,
            headers=["teacher post-processing", "masks per image", "ms per batch", "speed-up"],
            tablefmt="github",
        )
    )
    print()
    print(refinement_table(args, outputs, gt_boxes))


if __name__ == "__main__":
    main()
