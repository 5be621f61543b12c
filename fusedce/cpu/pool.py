"""Worker threads for the CPU path: each worker claims whole chunks of rows, a shrinking
number at a time, and works through them with single-threaded PyTorch ops.

Intra-op threading of many cache-sized ops pays a barrier per op, which collapses when the
cores are shared with other processes; independent workers degrade gracefully. Claims
rather than fixed shares: a worker that starts late (its core still held by the caller's
OpenMP threads, which spin for milliseconds after each parallel op, or by another process)
leaves its rows to the others instead of finishing last. ``torch.get_num_threads()`` sets
the number of workers; small inputs run inline.
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

    def submit(self, n, fn, count):
        """Futures of ``count`` calls of ``fn()`` on a pool of at least ``n`` threads; None
        for a call no thread can take (interpreter shutdown has begun: no new work is
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
                return [self.executor.submit(fn) for _ in range(count)]
            except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
                return [None] * count

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


class Claims:
    """Row ranges of whole chunks, handed out in order to whichever worker asks: each claim
    a share of what is left (``1 / (2 workers)`` of it, at least one chunk), so the first
    claims are long and the last ones short. Every range starts at a multiple of the chunk
    from row 0, so the chunks, and with them the results, are the same whoever works
    them. ``done`` is set once every range handed out has been worked and none is left (or
    a worker failed: nothing more is handed out, and ``error`` holds the first failure)."""

    def __init__(self, n_rows, step, workers):
        self.lock = threading.Lock()
        self.n_rows, self.step, self.parts = n_rows, step, 2 * workers
        self.next = 0
        self.working = 0  # ranges handed out and not yet finished
        self.error = None
        self.done = threading.Event()

    def take(self):
        """The next ``(start, end)``, or None once every row is handed out."""
        with self.lock:
            start = self.next
            if start >= self.n_rows:
                return None
            left = chunks.cdiv(self.n_rows - start, self.step)
            end = min(start + max(1, left // self.parts) * self.step, self.n_rows)
            self.next = end
            self.working += 1
            return start, end

    def finish(self, error=None):
        """A range handed out is worked (``error``: it failed with that exception)."""
        with self.lock:
            self.working -= 1
            if error is not None:
                self._stop(error)
            self._check_done()

    def stop(self, error=None):
        """Hands out nothing more (``error``: a failure outside any range, kept like a
        range's); ``done`` follows once the ranges already handed out are worked."""
        with self.lock:
            self._stop(error)
            self._check_done()

    def _stop(self, error):
        if error is not None and self.error is None:
            self.error = error
        self.next = self.n_rows

    def _check_done(self):
        if self.working == 0 and self.next >= self.n_rows:
            self.done.set()


def parallel_rows(n_rows, n_cols, device, work):
    """Runs ``work(start, end)`` over row ranges covering ``[0, n_rows)``: inline for small
    inputs, else on the worker threads, each calling it for the ranges it claims
    (``Claims``). Returns once every range is worked, not waiting for a worker that has
    not started by then (it finds nothing left); nothing is written after it returns or
    raises, a KeyboardInterrupt in the caller included. ``work`` runs under no_grad."""
    workers = n_workers(n_rows, n_cols, device)
    if workers <= 1:
        with torch.no_grad():
            work(0, n_rows)
        return

    # grad and inference mode are thread-local: a worker has grad on and inference off, and
    # outside inference mode the buffers made in it (inference tensors) cannot be written
    inference = torch.is_inference_mode_enabled()
    claims = Claims(n_rows, chunks.rows_per_chunk(n_cols), workers)

    def task():
        try:
            with torch.inference_mode(inference), torch.no_grad():
                while (rows := claims.take()) is not None:
                    try:
                        work(*rows)
                    except BaseException as e:  # noqa: BLE001 - raised in the caller
                        claims.finish(e)
                        return
                    claims.finish()
        except BaseException as e:  # noqa: BLE001 - outside any range: raised in the caller
            claims.stop(e)

    futures = _POOL.submit(workers, task, workers)
    if None in futures:
        # not every task was scheduled (interpreter shutdown began): this thread claims
        # rows too, beside any task that was
        task()
    try:
        claims.done.wait()
    except BaseException:  # e.g. KeyboardInterrupt: the ranges being worked end first
        claims.stop()
        claims.done.wait()
        raise
    if claims.error is not None:
        raise claims.error
