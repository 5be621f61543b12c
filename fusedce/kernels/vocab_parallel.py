"""Triton kernels of the vocab-parallel loss (``fusedce.distributed``) and their launchers.

Each rank holds a contiguous slice of the vocabulary. The kernels are thin per-row passes over
the row helpers of ``cross_entropy.py`` (``_row_lse``, ``_row_grad``: one read of each logit,
16-byte loads and stores over rows at any alignment) with its launch configuration; the
notation and the merge of the per-rank values are in ``fusedce/distributed.py``.
"""

import torch
import triton
import triton.language as tl

from .cross_entropy import (
    _fp32,
    _lse_parts,
    _row_grad,
    _row_lse,
    extras_warps,
    launch_config,
    transform_args,
)


@triton.jit
def _vp_partials_kernel(
    x_ptr, x_row_stride,
    t_ptr,
    weight_ptr,
    part_ptr,
    n_rows, n_cols, scale, softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    VEC: tl.constexpr,
    TRANSFORM: tl.constexpr = False,
    HAS_CAP: tl.constexpr = False,
    AUX: tl.constexpr = False,
):
    """One pass over a row of the shard: its log-sum-exp, target logit and ``sum w (lse - x)``
    (with TRANSFORM, of the transformed logits; ``_logits`` in ``cross_entropy.py``).

    x_ptr:      (rows, n_cols) fp32/bf16/fp16 shard logits, unit column stride
    t_ptr:      (rows,) int64 target in shard-local ids, -1 when not in this shard
    weight_ptr: (n_cols,) the shard's class weights (read only if HAS_WEIGHT)
    part_ptr:   (>= 3 * rows,) float64 out: [lse_r | xt_r | sm_r], each (rows,), lse_r the
                slice's max and log-sum rounded once, sm_r = sum_c w_c (lse_r - x_c)
                (>= 0); the third is written only if HAS_SMOOTHING.
                An empty shard gives lse -inf and sm 0. With AUX (then >= 6 * rows) also
                [H_r | m_r | a_r]: the slice's own entropy, its max and the column of the
                first max in the slice (a float: exact below 2**24 classes); a slice holding
                NaN sends a NaN max and its first NaN's column
    """
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31
    t_col = tl.load(t_ptr + row).to(tl.int32)
    _, x_t, smooth, w_seen, entropy, arg, m, log_d = _row_lse(
        x_ptr, row * x_row_stride, n_cols, t_col, weight_ptr, scale, softcap, BLOCK_SIZE, VEC,
        HAS_WEIGHT, HAS_SMOOTHING, TRANSFORM, HAS_CAP, AUX)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tl.store(part_ptr + row, m_safe.to(tl.float64) + log_d.to(tl.float64))
    tl.store(part_ptr + n_rows + row, x_t)
    if HAS_SMOOTHING:
        tl.store(part_ptr + 2 * n_rows + row, tl.where(w_seen == 0.0, 0.0, smooth))
    if AUX:
        tl.store(part_ptr + 3 * n_rows + row, entropy)
        tl.store(part_ptr + 4 * n_rows + row, m)
        tl.store(part_ptr + 5 * n_rows + row, arg.to(tl.float32))

