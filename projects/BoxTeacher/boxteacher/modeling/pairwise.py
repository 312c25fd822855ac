"""BoxInst's pairwise term: for every pixel and each of its dilated neighbours, the negative
log-probability that the two take the same label, weighted and summed per instance.

``pairwise_loss`` computes each unordered pair of neighbours once (half the offsets) with shifted
slices and a hand-written backward, so that neither per-instance copies of the neighbour weights
nor unfolded (K, 8, h, w) tensors are kept for autograd: it stores the logits and recomputes the
rest in the backward pass. ``pairwise_losses`` does so for several weightings of the same
logits at once.
``pairwise_loss_reference`` is the direct ``unfold`` formulation of the original code, used to
check the fast one and by ``tools/benchmark_pairwise.py``.
"""
from __future__ import annotations

import importlib.util
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


def neighbour_offsets(size: int = 3, dilation: int = 2) -> list[tuple[int, int]]:
    """(dy, dx) of the size*size - 1 neighbours of a size x size kernel with the given
    dilation, centre excluded, in raster order (dy first)."""
    if size % 2 != 1:
        raise ValueError(f"The pairwise kernel size must be odd, got {size}")
    steps = [dilation * (i - size // 2) for i in range(size)]
    return [(dy, dx) for dy in steps for dx in steps if (dy, dx) != (0, 0)]


def overlap(h: int, w: int, dy: int, dx: int) -> tuple[slice, slice, slice, slice]:
    """Slices (rows, cols) of the pixels whose neighbour at (dy, dx) is inside an h x w grid,
    and of those neighbours."""
    rows = slice(max(0, -dy), h - max(0, dy))
    cols = slice(max(0, -dx), w - max(0, dx))
    rows_n = slice(rows.start + dy, rows.stop + dy)
    cols_n = slice(cols.start + dx, cols.stop + dx)
    return rows, cols, rows_n, cols_n


class PairWeights(NamedTuple):
    """One weighting of the pairs of K instances (see ``pairwise_loss``): ``pair_weights``
    (M, neighbours, h, w) shared by groups of instances, ``pair_index`` (K,) the row of each
    instance, ``centre_weights`` (K, h, w) the weight of each instance's centre pixels."""

    pair_weights: torch.Tensor
    pair_index: torch.Tensor
    centre_weights: torch.Tensor


class _PairwiseLosses(torch.autograd.Function):
    """The pairwise term over each unordered pair of neighbours once: offsets come in opposite
    pairs (o, -o) (offset n and offset len - 1 - n in ``neighbour_offsets`` order), and the
    pair (p, p + o) of offset o is the pair (p + o, p) of offset -o, with the same likelihood.
    So the likelihood is computed for the second half of the offsets only, on the pixels whose
    neighbour is inside the grid, weighted by the sum of both directions' weights; with several
    weightings it is computed once for all. Only the logits are kept for the backward pass,
    which recomputes the rest, with the weightings summed in the proportions of their
    gradients."""

    @staticmethod
    def forward(ctx, logits, offsets, *weightings):
        weightings = [PairWeights(*weightings[i : i + 3]) for i in range(0, len(weightings), 3)]
        k, h, w = logits.shape
        log_fg, log_bg = F.logsigmoid(logits), F.logsigmoid(-logits)
        loss_sums = [logits.new_zeros(k) for _ in weightings]
        for n, rows, cols, rows_n, cols_n in _pairs(offsets, h, w):
            same = torch.logaddexp(log_fg[:, rows, cols] + log_fg[:, rows_n, cols_n], log_bg[:, rows, cols] + log_bg[:, rows_n, cols_n])
            for sums, weighting in zip(loss_sums, weightings):
                sums -= (same * _both_ways(weighting, n, len(offsets), rows, cols, rows_n, cols_n)).sum(dim=(1, 2))
        weight_sums = [
            (pair_weights.sum(dim=1)[pair_index].to(centre_weights.dtype) * centre_weights).sum(dim=(1, 2))
            for pair_weights, pair_index, centre_weights in weightings
        ]
        ctx.save_for_backward(logits, *[t for weighting in weightings for t in weighting])
        ctx.offsets = offsets
        ctx.mark_non_differentiable(*weight_sums)
        return tuple(t for pair in zip(loss_sums, weight_sums) for t in pair)

    @staticmethod
    def backward(ctx, *grads):
        # d nll(a, b) / d a = (1 - 2 p_b) p_a (1 - p_a) / P(same), evaluated stably as
        # (1 - 2 p_b) exp(log p_a + log(1 - p_a) + nll).
        logits, *flat = ctx.saved_tensors
        weightings = [PairWeights(*flat[i : i + 3]) for i in range(0, len(flat), 3)]
        k, h, w = logits.shape
        log_fg, log_bg = F.logsigmoid(logits), F.logsigmoid(-logits)
        log_variance = log_fg + log_bg
        one_minus_2p = 1.0 - 2.0 * torch.sigmoid(logits)
        grad = torch.zeros_like(logits)
        scales = [g.view(k, 1, 1) if g is not None else None for g in grads[::2]]
        for n, rows, cols, rows_n, cols_n in _pairs(ctx.offsets, h, w):
            weights = sum(
                _both_ways(weighting, n, len(ctx.offsets), rows, cols, rows_n, cols_n) * scale
                for weighting, scale in zip(weightings, scales) if scale is not None
            )
            log_same = torch.logaddexp(log_fg[:, rows, cols] + log_fg[:, rows_n, cols_n], log_bg[:, rows, cols] + log_bg[:, rows_n, cols_n])
            grad[:, rows, cols] += weights * one_minus_2p[:, rows_n, cols_n] * torch.exp(log_variance[:, rows, cols] - log_same)
            grad[:, rows_n, cols_n] += weights * one_minus_2p[:, rows, cols] * torch.exp(log_variance[:, rows_n, cols_n] - log_same)
        return grad, None, *([None] * len(flat))


def _pairs(offsets: list[tuple[int, int]], h: int, w: int):
    """For each offset n of the second half: n and the slices of the pixels whose neighbour at
    it is inside the h x w grid and of those neighbours (see ``overlap``)."""
    for n in range(len(offsets) // 2, len(offsets)):
        yield (n, *overlap(h, w, *offsets[n]))


def _both_ways(weighting: PairWeights, n, num, rows, cols, rows_n, cols_n) -> torch.Tensor:
    """(K, h', w') weight of the pairs (p, p + o_n) on the overlap: p's weight towards its
    neighbour n plus the neighbour's weight towards p (offset num - 1 - n)."""
    pair_weights, pair_index, centre_weights = weighting
    dtype = centre_weights.dtype
    forward = pair_weights[pair_index, n, rows, cols].to(dtype) * centre_weights[:, rows, cols]
    return forward + pair_weights[pair_index, num - 1 - n, rows_n, cols_n].to(dtype) * centre_weights[:, rows_n, cols_n]


def pairwise_loss(
    logits: torch.Tensor,
    pair_weights: torch.Tensor,
    pair_index: torch.Tensor,
    centre_weights: torch.Tensor,
    offsets: list[tuple[int, int]],
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance weighted sums of the same-label negative log-likelihood over pixel pairs.

    Instance k, pixel p and neighbour n (at p + offsets[n]) get the weight
    ``pair_weights[pair_index[k], n, p] * centre_weights[k, p]``. A pair whose neighbour falls
    outside the grid has zero loss and gradient (the original pads the log-probabilities with 0)
    but its weight still counts in the weight sum, as in the original.

    Args:
        logits: (K, 1, h, w) or (K, h, w) mask logits.
        pair_weights: (M, len(offsets), h, w) neighbour weights shared by several instances
            (e.g. per image, M = images, with ``pair_index`` = image of each instance).
        pair_index: (K,) int64 row of ``pair_weights`` of each instance.
        centre_weights: (K, h, w) or (K, 1, h, w) weight of each centre pixel.
        offsets: the (dy, dx) of the neighbours (``neighbour_offsets``).
        kernel: "fused" (the Triton kernels of ``pairwise_triton``), "sliced" (PyTorch
            operators, any device) or "auto": fused on CUDA when Triton is installed.
    Returns:
        (K,) weighted loss sums (differentiable w.r.t. ``logits``) and (K,) weight sums.
    """
    return pairwise_losses(logits, [PairWeights(pair_weights, pair_index, centre_weights)], offsets, kernel)[0]


def pairwise_losses(
    logits: torch.Tensor, weightings: Sequence[PairWeights], offsets: list[tuple[int, int]], kernel: str = "auto"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``pairwise_loss`` of the same logits under several weightings (e.g. BoxInst's colour
    similarities and BoxTeacher's pseudo-mask affinities): the sliced version computes the
    likelihoods, forward and backward, once for all. Returns per weighting the (K,) weighted
    loss sums and (K,) weight sums."""
    if kernel not in ("auto", "fused", "sliced"):
        raise ValueError(f"kernel must be 'auto', 'fused' or 'sliced', got {kernel!r}")
    logits = logits.reshape(logits.shape[0], *logits.shape[-2:])
    weightings = [
        PairWeights(pair_weights, pair_index, centre_weights.reshape(logits.shape).to(logits.dtype))
        for pair_weights, pair_index, centre_weights in weightings
    ]
    if kernel == "fused" or (kernel == "auto" and logits.is_cuda and importlib.util.find_spec("triton")):
        from .pairwise_triton import PairwiseLossTriton

        return [PairwiseLossTriton.apply(logits, *weighting, tuple(offsets)) for weighting in weightings]
    outputs = _PairwiseLosses.apply(logits, tuple(offsets), *[t for weighting in weightings for t in weighting])
    return [(outputs[i], outputs[i + 1]) for i in range(0, len(outputs), 2)]


def unfold_neighbours(x: torch.Tensor, size: int, dilation: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, size*size - 1, h, w): values of the dilated neighbours of every
    pixel (zero outside the grid), centre excluded, in raster order."""
    padding = dilation * (size // 2)
    unfolded = F.unfold(x, kernel_size=size, padding=padding, dilation=dilation)
    unfolded = unfolded.reshape(x.shape[0], x.shape[1], size * size, x.shape[2], x.shape[3])
    centre = size * size // 2
    return torch.cat([unfolded[:, :, :centre], unfolded[:, :, centre + 1 :]], dim=2)


def pairwise_loss_reference(
    logits: torch.Tensor,
    pair_weights: torch.Tensor,
    pair_index: torch.Tensor,
    centre_weights: torch.Tensor,
    size: int = 3,
    dilation: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairwise_loss`` as the original computes it: unfolded log-probabilities padded with 0
    and a per-instance copy of the neighbour weights. Same arguments and results."""
    logits = logits.reshape(logits.shape[0], 1, *logits.shape[-2:])
    log_fg, log_bg = F.logsigmoid(logits), F.logsigmoid(-logits)
    same_fg = log_fg[:, :, None] + unfold_neighbours(log_fg, size, dilation)
    same_bg = log_bg[:, :, None] + unfold_neighbours(log_bg, size, dilation)
    nll = -torch.logsumexp(torch.stack([same_fg, same_bg]), dim=0)[:, 0]  # (K, 8, h, w)
    weights = pair_weights[pair_index].to(logits.dtype) * centre_weights.reshape(logits.shape)
    return (nll * weights).sum(dim=(1, 2, 3)), weights.sum(dim=(1, 2, 3))
