"""Fused cross-entropy kernels (Triton) and their launchers.

Notation, per row ``i`` of logits ``x`` (``C`` classes), target ``t``, class weights ``w``
(all ones when absent), ``W = sum_c w_c`` and label smoothing ``eps``:

    lse      = m + log(sum_c exp(x_c - m))                 m = max_c x_c
    loss     = (1 - eps) * w_t * (lse - x_t) + eps / C * sum_c w_c (lse - x_c)
    dloss/dx = (p_c * A - B * [c == t] - eps / C * w_c) * g
               p_c = exp(x_c - lse),  B = (1 - eps) * w_t,  A = B + eps * W / C

``g`` is the row's upstream gradient with the reduction's denominator folded in.

The loss extras (``fusedce._args.Extras``) replace ``x`` by ``z = s tanh(a x / s)`` (``a x``
without a softcap ``s``; ``a`` the logit scale) as it is loaded, so that every formula above
holds with ``z`` for ``x``; the gradient is then multiplied by ``dz/dx = a (1 - (z / s)**2)``.
A z-loss adds ``gz p_c`` to the gradient (``gz = 2 lse_square_scale lse`` times the row's
upstream gradient and its own denominator). The forward can also return each row's entropy
``log d - S1 / d`` (``d = sum exp(z - m)``, ``S1 = sum exp(z - m) (z - m)``, rescaled with
``d`` as the max grows) and whether the first column holding the row's max is the target.

A row whose
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


# Row layout. A row of 50,257 bf16 logits is 100,514 bytes, so consecutive rows start at
# every possible 16-byte phase and a load that starts at the row start can never be proven
# aligned: the compiler emits one 2-byte load per element. Each pass therefore splits the
# row ``[lo, hi)`` (element offsets from the tensor's base pointer, which Triton specialises
# as 16-byte aligned when it is) at the 16-byte boundaries inside it:
#
#     base    a_lo = ceil(lo / VEC) * VEC          a_hi = floor(hi / VEC) * VEC
#      |  lo  |                                    |  hi
#      |--[ head ][ body: VEC-aligned blocks of BLOCK_SIZE, mask k < L ][ tail ]--|
#
# ``VEC`` elements make 16 bytes. The body starts at an address the compiler can prove is a
# multiple of 16 bytes, and its mask ``k < L`` changes only at multiples of VEC, so every
# body load and store is one 16-byte instruction (LDG.E.128 / STG.E.128). The head and the
# tail (fewer than VEC elements each) go together through one small masked "edge" block of
# 2 * VEC lanes. Nothing outside the row is read or written. VEC = 1 gives the plain
# unaligned loop (head and tail empty), kept for the launch-parameter sweep.


@triton.jit
def _row_layout(row_start, n_cols, VEC: tl.constexpr):
    """For the row at element offset ``row_start`` (int64) from an aligned base: the
    offset of its first VEC-aligned element ``a_lo``, the head length ``head = a_lo - lo``
    (in [0, VEC)) and the aligned body length ``L`` (a multiple of VEC, negative when the
    row holds no aligned VEC-group: then the body loop runs zero times)."""
    a_lo = (row_start + (VEC - 1)) // VEC * VEC
    a_hi = (row_start + n_cols) // VEC * VEC
    head = (a_lo - row_start).to(tl.int32)
    body_len = (a_hi - a_lo).to(tl.int32)
    return a_lo, head, body_len


@triton.jit
def _edge_cols(head, body_len, n_cols, VEC: tl.constexpr):
    """Columns of the edge block (2 * VEC lanes): lanes [0, VEC) are the head columns
    [0, head), lanes [VEC, 2 VEC) the tail columns [head + L, n_cols); and which lanes
    hold a column of the row."""
    j = tl.arange(0, 2 * VEC)
    is_head = j < VEC
    cols = tl.where(is_head, j, head + body_len - VEC + j)
    valid = (cols < n_cols) & tl.where(is_head, cols < head, cols >= head)
    return cols, valid


@triton.jit
def _lse_step(x, w_ptrs, mask, m, d, q, w_seen, HAS_WEIGHT: tl.constexpr,
              HAS_SMOOTHING: tl.constexpr):
    """Folds one block of a row (``x`` fp32 with -inf in masked lanes; ``w_ptrs`` the
    addresses of its columns' class weights) into the online-softmax state ``(m, d)`` and,
    with smoothing, ``q = sum_c w_c (x_c - ref)`` and ``w_seen = sum_c w_c`` so far.

    Online softmax (Milakov & Gimelshein 2018): ``m`` is the running max and ``d`` the sum
    of ``exp(x - m)``, rescaled by ``exp(m_old - m_new)`` whenever ``m`` grows. ``q`` is
    kept relative to the same reference (``ref``: ``m``, or 0 while it is -inf): every term
    is at most 0, so logits shifted by a large constant lose nothing to cancellation (a raw
    ``sum w x`` at 1e4 would, in ``W lse - sum w x``).
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # a block of -inf only (masked vocab) must not make (-inf) - (-inf) = NaN
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    # the subtraction first: x - m_ref is exact near the max, so d is the sum relative to
    # m itself, however far the row lies from 0. (x * LOG2E - m_ref * LOG2E, one FFMA,
    # shifted every term by the rounding of m_ref * LOG2E, about one ulp of m: 4 at 1e8.)
    e = tl.exp2((x - m_ref) * LOG2E)
    d = d * tl.exp2((m - m_ref) * LOG2E) + tl.sum(e, axis=0)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        else:
            w = tl.where(mask, 1.0, 0.0)
        old_ref = tl.where(m == float("-inf"), 0.0, m)
        # w_seen is 0 while m is -inf: no 0 * inf
        q = tl.where(w_seen == 0.0, q, q - (m_ref - old_ref) * w_seen)
        q += tl.sum(tl.where(mask, w * (x - m_ref), 0.0), axis=0)
        w_seen += tl.sum(w, axis=0)
    return m_new, d, q, w_seen


@triton.jit
def _tanh(y):
    """``(tanh(y), 1 - tanh(y)**2)`` from ``e = exp(-2 |y|)``: ``(1 - e) / (1 + e)`` and
    ``4 e / (1 + e)**2``, neither of which cancels for large ``|y|`` (Triton's interpreter
    has no libdevice tanh). Below ``|y| = 0.3``, where ``1 - e`` would lose ``tanh``'s
    relative precision (a softcap of 1e5 was off by 2e-3), its odd Taylor series to
    ``y**9`` (the next term is below 2**-24 of ``tanh`` there)."""
    e = tl.exp2(tl.abs(y) * (-2.0 * LOG2E))
    th = (1.0 - e) / (1.0 + e)
    th = tl.where(y < 0, -th, th)
    y2 = y * y
    series = y * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0
                                                                     + y2 * (62.0 / 2835.0)))))
    th = tl.where(tl.abs(y) < 0.3, series, th)
    return th, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _logits(x, mask, scale, softcap, TRANSFORM: tl.constexpr, HAS_CAP: tl.constexpr):
    """``(z, dz/dx)`` of loaded logits ``x`` (fp32): ``z = softcap * tanh(scale * x /
    softcap)`` (``scale * x`` without HAS_CAP), -inf in the lanes outside ``mask`` (a padded
    lane capped to ``-softcap`` would count as a class). Unchanged without TRANSFORM."""
    dz = scale
    if TRANSFORM:
        z = x * scale
        if HAS_CAP:
            th, dth = _tanh(z / softcap)
            z = softcap * th
            dz = scale * dth
        x = tl.where(mask, z, float("-inf"))
    return x, dz


