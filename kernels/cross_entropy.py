"""Fused cross-entropy kernels (Triton) and their launchers.

Notation, per row ``i`` of logits ``x`` (``C`` classes), target ``t``, class weights ``w``
(all ones when absent), ``W = sum_c w_c`` and label smoothing ``eps``:

    lse      = m + log(sum_c exp(x_c - m))                 m = max_c x_c
    loss     = (1 - eps) * w_t * (lse - x_t) + eps / C * (W * lse - sum_c w_c x_c)
    dloss/dx = (p_c * A - B * [c == t] - eps / C * w_c) * g
               p_c = exp(x_c - lse),  B = (1 - eps) * w_t,  A = B + eps * W / C

``g`` is the row's upstream gradient with the reduction's denominator folded in. A row whose
target equals ``ignore_index`` has loss 0 and gradient 0; a row whose target is outside
``[0, C)`` has loss NaN and gradient NaN (the kernels never read outside the tensors).

Memory traffic (the byte model shared with ``bench/``): the forward reads each logit once;
the backward reads each logit once and writes each gradient element once; everything else
is O(rows).
"""

import torch
import triton
import triton.language as tl

# exp(x) == exp2(x * LOG2E); exp2 is the native instruction. A constexpr: the GPU compiler
# refuses plain globals inside @triton.jit (the interpreter does not notice).
LOG2E = tl.constexpr(1.4426950408889634)
MAX_BLOCK_SIZE = 8192  # columns per loop step; a 50,257 row takes 7 steps
NUM_WARPS = 8


