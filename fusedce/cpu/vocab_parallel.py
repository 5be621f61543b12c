"""The vocab-parallel loss's per-shard passes in PyTorch (``fusedce.distributed``): the
same launchers and results as ``fusedce.kernels.vocab_parallel``, in cache-sized row chunks
on the CPU path's worker threads."""

import torch

from . import buffers, chunks, pool, rows
from . import extras as _extras


def vp_partials(x, t_local, w_shard, smoothing, part, extras=None):
    """Fills ``part`` (>= 3 * rows float64) with ``[lse_r | xt_r | sm_r]`` of the shard
    ``x`` (rows, C_r), as ``fusedce.kernels.vp_partials`` does (with loss ``extras``, or
    in float64, ``extras.vp_partials``, the module's, serves the call).

    Cache-sized row chunks (max, ``exp(x - max)`` as ``chunks.exp_argument`` and ``exp2``
    into an fp32 scratch, sum), spread over fusedce's single-threaded worker threads."""
    if (extras is not None and extras.any) or _extras.compute_dtype(x, w_shard) == torch.float64:
        # the extras module's passes: float64 by plain PyTorch ops
        return _extras.vp_partials(x, t_local, w_shard, smoothing, part, extras)
    n_rows, n_cols = x.shape
    lse, x_t = part[:n_rows], part[n_rows:2 * n_rows]
    smooth = part[2 * n_rows:3 * n_rows]
    if n_cols == 0:
        lse.fill_(float("-inf"))
        x_t.zero_()
        smooth.zero_()
        return part
    w = w_shard.float() if (smoothing and w_shard is not None) else None
    w_r = float(n_cols) if w is None else w.sum()  # W_r, once for every chunk
    direct = x.dtype == torch.float32
    step = chunks.rows_per_chunk(n_cols)

    def work(start, end):
        scratch = torch.empty(min(step, end - start), n_cols, dtype=torch.float32,
                              device=x.device)
        neg = torch.empty(min(step, end - start), 1, dtype=torch.float32, device=x.device)
        for s, e in chunks.chunk_ranges(end, n_cols, start=start):
            buf = scratch[:e - s]
            src = x[s:e] if direct else buf.copy_(x[s:e])
            m = torch.amax(src, 1, keepdim=True)
            m.masked_fill_(m == float("-inf"), 0.0)  # all -inf: no (-inf) - (-inf)
            chunks.exp_argument(src, m, buf, neg[:e - s], True, chunks.fma_fused())
            shift = chunks.row_shift(m, neg[:e - s]).squeeze(1)  # float64
            wd = None
            if smoothing:  # sum w (x - shift), taken before exp overwrites buf
                wd = (buf.sum(1) if w is None else torch.mv(buf, w)) / chunks.LOG2E
            log_sum = buf.exp2_().sum(1).log_()
            if wd is not None:
                # sm_r = sum w (lse_r - x) = W_r log_sum - sum w (x - shift): both >= 0
                torch.sub(w_r * log_sum, wd, out=smooth[s:e])
            lse[s:e] = shift + log_sum.double()

    if n_rows > 0:
        pool.parallel_rows(n_rows, n_cols, x.device, work)
    picked = x.gather(1, t_local.clamp_min(0)[:, None]).squeeze(1).float()
    x_t.copy_(torch.where(t_local >= 0, picked, 0.0))
    return part


def vp_grad(x, t_local, lse, g, w_t, consts, eps, w_shard, dx=None, extras=None,
            z_grad=None):
    """The shard's gradient into ``dx``, as ``fusedce.kernels.vp_grad`` writes it (with
    loss ``extras``, or in float64, ``extras.vp_grad`` serves the call).

    ``a p - k w`` over the slice as ``rows.anchored_grad`` writes a row's ``g A p - g eps / C
    w`` (each exp anchored at the float64 ``lse`` rounded to fp32, the rest of it in a
    per-row factor), then the entry of each row whose target is in this slice from a
    per-row formula (one rounding, as in ``rows.ce_bwd``)."""
    if (extras is not None and extras.any) or _extras.compute_dtype(x, w_shard) == torch.float64:
        return _extras.vp_grad(x, t_local, lse, g, w_t, consts, eps, w_shard, dx, extras,
                               z_grad)
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    # a buffer just allocated is advised and faulted in; one written over the logits (the
    # fused linear loss's chunk, resident already) is not
    fresh = x.device.type == "cpu" and dx.data_ptr() != x.data_ptr()
    if fresh:
        buffers.advise_fresh(dx)
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        return dx
    smoothing = eps > 0
    with torch.no_grad():
        g, lse = g.float(), lse.double()
        b = (1.0 - eps) * w_t.float() * g
        a = b + eps * consts[0] / consts[1] * g if smoothing else b
        k = (eps / consts[1] * g).contiguous() if smoothing else None
        w = w_shard.float() if (smoothing and w_shard is not None) else None
        in_shard = t_local >= 0
        t_safe = t_local.clamp_min(0)
        x_t = x.gather(1, t_safe[:, None]).squeeze(1).double()  # before dx may overwrite x
    rows.anchored_grad(x, dx, lse, a, k, w, fresh)
    with torch.no_grad():
        # the target's entry a p_t - b - k w_t, where a p_t and b may cancel (the global C
        # in k); rows whose target lives elsewhere keep what the pass wrote
        d = rows.target_grad(x_t - lse, a, b, g, w, eps, consts[1], t_safe)
        at = (torch.arange(n_rows, device=dx.device), t_safe)
        dx[at] = torch.where(in_shard, d.to(dx.dtype), dx[at])
    return dx
