"""Gradient buffers for the CPU path: logits-sized buffers kept for reuse, and the page
advice that faults a fresh one in.

First-touch faults of a new logits-sized buffer cost more than an exp pass over it, and
PyTorch's CPU allocator hands such a buffer back to the kernel when it is freed, so every
step would pay them again. ``grad_buffer`` reuses a buffer once nothing refers to it any more
(``GradCache``, like the CUDA caching allocator; ``fusedce.empty_cache()``,
``FUSEDCE_GRAD_CACHE=0``). A buffer that is new anyway is offered 2 MiB pages when it is made
(``advise_fresh``), then faulted in by each worker for its own rows with one
``MADV_POPULATE_WRITE`` call (``fault_in_rows``); ``PAGE_ADVICE`` says which of the two.
"""

import ctypes
import ctypes.util
import os
import sys
import threading

import torch

# How a fresh gradient buffer's pages are faulted in: "hugepage" (MADV_HUGEPAGE over its
# whole 2 MiB pages when it is made, then MADV_POPULATE_WRITE by each worker for its rows),
# "populate" (the second step alone: 4 KiB pages) or "none" (a fault per page on first
# touch); docs/benchmarks.md has the measurements. Environment: FUSEDCE_PAGE_ADVICE.
PAGE_ADVICE = os.environ.get("FUSEDCE_PAGE_ADVICE", "hugepage")
# Fresh buffers at least this large are offered to transparent huge pages.
HUGEPAGE_MIN_BYTES = 8 << 20


class GradCache:
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
            buf = torch.empty(nbytes, dtype=torch.uint8, device="cpu")  # whatever the default
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



# Whether gradient buffers are reused (see GradCache); environment: FUSEDCE_GRAD_CACHE=0.
GRAD_CACHE = os.environ.get("FUSEDCE_GRAD_CACHE", "1") != "0"
# Buffers below this size are left to PyTorch's allocator (glibc reuses small ones itself).
GRAD_CACHE_MIN_BYTES = 16 << 20
_GRADS = GradCache()
# data pointers of buffers handed out fresh and not yet faulted in (see ``take_fresh``)
_FRESH = set()


def _reset_in_child():
    # a forked child starts with an empty cache
    global _GRADS, _FRESH
    _GRADS = GradCache()
    _FRESH = set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


def grad_buffer(x):
    """An uninitialised contiguous tensor like ``x`` for its gradient (see GradCache). One
    new from the allocator is remembered as fresh until ``take_fresh`` claims it."""
    out, fresh = _GRADS.empty_like(x)
    if fresh:
        advise_fresh(out)
        _FRESH.add(out.data_ptr())
    return out


def take_fresh(t):
    """Whether ``t`` came fresh from ``grad_buffer`` and its pages are yet to be faulted in
    (once: a second call answers False)."""
    ptr = t.data_ptr()
    if ptr in _FRESH:
        _FRESH.discard(ptr)
        return True
    return False


def empty_cache():
    """Frees the gradient buffers fusedce keeps for reuse that nothing references any more
    (as ``torch.cuda.empty_cache`` does for the CUDA allocator); returns the bytes freed."""
    return _GRADS.empty()


# ------------------------------------------------------------------------------------------
# Page advice

_MADV_HUGEPAGE = 14
_HUGEPAGE = 2 << 20
_madvise = None
_thp = None


def advise_fresh(t):
    """The advice for a buffer new from the allocator, before anything touches it: 2 MiB
    pages under ``PAGE_ADVICE == "hugepage"`` (fewer faults when it is faulted in, and fewer
    TLB misses on every pass over it while it is reused)."""
    if PAGE_ADVICE == "hugepage":
        advise_hugepages(t)


def fault_in_rows(t, start, end):
    """Faults in rows [start, end) of a fresh ``t`` (each worker its own), unless
    ``PAGE_ADVICE`` is "none"."""
    if PAGE_ADVICE != "none":
        populate_rows(t, start, end)


def _thp_available():
    """Whether Linux offers transparent huge pages to a region that asks for them."""
    global _thp
    if _thp is None:
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                _thp = "[never]" not in f.read()
        except OSError:
            _thp = False
    return _thp


def _load_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                fn = libc.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                _madvise = False
    return _madvise


_MADV_POPULATE_WRITE = 23


def populate_rows(t, start, end):
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


def advise_hugepages(t):
    """Asks Linux to back the not yet touched storage of ``t`` with 2 MiB pages.

    Only whole 2 MiB-aligned pages inside ``t``'s own storage are advised, so memory the
    allocator shares with anything else is never touched; failures are ignored (the advice
    only changes how pages are faulted in, never the data)."""
    nbytes = t.untyped_storage().nbytes()
    if t.device.type != "cpu" or nbytes < HUGEPAGE_MIN_BYTES or not _thp_available():
        return
    madvise = _load_madvise()
    if not madvise:
        return
    start = t.untyped_storage().data_ptr()
    first = -(-start // _HUGEPAGE) * _HUGEPAGE
    last = (start + nbytes) // _HUGEPAGE * _HUGEPAGE
    if last > first:
        madvise(first, last - first, _MADV_HUGEPAGE)

