"""The mask-supervision router: instance kinds, routing of criteria to their positives, the share
scaling, loss weights and warm-ups, and the checks of its construction."""

import pytest
import torch

from boxteacher.modeling.criteria import DiceMaskCriterion
from boxteacher.modeling.pairwise import PairWeights
from boxteacher.modeling.supervision import (
    LossWeights,
    MaskSupervision,
    Route,
    SupervisionKind,
    TargetBatch,
)

MASK, BOX, PSEUDO = SupervisionKind.MASK, SupervisionKind.BOX, SupervisionKind.PSEUDO_MASK


class MeanLogit:
    """A toy criterion: the mean logit of the positives it is given, and how many it saw."""

    def __init__(self, name: str, pairwise: bool = False, available: bool = True):
        self.loss_names = (name,)
        self.metric_names = (f"seen_by_{name}",)
        self.pairwise = pairwise
        self.available = available
        self.seen: list[torch.Tensor] = []

    def targets(self, batch):
        return {"images": batch.instance_images()} if self.available else None

    def pair_weights(self, sampled, targets):
        if not self.pairwise:
            return []
        k = sampled["gt_inds"].numel()
        return [
            PairWeights(
                torch.ones(1, 8, 4, 4, dtype=torch.bool),
                torch.zeros(k, dtype=torch.long),
                torch.ones(k, 4, 4),
            )
        ]

    def losses(self, logits, sampled, targets, pair_sums):
        self.seen.append(sampled["gt_inds"].clone())
        assert len(pair_sums) == (1 if self.pairwise else 0)
        return {
            self.loss_names[0]: logits.mean(),
            self.metric_names[0]: torch.tensor(float(logits.shape[0])),
        }


def target_batch(instances):
    inputs = [{"image": torch.zeros(3, 16, 16, dtype=torch.uint8)} for _ in instances]
    return TargetBatch(
        inputs, instances, (16, 16), [(16, 16)] * len(instances), 4, 16, torch.device("cpu")
    )


def instances(has_mask=None, pseudo_weights=None):
    n = len(has_mask if has_mask is not None else pseudo_weights)
    out = {
        "boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]] * n),
        "labels": torch.zeros(n, dtype=torch.long),
    }
    if has_mask is not None:
        out["has_mask"] = torch.tensor(has_mask)
    if pseudo_weights is not None:
        out["pseudo_weights"] = torch.tensor(pseudo_weights)
    return out


def test_instance_kinds_follow_has_mask_and_the_pseudo_weights():
    router = MaskSupervision([], frozenset({MASK, BOX, PSEUDO}))
    batch = target_batch([instances([True, False, False], [1.0, 0.7, 0.0])])
    assert router.instance_kinds(batch).tolist() == [MASK, PSEUDO, BOX]
    only_masks = MaskSupervision([], frozenset({MASK}))
    assert only_masks.instance_kinds(
        target_batch([instances(pseudo_weights=[0.0, 0.0])])
    ).tolist() == [MASK, MASK]


def test_a_criterion_over_part_of_the_positives_sees_them_alone_and_weighs_their_share():
    box, dice, everyone = (
        MeanLogit("loss_box", pairwise=True),
        MeanLogit("loss_dice"),
        MeanLogit("loss_all", pairwise=True),
    )
    router = MaskSupervision(
        [
            Route(box, frozenset({BOX})),
            Route(dice, frozenset({MASK})),
            Route(everyone, frozenset({MASK, BOX})),
        ],
        frozenset({MASK, BOX}),
        pairwise_offsets=[(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2) if (dy, dx) != (0, 0)],
    )
    batch = target_batch(
        [instances([True, False]), instances([False])]
    )  # instances 0 (mask), 1, 2 (box)
    targets = router.targets(batch)
    assert targets["kinds"].tolist() == [MASK, BOX, BOX]
    logits = (
        torch.tensor([1.0, 2.0, 3.0, 4.0])
        .view(4, 1, 1, 1)
        .expand(4, 1, 4, 4)
        .clone()
        .requires_grad_()
    )
    sampled = {"gt_inds": torch.tensor([0, 1, 2, 0]), "im_inds": torch.tensor([0, 0, 1, 0])}
    losses = router.losses(logits, sampled, targets, iteration=0)
    assert (
        box.seen[0].tolist() == [1, 2]
        and dice.seen[0].tolist() == [0, 0]
        and everyone.seen[0].tolist() == [0, 1, 2, 0]
    )
    assert losses["loss_box"].item() == pytest.approx(
        2.5 * 0.5
    )  # mean of its two positives, times 2/4
    assert losses["loss_dice"].item() == pytest.approx(2.5 * 0.5)
    assert losses["loss_all"].item() == pytest.approx(2.5)  # covers every kind: not scaled
    assert losses["seen_by_loss_box"].item() == 2  # metrics are not scaled
    assert (losses["num_gt_masks"].item(), losses["num_box_only"].item()) == (1, 2)
    assert list(losses)[::2] == [
        "loss_box",
        "loss_dice",
        "loss_all",
        "num_gt_masks",
    ]  # the order of the routes


