"""This implementation against the official BoxTeacher / AdelaiDet outputs recorded in the parity
fixtures (``parity_fixtures.py``), quantity by quantity: the largest difference of each over
images, levels and detections, with the tolerance of the fixtures' README (absolute for tensors,
relative for losses and gradient norms, the fraction of disagreeing pixels for binary masks,
``exact`` for integer outputs; detections are matched by FCOS level, location and class).
``tools/parity_report.py`` prints the tables; ``tests/evaluation/test_parity_official.py`` asserts
them."""

from __future__ import annotations

import contextlib

import torch
from tabulate import tabulate
from torch import nn

from ..engine.weight_files import detectron2_to_project_name
from ..modeling.mask_scores import mask_aware_scores
from ..modeling.postprocess import detections_to_output_frame, upsample_mask_probs
from .parity_fixtures import (
    BBOX_REG,
    BOXES,
    FEATURES,
    GRAD_PARAM,
    GRAD_TOTAL,
    LEVELS,
    LOSSES,
    MASK_LOGITS,
    MASK_PROBS,
    SCORES,
    Comparison,
    Fixture,
    Row,
    recording,
)


def compare_heads(
    c: Comparison, prefix: str, outputs, mask_feats: torch.Tensor, top_feats, expected
) -> None:
    """FCOS head, controller and mask-branch outputs against ``{prefix}/head/p*`` etc."""
    for level, name in enumerate(LEVELS):
        head = f"{prefix}/head/{name}"
        c.close("head cls_logits", outputs.logits[level], expected[f"{head}/cls_logits"], FEATURES)
        c.close("head bbox_reg", outputs.bbox_reg[level], expected[f"{head}/bbox_reg"], BBOX_REG)
        c.close("head ctrness", outputs.ctrness[level], expected[f"{head}/ctrness"], FEATURES)
        if f"{head}/top_feats" in expected:
            c.close("head top_feats", top_feats[level], expected[f"{head}/top_feats"], FEATURES)
    c.close("mask_feats", mask_feats, expected[f"{prefix}/mask_feats"], FEATURES)


def detection_keys(
    levels: torch.Tensor, locations: torch.Tensor, other: torch.Tensor
) -> list[tuple]:
    """(level, x, y, other) per detection or positive (``other``: class or image index)."""
    return [
        (int(lv), int(x), int(y), int(k))
        for lv, (x, y), k in zip(levels, locations.tolist(), other)
    ]


@torch.no_grad()
def compare_detections(
    c: Comparison, network: nn.Module, fixture: Fixture, i: int, prefix: str
) -> None:
    """The inference output of ``network`` on image ``i`` against ``{prefix}/det/*``: the same
    detection set (by level, location, class), then boxes, scores, masks of each."""
    sample = fixture.image(i)
    expected = fixture.expected
    result = network(sample)[0]["instances"]
    images, sizes = network.preprocess(sample)
    raw = network.detect(images)[0]
    output_size = (int(sample[0]["height"]), int(sample[0]["width"]))
    frame = detections_to_output_frame(
        raw,
        raw["mask_probs"],
        network.mask_out_stride,
        sizes[0],
        output_size,
        network.mask_threshold,
    )
    h, w = sizes[0]
    kept = (raw["boxes"][:, 2].clamp(0, w) > raw["boxes"][:, 0].clamp(0, w)) & (
        raw["boxes"][:, 3].clamp(0, h) > raw["boxes"][:, 1].clamp(0, h)
    )
    ranking, weights = mask_aware_scores(frame["scores"], frame["mask_means"])

    ours = {
        key: k
        for k, key in enumerate(
            detection_keys(raw["fpn_levels"][kept], raw["locations"][kept], raw["labels"][kept])
        )
    }
    keys = detection_keys(
        expected[f"{prefix}/fpn_levels"],
        expected[f"{prefix}/locations"],
        expected[f"{prefix}/classes"],
    )
    same_set = sorted(ours) == sorted(keys)
    c.add("detection set (level, location, class)", 0.0 if same_set else 1.0, 0.0, "exact")
    if not same_set:
        return
    index = torch.tensor([ours[k] for k in keys], dtype=torch.long)
    c.close("boxes (px)", result["boxes"][index], expected[f"{prefix}/boxes"], BOXES)
    c.close("scores (mask-aware)", result["scores"][index], expected[f"{prefix}/scores"], SCORES)
    c.close("fcos_scores", raw["scores"][kept][index], expected[f"{prefix}/fcos_scores"], SCORES)
    c.close("mask_score (loss weight)", weights[index], expected[f"{prefix}/mask_score"], SCORES)
    c.close("top_feat", raw["top_feat"][kept][index], expected[f"{prefix}/top_feat"], FEATURES)
    c.close(
        "mask_probs stride 4",
        raw["mask_probs"][kept][index, 0],
        expected[f"{prefix}/mask_probs_s4"],
        MASK_PROBS,
    )
    if f"{prefix}/mask_probs_full_top3" in expected:
        top3 = expected[f"{prefix}/mask_probs_full_top3"]
        full = upsample_mask_probs(
            raw["mask_probs"][kept][index[: len(top3)]],
            network.mask_out_stride,
            sizes[0],
            output_size,
        )
        c.close("mask_probs full resolution", full, top3, MASK_PROBS)
    c.masks(
        "binary masks",
        result["masks"][index],
        expected[f"{prefix}/masks_packed"],
        int(sample[0]["width"]),
    )
    check_order(c, "detection order", index, expected[f"{prefix}/fcos_scores"])


