"""The CPU path's chunk loops, written in the subset of Python that TorchScript compiles.

Rows are worked through in chunks of about ``CHUNK_ELEMENTS`` values, so that only the first
pass over a chunk reads main memory and the following ones (subtract, exp, sum, scale) hit
L2. A worker's loop over its chunks runs as a TorchScript function (``script``): between its
ops a Python loop takes the GIL back, which the worker threads then contend for. Small
inputs, run inline, call the loops as Python; ``FUSEDCE_SCRIPT=0``, or a PyTorch without
TorchScript, runs them as Python everywhere.
"""

import inspect
import os
import threading
import warnings
from typing import Optional

import torch

# Elements per chunk: 12 * 2**16 fp32 values (3 MiB, 15 rows of 50,257), which stay in the
# last-level cache with their gradient or scratch chunk while the chunk is worked on; fewer,
# larger chunks pay each op's fixed cost less often. Measured against 3, 6 and 24 * 2**16
# (docs/benchmarks.md).
CHUNK_ELEMENTS = 12 << 16
# log2(e) rounded to fp32 (the value fp32 ops take)
LOG2E = 1.4426950216293335
_FUSED = None


def fma_fused():
    """Whether ``torch.add(c, x, alpha=a)`` rounds once (a fused multiply-add) on this
    PyTorch's CPU kernels, as ``exp_argument`` uses it (a column broadcast over rows, the
    vectorised body and the scalar tail): so on x86 builds with FMA (AVX2, AVX-512), not
    under ``ATEN_CPU_CAPABILITY=default``. ``(1 + 2**-12)**2 - (1 + 2**-11)`` is 2**-24
    rounded once, 0 rounded twice."""
    global _FUSED
    if _FUSED is None:
        a = 1.0 + 2.0 ** -12
        got = torch.add(torch.full((2, 1), -(1.0 + 2.0 ** -11)), torch.full((2, 37), a),
                        alpha=a)
        _FUSED = bool((got == 2.0 ** -24).all())
    return _FUSED


