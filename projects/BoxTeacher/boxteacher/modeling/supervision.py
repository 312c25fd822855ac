"""How CondInst's mask head is supervised: per-instance supervision kinds, the criteria that turn
a kind of label into losses, and the router that applies each criterion to its instances.

A criterion (``MaskCriterion``) builds its targets for the whole batch before the network runs
(as mmdetection's BoxInst data preprocessor does) and returns its losses unweighted;
``MaskSupervision`` applies each criterion to the sampled positives of the instances it supervises,
scales a criterion that sees only some of the positives by their share of them, and applies the
loss weights and warm-ups (one weight dictionary, as Mask2Former's criterion does).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch

from .boxinst import box_masks_at_stride, valid_pixels_at_stride
from .layers import group_indices
from .pairwise import PairWeights, pairwise_losses


class SupervisionKind(enum.IntEnum):
    """How one instance is supervised."""

    MASK = 0  # an annotation mask
    BOX = 1  # its box alone
    PSEUDO_MASK = 2  # its box and a teacher's pseudo mask of weight > 0


@dataclass
class TargetBatch:
    """What criteria build their targets from, with the maps several of them share computed once.

    inputs: the samples (the clean view ``image`` uint8 (3, h_i, w_i), ``height``...);
    instances: per image the instances on the device (``boxes`` (N_i, 4), ``labels``, and as
        the data provides them ``masks`` (N_i, h_i, w_i), ``has_mask``, ``pseudo_masks``,
        ``pseudo_weights``);
    padded_size: (H, W) of the network input batch; image_sizes: the unpadded (h_i, w_i);
    stride: the mask output stride s; size_divisibility: of the network input batch.
    Maps "at stride s" sample the padded frame at pixel (s*i + s//2, s*j + s//2).
    """

    inputs: list[dict]
    instances: list[dict[str, torch.Tensor]]
    padded_size: tuple[int, int]
    image_sizes: list[tuple[int, int]]
    stride: int
    size_divisibility: int
    device: torch.device
    _valid: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @cached_property
    def box_masks(self) -> torch.Tensor:
        """(N_total, H/s, W/s) float box masks of all instances (``box_masks_at_stride``)."""
        return torch.cat(
            [box_masks_at_stride(g["boxes"], self.padded_size, self.stride) for g in self.instances]
        )

    def valid_pixels(self, bottom_pixels_removed: int) -> torch.Tensor:
        """(B, H/s, W/s) float: each image's unpadded area without its bottom rows
        (``valid_pixels_at_stride``)."""
        if bottom_pixels_removed not in self._valid:
            heights = [
                int(x.get("height", size[0])) for x, size in zip(self.inputs, self.image_sizes)
            ]
            self._valid[bottom_pixels_removed] = valid_pixels_at_stride(
                self.image_sizes,
                heights,
                self.padded_size,
                self.stride,
                bottom_pixels_removed,
                self.device,
            )
        return self._valid[bottom_pixels_removed]

    def masks_at_stride(self, key: str) -> torch.Tensor:
        """The instances' full-resolution masks ``key`` ((N_i, h_i, w_i) bool or float) of all
        images as (N_total, H/s, W/s) float, zero on the padding."""
        s = self.stride
        out = []
        for g in self.instances:
            sampled = g[key][:, s // 2 :: s, s // 2 :: s].float()
            padded = sampled.new_zeros(
                (sampled.shape[0], self.padded_size[0] // s, self.padded_size[1] // s)
            )
            padded[:, : sampled.shape[1], : sampled.shape[2]] = sampled
            out.append(padded)
        return torch.cat(out)

    def instance_images(self) -> torch.Tensor:
        """(N_total,) int64: the image of every instance."""
        return group_indices([g["boxes"].shape[0] for g in self.instances]).to(self.device)


class MaskCriterion(Protocol):
    """One kind of mask supervision.

    ``loss_names``: the losses ``losses`` returns (unweighted); ``metric_names``: the metrics it
    returns besides them (logged, not summed; 0 in a batch without positives).
    """

    loss_names: tuple[str, ...]
    metric_names: tuple[str, ...]

    def targets(self, batch: TargetBatch) -> dict | None:
        """Its targets for the whole batch, or None when the batch does not carry its labels
        (the criterion then sits the batch out)."""

    def pair_weights(self, sampled: dict[str, torch.Tensor], targets: dict) -> list[PairWeights]:
        """The weightings of the pairwise term its losses need for K sampled positives (often
        none): the router computes all weightings of the same positives in one pass."""

    def losses(
        self,
        logits: torch.Tensor,
        sampled: dict[str, torch.Tensor],
        targets: dict,
        pair_sums: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Unweighted losses (and metrics) of K > 0 positives' mask logits (K, 1, H/s, W/s);
        ``pair_sums``: the (K,) loss and weight sums of each of its ``pair_weights``."""


@dataclass(frozen=True)
class Route:
    """A criterion and the kinds of instances it supervises."""

    criterion: MaskCriterion
    kinds: frozenset[SupervisionKind]


@dataclass(frozen=True)
class LossWeights:
    """Every mask loss's weight (default 1) and linear warm-up: a loss named in ``warmup_iters``
    is scaled by min((t + 1) / W, 1) at training iteration t (0-based)."""

    weights: dict[str, float] = field(default_factory=dict)
    warmup_iters: dict[str, int] = field(default_factory=dict)

    def apply(self, name: str, value: torch.Tensor, iteration: int) -> torch.Tensor:
        if name in self.weights:
            value = value * self.weights[name]
        if name in self.warmup_iters:
            value = value * min((iteration + 1) / self.warmup_iters[name], 1.0)
        return value


COUNT_NAMES = {
    SupervisionKind.MASK: "num_gt_masks",
    SupervisionKind.BOX: "num_box_only",
    SupervisionKind.PSEUDO_MASK: "num_teacher_masks",
}


class MaskSupervision:
    """Routes the mask losses: each criterion sees the sampled positives of the instances of its
    kinds. A criterion whose kinds cover every kind the data can hold (``kinds``) sees all the
    positives (no selection, no host synchronisation); one that covers some of them sees those
    positives only and its losses are scaled by their share of the K positives, so that every
    positive weighs in a mixed batch what it weighs in its pure method (with every positive
    masked, the Dice term is CondInst's; with none, the box terms are BoxInst's), and a criterion
    without positives gives zeros still connected to the logits. Criteria over the same positives
    share one pass of the pairwise term.

    When the data mixes annotation masks with other kinds, the metrics ``num_gt_masks``,
    ``num_box_only`` and ``num_teacher_masks`` count the batch's instances of each kind.

    Args:
        routes: the criteria and their kinds, in the order of their losses.
        kinds: the kinds the instances can be; an instance is MASK where ``has_mask`` says so,
            else PSEUDO_MASK where its ``pseudo_weights`` > 0 (when that kind is possible), else
            BOX; without ``has_mask`` and with a single kind, every instance is of it.
        weights: the weights and warm-ups of the losses.
        pairwise_offsets: the neighbours of the pairwise term.
    """

    def __init__(
        self,
        routes: list[Route],
        kinds: frozenset[SupervisionKind],
        weights: LossWeights = LossWeights(),
        pairwise_offsets: list[tuple[int, int]] | None = None,
    ):
        names = [n for r in routes for n in r.criterion.loss_names + r.criterion.metric_names]
        if len(set(names)) != len(names):
            raise ValueError(f"Two criteria return losses of the same name: {names}")
        unknown = sorted((set(weights.weights) | set(weights.warmup_iters)) - set(names))
        if unknown:
            raise ValueError(f"Weights or warm-ups for losses no criterion returns: {unknown}")
        self.routes = list(routes)
        self.kinds = frozenset(kinds)
        self.weights = weights
        self.pairwise_offsets = pairwise_offsets
        self.counts_kinds = SupervisionKind.MASK in self.kinds and len(self.kinds) > 1

    def targets(self, batch: TargetBatch) -> dict:
        """The targets of every criterion (None for one that sits the batch out) and, when some
        criterion covers some kinds only, the kind of every instance (``kinds`` (N_total,))."""
        targets = [r.criterion.targets(batch) for r in self.routes]
        out: dict = {"criteria": targets}
        if self.counts_kinds or any(not self._covers_all(r) for r in self.routes):
            out["kinds"] = self.instance_kinds(batch)
        return out

    def instance_kinds(self, batch: TargetBatch) -> torch.Tensor:
        """(N_total,) int64 ``SupervisionKind`` of every instance of the batch."""
        default = (
            SupervisionKind.MASK if self.kinds == {SupervisionKind.MASK} else SupervisionKind.BOX
        )
        parts = []
        for g in batch.instances:
            kind = torch.full(
                (g["boxes"].shape[0],), int(default), dtype=torch.int64, device=batch.device
            )
            if SupervisionKind.PSEUDO_MASK in self.kinds and "pseudo_weights" in g:
                kind = torch.where(g["pseudo_weights"] > 0, int(SupervisionKind.PSEUDO_MASK), kind)
            if "has_mask" in g:
                kind = torch.where(g["has_mask"], int(SupervisionKind.MASK), kind)
            parts.append(kind)
        return torch.cat(parts)

    def _covers_all(self, route: Route) -> bool:
        return self.kinds <= route.kinds

    def active_routes(self, targets: dict) -> list[tuple[Route, dict]]:
        return [(r, t) for r, t in zip(self.routes, targets["criteria"]) if t is not None]

    def zero_losses(self, zero: torch.Tensor, targets: dict) -> dict[str, torch.Tensor]:
        """The losses of a batch without positives: ``zero`` (connected to the network) for every
        loss, a detached zero for every metric; plus the kind counts."""
        losses: dict[str, torch.Tensor] = {}
        for route, _ in self.active_routes(targets):
            losses.update({name: zero.clone() for name in route.criterion.loss_names})
            losses.update({name: zero.detach() for name in route.criterion.metric_names})
        return losses | self.kind_counts(targets)

    def losses(
        self, logits: torch.Tensor, sampled: dict[str, torch.Tensor], targets: dict, iteration: int
    ) -> dict[str, torch.Tensor]:
        """The weighted mask losses of K > 0 sampled positives' logits (K, 1, H/s, W/s) at
        training iteration ``iteration``, plus the metrics."""
        routes = self.active_routes(targets)
        groups: dict[frozenset, list[tuple[Route, dict]]] = {}
        for route, route_targets in routes:
            key = frozenset() if self._covers_all(route) else route.kinds
            groups.setdefault(key, []).append((route, route_targets))
        raw: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor | None]] = {}
        for key, members in groups.items():
            raw.update(self._group_losses(key, members, logits, sampled, targets))
        losses: dict[str, torch.Tensor] = {}
        for route, _ in routes:
            values, share = raw[id(route)]
            for name, value in values.items():
                if name in route.criterion.metric_names:
                    losses[name] = value
                    continue
                value = self.weights.apply(name, value, iteration)
                losses[name] = value if share is None else value * share
        return losses | self.kind_counts(targets)

    def _group_losses(
        self,
        kinds: frozenset,
        members: list[tuple[Route, dict]],
        logits: torch.Tensor,
        sampled: dict[str, torch.Tensor],
        targets: dict,
    ) -> dict[int, tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        """The unweighted losses of the routes of one group of positives (all of them when
        ``kinds`` is empty, else those of instances of ``kinds``), keyed by ``id(route)``, each
        with the share of the positives the group holds (None for all of them)."""
        share = None
        if kinds:
            selected = torch.isin(
                targets["kinds"][sampled["gt_inds"]],
                torch.tensor(sorted(kinds), device=logits.device),
            )
            share = selected.to(logits.dtype).mean()
            index = torch.nonzero(selected)[:, 0]  # one host synchronisation per group
            if index.numel() == 0:
                zero = logits.sum() * 0
                return {
                    id(r): (
                        {n: zero for n in r.criterion.loss_names}
                        | {n: zero.detach() for n in r.criterion.metric_names},
                        None,
                    )
                    for r, _ in members
                }
            if index.numel() < selected.numel():
                logits = logits[index]
                sampled = {k: v[index] for k, v in sampled.items()}
        weightings = [r.criterion.pair_weights(sampled, t) for r, t in members]
        flat = [w for ws in weightings for w in ws]
        sums = pairwise_losses(logits, flat, self.pairwise_offsets) if flat else []
        out, start = {}, 0
        for (route, route_targets), ws in zip(members, weightings):
            values = route.criterion.losses(
                logits, sampled, route_targets, sums[start : start + len(ws)]
            )
            start += len(ws)
            out[id(route)] = (values, share)
        return out

    def kind_counts(self, targets: dict) -> dict[str, torch.Tensor]:
        """The number of the batch's instances of each possible kind, when the data mixes
        annotation masks with other kinds; none otherwise."""
        if not self.counts_kinds:
            return {}
        kinds = targets["kinds"]
        return {COUNT_NAMES[k]: (kinds == int(k)).sum().float() for k in sorted(self.kinds)}
