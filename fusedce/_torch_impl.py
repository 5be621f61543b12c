"""The pure-PyTorch implementation: what runs on the CPU, and the oracle for the kernels.

It has the same three entry points, arguments and math as the Triton launchers in
``fusedce.kernels`` (see the docstring of ``kernels/cross_entropy.py`` for the formulas):

    lse = m + log(sum_c exp(x_c - m)),  m = max_c x_c
    loss = (1 - eps) w_t (lse - x_t) + eps / C (W lse - sum_c w_c x_c),  W = sum_c w_c
    dx_c = g (A p_c - B [c = t] - eps / C w_c),  p = exp(x - lse),
           A = (1 - eps) w_t + eps W / C,  B = (1 - eps) w_t

How it is made fast on a CPU (each choice was measured; see ``bench/``):

- **Row chunks that stay in cache.** The rows are worked through in chunks of about
  ``CHUNK_ELEMENTS`` values, so only the first pass over a chunk reads main memory and the
  following ones (subtract, exp, sum, scale) hit L2. No (rows x C) temporary exists besides
  the gradient itself; fp32 logits are read in place, other dtypes through a small fp32
  scratch chunk.
- **Few passes per chunk.** Where the gradient is computed in the backward (``ce_bwd``:
  float16, ``torch.compile``, a second backward), the upstream gradient and A fold into
  the exponent, ``g A p = exp(x - (lse - log(g A)))``, so it is one subtract into the
  gradient and one in-cache exp; the target's entry, where ``A p_t - B`` may cancel, is
  written afterwards from a per-row fp32 formula (one rounding, as in the kernels).
- **Chunk-level parallelism.** The rows are split across a small pool of worker threads,
  each running single-threaded PyTorch ops on its own chunks (the ops release the GIL).
  Intra-op threading of many cache-sized ops pays a barrier per op, which collapses when
  the cores are shared with other processes; independent workers degrade gracefully.
  ``torch.get_num_threads()`` sets the number of workers; small inputs run inline.
- **The gradient in the forward.** When the logits will get a gradient, ``ce_fwd`` with
  ``inplace_scale`` writes the gradient of the reduced loss in the same pass as the loss
  (``fusedce._function.CrossEntropyFunction``): into ``grad_out`` (the default mode: the
  logits are read once, not once per pass) or over ``x`` (``inplace_backward``). The
  backward then only rescales rows whose upstream gradient is not 1.
- **Reused gradient buffers.** First-touch faults of a new logits-sized buffer cost more
  than an exp pass over it, and PyTorch's CPU allocator hands such a buffer back to the
  kernel when it is freed, so every step would pay them again. ``grad_buffer`` reuses a
  buffer once nothing refers to it any more (``_GradCache``, like the CUDA caching
  allocator; ``fusedce.empty_cache()``, ``FUSEDCE_GRAD_CACHE=0``). A buffer that is new
  anyway is faulted in by each worker for its own rows with one ``MADV_POPULATE_WRITE``
  call (``PAGE_ADVICE``; ``"hugepage"`` asks for 2 MiB pages instead).
- **No max pass where none is needed.** Where ``x`` survives the pass, the forward takes
  ``exp(x)`` without first finding the row max, and tests each chunk (``_sums_fail``) before
  its gradient is written: a sum outside (max(1e-30, V 2**-102), 1e30), an overflow or a
  near-underflow, or a gradient scale |gA| / sum below fp32's normal range or above 1
  sends the chunk to a pass with the row max (``UNSHIFTED_EXP``). After a worker's first
  failure its later chunks take the target logit as their shift (their sums are then at
  least 1): logits all far below 0, as a pretrained GPT-2's near -60, cost one chunk per
  worker twice, not every chunk. In place this runs through the scratch chunk of logits
  other than fp32 (bf16, fp16); fp32 in place, where exp would overwrite a row that
  might have to be redone, always subtracts the max.
- **The chunk loops without the GIL.** A worker's loop over its chunks (``_fwd_chunks``,
  ``_bwd_chunks``) runs as a TorchScript function (``_script``): between its ops a Python
  loop takes the GIL back, which the workers then contend for (with two workers, the
  loops run as Python made forward+backward take 1.3-1.6x (fp32) to 1.9x (bf16 in
  place) as long: ``python -m bench.script_ablation``).
  Small inputs, run inline, call the loops as Python (less overhead per call);
  ``FUSEDCE_SCRIPT=0``, or a PyTorch without TorchScript, runs them as Python everywhere.
"""

