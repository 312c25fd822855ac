"""BoxInst's pairwise term: for every pixel and each of its dilated neighbours, the negative
log-probability that the two take the same label, weighted and summed per instance.

Only the pixels within reach of an instance's non-zero centre weights (its box, in training)
take part: ``pairwise_loss`` stacks those regions of all instances into one canvas, computes each
unordered pair of neighbours once (half the offsets) with shifted slices of it and has a
hand-written backward, so that neither per-instance copies of the neighbour weights nor unfolded
(K, 8, h, w) tensors are kept for autograd: it stores the canvas of logits and recomputes the
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


def support_regions(
    support: torch.Tensor, margin: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """First row, first column, height and width (each (K,) int64) of the bounding box of each
    instance's support (K, h, w) bool, grown by ``margin`` pixels and clipped to the grid; an
    instance without support gets an empty region."""
    h, w = support.shape[1:]

    def extent(mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = mask.to(torch.uint8).argmax(dim=1)
        last = size - 1 - mask.flip(1).to(torch.uint8).argmax(dim=1)
        start = (first - margin).clamp(min=0)
        return start, ((last + margin + 1).clamp(max=size) - start) * mask.any(dim=1)

    top, height = extent(support.any(dim=2), h)
    left, width = extent(support.any(dim=1), w)
    return top, left, height, width


class Canvas(NamedTuple):
    """The regions of K instances on an (h, w) grid stacked row by row into one (R, C) canvas:
    instance k contributes ``height[k]`` rows, each C pixels wide (C the widest region; a
    narrower one is widened inside the grid).

    row_instance, grid_row, first_column: (R,) the instance, grid row and first grid column of
        each canvas row.
    row_in_region, region_height: (R,) the row's position in its region, the region's height.
    columns: C.
    """

    row_instance: torch.Tensor
    grid_row: torch.Tensor
    first_column: torch.Tensor
    row_in_region: torch.Tensor
    region_height: torch.Tensor
    columns: int

    def rows_within(self, dy: int) -> torch.Tensor:
        """(R, 1) whether the pixel dy rows below each row's pixel is in the same region."""
        below = self.row_in_region + dy
        return ((below >= 0) & (below < self.region_height))[:, None]

    def gather(self, maps: torch.Tensor) -> torch.Tensor:
        """(K, h, w) per-instance maps -> (R, C) their canvas."""
        return maps.unfold(2, self.columns, 1)[self.row_instance, self.grid_row, self.first_column]

    def gather_pair_weights(
        self, pair_weights: torch.Tensor, pair_index: torch.Tensor
    ) -> torch.Tensor:
        """(M, neighbours, h, w) weights shared through ``pair_index`` (K,) -> (neighbours, R,
        C)."""
        windows = pair_weights.movedim(1, 0).unfold(3, self.columns, 1)
        return windows[:, pair_index[self.row_instance], self.grid_row, self.first_column]

    def scatter(self, canvas: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(R, C) -> (K, h, w) maps holding the canvas in its regions and zeros elsewhere."""
        k, h, w = shape
        start = (self.row_instance * h + self.grid_row) * w + self.first_column
        maps = canvas.new_zeros(k * h * w)
        maps[(start[:, None] + torch.arange(self.columns, device=start.device)).reshape(-1)] = (
            canvas.reshape(-1)
        )
        return maps.view(shape)


def build_canvas(
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    total_rows: int,
    columns: int,
    width: int,
) -> Canvas:
    """The canvas of the regions (top, left, height: (K,) int64; every region at most
    ``columns`` wide) of K instances on a grid ``width`` wide; ``total_rows`` = height.sum()."""
    device = top.device
    row_instance = torch.repeat_interleave(
        torch.arange(len(top), device=device), height, output_size=total_rows
    )
    row_in_region = (
        torch.arange(total_rows, device=device) - (height.cumsum(0) - height)[row_instance]
    )
    first_column = left.clamp(max=width - columns)[row_instance]
    return Canvas(
        row_instance,
        top[row_instance] + row_in_region,
        first_column,
        row_in_region,
        height[row_instance],
        columns,
    )


class _PairwiseLosses(torch.autograd.Function):
    """The pairwise term on the canvas of the instances' regions (``Canvas``), each unordered
    pair of neighbours once: offsets come in opposite pairs (o, -o) (offset n and offset
    len - 1 - n in ``neighbour_offsets`` order), and the pair (p, p + o) of offset o is the pair
    (p + o, p) of offset -o, with the same likelihood. So the likelihood is computed for the
    second half of the offsets only, on the pixels whose neighbour is in the same region,
    weighted by the sum of both directions' weights; with several weightings it is computed
    once for all. Only the canvas of logits is kept for the backward pass, which recomputes
    the rest, with the weightings summed in the proportions of their gradients."""

    @staticmethod
    def forward(ctx, logits, canvas: Canvas, offsets, *weightings):
        weightings = [PairWeights(*weightings[i : i + 3]) for i in range(0, len(weightings), 3)]
        values = canvas.gather(logits)
        log_fg, log_bg = _log_probabilities(values)
        directed, row_weight_sums = zip(
            *[_directed_weights(w, canvas, offsets) for w in weightings]
        )
        row_losses = [values.new_zeros(values.shape[0]) for _ in weightings]
        for n, rows, cols, rows_n, cols_n in _pairs(offsets, *values.shape):
            same = torch.logaddexp(
                log_fg[rows, cols] + log_fg[rows_n, cols_n],
                log_bg[rows, cols] + log_bg[rows_n, cols_n],
            )
            for losses, weights in zip(row_losses, directed):
                losses[rows] -= (same * _both_ways(weights, n, rows, cols, rows_n, cols_n)).sum(
                    dim=1
                )
        k = logits.shape[0]
        loss_sums = [
            values.new_zeros(k).index_add_(0, canvas.row_instance, losses) for losses in row_losses
        ]
        weight_sums = [
            values.new_zeros(k).index_add_(0, canvas.row_instance, sums) for sums in row_weight_sums
        ]
        ctx.save_for_backward(values, *[t for weighting in weightings for t in weighting])
        ctx.canvas, ctx.offsets, ctx.logits_shape = canvas, offsets, logits.shape
        ctx.mark_non_differentiable(*weight_sums)
        return tuple(t for pair in zip(loss_sums, weight_sums) for t in pair)

    @staticmethod
    def backward(ctx, *grads):
        # d nll(a, b) / d a = (1 - 2 p_b) p_a (1 - p_a) / P(same), evaluated stably as
        # (1 - 2 p_b) exp(log p_a + log(1 - p_a) + nll).
        values, *saved = ctx.saved_tensors
        weightings = [PairWeights(*saved[i : i + 3]) for i in range(0, len(saved), 3)]
        canvas, offsets = ctx.canvas, ctx.offsets
        weights = None
        for weighting, g in zip(weightings, grads[::2]):
            if g is not None:
                scaled = _directed_weights(
                    weighting, canvas, offsets, g[canvas.row_instance][:, None]
                )[0]
                weights = scaled if weights is None else weights.add_(scaled)
        log_fg, log_bg = _log_probabilities(values)
        log_variance = log_fg + log_bg
        one_minus_2p = 1.0 - 2.0 * torch.exp(log_fg)
        grad = torch.zeros_like(values)
        for n, rows, cols, rows_n, cols_n in _pairs(offsets, *values.shape):
            pair = _both_ways(weights, n, rows, cols, rows_n, cols_n)
            log_same = torch.logaddexp(
                log_fg[rows, cols] + log_fg[rows_n, cols_n],
                log_bg[rows, cols] + log_bg[rows_n, cols_n],
            )
            grad[rows, cols] += (
                pair * one_minus_2p[rows_n, cols_n] * torch.exp(log_variance[rows, cols] - log_same)
            )
            grad[rows_n, cols_n] += (
                pair * one_minus_2p[rows, cols] * torch.exp(log_variance[rows_n, cols_n] - log_same)
            )
        return canvas.scatter(grad, ctx.logits_shape), None, None, *([None] * len(saved))


def _log_probabilities(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log sigmoid(x) and log sigmoid(-x) = log sigmoid(x) - x."""
    log_fg = F.logsigmoid(logits)
    return log_fg, log_fg - logits


def _directed_weights(
    weighting: PairWeights,
    canvas: Canvas,
    offsets: tuple[tuple[int, int], ...],
    row_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight of every canvas pixel towards each neighbour,
    ``pair_weights[pair_index[k], n, p] * centre_weights[k, p]`` (times ``row_scales`` (R, 1)),
    (neighbours, R, C), zero where the neighbour is outside the pixel's region; and each row's
    sum of the weights (R,), counting those of neighbours outside the grid (as the original
    does). The pair weights are in the dtype of the centre weights."""
    pair_weights, pair_index, centre_weights = weighting
    centre = canvas.gather(centre_weights)
    if row_scales is not None:
        centre = centre * row_scales
    weights = canvas.gather_pair_weights(pair_weights, pair_index).mul_(centre)
    row_sums = weights.sum(dim=(0, 2))
    within = torch.stack([canvas.rows_within(dy) for dy, _ in offsets])
    return weights.mul_(within), row_sums


def _pairs(offsets: tuple[tuple[int, int], ...], h: int, w: int):
    """For each offset n of the second half: n and the slices of the pixels whose neighbour at
    it is inside the h x w grid and of those neighbours (see ``overlap``)."""
    for n in range(len(offsets) // 2, len(offsets)):
        yield (n, *overlap(h, w, *offsets[n]))


def _both_ways(weights: torch.Tensor, n, rows, cols, rows_n, cols_n) -> torch.Tensor:
    """(h', w') weight of the pairs (p, p + o_n) on the overlap, from the directed weights
    (neighbours, h, w): p's towards its neighbour n plus the neighbour's towards p (offset
    len - 1 - n)."""
    return weights[n, rows, cols] + weights[len(weights) - 1 - n, rows_n, cols_n]


def _pack(
    logits: torch.Tensor, weightings: list[PairWeights], offsets: tuple[tuple[int, int], ...]
):
    """The canvas of the pixels within reach of the instances' non-zero centre weights (their
    bounding boxes grown by the largest offset), stacked by rows, or by columns (everything
    transposed) when that makes it smaller. Every pair with an end where a centre weight is
    non-zero has both ends in one region, or one outside the grid. One host synchronisation.
    Returns the canvas and the (possibly transposed) logits, weightings and offsets."""
    support = torch.stack([weighting.centre_weights != 0 for weighting in weightings]).any(dim=0)
    margin = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    top, left, height, width = support_regions(support, margin)
    rows, columns, transposed_rows, transposed_columns = torch.stack(
        [height.sum(), width.amax(), width.sum(), height.amax()]
    ).tolist()
    if transposed_rows * transposed_columns < rows * columns:
        logits = logits.transpose(1, 2)
        weightings = [
            PairWeights(p.transpose(-1, -2), i, c.transpose(1, 2)) for p, i, c in weightings
        ]
        offsets = tuple((dx, dy) for dy, dx in offsets)
        top, left, height, rows, columns = left, top, width, transposed_rows, transposed_columns
    canvas = build_canvas(top, left, height, rows, columns, logits.shape[2])
    return canvas, logits, weightings, offsets


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
        kernel: "fused" (the Triton kernels of ``pairwise_triton``), "packed" (PyTorch
            operators on the pixels within reach of each instance's non-zero centre weights,
            any device) or "auto": fused on CUDA when Triton is installed.
    Returns:
        (K,) weighted loss sums (differentiable w.r.t. ``logits``) and (K,) weight sums.
    """
    return pairwise_losses(
        logits, [PairWeights(pair_weights, pair_index, centre_weights)], offsets, kernel
    )[0]


def pairwise_losses(
    logits: torch.Tensor,
    weightings: Sequence[PairWeights],
    offsets: list[tuple[int, int]],
    kernel: str = "auto",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``pairwise_loss`` of the same logits under several weightings (e.g. BoxInst's colour
    similarities and BoxTeacher's pseudo-mask affinities): the packed version computes the
    likelihoods, forward and backward, once for all. Returns per weighting the (K,) weighted
    loss sums and (K,) weight sums."""
    if kernel not in ("auto", "fused", "packed"):
        raise ValueError(f"kernel must be 'auto', 'fused' or 'packed', got {kernel!r}")
    logits = logits.reshape(logits.shape[0], *logits.shape[-2:])
    weightings = [
        PairWeights(pair_weights, pair_index, centre_weights.reshape(logits.shape).to(logits.dtype))
        for pair_weights, pair_index, centre_weights in weightings
    ]
    if kernel == "fused" or (
        kernel == "auto" and logits.is_cuda and importlib.util.find_spec("triton")
    ):
        from .pairwise_triton import PairwiseLossTriton

        return [
            PairwiseLossTriton.apply(logits, *weighting, tuple(offsets)) for weighting in weightings
        ]
    if logits.shape[0] == 0:
        return [(logits.sum(dim=(1, 2)), logits.new_zeros(0)) for _ in weightings]
    # Converted before they are gathered: from bool, a conversion costs several float operations.
    weightings = [PairWeights(p.to(logits.dtype), i, c) for p, i, c in weightings]
    canvas, logits, weightings, offsets = _pack(logits, weightings, tuple(offsets))
    outputs = _PairwiseLosses.apply(
        logits, canvas, offsets, *[t for weighting in weightings for t in weighting]
    )
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
