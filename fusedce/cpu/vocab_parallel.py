"""The vocab-parallel loss's per-shard passes in PyTorch (``fusedce.distributed``): the
same launchers and results as ``fusedce.kernels.vocab_parallel``, in cache-sized row chunks
on the CPU path's worker threads."""

import torch

from . import buffers, chunks, pool
from . import extras as _extras


def vp_partials(x, t_local, w_shard, smoothing, part, extras=None):
    """Fills ``part`` (>= 3 * rows fp32) with ``[lse_r | xt_r | sm_r]`` of the shard ``x``
    (rows, C_r), as ``fusedce.kernels.vp_partials`` does (with loss ``extras``,
    ``extras.vp_partials``, the module's, serves the call).

    Cache-sized row chunks (max, ``exp(x - max)`` as ``chunks.exp_argument`` and ``exp2``
    into an fp32 scratch, sum), spread over fusedce's single-threaded worker threads."""
    if (extras is not None and extras.any) or part.dtype == torch.float64:
        # the extras module's passes work in part's dtype: float64 by plain PyTorch ops
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
    loss ``extras``, ``extras.vp_grad`` serves the call).

    Per cache-sized chunk, ``a p = sign(a) exp(x - (lse - log|a|))`` is one multiply-add
    into the gradient and one in-cache ``exp2`` (``chunks.exp_argument``; ``a = 0`` gives
    exp(-inf) = 0), then the target's one-hot term (O(rows)) and the smoothing term."""
    if (extras is not None and extras.any) or lse.dtype == torch.float64:
        # float64: the extras module's passes, in lse's dtype
        return _extras.vp_grad(x, t_local, lse, g, w_t, consts, eps, w_shard, dx, extras,
                               z_grad)
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        buffers.advise_fresh(dx)  # fresh: first-touch faults cost more than a pass
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        return dx
    smoothing = eps > 0
    b = (1.0 - eps) * w_t * g
    a = b + eps * consts[0] / consts[1] * g if smoothing else b
    k = (eps / consts[1] * g).contiguous() if smoothing else None
    shift64 = lse.double() - a.abs().double().log()
    shift = shift64.float()[:, None].contiguous()
    neg_shift = (shift64 * -chunks.LOG2E).float()[:, None].contiguous()
    negative = a < 0
    sign = torch.where(negative, -1.0, 1.0).contiguous()
    # skip the sign pass when no row needs it, read on the CPU only (on a GPU: a host sync)
    if x.device.type == "cpu" and not bool(negative.any()):
        sign = None
    in_shard = t_local >= 0
    t_safe = t_local.clamp_min(0)
    b = torch.where(in_shard, b, 0.0)  # rows whose target lives elsewhere: no one-hot term
    w = w_shard.float() if (smoothing and w_shard is not None) else None
    direct = dx.dtype == torch.float32
    step = chunks.rows_per_chunk(n_cols)

    def work(start, end):
        scratch = None if direct else torch.empty(min(step, end - start), n_cols,
                                                  dtype=torch.float32, device=dx.device)
        for s, e in chunks.chunk_ranges(end, n_cols, start=start):
            out = dx[s:e] if direct else scratch[:e - s]
            # fp32 math from any dtype, through ``out`` (no mixed-dtype multiply-add)
            src = x[s:e] if x.dtype == torch.float32 else out.copy_(x[s:e])
            chunks.exp_argument(src, shift[s:e], out, neg_shift[s:e], False,
                                chunks.fma_fused())
            out.exp2_()
            if sign is not None:
                out.mul_(sign[s:e, None])
            out.scatter_add_(1, t_safe[s:e, None], -b[s:e, None])
            if smoothing:
                if w is None:
                    out.sub_(k[s:e, None])
                else:
                    out.addcmul_(k[s:e, None], w[None, :], value=-1.0)
            if not direct:
                dx[s:e] = out  # one rounding into dx

    pool.parallel_rows(n_rows, n_cols, dx.device, work)
    return dx