def check_order(
    c: Comparison, quantity: str, index: torch.Tensor, official_scores: torch.Tensor
) -> None:
    """Our order of the detections (``index[k]``: our position of official detection k) is the
    official one up to swaps of neighbours whose official scores differ by < 1e-5 (README)."""
    in_our_order = official_scores[torch.argsort(index)]
    rises = (in_our_order[1:] - in_our_order[:-1]).clamp(min=0)
    c.add(quantity, rises.max().item() if len(rises) else 0.0, 1e-5, "abs")


@torch.no_grad()
def compare_inference(fixture: Fixture) -> list[Row]:
    """(a) the student as CondInst, features to detections; (b) the BoxTeacher model (teacher)."""
    model = fixture.build()
    model.eval()
    a, b = Comparison("a: student inference"), Comparison("b: BoxTeacher (teacher) inference")
    student = model.student
    for i in range(fixture.num_images):
        prefix = f"a/img{i}"
        features: dict[str, dict] = {}
        hooks = [
            student.backbone.bottom_up.register_forward_hook(
                lambda m, x, out: features.setdefault("resnet", out)
            ),
            student.backbone.register_forward_hook(
                lambda m, x, out: features.setdefault("fpn", out)
            ),
        ]
        images, _ = student.preprocess(fixture.image(i))
        mask_feats, outputs, top_feats, _ = student.run_heads(images)
        for hook in hooks:
            hook.remove()
        for name in ("res3", "res4", "res5"):
            a.close(
                "ResNet outputs",
                features["resnet"][name],
                fixture.expected[f"{prefix}/backbone/{name}"],
                FEATURES,
            )
        for name in LEVELS:
            a.close(
                "FPN outputs",
                features["fpn"][name],
                fixture.expected[f"{prefix}/fpn/{name}"],
                FEATURES,
            )
        compare_heads(a, prefix, outputs, mask_feats, top_feats, fixture.expected)
        compare_detections(a, student, fixture, i, f"{prefix}/det")
        compare_detections(b, model.teacher, fixture, i, f"b/img{i}/det")
        result, teacher_result = (
            model(fixture.image(i))[0]["instances"],
            model.teacher(fixture.image(i))[0]["instances"],
        )
        b.add(
            "BoxTeacher evaluates with its teacher",
            0.0 if torch.equal(result["scores"], teacher_result["scores"]) else 1.0,
            0.0,
            "exact",
        )
    return list(a.rows.values()) + list(b.rows.values())


def official_grad_norms(
    model: nn.Module, expected: dict, prefix: str
) -> dict[str, tuple[float, float]]:
    """(ours, official) gradient norm of each parameter listed under ``{prefix}/grad_norm/``."""
    ours = {
        name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None
    }
    pairs = {}
    for key, value in expected.items():
        if key.startswith(f"{prefix}/grad_norm/"):
            name = detectron2_to_project_name(key[len(f"{prefix}/grad_norm/") :])
            pairs[name] = (ours.get(name, float("nan")), value.item())
    return pairs