import ctypes
import ctypes.util
import inspect
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

# Elements per chunk: 3 * 2**16 fp32 values (768 KiB, 3 rows of 50,257) stay in L2 together
# with their gradient or scratch chunk while the chunk is worked on. Measured at 2,048 x
# 50,257 with the scripted loops: 2-3 rows per chunk beat 5 (2**18) by 5-10% in both dtypes.
CHUNK_ELEMENTS = 3 << 16
# Below this many logits the work runs inline in the calling thread (torch's own intra-op
# threads): a round trip through the worker pool costs tens of microseconds.
PARALLEL_MIN_ELEMENTS = 1 << 20
# The forward's sum(exp(x)) without the max shift where that provably changes nothing
# (checked per chunk, ``_sums_fail``): saves a pass over every chunk.
UNSHIFTED_EXP = True
# The same in the backward (exp(x) * g A exp(-lse)): ~5% faster, but its different rounding
# of near-zero gradients flips the signs that Adam's first step amplifies (tests/test_hf.py
# compares parameters after a step at 1e-6), so it is off.
UNSHIFTED_EXP_BWD = False
# How the fresh gradient's pages are faulted in: "populate" (MADV_POPULATE_WRITE, each worker
# its own rows, one call instead of a fault per 4 KiB page), "hugepage" (MADV_HUGEPAGE: 2 MiB
# pages; a large win on bare metal, but measured 2x slower in the benchmark's VM, whose host
# backs freshly freed huge pages lazily) or "none". Environment: FUSEDCE_PAGE_ADVICE.
PAGE_ADVICE = os.environ.get("FUSEDCE_PAGE_ADVICE", "populate")
# Fresh buffers at least this large are offered to transparent huge pages.
HUGEPAGE_MIN_BYTES = 8 << 20


def _cdiv(a, b):
    return -(-a // b)


def _chunks(n_rows, n_cols, start=0):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for s in range(start, n_rows, step):
        yield s, min(s + step, n_rows)


# ------------------------------------------------------------------------------------------
# Worker threads


class _Pool:
    """A lazily started pool of threads whose PyTorch ops run single-threaded."""

    def __init__(self):
        self.lock = threading.Lock()
        self.executor = None
        self.size = 0

    def get(self, n):
        with self.lock:
            if self.executor is None or self.size < n:
                if self.executor is not None:
                    self.executor.shutdown(wait=False)
                self.executor = self._start(n)
                self.size = n
            return self.executor

    @staticmethod
    def _start(n):
        # torch.set_num_threads(1) in a worker limits that thread's OpenMP team (a per-thread
        # setting) but also stores 1 as the process-wide default that new threads start
        # from: restore it once every worker has been set up (the barrier makes sure each of
        # the n threads ran the initialiser exactly once).
        n_threads = torch.get_num_threads()
        barrier = threading.Barrier(n + 1)

        def single_threaded():
            torch.get_num_threads()  # this thread's lazy init, which would undo the next line
            torch.set_num_threads(1)
            barrier.wait()

        executor = ThreadPoolExecutor(n, thread_name_prefix="fusedce")
        for _ in range(n):
            executor.submit(single_threaded)
        barrier.wait()
        torch.set_num_threads(n_threads)
        return executor


_POOL = _Pool()


def _reset_pool_in_child():
    # a forked child inherits the pool object but not its threads, and a lock possibly held
    # by a thread of the parent; the gradient cache starts afresh too
    global _POOL, _GRADS, _SCRIPT_LOCK
    _POOL = _Pool()
    _GRADS = _GradCache()
    # held by a thread of the parent that was scripting a loop: the child would wait forever
    _SCRIPT_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_in_child)


def _max_workers():
    return torch.get_num_threads()


def _n_workers(n_rows, n_cols, device):
    """How many worker threads ``_parallel_rows`` uses; 1: inline."""
    if device.type != "cpu":  # another device: its own streams
        return 1
    return max(1, min(_max_workers(), _cdiv(n_rows * n_cols, PARALLEL_MIN_ELEMENTS), n_rows))