def test_a_criterion_without_positives_gives_connected_zeros_and_one_that_sits_out_gives_nothing():
    dice, pseudo = MeanLogit("loss_dice"), MeanLogit("loss_pseudo", available=False)
    router = MaskSupervision(
        [Route(dice, frozenset({MASK})), Route(pseudo, frozenset({MASK, BOX}))],
        frozenset({MASK, BOX}),
    )
    targets = router.targets(target_batch([instances([False, False])]))
    logits = torch.ones(2, 1, 4, 4, requires_grad=True)
    losses = router.losses(logits, {"gt_inds": torch.tensor([0, 1])}, targets, iteration=0)
    assert losses["loss_dice"].item() == 0.0 and losses["loss_dice"].requires_grad
    assert "loss_pseudo" not in losses and dice.seen == []
    zeros = router.zero_losses(logits.sum() * 0, targets)
    assert set(zeros) == {"loss_dice", "seen_by_loss_dice", "num_gt_masks", "num_box_only"}


def test_weights_and_linear_warm_ups_are_applied_in_one_place():
    weights = LossWeights({"loss_a": 0.5}, {"loss_a": 10, "loss_b": 4})
    value = torch.tensor(2.0)
    assert weights.apply("loss_a", value, iteration=0).item() == pytest.approx(2.0 * 0.5 * 0.1)
    assert weights.apply("loss_a", value, iteration=9).item() == pytest.approx(1.0)
    assert weights.apply("loss_b", value, iteration=100).item() == pytest.approx(2.0)
    assert weights.apply("loss_c", value, iteration=0).item() == 2.0


def test_the_router_rejects_duplicate_loss_names_and_weights_of_unknown_losses():
    with pytest.raises(ValueError, match="same name"):
        MaskSupervision(
            [
                Route(MeanLogit("loss_a"), frozenset({BOX})),
                Route(MeanLogit("loss_a"), frozenset({BOX})),
            ],
            frozenset({BOX}),
        )
    with pytest.raises(ValueError, match="loss_typo"):
        MaskSupervision(
            [Route(MeanLogit("loss_a"), frozenset({BOX}))],
            frozenset({BOX}),
            LossWeights({"loss_typo": 1.0}),
        )


def test_the_dice_of_annotation_masks_sits_out_a_batch_without_masks_only_when_optional():
    """Unlabelled images (pseudo instances, no masks) next to mask-labelled ones: the Dice of
    mixed supervision sits their pass out; CondInst's own Dice needs masks everywhere."""
    unlabeled = target_batch([instances(pseudo_weights=[1.0]), instances(pseudo_weights=[0.5])])
    assert DiceMaskCriterion("loss_gt_mask", optional=True).targets(unlabeled) is None
    with pytest.raises(ValueError, match=r"needs instance 'masks', which images \[0, 1\]"):
        DiceMaskCriterion().targets(unlabeled)
    masked = instances(has_mask=[True])
    masked["masks"] = torch.ones(1, 16, 16, dtype=torch.bool)
    partly = target_batch([masked, instances(pseudo_weights=[1.0])])
    with pytest.raises(ValueError, match=r"which images \[1\]"):
        DiceMaskCriterion("loss_gt_mask", optional=True).targets(partly)