def compare_losses(
    c: Comparison, losses: dict[str, torch.Tensor], expected: dict, prefix: str
) -> torch.Tensor:
    """Every loss against ``{prefix}/losses/*`` and their sum against ``.../total``; returns the
    sum."""
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    for name, value in losses.items():
        if name.startswith("loss"):
            c.relative(f"{name}", value.item(), expected[f"{prefix}/losses/{name}"].item(), LOSSES)
    c.relative("total loss", total.item(), expected[f"{prefix}/losses/total"].item(), LOSSES)
    return total


def compare_mask_logits(c: Comparison, args: tuple, logits: torch.Tensor, expected: dict) -> None:
    """The student's mask logits of the sampled positives, matched to the official ones by
    (image, level, location); the set of sampled positives must be the same."""
    _, instances, _ = args
    ours = {
        key: k
        for k, key in enumerate(
            detection_keys(instances["fpn_levels"], instances["locations"], instances["im_inds"])
        )
    }
    keys = detection_keys(
        expected["c/student/sampled/fpn_levels"],
        expected["c/student/sampled/locations"],
        expected["c/student/sampled/im_inds"],
    )
    same_set = sorted(ours) == sorted(keys)
    c.add("sampled positives (image, level, location)", 0.0 if same_set else 1.0, 0.0, "exact")
    if same_set:
        index = torch.tensor([ours[k] for k in keys], dtype=torch.long)
        c.close(
            "student mask logits", logits[index], expected["c/student/mask_logits"], MASK_LOGITS
        )


def compare_training(fixture: Fixture, legacy: bool) -> list[Row]:
    """(c) one BoxTeacher training forward and backward on the fixture batch, with the
    official assignment (``legacy``) or the corrected one (``c/fixed``)."""
    expected = fixture.expected
    model = fixture.build("MODEL.BOX_TEACHER.LEGACY_ASSIGNMENT", str(legacy))
    model.train()
    name = "c: BoxTeacher training step" + (
        " (official assignment)" if legacy else " (corrected assignment)"
    )
    c = Comparison(name)
    heads: dict[str, list] = {"teacher": [], "student": []}
    teacher_out, labelled, mask_logits = [], [], []
    with contextlib.ExitStack() as stack:
        stack.enter_context(recording(model.teacher, "run_heads", heads["teacher"]))
        stack.enter_context(recording(model.student, "run_heads", heads["student"]))
        stack.enter_context(recording(model.teacher_view, "forward_teacher", teacher_out))
        stack.enter_context(recording(model, "assign", labelled))
        stack.enter_context(recording(model.student, "mask_logits", mask_logits))
        # The official checkpoint counts its training steps in mask_head._iter: the step
        # continues it.
        losses = model(fixture.training_batch(), iteration=int(model.student.mask_head._iter))
    prefix = "c" if legacy else "c/fixed"
    total = compare_losses(c, losses, expected, prefix)
    c.exact("num_pseudo_masks", losses["num_pseudo_masks"], expected[f"{prefix}/num_pseudo_masks"])
    assign = "c/assign_legacy" if legacy else "c/assign_fixed"
    for i, label in enumerate(labelled[0][1]):
        c.close("assignment weights", label["weights"], expected[f"{assign}/img{i}/weight"], SCORES)
    if legacy:
        for who in ("teacher", "student"):
            mask_feats, outputs, top_feats, _ = heads[who][0][1]
            compare_heads(c, f"c/{who}", outputs, mask_feats, top_feats, expected)
        for i, det in enumerate(teacher_out[0][1]):
            p = f"c/teacher/img{i}/det"
            ours = {
                key: k
                for k, key in enumerate(
                    detection_keys(det["fpn_levels"], det["locations"], det["labels"])
                )
            }
            keys = detection_keys(
                expected[f"{p}/fpn_levels"], expected[f"{p}/locations"], expected[f"{p}/classes"]
            )
            same_set = sorted(ours) == sorted(keys)
            c.add(
                "teacher detection set (level, location, class)",
                0.0 if same_set else 1.0,
                0.0,
                "exact",
            )
            if same_set:
                index = torch.tensor([ours[k] for k in keys], dtype=torch.long)
                c.close("teacher boxes (px)", det["boxes"][index], expected[f"{p}/boxes"], BOXES)
                c.close(
                    "teacher fcos_scores",
                    det["fcos_scores"][index],
                    expected[f"{p}/fcos_scores"],
                    SCORES,
                )
                c.close(
                    "teacher ranking scores", det["scores"][index], expected[f"{p}/scores"], SCORES
                )
                c.close(
                    "teacher mask_score",
                    det["mask_scores"][index],
                    expected[f"{p}/mask_score"],
                    SCORES,
                )
                c.masks(
                    "teacher binary masks",
                    det["mask_probs"][index] > model.teacher_view.settings.mask_threshold,
                    expected[f"{p}/masks_packed"],
                    det["mask_probs"].shape[-1],
                )
                check_order(c, "teacher detection order", index, expected[f"{p}/fcos_scores"])
        compare_mask_logits(c, *mask_logits[0], expected)
        for network in ("teacher", "student"):
            branch = getattr(model, network).mask_branch
            for key, value in expected.items():
                if key.startswith(f"c/after/{network}_bn/"):
                    module, stat = key[len(f"c/after/{network}_bn/") :].rsplit("/", 1)
                    c.close(
                        "mask-branch BN statistics after the step",
                        getattr(branch.get_submodule(module), stat),
                        value,
                        FEATURES,
                    )
            c.exact(
                "mask_head._iter after the step",
                getattr(model, network).mask_head._iter,
                expected[f"c/after/{network}_iter"],
            )
    total.backward()
    student = model.student
    norm = (
        torch.stack([p.grad.norm() for p in student.parameters() if p.grad is not None])
        .norm()
        .item()
    )
    c.relative(
        "total gradient norm", norm, expected[f"{prefix}/grad_norm_total"].item(), GRAD_TOTAL
    )
    if legacy:
        for ours, official in official_grad_norms(student, expected, "c").values():
            c.relative("per-parameter gradient norms", ours, official, GRAD_PARAM)
    c.add(
        "teacher parameters without gradient",
        0.0 if all(p.grad is None for p in model.teacher.parameters()) else 1.0,
        0.0,
        "exact",
    )
    return list(c.rows.values())


