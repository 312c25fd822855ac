"""Pure loss functions. Shapes are in the docstrings; reductions are explicit."""

from __future__ import annotations

import torch


def dice_loss(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-instance Dice loss ``1 - 2 sum(p t) / (sum p^2 + sum t^2 + eps)``.

    probs, targets: (K, ...) with the same shape. Returns (K,).
    """
    probs = probs.reshape(probs.shape[0], -1)
    targets = targets.reshape(targets.shape[0], -1).to(probs.dtype)
    intersection = (probs * targets).sum(dim=1)
    union = (probs * probs).sum(dim=1) + (targets * targets).sum(dim=1) + eps
    return 1.0 - 2.0 * intersection / union


def masked_dice_loss(
    probs: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """Mean ``dice_loss`` over the ``selected`` (K,) bool rows of probs (K, ...) and targets
    (K, ...) (same number of elements per row); with no row selected, a zero that is still
    connected to ``probs`` (gradient 0)."""
    if not bool(selected.any()):
        return probs.sum() * 0
    return dice_loss(probs[selected], targets[selected]).mean()


def ltrb_iou_and_giou(
    pred: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and generalised IoU of boxes given as (l, t, r, b) distances from a common point.

    FCOS smooths the IoU as (I + 1) / (U + 1) (in stride units), which torchvision's box-corner
    IoU functions do not, so it is computed here.

    pred, target: (P, 4) non-negative distances. Returns (iou, giou), each (P,).
    """
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    inter_w = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    inter_h = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    enclosing_w = torch.maximum(pred[:, 0], target[:, 0]) + torch.maximum(pred[:, 2], target[:, 2])
    enclosing_h = torch.maximum(pred[:, 1], target[:, 1]) + torch.maximum(pred[:, 3], target[:, 3])
    intersection = inter_w * inter_h
    union = pred_area + target_area - intersection
    iou = (intersection + 1.0) / (union + 1.0)
    enclosing = enclosing_w * enclosing_h
    giou = iou - (enclosing - union) / enclosing
    return iou, giou


def iou_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed IoU-family loss of (l, t, r, b) boxes (P, 4): "iou" (-log IoU), "linear_iou"
    (1 - IoU) or "giou" (1 - GIoU), each term optionally weighted by ``weight`` (P,)."""
    iou, giou = ltrb_iou_and_giou(pred, target)
    if loss_type == "iou":
        losses = -torch.log(iou)
    elif loss_type == "linear_iou":
        losses = 1.0 - iou
    elif loss_type == "giou":
        losses = 1.0 - giou
    else:
        raise ValueError(f"Unknown IoU loss '{loss_type}'; expected 'iou', 'linear_iou' or 'giou'.")
    if weight is not None:
        losses = losses * weight
    return losses.sum()


def centerness_targets(reg_targets: torch.Tensor) -> torch.Tensor:
    """FCOS centerness sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) of (P, 4) targets -> (P,)."""
    if reg_targets.numel() == 0:
        return reg_targets.new_zeros(reg_targets.shape[0])
    left_right = reg_targets[:, [0, 2]]
    top_bottom = reg_targets[:, [1, 3]]
    ratio = (left_right.min(dim=1).values / left_right.max(dim=1).values) * (
        top_bottom.min(dim=1).values / top_bottom.max(dim=1).values
    )
    return torch.sqrt(ratio)
