"""The row-wise PyTorch implementation with the loss extras (``fusedce._args.Extras``):
logit scale, softcap, z-loss and the aux outputs. ``rows.ce_fwd`` / ``ce_bwd`` hand a call
here when it has any; the math is the kernels' (``fusedce/kernels/cross_entropy.py``):

    z = s tanh(a x / s)  (a x without a softcap s),   dz/dx = a (1 - tanh**2)
    lse, loss, p: as in ``rows``, of z
    dx_c = (g (A p_c - B [c = t] - eps / C w_c) + gz p_c) dz_c/dx_c,   gz: the z-loss's

Each chunk of rows (``chunks.rows_per_chunk``) is read once and worked on while it is in
cache: z, its row max and sums, and where asked the entropy, the argmax and the gradient.
Computed in float32, or in float64 for float64 logits or class weights. Plain PyTorch ops
on any device: also the fallback for float64 on a GPU, where the kernels compute in float32.
"""

import torch

from . import chunks, pool


def compute_dtype(x, weight):
    """float64 where the logits or the class weights are, else float32."""
    if x.dtype == torch.float64 or (weight is not None and weight.dtype == torch.float64):
        return torch.float64
    return torch.float32


def _transformed(x, extras, acc):
    """``(z, dz/dx)`` of a chunk ``x`` in ``acc`` (``dz`` a float when constant)."""
    z = x.to(acc)
    if not extras.transform:
        return z, 1.0
    z = z * extras.logit_scale
    if extras.softcap is None:
        return z, extras.logit_scale
    u = z / extras.softcap
    # 1 - tanh(u)**2 = 4 e / (1 + e)**2, e = exp(-2 |u|): no cancellation for large |u|
    e = torch.exp(-2.0 * u.abs())
    return extras.softcap * torch.tanh(u), extras.logit_scale * 4.0 * e / (1.0 + e) ** 2


def _targets(target, weight, ignore_index, n_cols, acc):
    """``(t_safe, ignored, valid, w_t)`` as in ``rows._row_targets``, in ``acc``."""
    t = target.long()
    ignored = t == ignore_index
    valid = (t >= 0) & (t < n_cols) & ~ignored
    t_safe = torch.where(valid, t, 0)
    w_t = valid.to(acc) if weight is None else torch.where(valid, weight.to(acc)[t_safe], 0.0)
    return t_safe, ignored, valid, w_t


def _chunk_grad(dz, p, t_safe, g, w_t, gz, w, W, eps, n_cols, out):
    """Writes ``(g (A p - B onehot - eps / C w) + gz p) dz`` into ``out``, a chunk of the
    gradient (every argument but ``w`` and ``W`` is the chunk's); ``p`` is consumed."""
    B = (1.0 - eps) * w_t
    A = B + eps * W / n_cols if eps > 0 else B
    coef = g * A
    if gz is not None:
        coef = coef + gz
    grad = p.mul_(coef[:, None])
    grad.scatter_add_(1, t_safe[:, None], (-g * B)[:, None])
    if eps > 0:
        grad.sub_((g * (eps / n_cols))[:, None] * (1.0 if w is None else w[None, :]))
    if not isinstance(dz, float) or dz != 1.0:
        grad.mul_(dz)
    out.copy_(grad)