def compare_adelaidet(fixture: Fixture, boxinst: bool) -> list[Row]:
    """(d) AdelaiDet's BoxInst (``boxinst``) or mask-supervised CondInst losses from the student."""
    expected = fixture.expected
    model = fixture.build(
        "MODEL.META_ARCHITECTURE",
        "CondInst",
        "MODEL.BOXINST.ENABLED",
        str(boxinst),
        network="student.",
    )
    model.train()
    section = "d/boxinst" if boxinst else "d/condinst"
    c = Comparison(f"d: AdelaiDet {'BoxInst' if boxinst else 'CondInst'} losses")
    batch = fixture.training_batch(aug=False, masks=not boxinst)
    total = compare_losses(c, model(batch, iteration=int(model.mask_head._iter)), expected, section)
    total.backward()
    norm = (
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm().item()
    )
    c.relative(
        "total gradient norm", norm, expected[f"{section}/grad_norm_total"].item(), GRAD_TOTAL
    )
    return list(c.rows.values())


def compare_fixture(fixture: Fixture) -> list[Row]:
    return [
        *compare_inference(fixture),
        *compare_training(fixture, legacy=True),
        *compare_training(fixture, legacy=False),
        *compare_adelaidet(fixture, boxinst=True),
        *compare_adelaidet(fixture, boxinst=False),
    ]


def format_table(rows: list[Row]) -> str:
    table = []
    for r in rows:
        diff = (
            "equal"
            if r.kind == "exact" and r.ok
            else f"{r.diff:.3g}" + {"rel": " rel", "pixels": " of pixels"}.get(r.kind, "")
        )
        table.append(
            [
                r.section,
                r.quantity,
                diff,
                "exact" if r.kind == "exact" else f"{r.tolerance:g}",
                "yes" if r.ok else "NO",
            ]
        )
    return tabulate(
        table,
        headers=["section", "quantity", "max difference", "tolerance", "ok"],
        tablefmt="github",
    )
