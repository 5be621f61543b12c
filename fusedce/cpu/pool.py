"""Worker threads for the CPU path: the rows of a call are split into whole chunks, one
contiguous range per worker, each worker running single-threaded PyTorch ops.

Intra-op threading of many cache-sized ops pays a barrier per op, which collapses when the
cores are shared with other processes; independent workers degrade gracefully.
``torch.get_num_threads()`` sets the number of workers; small inputs run inline.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import chunks

# Below this many logits the work runs inline in the calling thread (torch's own intra-op
# threads): a round trip through the worker pool costs tens of microseconds.
PARALLEL_MIN_ELEMENTS = 1 << 20


class _Pool:
    """A lazily started pool of threads whose PyTorch ops run single-threaded."""

    def __init__(self):
        self.lock = threading.Lock()
        self.executor = None
        self.size = 0

    def submit(self, n, fn, ranges):
        """Futures of ``fn(s, e)`` for each range on a pool of at least ``n`` threads; None
        for a range no thread can take (interpreter shutdown has begun: no new work is
        scheduled, as for an ``atexit`` handler or a thread the main thread left running).
        Under the lock: a call that grows the pool shuts the old executor down, which must
        not happen between another call's getting it and submitting to it."""
        with self.lock:
            try:
                if self.executor is None or self.size < n:
                    if self.executor is not None:
                        self.executor.shutdown(wait=False)  # its queued work still runs
                        self.executor, self.size = None, 0
                    self.executor = self._start(n)
                    self.size = n
                return [self.executor.submit(fn, s, e) for s, e in ranges]
            except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
                return [None] * len(ranges)

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


def _reset_in_child():
    # a forked child inherits the pool object but not its threads
    global _POOL
    _POOL = _Pool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


def max_workers():
    return torch.get_num_threads()


def n_workers(n_rows, n_cols, device):
    """How many worker threads ``parallel_rows`` uses; 1: inline."""
    if device.type != "cpu":  # another device: its own streams
        return 1
    return max(1, min(max_workers(), chunks.cdiv(n_rows * n_cols, PARALLEL_MIN_ELEMENTS),
                      n_rows))


def parallel_rows(n_rows, n_cols, device, work):
    """Runs ``work(start, end)`` over row ranges covering ``[0, n_rows)``: inline for small
    inputs, else one contiguous range per worker thread. ``work`` runs under no_grad."""
    workers = n_workers(n_rows, n_cols, device)
    if workers <= 1:
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
    step = chunks.rows_per_chunk(n_cols)
    per_worker = chunks.cdiv(chunks.cdiv(n_rows, step), workers) * step
    ranges = [(s, min(s + per_worker, n_rows)) for s in range(0, n_rows, per_worker)]
    futures = _POOL.submit(workers, task, ranges)
    if None in futures:  # nothing scheduled (interpreter shutdown): every range here
        with torch.no_grad():
            work(0, n_rows)
        return
    for f in futures:
        f.result()

