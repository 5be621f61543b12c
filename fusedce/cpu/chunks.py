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

# Elements per chunk: 3 * 2**16 fp32 values (768 KiB, 3 rows of 50,257) stay in L2 together
# with their gradient or scratch chunk while the chunk is worked on.
CHUNK_ELEMENTS = 3 << 16


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



def fwd_chunks(x: torch.Tensor, dst: Optional[torch.Tensor], row_max: torch.Tensor,
                row_sum: torch.Tensor, sum_wx: Optional[torch.Tensor],
                w: Optional[torch.Tensor], gA: Optional[torch.Tensor],
                zs: Optional[torch.Tensor],
                coef: Optional[torch.Tensor], smooth: Optional[torch.Tensor],
                scratch: Optional[torch.Tensor], chunks: list[int], step: int,
                direct: bool, inplace: bool, shifted: bool, x_t: Optional[torch.Tensor],
                lo_bound: float, g_lo: list[float], g_hi: list[float]) -> list[int]:
    """Works through the row chunks ``chunks`` (``step`` rows each) of ``ce_fwd``: their
    row sums of ``exp(x - shift)`` into ``row_sum`` and the shift into ``row_max``,
    ``sum_c w_c (x_c - shift)`` into ``sum_wx`` where given, and with ``dst`` the chunk's gradient
    ``coef p - smooth w`` into it, ``coef = gA / sum`` (``(gA + zs lse) / sum`` with a
    z-loss's per-row ``zs``; only with ``shifted``, where the shift is the row max).

    ``shifted``: the shift is the row max. Else none at first (``row_max`` holds 0), and
    each chunk is tested (``_sums_fail``) before its gradient is written (x survives until
    then): the chunks that fail are left unwritten and returned, for a shifted pass, and
    from the first failure on the target logits ``x_t`` (a column), when given, are the
    shift (their own terms make every sum at least 1: logits all far below 0, as a
    pretrained GPT-2's near -60, fail without a shift but pass with it).

    ``direct``: ``x`` is fp32 and is read as it is, else through the fp32 ``scratch``
    chunk; ``inplace``: ``dst`` is ``x`` (``exp`` then goes to the scratch, and the gradient
    over ``x`` once the chunk passed its test).
    ``g_lo``, ``g_hi``: per chunk, the smallest and largest finite nonzero ``|gA|`` of
    its rows (with a gradient; else empty).

    Written in the subset of Python that TorchScript compiles (``script``): run as a
    script, the loop holds no GIL, which the worker threads otherwise contend for between
    the many short ops."""
    failed: list[int] = []
    n_rows = x.shape[0]
    by_target = False
    for k in chunks:
        r0 = k * step
        rows = min(step, n_rows - r0)
        xc = x.narrow(0, r0, rows)
        dc: Optional[torch.Tensor] = None
        if dst is not None:
            dc = dst.narrow(0, r0, rows)
        sc: Optional[torch.Tensor] = None
        if scratch is not None:
            sc = scratch.narrow(0, 0, rows)
        # buf: exp(x - shift) of the chunk, in the gradient, x itself or the scratch
        if direct:
            src = xc
        else:
            assert sc is not None
            src = sc.copy_(xc)  # one vectorised conversion: mixed-dtype ops are slow
        m: Optional[torch.Tensor] = None
        if shifted:
            m = torch.amax(src, 1, keepdim=True, out=row_max.narrow(0, r0, rows))
        elif by_target:
            assert x_t is not None
            m = row_max.narrow(0, r0, rows).copy_(x_t.narrow(0, r0, rows))
        # where exp(x - shift) goes: the gradient's chunk, else the scratch (also in place:
        # x must survive until the chunk's test, and the gradient is written over it last)
        target: Optional[torch.Tensor] = sc
        if direct and dc is not None and not inplace:
            target = dc
        if not direct:
            buf = src
            if m is not None:
                buf.sub_(m)
        else:
            assert target is not None
            buf = xc if m is None else torch.sub(xc, m, out=target)
        if sum_wx is not None:  # relative to the shift: no cancellation against lse
            out = sum_wx.narrow(0, r0, rows)
            if w is None:
                torch.sum(buf, 1, out=out)
            else:
                torch.mv(buf, w, out=out)
        if buf is xc:
            assert target is not None
            buf = torch.exp(xc, out=target)
        else:
            buf.exp_()
        sums = torch.sum(buf, 1, keepdim=True, out=row_sum.narrow(0, r0, rows))
        if not shifted and _sums_fail(sums, lo_bound, g_lo, g_hi, k, by_target):
            failed.append(k)
            by_target = x_t is not None
            continue
        if dc is not None:
            assert gA is not None and coef is not None
            gA_c = gA.narrow(0, r0, rows)
            if zs is not None:  # the z-loss's gz = zs lse, lse = shift + log(sum)
                assert m is not None
                gA_c = gA_c + zs.narrow(0, r0, rows) * (m + torch.log(sums))
            scale = torch.div(gA_c, sums, out=coef.narrow(0, r0, rows))
            if direct and buf is not dc:  # in place: from the scratch over x, one pass
                buf = torch.mul(buf, scale, out=dc)
            else:
                buf.mul_(scale)
            if smooth is not None:
                _smoothing_term(buf, smooth.narrow(0, r0, rows), w)
            if not direct:
                dc.copy_(buf)
    return failed