def _parallel_rows(n_rows, n_cols, device, work):
    """Runs ``work(start, end)`` over row ranges covering ``[0, n_rows)``: inline for small
    inputs, else one contiguous range per worker thread. ``work`` runs under no_grad."""
    n_workers = _n_workers(n_rows, n_cols, device)
    if n_workers <= 1:
        with torch.no_grad():
            work(0, n_rows)
        return

    # grad and inference mode are thread-local: a worker has grad on and inference off, and
    # outside inference mode the buffers made in it (inference tensors) cannot be written
    inference = torch.is_inference_mode_enabled()

    def task(s, e):
        with torch.inference_mode(inference), torch.no_grad():
            work(s, e)

    # whole chunks per worker keep the chunks the same wherever the boundary falls
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    per_worker = _cdiv(_cdiv(n_rows, step), n_workers) * step
    executor = _POOL.get(n_workers)
    futures = [executor.submit(task, s, min(s + per_worker, n_rows))
               for s in range(0, n_rows, per_worker)]
    for f in futures:
        f.result()


# ------------------------------------------------------------------------------------------
# Gradient buffers kept for reuse


class _GradCache:
    """Logits-sized CPU buffers for gradients, reused once nothing references them.

    PyTorch's CPU allocator returns a buffer this large to the kernel when it is freed, so
    every step would fault in and zero a fresh one, which costs more than computing the
    gradient into it (the page faults measured in ``bench/``). Like the CUDA caching
    allocator, this keeps up to ``MAX_ENTRIES`` buffers (two losses per step, or a gradient
    kept across one step): a buffer is handed out again only when no tensor and no storage
    object refers to it any more (its storage's reference counts are back to those it had
    when it was created), and not at all once its storage was moved to shared memory or
    shrunk. A request that no free buffer fits (up to a quarter larger) releases the free
    ones. ``fusedce.empty_cache()`` drops the free ones; ``FUSEDCE_GRAD_CACHE=0`` turns the
    cache off.
    """

    MAX_ENTRIES = 2

    def __init__(self):
        self.lock = threading.Lock()
        self.entries = []  # [buffer, its free signature], least recently used first

    @staticmethod
    def _signature(buf):
        storage = buf.untyped_storage()
        return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)

    def _is_free(self, entry):
        return self._signature(entry[0]) == entry[1]

    @staticmethod
    def _gone(entry):
        """Whether an entry must never be handed out again: its storage was moved to shared
        memory (sent to another process, whose mapping no reference count here shows) or
        shrunk (``storage.resize_``)."""
        storage = entry[0].untyped_storage()
        return storage.is_shared() or storage.nbytes() < entry[0].numel()

    def _prune(self):
        self.entries = [e for e in self.entries if not self._gone(e)]

    def empty_like(self, x):
        """``(tensor, fresh)``: a contiguous tensor of ``x``'s shape and dtype, from the cache
        when one is free (``fresh`` False: its pages are resident already)."""
        nbytes = x.numel() * x.element_size()
        if (not GRAD_CACHE or x.device.type != "cpu" or nbytes < GRAD_CACHE_MIN_BYTES
                or not hasattr(torch._C, "_storage_Use_Count")):
            return torch.empty(x.shape, dtype=x.dtype, device=x.device), True
        with self.lock:
            self._prune()
            for i, entry in enumerate(self.entries):
                size = entry[0].numel()
                if nbytes <= size <= nbytes + nbytes // 4 and self._is_free(entry):
                    self.entries.append(self.entries.pop(i))
                    return self._view(entry[0], nbytes, x), False
            # free buffers that do not fit are released first (a changed shape keeps no
            # stale buffer alive); when every entry is in use the new buffer is not kept
            self.entries = [e for e in self.entries if not self._is_free(e)]
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if len(self.entries) < self.MAX_ENTRIES:
                self.entries.append([buf, self._signature(buf)])
            return self._view(buf, nbytes, x), True

    @staticmethod
    def _view(buf, nbytes, x):
        return buf[:nbytes].view(x.dtype).view(x.shape)

    def empty(self):
        """Drops the buffers nothing references; returns how many bytes they held."""
        with self.lock:
            self._prune()
            free = [self._is_free(e) for e in self.entries]
            freed = sum(e[0].numel() for e, f in zip(self.entries, free) if f)
            self.entries = [e for e, f in zip(self.entries, free) if not f]
            return freed


