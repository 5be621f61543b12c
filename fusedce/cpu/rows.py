"""The row-wise PyTorch implementation: logits (rows, C) with contiguous classes against
class indices, the language-model case. Same launchers, signatures and math as
``fusedce.kernels.cross_entropy`` (``fusedce/reference.py`` states the math plainly):

    lse = m + log(sum_c exp(x_c - m)),  m = max_c x_c
    loss = (1 - eps) w_t (lse - x_t) + eps / C (W lse - sum_c w_c x_c),  W = sum_c w_c
    dx_c = g (A p_c - B [c = t] - eps / C w_c),  p = exp(x - lse),
           A = (1 - eps) w_t + eps W / C,  B = (1 - eps) w_t

How it is fast on a CPU (figures in docs/benchmarks.md):

- cache-sized row chunks (``chunks``), spread over worker threads (``pool``), each worker's
  loop a TorchScript function that holds no GIL;
- each exponential is PyTorch's base-2 one of a fused multiply-add,
  ``exp(x - m) = exp2(x log2(e) - m log2(e))`` (``chunks.exp_argument``): a third of the
  cost of its ``exp``, with an argument rounded as the subtraction's would be;
- where the gradient is computed in the backward, from the forward's lse (kept in
  float64), each row's exp is anchored at its lse rounded to fp32 and a per-row factor
  (``g A`` and the rest of the lse, taken back exactly) scales it: one multiply-add into
  the gradient, one in-cache exp and one in-cache product, exact as far from 0 as float64
  holds the lse's log-sum (|x| up to about 1e14); the target's entry, where ``A p_t - B``
  may cancel, is written afterwards from a per-row formula (one rounding, as in the
  kernels);
- a row's shift is the max of its first ``SHIFT_PREFIX`` values and its target's logit,
  not of the whole row (not in place in fp32): no max pass of its own over each chunk (a
  shift below the max only makes every ``exp`` larger; a row whose sum passes 2**32 is done
  again with the exact max), and the exp writes the gradient buffer, whose fetch its
  arithmetic hides;
- with ``grad_scale``, ``ce_fwd`` writes the gradient of the reduced loss in the same pass
  as the loss, into ``grad_out`` (a reused buffer from ``buffers.grad_buffer``) or over
  ``x``; the backward then only rescales rows whose upstream gradient is not 1.
"""

import torch

from . import buffers, chunks, pool
from . import extras as _extras

# The logit scales ``ce_fwd`` folds into its multiply-add (``z = scale x``); others (0,
# negative, or so far from 1 that ``scale log2(e)`` nears fp32's range) go to ``extras.py``
_SCALES = (2.0 ** -60, 2.0 ** 60)
# Columns whose max is a row's shift where the whole row is not read first (``fwd_chunks``'s
# ``prefix``): 4 KiB of fp32, measured in docs/benchmarks.md.
SHIFT_PREFIX = 1024


def _plain_scale(extras):
    """The logit scale ``ce_fwd`` applies itself: 1 without extras; None where
    ``extras.py`` must serve the call's transform."""
    if extras is None or not extras.transform:
        return 1.0
    scale = extras.logit_scale
    if extras.softcap is None and _SCALES[0] <= scale <= _SCALES[1]:
        return scale
    return None


def _extras_serve(x, weight, extras, aux, scale=None):
    """Whether ``extras.py`` serves a call with loss ``extras``: with a logit transform
    other than the ``scale`` this path applies itself (``ce_fwd``'s ``_plain_scale``;
    None: none), with ``aux`` outputs, or in float64 (this path computes in float32); a
    z-loss alone is this path's."""
    if extras is None or not extras.any:
        return False
    transform = extras.transform and scale is None
    return transform or aux or _extras.compute_dtype(x, weight) == torch.float64


def _row_targets(target, weight, ignore_index, n_cols):
    """``(t_safe, ignored, valid, w_t)``: targets clamped to a readable index, the ignore
    and in-range masks, and each row's class weight (0 where ignored or out of range)."""
    t = target.long()
    ignored = t == ignore_index
    valid = (t >= 0) & (t < n_cols) & ~ignored
    t_safe = torch.where(valid, t, 0)
    if weight is None:
        w_t = valid.float()
    else:
        w_t = torch.where(valid, weight.float()[t_safe], 0.0)
    return t_safe, ignored, valid, w_t


def _row_scale(g, ignored, valid):
    """Upstream gradient per row: 0 for ignored rows, NaN for out-of-range targets."""
    return torch.where(ignored, 0.0, torch.where(valid, g, float("nan")))


def _smoothing_sum(weight, n_cols):
    """``W = sum_c w_c`` (C without weights)."""
    return weight.float().sum() if weight is not None else float(n_cols)


