"""Cross-entropy kernels over the class dimension of ``(N, C, L)`` logits of any strides.

They serve what the row-wise kernels of ``cross_entropy.py`` do not: class-probability (soft)
targets, and class-index targets whose classes are not contiguous in memory, the layout of
``(N, C, d1, ..., dK)`` inputs (``L = d1 * ... * dK``): there the L positions are contiguous
and the classes are ``L`` apart, so a program takes a tile of ``BLOCK_R`` rows (positions)
by ``BLOCK_C`` classes and its loads stay coalesced along the rows. No copy of the logits is
made to bring the classes together.

Notation, per row ``r = n * L + l`` (``C`` classes), class weights ``w`` (ones when
absent), ``W = sum_c w_c``, label smoothing ``eps``, ``lse = log(sum_c exp(x_c))``:

  class probabilities ``y``:  ``y'_c = (1 - eps) * y_c + eps / C``,  ``S = sum_c w_c y'_c``
      loss   = -sum_c w_c y'_c (x_c - lse) = S * lse - sum_c w_c y'_c x_c
      dx_c   = (p_c * S - w_c y'_c) * g                    p_c = exp(x_c - lse)
      dy_c   = (1 - eps) * w_c * (lse - x_c) * g
  class index ``t`` (as in ``cross_entropy.py``):
      loss   = (1 - eps) * w_t * (lse - x_t) + eps / C * (W * lse - sum_c w_c x_c)
      dx_c   = (p_c * A - B * [c == t] - eps / C * w_c) * g,  B = (1 - eps) w_t,  A = B + eps W / C

``g`` is the row's upstream gradient with the reduction's denominator folded in. The sums
against ``x`` are kept relative to the running maximum ``m`` (``sum w y (x - m)``, rescaled
by ``S`` when ``m`` grows) so that logits shifted by a large constant lose no precision to
cancellation. Float64 logits or targets are computed in float64 (as PyTorch does); all else
in float32, read directly from bf16/fp16 without an upcast copy.

Memory traffic: the forward reads each logit (and each target probability) once; the
backward reads them once more and writes each gradient element once.
"""

import torch
import triton
import triton.language as tl

from .cross_entropy import _logits, extras_warps, transform_args

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E); a constexpr: the GPU
# compiler rejects plain globals in @triton.jit (the interpreter does not)
MAX_TILE = 4096  # logits per tile (BLOCK_R * BLOCK_C)
NUM_WARPS = 4


@triton.jit
def _exp(v, IS_FP64: tl.constexpr):
    if IS_FP64:
        return tl.exp(v)
    else:
        return tl.exp2(v * LOG2E)


@triton.jit
def _narrowed(v, ty: tl.constexpr):
    """``v`` (ACC) in a gradient's element type ``ty``: float64 into a 16-bit type through
    fp32, as Triton lowers it for sm_80 (Triton's interpreter casts float64 to bfloat16
    as if to an integer: bf16 logits with float64 class weights got a gradient of
    denormals)."""
    if ty.primitive_bitwidth == 16:
        v = v.to(tl.float32)
    return v.to(ty)


@triton.jit
def _rows(pid, n_rows, n_l, BLOCK_R: tl.constexpr):
    """Row indices of this program's tile, their mask, and their (n, l) coordinates (int64:
    n * stride passes 2**31 for large batches)."""
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < n_rows
    return rows, row_mask, rows // n_l, rows % n_l


@triton.jit
def _targets(target_ptr, t_offs, row_mask, weight_ptr, n_cols, ignore_index,
             HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """Class index ``t``, ignored / valid masks and ``w_t`` (0 unless valid) per row."""
    t = tl.load(target_ptr + t_offs, mask=row_mask, other=0).to(tl.int64)
    ignored = t == ignore_index
    valid = (t >= 0) & (t < n_cols) & (~ignored)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t, mask=valid & row_mask, other=0.0).to(ACC)
    else:
        w_t = tl.where(valid, 1.0, 0.0).to(ACC)
    return t, ignored, valid, w_t


@triton.jit
def _first_nan(v, cols, n_cols):
    """Per row of the block ``v`` (BLOCK_R, BLOCK_C), the first column holding NaN, or
    ``n_cols`` where none does."""
    return tl.min(tl.where(v != v, cols[None, :], n_cols), axis=1)