def _sums_fail(sums: torch.Tensor, lo_bound: float, g_lo: list[float], g_hi: list[float],
               k: int, by_target: bool) -> bool:
    """Whether chunk ``k``, taken without the max shift, must be redone with it: a row sum
    outside (``lo_bound``, 1e30) (an overflow, inf or NaN, or so small a sum that the
    terms fp32 flushes, below 2**-126 each with denormals flushed, weigh in it), or, with a
    gradient, a scale ``|gA| / sum`` that could fall below fp32's normal range (the
    gradient would lose its precision) or exceed 1 (exp(x) is subnormal or 0 below x =
    -87.3, where the gradient, scaled up, could be a normal number). Bounds per chunk:
    one reduction and scalar tests (each small op costs microseconds, even scripted).

    ``by_target`` (the shift is the target logit, at most the row max): a scale above 1
    is no reason to redo, the max shift would flush at least the same terms (heavy class
    weights under reduction 'sum' would otherwise redo nearly every chunk)."""
    lo_hi = torch.aminmax(sums)
    lo = float(lo_hi[0])
    hi = float(lo_hi[1])
    if not (lo > lo_bound and hi < 1e30):
        return True
    if len(g_hi) > 0:
        return not (g_lo[k] / hi >= 1.2e-38 and (by_target or g_hi[k] <= lo))
    return False


def bwd_chunks(x: torch.Tensor, dx: torch.Tensor, shift: torch.Tensor,
                sign: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                smooth: Optional[torch.Tensor], w: Optional[torch.Tensor],
                scratch: Optional[torch.Tensor], skip: list[bool], fast: list[bool],
                start: int, end: int, step: int, direct: bool):
    """``ce_bwd``'s loop over the chunks of rows ``[start, end)``: ``dx = sign exp(x -
    shift)`` (``shift = lse - log|g A|``), or with ``fast`` (rows flagged from ``start``)
    ``scale exp(x)``; minus ``smooth w`` where given. Rows flagged in ``skip`` are zeroed,
    not computed. ``direct``: fp32 in and out, else through the fp32 ``scratch``. Runs as a
    script like ``fwd_chunks``."""
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
        all_fast = len(fast) > 0
        if all_fast:
            for i in range(s, e):
                if not fast[i - start]:
                    all_fast = False
        if direct:
            buf = dxc
        else:
            assert scratch is not None
            buf = scratch.narrow(0, 0, rows).copy_(xc)
        if all_fast:  # exp straight from x: one pass fewer
            assert scale is not None
            if direct:
                torch.exp(xc, out=buf)
            else:
                buf.exp_()
            buf.mul_(scale.narrow(0, s, rows))  # the sign of g A included
        else:
            if direct:
                torch.sub(xc, shift.narrow(0, s, rows), out=buf)
            else:
                buf.sub_(shift.narrow(0, s, rows))
            buf.exp_()
            if sign is not None:
                buf.mul_(sign.narrow(0, s, rows))
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