def _grad_coefficients(w_t, weight, eps, n_cols):
    B = (1.0 - eps) * w_t
    if eps > 0:
        return B + eps * _smoothing_sum(weight, n_cols) / n_cols, B
    return B, B


def target_grad(log_p_t, gA, gB, g, w, eps, n_cols, t_safe):
    """The gradient at each row's target, ``gA p_t - gB - g eps / C w_t``, from
    ``log_p_t = x_t - lse`` (float64: one rounding into the gradient's dtype), where
    ``gA p_t`` and ``gB`` may cancel; ``n_cols`` the C of the smoothing term."""
    d = torch.exp(log_p_t) * gA - gB
    if eps > 0:
        w_tt = 1.0 if w is None else w[t_safe]
        d = d - g * (eps / n_cols) * w_tt
    return d



def _write_target_grad(dx, t_safe, d):
    dx[torch.arange(dx.shape[0], device=dx.device), t_safe] = d.to(dx.dtype)



def _shift_prefix(x, dst, gA, zs):
    """``fwd_chunks``'s ``prefix``: ``SHIFT_PREFIX`` columns where each row's shift may
    come from its first columns, else the row length (the exact max).

    Not in place in float32, where the exact max measured faster (the exp then works over
    the logits themselves, where the estimate must keep them until a chunk's sums are
    tested: docs/benchmarks.md); not with a z-loss, whose gradient
    factor may cancel to anything; and not where a nonzero ``g A`` is below 2**-90, whose
    ``g A / sum`` (the sum up to 2**32 under an estimated shift) could leave fp32's normal
    range."""
    n_cols = x.shape[1]
    if (n_cols <= SHIFT_PREFIX or (dst is x and x.dtype == torch.float32)
            or x.device.type != "cpu" or zs is not None):
        return n_cols
    if gA is not None:
        mag = gA.abs()
        if bool(((mag < 2.0 ** -90) & (mag > 0)).any()):
            return n_cols
    return SHIFT_PREFIX