# Whether gradient buffers are reused (see _GradCache); environment: FUSEDCE_GRAD_CACHE=0.
GRAD_CACHE = os.environ.get("FUSEDCE_GRAD_CACHE", "1") != "0"
# Buffers below this size are left to PyTorch's allocator (glibc reuses small ones itself).
GRAD_CACHE_MIN_BYTES = 16 << 20
_GRADS = _GradCache()


def grad_buffer(x):
    """``(tensor, fresh)``: an uninitialised contiguous tensor like ``x`` for its gradient
    (see _GradCache); ``fresh`` when it is new from the allocator, its pages not yet
    faulted in (``ce_fwd``'s ``fault_in``)."""
    return _GRADS.empty_like(x)


def empty_cache():
    """Frees the gradient buffers fusedce keeps for reuse that nothing references any more
    (as ``torch.cuda.empty_cache`` does for the CUDA allocator); returns the bytes freed."""
    return _GRADS.empty()


# ------------------------------------------------------------------------------------------
# Transparent huge pages

_MADV_HUGEPAGE = 14
_HUGEPAGE = 2 << 20
_madvise = None


def _load_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                    if "[never]" in f.read():
                        return False
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                fn = libc.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                _madvise = False
    return _madvise


_MADV_POPULATE_WRITE = 23