@triton.jit
def _aux_step(z, cols, m_old, m_new, d_old, s1, arg, n_cols):
    """Folds one block into the entropy's running ``s1 = sum exp(z - m) (z - m)`` (rescaled
    with ``d`` when the max grows from ``m_old`` to ``m_new``; ``d_old`` is ``d`` before the
    block) and ``arg``, the first column holding the running max (int32; ``n_cols`` before
    any), or ``-1 - c`` once a NaN has been seen, ``c`` the first NaN's column: NaN counts
    as the largest value, as in ``torch.argmax``. A -inf logit adds 0 (the limit of
    ``p log p``)."""
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    old_ref = tl.where(m_old == float("-inf"), 0.0, m_old)
    s1 = tl.where(d_old == 0.0, 0.0,
                  tl.exp2((old_ref - ref) * LOG2E) * (s1 + (old_ref - ref) * d_old))
    e = tl.exp2((z - ref) * LOG2E)
    s1 += tl.sum(tl.where(z > float("-inf"), e * (z - ref), 0.0), axis=0)
    b_max = tl.max(z, axis=0)
    b_arg = tl.min(tl.where(z == b_max, cols, n_cols), axis=0)
    # the edge block holds the row's last columns too: on a tie the smaller column wins,
    # and of two NaN the smaller column (-1 - n_cols, where the block has none, is below
    # every NaN's code)
    by_max = tl.where(b_max > m_old, b_arg,
                      tl.where(b_max == m_old, tl.minimum(arg, b_arg), arg))
    nan_code = -1 - tl.min(tl.where(z != z, cols, n_cols), axis=0)
    arg = tl.where(arg < 0, tl.maximum(arg, nan_code),
                   tl.where(nan_code >= -n_cols, nan_code, by_max))
    return s1, arg


