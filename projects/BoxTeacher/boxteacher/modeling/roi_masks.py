"""Masks in the frame of regions of interest (RoIs): how a Mask R-CNN's (S, S) mask logits of a
box learn from annotation masks, pseudo masks and boxes, and how they are pasted into an image.

A RoI's cell (i, j) covers the image point (x0 + (j + 0.5) w / S, y0 + (i + 0.5) h / S) of its
box (x0, y0, x0 + w, y0 + h). The targets are sampled on that grid: masks with ``roi_align``
(as torchvision's ``maskrcnn_loss`` does), boxes by which cell centres they contain, colours
averaged over each cell. BoxInst's projection and colour-pairwise terms and BoxTeacher's
affinity term then apply on the grid unchanged (``boxinst.py``, ``criteria.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .boxinst import color_similarity, projection_loss, rgb_to_lab
from .criteria import pseudo_mask_affinity
from .pairwise import PairWeights, pairwise_losses
from .supervision import LossWeights


def cell_centres(rois: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image coordinates of the cell centres of (K, 4) XYXY RoIs on an (size, size) grid:
    ys (K, size) and xs (K, size)."""
    steps = (torch.arange(size, device=rois.device, dtype=rois.dtype) + 0.5) / size
    xs = rois[:, 0:1] + steps[None] * (rois[:, 2:3] - rois[:, 0:1])
    ys = rois[:, 1:2] + steps[None] * (rois[:, 3:4] - rois[:, 1:2])
    return ys, xs


def box_masks_in_rois(rois: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(K, size, size) float: 1 where the cell centre of RoI k lies inside box k (both (K, 4))."""
    ys, xs = cell_centres(rois, size)
    rows = (ys >= boxes[:, 1:2]) & (ys <= boxes[:, 3:4])
    cols = (xs >= boxes[:, 0:1]) & (xs <= boxes[:, 2:3])
    return (rows[:, :, None] & cols[:, None, :]).to(rois.dtype)


def masks_in_rois(
    masks: list[torch.Tensor],
    rois: torch.Tensor,
    im_inds: torch.Tensor,
    gt_inds: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """The masks of the RoIs' instances on their grids (torchvision's ``project_masks_on_boxes``).

    masks: per image the instances' masks (N_i, h_i, w_i) (bool or float); rois (K, 4) XYXY;
    im_inds (K,) the image and gt_inds (K,) the instance (within its image) of every RoI, both
    on the host. Returns (K, size, size) float, fractional at the mask's edges."""
    out = rois.new_zeros((rois.shape[0], size, size))
    for image, image_masks in enumerate(masks):
        index = torch.nonzero(im_inds == image)[:, 0]
        if index.numel():
            boxes = torch.cat([gt_inds[index, None].to(rois), rois[index.to(rois.device)]], dim=1)
            out[index.to(rois.device)] = roi_align(
                image_masks[:, None].to(rois.dtype), boxes, (size, size), 1.0
            )[:, 0]
    return out


def colours_in_rois(
    images: list[torch.Tensor],
    rois: torch.Tensor,
    im_inds: torch.Tensor,
    size: int,
    rgb_channels: list[int],
) -> torch.Tensor:
    """The CIE LAB colour of every cell (its RGB averaged over the cell first, as BoxInst
    averages each stride x stride block): images per image (3, h_i, w_i) uint8; rois (K, 4);
    im_inds (K,) on the host. Returns (K, 3, size, size)."""
    out = rois.new_zeros((rois.shape[0], 3, size, size))
    for image, pixels in enumerate(images):
        index = torch.nonzero(im_inds == image)[:, 0]
        if index.numel():
            boxes = torch.cat(
                [rois.new_zeros((index.numel(), 1)), rois[index.to(rois.device)]], dim=1
            )
            rgb = pixels[rgb_channels].to(rois.device, rois.dtype)[None]
            out[index.to(rois.device)] = roi_align(rgb, boxes, (size, size), 1.0, aligned=True)
    return rgb_to_lab(out)