def ce_fwd(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, grad_scale=None,
           grad_out=None, extras=None, aux_out=None, z_scale=None):
    """Per-row ``(loss, lse)`` of ``x`` (rows, C) against ``target`` (rows,): the loss in
    fp32, the lse in float64 (what ``ce_bwd`` takes back: the row's offset and its log-sum
    apart, rounded once). C >= 1, as for the kernel launcher: ``_loss.forward`` serves
    logits of no class itself.

    With ``grad_scale`` (a (1,) fp32 tensor) also writes the gradient of ``loss *
    grad_scale``: into ``grad_out`` (a contiguous tensor of ``x``'s shape and dtype; ``x``
    then stays intact) or, when it is None, over ``x``. A ``grad_out`` fresh from
    ``buffers.grad_buffer`` is faulted in by each worker for its own rows first.
    With a logit transform or aux outputs in ``extras``, ``extras.ce_fwd`` (the module)
    serves the call; a z-loss alone is this path's, its gradient's ``gz = z_scale * lse``
    added to ``g A`` once each chunk's lse is known."""
    scale = _plain_scale(extras)  # z = scale x, folded into the exp's multiply-add
    if _extras_serve(x, weight, extras, extras is not None and extras.aux, scale):
        return _extras.ce_fwd(x, target, weight, ignore_index, label_smoothing, grad_scale,
                              grad_out, extras, aux_out, z_scale)
    k = chunks.exp2_factor(scale)
    n_rows, n_cols = x.shape
    eps = float(label_smoothing)
    dev = x.device
    grad = grad_scale is not None
    dst = (x if grad_out is None else grad_out) if grad else None
    fault_in = grad_out is not None and buffers.take_fresh(grad_out)
    with torch.no_grad():
        t_safe, ignored, valid, w_t = _row_targets(target, weight, ignore_index, n_cols)
        w = weight.float() if weight is not None else None
        x_t = x.gather(1, t_safe[:, None]).squeeze(1).float()  # before x is overwritten
        row_max = torch.empty(n_rows, 1, dtype=torch.float32, device=dev)
        row_neg = torch.empty(n_rows, 1, dtype=torch.float32, device=dev)
        row_sum = torch.empty(n_rows, 1, dtype=torch.float32, device=dev)
        sum_wx = torch.empty(n_rows, dtype=torch.float32, device=dev) if eps > 0 else None
        if grad:
            A, B = _grad_coefficients(w_t, weight, eps, n_cols)
            # d/dx = scale d/dz: every gradient term carries the scale
            g_out = grad_scale.float().expand(n_rows)
            g = _row_scale(g_out if scale == 1.0 else g_out * scale, ignored, valid)
            gA = (g * A)[:, None].contiguous()
            coef = torch.empty_like(gA)
            zs = None
            if extras is not None and extras.z_loss and z_scale is not None:
                zs = torch.where(ignored, 0.0, z_scale.float() * scale)[:, None].contiguous()
            smooth = (g * (eps / n_cols)).contiguous() if eps > 0 else None
    direct = x.dtype == torch.float32  # else: through an fp32 scratch chunk
    step = chunks.rows_per_chunk(n_cols)
    prefix = _shift_prefix(x, dst, gA if grad else None, zs if grad else None)
    x_t_col = x_t[:, None] if prefix < n_cols else None  # a shift floor known already
    # inline, with no other worker to contend for the GIL, plain Python costs less per call
    chunk_loop = chunks.script(chunks.fwd_chunks) if pool.n_workers(n_rows, n_cols, dev) > 1 \
        else chunks.fwd_chunks
    dst_ = dst.detach() if grad else None

    def work(start, end):
        scratch = None
        if not direct or dst is None or prefix < n_cols:
            scratch = torch.empty(min(step, end - start), n_cols, dtype=torch.float32,
                                  device=dev)
        if fault_in and grad_out is not None:
            buffers.fault_in_rows(dst, start, end)
        chunk_loop(x.detach(), dst_, row_max, row_neg, row_sum, sum_wx, w,
                   gA if grad else None, zs if grad else None, coef if grad else None,
                   smooth if grad else None, scratch, start, end, step, direct,
                   chunks.fma_fused(), scale, k, prefix, x_t_col)

    if n_rows > 0:
        pool.parallel_rows(n_rows, n_cols, dev, work)
    with torch.no_grad():
        # in float64, rounded once: lse = m + log_sum, and lse - x_t as (m - x_t) +
        # log_sum, which keeps log_sum where m is far from 0 (PyTorch's order)
        # (the shift of x; that of z is scale times it). The log too: under a shift
        # estimated below the max, log_sum is up to 23, where an fp32 log would add
        # its rounding (1e-6) to the sum's own
        log_sum = row_sum.double().log().squeeze(1)
        shift = chunks.row_shift(row_max, row_neg, k).squeeze(1)
        # kept in float64 for the backward (``ce_bwd``): rounded to fp32, a row far
        # from 0 (|lse| ~ 1e8) would lose its log_sum
        lse = shift * scale + log_sum
        nll = ((shift - x_t.double()) * scale + log_sum).clamp(min=0.0).float()
        loss = (1.0 - eps) * w_t * nll
        if eps > 0:
            # sum_wx is relative to the shift s: W lse - sum w x = W log_sum - sum w (x - s),
            # no cancellation where the logits lie far from 0
            loss = loss + eps * ((_smoothing_sum(weight, n_cols) * log_sum - sum_wx)
                                 / n_cols).float()
        loss = torch.where(ignored, 0.0, torch.where(valid, loss, float("nan")))
        if grad and n_rows > 0:
            gA = gA.squeeze(1)
            if zs is not None:
                gA = gA + zs.squeeze(1) * lse
            d = target_grad(-nll, gA, g * B, g, w, eps, n_cols, t_safe)
            _write_target_grad(dst, t_safe, d)
    return loss, lse


def ce_bwd(x, target, lse, dloss, weight=None, ignore_index=-100, label_smoothing=0.0,
           dx=None, extras=None, z_grad=None):
    """Gradient of ``sum(loss * dloss)`` w.r.t. ``x``; same contract as the kernel launcher
    (with a logit transform, ``extras.ce_bwd`` serves the call; the z-loss's ``z_grad``
    adds to ``g A``)."""
    if _extras_serve(x, weight, extras, False):
        return _extras.ce_bwd(x, target, lse, dloss, weight, ignore_index, label_smoothing,
                              dx, extras, z_grad)
    n_rows, n_cols = x.shape
    eps = float(label_smoothing)
    dev = x.device
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    # a buffer just allocated (here or by the caller) is advised and faulted in; one written
    # over the logits (the fused linear loss's chunk, resident already) is not
    fresh = dev.type == "cpu" and dx.data_ptr() != x.data_ptr()
    if fresh:
        buffers.advise_fresh(dx)
    if n_rows == 0 or n_cols == 0:
        return dx
    with torch.no_grad():
        t_safe, ignored, valid, w_t = _row_targets(target, weight, ignore_index, n_cols)
        w = weight.float() if weight is not None else None
        A, B = _grad_coefficients(w_t, weight, eps, n_cols)
        g = _row_scale(dloss.float().expand(n_rows), ignored, valid)
        gA = g * A if z_grad is None else g * A + z_grad.float()
        lse = lse.double()
        smooth = (g * (eps / n_cols)).contiguous() if eps > 0 else None
        x_t = x.gather(1, t_safe[:, None]).squeeze(1).double()
    anchored_grad(x, dx, lse, gA, smooth, w, fresh)
    with torch.no_grad():
        d = target_grad(x_t - lse, gA, g * B, g, w, eps, n_cols, t_safe)
        _write_target_grad(dx, t_safe, d)
    return dx


