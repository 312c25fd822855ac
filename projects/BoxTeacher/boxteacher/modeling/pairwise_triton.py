"""BoxInst's pairwise term as two fused Triton kernels (forward; backward), for CUDA.

At the sizes of a training step the packed PyTorch version (``pairwise.py``) is a few hundred
small kernels, and a GPU waits on their launches. Here one kernel computes, for a block of pixels
of one instance, every neighbour's negative log-likelihood and weight and adds the instance's
sums atomically; the backward kernel gathers each pixel's gradient from the pairs in which it is
the centre and those in which it is the neighbour (no atomics). Nothing but the inputs is kept.
The atomic sums make the loss sums (not the gradients) vary in their last bits from run to run.

The kernels follow ``pairwise.pairwise_loss`` exactly (same arguments and results); tests run
them in Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _log_add_exp(a, b):
    return tl.maximum(a, b) + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _pixel_block(logits, centre, num_pixels, width, BLOCK_SIZE: tl.constexpr):
    """The pixels of this program (instance, block): index, validity, row, column, logit,
    centre weight."""
    k = tl.program_id(0)
    pixel = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    valid = pixel < num_pixels
    value = tl.load(logits + k * num_pixels + pixel, mask=valid, other=0.0)
    c = tl.load(centre + k * num_pixels + pixel, mask=valid, other=0.0)
    return k, pixel, valid, pixel // width, pixel % width, value, c


@triton.jit
def _pairwise_forward(
    logits,
    weights,
    index,
    centre,
    dys,
    dxs,
    loss_sums,
    weight_sums,
    num_pixels,
    height,
    width,
    NUM_OFFSETS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    k, pixel, valid, y, x, value, c = _pixel_block(logits, centre, num_pixels, width, BLOCK_SIZE)
    row = tl.load(index + k)
    log_fg, log_bg = _log_sigmoid(value), _log_sigmoid(-value)
    loss = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    total = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for n in tl.static_range(NUM_OFFSETS):
        ny, nx = y + tl.load(dys + n), x + tl.load(dxs + n)
        inside = valid & (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        w = (
            tl.load(weights + (row * NUM_OFFSETS + n) * num_pixels + pixel, mask=valid, other=0).to(
                tl.float32
            )
            * c
        )
        other = tl.load(logits + k * num_pixels + ny * width + nx, mask=inside, other=0.0)
        nll = -_log_add_exp(log_fg + _log_sigmoid(other), log_bg + _log_sigmoid(-other))
        loss += tl.where(inside, w * nll, 0.0)
        total += w
    tl.atomic_add(loss_sums + k, tl.sum(loss, axis=0))
    tl.atomic_add(weight_sums + k, tl.sum(total, axis=0))


@triton.jit
def _pairwise_backward(
    logits,
    weights,
    index,
    centre,
    dys,
    dxs,
    grad_sums,
    grad,
    num_pixels,
    height,
    width,
    NUM_OFFSETS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # d nll(a, b) / d a = (1 - 2 p_b) exp(log p_a + log(1 - p_a) + nll(a, b)).
    k, pixel, valid, y, x, value, c = _pixel_block(logits, centre, num_pixels, width, BLOCK_SIZE)
    row = tl.load(index + k)
    base = logits + k * num_pixels
    log_fg, log_bg = _log_sigmoid(value), _log_sigmoid(-value)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for n in tl.static_range(NUM_OFFSETS):
        dy, dx = tl.load(dys + n), tl.load(dxs + n)
        # This pixel as the centre of the pair (p, p + o_n).
        ny, nx = y + dy, x + dx
        inside = valid & (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        w = (
            tl.load(weights + (row * NUM_OFFSETS + n) * num_pixels + pixel, mask=valid, other=0).to(
                tl.float32
            )
            * c
        )
        other = tl.load(base + ny * width + nx, mask=inside, other=0.0)
        nll = -_log_add_exp(log_fg + _log_sigmoid(other), log_bg + _log_sigmoid(-other))
        other_term = 1.0 - 2.0 / (1.0 + tl.exp(-other))
        acc += tl.where(inside, w * other_term * tl.exp(log_fg + log_bg + nll), 0.0)
        # This pixel as the neighbour o_n of the centre p - o_n.
        cy, cx = y - dy, x - dx
        has_centre = valid & (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
        centre_pixel = cy * width + cx
        w = tl.load(
            weights + (row * NUM_OFFSETS + n) * num_pixels + centre_pixel, mask=has_centre, other=0
        ).to(tl.float32)
        w = w * tl.load(centre + k * num_pixels + centre_pixel, mask=has_centre, other=0.0)
        other = tl.load(base + centre_pixel, mask=has_centre, other=0.0)
        nll = -_log_add_exp(log_fg + _log_sigmoid(other), log_bg + _log_sigmoid(-other))
        other_term = 1.0 - 2.0 / (1.0 + tl.exp(-other))
        acc += tl.where(has_centre, w * other_term * tl.exp(log_fg + log_bg + nll), 0.0)
    scale = tl.load(grad_sums + k)
    tl.store(grad + k * num_pixels + pixel, acc * scale, mask=valid)


def _launch_arguments(logits, pair_weights, offsets):
    k, h, w = logits.shape
    if pair_weights.dtype == torch.bool:
        pair_weights = pair_weights.view(torch.uint8)
    dys = torch.tensor([dy for dy, _ in offsets], dtype=torch.int32, device=logits.device)
    dxs = torch.tensor([dx for _, dx in offsets], dtype=torch.int32, device=logits.device)
    grid = (k, triton.cdiv(h * w, BLOCK))
    return pair_weights.contiguous(), dys, dxs, grid, (h * w, h, w)


class PairwiseLossTriton(torch.autograd.Function):
    """``pairwise.pairwise_loss`` with fused kernels: logits (K, h, w) float32, pair_weights
    (M, len(offsets), h, w) bool or float, pair_index (K,) int64, centre_weights (K, h, w)."""

    @staticmethod
    def forward(ctx, logits, pair_weights, pair_index, centre_weights, offsets):
        logits, centre_weights = logits.contiguous().float(), centre_weights.contiguous().float()
        weights, dys, dxs, grid, sizes = _launch_arguments(logits, pair_weights, offsets)
        loss_sums = logits.new_zeros(logits.shape[0])
        weight_sums = logits.new_zeros(logits.shape[0])
        _pairwise_forward[grid](
            logits,
            weights,
            pair_index,
            centre_weights,
            dys,
            dxs,
            loss_sums,
            weight_sums,
            *sizes,
            NUM_OFFSETS=len(offsets),
            BLOCK_SIZE=BLOCK,
        )
        ctx.save_for_backward(logits, pair_weights, pair_index, centre_weights)
        ctx.offsets = offsets
        ctx.mark_non_differentiable(weight_sums)
        return loss_sums, weight_sums

    @staticmethod
    def backward(ctx, grad_loss_sums, _grad_weight_sums):
        logits, pair_weights, pair_index, centre_weights = ctx.saved_tensors
        weights, dys, dxs, grid, sizes = _launch_arguments(logits, pair_weights, ctx.offsets)
        grad = torch.empty_like(logits)
        _pairwise_backward[grid](
            logits,
            weights,
            pair_index,
            centre_weights,
            dys,
            dxs,
            grad_loss_sums.contiguous().float(),
            grad,
            *sizes,
            NUM_OFFSETS=len(ctx.offsets),
            BLOCK_SIZE=BLOCK,
        )
        return grad, None, None, None, None