def paste_weights(
    boxes: torch.Tensor, size: int, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear weights that paste (M, size, size) RoI maps of (M, 4) XYXY ``boxes`` into an
    ``image_size`` (h, w) image: rows (M, h, size) and columns (M, size, w); ``rows[m] @ map[m]
    @ cols[m]`` is map m interpolated at every pixel centre, zero beyond one cell outside its box
    (the map fades to zero across its border, as torchvision's pasting of a zero-padded mask)."""

    def axis(low: torch.Tensor, high: torch.Tensor, length: int) -> torch.Tensor:
        centres = torch.arange(length, device=boxes.device, dtype=boxes.dtype) + 0.5
        cell = (centres[None] - low[:, None]) / (high - low).clamp(min=1e-6)[:, None] * size - 0.5
        taps = torch.arange(size, device=boxes.device, dtype=boxes.dtype)
        return (1 - (cell[:, :, None] - taps[None, None]).abs()).clamp(min=0)

    rows = axis(boxes[:, 1], boxes[:, 3], image_size[0])
    cols = axis(boxes[:, 0], boxes[:, 2], image_size[1]).transpose(1, 2)
    return rows, cols


def paste_roi_maps(
    maps: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]
) -> torch.Tensor:
    """(M, S, S) RoI maps (e.g. mask probabilities) of (M, 4) boxes -> (M, h, w) at
    ``image_size`` (see ``paste_weights``): two batched matrix products."""
    rows, cols = paste_weights(boxes, maps.shape[-1], image_size)
    return torch.bmm(rows, torch.bmm(maps, cols))


@dataclass(frozen=True)
class RoIMaskSupervision:
    """How a Mask R-CNN's mask head learns, on the grids of its positive RoIs (a RoI is positive
    when it overlaps an instance enough; its logits are those of the instance's class).

    ``loss_mask``: Mask R-CNN's per-cell binary cross-entropy with the instance's mask on the
    grid, averaged per RoI, weighted per RoI by the instance's mask weight and divided by the
    number of RoIs of weight > 0. With ``mask_key`` "masks" the weight is 1 (0 for an instance
    without ``has_mask``): with every instance masked this is torchvision's ``maskrcnn_loss``.
    With "pseudo_masks" the targets are the teacher's pseudo masks inside the box, weighted by
    ``pseudo_weights`` (BoxTeacher's noise-aware weighting; weight 0, no pseudo mask, no loss).
    ``loss_mask_affinity`` (with pseudo masks and ``affinity_threshold``): BoxTeacher's
    affinity term, the pairwise term on the cell pairs the smoothed pseudo mask puts on one side.
    ``loss_prj``, ``loss_pairwise`` (``box_terms``): BoxInst's projection and colour-pairwise
    terms on every positive RoI, with the instance's box and the clean view's colours on the
    grid; they teach masks from boxes alone (and a teacher that starts from nothing).

    Args:
        mask_key: "masks", "pseudo_masks" or None (no mask targets).
        box_terms: add BoxInst's terms.
        pairwise_offsets: the neighbours (in cells) of the pairwise and affinity terms.
        pairwise_color_thresh: cells of at least this LAB similarity must share a label.
        affinity_threshold: pseudo-mask affinity of pairs that must share a label (None: no
            affinity term).
        input_format: channel order of ``image`` ("BGR" or "RGB").
        weights: the loss weights and warm-ups.
    """

    mask_key: str | None = "masks"
    box_terms: bool = False
    pairwise_offsets: tuple[tuple[int, int], ...] = ()
    pairwise_color_thresh: float = 0.3
    affinity_threshold: float | None = None
    input_format: str = "BGR"
    weights: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self):
        if self.mask_key not in ("masks", "pseudo_masks", None):
            raise ValueError(
                f"mask_key must be 'masks', 'pseudo_masks' or None, got {self.mask_key!r}"
            )
        if self.mask_key is None and not self.box_terms:
            raise ValueError("A Mask R-CNN mask head needs mask targets or the box terms.")
        if (self.box_terms or self.affinity_threshold is not None) and not self.pairwise_offsets:
            raise ValueError("The pairwise and affinity terms need pairwise_offsets.")

    @property
    def loss_names(self) -> tuple[str, ...]:
        names = ("loss_mask",) if self.mask_key else ()
        if self.mask_key == "pseudo_masks" and self.affinity_threshold is not None:
            names += ("loss_mask_affinity",)
        return names + (("loss_prj", "loss_pairwise") if self.box_terms else ())

    def losses(
        self,
        logits: torch.Tensor,
        rois: torch.Tensor,
        im_inds: list[int],
        gt_inds: torch.Tensor,
        instances: list[dict[str, torch.Tensor]],
        images: list[torch.Tensor],
        iteration: int,
    ) -> dict[str, torch.Tensor]:
        """The weighted mask losses of K positive RoIs.

        logits: (K, S, S) of the instances' classes; rois: (K, 4) XYXY in the network input
        frame; im_inds: the image of each RoI (K ints); gt_inds: (K,) int64 the instance of each
        RoI within its image; instances: per image (``boxes`` (N_i, 4), and the ``mask_key``
        masks (N_i, h_i, w_i) with ``pseudo_weights`` or ``has_mask``); images: per image the
        clean view (3, h_i, w_i) uint8 (for the colours). A batch without positives gives zeros
        connected to the logits."""
        if logits.shape[0] == 0:
            zero = logits.sum() * 0
            return {name: zero for name in self.loss_names}
        size = logits.shape[-1]
        im_inds_host = torch.tensor(im_inds, dtype=torch.int64)
        starts = torch.tensor([0] + [g["boxes"].shape[0] for g in instances]).cumsum(0)[:-1]
        flat = (starts[im_inds_host] + gt_inds.cpu()).to(logits.device)
        boxes = torch.cat([g["boxes"] for g in instances])[flat].to(rois)
        box_masks = box_masks_in_rois(rois, boxes, size)
        losses: dict[str, torch.Tensor] = {}
        every = torch.arange(logits.shape[0], device=logits.device)
        if self.mask_key is not None:
            targets = masks_in_rois(
                [g[self.mask_key] for g in instances], rois, im_inds_host, gt_inds.cpu(), size
            )
            weights = self._mask_weights(instances)[flat].to(logits.dtype)
            if self.mask_key == "pseudo_masks":
                targets = targets * box_masks
            count = (weights > 0).sum().to(logits.dtype).clamp(min=1.0)
            per_roi = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(
                dim=(1, 2)
            )
            losses["loss_mask"] = (weights * per_roi).sum() / count
            if "loss_mask_affinity" in self.loss_names:
                affinity = pseudo_mask_affinity(
                    targets,
                    torch.ones_like(targets),
                    list(self.pairwise_offsets),
                    self.affinity_threshold,
                )
                sums, pairs = pairwise_losses(
                    logits, [PairWeights(affinity, every, box_masks)], list(self.pairwise_offsets)
                )[0]
                losses["loss_mask_affinity"] = (weights * sums / pairs.clamp(min=1.0)).sum() / count
        if self.box_terms:
            rgb = [2, 1, 0] if self.input_format == "BGR" else [0, 1, 2]
            lab = colours_in_rois(images, rois, im_inds_host, size, rgb)
            similar = (
                color_similarity(lab, torch.ones_like(box_masks), list(self.pairwise_offsets))
                >= self.pairwise_color_thresh
            )
            sums, pairs = pairwise_losses(
                logits, [PairWeights(similar, every, box_masks)], list(self.pairwise_offsets)
            )[0]
            losses["loss_prj"] = projection_loss(logits.sigmoid()[:, None], box_masks[:, None])
            losses["loss_pairwise"] = sums.sum() / pairs.sum().clamp(min=1.0)
        return {name: self.weights.apply(name, value, iteration) for name, value in losses.items()}

    def _mask_weights(self, instances: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """(N_total,) the mask weight of every instance of the batch."""
        if self.mask_key == "pseudo_masks":
            return torch.cat([g["pseudo_weights"] for g in instances])
        return torch.cat(
            [
                g["has_mask"].float()
                if "has_mask" in g
                else torch.ones(g["boxes"].shape[0], device=g["boxes"].device)
                for g in instances
            ]
        )