@triton.jit
def _row_lse(x_ptr, row_start, n_cols, t_col, weight_ptr, scale, softcap,
             BLOCK_SIZE: tl.constexpr, VEC: tl.constexpr, HAS_WEIGHT: tl.constexpr,
             HAS_SMOOTHING: tl.constexpr, TRANSFORM: tl.constexpr, HAS_CAP: tl.constexpr,
             AUX: tl.constexpr):
    """One pass over the row at ``x_ptr + row_start``: returns ``(lse, x_t, smooth,
    w_seen, entropy, arg, m, log_d)``, fp32, ``lse = m + log_d`` rounded (``m`` the max,
    or 0 where it is -inf, and ``log_d`` kept apart where the sum must not lose ``log_d``
    to ``m``'s size), where with smoothing ``smooth = sum_c w_c (lse - x_c)``
    (a sum of terms >= 0, so ``W lse - sum w x`` without its cancellation) and ``w_seen =
    sum_c w_c`` over the row (0 without smoothing). With AUX, the row's entropy and the
    first column of its max (``_aux_step``: NaN counts as the largest value; else 0 and
    ``n_cols``); ``m`` is the max (with AUX, NaN for a row holding NaN).
    With TRANSFORM all of it is of the transformed logits ``z`` (``_logits``).

    Reads each logit of the row exactly once (edge block, then the aligned body). ``x[t]``
    (``t_col``: int32, -1 when there is none) is picked up on the way, by a reduction only
    in the block that holds it: a branch taken alike by all the program's threads.
    """
    a_lo, head, body_len = _row_layout(row_start, n_cols, VEC)
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    q = tl.zeros((), tl.float32)
    w_seen = tl.zeros((), tl.float32)
    s1 = tl.zeros((), tl.float32)
    # (not n_cols.to(): Triton passes an integer argument equal to 1 as a constexpr int,
    # which has no .to, and one class (C = 1, a width-1 vocab shard) failed to compile)
    arg = tl.zeros((), tl.int32) + n_cols
    # head and tail: -inf in the masked lanes, exp of it is 0, so they add nothing to d
    e_cols, e_valid = _edge_cols(head, body_len, n_cols, VEC)
    e_x = tl.load(x_ptr + row_start + e_cols, mask=e_valid, other=float("-inf"))
    e_x, _e_dz = _logits(e_x.to(tl.float32), e_valid, scale, softcap, TRANSFORM, HAS_CAP)
    x_t = tl.sum(tl.where(e_valid & (e_cols == t_col), e_x, 0.0), axis=0)
    m_old, d_old = m, d
    m, d, q, w_seen = _lse_step(e_x, weight_ptr + e_cols, e_valid, m, d, q, w_seen,
                                HAS_WEIGHT, HAS_SMOOTHING)
    if AUX:
        s1, arg = _aux_step(e_x, e_cols, m_old, m, d_old, s1, arg, n_cols)
    body_ptr = x_ptr + a_lo  # 16-byte aligned whenever x_ptr is
    lanes = tl.arange(0, BLOCK_SIZE)
    t_body = t_col - head  # the target's index in the body, if it lies there
    t_in_body = (t_body >= 0) & (t_body < body_len)
    for start in range(0, body_len, BLOCK_SIZE):
        k = start + lanes
        mask = k < body_len
        x = tl.load(body_ptr + k, mask=mask, other=float("-inf")).to(tl.float32)
        x, _dz = _logits(x, mask, scale, softcap, TRANSFORM, HAS_CAP)
        if t_in_body & (t_body >= start) & (t_body < start + BLOCK_SIZE):
            x_t += tl.sum(tl.where(lanes == t_body - start, x, 0.0), axis=0)
        m_old, d_old = m, d
        m, d, q, w_seen = _lse_step(x, weight_ptr + head + k, mask, m, d, q, w_seen,
                                    HAS_WEIGHT, HAS_SMOOTHING)
        if AUX:
            s1, arg = _aux_step(x, head + k, m_old, m, d_old, s1, arg, n_cols)
    log_d = tl.log(d)
    lse = tl.where(m == float("-inf"), 0.0, m) + log_d
    smooth = w_seen * log_d - q
    if AUX:
        # a row holding NaN: its first NaN is the argmax, and its max NaN, on a GPU too
        # (whose max skips NaN), so that a merge of partial rows finds it
        m = tl.where(arg < 0, float("nan"), m)
        arg = tl.where(arg < 0, -1 - arg, arg)
    return lse, x_t, smooth, w_seen, log_d - s1 / d, arg, m, log_d


@triton.jit
def _fp32(value):
    """A float argument as fp32. On a GPU it is one already; Triton's interpreter types a
    Python float below 2**-126 (an fp32 subnormal, e.g. label_smoothing=1e-45) as fp64,
    which would promote the kernel's math to fp64 and break its casts to bf16 there."""
    return tl.cast(value, tl.float32)


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
def _target_col(t, n_cols):
    """The target as an int32 column (n_cols < 2**31), -1 when out of range: a 64-bit
    compare per element would cost several integer instructions in the loops."""
    return tl.where((t >= 0) & (t < n_cols), t, -1).to(tl.int32)