def cdiv(a, b):
    return -(-a // b)


def rows_per_chunk(n_cols):
    """Rows per chunk for rows of ``n_cols`` values (at least 1)."""
    return max(1, CHUNK_ELEMENTS // max(n_cols, 1))


def chunk_ranges(n_rows, n_cols, start=0):
    """``(s, e)`` row ranges of one chunk each over ``[start, n_rows)``."""
    step = rows_per_chunk(n_cols)
    for s in range(start, n_rows, step):
        yield s, min(s + step, n_rows)


def _smoothing_term(out: torch.Tensor, c: torch.Tensor, w: Optional[torch.Tensor]):
    """``out -= c[:, None] * w[None, :]`` (``w`` None: all ones), in place."""
    if w is None:
        out.sub_(c.unsqueeze(1))
    else:
        out.addcmul_(c.unsqueeze(1), w.unsqueeze(0), value=-1.0)



def exp_argument(src: torch.Tensor, shift: torch.Tensor, out: torch.Tensor,
                 neg: torch.Tensor, fill_neg: bool, fused: bool,
                 k: float = 1.4426950216293335) -> torch.Tensor:
    """``out = (src - s) k`` for each row's shift ``s`` (a column) within a rounding of
    ``shift``, ``k`` an fp32 value: with ``k = LOG2E`` (the default) ``exp2(out)`` is
    ``exp(src - s)``, with ``k = fp32(a LOG2E)`` it is ``exp(a (src - s))`` (a logit scale
    ``a > 0``); ``out`` may be ``src``.

    One fused multiply-add, ``src k + neg`` with ``neg = -shift k`` rounded once
    (``torch.add`` with ``alpha`` rounds once): the argument's rounding is relative to
    ``src - s``, as a subtraction's would be, and ``s = -neg / k``. PyTorch's base-2
    exponential then costs a third of its ``exp`` on the CPUs measured
    (docs/benchmarks.md). ``neg`` (an fp32 column) is computed here with ``fill_neg``, else
    given (rounded once from float64 by the caller).

    ``s`` differs from ``shift`` by up to half an ulp of ``neg``: a factor common to the
    row's terms (it cancels in ``p = e / sum(e)``), below 2**0.5 while ``|neg| < 2**24``.
    Beyond that (rows far from 0, or beyond 2.3e38 where ``neg`` overflows; a NaN row in
    the chunk, which hides the others' size), off the CPU (the test would sync) and
    without a fused multiply-add (``fused``, ``fma_fused()``: two roundings, the second
    relative to ``src``), the chunk subtracts ``shift`` first (``s = shift``) and sets its
    ``neg`` to +inf to say so."""
    if fill_neg:
        torch.mul(shift, -k, out=neg)
    # one reduction and one read
    if (not fused or src.device.type != "cpu"
            or not float(torch.linalg.vector_norm(neg, float("inf"))) < 16777216.0):
        neg.fill_(float("inf"))
        return torch.sub(src, shift, out=out).mul_(k)
    return torch.add(neg, src, alpha=k, out=out)


def exp2_factor(scale):
    """``exp_argument``'s ``k`` for a logit scale ``scale > 0``: ``scale LOG2E`` rounded to
    fp32 (the value an fp32 op takes), ``LOG2E`` itself for 1."""
    if scale == 1.0:
        return LOG2E
    return float(torch.tensor(scale * LOG2E, dtype=torch.float32))


def row_shift(row_max, row_neg, k=LOG2E):
    """In float64, the shift that ``chunks.exp_argument`` took for rows of max ``row_max``
    where it left ``row_neg``: ``-row_neg / k``, or the max where it subtracted that."""
    return torch.where(row_neg.isinf(), row_max.double(), row_neg.double() / -k)


def fwd_chunks(x: torch.Tensor, dst: Optional[torch.Tensor], row_max: torch.Tensor,
               row_neg: torch.Tensor, row_sum: torch.Tensor, sum_wx: Optional[torch.Tensor],
               w: Optional[torch.Tensor], gA: Optional[torch.Tensor],
               zs: Optional[torch.Tensor], coef: Optional[torch.Tensor],
               smooth: Optional[torch.Tensor], scratch: Optional[torch.Tensor],
               start: int, end: int, step: int, direct: bool, fused: bool,
               scale: float, k: float, prefix: int,
               floor: Optional[torch.Tensor] = None) -> bool:
    """``ce_fwd``'s loop over the chunks of rows ``[start, end)``, for the logits ``z = scale
    x`` (``scale > 0``; ``k = exp2_factor(scale)``): each row's max of ``x`` into
    ``row_max``, ``exp_argument``'s ``neg`` into ``row_neg`` (``row_shift`` gives the shift
    ``s`` of ``x`` they stand for), ``sum_c exp(z_c - scale s)`` into ``row_sum``, ``sum_c
    w_c (z_c - scale s)`` into ``sum_wx`` where given, and with ``dst`` the chunk's
    gradient ``coef p - smooth w`` into it, ``coef = gA / sum`` (``(gA + zs lse) / sum``
    with a z-loss's per-row ``zs``; ``gA``, ``zs`` and ``smooth`` already carry the factor
    ``scale`` of the gradient with respect to ``x``).

    ``direct``: ``x`` is fp32 and is read as it is: ``exp`` is formed in ``dst``'s chunk
    (over ``x`` itself in place; in the fp32 ``scratch`` chunk without ``dst``); else
    through ``scratch``, converted once (mixed-dtype ops are slow).

    ``prefix`` below the row length: each row's shift is the max of its first ``prefix``
    values and of its ``floor`` (a column of values of the row known already: the target's
    logit), not of the whole row, which spares a pass over each chunk while it is read from
    memory; the range's shifts are taken at once, before its chunks. A shift at most the
    max loses no term: every exponent only grows, the largest is at least 1. A row whose sum
    exceeds 2**32 (its max more than 22 above its shift, whose exponent fp32 would round
    coarsely; an overflow, a NaN or +inf), or whose shift is too far from 0 for
    ``exp_argument``'s multiply-add, is done again with the exact max before its chunk's
    gradient is written (its logits are still there, in place too: bf16 only, where
    ``scratch`` holds the chunk until then); where more than an eighth of the range's rows
    so far needed it, the rest of the range takes the exact max from the start. ``exp`` is
    then formed in ``scratch``; into a separate ``dst`` the exp itself writes, whose
    arithmetic hides the fetch of ``dst``'s lines. Returns whether no row needed the exact
    max.

    Written in the subset of Python that TorchScript compiles (``script``): run as a
    script, the loop holds no GIL, which the worker threads otherwise contend for between
    the many short ops."""
    n = end - start
    # each chunk's views, made in one op per tensor, not one per chunk
    xs = x.narrow(0, start, n).split(step)
    maxs = row_max.narrow(0, start, n).split(step)
    negs = row_neg.narrow(0, start, n).split(step)
    sums_ = row_sum.narrow(0, start, n).split(step)
    dsts: list[torch.Tensor] = []
    if dst is not None:
        dsts = dst.narrow(0, start, n).split(step)
    # without a fused multiply-add, exp_argument subtracts the max first
    estimate = prefix < x.size(1) and fused
    if estimate:
        heads = torch.amax(x.narrow(0, start, n).narrow(1, 0, prefix), 1, keepdim=True)
        if floor is not None:
            heads = torch.maximum(heads, floor.narrow(0, start, n))
        row_max.narrow(0, start, n).copy_(heads)
        neg = torch.mul(row_max.narrow(0, start, n), -k, out=row_neg.narrow(0, start, n))
        # as exp_argument's test, the multiply-add's shift within a rounding of the max: a
        # row beyond it takes an infinite shift, whose sum fails the test below
        neg.masked_fill_(torch.logical_not(neg.abs() < 16777216.0), float("inf"))
    # in place, the estimate needs the logits kept until a chunk's sums are tested: fp32
    # in place forms exp over them, so it takes the exact max (``rows._shift_prefix``)
    assert not (estimate and direct and dst is not None and dst.is_set_to(x))
    held = estimate
    seen, redone = 0, 0
    for i in range(len(xs)):
        xc = xs[i]
        rows = xc.size(0)
        r0 = start + i * step
        seen += rows
        dc: Optional[torch.Tensor] = None
        if dst is not None:
            dc = dsts[i]
        buf = _exp_rows(xc, dc, scratch, maxs[i], negs[i], sums_[i], sum_wx, w, r0, direct,
                        fused, k, estimate)
        sums = sums_[i]
        # 2**32: the largest exponent is then below 32, which fp32 rounds to within 2**-20
        # (an exp within 6.6e-7); a NaN or +inf fails the test too
        if estimate and not float(torch.amax(sums)) <= 4294967296.0:
            held = False
            far = torch.logical_not(sums <= 4294967296.0).squeeze(1)
            again: list[int] = far.nonzero().squeeze(1).tolist()
            redone += len(again)
            for j in again:
                dc_j: Optional[torch.Tensor] = None
                if dc is not None:
                    dc_j = dc.narrow(0, j, 1)
                s_j: Optional[torch.Tensor] = None
                if scratch is not None:
                    s_j = scratch.narrow(0, j, 1)
                _exp_rows(xc.narrow(0, j, 1), dc_j, s_j, maxs[i].narrow(0, j, 1),
                          negs[i].narrow(0, j, 1), sums.narrow(0, j, 1), sum_wx, w, r0 + j,
                          direct, fused, k, False)
        if dc is not None:
            assert gA is not None and coef is not None
            gA_c = gA.narrow(0, r0, rows)
            if zs is not None:  # the z-loss's gz = zs lse, lse = scale shift + log(sum)
                gA_c = gA_c + zs.narrow(0, r0, rows) * (maxs[i] * scale + torch.log(sums))
            buf.mul_(torch.div(gA_c, sums, out=coef.narrow(0, r0, rows)))
            if smooth is not None:
                _smoothing_term(buf, smooth.narrow(0, r0, rows), w)
            if not direct:
                dc.copy_(buf)
        if estimate and redone * 8 > seen:
            # a row done again costs about 6 times what the estimate saves on one: where
            # more than an eighth need it, the rest of the range takes the exact max
            estimate = False
    return held


def _exp_rows(xc: torch.Tensor, dc: Optional[torch.Tensor], scratch: Optional[torch.Tensor],
              m_out: torch.Tensor, neg_out: torch.Tensor, sum_out: torch.Tensor,
              sum_wx: Optional[torch.Tensor], w: Optional[torch.Tensor], r0: int,
              direct: bool, fused: bool, k: float, estimate: bool) -> torch.Tensor:
    """``fwd_chunks``'s exp of the rows ``xc`` (from row ``r0``): ``exp2`` of the shifted
    exponent where the exp lives (``dc``, or the first rows of ``scratch``), which it
    returns, with the rows' max (exact, unless ``estimate``: ``m_out`` and ``neg_out`` hold
    the estimated shift already), ``neg``, sum and ``sum_wx``."""
    rows = xc.size(0)
    if direct and dc is not None and not estimate:
        src = xc
        buf = dc
    else:
        assert scratch is not None
        buf = scratch.narrow(0, 0, rows)
        src = xc if direct else buf.copy_(xc)
    if estimate:
        torch.add(neg_out, src, alpha=k, out=buf)
    else:
        m = torch.amax(src, 1, keepdim=True, out=m_out)
        exp_argument(src, m, buf, neg_out, True, fused, k)
    if sum_wx is not None:  # relative to the shift: no cancellation against lse
        out = sum_wx.narrow(0, r0, rows)
        if w is None:
            torch.sum(buf, 1, out=out)
        else:
            torch.mv(buf, w, out=out)
        out.div_(1.4426950216293335)  # LOG2E
    if direct and dc is not None and estimate:
        buf = torch.exp2(buf, out=dc)
    else:
        buf.exp2_()
    torch.sum(buf, 1, keepdim=True, out=sum_out)
    return buf


def bwd_chunks(x: torch.Tensor, dx: torch.Tensor, anchor: torch.Tensor, neg: torch.Tensor,
               coef_fma: torch.Tensor, coef_sub: torch.Tensor,
               smooth: Optional[torch.Tensor], w: Optional[torch.Tensor],
               scratch: Optional[torch.Tensor], skip: list[bool],
               start: int, end: int, step: int, direct: bool, fused: bool):
    """``ce_bwd``'s loop over the chunks of rows ``[start, end)``: ``dx = exp(x - s) coef``
    for each row's ``anchor`` (``neg`` its ``-anchor log2(e)`` rounded once), ``s`` the
    shift ``exp_argument`` took and ``coef`` the row's ``coef_fma`` where that was its
    multiply-add, else ``coef_sub`` (``s`` = ``anchor``), minus ``smooth w`` where given.
    Rows flagged in ``skip`` (from ``start``) are zeroed, not computed. ``direct``: fp32
    in and out, else through the fp32 ``scratch``. Runs as a script like
    ``fwd_chunks``."""
    for s in range(start, end, step):
        e = min(s + step, end)
        rows = e - s
        xc = x.narrow(0, s, rows)
        dxc = dx.narrow(0, s, rows)
        zero: list[int] = []
        if len(skip) > 0:
            for i in range(s, e):
                if skip[i - start]:
                    zero.append(i)
        if len(zero) == rows:
            dxc.zero_()
            continue
        neg_c = neg.narrow(0, s, rows)
        if direct:
            buf = exp_argument(xc, anchor.narrow(0, s, rows), dxc, neg_c, False, fused)
        else:
            assert scratch is not None
            buf = scratch.narrow(0, 0, rows).copy_(xc)
            exp_argument(buf, anchor.narrow(0, s, rows), buf, neg_c, False, fused)
        buf.exp2_()
        # exp_argument sets the chunk's neg to +inf where it subtracted the anchor instead;
        # off the CPU it always does (reading neg there would be a device sync)
        coef = coef_sub
        if x.device.type == "cpu" and float(neg_c[0, 0]) != float("inf"):
            coef = coef_fma
        buf.mul_(coef.narrow(0, s, rows))
        if smooth is not None:
            _smoothing_term(buf, smooth.narrow(0, s, rows), w)
        if not direct:
            dxc.copy_(buf)
        for i in zero:
            dx[i].zero_()


_SCRIPTED = {}
_SCRIPT_LOCK = threading.Lock()


def _reset_in_child():
    # held by a thread of the parent that was scripting a loop: the child would wait forever
    global _SCRIPT_LOCK
    _SCRIPT_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


def script(fn):
    """``torch.jit.script(fn)``, made once, where scripting is on and works; else ``fn``.

    TorchScript is deprecated in favour of torch.compile, which would need a C++ compiler
    at run time here; a script is the one way PyTorch offers to run a loop of ops without
    the GIL. ``fn`` is plain Python as well, so where TorchScript is gone or fails (or
    with ``FUSEDCE_SCRIPT=0``) the same code runs as Python, only slower."""
    with _SCRIPT_LOCK:
        loop = _SCRIPTED.get(fn)
        if loop is None:
            loop = fn
            if os.environ.get("FUSEDCE_SCRIPT", "1") != "0":
                try:
                    # torch.jit.script warns that it is deprecated (once per process)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        scripted = torch.jit.script(fn)
                    # TorchScript compiles the source file as it is now on disk: one
                    # changed since the import (an upgrade under a running process) could
                    # give another function at the same lines
                    names = [a.name for a in scripted.schema.arguments]
                    if names == list(inspect.signature(fn).parameters):
                        loop = scripted
                except Exception:  # noqa: BLE001 - any failure: run as Python
                    pass
            _SCRIPTED[fn] = loop
        return loop

