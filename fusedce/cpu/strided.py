"""PyTorch implementation over the class dimension of ``(N, C, L)`` logits of any strides.

It serves what the row-wise ``rows`` module does not: class-probability (soft) targets, and
class-index targets whose classes are not contiguous in memory (the ``(N, C, d1, ..., dK)``
layout of segmentation and sequence models), and float64 logits (computed in float64, as
PyTorch does). Same entry points and math as ``fusedce.kernels.ce_strided_fwd`` /
``ce_strided_bwd`` (see ``fusedce/kernels/strided.py`` for the formulas), worked through in
chunks so that no ``(N, C, L)`` temporary exists besides the gradient.

Shapes: ``x`` (N, C, L); a class-index ``target`` (N, L) integer; a class-probability
``target`` (N, C, L) float. Per-row outputs are (N * L,) with row ``r = n * L + l``.
"""

import torch

from . import extras as _extras

# Elements per chunk: 2**18 values (1 MiB in fp32) stay in L2 while a chunk is worked on.
CHUNK_ELEMENTS = 1 << 18


def acc_dtype(*dtypes):
    """float64 if any operand is float64, else float32: the precision PyTorch would use."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _shifted(xc, entropy=False):
    """``(d, m, log_sum, h)`` of a (n, C, l) chunk: ``d = x - m`` (m the row max over
    classes), ``log(sum_c exp(d_c))`` and, where asked, the entropy ``h`` of the rows'
    softmax (else None), so that ``lse = m + log_sum`` and ``lse - x_c = log_sum - d_c``:
    sums against the logits taken from ``d`` lose nothing to cancellation where the logits
    lie far from 0. A row holding +inf (m = inf) or only -inf gives NaN, as PyTorch's
    ``log_softmax`` (x - max) does; ``torch.logsumexp`` would give +inf for the first, hence
    a loss of +inf and part of the gradient finite."""
    m = xc.amax(1, keepdim=True)
    d = xc - m
    e = torch.exp(d)
    total = e.sum(1)
    log_sum = total.log()
    h = None
    if entropy:  # log d - sum p (x - m); a -inf logit adds 0 (the limit of p log p)
        h = log_sum - torch.where(e > 0, e * d, 0.0).sum(1) / total
    return d, m.squeeze(1), log_sum, h


def _chunks(n, c, l_len):
    """``(n0, n1, l0, l1)`` blocks of about CHUNK_ELEMENTS logits each."""
    if l_len == 0:
        return
    if c * l_len <= CHUNK_ELEMENTS:
        step_n, step_l = max(1, CHUNK_ELEMENTS // max(c * l_len, 1)), l_len
    else:
        step_n, step_l = 1, max(1, CHUNK_ELEMENTS // max(c, 1))
    for n0 in range(0, n, step_n):
        for l0 in range(0, l_len, step_l):
            yield n0, min(n0 + step_n, n), l0, min(l0 + step_l, l_len)


def _hard_rows(t, weight, ignore_index, n_cols, acc):
    """``(t_safe, ignored, valid, w_t)`` for class indices ``t`` (any shape)."""
    t = t.long()
    ignored = t == ignore_index
    valid = (t >= 0) & (t < n_cols) & ~ignored
    t_safe = torch.where(valid, t, 0)
    if weight is None:
        w_t = valid.to(acc)
    else:
        w_t = torch.where(valid, weight.to(acc)[t_safe], 0.0)
    return t_safe, ignored, valid, w_t


def _soft_weights(yc, weight, eps, n_cols, acc):
    """``w_c * y'_c`` for a (n, C, l) chunk, ``y' = (1 - eps) * y + eps / C``."""
    y = yc.to(acc)
    if eps > 0:
        y = y.mul(1.0 - eps).add_(eps / n_cols)  # a new tensor: later ops may work in place
        if weight is not None:
            y.mul_(weight.to(acc)[None, :, None])
    elif weight is not None:
        y = y * weight.to(acc)[None, :, None]
    return y  # may be the target itself: never written


def ce_strided_fwd(x, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                   extras=None, aux_out=None):
    """Per-row ``(loss, lse, s)``, each (N * L,): loss and ``s`` in the accumulation
    dtype, lse in float64 (``m + log_sum`` rounded once: the backward rebuilds ``p`` from
    it, also where the row lies far from 0).

    ``s`` is ``sum_c w_c y'_c`` for probability targets (the backward needs it) and an
    empty tensor for class indices. A class index outside ``[0, C)`` that is not
    ``ignore_index`` gives a NaN loss (the caller decides whether to raise first).
    With ``extras`` the loss and lse are of the transformed logits ``z``; ``aux_out`` (2,
    N * L) receives each row's entropy of ``softmax(z)`` and whether the first argmax of
    ``z`` is its target (for probabilities: the first argmax of the target).
    """
    n, n_cols, l_len = x.shape
    soft = target.is_floating_point()
    eps = float(label_smoothing)
    acc = acc_dtype(x.dtype, target.dtype if soft else x.dtype,
                    weight.dtype if weight is not None else x.dtype)
    loss = torch.empty(n, l_len, dtype=acc, device=x.device)
    lse = torch.empty(n, l_len, dtype=torch.float64, device=x.device)
    s = torch.empty(n, l_len, dtype=acc, device=x.device) if soft else loss.new_empty(0)
    aux = None if aux_out is None else aux_out.view(2, n, l_len)
    if not soft:
        t_safe, ignored, valid, w_t = _hard_rows(target, weight, ignore_index, n_cols, acc)
        w_sum = ((weight.to(acc).sum() if weight is not None else float(n_cols)) if eps > 0
                 else 0)
    for n0, n1, l0, l1 in _chunks(n, n_cols, l_len):
        block = (slice(n0, n1), slice(l0, l1))
        z, _ = _extras.transformed(x[n0:n1, :, l0:l1], extras, acc)
        d, m, log_sum, h = _shifted(z, entropy=aux is not None)
        # a row of only -inf: its lse is -inf (torch.logsumexp's, the row kernels'), its
        # loss NaN from d (PyTorch's)
        lse[block] = torch.where(m == float("-inf"), m.double(), m.double() + log_sum.double())
        if aux is not None:
            aux[0][block] = h
            wanted = (target[n0:n1, :, l0:l1].argmax(1) if soft
                      else torch.where(valid[block], t_safe[block], -1))
            aux[1][block] = (z.argmax(1) == wanted).to(acc)
        if soft:
            wy = _soft_weights(target[n0:n1, :, l0:l1], weight, eps, n_cols, acc)
            # -(log_softmax * w * y').sum over classes, log_softmax = (x - m) - log_sum
            logp = d.sub_(log_sum[:, None])
            loss[block] = -logp.mul_(wy).sum(1)
            s[block] = wy.sum(1)
            continue
        d_t = d.gather(1, t_safe[n0:n1, None, l0:l1]).squeeze(1)
        # lse - x_t = log_sum - (x_t - m): PyTorch's log_softmax rounds the same way
        part = (1.0 - eps) * w_t[block] * (log_sum - d_t)
        if eps > 0:
            # W lse - sum_c w_c x_c = W log_sum - sum_c w_c (x_c - m), each part >= 0
            wd = d.sum(1) if weight is None else (d * weight.to(acc)[None, :, None]).sum(1)
            part = part + eps * ((w_sum * log_sum - wd) / n_cols)
        loss[block] = part
    if soft:
        return loss.reshape(-1), lse.reshape(-1), s.reshape(-1)
    loss = torch.where(ignored, 0.0, torch.where(valid, loss, float("nan")))
    return loss.reshape(-1), lse.reshape(-1), s


def ce_strided_bwd(x, target, lse, s, dloss, weight=None, ignore_index=-100,
                   label_smoothing=0.0, dx=None, need_dx=True, need_dtarget=False, extras=None,
                   z_grad=None):
    """Gradients of ``sum(loss * dloss)``: ``(dx, dtarget)`` (``None`` where not asked).

    ``dloss`` is (N, L), any strides (an expanded scalar has strides 0). ``dx`` may be given
    (it may be ``x`` itself: each chunk is read before it is written). The target gradient
    exists for probability targets only: ``dy_c = g * (1 - eps) * w_c * (lse - z_c)``.
    With ``extras`` the gradient goes through the logit transform (``z`` for ``x``), plus
    the z-loss's ``z_grad`` (N * L,) times ``p``, where given.
    """
    n, n_cols, l_len = x.shape
    soft = target.is_floating_point()
    eps = float(label_smoothing)
    acc = acc_dtype(x.dtype, target.dtype if soft else x.dtype,
                    weight.dtype if weight is not None else x.dtype)
    # z - lse as (z - hi) - lo, hi + lo = lse: hi rounded to acc, lo the rest (z - hi is
    # exact near the row's max, however far the row lies from 0)
    lse = lse.reshape(n, l_len)
    hi = lse.to(acc)
    lo = (lse - hi.double()).to(acc)
    gz_all = None if z_grad is None else z_grad.to(acc).reshape(n, l_len)
    if need_dx and dx is None:
        dx = torch.empty_like(x)
    dy = torch.empty_like(target) if (soft and need_dtarget) else None
    if soft:
        s = s.reshape(n, l_len)
    else:
        t_safe, ignored, valid, w_t = _hard_rows(target, weight, ignore_index, n_cols, acc)
        B = (1.0 - eps) * w_t
        A = B
        if eps > 0:
            w_sum = weight.to(acc).sum() if weight is not None else float(n_cols)
            A = B + eps * w_sum / n_cols
        g_all = torch.where(ignored, 0.0, torch.where(valid, dloss.to(acc), float("nan")))
    for n0, n1, l0, l1 in _chunks(n, n_cols, l_len):
        z, dz = _extras.transformed(x[n0:n1, :, l0:l1], extras, acc)
        hi_c = hi[n0:n1, l0:l1, None].transpose(1, 2)  # (n, 1, l)
        lo_c = lo[n0:n1, l0:l1, None].transpose(1, 2)
        if soft:
            g = dloss[n0:n1, l0:l1].to(acc)[:, None, :]
            if dy is not None:
                wd = g * (1.0 - eps)
                if weight is not None:
                    wd = wd * weight.to(acc)[None, :, None]
                dy[n0:n1, :, l0:l1] = wd * ((hi_c - z) + lo_c)
            if not need_dx:
                continue
            p = torch.sub(z, hi_c).sub_(lo_c).exp_()
            wy = _soft_weights(target[n0:n1, :, l0:l1], weight, eps, n_cols, acc)
            # p itself is kept only for the z-loss's term
            grad = (p.mul_ if gz_all is None else p.mul)(s[n0:n1, None, l0:l1])
            grad = grad.sub_(wy).mul_(g)
        else:
            g = g_all[n0:n1, None, l0:l1]
            p = torch.sub(z, hi_c).sub_(lo_c).exp_()
            grad = (p.mul_ if gz_all is None else p.mul)(A[n0:n1, None, l0:l1])
            grad.scatter_add_(1, t_safe[n0:n1, None, l0:l1], -B[n0:n1, None, l0:l1])
            if eps > 0:
                if weight is None:
                    grad.sub_(eps / n_cols)
                else:
                    grad.sub_(weight.to(acc)[None, :, None], alpha=eps / n_cols)
            grad.mul_(g)
        if gz_all is not None:
            grad.addcmul_(p, gz_all[n0:n1, None, l0:l1])
        if not isinstance(dz, float) or dz != 1.0:
            grad.mul_(dz)
        dx[n0:n1, :, l0:l1] = grad
    return dx, dy
