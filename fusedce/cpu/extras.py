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


class _Scratch:
    """A worker's chunk buffers in the compute dtype, made on first use: ``z`` (the
    transformed logits), ``s`` (``z`` minus the row's shift), ``p`` (exp of it, then the
    gradient) and ``dz`` (the softcap's derivative)."""

    def __init__(self, rows, n_cols, acc, device):
        self.shape, self.acc, self.device = (rows, n_cols), acc, device
        self._bufs = {}

    def get(self, name, rows):
        buf = self._bufs.get(name)
        if buf is None:
            buf = self._bufs[name] = torch.empty(self.shape, dtype=self.acc, device=self.device)
        return buf[:rows]


class _Fresh:
    """Buffers shaped like one chunk ``x``, new at each use (chunks of any shape)."""

    def __init__(self, x, acc):
        self.x, self.acc = x, acc

    def get(self, name, rows):
        return torch.empty(self.x.shape, dtype=self.acc, device=self.x.device)


def transformed(x, extras, acc, scratch=None):
    """``(z, dz/dx)`` of a chunk ``x`` in ``acc`` (``dz`` a float when constant; ``z`` is
    ``x`` itself when untransformed and already in ``acc``: read, never written).
    ``scratch.get(name, rows)`` gives the buffers; ``scratch`` None: new ones like ``x``.

    The softcap's derivative ``1 - tanh(u)**2`` is PyTorch's own ``tanh_backward``'s."""
    rows = x.shape[0]
    if scratch is None:
        scratch = _Fresh(x, acc)
    if extras is None or not extras.transform:
        return (x if x.dtype == acc else scratch.get("z", rows).copy_(x)), 1.0
    z = scratch.get("z", rows)

    def scaled(c, out):
        # c * x in acc: a bf16 x times a float would round the product to bf16 first
        return torch.mul(x, c, out=out) if x.dtype == acc else out.copy_(x).mul_(c)

    if extras.softcap is None:
        return scaled(extras.logit_scale, z), extras.logit_scale
    cap = extras.softcap
    th = scaled(extras.logit_scale / cap, scratch.get("dz", rows)).tanh_()
    torch.mul(th, cap, out=z)
    # a (1 - th**2), in place: th * th subtracted from 1, then the constant
    dz = torch.addcmul(torch.ones((), dtype=acc, device=th.device), th, th, value=-1.0,
                       out=th).mul_(extras.logit_scale)
    return z, dz


def _shifted(z, shift, out, exp2):
    """``(out, s, unit)``: ``out = (z - s) unit`` for each row's shift ``s`` (float64, per
    row) within a rounding of ``shift`` (rows,), so that ``exp(z - s)`` is ``exp2(out)``
    with ``exp2`` (fp32: ``chunks.exp_argument``'s multiply-add, ``unit`` log2(e)), else
    ``exp(out)`` (``out = z - shift``, ``unit`` 1)."""
    col = shift[:, None]
    if not exp2:
        return torch.sub(z, col, out=out), shift.double(), 1.0
    neg = torch.empty_like(col)
    chunks.exp_argument(z, col, out, neg, True, chunks.fma_fused())
    return out, chunks.row_shift(col, neg).squeeze(1), chunks.LOG2E


def _targets(target, weight, ignore_index, n_cols, acc):
    """``(t_safe, ignored, valid, w_t)`` as in ``rows._row_targets``, in ``acc``."""
    t = target.long()
    ignored = t == ignore_index
    valid = (t >= 0) & (t < n_cols) & ~ignored
    t_safe = torch.where(valid, t, 0)
    w_t = valid.to(acc) if weight is None else torch.where(valid, weight.to(acc)[t_safe], 0.0)
    return t_safe, ignored, valid, w_t


def _coefficients(g, w_t, gz, W, eps, n_classes):
    """Per row: ``(gA, gB, gk)`` of the gradient ``gA p - gB onehot - gk w`` (``gk`` None
    without smoothing), ``gA`` with the z-loss's ``gz`` in it."""
    B = (1.0 - eps) * w_t
    A = B + eps * W / n_classes if eps > 0 else B
    gA = g * A if gz is None else g * A + gz
    return gA, g * B, (g * (eps / n_classes) if eps > 0 else None)


def _chunk_grad(dz, p, t_safe, gA, gB, gk, w, out):
    """Writes ``(gA p - gB onehot(t) - gk w) dz`` into ``out``, a chunk of the gradient
    (every argument but ``w`` is the chunk's); ``p`` (the chunk's probabilities) is used
    up as the scratch."""
    grad = p.mul_(gA[:, None])
    grad.scatter_add_(1, t_safe[:, None], -gB[:, None].to(grad.dtype))
    if gk is not None:
        if w is None:
            grad.sub_(gk[:, None])
        else:
            grad.addcmul_(gk[:, None], w[None, :], value=-1.0)
    if isinstance(dz, float):
        if dz == 1.0:
            out.copy_(grad)
        else:
            torch.mul(grad, dz, out=out)
    else:
        torch.mul(grad, dz, out=out)