def ce_fwd(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, grad_scale=None,
           grad_out=None, extras=None, aux_out=None, z_scale=None):
    """``rows.ce_fwd`` with the extras: per-row ``(loss, lse)`` of the transformed logits,
    in float32 (float64 for float64 ``x``); ``aux_out`` (2, rows) receives the entropy and
    the correctness of each row; with ``grad_scale`` the gradient of ``loss * grad_scale``
    plus the z-loss's (``gz = z_scale * lse``, 0 where ignored) goes into ``grad_out``, or
    over ``x`` when it is None."""
    n_rows, n_cols = x.shape
    acc = compute_dtype(x, weight)
    eps = float(label_smoothing)
    dev = x.device
    loss = torch.empty(n_rows, dtype=acc, device=dev)
    lse = torch.empty(n_rows, dtype=acc, device=dev)
    grad = grad_scale is not None
    dst = (x if grad_out is None else grad_out) if grad else None
    with torch.no_grad():
        t_safe, ignored, valid, w_t = _targets(target, weight, ignore_index, n_cols, acc)
        w = weight.to(acc) if weight is not None else None
        W = float(n_cols) if w is None else w.sum()
        if grad:
            g = torch.where(ignored, 0.0, torch.where(valid, grad_scale.to(acc), float("nan")))
            g = g.expand(n_rows)
            zs = z_scale.to(acc) if (extras.z_loss and z_scale is not None) else None

    def work(start, end):
        for s, e in chunks.chunk_ranges(end, n_cols, start):
            rows = slice(s, e)
            z, dz = _transformed(x[rows], extras, acc)
            m = z.amax(1, keepdim=True)
            ref = torch.where(m == float("-inf"), 0.0, m)  # a row of -inf: no NaN shift
            shifted = z - ref
            p = torch.exp(shifted)
            d = p.sum(1)
            log_d = d.log()
            lse_c = ref.squeeze(1) + log_d
            lse[rows] = lse_c
            z_t = z.gather(1, t_safe[rows, None]).squeeze(1)
            row_loss = (1.0 - eps) * w_t[rows] * (lse_c - z_t)
            if eps > 0:
                wz = shifted.sum(1) if w is None else shifted @ w
                # W lse - sum w z = W log d - sum w (z - m): no cancellation far from 0
                row_loss = row_loss + eps * ((W * log_d - wz) / n_cols)
            loss[rows] = row_loss
            if aux_out is not None:
                plogp = torch.where(z > float("-inf"), p * shifted, 0.0).sum(1)
                aux_out[0, rows] = log_d - plogp / d
                aux_out[1, rows] = (valid[rows] & (z.argmax(1) == t_safe[rows])).to(acc)
            if grad:
                gz = None if zs is None else torch.where(ignored[rows], 0.0, zs * lse_c)
                p.div_(d[:, None])
                _chunk_grad(dz, p, t_safe[rows], g[rows], w_t[rows], gz, w, W, eps, n_cols,
                            dst[rows])

    if n_rows > 0 and n_cols > 0:
        pool.parallel_rows(n_rows, n_cols, dev, work)
    with torch.no_grad():
        loss = torch.where(ignored, 0.0, torch.where(valid, loss, float("nan")))
    return loss, lse


def ce_bwd(x, target, lse, dloss, weight=None, ignore_index=-100, label_smoothing=0.0,
           dx=None, extras=None, z_grad=None):
    """``rows.ce_bwd`` with the extras: the gradient of ``sum(loss * dloss)`` plus the
    z-loss's ``z_grad`` (rows,) (0 where ignored), through the logit transform."""
    n_rows, n_cols = x.shape
    acc = compute_dtype(x, weight)
    eps = float(label_smoothing)
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n_rows == 0 or n_cols == 0:
        return dx
    with torch.no_grad():
        t_safe, ignored, valid, w_t = _targets(target, weight, ignore_index, n_cols, acc)
        w = weight.to(acc) if weight is not None else None
        g = torch.where(ignored, 0.0, torch.where(valid, dloss.to(acc).expand(n_rows),
                                                  float("nan")))
        lse = lse.to(acc)
        gz = z_grad.to(acc) if z_grad is not None else None
        W = float(n_cols) if w is None else w.sum()

    def work(start, end):
        for s, e in chunks.chunk_ranges(end, n_cols, start):
            rows = slice(s, e)
            z, dz = _transformed(x[rows], extras, acc)
            p = torch.exp(z - lse[rows, None])
            _chunk_grad(dz, p, t_safe[rows], g[rows], w_t[rows],
                        None if gz is None else gz[rows], w, W, eps, n_cols, dx[rows])

    pool.parallel_rows(n_rows, n_cols, x.device, work)
    return dx