@triton.jit
def _grad_block(x, hit, w_ptrs, mask, hi, lo2, g, A, B, n_cols, label_smoothing, gz,
                HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr):
    """``dx = (p * A - B * onehot(t) - eps / C * w) * g`` (``+ gz * p`` with HAS_Z, the
    z-loss) for one block, fp32; ``p = exp(x - lse)`` for the row's ``lse = hi + lo2 /
    log2(e)`` (``_lse_parts``): ``x - hi`` is exact near the row's max.

    ``hit`` is the block's one-hot of the target; ``w_ptrs`` the class weights' addresses
    (read only with smoothing and weights).
    """
    p = tl.exp2((x - hi) * LOG2E - lo2)
    # p * A - B stays exact when A == B and p is near 1 (confident bf16 predictions)
    dx = p * A - tl.where(hit, B, 0.0)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
            dx -= label_smoothing / n_cols * w
        else:
            dx -= label_smoothing / n_cols
    dx = dx * g
    if HAS_Z:
        dx += p * gz
    return dx


@triton.jit
def _row_grad(x_ptr, x_row_start, dx_ptr, dx_row_start, n_cols, t, hi, lo2, g, w_t,
              weight_ptr, W, label_smoothing, scale, softcap, gz, BLOCK_SIZE: tl.constexpr,
              VEC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
              SAME_LAYOUT: tl.constexpr, TRANSFORM: tl.constexpr, HAS_CAP: tl.constexpr,
              HAS_Z: tl.constexpr):
    """One pass over a row: reads each logit once and writes each gradient element once;
    ``(hi, lo2)`` the row's lse (``_grad_block``). With TRANSFORM the gradient is that of
    the transformed logits times ``dz/dx``; with HAS_Z the z-loss's ``gz * p`` is added
    (``_grad_block``).

    The loop is aligned to ``x``'s row. With SAME_LAYOUT (``dx`` rows start where ``x``
    rows do: same row stride, e.g. ``dx`` made by ``empty_like(x)`` or ``x`` itself) the
    offsets are reused for ``dx`` and the stores are 16 bytes wide too; otherwise the
    stores use ``dx``'s own row start and stay correct, only narrower.
    """
    B = (1.0 - label_smoothing) * w_t
    A = B
    if HAS_SMOOTHING:
        A = B + label_smoothing * W / n_cols
    a_lo, head, body_len = _row_layout(x_row_start, n_cols, VEC)
    t_col = _target_col(t, n_cols)  # an ignored row has B == 0 whatever t is
    out_ty = dx_ptr.dtype.element_ty
    if SAME_LAYOUT:
        dx_row_start = x_row_start
        dx_body_ptr = dx_ptr + a_lo
    else:
        dx_body_ptr = dx_ptr + dx_row_start + head
    e_cols, e_valid = _edge_cols(head, body_len, n_cols, VEC)
    e_x = tl.load(x_ptr + x_row_start + e_cols, mask=e_valid, other=0.0).to(tl.float32)
    e_x, e_dz = _logits(e_x, e_valid, scale, softcap, TRANSFORM, HAS_CAP)
    e_dx = _grad_block(e_x, e_cols == t_col, weight_ptr + e_cols, e_valid, hi, lo2, g, A, B,
                       n_cols, label_smoothing, gz, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z)
    if TRANSFORM:
        e_dx *= e_dz
    tl.store(dx_ptr + dx_row_start + e_cols, e_dx.to(out_ty), mask=e_valid)
    x_body_ptr = x_ptr + a_lo
    w_body_ptr = weight_ptr + head
    lanes = tl.arange(0, BLOCK_SIZE)
    t_body = t_col - head  # the target's index in the body (may be negative: not there)
    for start in range(0, body_len, BLOCK_SIZE):
        k = start + lanes
        mask = k < body_len
        x = tl.load(x_body_ptr + k, mask=mask, other=0.0).to(tl.float32)
        x, dz = _logits(x, mask, scale, softcap, TRANSFORM, HAS_CAP)
        # lanes == t_body - start: one 32-bit compare against a loop-invariant register
        dx = _grad_block(x, lanes == t_body - start, w_body_ptr + k, mask, hi, lo2, g, A,
                         B, n_cols, label_smoothing, gz, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z)
        if TRANSFORM:
            dx *= dz
        tl.store(dx_body_ptr + k, dx.to(out_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(
    x_ptr, x_row_stride,
    dx_ptr, dx_row_stride,
    target_ptr,
    weight_ptr, wsum_ptr,
    loss_ptr, lse_ptr,
    gscale_ptr,
    aux_ptr, aux_stride, zscale_ptr,
    n_cols, ignore_index, label_smoothing, scale, softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    SAME_LAYOUT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    VEC: tl.constexpr,
    TRANSFORM: tl.constexpr = False,
    HAS_CAP: tl.constexpr = False,
    AUX: tl.constexpr = False,
    HAS_Z: tl.constexpr = False,
):
    """Per-row loss and log-sum-exp; one program per row.

    x_ptr:      (rows, n_cols) fp32/bf16/fp16, unit column stride, row stride ``x_row_stride``
    target_ptr: (rows,) int64 or int32
    weight_ptr: (n_cols,) class weights (read only if HAS_WEIGHT); wsum_ptr: (1,) fp32, W
    loss_ptr:   (rows,) fp32 out, the row's loss (0 if ignored, NaN if target out of range)
    lse_ptr:    (rows,) fp64 out, log-sum-exp of the row (its max and log-sum rounded
                once: the backward's ``p`` keeps log-sum where the row lies far from 0)
    gscale_ptr: (1,) fp32, read only if HAS_GRAD: the gradient's scale (1 / denominator),
                with which the row's gradient is written into the row of ``dx``
    dx_ptr:     (rows, n_cols) out if HAS_GRAD, dtype of x, unit column stride (may be x
                itself); SAME_LAYOUT when its row stride is x's (then 16-byte stores)
    VEC:        elements per 16 bytes of x (8 for 16-bit, 4 for fp32); 1 turns off the
                aligned body (see "Row layout" above)
    scale, softcap: the logit transform, with TRANSFORM (and HAS_CAP), see ``_logits``
    aux_ptr:    (2, rows) fp32 out with AUX, row stride ``aux_stride``: each row's entropy,
                and 1.0 where the first column of its max is its target (0.0 if ignored)
    zscale_ptr: (1,) fp32, read with HAS_GRAD and HAS_Z: the z-loss gradient's
                ``gz = zscale * lse`` (``2 lse_square_scale / its denominator``)
    """
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 near 42,700 rows
    row_start = row * x_row_stride
    label_smoothing = _fp32(label_smoothing)
    t, ignored, valid, w_t = _row_target(target_ptr, row, weight_ptr, n_cols, ignore_index,
                                         HAS_WEIGHT)
    t_col = _target_col(t, n_cols)
    lse, x_t, smooth, _, entropy, arg, m, log_d = _row_lse(
        x_ptr, row_start, n_cols, t_col, weight_ptr, scale, softcap, BLOCK_SIZE, VEC,
        HAS_WEIGHT, HAS_SMOOTHING, TRANSFORM, HAS_CAP, AUX)
    m = tl.where(m == float("-inf"), 0.0, m)
    # lse - x_t as (m - x_t) + log_d: keeps log_d where m is far from 0 (PyTorch's order)
    loss = (1.0 - label_smoothing) * w_t * ((m - x_t) + log_d)
    W = 0.0
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            W = tl.load(wsum_ptr).to(tl.float32)
        else:
            W = tl.zeros((), tl.float32) + n_cols  # (no .to(): C == 1 is a constexpr)
        # smooth = W * lse - sum_c w_c x_c; eps * (smooth / C): eps / C would flush a
        # subnormal eps to 0, and 0 * inf (a -inf logit) is NaN where PyTorch has +inf
        loss += label_smoothing * (smooth / n_cols)
    nan = float("nan")
    loss = tl.where(ignored, 0.0, tl.where(valid, loss, nan))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, m.to(tl.float64) + log_d.to(tl.float64))
    if AUX:
        tl.store(aux_ptr + row, entropy)
        tl.store(aux_ptr + aux_stride + row, tl.where(valid & (arg == t_col), 1.0, 0.0))
    if HAS_GRAD:
        g = tl.load(gscale_ptr).to(tl.float32)
        g = tl.where(ignored, 0.0, tl.where(valid, g, nan))
        gz = 0.0
        if HAS_Z:
            gz = tl.where(ignored, 0.0, tl.load(zscale_ptr).to(tl.float32) * lse)
        # the row was just streamed through: on a GPU this second read comes from L2
        _row_grad(x_ptr, row_start, dx_ptr, row * dx_row_stride, n_cols, t, m,
                  log_d * LOG2E, g, w_t, weight_ptr, W, label_smoothing, scale, softcap, gz,
                  BLOCK_SIZE, VEC, HAS_WEIGHT, HAS_SMOOTHING, SAME_LAYOUT, TRANSFORM, HAS_CAP,
                  HAS_Z)


@triton.jit
def _ce_bwd_kernel(
    x_ptr, x_row_stride,
    dx_ptr, dx_row_stride,
    target_ptr,
    weight_ptr, wsum_ptr,
    lse_ptr,
    dloss_ptr, dloss_stride,
    zgrad_ptr,
    n_cols, ignore_index, label_smoothing, scale, softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SAME_LAYOUT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    VEC: tl.constexpr,
    TRANSFORM: tl.constexpr = False,
    HAS_CAP: tl.constexpr = False,
    HAS_Z: tl.constexpr = False,
):
    """Gradient of the per-row losses; one program per row.

    x_ptr:      (rows, n_cols) fp32/bf16/fp16 logits, unit column stride
    dx_ptr:     (rows, n_cols) out, same dtype as x, unit column stride; SAME_LAYOUT when
                ``dx_row_stride == x_row_stride`` (then 16-byte stores, see ``_row_grad``)
    target_ptr: (rows,) int64/int32; weight_ptr: (n_cols,); wsum_ptr: (1,) fp32
    lse_ptr:    (rows,) fp64 from the forward
    dloss_ptr:  (rows,) fp32 upstream gradient of each row's loss, the reduction's
                denominator folded in; ``dloss_stride`` is 0 for a broadcast scalar
    zgrad_ptr:  (rows,) fp32 with HAS_Z: each row's z-loss ``gz`` (0 where ignored)
    scale, softcap: the logit transform, with TRANSFORM (and HAS_CAP), see ``_logits``
    """
    row = tl.program_id(0).to(tl.int64)
    t, w_t, g, hi, lo2, W = _grad_row_state(row, target_ptr, weight_ptr, wsum_ptr, lse_ptr,
                                            dloss_ptr, dloss_stride, n_cols, ignore_index,
                                            HAS_WEIGHT, HAS_SMOOTHING)
    gz = 0.0
    if HAS_Z:
        gz = tl.load(zgrad_ptr + row)
    _row_grad(x_ptr, row * x_row_stride, dx_ptr, row * dx_row_stride, n_cols, t, hi, lo2, g,
              w_t, weight_ptr, W, _fp32(label_smoothing), scale, softcap, gz, BLOCK_SIZE, VEC,
              HAS_WEIGHT, HAS_SMOOTHING, SAME_LAYOUT, TRANSFORM, HAS_CAP, HAS_Z)


@triton.jit
def _grad_row_state(row, target_ptr, weight_ptr, wsum_ptr, lse_ptr, dloss_ptr, dloss_stride,
                    n_cols, ignore_index, HAS_WEIGHT: tl.constexpr,
                    HAS_SMOOTHING: tl.constexpr):
    """What a backward needs of a row besides its logits: the target, its class weight, the
    upstream gradient (0 if ignored, NaN if out of range), the lse as ``_grad_block``'s
    ``(hi, lo2)`` (``_lse_parts``) and ``W``."""
    t, ignored, valid, w_t = _row_target(target_ptr, row, weight_ptr, n_cols, ignore_index,
                                         HAS_WEIGHT)
    g = tl.load(dloss_ptr + row * dloss_stride).to(tl.float32)
    g = tl.where(ignored, 0.0, tl.where(valid, g, float("nan")))
    hi, lo2 = _lse_parts(tl.load(lse_ptr + row))
    W = 0.0
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            W = tl.load(wsum_ptr).to(tl.float32)
        else:
            W = tl.zeros((), tl.float32) + n_cols  # (no .to(): C == 1 is a constexpr)
    return t, w_t, g, hi, lo2, W


@triton.jit
def _lse_parts(lse):
    """A float64 lse as ``(hi, lo2)``, fp32: ``hi`` the lse rounded, ``lo2`` the rest in
    units of log2(e) (``_grad_block``'s ``p = exp2((x - hi) log2(e) - lo2)``)."""
    lse = lse.to(tl.float64)
    hi = lse.to(tl.float32)
    return hi, ((lse - hi.to(tl.float64)) * LOG2E).to(tl.float32)


@triton.jit
def _ce_scale_kernel(dx_ptr, dx_row_stride, dloss_ptr, dloss_stride, n_cols,
                     BLOCK_SIZE: tl.constexpr, VEC: tl.constexpr):
    """``dx[row] *= dloss[row]`` in place, skipping rows whose factor is exactly 1.

    The in-place mode's backward: the forward already wrote the gradient for an upstream
    gradient of 1, so the common ``loss.backward()`` moves no logits-sized bytes at all, and
    the check happens on the device (no host synchronisation).
    dx_ptr: (rows, n_cols) fp32/bf16/fp16; dloss_ptr: (rows,) fp32, stride 0 for a scalar.
    """
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(dloss_ptr + row * dloss_stride).to(tl.float32)
    if g != 1.0:
        row_start = row * dx_row_stride
        a_lo, head, body_len = _row_layout(row_start, n_cols, VEC)
        e_cols, e_valid = _edge_cols(head, body_len, n_cols, VEC)
        e_ptr = dx_ptr + row_start + e_cols
        e_dx = tl.load(e_ptr, mask=e_valid, other=0.0).to(tl.float32)
        tl.store(e_ptr, (e_dx * g).to(dx_ptr.dtype.element_ty), mask=e_valid)
        body_ptr = dx_ptr + a_lo
        for start in range(0, body_len, BLOCK_SIZE):
            k = start + tl.arange(0, BLOCK_SIZE)
            mask = k < body_len
            dx = tl.load(body_ptr + k, mask=mask, other=0.0).to(tl.float32)
            tl.store(body_ptr + k, (dx * g).to(dx_ptr.dtype.element_ty), mask=mask)


def launch_config(dtype, n_cols):
    """``(BLOCK_SIZE, num_warps, VEC)`` for rows of ``n_cols`` elements of ``dtype``.

    VEC is the elements per 16 bytes. BLOCK_SIZE (at most 8,192: a 50,257 row takes 7
    steps) is split so that each thread moves 64 bytes per loop step, four 16-byte loads in
    flight: 8 warps for 16-bit logits, 16 for fp32, which compile for sm_90 without spills
    and leave room for two programs per SM (register counts in ``docs/gpu-inspection.md``).
    ``bench/gpu_check.py --sweep`` replaces this function to time other choices on a GPU.
    """
    elem = dtype.itemsize
    vec = 16 // elem
    block = min(8192, triton.next_power_of_2(max(n_cols, 2 * vec)))
    num_warps = max(1, min(16, block * elem // (32 * 64)))
    return block, num_warps, vec


def _check_rows(x, dx):
    """The row kernels step along rows of unit column stride, in ``x`` and its gradient."""
    assert x.ndim == 2 and x.stride(1) == 1, "rows of x must be contiguous"
    assert dx is None or (dx.shape == x.shape and dx.stride(1) == 1), \
        "the gradient must have x's shape and contiguous rows"


def _unit_stride(target, weight):
    """The kernels read ``target_ptr + row`` and ``weight_ptr + t``: unit stride, 1-D."""
    assert target.ndim == 1, "target must be a (rows,) tensor of class indices"
    return target.contiguous(), None if weight is None else weight.contiguous()


def _weight_args(weight, label_smoothing, like):
    """Dummy pointers stand in for an absent weight: the kernel never reads them."""
    has_weight = weight is not None
    if has_weight and label_smoothing > 0:
        wsum = weight.sum(dtype=torch.float32).reshape(1)
    else:
        wsum = like
    return has_weight, (weight if has_weight else like), wsum


def ce_fwd(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, grad_scale=None,
           grad_out=None, extras=None, aux_out=None, z_scale=None):
    """Loss and log-sum-exp of every row of ``x`` (rows, C), one program per row (the
    package's ``fusedce.kernels.ce_fwd`` is ``split_rows.ce_fwd``, which may split rows).

    Returns ``(loss, lse)``, both (rows,), fp32 and fp64. With ``grad_scale`` (a (1,) fp32
    tensor on x's device), the gradient of ``loss * grad_scale`` is also written: into
    ``grad_out`` (x's shape and dtype, contiguous rows) or, when it is None, over ``x``.
    ``target`` (rows,) and ``weight`` (C,) of any strides (copied to unit stride if needed).

    ``extras`` (``fusedce._args.Extras``): the loss and lse are of the transformed logits;
    ``aux_out`` (2, rows) fp32 receives each row's entropy and correctness (``extras.aux``);
    with a z-loss and ``grad_scale``, ``z_scale`` (1,) fp32 is its gradient's ``2
    lse_square_scale / denominator`` (the z-loss itself, ``lse_square_scale lse**2``, is
    the caller's to add: it is O(rows)).
    """
    dx = x if grad_out is None else grad_out
    _check_rows(x, dx)
    target, weight = _unit_stride(target, weight)
    n_rows, n_cols = x.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    lse = torch.empty(n_rows, dtype=torch.float64, device=x.device)
    if n_rows == 0:
        return loss, lse
    has_weight, weight_arg, wsum = _weight_args(weight, label_smoothing, loss)
    block, num_warps, vec = launch_config(x.dtype, n_cols)
    num_warps = extras_warps(num_warps, extras)
    _ce_fwd_kernel[(n_rows,)](
        x_ptr=x, x_row_stride=x.stride(0),
        dx_ptr=dx, dx_row_stride=dx.stride(0),
        target_ptr=target,
        weight_ptr=weight_arg, wsum_ptr=wsum,
        loss_ptr=loss, lse_ptr=lse,
        gscale_ptr=grad_scale if grad_scale is not None else loss,
        aux_ptr=aux_out if aux_out is not None else loss,
        aux_stride=aux_out.stride(0) if aux_out is not None else 0,
        zscale_ptr=z_scale if z_scale is not None else loss,
        n_cols=n_cols, ignore_index=ignore_index, label_smoothing=float(label_smoothing),
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=label_smoothing > 0,
        HAS_GRAD=grad_scale is not None,
        SAME_LAYOUT=dx.stride(0) == x.stride(0),
        BLOCK_SIZE=block, VEC=vec,
        AUX=aux_out is not None,
        HAS_Z=grad_scale is not None and extras is not None and extras.z_loss,
        **transform_args(extras),
        num_warps=num_warps,
    )
    return loss, lse


def extras_warps(num_warps, extras):
    """Warps for a launch with the loss extras: twice as many (up to 16), half the elements
    per thread, where the transform's derivative or the aux sums keep more values live
    (bf16 forward with all of them spilled 4 bytes on sm_90 with 8 warps)."""
    if extras is not None and (extras.transform or extras.aux):
        return min(16, 2 * num_warps)
    return num_warps


def transform_args(extras):
    """The logit transform's launch arguments (``_logits``); ``extras`` None: none."""
    if extras is None or not extras.transform:
        return dict(scale=1.0, softcap=1.0, TRANSFORM=False, HAS_CAP=False)
    return dict(scale=float(extras.logit_scale),
                softcap=float(extras.softcap) if extras.softcap is not None else 1.0,
                TRANSFORM=extras.transform, HAS_CAP=extras.softcap is not None)


def ce_bwd(x, target, lse, dloss, weight=None, ignore_index=-100, label_smoothing=0.0,
           dx=None, extras=None, z_grad=None):
    """Gradient of ``sum(loss * dloss)`` with respect to ``x`` (rows, C); with the logit
    transform of ``extras`` and, where given, the z-loss's per-row ``z_grad`` (rows,) fp32
    (``gz``, 0 where ignored).

    ``dloss`` is a (rows,) fp32 tensor (it may be an expanded scalar, stride 0). Writes into
    ``dx`` when given (it may be ``x`` itself), else into a new tensor like ``x``.
    ``target`` (rows,) and ``weight`` (C,) of any strides (copied to unit stride if needed).
    """
    _check_rows(x, dx)
    target, weight = _unit_stride(target, weight)
    n_rows, n_cols = x.shape
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n_rows == 0:
        return dx
    has_weight, weight_arg, wsum = _weight_args(weight, label_smoothing, lse)
    block, num_warps, vec = launch_config(x.dtype, n_cols)
    num_warps = extras_warps(num_warps, extras)
    _ce_bwd_kernel[(n_rows,)](
        **grad_launch_args(x, dx, target, weight_arg, wsum, has_weight, lse, ignore_index,
                           label_smoothing),
        dloss_ptr=dloss, dloss_stride=dloss.stride(0), n_cols=n_cols,
        zgrad_ptr=z_grad if z_grad is not None else lse, HAS_Z=z_grad is not None,
        **transform_args(extras),
        BLOCK_SIZE=block, VEC=vec, num_warps=num_warps,
    )
    return dx


def grad_launch_args(x, dx, target, weight_arg, wsum, has_weight, lse, ignore_index,
                     label_smoothing):
    """The launch arguments the gradient kernels (here and in ``split_rows``) share."""
    return dict(
        x_ptr=x, x_row_stride=x.stride(0),
        dx_ptr=dx, dx_row_stride=dx.stride(0),
        target_ptr=target,
        weight_ptr=weight_arg, wsum_ptr=wsum,
        lse_ptr=lse,
        ignore_index=ignore_index, label_smoothing=float(label_smoothing),
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=label_smoothing > 0,
        SAME_LAYOUT=dx.stride(0) == x.stride(0),
    )


def ce_scale_(dx, dloss):
    """``dx *= dloss[:, None]`` in place, skipping rows whose factor is 1 (on the device).
    ``dx`` (rows, C) with contiguous rows; ``dloss`` (rows,) of any stride (0 included)."""
    assert dx.ndim == 2 and dx.stride(1) == 1, "rows of dx must be contiguous"
    assert dloss.ndim == 1 and dloss.shape[0] == dx.shape[0], "dloss must be (rows,)"
    n_rows, n_cols = dx.shape
    if n_rows == 0:
        return dx
    block, num_warps, vec = launch_config(dx.dtype, n_cols)
    _ce_scale_kernel[(n_rows,)](
        dx_ptr=dx, dx_row_stride=dx.stride(0),
        dloss_ptr=dloss, dloss_stride=dloss.stride(0),
        n_cols=n_cols,
        BLOCK_SIZE=block, VEC=vec,
        num_warps=num_warps,
    )
    return dx


def grad_buffer(x):
    """An uninitialised tensor like ``x`` (contiguous) for its gradient (``ce_fwd``'s
    ``grad_out``); the CUDA caching allocator already reuses memory."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)