def _new_scratch(n_rows, n_cols, acc, device):
    return _Scratch(min(chunks.rows_per_chunk(n_cols), max(n_rows, 1)), n_cols, acc, device)


def ce_fwd(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, grad_scale=None,
           grad_out=None, extras=None, aux_out=None, z_scale=None):
    """``rows.ce_fwd`` with the extras: per-row ``(loss, lse)`` of the transformed logits,
    the loss in float32 (float64 for float64 ``x``), the lse in float64; ``aux_out`` (2,
    rows) receives the entropy and the correctness of each row; with ``grad_scale`` the
    gradient of ``loss * grad_scale`` plus the z-loss's (``gz = z_scale * lse``, 0 where
    ignored) goes into ``grad_out``, or over ``x`` when it is None."""
    n_rows, n_cols = x.shape
    acc = compute_dtype(x, weight)
    eps = float(label_smoothing)
    dev = x.device
    loss = torch.empty(n_rows, dtype=acc, device=dev)
    lse = torch.empty(n_rows, dtype=torch.float64, device=dev)
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
    lowest = torch.finfo(acc).min
    exp2 = acc == torch.float32

    def work(start, end):
        scratch = _new_scratch(end - start, n_cols, acc, dev)
        for s, e in chunks.chunk_ranges(end, n_cols, start):
            rows, r = slice(s, e), e - s
            z, dz = transformed(x[rows], extras, acc, scratch)
            if aux_out is not None:
                m, arg = z.max(1)  # the first index of the max, as argmax
            else:
                m = z.amax(1)
            ref = torch.where(m == float("-inf"), 0.0, m)  # a row of -inf: no NaN shift
            # shifted: z minus the row's shift s, in units of 1 / unit (exp2 in fp32)
            shifted, shift, unit = _shifted(z, ref, scratch.get("s", r), exp2)
            wz = None
            if eps > 0:  # W lse - sum w z = W log d - sum w (z - s): no cancellation
                wz = (shifted.sum(1) if w is None else shifted @ w) / unit
            p = (torch.exp2 if exp2 else torch.exp)(shifted, out=scratch.get("p", r))
            d = p.sum(1)
            log_d = d.log()
            lse_c = shift + log_d.double()
            lse[rows] = lse_c
            z_t = z.gather(1, t_safe[rows, None]).squeeze(1).to(acc)
            # (s - z_t) + log d: keeps log d where s is far from 0
            nll = ((shift - z_t.double()) + log_d.double()).to(acc)
            row_loss = (1.0 - eps) * w_t[rows] * nll
            if wz is not None:
                row_loss = row_loss + eps * ((W * log_d - wz) / n_cols)
            loss[rows] = row_loss
            if aux_out is not None:
                # sum p (z - s) with p = 0 where z = -inf: clamp -inf so 0 * it stays 0
                plogp = torch.linalg.vecdot(p, shifted.clamp_(min=lowest)) / unit
                aux_out[0, rows] = log_d - plogp / d
                aux_out[1, rows] = (valid[rows] & (arg == t_safe[rows])).to(aux_out.dtype)
            if grad:
                gz = None if zs is None else torch.where(ignored[rows], 0.0,
                                                         zs * lse_c.to(acc))
                coef = _coefficients(g[rows] / d, w_t[rows], None if gz is None else gz / d,
                                     W, eps, n_cols)
                # p is unnormalised here: gA / d, gz / d; the constant terms take d back
                gA, gB, gk = coef[0], coef[1] * d, None if coef[2] is None else coef[2] * d
                _chunk_grad(dz, p, t_safe[rows], gA, gB, gk, w, dst[rows])

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
        lse = lse.double()
        # each row's exp is anchored at its lse rounded to acc; the shift s it took comes
        # back exactly in gA's factor exp(s - lse) (rows.ce_bwd)
        anchor = lse.to(acc)
        gz = z_grad.to(acc) if z_grad is not None else None
        W = float(n_cols) if w is None else w.sum()
        coef = _coefficients(g, w_t, gz, W, eps, n_cols)
    exp2 = acc == torch.float32

    def work(start, end):
        scratch = _new_scratch(end - start, n_cols, acc, x.device)
        for s, e in chunks.chunk_ranges(end, n_cols, start):
            rows = slice(s, e)
            z, dz = transformed(x[rows], extras, acc, scratch)
            shifted, shift, _ = _shifted(z, anchor[rows], scratch.get("p", e - s), exp2)
            p = shifted.exp2_() if exp2 else shifted.exp_()
            gA = coef[0][rows] * torch.exp(shift - lse[rows]).to(acc)
            _chunk_grad(dz, p, t_safe[rows], gA, coef[1][rows],
                        None if coef[2] is None else coef[2][rows], w, dx[rows])

    pool.parallel_rows(n_rows, n_cols, x.device, work)
    return dx


