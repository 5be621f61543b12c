"""Cross-entropy over few long rows: each row split over several programs.

The row kernels of ``cross_entropy.py`` run one program per row. With fewer rows than the
GPU has SMs (an H100 has 132; evaluation with a batch of one, a short generation step) most
of the GPU idles while each program streams a whole 50,257- or 256,000-wide row. Here a row
is cut into ``S`` column splits of ``split_cols`` columns, one program each, in three steps:

1. ``_split_partials_kernel`` (grid rows x S): each split's log-sum-exp ``lse_s``, target
   logit (0 when the target is elsewhere), ``smooth_s = sum_{c in s} w_c (lse_s - x_c)`` and
   ``w_s = sum_{c in s} w_c`` (these two with label smoothing), through ``_row_lse``;
2. ``_split_merge_kernel`` (one program per row) combines them in a fixed order, without
   atomics, so the result does not depend on scheduling:
   ``lse = logsumexp_s lse_s``, ``x_t = sum_s``, ``sum_c w_c (lse - x_c) = sum_s smooth_s +
   w_s (lse - lse_s)`` (every term >= 0: no cancellation), then the loss of
   ``cross_entropy.py``'s formula;
3. ``_split_grad_kernel`` (grid rows x S) writes each split's gradient through ``_row_grad``
   with the row's global ``lse``, in the forward (``grad_scale``) or the backward.

The loss extras: each split transforms its logits as it loads them (``_logits``); with aux
outputs a split also gives its own entropy ``H_s``, max ``m_s`` and first argmax, merged as
the vocab-parallel loss merges its ranks' (``H = sum_s pi_s (H_s + lse - lse_s)``, ``pi_s =
exp(lse_s - lse)``; the smallest argmax column among the splits holding the row's max, or
a NaN, which counts as the largest value as in ``torch.argmax``); the
z-loss's ``gz`` per row (O(rows), from the merged lse) joins the gradient kernel.

``ce_fwd`` / ``ce_bwd`` here are the package's launchers (``fusedce.kernels``): the
arguments and results of ``cross_entropy.ce_fwd`` / ``ce_bwd``, which they call for rows that
``split_count`` does not split.
"""

import functools

import torch
import triton
import triton.language as tl

from . import cross_entropy
from .cross_entropy import (
    _check_rows,
    _fp32,
    _grad_row_state,
    _row_grad,
    _row_lse,
    _row_target,
    _unit_stride,
    _weight_args,
    extras_warps,
    grad_launch_args,
    launch_config,
    transform_args,
)

# A split holds at least this many columns (a program's fixed costs stay small against its
# stream); rows are split only when there are fewer than the device's SMs.
MIN_SPLIT_COLS = 4096
MAX_SPLITS = 64
# Splits per row whatever the device (tests under Triton's interpreter set it); None: decide
FORCE_SPLITS = None


