"""The pure-PyTorch implementation: what runs on the CPU, and the oracle for the kernels.

It has the same three entry points, arguments and math as the Triton launchers in
``fusedce.kernels`` (see the docstring of ``kernels/cross_entropy.py`` for the formulas),
and works through the rows in chunks small enough to stay in cache, so that no
(rows x C) temporary exists besides the gradient itself.
"""

import torch

# Elements per chunk: 2**18 fp32 values (1 MiB) stay in L2 while a chunk is worked on.
CHUNK_ELEMENTS = 1 << 18


def _chunks(n_rows, n_cols):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


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


def _grad_chunk(xc, lse_c, t_c, A_c, B_c, g_c, weight, eps, n_cols, out):
    """``out = (p * A - B * onehot(t) - eps / C * w) * g`` for one chunk, in fp32 ``out``."""
    torch.sub(xc, lse_c[:, None], out=out)
    out.exp_()
    out.mul_(A_c[:, None])
    out.scatter_add_(1, t_c[:, None], -B_c[:, None])
    if eps > 0:
        if weight is None:
            out.sub_(eps / n_cols)
        else:
            out.sub_(weight.float()[None, :], alpha=eps / n_cols)
    out.mul_(g_c[:, None])
    return out


def _grad_coefficients(w_t, weight, eps, n_cols):
    B = (1.0 - eps) * w_t
    if eps > 0:
        return B + eps * _smoothing_sum(weight, n_cols) / n_cols, B
    return B, B


def ce_fwd(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, inplace_scale=None):
    """Per-row ``(loss, lse)`` in fp32; with ``inplace_scale`` also writes the gradient of
    ``loss * inplace_scale`` over ``x``. Same contract as ``fusedce.kernels.ce_fwd``."""
    n_rows, n_cols = x.shape
    eps = float(label_smoothing)
    t_safe, ignored, valid, w_t = _row_targets(target, weight, ignore_index, n_cols)
    lse = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    x_t = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    sum_wx = torch.zeros(n_rows, dtype=torch.float32, device=x.device)
    if inplace_scale is not None:
        A, B = _grad_coefficients(w_t, weight, eps, n_cols)
        g = _row_scale(inplace_scale.float().expand(n_rows), ignored, valid)
    for s, e in _chunks(n_rows, n_cols):
        xc = x[s:e].float()
        torch.logsumexp(xc, dim=1, out=lse[s:e])
        x_t[s:e] = xc.gather(1, t_safe[s:e, None]).squeeze(1)
        if eps > 0:
            sum_wx[s:e] = xc.sum(1) if weight is None else xc @ weight.float()
        if inplace_scale is not None:
            # xc is x's own rows (fp32) or an fp32 copy of them: overwrite it, copy back if needed
            _grad_chunk(xc, lse[s:e], t_safe[s:e], A[s:e], B[s:e], g[s:e], weight, eps,
                        n_cols, out=xc)
            if x.dtype != torch.float32:
                x[s:e] = xc
    loss = (1.0 - eps) * w_t * (lse - x_t)
    if eps > 0:
        loss = loss + eps / n_cols * (_smoothing_sum(weight, n_cols) * lse - sum_wx)
    loss = torch.where(ignored, 0.0, torch.where(valid, loss, float("nan")))
    return loss, lse


def ce_bwd(x, target, lse, dloss, weight=None, ignore_index=-100, label_smoothing=0.0,
           dx=None):
    """Gradient of ``sum(loss * dloss)`` w.r.t. ``x``; same contract as the kernel launcher."""
    n_rows, n_cols = x.shape
    eps = float(label_smoothing)
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    t_safe, ignored, valid, w_t = _row_targets(target, weight, ignore_index, n_cols)
    A, B = _grad_coefficients(w_t, weight, eps, n_cols)
    g = _row_scale(dloss.float(), ignored, valid)
    scratch = None
    for s, e in _chunks(n_rows, n_cols):
        if dx.dtype == torch.float32:
            out = dx[s:e]
        else:
            if scratch is None or scratch.shape[0] != e - s:
                scratch = torch.empty(e - s, n_cols, dtype=torch.float32, device=x.device)
            out = scratch
        _grad_chunk(x[s:e].float(), lse[s:e], t_safe[s:e], A[s:e], B[s:e], g[s:e], weight,
                    eps, n_cols, out)
        if dx.dtype != torch.float32:
            dx[s:e] = out
    return dx


def ce_scale_(dx, dloss):
    """``dx *= dloss[:, None]`` in place, rows whose factor is exactly 1 left untouched."""
    if dx.shape[0] == 0:
        return dx
    g = dloss.float()
    if dx.device.type == "cpu":
        # reading a CPU tensor is no device sync: skip the pass when there is nothing to do
        if dloss.stride(0) == 0:
            if g[0].item() != 1.0:
                dx.mul_(g[0])
            return dx
        if bool((g == 1.0).all()):
            return dx
    for s, e in _chunks(*dx.shape):
        dx[s:e] = (dx[s:e].float() * g[s:e, None]).to(dx.dtype)
    return dx