# ------------------------------------------------------------------------------------------
# The vocab-parallel loss's per-shard passes (``fusedce.distributed``), with the extras


def vp_partials(x, t_local, w_shard, smoothing, part, extras):
    """``cpu.vocab_parallel.vp_partials`` of the transformed logits (``extras`` None: of the
    logits), computed in ``compute_dtype`` (float64 too): ``[lse_r | zt_r | sm_r]`` into
    ``part`` (float64; ``lse_r`` the max and log-sum rounded once), and with ``extras.aux``
    ``[H_r | m_r | a_r]`` after them (the slice's entropy, max and the column of its first
    max)."""
    n_rows, n_cols = x.shape
    lse, z_t, smooth = part[:n_rows], part[n_rows:2 * n_rows], part[2 * n_rows:3 * n_rows]
    aux = (part[3 * n_rows:6 * n_rows].view(3, n_rows)
           if extras is not None and extras.aux else None)
    if n_cols == 0:
        lse.fill_(float("-inf"))
        z_t.zero_()
        smooth.zero_()
        if aux is not None:  # fills, not a copy from the host (a sync on a GPU)
            aux[0].fill_(float("nan"))
            aux[1].fill_(float("-inf"))
            aux[2].zero_()
        return part
    acc = compute_dtype(x, w_shard)
    w = w_shard.to(acc) if (smoothing and w_shard is not None) else None
    w_r = float(n_cols) if w is None else w.sum()
    t_safe = t_local.clamp_min(0)

    def work(start, end):
        scratch = _new_scratch(end - start, n_cols, acc, x.device)
        for s, e in chunks.chunk_ranges(end, n_cols, start):
            z, _ = transformed(x[s:e], extras, acc, scratch)
            m = z.amax(1, keepdim=True)
            ref = torch.where(m == float("-inf"), 0.0, m)
            shifted = z - ref
            p = torch.exp(shifted)
            d = p.sum(1)
            log_d = d.log()
            lse[s:e] = ref.squeeze(1).double() + log_d.double()
            picked = z.gather(1, t_safe[s:e, None]).squeeze(1)
            z_t[s:e] = torch.where(t_local[s:e] >= 0, picked, 0.0)
            if smoothing:
                wz = shifted.sum(1) if w is None else shifted @ w
                smooth[s:e] = w_r * log_d - wz
            if aux is not None:
                plogp = torch.where(z > float("-inf"), p * shifted, 0.0).sum(1)
                aux[0, s:e] = log_d - plogp / d
                aux[1, s:e] = m.squeeze(1)
                aux[2, s:e] = z.argmax(1).float()

    pool.parallel_rows(n_rows, n_cols, x.device, work)
    return part


def vp_grad(x, t_local, lse, g, w_t, consts, eps, w_shard, dx, extras, z_grad):
    """``cpu.vocab_parallel.vp_grad`` through the logit transform, with the z-loss's
    per-row ``z_grad``: ``(gA p - gB onehot - gk w) dz/dx`` over the slice, the global
    ``W, C = consts`` in ``A`` and ``gk``, the one-hot term only where the target is here.
    ``p = exp(z - a) exp(a - lse)``, ``a`` the float64 ``lse`` rounded to the compute
    dtype and the second factor (float64, per row) folded into ``gA``: a row far from 0
    keeps its log-sum."""
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        return dx
    acc = compute_dtype(x, w_shard)  # as vp_partials took it
    w = w_shard.to(acc) if (eps > 0 and w_shard is not None) else None
    gA, gB, gk = _coefficients(g, w_t, z_grad, consts[0], eps, consts[1])
    lse = lse.double()
    anchor = lse.to(acc)
    gA = gA * torch.exp(anchor.double() - lse).to(acc)
    in_shard = t_local >= 0
    gB = torch.where(in_shard, gB, 0.0)
    t_safe = t_local.clamp_min(0)

    def work(start, end):
        scratch = _new_scratch(end - start, n_cols, acc, x.device)
        for s, e in chunks.chunk_ranges(end, n_cols, start):
            z, dz = transformed(x[s:e], extras, acc, scratch)
            p = torch.sub(z, anchor[s:e, None], out=scratch.get("p", e - s)).exp_()
            _chunk_grad(dz, p, t_safe[s:e], gA[s:e], gB[s:e],
                        None if gk is None else gk[s:e], w, dx[s:e])

    pool.parallel_rows(n_rows, n_cols, x.device, work)
    return dx