def anchored_grad(x, dx, lse, gA, smooth, w, fresh):
    """``dx = gA exp(x - lse) - smooth w`` over the rows of ``x`` (rows, C) into ``dx``
    (fp32, bf16 or fp16, contiguous): ``lse`` float64 (rows,), ``gA`` and ``smooth`` fp32
    (rows,) (``smooth`` None: no such term), ``w`` fp32 (C,) or None (all ones);
    ``fresh``: ``dx`` just allocated (each worker faults in its own rows). A row with
    ``gA`` and ``smooth`` both 0 and a finite lse (ignored, no upstream gradient) is zeroed,
    not computed; the smoothing term stays where ``gA`` cancels to 0 (class weights summing
    to 0).

    ``gA p_c = exp(x_c - s) c``, ``c = gA exp(s - lse)``: each row's exp is anchored at
    its lse rounded to fp32, a (every exponent then <= ~0); s is the shift the exponent
    took (``chunks.exp_argument``: -neg / log2(e) under its multiply-add, else a itself),
    and c, per row in float64, takes the rest back exactly, as far from 0 as float64
    holds lse's log-sum (|lse| up to about 1e14). (Folding gA into the exponent, s = lse -
    log|gA|, saves the product but rounds s to fp32 with the row's offset: a relative
    error of the gradient of |s| 4e-8, all of it at 1e8.) Zeroed rows are not computed:
    exp(-inf) takes a slow path in PyTorch's CPU exp, about 20x an ordinary value (on the
    CPU only: reading the rows' flags on a GPU would be a host sync). A row whose lse is
    NaN or infinite (a NaN or +inf logit, or only -inf) has an all-NaN gradient whatever
    its gA, as PyTorch's: a NaN anchor gives exactly that."""
    n_rows, n_cols = x.shape
    dev = x.device
    with torch.no_grad():
        finite = lse.isfinite()
        anchor = torch.where(finite, lse, float("nan")).float()[:, None].contiguous()
        neg = torch.mul(anchor, -chunks.LOG2E)  # the multiply-add's own (exp_argument)
        gA64 = gA.double()[:, None]
        coef_fma = (gA64 * torch.exp(neg.double() / -chunks.LOG2E - lse[:, None])).float()
        coef_sub = (gA64 * torch.exp(anchor.double() - lse[:, None])).float()
        skip = None
        if dev.type == "cpu":
            zero_rows = (gA == 0) & finite
            if smooth is not None:
                zero_rows &= smooth == 0
            skip = zero_rows.tolist()
    direct = dx.dtype == torch.float32 and x.dtype == torch.float32
    step = chunks.rows_per_chunk(n_cols)

    chunk_loop = chunks.script(chunks.bwd_chunks) if pool.n_workers(n_rows, n_cols, dev) > 1 \
        else chunks.bwd_chunks

    def work(start, end):
        scratch = None
        if not direct:
            scratch = torch.empty(min(step, end - start), n_cols, dtype=torch.float32,
                                  device=dev)
        if fresh:
            buffers.fault_in_rows(dx, start, end)
        chunk_loop(x.detach(), dx.detach(), anchor, neg, coef_fma, coef_sub, smooth, w,
                   scratch, [] if skip is None else skip[start:end], start, end, step, direct,
                   chunks.fma_fused())

    pool.parallel_rows(n_rows, n_cols, dev, work)


def ce_scale_(dx, dloss):
    """``dx *= dloss[:, None]`` in place; nothing is done when every factor is exactly 1.

    Returns a fresh alias of ``dx`` (``dx.detach()``): autograd's gradient accumulation
    adopts a gradient nobody else references as it is, where it would copy ``dx`` itself
    (held by the graph as the saved logits), a logits-sized allocation and pass."""
    if dx.shape[0] == 0:
        return dx.detach()
    g = dloss.float()
    with torch.no_grad():
        if dx.device.type == "cpu":
            # reading a CPU tensor is no device sync: skip the pass when there is nothing to do
            if dloss.stride(0) == 0:
                if g[0].item() != 1.0:
                    dx.mul_(g[0])
                return dx.detach()
            if bool((g == 1.0).all()):
                return dx.detach()
        # an fp32 factor: the product is computed in fp32 and rounded once into dx
        dx.mul_(g[:, None])
    return dx.detach()