@triton.jit
def _row_lse(x_row_ptr, n_cols, BLOCK_SIZE: tl.constexpr, t, weight_ptr,
             HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """One pass over a row: online softmax (Milakov & Gimelshein 2018).

    Keeps a running max ``m`` and the sum ``d`` of ``exp(x - m)`` rescaled whenever ``m``
    grows, picks up ``x[t]`` on the way and, for label smoothing, ``sum_c w_c x_c``.
    Returns ``(lse, x_t, sum_wx)`` in fp32.
    """
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    x_t = tl.zeros((), tl.float32)
    sum_wx = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        # -inf in the masked lanes: exp of it is 0, so they add nothing to d
        x = tl.load(x_row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # a block of -inf only (masked vocab) must not make (-inf) - (-inf) = NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp2((m - m_ref) * LOG2E) + tl.sum(tl.exp2((x - m_ref) * LOG2E), axis=0)
        m = m_new
        x_t += tl.sum(tl.where(cols == t, x, 0.0), axis=0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                sum_wx += tl.sum(tl.where(mask, w * x, 0.0), axis=0)
            else:
                sum_wx += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(d)
    return lse, x_t, sum_wx


@triton.jit
def _row_target(target_ptr, row, weight_ptr, n_cols, ignore_index, HAS_WEIGHT: tl.constexpr):
    """The row's target ``t`` (int64), whether it is ignored, whether it is in range, and
    its class weight ``w_t`` (0 for an ignored or out-of-range target: never read)."""
    t = tl.load(target_ptr + row).to(tl.int64)
    ignored = t == ignore_index
    valid = (t >= 0) & (t < n_cols) & (~ignored)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t, mask=valid, other=0.0).to(tl.float32)
    else:
        w_t = tl.where(valid, 1.0, 0.0)
    return t, ignored, valid, w_t


@triton.jit
def _row_grad(x_row_ptr, dx_row_ptr, n_cols, BLOCK_SIZE: tl.constexpr, t, lse, g, w_t,
              weight_ptr, W, label_smoothing, HAS_WEIGHT: tl.constexpr,
              HAS_SMOOTHING: tl.constexpr):
    """One pass over a row writing ``dx = (p * A - B * onehot(t) - eps / C * w) * g``."""
    B = (1.0 - label_smoothing) * w_t
    A = B
    if HAS_SMOOTHING:
        A = B + label_smoothing * W / n_cols
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        x = tl.load(x_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp2((x - lse) * LOG2E)
        # p * A - B stays exact when A == B and p is near 1 (confident bf16 predictions)
        dx = p * A - tl.where(cols == t, B, 0.0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                dx -= label_smoothing / n_cols * w
            else:
                dx -= label_smoothing / n_cols
        tl.store(dx_row_ptr + cols, (dx * g).to(dx_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(
    x_ptr, x_row_stride,
    target_ptr,
    weight_ptr, wsum_ptr,
    loss_ptr, lse_ptr,
    gscale_ptr,
    n_cols, ignore_index, label_smoothing,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    INPLACE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Per-row loss and log-sum-exp; one program per row.

    x_ptr:      (rows, n_cols) fp32/bf16/fp16, unit column stride, row stride ``x_row_stride``
    target_ptr: (rows,) int64 or int32
    weight_ptr: (n_cols,) class weights (read only if HAS_WEIGHT); wsum_ptr: (1,) fp32, W
    loss_ptr:   (rows,) fp32 out, the row's loss (0 if ignored, NaN if target out of range)
    lse_ptr:    (rows,) fp32 out, log-sum-exp of the row
    gscale_ptr: (1,) fp32, read only if INPLACE_GRAD: the gradient's scale (1 / denominator),
                with which the row's gradient is written over the row of ``x``
    """
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 near 42,700 rows
    x_row_ptr = x_ptr + row * x_row_stride
    t, ignored, valid, w_t = _row_target(target_ptr, row, weight_ptr, n_cols, ignore_index,
                                         HAS_WEIGHT)
    lse, x_t, sum_wx = _row_lse(x_row_ptr, n_cols, BLOCK_SIZE, t, weight_ptr, HAS_WEIGHT,
                                HAS_SMOOTHING)
    loss = (1.0 - label_smoothing) * w_t * (lse - x_t)
    W = 0.0
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            W = tl.load(wsum_ptr).to(tl.float32)
        else:
            W = n_cols.to(tl.float32)
        loss += label_smoothing / n_cols * (W * lse - sum_wx)
    nan = float("nan")
    loss = tl.where(ignored, 0.0, tl.where(valid, loss, nan))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if INPLACE_GRAD:
        g = tl.load(gscale_ptr).to(tl.float32)
        g = tl.where(ignored, 0.0, tl.where(valid, g, nan))
        # the row was just streamed through: on a GPU this second read comes from L2
        _row_grad(x_row_ptr, x_row_ptr, n_cols, BLOCK_SIZE, t, lse, g, w_t, weight_ptr, W,
                  label_smoothing, HAS_WEIGHT, HAS_SMOOTHING)


@triton.jit
def _ce_bwd_kernel(
    x_ptr, x_row_stride,
    dx_ptr, dx_row_stride,
    target_ptr,
    weight_ptr, wsum_ptr,
    lse_ptr,
    dloss_ptr, dloss_stride,
    n_cols, ignore_index, label_smoothing,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Gradient of the per-row losses; one program per row.

    x_ptr:      (rows, n_cols) fp32/bf16/fp16 logits, unit column stride
    dx_ptr:     (rows, n_cols) out, same dtype as x, unit column stride
    target_ptr: (rows,) int64/int32; weight_ptr: (n_cols,); wsum_ptr: (1,) fp32
    lse_ptr:    (rows,) fp32 from the forward
    dloss_ptr:  (rows,) fp32 upstream gradient of each row's loss, the reduction's
                denominator folded in; ``dloss_stride`` is 0 for a broadcast scalar
    """
    row = tl.program_id(0).to(tl.int64)
    t, ignored, valid, w_t = _row_target(target_ptr, row, weight_ptr, n_cols, ignore_index,
                                         HAS_WEIGHT)
    g = tl.load(dloss_ptr + row * dloss_stride).to(tl.float32)
    g = tl.where(ignored, 0.0, tl.where(valid, g, float("nan")))
    lse = tl.load(lse_ptr + row)
    W = 0.0
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            W = tl.load(wsum_ptr).to(tl.float32)
        else:
            W = n_cols.to(tl.float32)
    _row_grad(x_ptr + row * x_row_stride, dx_ptr + row * dx_row_stride, n_cols, BLOCK_SIZE,
              t, lse, g, w_t, weight_ptr, W, label_smoothing, HAS_WEIGHT, HAS_SMOOTHING)


@triton.jit
def _ce_scale_kernel(dx_ptr, dx_row_stride, dloss_ptr, dloss_stride, n_cols,
                     BLOCK_SIZE: tl.constexpr):
    """``dx[row] *= dloss[row]`` in place, skipping rows whose factor is exactly 1.

    The in-place mode's backward: the forward already wrote the gradient for an upstream
    gradient of 1, so the common ``loss.backward()`` moves no logits-sized bytes at all, and
    the check happens on the device (no host synchronisation).
    dx_ptr: (rows, n_cols) fp32/bf16/fp16; dloss_ptr: (rows,) fp32, stride 0 for a scalar.
    """
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(dloss_ptr + row * dloss_stride).to(tl.float32)
    if g != 1.0:
        dx_row_ptr = dx_ptr + row * dx_row_stride
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            dx = tl.load(dx_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_row_ptr + cols, (dx * g).to(dx_row_ptr.dtype.element_ty), mask=mask)


def _block_size(n_cols):
    return min(MAX_BLOCK_SIZE, triton.next_power_of_2(max(n_cols, 16)))


def _weight_args(weight, label_smoothing, like):
    """Dummy pointers stand in for an absent weight: the kernel never reads them."""
    has_weight = weight is not None
    if has_weight and label_smoothing > 0:
        wsum = weight.sum(dtype=torch.float32).reshape(1)
    else:
        wsum = like
    return has_weight, (weight if has_weight else like), wsum


def ce_fwd(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, inplace_scale=None):
    """Loss and log-sum-exp of every row of ``x`` (rows, C).

    Returns ``(loss, lse)``, both (rows,) fp32. With ``inplace_scale`` (a (1,) fp32 tensor on
    x's device), the gradient of ``loss * inplace_scale`` is also written over ``x``.
    """
    assert x.ndim == 2 and x.stride(1) == 1, "rows of x must be contiguous"
    n_rows, n_cols = x.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return loss, lse
    has_weight, weight_arg, wsum = _weight_args(weight, label_smoothing, loss)
    _ce_fwd_kernel[(n_rows,)](
        x_ptr=x, x_row_stride=x.stride(0),
        target_ptr=target,
        weight_ptr=weight_arg, wsum_ptr=wsum,
        loss_ptr=loss, lse_ptr=lse,
        gscale_ptr=inplace_scale if inplace_scale is not None else loss,
        n_cols=n_cols, ignore_index=ignore_index, label_smoothing=float(label_smoothing),
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=label_smoothing > 0,
        INPLACE_GRAD=inplace_scale is not None,
        BLOCK_SIZE=_block_size(n_cols),
        num_warps=NUM_WARPS,
    )
    return loss, lse


def ce_bwd(x, target, lse, dloss, weight=None, ignore_index=-100, label_smoothing=0.0,
           dx=None):
    """Gradient of ``sum(loss * dloss)`` with respect to ``x`` (rows, C).

    ``dloss`` is a (rows,) fp32 tensor (it may be an expanded scalar, stride 0). Writes into
    ``dx`` when given (it may be ``x`` itself), else into a new tensor like ``x``.
    """
    assert x.ndim == 2 and x.stride(1) == 1, "rows of x must be contiguous"
    n_rows, n_cols = x.shape
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n_rows == 0:
        return dx
    has_weight, weight_arg, wsum = _weight_args(weight, label_smoothing, lse)
    _ce_bwd_kernel[(n_rows,)](
        x_ptr=x, x_row_stride=x.stride(0),
        dx_ptr=dx, dx_row_stride=dx.stride(0),
        target_ptr=target,
        weight_ptr=weight_arg, wsum_ptr=wsum,
        lse_ptr=lse,
        dloss_ptr=dloss, dloss_stride=dloss.stride(0),
        n_cols=n_cols, ignore_index=ignore_index, label_smoothing=float(label_smoothing),
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=label_smoothing > 0,
        BLOCK_SIZE=_block_size(n_cols),
        num_warps=NUM_WARPS,
    )
    return dx


def ce_scale_(dx, dloss):
    """``dx *= dloss[:, None]`` in place, skipping rows whose factor is 1 (on the device)."""
    n_rows, n_cols = dx.shape
    if n_rows == 0:
        return dx
    _ce_scale_kernel[(n_rows,)](
        dx_ptr=dx, dx_row_stride=dx.stride(0),
        dloss_ptr=dloss, dloss_stride=dloss.stride(0),
        n_cols=n_cols,
        BLOCK_SIZE=_block_size(n_cols),
        num_warps=NUM_WARPS,
    )
    return dx