@triton.jit
def _vp_grad_kernel(
    x_ptr, x_row_stride,
    dx_ptr, dx_row_stride,
    t_ptr,
    lse_ptr, g_ptr, w_t_ptr,
    consts_ptr,
    weight_ptr,
    zgrad_ptr,
    n_cols, label_smoothing, scale, softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SAME_LAYOUT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    VEC: tl.constexpr,
    TRANSFORM: tl.constexpr = False,
    HAS_CAP: tl.constexpr = False,
    HAS_Z: tl.constexpr = False,
):
    """The shard's gradient ``dx = (p * A - B * onehot(t) - eps / C * w) * g``.

    x_ptr:      (rows, n_cols) fp32/bf16/fp16 shard logits, unit column stride
    dx_ptr:     (rows, n_cols) out, dtype of x, unit column stride (may be x itself);
                SAME_LAYOUT when its row stride is x's (then 16-byte stores)
    t_ptr:      (rows,) int64 shard-local target, -1 when not in this shard
    lse_ptr:    (rows,) float64 global log-sum-exp (``_lse_parts``)
    g_ptr, w_t_ptr: (rows,) fp32 upstream gradient (the denominator folded in, 0 for
                ignored rows, NaN for bad targets), and the class weight of the global
                target
    consts_ptr: (2,) fp32 ``[W, C]``, the global weight sum and class count (read only
                if HAS_SMOOTHING); weight_ptr: (n_cols,) the shard's class weights

    ``_row_grad`` divides the smoothing by the row's own width: with ``eps_r = eps *
    n_cols / C`` and ``w_t * (1 - eps) / (1 - eps_r)`` for the target's weight, its
    ``A``, ``B`` and ``eps_r / n_cols`` are the global ones. With TRANSFORM and HAS_Z
    (``zgrad_ptr``: (rows,) fp32, each row's z-loss ``gz``) as in ``_ce_bwd_kernel``.
    """
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(t_ptr + row).to(tl.int64)
    hi, lo2 = _lse_parts(tl.load(lse_ptr + row))
    g = tl.load(g_ptr + row)
    w_t = tl.load(w_t_ptr + row)
    W = 0.0
    eps_r = 0.0
    if HAS_SMOOTHING:
        W = tl.load(consts_ptr)
        eps_r = _fp32(label_smoothing) * n_cols / tl.load(consts_ptr + 1)
        # eps_r == 1 only for one rank holding everything with eps == 1: then B = 0
        w_t = tl.where(eps_r < 1.0, w_t * (1.0 - label_smoothing) / (1.0 - eps_r), 0.0)
    gz = 0.0
    if HAS_Z:
        gz = tl.load(zgrad_ptr + row)
    _row_grad(x_ptr, row * x_row_stride, dx_ptr, row * dx_row_stride, n_cols, t, hi, lo2,
              g, w_t, weight_ptr, W, eps_r, scale, softcap, gz, BLOCK_SIZE, VEC, HAS_WEIGHT,
              HAS_SMOOTHING, SAME_LAYOUT, TRANSFORM, HAS_CAP, HAS_Z)


def vp_partials(x, t_local, w_shard, smoothing, part, extras=None):
    """Fills ``part`` (>= 3 * rows float64) with ``[lse_r | xt_r | sm_r]`` of the shard ``x``
    (rows, C_r); ``t_local`` (rows,) int64 shard-local targets, -1 when elsewhere. With the
    loss ``extras``, of the transformed logits, and with ``extras.aux`` (then >= 6 * rows)
    ``[H_r | m_r | a_r]`` after them (``a_r``: the first max's column in the slice)."""
    n_rows, n_cols = x.shape
    if n_rows > 0:
        block, num_warps, vec = launch_config(x.dtype, n_cols)
        num_warps = extras_warps(num_warps, extras)
        _vp_partials_kernel[(n_rows,)](
            x_ptr=x, x_row_stride=x.stride(0),
            t_ptr=t_local,
            weight_ptr=w_shard if w_shard is not None else part,
            part_ptr=part,
            n_rows=n_rows, n_cols=n_cols,
            HAS_WEIGHT=w_shard is not None,
            HAS_SMOOTHING=bool(smoothing),
            BLOCK_SIZE=block, VEC=vec,
            AUX=extras is not None and extras.aux,
            **transform_args(extras),
            num_warps=num_warps,
        )
    return part


def vp_grad(x, t_local, lse, g, w_t, consts, eps, w_shard, dx=None, extras=None,
            z_grad=None):
    """The shard's gradient into ``dx`` from the per-row ``lse`` (float64), ``g`` (upstream
    gradient over the denominator, masked) and ``w_t``, and ``consts = [W, C]`` (fp32 (2,)); a new
    tensor like ``x`` when ``dx`` is None. With the logit transform of ``extras`` and the
    z-loss's per-row ``z_grad``."""
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    n_rows, n_cols = x.shape
    if n_rows > 0 and n_cols > 0:
        block, num_warps, vec = launch_config(x.dtype, n_cols)
        num_warps = extras_warps(num_warps, extras)
        _vp_grad_kernel[(n_rows,)](
            x_ptr=x, x_row_stride=x.stride(0),
            dx_ptr=dx, dx_row_stride=dx.stride(0),
            t_ptr=t_local,
            lse_ptr=lse, g_ptr=g, w_t_ptr=w_t,
            consts_ptr=consts,
            weight_ptr=w_shard if w_shard is not None else lse,
            zgrad_ptr=z_grad if z_grad is not None else lse,
            n_cols=n_cols, label_smoothing=float(eps),
            HAS_WEIGHT=w_shard is not None,
            HAS_SMOOTHING=eps > 0,
            SAME_LAYOUT=dx.stride(0) == x.stride(0),
            BLOCK_SIZE=block, VEC=vec,
            HAS_Z=z_grad is not None,
            **transform_args(extras),
            num_warps=num_warps,
        )
    return dx