def _populate_rows(t, start, end):
    """Faults in rows [start, end) of the contiguous ``t`` in one call (Linux >= 5.14)."""
    madvise = _load_madvise()
    if not madvise or not t.is_contiguous():
        return
    row = t.shape[1] * t.element_size()
    a = t.data_ptr() + start * row
    b = t.data_ptr() + end * row
    a = -(-a // 4096) * 4096
    b = b // 4096 * 4096
    if b > a:
        madvise(a, b - a, _MADV_POPULATE_WRITE)


def _advise_hugepages(t):
    """Asks Linux to back the not yet touched storage of ``t`` with 2 MiB pages.

    Only whole 2 MiB-aligned pages inside ``t``'s own storage are advised, so memory the
    allocator shares with anything else is never touched; failures are ignored (the advice
    only changes how pages are faulted in, never the data)."""
    nbytes = t.untyped_storage().nbytes()
    if t.device.type != "cpu" or nbytes < HUGEPAGE_MIN_BYTES:
        return
    madvise = _load_madvise()
    if not madvise:
        return
    start = t.untyped_storage().data_ptr()
    first = -(-start // _HUGEPAGE) * _HUGEPAGE
    last = (start + nbytes) // _HUGEPAGE * _HUGEPAGE
    if last > first:
        madvise(first, last - first, _MADV_HUGEPAGE)


# ------------------------------------------------------------------------------------------
# Per-row quantities


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


def _target_grad(x_t, lse, gA, gB, g, w, eps, n_cols, t_safe):
    """The gradient at each row's target, ``gA p_t - gB - g eps / C w_t``, in fp32."""
    d = torch.exp(x_t - lse) * gA - gB
    if eps > 0:
        w_tt = 1.0 if w is None else w[t_safe]
        d = d - g * (eps / n_cols) * w_tt
    return d


def _smoothing_term(out: torch.Tensor, c: torch.Tensor, w: Optional[torch.Tensor]):
    """``out -= c[:, None] * w[None, :]`` (``w`` None: all ones), in place."""
    if w is None:
        out.sub_(c.unsqueeze(1))
    else:
        out.addcmul_(c.unsqueeze(1), w.unsqueeze(0), value=-1.0)


def _write_target_grad(dx, t_safe, d):
    dx[torch.arange(dx.shape[0], device=dx.device), t_safe] = d.to(dx.dtype)


# ------------------------------------------------------------------------------------------
# The forward's chunk loop, run by TorchScript


def _fwd_chunks(x: torch.Tensor, dst: Optional[torch.Tensor], row_max: torch.Tensor,
                row_sum: torch.Tensor, sum_wx: Optional[torch.Tensor],
                w: Optional[torch.Tensor], gA: Optional[torch.Tensor],
                coef: Optional[torch.Tensor], smooth: Optional[torch.Tensor],
                scratch: Optional[torch.Tensor], chunks: list[int], step: int,
                direct: bool, inplace: bool, shifted: bool, x_t: Optional[torch.Tensor],
                lo_bound: float, g_lo: list[float], g_hi: list[float]) -> list[int]:
    """Works through the row chunks ``chunks`` (``step`` rows each) of ``ce_fwd``: their
    row sums of ``exp(x - shift)`` into ``row_sum`` and the shift into ``row_max``,
    ``sum_c w_c x_c`` into ``sum_wx`` where given, and with ``dst`` the chunk's gradient
    ``coef p - smooth w`` into it, ``coef = gA / sum``.

    ``shifted``: the shift is the row max. Else none at first (``row_max`` holds 0), and
    each chunk is tested (``_sums_fail``) before its gradient is written (x survives until
    then): the chunks that fail are left unwritten and returned, for a shifted pass, and
    from the first failure on the target logits ``x_t`` (a column), when given, are the
    shift (their own terms make every sum at least 1: logits all far below 0, as a
    pretrained GPT-2's near -60, fail without a shift but pass with it).

    ``direct``: ``x`` is fp32 and is read as it is, else through the fp32 ``scratch``
    chunk; ``inplace``: ``dst`` is ``x`` (not with ``direct`` unless ``shifted``).
    ``g_lo``, ``g_hi``: per chunk, the smallest and largest finite nonzero ``|gA|`` of
    its rows (with a gradient; else empty).

    Written in the subset of Python that TorchScript compiles (``_script``): run as a
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
        if sum_wx is not None:
            out = sum_wx.narrow(0, r0, rows)
            if w is None:
                torch.sum(src, 1, out=out)
            else:
                torch.mv(src, w, out=out)
        if not direct or inplace:
            buf = src
            if m is not None:
                buf.sub_(m)
            buf.exp_()
        else:
            target = dc if dc is not None else sc
            assert target is not None
            if m is not None:
                buf = torch.sub(xc, m, out=target).exp_()
            else:
                buf = torch.exp(xc, out=target)
        sums = torch.sum(buf, 1, keepdim=True, out=row_sum.narrow(0, r0, rows))
        if not shifted and _sums_fail(sums, lo_bound, g_lo, g_hi, k, by_target):
            failed.append(k)
            by_target = x_t is not None
            continue
        if dc is not None:
            assert gA is not None and coef is not None
            buf.mul_(torch.div(gA.narrow(0, r0, rows), sums, out=coef.narrow(0, r0, rows)))
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


def _bwd_chunks(x: torch.Tensor, dx: torch.Tensor, shift: torch.Tensor,
                sign: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                smooth: Optional[torch.Tensor], w: Optional[torch.Tensor],
                scratch: Optional[torch.Tensor], skip: list[bool], fast: list[bool],
                start: int, end: int, step: int, direct: bool):
    """``ce_bwd``'s loop over the chunks of rows ``[start, end)``: ``dx = sign exp(x -
    shift)`` (``shift = lse - log|g A|``), or with ``fast`` (rows flagged from ``start``)
    ``scale exp(x)``; minus ``smooth w`` where given. Rows flagged in ``skip`` are zeroed,
    not computed. ``direct``: fp32 in and out, else through the fp32 ``scratch``. Runs as a
    script like ``_fwd_chunks``."""
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


def _script(fn):
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


# ------------------------------------------------------------------------------------------
# The three entry points


def _chunk_bounds(gA, step):
    """Per chunk of ``step`` rows: the smallest and largest finite nonzero ``|gA|`` (inf
    and 0 for a chunk with none), as lists for ``_sums_fail``."""
    a = gA.abs().reshape(-1)
    n_chunks = _cdiv(a.numel(), step)
    pad = n_chunks * step - a.numel()
    finite = torch.isfinite(a)
    hi = torch.nn.functional.pad(torch.where(finite, a, 0.0), (0, pad), value=0.0)
    lo = torch.nn.functional.pad(torch.where(finite & (a > 0), a, float("inf")), (0, pad),
                                 value=float("inf"))
    return (lo.view(n_chunks, step).amin(1).tolist(),
            hi.view(n_chunks, step).amax(1).tolist())


def ce_fwd(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, inplace_scale=None,
           grad_out=None, fault_in=True):
    """Per-row ``(loss, lse)`` in fp32; with ``inplace_scale`` also writes the gradient of
    ``loss * inplace_scale`` over ``x``, or into ``grad_out`` (a contiguous buffer of ``x``'s
    shape and dtype; ``x`` then stays intact), whose pages each worker first faults in for
    its rows unless ``fault_in`` is False (a reused buffer: walking its resident pages costs
    5-18 ms at 2,048 x 50,257). Same contract as ``fusedce.kernels.ce_fwd``, which has no
    ``grad_out``."""
    n_rows, n_cols = x.shape
    eps = float(label_smoothing)
    dev = x.device
    grad = inplace_scale is not None
    dst = (x if grad_out is None else grad_out) if grad else None
    with torch.no_grad():
        t_safe, ignored, valid, w_t = _row_targets(target, weight, ignore_index, n_cols)
        w = weight.float() if weight is not None else None
        x_t = x.gather(1, t_safe[:, None]).squeeze(1).float()  # before x is overwritten
        row_max = torch.zeros(n_rows, 1, dtype=torch.float32, device=dev)  # the shift
        row_sum = torch.empty(n_rows, 1, dtype=torch.float32, device=dev)
        sum_wx = torch.empty(n_rows, dtype=torch.float32, device=dev) if eps > 0 else None
        if grad:
            A, B = _grad_coefficients(w_t, weight, eps, n_cols)
            g = _row_scale(inplace_scale.float().expand(n_rows), ignored, valid)
            gA = (g * A)[:, None].contiguous()
            coef = torch.empty_like(gA)
            smooth = (g * (eps / n_cols)).contiguous() if eps > 0 else None
    direct = x.dtype == torch.float32  # else: through an fp32 scratch chunk
    inplace = dst is x
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    # No max pass where x survives the pass, so that the chunks it fails for can be redone
    # (``_fwd_chunks``): not in place in fp32 (exp would overwrite x at once) nor on a GPU
    # (each chunk's check would sync)
    unshifted = UNSHIFTED_EXP and dev.type == "cpu" and (not inplace or not direct)
    # below this a sum could be off by the terms fp32 flushes (2**-126 each, denormals
    # flushed; 2**-102 V is 2**24 of them)
    lo_bound = max(1e-30, n_cols * 2.0 ** -102)
    # inline, with no other worker to contend for the GIL, plain Python costs less per call
    chunk_loop = _script(_fwd_chunks) if _n_workers(n_rows, n_cols, dev) > 1 else _fwd_chunks
    g_lo, g_hi = _chunk_bounds(gA, step) if unshifted and grad else ([], [])
    args = dict(x=x.detach(), dst=dst.detach() if grad else None, row_max=row_max,
                row_sum=row_sum, sum_wx=sum_wx, w=w, gA=gA if grad else None,
                coef=coef if grad else None, smooth=smooth if grad else None, step=step,
                direct=direct, inplace=inplace, x_t=x_t[:, None].contiguous(),
                lo_bound=lo_bound, g_lo=g_lo, g_hi=g_hi)

    def work(start, end):
        scratch = None
        if not direct or dst is None:
            scratch = torch.empty(min(step, end - start), n_cols, dtype=torch.float32,
                                  device=dev)
        if fault_in and grad_out is not None and PAGE_ADVICE == "populate":
            _populate_rows(dst, start, end)
        # worker ranges are whole chunks (``_parallel_rows``)
        chunks = list(range(start // step, _cdiv(end, step)))
        if unshifted:
            chunks = chunk_loop(scratch=scratch, chunks=chunks, shifted=False, **args)
        if chunks:
            chunk_loop(scratch=scratch, chunks=chunks, shifted=True, **args)

    if n_rows > 0 and n_cols > 0:
        _parallel_rows(n_rows, n_cols, dev, work)
    with torch.no_grad():
        if n_cols > 0:
            lse = (row_max + row_sum.log()).squeeze(1)
        else:
            lse = torch.full((n_rows,), float("-inf"), device=dev)
        loss = (1.0 - eps) * w_t * (lse - x_t)
        if eps > 0:
            loss = loss + eps / n_cols * (_smoothing_sum(weight, n_cols) * lse - sum_wx)
        loss = torch.where(ignored, 0.0, torch.where(valid, loss, float("nan")))
        if grad and n_rows > 0 and n_cols > 0:
            gA = gA.squeeze(1)
            d = _target_grad(x_t, lse, gA, g * B, g, w, eps, n_cols, t_safe)
            _write_target_grad(dst, t_safe, d)
    return loss, lse


def ce_bwd(x, target, lse, dloss, weight=None, ignore_index=-100, label_smoothing=0.0,
           dx=None):
    """Gradient of ``sum(loss * dloss)`` w.r.t. ``x``; same contract as the kernel launcher."""
    n_rows, n_cols = x.shape
    eps = float(label_smoothing)
    dev = x.device
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    # usually a buffer just allocated (here or by the caller), not yet touched; advice on
    # one that was is harmless (the kernel may merge its pages later)
    if PAGE_ADVICE == "hugepage":
        _advise_hugepages(dx)
    if n_rows == 0 or n_cols == 0:
        return dx
    with torch.no_grad():
        t_safe, ignored, valid, w_t = _row_targets(target, weight, ignore_index, n_cols)
        w = weight.float() if weight is not None else None
        A, B = _grad_coefficients(w_t, weight, eps, n_cols)
        g = _row_scale(dloss.float().expand(n_rows), ignored, valid)
        gA = g * A
        lse = lse.float()
        # g A p = sign(g A) exp(x - (lse - log|g A|)); g A = 0 gives exp(-inf) = 0
        # rows with g A = 0 (ignored, or no upstream gradient) are zeroed, not computed:
        # exp(-inf) takes a slow path in PyTorch's CPU exp, about 20x an ordinary value
        # (on the CPU only: reading the rows' flags on a GPU would be a host sync)
        shift = lse - gA.abs().log()
        skip, sign = None, torch.where(gA < 0, -1.0, 1.0).contiguous()
        if dev.type == "cpu":
            zero_rows = gA == 0
            skip = zero_rows.tolist()
            shift = torch.where(zero_rows, lse, shift)
            if not bool((gA < 0).any()):
                sign = None
        shift = shift.contiguous()
        # rows whose gradient is gA exp(-lse) * exp(x) without overflow or underflow:
        # lse < 80 bounds exp(x) <= exp(lse); lse > -15 keeps exp(x) normal where p > 1e-30;
        # a scale |gA| exp(-lse) <= 1 keeps the gradient subnormal where exp(x) is, and
        # one of fp32's normal range keeps its precision
        fast = None
        if UNSHIFTED_EXP_BWD and dev.type == "cpu":
            scale = (gA * torch.exp(-lse)).contiguous()
            scale_abs = scale.abs()
            fast = ((lse > -15.0) & (lse < 80.0) & (scale_abs <= 1.0)
                    & ((scale_abs >= 1.2e-38) | (gA == 0))).tolist()
        smooth = (g * (eps / n_cols)).contiguous() if eps > 0 else None
        x_t = x.gather(1, t_safe[:, None]).squeeze(1).float()
    direct = dx.dtype == torch.float32 and x.dtype == torch.float32
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))

    chunk_loop = _script(_bwd_chunks) if _n_workers(n_rows, n_cols, dev) > 1 else _bwd_chunks
    shift2 = shift[:, None]
    sign2 = sign[:, None] if sign is not None else None
    scale2 = scale[:, None] if fast is not None else None

    def work(start, end):
        scratch = None
        if not direct:
            scratch = torch.empty(min(step, end - start), n_cols, dtype=torch.float32,
                                  device=dev)
        if PAGE_ADVICE == "populate" and dev.type == "cpu":
            _populate_rows(dx, start, end)
        chunk_loop(x.detach(), dx.detach(), shift2, sign2, scale2, smooth, w, scratch,
                   [] if skip is None else skip[start:end],
                   [] if fast is None else fast[start:end], start, end, step, direct)

    _parallel_rows(n_rows, n_cols, dev, work)
    with torch.no_grad():
        d = _target_grad(x_t, lse, gA, g * B, g, w, eps, n_cols, t_safe)
        _write_target_grad(dx, t_safe, d)
    return dx


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