@triton.jit
def _first_max(arg, b_arg, grows, b_nan, n_cols):
    """The running first argmax ``arg`` after a block (blocks in column order) whose first
    max is at ``b_arg``, greater than every value before where ``grows``, and whose first
    NaN is at ``b_nan``. NaN counts as the largest value, as in ``torch.argmax``: once one
    is met ``arg`` is ``-1 - c`` (``c`` its column) and stays."""
    by_max = tl.where(grows | (arg == n_cols), b_arg, arg)
    return tl.where(arg < 0, arg, tl.where(b_nan < n_cols, -1 - b_nan, by_max))


@triton.jit
def _ce_strided_fwd_kernel(
    x_ptr, x_stride_n, x_stride_c, x_stride_l,
    target_ptr, target_stride_n, target_stride_c, target_stride_l,
    weight_ptr,
    loss_ptr, lse_ptr, s_ptr,
    aux_ptr, aux_stride,
    eps_ptr,
    n_rows, n_l, n_cols, ignore_index, scale, softcap,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TRANSFORM: tl.constexpr = False,
    HAS_CAP: tl.constexpr = False,
    AUX: tl.constexpr = False,
):
    """Per-row loss, log-sum-exp and (soft targets) ``S``; one program per BLOCK_R rows.

    x_ptr:      (N, C, L) fp32/bf16/fp16/fp64 logits, any strides
    target_ptr: (N, L) int64/int32/uint8 class indices (SOFT=False; target_stride_c unused)
                or (N, C, L) float class probabilities (SOFT=True), any strides
    weight_ptr: (C,) class weights, read only if HAS_WEIGHT
    loss_ptr, lse_ptr, s_ptr: (N * L,) out, fp32 (fp64 if IS_FP64), lse fp64 (the max and
                the log-sum rounded once); s only if SOFT
    aux_ptr:    (2, N * L) fp32 out with AUX, row stride ``aux_stride``: each row's entropy,
                and 1.0 where the first column of its max is its target (for probabilities:
                the first column of the target's max), else 0.0
    eps_ptr:    (1,) label smoothing, fp32 (fp64 if IS_FP64)
    scale, softcap: the logit transform with TRANSFORM (and HAS_CAP): every formula holds
                with ``z`` (``cross_entropy._logits``) for ``x``; fp32 only (not IS_FP64)
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    # read from memory: a float kernel argument would be fp32, too coarse for fp64
    label_smoothing = tl.load(eps_ptr).to(ACC)
    rows, row_mask, n, l_idx = _rows(tl.program_id(0), n_rows, n_l, BLOCK_R)
    x_offs = n * x_stride_n + l_idx * x_stride_l
    t_offs = n * target_stride_n + l_idx * target_stride_l
    if not SOFT:
        t, ignored, valid, w_t = _targets(target_ptr, t_offs, row_mask, weight_ptr, n_cols,
                                          ignore_index, HAS_WEIGHT, ACC)
    m = tl.full((BLOCK_R,), float("-inf"), ACC)  # running max
    ref = tl.zeros((BLOCK_R,), ACC)  # m, or 0 while m is -inf: never (-inf) - (-inf)
    d = tl.zeros((BLOCK_R,), ACC)  # sum exp(x - ref)
    s = tl.zeros((BLOCK_R,), ACC)  # soft: sum w y'; hard: sum w (scalar per row)
    q = tl.zeros((BLOCK_R,), ACC)  # soft: sum w y' (x - ref); hard: sum w (x - ref)
    x_t = tl.zeros((BLOCK_R,), ACC)
    s1 = tl.zeros((BLOCK_R,), ACC)  # AUX: sum exp(x - ref) (x - ref), for the entropy
    arg = tl.zeros((BLOCK_R,), tl.int32) + n_cols  # AUX: first column of the max so far
    y_m = tl.full((BLOCK_R,), float("-inf"), ACC)  # AUX and SOFT: the target's max, and
    y_arg = tl.zeros((BLOCK_R,), tl.int32) + n_cols  # the first column holding it
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        # -inf in masked lanes: exp of it adds nothing to d
        x = tl.load(x_ptr + x_offs[:, None] + cols[None, :].to(tl.int64) * x_stride_c,
                    mask=mask, other=float("-inf")).to(ACC)
        if TRANSFORM:
            x, _dz = _logits(x, mask, scale, softcap, TRANSFORM, HAS_CAP)
        b_max = tl.max(x, axis=1)
        m_new = tl.maximum(m, b_max)
        ref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        # every exp argument <= 0: while m is -inf, d is 0 and ref (0) may lie above the new
        # reference (a row far below zero: exp(0 - (-92)) overflows fp32, and 0 * inf = NaN)
        rescale = tl.where(m == float("-inf"), 0.0, _exp(ref - ref_new, IS_FP64))
        e = _exp(x - ref_new[:, None], IS_FP64)
        if AUX:
            # sum e (x - ref) re-referenced: exp(ref - ref') (s1 + (ref - ref') d); a -inf
            # logit adds 0 (the limit of p log p)
            s1 = rescale * (s1 + (ref - ref_new) * d)
            s1 += tl.sum(tl.where(x > float("-inf"), e * (x - ref_new[:, None]), 0.0), 1)
            # blocks come in column order: a later block's max wins only if greater (the
            # first block always: a row of -inf has its argmax at column 0, as torch's)
            b_arg = tl.min(tl.where(x == b_max[:, None], cols[None, :], n_cols), axis=1)
            arg = _first_max(arg, b_arg, b_max > m, _first_nan(x, cols, n_cols), n_cols)
        d = d * rescale + tl.sum(e, 1)
        if SOFT or HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
            else:
                w = tl.where(col_mask, 1.0, 0.0).to(ACC)[None, :]
            if SOFT:
                y = tl.load(target_ptr + t_offs[:, None]
                            + cols[None, :].to(tl.int64) * target_stride_c,
                            mask=mask, other=0.0).to(ACC)
                if AUX:
                    y_in = tl.where(mask, y, float("-inf"))
                    yb_max = tl.max(y_in, axis=1)
                    yb_arg = tl.min(tl.where(y_in == yb_max[:, None], cols[None, :], n_cols),
                                    axis=1)
                    y_arg = _first_max(y_arg, yb_arg, yb_max > y_m,
                                       _first_nan(y_in, cols, n_cols), n_cols)
                    y_m = tl.maximum(y_m, yb_max)
                if HAS_SMOOTHING:
                    y = y * (1.0 - label_smoothing) + label_smoothing / n_cols
                w = w * y
            # re-reference the running sum to the new maximum, then add this block
            q = q - (ref_new - ref) * s
            s += tl.sum(tl.where(mask, w, 0.0), axis=1)
            q += tl.sum(tl.where(mask, w * (x - ref_new[:, None]), 0.0), axis=1)
        if not SOFT:
            x_t += tl.sum(tl.where(cols[None, :] == t[:, None], x, 0.0), axis=1)
        m = m_new
        ref = ref_new
    log_d = tl.log(d)
    if SOFT:
        loss = s * log_d - q  # = S * lse - sum w y' x
        tl.store(s_ptr + rows, s, mask=row_mask)
    else:
        # lse - x_t as (ref - x_t) + log_d: keeps log_d where the row lies far from 0
        loss = (1.0 - label_smoothing) * w_t * ((ref - x_t) + log_d)
        if HAS_SMOOTHING:
            loss += label_smoothing * ((s * log_d - q) / n_cols)  # (W * lse - sum w x) / C
        loss = tl.where(ignored, 0.0, tl.where(valid, loss, float("nan")))
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, ref.to(tl.float64) + log_d.to(tl.float64), mask=row_mask)
    if AUX:
        arg = tl.where(arg < 0, -1 - arg, arg)
        if SOFT:
            correct = arg == tl.where(y_arg < 0, -1 - y_arg, y_arg)
        else:
            correct = valid & (arg == t)
        tl.store(aux_ptr + rows, log_d - s1 / d, mask=row_mask)
        tl.store(aux_ptr + aux_stride + rows, tl.where(correct, 1.0, 0.0), mask=row_mask)


@triton.jit
def _ce_strided_bwd_kernel(
    x_ptr, x_stride_n, x_stride_c, x_stride_l,
    target_ptr, target_stride_n, target_stride_c, target_stride_l,
    weight_ptr, wsum_ptr,
    lse_ptr, s_ptr,
    dloss_ptr, dloss_stride_n, dloss_stride_l,
    dx_ptr, dx_stride_n, dx_stride_c, dx_stride_l,
    dy_ptr, dy_stride_n, dy_stride_c, dy_stride_l,
    eps_ptr, zgrad_ptr,
    n_rows, n_l, n_cols, ignore_index, scale, softcap,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DY: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TRANSFORM: tl.constexpr = False,
    HAS_CAP: tl.constexpr = False,
    HAS_Z: tl.constexpr = False,
):
    """Gradients of the per-row losses; one program per BLOCK_R rows.

    x_ptr, target_ptr, weight_ptr: as in the forward; wsum_ptr: (1,) W (hard targets with
    smoothing and weights); lse_ptr, s_ptr: (N * L,) from the forward
    dloss_ptr:  (N, L) fp32/fp64 upstream gradient of each row's loss, the reduction's
                denominator folded in; strides 0 for a broadcast scalar
    dx_ptr:     (N, C, L) out, x's dtype, any strides (may alias x: each tile is read
                before it is written); written if NEED_DX
    dy_ptr:     (N, C, L) out, the target's dtype; written if NEED_DY (soft only)
    eps_ptr:    (1,) label smoothing, fp32 (fp64 if IS_FP64)
    zgrad_ptr:  (N * L,) fp32 with HAS_Z: each row's z-loss ``gz`` (0 where ignored), whose
                gradient ``gz p_c`` is added
    scale, softcap: the logit transform with TRANSFORM (and HAS_CAP), as in the forward;
                the gradient with respect to ``z`` is multiplied by ``dz/dx``
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    # read from memory: a float kernel argument would be fp32, too coarse for fp64
    label_smoothing = tl.load(eps_ptr).to(ACC)
    rows, row_mask, n, l_idx = _rows(tl.program_id(0), n_rows, n_l, BLOCK_R)
    x_offs = n * x_stride_n + l_idx * x_stride_l
    t_offs = n * target_stride_n + l_idx * target_stride_l
    if HAS_Z:
        gz = tl.load(zgrad_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    dx_offs = n * dx_stride_n + l_idx * dx_stride_l
    dy_offs = n * dy_stride_n + l_idx * dy_stride_l
    g = tl.load(dloss_ptr + n * dloss_stride_n + l_idx * dloss_stride_l, mask=row_mask,
                other=0.0).to(ACC)
    # lse (fp64) as hi + lo in ACC: x - hi is exact near the row's max, however far the
    # row lies from 0
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float64)
    hi = lse.to(ACC)
    lo = (lse - hi.to(tl.float64)).to(ACC)
    if SOFT:
        s = tl.load(s_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    else:
        t, ignored, valid, w_t = _targets(target_ptr, t_offs, row_mask, weight_ptr, n_cols,
                                          ignore_index, HAS_WEIGHT, ACC)
        g = tl.where(ignored, 0.0, tl.where(valid, g, float("nan")))
        B = (1.0 - label_smoothing) * w_t
        A = B
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                W = tl.load(wsum_ptr).to(ACC)
            else:
                W = tl.zeros((), ACC) + n_cols  # (no .to(): n_cols == 1 is a constexpr)
            A = B + label_smoothing * W / n_cols
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        c_offs = cols[None, :].to(tl.int64)
        x = tl.load(x_ptr + x_offs[:, None] + c_offs * x_stride_c, mask=mask,
                    other=0.0).to(ACC)
        if TRANSFORM:  # z in x (-inf in masked lanes: p = 0 there)
            x, dz = _logits(x, mask, scale, softcap, TRANSFORM, HAS_CAP)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
        else:
            w = tl.full((1, BLOCK_C), 1.0, ACC)
        if SOFT:
            if NEED_DY:
                dy = ((1.0 - label_smoothing) * w * ((hi[:, None] - x) + lo[:, None])
                      * g[:, None])
                tl.store(dy_ptr + dy_offs[:, None] + c_offs * dy_stride_c,
                         _narrowed(dy, dy_ptr.dtype.element_ty), mask=mask)
            if NEED_DX:
                y = tl.load(target_ptr + t_offs[:, None] + c_offs * target_stride_c,
                            mask=mask, other=0.0).to(ACC)
                if HAS_SMOOTHING:
                    y = y * (1.0 - label_smoothing) + label_smoothing / n_cols
                p = _exp((x - hi[:, None]) - lo[:, None], IS_FP64)
                dx = (p * s[:, None] - w * y) * g[:, None]
                dx = _through_extras(dx, p, gz if HAS_Z else 0.0, dz if TRANSFORM else 1.0,
                                     TRANSFORM, HAS_Z)
                tl.store(dx_ptr + dx_offs[:, None] + c_offs * dx_stride_c,
                         _narrowed(dx, dx_ptr.dtype.element_ty), mask=mask)
        else:
            p = _exp((x - hi[:, None]) - lo[:, None], IS_FP64)
            # p * A - B stays exact when A == B and p is near 1 (confident predictions)
            dx = p * A[:, None] - tl.where(cols[None, :] == t[:, None], B[:, None], 0.0)
            if HAS_SMOOTHING:
                dx -= label_smoothing / n_cols * w
            dx = dx * g[:, None]
            dx = _through_extras(dx, p, gz if HAS_Z else 0.0, dz if TRANSFORM else 1.0,
                                 TRANSFORM, HAS_Z)
            tl.store(dx_ptr + dx_offs[:, None] + c_offs * dx_stride_c,
                     _narrowed(dx, dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _through_extras(dx, p, gz, dz, TRANSFORM: tl.constexpr, HAS_Z: tl.constexpr):
    """The gradient ``dx`` with respect to ``z`` plus the z-loss's ``gz p`` (``gz`` per
    row), times ``dz/dx``."""
    if HAS_Z:
        dx += gz[:, None] * p
    if TRANSFORM:
        dx = dx * dz
    return dx


def _blocks(x, n_rows, is_fp64=False):
    """Tile shape: along the classes when they are contiguous, else along the rows. In
    float64 a quarter of the elements: a tile of MAX_TILE 8-byte values spilled registers
    with class weights and label smoothing (388 bytes on sm_80, 328 on sm_90; a half tile
    still 8-36 bytes)."""
    n_cols = x.shape[1]
    tile = MAX_TILE // 4 if is_fp64 else MAX_TILE
    block_c_full = triton.next_power_of_2(max(n_cols, 1))
    if x.stride(1) == 1 or n_cols == 1:
        block_c = min(block_c_full, tile)
        block_r = min(max(1, tile // block_c), triton.next_power_of_2(max(n_rows, 1)), 16)
    else:
        block_r = min(triton.next_power_of_2(max(n_rows, 1)), 64)
        block_c = min(block_c_full, max(1, tile // block_r))
    return block_r, block_c


def _target_strides(target, soft):
    if soft:
        return target.stride(0), target.stride(1), target.stride(2)
    return target.stride(0), 0, target.stride(1)


def _fp32_extras(extras, is_fp64):
    """The launch arguments of ``extras``' transform; the kernels' transform is fp32 only."""
    if extras is not None and extras.transform and is_fp64:
        raise ValueError("the strided kernels transform logits in float32 only; float64 "
                         "goes to fusedce.cpu")
    return transform_args(extras)


def ce_strided_fwd(x, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                   extras=None, aux_out=None):
    """Per-row ``(loss, lse, s)`` of ``x`` (N, C, L): each (N * L,), fp32 (fp64 if the
    logits or probabilities are fp64), lse fp64; ``s`` is empty for class-index targets.

    ``target`` is (N, L) integer class indices or (N, C, L) float probabilities. With
    ``extras`` (fp32 only) the loss and lse are of the transformed logits; ``aux_out`` (2,
    N * L), where given, receives each row's entropy and correctness.
    """
    n, n_cols, l_len = x.shape
    soft = target.is_floating_point()
    is_fp64 = torch.float64 in (x.dtype, target.dtype if soft else x.dtype,
                                weight.dtype if weight is not None else x.dtype)
    acc = torch.float64 if is_fp64 else torch.float32
    n_rows = n * l_len
    loss = torch.empty(n_rows, dtype=acc, device=x.device)
    lse = torch.empty(n_rows, dtype=torch.float64, device=x.device)
    s = torch.empty(n_rows if soft else 0, dtype=acc, device=x.device)
    if n_rows == 0:
        return loss, lse, s
    block_r, block_c = _blocks(x, n_rows, is_fp64)
    _ce_strided_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x_ptr=x, x_stride_n=x.stride(0), x_stride_c=x.stride(1), x_stride_l=x.stride(2),
        target_ptr=target, **dict(zip(("target_stride_n", "target_stride_c",
                                       "target_stride_l"), _target_strides(target, soft))),
        weight_ptr=weight if weight is not None else loss,
        loss_ptr=loss, lse_ptr=lse, s_ptr=s if soft else loss,
        aux_ptr=aux_out if aux_out is not None else loss,
        aux_stride=aux_out.stride(0) if aux_out is not None else 0,
        eps_ptr=torch.full((1,), float(label_smoothing), dtype=acc, device=x.device),
        n_rows=n_rows, n_l=l_len, n_cols=n_cols, ignore_index=int(ignore_index),
        SOFT=soft, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0,
        IS_FP64=is_fp64, BLOCK_R=block_r, BLOCK_C=block_c, AUX=aux_out is not None,
        **_fp32_extras(extras, is_fp64),
        num_warps=extras_warps(NUM_WARPS, extras),
    )
    return loss, lse, s


def ce_strided_bwd(x, target, lse, s, dloss, weight=None, ignore_index=-100,
                   label_smoothing=0.0, dx=None, need_dx=True, need_dtarget=False,
                   extras=None, z_grad=None):
    """Gradients of ``sum(loss * dloss)``: ``(dx, dtarget)``, ``None`` where not asked.

    ``dloss`` is (N, L) with any strides (0 for a broadcast scalar). ``dx`` may be given,
    and may be ``x`` itself. ``dtarget`` exists for probability targets only. With
    ``extras`` (fp32 only) the gradient goes through the logit transform, and the z-loss's
    per-row ``z_grad`` (N * L,) adds ``z_grad * p``.
    """
    n, n_cols, l_len = x.shape
    soft = target.is_floating_point()
    is_fp64 = torch.float64 in (x.dtype, target.dtype if soft else x.dtype,
                                weight.dtype if weight is not None else x.dtype)
    acc = torch.float64 if is_fp64 else torch.float32
    n_rows = n * l_len
    if need_dx and dx is None:
        dx = torch.empty_like(x)  # keeps x's strides when x is dense
    dy = torch.empty_like(target) if (soft and need_dtarget) else None
    if n_rows == 0 or not (need_dx or dy is not None):
        return dx, dy
    has_weight = weight is not None
    wsum = lse
    if has_weight and label_smoothing > 0 and not soft:
        wsum = weight.sum(dtype=acc).reshape(1)
    dx_arg = dx if dx is not None else x
    dy_arg = dy if dy is not None else x
    block_r, block_c = _blocks(x, n_rows, is_fp64)
    _ce_strided_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x_ptr=x, x_stride_n=x.stride(0), x_stride_c=x.stride(1), x_stride_l=x.stride(2),
        target_ptr=target, **dict(zip(("target_stride_n", "target_stride_c",
                                       "target_stride_l"), _target_strides(target, soft))),
        weight_ptr=weight if has_weight else lse, wsum_ptr=wsum,
        lse_ptr=lse, s_ptr=s if soft else lse,
        dloss_ptr=dloss, dloss_stride_n=dloss.stride(0), dloss_stride_l=dloss.stride(1),
        dx_ptr=dx_arg, dx_stride_n=dx_arg.stride(0), dx_stride_c=dx_arg.stride(1),
        dx_stride_l=dx_arg.stride(2),
        dy_ptr=dy_arg, dy_stride_n=dy_arg.stride(0), dy_stride_c=dy_arg.stride(1),
        dy_stride_l=dy_arg.stride(2),
        eps_ptr=torch.full((1,), float(label_smoothing), dtype=acc, device=x.device),
        zgrad_ptr=z_grad if z_grad is not None else lse,
        n_rows=n_rows, n_l=l_len, n_cols=n_cols, ignore_index=int(ignore_index),
        SOFT=soft, HAS_WEIGHT=has_weight, HAS_SMOOTHING=label_smoothing > 0,
        NEED_DX=need_dx, NEED_DY=dy is not None, IS_FP64=is_fp64,
        BLOCK_R=block_r, BLOCK_C=block_c, HAS_Z=z_grad is not None,
        **_fp32_extras(extras, is_fp64),
        num_warps=extras_warps(NUM_WARPS, extras),
    )
    return dx, dy