@functools.cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_count(n_rows, n_cols, device):
    """Programs per row: 1 (the row kernels) unless there are fewer rows than SMs, then
    enough splits of at least MIN_SPLIT_COLS columns to give every SM about two programs."""
    if FORCE_SPLITS is not None:
        return max(1, min(FORCE_SPLITS, n_cols))
    if device.type != "cuda" or n_rows == 0:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if n_rows >= sms:
        return 1
    want = triton.cdiv(2 * sms, n_rows)
    return max(1, min(want, n_cols // MIN_SPLIT_COLS, MAX_SPLITS))


@triton.jit
def _program_split(n_cols, split_cols):
    """This program's split: its first column and width."""
    col0 = tl.program_id(1).to(tl.int64) * split_cols
    width = tl.minimum(split_cols, n_cols - col0).to(tl.int32)
    return col0, width


@triton.jit
def _split_partials_kernel(
    x_ptr, x_row_stride,
    target_ptr,
    weight_ptr,
    part_ptr,
    n_rows, n_cols, split_cols, scale, softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    VEC: tl.constexpr,
    TRANSFORM: tl.constexpr = False,
    HAS_CAP: tl.constexpr = False,
    AUX: tl.constexpr = False,
):
    """Partials of one split of one row (grid rows x S).

    x_ptr: (rows, n_cols) logits, unit column stride; target_ptr: (rows,) int64/int32
    part_ptr: (P, S, rows) fp32 out: the split's max (0 where it is -inf) and log-sum
    ``log_d_s`` (``lse_s`` is their sum, kept apart: its rounding would lose ``log_d_s``
    where the row lies far from 0), the target logit or 0, smooth_s, w_s (P = 5; 3 without
    smoothing), and with AUX (P = 7) H_s and the row's column of the split's first max (a
    float: exact below 2**24); the split's max itself is the first slot's, -inf where
    ``log_d_s`` is (a split of -inf only)
    scale, softcap: the logit transform (``_logits``), with TRANSFORM and HAS_CAP
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    col0, width = _program_split(n_cols, split_cols)
    t_local = tl.load(target_ptr + row).to(tl.int64) - col0
    t_col = tl.where((t_local >= 0) & (t_local < width), t_local, -1).to(tl.int32)
    # the split starts at its own element offset: _row_lse aligns its loads to it
    _, x_t, smooth, w_seen, entropy, arg, m, log_d = _row_lse(
        x_ptr, row * x_row_stride + col0, width, t_col, weight_ptr + col0, scale, softcap,
        BLOCK_SIZE, VEC, HAS_WEIGHT, HAS_SMOOTHING, TRANSFORM, HAS_CAP, AUX)
    n_splits = tl.num_programs(1).to(tl.int64)
    slot = part_ptr + split * n_rows + row
    tl.store(slot, tl.where(m == float("-inf"), 0.0, m))
    tl.store(slot + n_splits * n_rows, x_t)
    tl.store(slot + 2 * n_splits * n_rows, log_d)
    if HAS_SMOOTHING:
        tl.store(slot + 3 * n_splits * n_rows, smooth)
        tl.store(slot + 4 * n_splits * n_rows, w_seen)
    if AUX:
        tl.store(slot + 5 * n_splits * n_rows, entropy)
        tl.store(slot + 6 * n_splits * n_rows, (col0 + arg).to(tl.float32))


@triton.jit
def _split_merge_kernel(
    part_ptr, n_splits,
    target_ptr,
    weight_ptr,
    loss_ptr, lse_ptr,
    aux_ptr, aux_stride,
    n_rows, n_cols, ignore_index, label_smoothing,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_S: tl.constexpr,
    AUX: tl.constexpr = False,
):
    """A row's loss and log-sum-exp from its S partials, in a fixed order (one program per
    row). The formulas are ``_ce_fwd_kernel``'s; with AUX the row's entropy and correctness
    into ``aux_ptr`` (2, rows), as ``_ce_fwd_kernel`` writes them."""
    row = tl.program_id(0).to(tl.int64)
    label_smoothing = _fp32(label_smoothing)
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    live = s < n_splits
    slot = part_ptr + s * n_rows + row
    # lse_s = m_s + log_d_s; the row's lse = m + log_d, m the largest m_s of a split with
    # a finite lse_s (0 if none: no (-inf) - (-inf)), each lse_s - m as (m_s - m) + log_d_s
    m_s = tl.load(slot, mask=live, other=0.0)
    log_d_s = tl.load(slot + 2 * n_splits * n_rows, mask=live, other=float("-inf"))
    max_s = tl.where(log_d_s == float("-inf"), float("-inf"), m_s)  # each split's max
    top = tl.max(max_s, axis=0)
    m = tl.where(top == float("-inf"), 0.0, top)
    rel_s = (m_s - m) + log_d_s  # lse_s - m
    log_d = tl.log(tl.sum(tl.exp(rel_s), axis=0))
    x_t = tl.sum(tl.load(slot + n_splits * n_rows, mask=live, other=0.0), axis=0)
    t, ignored, valid, w_t = _row_target(target_ptr, row, weight_ptr, n_cols, ignore_index,
                                         HAS_WEIGHT)
    loss = (1.0 - label_smoothing) * w_t * ((m - x_t) + log_d)
    if HAS_SMOOTHING:
        smooth_s = tl.load(slot + 3 * n_splits * n_rows, mask=live, other=0.0)
        w_s = tl.load(slot + 4 * n_splits * n_rows, mask=live, other=0.0)
        # a split of weight 0 adds nothing (and must not make 0 * inf)
        # and a split of -inf logits only adds +inf, as its classes' -log p do (its smooth_s
        # is NaN), as the vocab-parallel merge does; lse - lse_s = log_d - rel_s
        rebased = tl.where(w_s == 0.0, smooth_s, tl.where(
            log_d_s == float("-inf"), float("inf"), smooth_s + w_s * (log_d - rel_s)))
        smooth = tl.sum(tl.where(live, rebased, 0.0), axis=0)
        loss += label_smoothing * (smooth / n_cols)
    loss = tl.where(ignored, 0.0, tl.where(valid, loss, float("nan")))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, m.to(tl.float64) + log_d.to(tl.float64))
    if AUX:
        h_s = tl.load(slot + 5 * n_splits * n_rows, mask=live, other=0.0)
        a_s = tl.load(slot + 6 * n_splits * n_rows, mask=live, other=0.0)
        pi = tl.exp(rel_s - log_d)  # 0 for a split of -inf only, and for the masked lanes
        entropy = tl.sum(tl.where(pi == 0.0, 0.0, pi * (h_s + (log_d - rel_s))), axis=0)
        first = tl.min(tl.where(live & (max_s == top), a_s, float("inf")), axis=0)
        # a split holding NaN has a NaN max and its first NaN's column (``_row_lse``): as
        # for torch.argmax, the row's first NaN is its argmax
        nan_first = tl.min(tl.where(live & (max_s != max_s), a_s, float("inf")), axis=0)
        first = tl.where(nan_first < float("inf"), nan_first, first)
        tl.store(aux_ptr + row, entropy)
        tl.store(aux_ptr + aux_stride + row,
                 tl.where(valid & (first == t.to(tl.float32)), 1.0, 0.0))


@triton.jit
def _split_grad_kernel(
    x_ptr, x_row_stride,
    dx_ptr, dx_row_stride,
    target_ptr,
    weight_ptr, wsum_ptr,
    lse_ptr,
    g_ptr, g_stride,
    zgrad_ptr,
    n_cols, split_cols, ignore_index, label_smoothing, scale, softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SAME_LAYOUT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    VEC: tl.constexpr,
    TRANSFORM: tl.constexpr = False,
    HAS_CAP: tl.constexpr = False,
    HAS_Z: tl.constexpr = False,
):
    """One split of one row's gradient (grid rows x S); ``g_ptr`` the row's upstream
    gradient with the denominator folded in (``g_stride`` 0: one for all rows).

    ``_row_grad`` divides the smoothing by the width it is given: with ``eps_s = eps *
    width / C`` and ``w_t (1 - eps) / (1 - eps_s)`` for the target's weight its ``A``,
    ``B`` and ``eps_s / width`` are the row's (as the vocab-parallel kernel does). With
    TRANSFORM and HAS_Z (``zgrad_ptr`` (rows,) fp32) as ``_ce_bwd_kernel``."""
    row = tl.program_id(0).to(tl.int64)
    label_smoothing = _fp32(label_smoothing)
    col0, width = _program_split(n_cols, split_cols)
    t, w_t, g, hi, lo2, W = _grad_row_state(row, target_ptr, weight_ptr, wsum_ptr, lse_ptr,
                                            g_ptr, g_stride, n_cols, ignore_index, HAS_WEIGHT,
                                            HAS_SMOOTHING)
    eps_s = 0.0
    if HAS_SMOOTHING:
        eps_s = label_smoothing * width / n_cols
        w_t = tl.where(eps_s < 1.0, w_t * (1.0 - label_smoothing) / (1.0 - eps_s), 0.0)
    gz = 0.0
    if HAS_Z:
        gz = tl.load(zgrad_ptr + row)
    dx_start = row * dx_row_stride + col0
    _row_grad(x_ptr, row * x_row_stride + col0, dx_ptr, dx_start, width, t - col0, hi, lo2,
              g, w_t, weight_ptr + col0, W, eps_s, scale, softcap, gz, BLOCK_SIZE, VEC,
              HAS_WEIGHT, HAS_SMOOTHING, SAME_LAYOUT, TRANSFORM, HAS_CAP, HAS_Z)


def _split_cols(n_cols, n_splits):
    """``(split_cols, n_splits)``: the width of a split, and how many such splits cover a
    row (at most ``n_splits``: 9 columns in 4 splits of 3 make 3)."""
    split_cols = triton.cdiv(n_cols, n_splits)
    return split_cols, triton.cdiv(n_cols, split_cols)


def split_fwd(x, target, n_splits, weight_arg, wsum, has_weight, ignore_index,
              label_smoothing, loss, lse, extras=None, aux_out=None):
    """Partials and merge into ``loss`` (rows,) fp32 and ``lse`` (rows,) fp64 (and
    ``aux_out``)."""
    n_rows, n_cols = x.shape
    split_cols, n_splits = _split_cols(n_cols, n_splits)
    smoothing = label_smoothing > 0
    aux = aux_out is not None
    part = torch.empty(7 if aux else (5 if smoothing else 3), n_splits, n_rows,
                       dtype=torch.float32, device=x.device)
    block, num_warps, vec = launch_config(x.dtype, split_cols)
    if smoothing and has_weight:
        # the weighted smoothing sums keep each element's class weight live beside its
        # logit: half the elements per thread (Triton 3.8 spilled 4 bytes for fp16 on sm_80)
        num_warps = min(16, 2 * num_warps)
    num_warps = extras_warps(num_warps, extras)
    _split_partials_kernel[(n_rows, n_splits)](
        x_ptr=x, x_row_stride=x.stride(0),
        target_ptr=target,
        weight_ptr=weight_arg,
        part_ptr=part,
        n_rows=n_rows, n_cols=n_cols, split_cols=split_cols,
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=smoothing,
        BLOCK_SIZE=block, VEC=vec,
        AUX=aux,
        **transform_args(extras),
        num_warps=num_warps,
    )
    _split_merge_kernel[(n_rows,)](
        part_ptr=part, n_splits=n_splits,
        target_ptr=target,
        weight_ptr=weight_arg,
        loss_ptr=loss, lse_ptr=lse,
        aux_ptr=aux_out if aux else loss, aux_stride=aux_out.stride(0) if aux else 0,
        n_rows=n_rows, n_cols=n_cols, ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=smoothing,
        BLOCK_S=triton.next_power_of_2(n_splits),
        AUX=aux,
        num_warps=1,
    )


def split_grad(x, target, lse, g, n_splits, weight_arg, wsum, has_weight, ignore_index,
               label_smoothing, dx, extras=None, z_grad=None):
    """The gradient into ``dx`` (it may be ``x``): ``g`` (rows,) fp32 of any stride; with
    the transform of ``extras`` and the z-loss's per-row ``z_grad``."""
    n_rows, n_cols = x.shape
    split_cols, n_splits = _split_cols(n_cols, n_splits)
    block, num_warps, vec = launch_config(x.dtype, split_cols)
    _split_grad_kernel[(n_rows, n_splits)](
        **grad_launch_args(x, dx, target, weight_arg, wsum, has_weight, lse, ignore_index,
                           label_smoothing),
        g_ptr=g, g_stride=g.stride(0), n_cols=n_cols, split_cols=split_cols,
        zgrad_ptr=z_grad if z_grad is not None else lse, HAS_Z=z_grad is not None,
        **transform_args(extras),
        BLOCK_SIZE=block, VEC=vec, num_warps=extras_warps(num_warps, extras),
    )
    return dx


def ce_fwd(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, grad_scale=None,
           grad_out=None, extras=None, aux_out=None, z_scale=None):
    """``cross_entropy.ce_fwd``, with rows split over several programs where
    ``split_count`` says so."""
    n_splits = split_count(x.shape[0], x.shape[1], x.device)
    if n_splits <= 1 or x.shape[0] == 0:
        return cross_entropy.ce_fwd(x, target, weight, ignore_index, label_smoothing,
                                    grad_scale, grad_out, extras, aux_out, z_scale)
    dx = x if grad_out is None else grad_out
    _check_rows(x, dx)
    target, weight = _unit_stride(target, weight)
    loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    lse = torch.empty_like(loss, dtype=torch.float64)
    has_weight, weight_arg, wsum = _weight_args(weight, label_smoothing, loss)
    split_fwd(x, target, n_splits, weight_arg, wsum, has_weight, ignore_index,
              label_smoothing, loss, lse, extras, aux_out)
    if grad_scale is not None:
        z_grad = None
        if extras is not None and extras.z_loss and z_scale is not None:
            # gz = z_scale * lse, 0 where ignored (as _ce_fwd_kernel's): O(rows), no sync
            z_grad = torch.where(target.long() == ignore_index, 0.0, z_scale * lse.float())
        split_grad(x, target, lse, grad_scale.expand(x.shape[0]), n_splits, weight_arg, wsum,
                   has_weight, ignore_index, label_smoothing, dx, extras, z_grad)
    return loss, lse


def ce_bwd(x, target, lse, dloss, weight=None, ignore_index=-100, label_smoothing=0.0,
           dx=None, extras=None, z_grad=None):
    """``cross_entropy.ce_bwd``, with rows split over several programs where
    ``split_count`` says so."""
    n_splits = split_count(x.shape[0], x.shape[1], x.device)
    if n_splits <= 1 or x.shape[0] == 0:
        return cross_entropy.ce_bwd(x, target, lse, dloss, weight, ignore_index,
                                    label_smoothing, dx, extras, z_grad)
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    _check_rows(x, dx)
    target, weight = _unit_stride(target, weight)
    has_weight, weight_arg, wsum = _weight_args(weight, label_smoothing, lse)
    return split_grad(x, target, lse, dloss, n_splits, weight_arg, wsum, has_weight,
                      ignore_index, label_smoothing, dx, extras, z_grad)
