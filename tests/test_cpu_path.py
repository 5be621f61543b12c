"""The CPU implementation (``fusedce.cpu``): what it adds to the drop-in contract.

On CPU logits that require a gradient, ``fusedce.cross_entropy`` computes loss and gradient
in one pass (``cpu.ce_fwd(..., grad_out=...)``) into a buffer of the gradient cache
(``buffers.GradCache``); the backward only rescales it. Rows are processed in chunks,
by worker threads for large inputs, in loops compiled with TorchScript. What must hold:

- the gradient computed in the forward is float64 PyTorch's, also for a second backward
  through a retained graph, under checkpointing and for ignored rows; the logits are never
  written (except in the in-place mode, test_inplace.py);
- a buffer is handed out again only when nothing refers to it: not while a graph that will
  still hand it over is alive, nor while the caller keeps a gradient, a view of it or its
  storage; in a training loop's steady state the same buffer is reused (no fresh
  logits-sized allocation per step);
- memory: no logits-sized temporary. The peak resident set of a step above its inputs and
  the gradient it must produce stays within 5% of the logits, measured as ``python -m
  bench`` does (fresh subprocess, VmHWM, glibc mmap threshold fixed); ``ce_scale_`` makes no
  pass over the gradient when the upstream gradient is 1; only a fresh buffer is faulted in;
- work split across the worker threads gives the same result as inline work, also under
  inference mode; the scripted loops give the same bits as the Python ones, and scripting
  survives being switched off, failing, interrupted, or a fork;
- the base-2 exponential keeps PyTorch's precision at every logits' level, and a row max
  beyond its product's range gives PyTorch's values.

Values at extreme logits (overflow, underflow, denormals) are in test_numerics.py.
"""

import gc
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ATOL, REPO_ROOT, RTOL, checkout_env, fused, logits_and_targets, reference

import fusedce
from fusedce import _loss, cpu
from fusedce.cpu import buffers, chunks, pool

# fusedce's own implementation, small calls included (see conftest.own_path)
pytestmark = pytest.mark.usefixtures("own_path")

PROBE = """
import json, sys
from bench.ce import memory_probe

print(json.dumps([memory_probe(*case) for case in json.loads(sys.argv[1])]))
"""


@pytest.fixture
def cache(monkeypatch):
    """A fresh, empty gradient cache that takes buffers of any size (small test shapes)."""
    fresh = buffers.GradCache()
    monkeypatch.setattr(buffers, "_GRADS", fresh)
    monkeypatch.setattr(buffers, "GRAD_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(buffers, "GRAD_CACHE", True)
    return fresh


def _step(x, t):
    xr = x.clone().requires_grad_()
    fusedce.cross_entropy(xr, t).backward()
    return xr.grad


# --------------------------------------------------- the gradient computed in the forward

def test_default_cpu_path_computes_the_gradient_in_the_forward(cache, monkeypatch):
    """The path taken: the gradient is in the buffer after the forward, before backward."""
    seen = []
    ce_fwd = cpu.ce_fwd
    monkeypatch.setattr(cpu, "ce_fwd",
                        lambda *a, **k: seen.append(k.get("grad_out")) or ce_fwd(*a, **k))
    x, t = logits_and_targets(4, 300)
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t)
    assert len(seen) == 1 and seen[0] is not None
    _, ref_grad, _ = reference(x, t, torch.tensor(1.0))
    torch.testing.assert_close(seen[0].double(), ref_grad, atol=ATOL, rtol=RTOL)
    loss.backward()
    assert xr.grad.data_ptr() == seen[0].data_ptr()  # handed over, not copied
    assert torch.equal(xr.detach(), x)  # the logits were not written


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_gradient_no_buffer(cache, reduction):
    """Under no_grad, or for logits that need no gradient, only the loss is computed."""
    x, t = logits_and_targets(4, 300)
    with torch.no_grad():
        fusedce.cross_entropy(x.clone().requires_grad_(), t, reduction=reduction)
    fusedce.cross_entropy(x, t, reduction=reduction)
    assert cache.entries == []


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_backward_through_a_retained_graph(cache, reduction):
    """The first backward hands the buffer over; a second recomputes from the saved logits."""
    x, t = logits_and_targets(5, 300, seed=1)
    shape = F.cross_entropy(x, t, reduction=reduction).shape
    gen = torch.Generator().manual_seed(2)
    ups = [torch.randn(shape, generator=gen) for _ in range(2)]
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, reduction=reduction)
    first = torch.autograd.grad(loss, xr, ups[0], retain_graph=True)[0]
    first_copy = first.clone()
    second = torch.autograd.grad(loss, xr, ups[1])[0]
    for got, up in ((first, ups[0]), (second, ups[1])):
        _, ref_grad, _ = reference(x, t, up, reduction=reduction)
        torch.testing.assert_close(got.double(), ref_grad, atol=ATOL, rtol=RTOL)
    assert torch.equal(first, first_copy)  # the second backward did not write the first's
    assert first.data_ptr() != second.data_ptr()


def test_create_graph_on_a_second_backward(cache):
    """A second backward (retain_graph) with create_graph=True, after the first consumed
    the gradient computed in the forward: the gradient of its gradient is PyTorch's (the
    cross-entropy's Hessian), not that of a constant."""
    x, t = logits_and_targets(4, 300, seed=14)
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, reduction="sum")
    torch.autograd.grad(loss, xr, retain_graph=True)
    (g,) = torch.autograd.grad(loss, xr, create_graph=True)
    (got,) = torch.autograd.grad((g ** 2).sum(), xr)
    xd = x.double().requires_grad_()
    (gd,) = torch.autograd.grad(F.cross_entropy(xd, t, reduction="sum"), xd, create_graph=True)
    (want,) = torch.autograd.grad((gd ** 2).sum(), xd)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("inplace", [False, True])
def test_ignored_rows_take_no_infinite_upstream(cache, inplace):
    """sqrt of a per-row loss has an infinite derivative at an ignored row's loss 0; its
    gradient is still 0 there, as in PyTorch (0 * inf would be NaN)."""
    x, _ = logits_and_targets(4, 1000, seed=15)
    t = torch.tensor([1, -100, 2, 3])
    xr = x.clone().requires_grad_()
    fusedce.cross_entropy(xr, t, reduction="none", inplace_backward=inplace).sqrt().sum().backward()
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t, reduction="none").sqrt().sum().backward()
    assert torch.equal(xr.grad[1], torch.zeros(1000))
    torch.testing.assert_close(xr.grad.double(), x64.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("inplace", [False, True])
def test_uint8_target_156_is_not_ignored(cache, inplace):
    """uint8 targets compared with ignore_index=-100 in their own dtype would match class
    156 (-100 wraps to 156): that row must get its upstream gradient, not be skipped."""
    x, _ = logits_and_targets(4, 300, seed=21)
    t = torch.tensor([156, 3, 156, 7], dtype=torch.uint8)
    up = torch.tensor([0.5, 2.0, -1.5, 3.0])
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, reduction="none", inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, xr, up)
    _, ref_grad, _ = reference(x, t.long(), up, reduction="none")
    torch.testing.assert_close(grad.double(), ref_grad, atol=ATOL, rtol=RTOL)


def test_bf16_gradient_in_forward_with_upstream():
    """bf16 logits: the gradient is rounded once in the forward (1/denominator folded in)
    and the upstream factor, when not 1, once more in the backward."""
    x, t = logits_and_targets(6, 5000, seed=12)
    xb = x.to(torch.bfloat16)
    up = torch.tensor(1.7)
    ref_loss, ref_grad, _ = reference(xb.float(), t, up)
    xr = xb.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t)
    (grad,) = torch.autograd.grad(loss, xr, up.to(loss.dtype))
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-3, rtol=1e-2)
    # two roundings to bf16 (2**-8 each) of entries computed in fp32
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=2 * 2**-8)


def test_eager_function_still_serves_other_layouts(cache, monkeypatch):
    """(N, C, L) logits whose classes are not contiguous take the backward-time path."""
    calls = []
    forward = _loss.forward
    monkeypatch.setattr(_loss, "forward", lambda *a: calls.append(1) or forward(*a))
    x = torch.randn(2, 7, 5, requires_grad=True)
    t = torch.randint(0, 7, (2, 5))
    fusedce.cross_entropy(x, t).backward()
    assert calls == [1] and cache.entries == []


def test_checkpointed_loss_keeps_no_gradient_buffer(cache):
    """Under non-reentrant checkpointing (saved-tensor hooks) the gradient is not computed
    in the forward: it would be kept outside the hooks and computed twice."""
    from torch.utils.checkpoint import checkpoint

    x, t = logits_and_targets(6, 300, seed=20)
    xr = x.clone().requires_grad_()
    loss = checkpoint(lambda z: fusedce.cross_entropy(z * 1.0, t), xr, use_reentrant=False)
    assert cache.entries == []
    loss.backward()
    _, ref_grad, _ = reference(x, t, torch.tensor(1.0))
    torch.testing.assert_close(xr.grad.double(), ref_grad, atol=ATOL, rtol=RTOL)


# ------------------------------------------------ the gradient buffers: reuse and release

def test_buffer_of_a_pending_graph_is_not_reused(cache):
    """A loss whose backward has not run yet holds its gradient: another step in between
    must not take that buffer."""
    (x1, t1), (x2, t2) = logits_and_targets(4, 300, seed=3), logits_and_targets(4, 300, seed=4)
    a = x1.clone().requires_grad_()
    pending = fusedce.cross_entropy(a, t1)
    for _ in range(3):  # other steps, each freeing its gradient
        b = x2.clone().requires_grad_()
        fusedce.cross_entropy(b, t2).backward()
        del b
    pending.backward()
    _, ref_grad, _ = reference(x1, t1, torch.tensor(1.0))
    torch.testing.assert_close(a.grad.double(), ref_grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("holder", ["gradient", "view", "storage", "numpy"])
def test_referenced_gradient_is_not_overwritten(cache, holder):
    """Whatever the caller keeps of a gradient keeps its buffer out of the cache's reach."""
    (x1, t1), (x2, t2) = logits_and_targets(4, 300, seed=5), logits_and_targets(4, 300, seed=6)
    g1 = _step(x1, t1)
    expected = g1.clone()
    if holder == "gradient":
        kept = g1
    elif holder == "view":
        kept = g1[1:, 5:]
    elif holder == "storage":
        kept = g1.untyped_storage()
    else:
        kept = g1.numpy()
    ptr = g1.data_ptr()
    del g1
    g2 = _step(x2, t2)
    assert g2.data_ptr() != ptr
    if holder == "storage":
        again = torch.empty(0).set_(kept)[: expected.numel()].view_as(expected)
    elif holder == "numpy":
        again = torch.from_numpy(np.asarray(kept))
    elif holder == "view":
        again, expected = kept, expected[1:, 5:]
    else:
        again = kept
    assert torch.equal(again, expected)
    # once the caller lets go, the buffer is free again (no buffer is kept in use forever)
    del kept, again, g2
    gc.collect()
    assert _step(x1, t1).data_ptr() in {e[0].data_ptr() for e in cache.entries}
    assert fusedce.empty_cache() > 0


def test_steady_state_reuses_one_buffer(cache):
    """A training loop that drops each step's gradient gets the same buffer every step."""
    x, t = logits_and_targets(4, 300, seed=7)
    ptrs = set()
    for _ in range(4):
        g = _step(x, t)
        ptrs.add(g.data_ptr())
        del g
    assert len(ptrs) == 1
    assert len(cache.entries) == 1


def test_at_most_two_buffers_and_empty_cache(cache):
    x, t = logits_and_targets(4, 300, seed=8)
    live = [_step(x, t) for _ in range(3)]  # all in use: the third is not kept
    assert len({g.data_ptr() for g in live}) == 3
    assert len(cache.entries) == buffers.GradCache.MAX_ENTRIES == 2
    assert fusedce.empty_cache() == 0  # nothing free yet
    del live
    gc.collect()
    assert fusedce.empty_cache() == 2 * 4 * 300 * 4
    assert cache.entries == []


def test_changed_size_releases_free_buffers(cache):
    """A free buffer up to a quarter larger is reused; a request none fits releases the
    free ones (no stale buffer stays alive when the batch shape changes)."""
    (x, t), (y, u), (z, v) = (logits_and_targets(8, 300), logits_and_targets(7, 300),
                              logits_and_targets(20, 300))
    _step(x, t)  # its gradient dropped at once
    assert [e[0].numel() for e in cache.entries] == [8 * 300 * 4]
    g = _step(y, u)  # 7 rows: fits the 8-row buffer (< 1.25x)
    assert g.untyped_storage().nbytes() == 8 * 300 * 4
    _, ref_grad, _ = reference(y, u, torch.tensor(1.0))
    torch.testing.assert_close(g.double(), ref_grad, atol=ATOL, rtol=RTOL)
    del g
    _step(z, v)  # fits nothing: the free 8-row buffer is released
    assert [e[0].numel() for e in cache.entries] == [20 * 300 * 4]
    kept = _step(z, v)  # in use from here on: a changed size keeps it and adds its own
    _step(x, t)
    assert sorted(e[0].numel() for e in cache.entries) == [8 * 300 * 4, 20 * 300 * 4]
    del kept


def test_cache_off(cache, monkeypatch):
    monkeypatch.setattr(buffers, "GRAD_CACHE", False)
    x, t = logits_and_targets(4, 300, seed=9)
    _step(x, t)
    assert cache.entries == []


@pytest.mark.slow
@pytest.mark.parametrize("value, reused", [(None, True), ("0", False), ("1", True)])
def test_cache_follows_the_environment(value, reused):
    """README: ``FUSEDCE_GRAD_CACHE=0`` turns the reuse off (read once, at import)."""
    env = checkout_env()
    env.pop("FUSEDCE_GRAD_CACHE", None)
    if value is not None:
        env["FUSEDCE_GRAD_CACHE"] = value
    code = "from fusedce.cpu import buffers; print(buffers.GRAD_CACHE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(reused)]


def test_shared_memory_buffer_is_never_reused(cache):
    """A gradient moved to shared memory (as torch.multiprocessing does to send it) may be
    mapped by another process, which no reference count here shows: never reused."""
    (x1, t1), (x2, t2) = logits_and_targets(4, 300, seed=16), logits_and_targets(4, 300, seed=17)
    g1 = _step(x1, t1)
    g1.share_memory_()
    sent, ptr = g1.clone(), g1.data_ptr()
    storage = g1.untyped_storage()
    del g1
    g2 = _step(x2, t2)
    assert g2.data_ptr() != ptr
    assert all(e[0].data_ptr() != ptr for e in cache.entries)  # dropped, not kept in use
    assert torch.equal(torch.empty(0).set_(storage)[: sent.numel()].view_as(sent), sent)


def test_shrunk_storage_is_dropped(cache):
    """A gradient's storage freed by ``resize_(0)`` (FSDP's idiom) leaves the cache."""
    x, t = logits_and_targets(8, 1000, seed=18)
    xr = x.clone().requires_grad_()
    fusedce.cross_entropy(xr, t).backward()
    xr.grad.untyped_storage().resize_(0)
    xr.grad = None
    gc.collect()
    g = _step(x, t)  # raised "out of bounds for storage of size 0" before
    _, ref_grad, _ = reference(x, t, torch.tensor(1.0))
    torch.testing.assert_close(g.double(), ref_grad, atol=ATOL, rtol=RTOL)


# ------------------------------------------ memory, passes over the gradient, page advice

@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_within_5_percent_of_logits():
    # 2,048 x 50,257: 412 MB of fp32 logits, 206 MB in bf16, large against the workers'
    # cache-sized scratch chunks (3 MiB each, ``chunks.CHUNK_ELEMENTS``), so 5% is a real
    # bound
    n, v = 2048, 50_257
    cases = [["fusedce", "fwd_bwd", n, v, "fp32"], ["fusedce_inplace", "fwd_bwd", n, v, "fp32"],
             ["fusedce", "fwd_bwd", n, v, "bf16"], ["fusedce", "fwd", n, v, "bf16"]]
    env = checkout_env(MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("no /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    extra = json.loads(out.stdout.strip().splitlines()[-1])
    for (case, pass_, rows, cols, dtype), got in zip(cases, extra):
        logits = rows * cols * (4 if dtype == "fp32" else 2)
        assert got <= 0.05 * logits, f"{case} {pass_} {dtype}: {got / 2**20:.1f} MiB above " \
                                     f"inputs+grad, > 5% of {logits / 2**20:.0f} MiB of logits"


def test_scale_skips_unit_upstream_gradient(monkeypatch):
    dx = torch.randn(5, 7)
    before = dx.clone()
    calls = []
    mul_ = torch.Tensor.mul_
    monkeypatch.setattr(torch.Tensor, "mul_", lambda self, *a, **k: calls.append(1)
                        or mul_(self, *a, **k))
    cpu.ce_scale_(dx, torch.ones(1).expand(5))  # 'mean'/'sum': stride-0 scalar
    cpu.ce_scale_(dx, torch.ones(5))  # 'none' with an all-ones upstream gradient
    assert calls == [] and torch.equal(dx, before)
    g = torch.randn(5)
    out = cpu.ce_scale_(dx, g)  # and does scale otherwise
    torch.testing.assert_close(out, before * g[:, None])
    assert out.data_ptr() == dx.data_ptr()


def test_only_a_fresh_buffer_is_faulted_in(cache, monkeypatch):
    """MADV_POPULATE_WRITE is for a buffer new from the allocator: on a reused one it only
    walks resident pages (5-18 ms at 2,048 x 50,257), so it is not called."""
    calls = []
    monkeypatch.setattr(buffers, "PAGE_ADVICE", "populate")
    monkeypatch.setattr(buffers, "populate_rows", lambda *a: calls.append(a[1:]))
    x, t = logits_and_targets(4, 300, seed=22)
    _step(x, t)
    assert calls == [(0, 4)]  # fresh: faulted in (here by the one inline worker)
    _step(x, t)
    assert calls == [(0, 4)]  # reused: not again


def test_fresh_buffer_is_offered_whole_huge_pages_once(cache, monkeypatch):
    """The default advice: MADV_HUGEPAGE over the whole 2 MiB pages inside a fresh buffer's
    own storage (never beyond it: the allocator may share the pages around it), once, before
    it is faulted in; a reused buffer gets neither call again."""
    advised = []
    monkeypatch.setattr(buffers, "PAGE_ADVICE", "hugepage")
    monkeypatch.setattr(buffers, "HUGEPAGE_MIN_BYTES", 0)
    monkeypatch.setattr(buffers, "_thp", True)
    monkeypatch.setattr(buffers, "_madvise",
                        lambda addr, n, advice: advised.append((addr, n, advice)) or 0)
    x, t = logits_and_targets(64, 16411, seed=23)  # 4 MiB: one to two whole huge pages
    grad = _step(x, t)
    storage = grad.untyped_storage()
    lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    huge = [(a, n) for a, n, advice in advised if advice == buffers._MADV_HUGEPAGE]
    populate = [(a, n) for a, n, advice in advised if advice == buffers._MADV_POPULATE_WRITE]
    assert len(huge) == 1 and populate  # advised first, then faulted in
    a, n = huge[0]
    assert a % (2 << 20) == 0 and n % (2 << 20) == 0 and n > 0
    assert lo <= a and a + n <= hi
    assert advised.index((a, n, buffers._MADV_HUGEPAGE)) < advised.index(
        (*populate[0], buffers._MADV_POPULATE_WRITE))
    del grad, storage
    _step(x, t)
    assert len(advised) == 1 + len(populate)  # reused: no call at all


def test_backward_advises_only_a_buffer_of_its_own(monkeypatch):
    """ce_bwd advises and faults in a gradient buffer new from the allocator, not one written
    over the logits (the fused linear loss's chunk, resident already)."""
    advised = []
    monkeypatch.setattr(buffers, "PAGE_ADVICE", "hugepage")
    monkeypatch.setattr(buffers, "HUGEPAGE_MIN_BYTES", 0)
    monkeypatch.setattr(buffers, "_thp", True)
    monkeypatch.setattr(buffers, "_madvise", lambda a, n, advice: advised.append(advice) or 0)
    x, t = logits_and_targets(256, 8192, seed=26)  # 8 MiB: whole huge pages inside
    _, lse = cpu.ce_fwd(x, t)
    dloss = torch.full((256,), 1 / 256)
    want = cpu.ce_bwd(x, t, lse, dloss)
    assert buffers._MADV_HUGEPAGE in advised and buffers._MADV_POPULATE_WRITE in advised
    advised.clear()
    got = cpu.ce_bwd(x, t, lse, dloss, dx=x)
    assert advised == [] and got.data_ptr() == x.data_ptr()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("advice", ["hugepage", "populate", "none"])
def test_page_advice_changes_no_result(cache, monkeypatch, advice):
    """The advice is real here (Linux's madvise where it exists) and only changes how pages
    are faulted in: loss and gradient equal PyTorch's under each, at a size that gets it."""
    monkeypatch.setattr(buffers, "PAGE_ADVICE", advice)
    monkeypatch.setattr(buffers, "HUGEPAGE_MIN_BYTES", 0)
    x, t = logits_and_targets(160, 16411, seed=24)  # 10 MiB: whole huge pages inside
    want_loss, want_grad, g = reference(x, t, reduction="none")
    got_loss, got_grad = fused(x, t, g, reduction="none")
    torch.testing.assert_close(got_loss.double(), want_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=RTOL, atol=ATOL)


def test_populate_needs_no_transparent_huge_pages(cache, monkeypatch):
    """Where Linux has transparent huge pages off, only the huge-page advice is dropped:
    madvise itself still loads (the sysfs file read as "never"), and only the populate call
    is made."""
    if not sys.platform.startswith("linux"):
        pytest.skip("madvise is Linux's")
    real_open = open
    monkeypatch.setattr(buffers, "_madvise", None)
    monkeypatch.setattr(buffers, "_thp", None)
    monkeypatch.setattr(
        buffers, "open", lambda path, *a, **k: io.StringIO("always madvise [never]\n")
        if "transparent_hugepage" in str(path) else real_open(path, *a, **k), raising=False)
    assert callable(buffers._load_madvise()) and not buffers._thp_available()
    calls = []
    monkeypatch.setattr(buffers, "PAGE_ADVICE", "hugepage")
    monkeypatch.setattr(buffers, "_thp", False)
    monkeypatch.setattr(buffers, "HUGEPAGE_MIN_BYTES", 0)
    monkeypatch.setattr(buffers, "_madvise", lambda *a: calls.append(a[2]) or 0)
    x, t = logits_and_targets(4, 4096, seed=25)  # 64 KiB: whole 4 KiB pages, inline
    _step(x, t)
    assert calls == [buffers._MADV_POPULATE_WRITE]


# ------------------------------------------------------------------------- worker threads

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_worker_split_matches_inline(monkeypatch, dtype):
    # 37 rows of 8,193 in chunks of 2 rows on 3 workers: uneven ranges, a partial last chunk,
    # ignored rows, a zero upstream gradient, label smoothing and weights; inline is the
    # reference (the ops are the same, so results agree to rounding)
    torch.manual_seed(0)
    n, c = 37, 8193
    x = (torch.randn(n, c) * 3).to(dtype)
    target = torch.randint(0, c, (n,))
    target[[3, 4, 5, 20]] = -100
    weight = torch.rand(c)
    g = torch.randn(n)
    g[7] = 0.0

    def run():
        loss, lse = cpu.ce_fwd(x, target, weight, -100, 0.1)
        dx = cpu.ce_bwd(x, target, lse, g, weight, -100, 0.1)
        xi = x.clone()
        cpu.ce_fwd(xi, target, weight, -100, 0.1, grad_scale=torch.tensor([0.5]))
        return loss, lse, dx, xi

    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1 << 60)
    inline = run()
    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 2 * c)
    monkeypatch.setattr(pool, "max_workers", lambda: 3)
    split = run()
    for a, b in zip(inline, split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (split[2][[3, 4, 5, 7, 20]] == 0).all()  # rows zeroed, not computed


@pytest.mark.parametrize("n_rows, step, workers", [(137, 15, 2), (1000, 1, 3), (5, 15, 2),
                                                   (64, 7, 4)])
def test_claims_cover_every_row_once_in_whole_chunks(n_rows, step, workers):
    """GPT-2's 2,048 rows in chunks of 15 (137 chunks, a partial last one), one row per
    chunk on 3 workers, fewer rows than a chunk, more workers than the first claims need."""
    claims = pool.Claims(n_rows, step, workers)
    got = []
    while (r := claims.take()) is not None:
        got.append(r)
    assert got[0][0] == 0 and got[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))  # in order, no gap, no overlap
    assert all(s % step == 0 for s, _ in got)  # the chunks are the same whoever works them
    sizes = [e - s for s, e in got]
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True) and sizes[-1] <= step  # shrinking
    assert sizes[0] >= min(n_rows, step * max(1, chunks.cdiv(n_rows, step) // (2 * workers)))
    assert not claims.done.is_set()  # handed out, not yet worked
    for _ in got:
        claims.finish()
    assert claims.done.is_set() and claims.error is None


def _busy_pool(monkeypatch, workers):
    """A fresh pool of ``workers`` threads, one of them held until the returned event is
    set, and ``parallel_rows`` set to use ``workers``."""
    import threading

    monkeypatch.setattr(pool, "_POOL", pool._Pool())
    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(pool, "max_workers", lambda: workers)
    release, held = threading.Event(), threading.Event()

    def hold():
        held.set()
        release.wait(30)

    pool._POOL.submit(workers, hold, 1)
    assert held.wait(10)
    return release


def test_a_worker_that_has_not_started_holds_up_no_call(monkeypatch):
    """A worker whose core is taken (the caller's OpenMP threads spin for milliseconds after
    each parallel op; another process) used to hold its fixed share of the rows until it
    ran, and the call waited for it. The others claim its rows now, and the call returns
    without waiting for it; it finds nothing left when it starts."""
    import threading

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 10_000)  # 30 chunks of 10 rows of 1,000
    release = _busy_pool(monkeypatch, 2)
    worked, threads = [], set()

    def work(s, e):
        worked.append((s, e))
        threads.add(threading.get_ident())

    try:
        done = threading.Thread(target=pool.parallel_rows,
                                args=(300, 1000, torch.device("cpu"), work), daemon=True)
        done.start()
        done.join(10)
        assert not done.is_alive(), "the call waited for the held worker"
    finally:
        release.set()
    assert sorted(worked)[0][0] == 0 and sum(e - s for s, e in worked) == 300
    assert len(threads) == 1 and threading.get_ident() not in threads  # the free worker


def test_a_failing_range_raises_after_the_ranges_in_flight(monkeypatch):
    """One worker's error is raised in the caller, but only once the ranges other workers
    were working on are finished (none is written to after the call returns), and no new
    range is handed out after it."""
    import threading
    import time

    monkeypatch.setattr(pool, "_POOL", pool._Pool())
    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(pool, "max_workers", lambda: 2)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 10_000)  # 30 chunks of 10 rows
    started, finished = [], []
    first = threading.Event()

    def work(s, e):
        started.append(s)
        if s == 0:  # the first range: slow, and still running when the other one fails
            first.set()
            time.sleep(0.3)
            finished.append(s)
            return
        assert first.wait(10)
        raise ValueError("bad range")

    with pytest.raises(ValueError, match="bad range"):
        pool.parallel_rows(300, 1000, torch.device("cpu"), work)
    assert finished == [0]
    assert len(started) == 2  # nothing handed out after the failure


def test_a_partly_scheduled_call_is_finished_by_the_caller(monkeypatch):
    """Interpreter shutdown can begin between two submits: one task is scheduled, the next
    refused. The caller used to work every row again itself, beside the scheduled task,
    which went on writing after the call returned. It claims rows beside that task now,
    each row once, and returns when both are done."""
    import threading
    import time

    monkeypatch.setattr(pool, "_POOL", pool._Pool())
    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(pool, "max_workers", lambda: 2)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 10)  # 10 chunks of 10 rows of 1
    pool._POOL.submit(2, lambda: None, 1)  # the executor, started
    executor, submitted = pool._POOL.executor, []
    submit = executor.submit

    def refuse_after_one(fn, *args):
        if submitted:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        submitted.append(fn)
        return submit(fn, *args)

    monkeypatch.setattr(executor, "submit", refuse_after_one)
    worked, returned = [], threading.Event()

    def work(s, e):
        worked.append((s, e, returned.is_set()))
        time.sleep(0.01)

    pool.parallel_rows(100, 1, torch.device("cpu"), work)
    returned.set()
    time.sleep(0.3)
    rows = sorted((s, e) for s, e, _ in worked)
    assert rows[0][0] == 0 and rows[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))  # each row once
    assert not any(after for _, _, after in worked)


def test_an_interrupted_caller_leaves_no_worker_writing(monkeypatch):
    """A KeyboardInterrupt while the caller waits: the workers used to go on claiming and
    writing every remaining range (over the logits, in place) after the call had raised.
    Nothing more is handed out now, and the call raises once the ranges being worked are
    done."""
    import threading
    import time

    monkeypatch.setattr(pool, "_POOL", pool._Pool())
    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(pool, "max_workers", lambda: 2)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 10)  # 20 chunks of 10 rows of 1
    started, raised = threading.Event(), threading.Event()

    class Interrupted(threading.Event):
        """The caller's first wait is interrupted once a range is being worked."""
        interrupt = True

        def wait(self, timeout=None):
            if Interrupted.interrupt:
                Interrupted.interrupt = False
                assert started.wait(10)
                raise KeyboardInterrupt
            return super().wait(timeout)

    init = pool.Claims.__init__

    def claims_init(self, *args):
        init(self, *args)
        self.done = Interrupted()

    monkeypatch.setattr(pool.Claims, "__init__", claims_init)
    worked = []

    def work(s, e):
        started.set()
        time.sleep(0.05)
        worked.append((e - s, raised.is_set()))

    with pytest.raises(KeyboardInterrupt):
        pool.parallel_rows(200, 1, torch.device("cpu"), work)
    raised.set()
    time.sleep(0.5)
    assert worked and not any(after for _, after in worked)
    assert sum(n for n, _ in worked) < 200  # the rest was never handed out


def test_a_failure_outside_any_range_is_raised_not_waited_for(monkeypatch):
    """A worker failing outside any range (here: claiming one) left the caller waiting for
    ever, where waiting on the futures had raised the error. It is raised now."""
    import threading

    monkeypatch.setattr(pool, "_POOL", pool._Pool())
    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(pool, "max_workers", lambda: 2)

    def take(self):
        raise MemoryError("no memory to claim with")

    monkeypatch.setattr(pool.Claims, "take", take)
    errors = []

    def call():
        try:
            pool.parallel_rows(64, 1000, torch.device("cpu"), lambda s, e: None)
        except MemoryError as e:
            errors.append(e)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(10)
    assert not caller.is_alive(), "the call waits for ever"
    assert len(errors) == 1 and "no memory to claim with" in str(errors[0])


def test_results_do_not_depend_on_who_works_which_chunk(monkeypatch):
    """Claims change from call to call with the workers' timing; each chunk's ops are the
    same wherever it runs, so the results are bitwise the same however rows are claimed:
    one chunk per claim, the default shares, and every row to one of two workers."""
    torch.manual_seed(5)
    n, c = 45, 4099
    x = torch.randn(n, c) * 4
    t = torch.randint(0, c, (n,))
    t[[2, 30]] = -100
    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(pool, "max_workers", lambda: 2)

    def run():
        xr = x.clone().requires_grad_()
        loss = fusedce.cross_entropy(xr, t, reduction="none", backend="torch")
        loss.backward(torch.linspace(-1, 1, n))
        return loss.detach(), xr.grad

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 4 * c)  # 12 chunks of 4 rows
    ref = run()
    monkeypatch.setattr(pool.Claims, "__init__", _claims_with_parts(10 ** 6))  # a chunk each
    one_each = run()
    release = _busy_pool(monkeypatch, 2)  # every claim to the one free worker
    try:
        one_worker = run()
    finally:
        release.set()
    for got in (one_each, one_worker):
        assert all(torch.equal(a, b) for a, b in zip(ref, got))


def _claims_with_parts(parts):
    init = pool.Claims.__init__

    def patched(self, n_rows, step, workers):
        init(self, n_rows, step, workers)
        self.parts = parts
    return patched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_workers_under_inference_mode(monkeypatch, dtype):
    """Under torch.inference_mode() the per-row buffers are inference tensors, which the
    worker threads (not in inference mode: it is thread-local) could not write: every call
    large enough for two workers raised."""
    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(pool, "max_workers", lambda: 2)
    torch.manual_seed(2)
    x = (torch.randn(13, 4099) * 3).to(dtype)
    t = torch.randint(0, 4099, (13,))
    with torch.inference_mode():
        loss = fusedce.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    ref = torch.nn.functional.cross_entropy(x.double(), t, reduction="none",
                                            label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5 if dtype ==
                               torch.float32 else 2**-8)


def test_another_default_device(cache, own_path):
    """Under ``torch.set_default_device`` / ``with torch.device(...)`` (here "meta"), the
    cache made its buffer on the default device, not the CPU logits' one, and the step
    failed ('copy from device cpu to device meta'); the bad buffer then stayed cached."""
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(9, 300, generator=gen, requires_grad=True)
    t = torch.randint(0, 300, (9,), generator=gen)
    with torch.device("meta"):
        loss = fusedce.cross_entropy(x, t)
        loss.backward()
    ref = x.detach().double().requires_grad_()
    F.cross_entropy(ref, t).backward()
    torch.testing.assert_close(x.grad.double(), ref.grad, atol=ATOL, rtol=RTOL)
    assert all(e[0].device.type == "cpu" for e in cache.entries) and cache.entries


def test_pool_growing_while_another_call_submits(monkeypatch):
    """A call that grows the pool shut the old executor down; another thread that had just
    got that executor then failed to submit ('cannot schedule new futures after
    shutdown'). Getting the executor and submitting are one step now: a thread that
    grows the pool between them (its window widened here) waits for it."""
    import threading

    monkeypatch.setattr(pool, "_POOL", pool._Pool())
    start, in_window = pool._Pool._start, threading.Event()

    def slow_start(n):
        executor = start(n)
        if n == 2:  # the first call: let the second grow the pool before it submits
            in_window.set()
            threading.Event().wait(0.3)
        return executor

    monkeypatch.setattr(pool._Pool, "_start", staticmethod(slow_start))
    results, errors = [], []

    def call(n):
        try:
            futures = pool._POOL.submit(n, threading.get_ident, 2)
            results.append([f.result() for f in futures])
        except Exception as e:  # noqa: BLE001 - what the test reports
            errors.append(e)

    first = threading.Thread(target=call, args=(2,))
    first.start()
    assert in_window.wait(10)
    second = threading.Thread(target=call, args=(4,))
    second.start()
    first.join(10)
    second.join(10)
    assert not errors and len(results) == 2, (errors, results)
    assert all(len(r) == 2 and threading.get_ident() not in r for r in results), results


@pytest.mark.slow
def test_calls_after_interpreter_shutdown_began_run_inline(tmp_path):
    """Once the interpreter shuts down, concurrent.futures takes no new work: a training
    thread the main thread left running and an atexit handler failed ('cannot schedule new
    futures after interpreter shutdown'). They run in the calling thread now."""
    script = tmp_path / "late.py"
    script.write_text(
        "import atexit, threading, torch, fusedce\n"
        "import torch.nn.functional as F\n"
        "x = torch.randn(8192, 1100, generator=torch.Generator().manual_seed(0))\n"
        "t = torch.randint(0, 1100, (8192,), generator=torch.Generator().manual_seed(1))\n"
        "ref = F.cross_entropy(x.double(), t).item()\n"
        "def check(where):\n"
        "    xr = x.clone().requires_grad_()\n"
        "    loss = fusedce.cross_entropy(xr, t)\n"
        "    loss.backward()\n"
        "    assert abs(loss.item() - ref) < 1e-5 and xr.grad.isfinite().all()\n"
        "    print(where, 'ok', flush=True)\n"
        "def late():\n"
        "    threading.Event().wait(0.5)  # the main thread has returned by now\n"
        "    check('thread')\n"
        "atexit.register(check, 'atexit')\n"
        "threading.Thread(target=late).start()\n"
        "check('main')\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env=checkout_env())
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["main", "ok", "thread", "ok", "atexit", "ok"], run.stdout


# ------------------ the chunk loops, scripted with TorchScript (no GIL between their ops)

@pytest.mark.parametrize("loop", ["fwd_chunks", "bwd_chunks"])
def test_chunk_loops_run_as_scripts(loop):
    """With the PyTorch pinned here, scripting works: the speed the README claims for the
    CPU path (the loops' ops free of the GIL) is what runs."""
    fn = getattr(chunks, loop)
    assert isinstance(chunks.script(fn), torch.jit.ScriptFunction)


def test_script_off_or_failing_runs_python(monkeypatch):
    monkeypatch.setattr(chunks, "_SCRIPTED", {})
    monkeypatch.setenv("FUSEDCE_SCRIPT", "0")
    assert chunks.script(chunks.fwd_chunks) is chunks.fwd_chunks
    monkeypatch.delenv("FUSEDCE_SCRIPT")

    def not_scriptable(x):
        return {i for i in range(x)}  # set comprehensions are not TorchScript

    assert chunks.script(not_scriptable) is not_scriptable

    # a script compiled from a source file changed on disk since the import (other lines,
    # another function): its arguments differ from the function's, and it is not used
    from types import SimpleNamespace

    wrong = SimpleNamespace(schema=SimpleNamespace(arguments=[SimpleNamespace(name="dx")]))
    monkeypatch.setattr(torch.jit, "script", lambda fn: wrong)
    assert chunks.script(chunks.bwd_chunks) is chunks.bwd_chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_script_and_python_agree(monkeypatch, dtype):
    """The scripted loops and the same functions run as Python give the same bits, on every
    branch: forward only, gradient into a buffer, in place; smoothing with weights; rows
    far above and below the others, in different workers' ranges; the backward with
    negative and zero upstream rows (zeroed, not computed); 2-row chunks on 3 workers, a
    partial last chunk."""
    torch.manual_seed(1)
    n, c = 13, 4099
    x = (torch.randn(n, c) * 3).to(dtype)
    x[1] += 200.0
    x[10] -= 250.0
    x[7, 4000] = 150.0  # far beyond the first columns: its range is done again
    target = torch.randint(0, c, (n,))
    target[4] = -100
    weight = torch.rand(c) + 0.5
    scale = torch.tensor([0.25])
    upstream = torch.randn(n)
    upstream[[5, 6]] = 0.0  # with the ignored row 4: rows 4-6 zeroed

    def run():
        out = []
        for kw in ({}, {"weight": weight, "label_smoothing": 0.1}):
            out += cpu.ce_fwd(x, target, **kw)
            buf = torch.empty_like(x)
            out += cpu.ce_fwd(x, target, grad_scale=scale, grad_out=buf, **kw)
            xi = x.clone()
            out += cpu.ce_fwd(xi, target, grad_scale=scale, **kw)
            out += [buf, xi]
            out.append(cpu.ce_bwd(x, target, out[1], upstream, **kw))
        return out

    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 2 * c)
    monkeypatch.setattr(pool, "max_workers", lambda: 3)
    monkeypatch.setattr(chunks, "_SCRIPTED", {})
    scripted = run()
    loops = (chunks.fwd_chunks, chunks.bwd_chunks)
    assert all(isinstance(chunks._SCRIPTED[f], torch.jit.ScriptFunction) for f in loops)
    monkeypatch.setattr(chunks, "_SCRIPTED", {f: f for f in loops})
    python = run()
    assert len(scripted) == len(python) == 18
    for a, b in zip(scripted, python):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_fork_while_a_loop_is_being_scripted():
    """A fork while another thread held the scripting lock left the child a lock nobody
    would release: its first call that scripts a loop waited forever."""
    import time

    parent_scripted = dict(chunks._SCRIPTED)
    with chunks._SCRIPT_LOCK:  # as a thread scripting a loop would hold it
        chunks._SCRIPTED.clear()
        pid = os.fork()
        if pid == 0:  # the child: script a loop, exit 0 if that returns
            try:
                loop = chunks.script(chunks.fwd_chunks)
                os._exit(0 if isinstance(loop, torch.jit.ScriptFunction) else 3)
            except BaseException:
                os._exit(4)
    chunks._SCRIPTED.update(parent_scripted)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung on the scripting lock")


def test_interrupted_scripting_is_tried_again(monkeypatch):
    """An interrupt while scripting left the Python function cached for good."""
    monkeypatch.setattr(chunks, "_SCRIPTED", {})
    script = torch.jit.script

    def interrupted(fn):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.jit, "script", interrupted)
    with pytest.raises(KeyboardInterrupt):
        chunks.script(chunks.bwd_chunks)
    monkeypatch.setattr(torch.jit, "script", script)
    assert isinstance(chunks.script(chunks.bwd_chunks), torch.jit.ScriptFunction)


# ------------------------ the base-2 exponential: its precision, and shifts beyond 2.3e38

def _pytorch_fp32(x, t, upstream, **kwargs):
    """Loss and gradient of PyTorch's own fp32 loss (``helpers.fused``'s, for PyTorch)."""
    x = x.detach().clone().requires_grad_()
    loss = F.cross_entropy(x, t, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype))
    return loss.detach(), grad


def _errors(loss, grad, loss64, grad64):
    """Largest relative error of the loss, of the gradient's entries above 1e-6 of their
    row's largest, and the gradient's normwise relative error."""
    loss, grad = loss.double(), grad.double()
    big = grad64.abs() > 1e-6 * grad64.abs().amax(1, keepdim=True)
    return (((loss - loss64).abs() / loss64.abs()).max().item(),
            ((grad - grad64).abs() / grad64.abs())[big].max().item(),
            ((grad - grad64).norm() / grad64.norm()).item())


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("level, spread", [(0.0, 2.0), (-60.0, 3.0), (0.0, 8.0), (30.0, 5.0)],
                         ids=["N(0,2)", "N(-60,3)", "N(0,8)", "N(30,5)"])
def test_exp2_keeps_the_precision_of_pytorch(level, spread, reduction):
    """Every ``exp(x - m)`` is ``exp2`` of one fused multiply-add (``chunks.exp_argument``),
    a third of the time of PyTorch's ``exp`` on the CPUs measured. Against float64, on 64
    rows of GPT-2's vocabulary at the logit levels of a fresh model, a pretrained GPT-2
    (near -60), a wide spread and a high level, with a random upstream gradient for
    'none': each gradient entry (above 1e-6 of its row's largest) is no further from
    float64 than PyTorch's own fp32 gradient's worst (1.5e-6 to 7e-6 here), and within
    1.5e-6; the loss within 2.5e-7 and the gradient's norm within 1e-7. ``exp2(x log2
    e)`` without the max shift misses the entry bound by up to 3.5x at the wide and high
    levels."""
    torch.manual_seed(0)
    n, c = 64, 50_257
    x = torch.randn(n, c) * spread + level
    t = torch.randint(0, c, (n,))
    up = torch.randn(n) if reduction == "none" else torch.ones(())
    want = reference(x, t, up, reduction=reduction)[:2]
    got = fused(x, t, up, reduction=reduction, backend="torch")
    loss_err, entry_err, norm_err = _errors(*got, *want)
    _, pytorch_entry_err, _ = _errors(*_pytorch_fp32(x, t, up, reduction=reduction), *want)
    assert entry_err <= min(pytorch_entry_err, 1.5e-6), (entry_err, pytorch_entry_err)
    assert loss_err <= 2.5e-7 and norm_err <= 1e-7, (loss_err, norm_err)


def _spy_ranges(monkeypatch):
    """Runs the chunk loops as Python and records each ``chunks.fwd_chunks`` call as
    ``(shift estimated from the first columns, the estimate held)``."""
    calls, inner = [], chunks.fwd_chunks

    def spy(*args):
        held = inner(*args)
        calls.append((args[19] < args[0].shape[1], held))
        return held

    monkeypatch.setattr(chunks, "fwd_chunks", spy)
    monkeypatch.setattr(chunks, "_SCRIPTED", {spy: spy, chunks.bwd_chunks: chunks.bwd_chunks})
    return calls


@pytest.mark.parametrize("gap, redone", [(0.0, False), (15.0, False), (30.0, True),
                                         (150.0, True)])
def test_a_shift_from_the_first_columns_keeps_the_precision(monkeypatch, gap, redone):
    """A row's shift is the max of its first ``SHIFT_PREFIX`` columns, not of the whole row
    (one pass fewer over the chunk). A shift below the max only makes every ``exp`` larger:
    rows of GPT-2's vocabulary whose max lies ``gap`` (plus up to 6) beyond their first
    1,024 columns keep the precision bounds of the exact max
    (``test_exp2_keeps_the_precision_of_pytorch``) against float64, with a random upstream
    gradient; and where a sum passes 2**32 (gap 30: the largest exponent would be rounded
    to 2**-19) or overflows (150), the row is done again with the exact max, and only
    there."""
    calls = _spy_ranges(monkeypatch)
    torch.manual_seed(3)
    n, c = 4, 50_257
    x = torch.randn(n, c).clamp(-3.0, 3.0)
    x[:, 30_000] = gap + 3.0
    t = torch.randint(0, c, (n,))
    up = torch.rand(()) + 0.5
    want = reference(x, t, up)[:2]
    got = fused(x, t, up, backend="torch")
    loss_err, entry_err, norm_err = _errors(got[0][None], got[1], want[0][None], want[1])
    assert entry_err <= 1.5e-6 and loss_err <= 2.5e-7 and norm_err <= 1e-7, \
        (entry_err, loss_err, norm_err)
    assert calls[0][0], calls  # the estimate was taken
    assert any(est and not held for est, held in calls) == redone, calls


@pytest.mark.parametrize("scale", [1.0, 1.39404296875])
@pytest.mark.parametrize("target, gap, held, bound", [(1050, 34.0, True, 1e-7),
                                                      (7, 20.0, True, 1e-6),
                                                      (7, 34.0, False, 1e-7)])
def test_two_maxima_beyond_the_first_columns(monkeypatch, scale, target, gap, held, bound):
    """Rows whose two largest logits tie ``gap`` above the rest (their first 1,024 columns
    included): every other probability is about e**-gap, the case where the largest
    exponent's rounding shows in the loss (found in review). The target's logit is a floor
    of the shift: with the target at a max the shift is that max. Else at gap 20 the largest
    exponent under the estimated shift is 28.9, rounded to 2**-20: the loss within 1e-6 of
    float64's; at gap 34 the sum passes 2**32 and the rows are done again with the exact
    max: within 1e-7 (both beyond the loss's own fp32 rounding). The gradient within
    1.5e-6 of each entry (above 1e-6 of the row's largest) throughout, with 'none' (its
    gradient from the backward) and 'sum' (formed in the forward); with a logit scale whose
    fp32 ``scale log2(e)`` rounds badly too."""
    calls = _spy_ranges(monkeypatch)
    n, c = 6, 1100
    x = torch.zeros(n, c)
    x[:, 1050] = x[:, 1060] = gap / scale
    x[:, 7] = torch.linspace(-0.5, 0.5, n)
    t = torch.full((n,), target)
    up = torch.rand(()) + 0.5
    x64 = (x.double() * scale).requires_grad_()
    loss64 = F.cross_entropy(x64, t, reduction="none")
    (g64,) = torch.autograd.grad(loss64.sum() * up.double(), x64)
    g64 = g64 * scale
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, reduction="none", backend="torch", logit_scale=scale)
    (g,) = torch.autograd.grad(loss.sum() * up, xr)
    # beyond the fp32 rounding of the loss itself (half an ulp: 2**-24 of it)
    assert ((loss.double() - loss64.detach()).abs() - 2 ** -24 * loss64.detach()).max() <= bound
    big = g64.abs() > 1e-6 * g64.abs().amax(1, keepdim=True)
    assert ((g.double() - g64).abs() / g64.abs())[big].max() <= 1.5e-6
    assert calls and calls[0] == (True, held), calls
    # the 'sum' gradient, formed in the forward under the same shift
    calls.clear()
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(fusedce.cross_entropy(xr, t, reduction="sum", backend="torch",
                                                     logit_scale=scale) * up, xr)
    assert ((g.double() - g64).abs() / g64.abs())[big].max() <= 1.5e-6
    assert calls[0] == (True, held), calls


def test_a_range_of_rows_far_beyond_their_shift_takes_the_exact_max(monkeypatch):
    """Where most rows' max lies far above their first columns and their target (a
    confident model that is wrong), each would be done twice; once more than an eighth of
    a range's rows were, the rest of the range takes the exact max from the start: here
    only the first of 32 two-row chunks tries the estimate. Results within fp32 rounding of
    float64 PyTorch's, the loss and the 'sum' gradient formed in the forward."""
    monkeypatch.setattr(chunks, "_SCRIPTED", {f: f for f in (chunks.fwd_chunks,
                                                            chunks.bwd_chunks)})
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 2 * 3000)
    tried, inner = [], chunks._exp_rows

    def spy(*args):
        tried.append(args[-1])
        return inner(*args)

    monkeypatch.setattr(chunks, "_exp_rows", spy)
    torch.manual_seed(8)
    n, c = 64, 3000
    x = torch.randn(n, c)
    x[:, 2500] = 40.0
    t = torch.randint(0, 2000, (n,))
    up = torch.rand(()) + 0.5
    want = reference(x, t, up, reduction="sum")[:2]
    got = fused(x, t, up, reduction="sum", backend="torch")
    torch.testing.assert_close(got[0].double(), want[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[1].double(), want[1], atol=ATOL, rtol=RTOL)
    assert tried == [True, False, False] + [False] * 31, tried


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_nan_and_inf_beyond_the_first_columns(monkeypatch, reduction):
    """A NaN or +inf logit beyond the first columns, or a row of -inf, under the estimated
    shift: PyTorch's NaN for that row (loss and gradient), the other rows untouched."""
    calls = _spy_ranges(monkeypatch)
    torch.manual_seed(4)
    n, c = 5, 3000
    x = torch.randn(n, c) * 2
    x[0, 2500] = float("nan")
    x[1, 2000] = float("inf")
    x[2] = float("-inf")
    t = torch.randint(0, c, (n,))
    up = torch.randn(n) if reduction == "none" else torch.rand(()) + 0.5
    want = reference(x, t, up, reduction=reduction)[:2]
    got = fused(x, t, up, reduction=reduction, backend="torch")
    torch.testing.assert_close(got[0].double(), want[0], atol=ATOL, rtol=RTOL, equal_nan=True)
    torch.testing.assert_close(got[1].double(), want[1], atol=ATOL, rtol=RTOL, equal_nan=True)
    assert got[1][:3].isnan().all() and got[1][3:].isfinite().all()
    assert calls[0][0] and any(est and not held for est, held in calls), calls


@pytest.mark.parametrize("case", ["in place", "z-loss", "tiny weight", "short rows"])
def test_exact_max_where_an_estimate_could_lose(monkeypatch, case):
    """No estimated shift where a range could not be done again (in place: the logits are
    gone), with a z-loss (its gradient factor ``g A + z lse`` may cancel), where a row's
    ``g A`` below 2**-90 (here a class weight of 2**-100) divided by a sum up to 2**32 could
    leave fp32's normal range, or where the row is no longer than the prefix; the results
    are float64 PyTorch's (that row's gradient too, relative to its size)."""
    calls = _spy_ranges(monkeypatch)
    torch.manual_seed(5)
    n, c = 6, 1024 if case == "short rows" else 2500
    x = torch.randn(n, c) * 2
    t = torch.randint(0, c, (n,))
    up = torch.rand(()) + 0.5
    kw = {"inplace_backward": case == "in place"}
    if case == "tiny weight":
        kw["weight"] = torch.ones(c)
        kw["weight"][t[0]] = 2.0 ** -100
        t[1:] = torch.where(t[1:] == t[0], (t[0] + 1) % c, t[1:])
        want = reference(x, t, up, weight=kw["weight"])[:2]
    elif case == "z-loss":
        kw["lse_square_scale"] = 1e-3
        x64 = x.double().requires_grad_()
        loss64 = F.cross_entropy(x64, t) + 1e-3 * torch.logsumexp(x64, 1).pow(2).mean()
        want = (loss64.detach(), torch.autograd.grad(loss64 * up.double(), x64)[0])
    elif case != "tiny weight":
        want = reference(x, t, up)[:2]
    got = fused(x, t, up, backend="torch", **kw)
    torch.testing.assert_close(got[0].double(), want[0], atol=0, rtol=RTOL)
    torch.testing.assert_close(got[1].double(), want[1], atol=0, rtol=RTOL)
    assert calls and not any(est for est, _ in calls), calls


@pytest.mark.parametrize("inplace", [False, True])
def test_row_max_beyond_the_range_of_its_product(monkeypatch, inplace):
    """Rows whose max is beyond 2.36e38 (``-m log2(e)`` overflows fp32): their chunk is
    subtracted first, and the loss and gradient are float64 PyTorch's, not NaN; rows near
    +3e38 and -3e38, each in its own 2-row chunk beside ordinary ones, on 2 workers (the
    scripted loops), forward and backward; the backward's shift ``lse - log|g|`` beyond the
    same bound as well (``ce_bwd``). Row 6's max is shared by 500 logits: its loss is
    log 500, which ``lse - x_t`` in fp32 would lose (``(m - x_t) + log(sum)`` keeps it)."""
    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(pool, "max_workers", lambda: 2)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 2 * 1000)
    torch.manual_seed(2)
    x = torch.randn(8, 1000) * 3
    x[2] = torch.linspace(2.9e38, 3.0e38, 1000)
    x[5] = torch.linspace(-3.0e38, -2.9e38, 1000)
    x[6, :500] = 2.5e38  # a max shared by half the row
    t = torch.randint(0, 1000, (8,))
    t[2] = 999  # the max: loss 0
    up = torch.randn(8)
    want = reference(x, t, up, reduction="none")
    loss, grad = fused(x, t, up, reduction="none", backend="torch", inplace_backward=inplace)
    assert grad.isfinite().all()
    torch.testing.assert_close(loss.double(), want[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(grad.double(), want[1], atol=ATOL, rtol=RTOL)
    # from the lse alone, one fp32 number (2.5e38 for row 6, which loses its log 500; and
    # log|g| is lost in lse - log|g| at such a level), the backward gives PyTorch's gradient
    # for the rows with a single max and an upstream gradient of +-1
    _, lse = cpu.ce_fwd(x, t)
    up = up.sign()
    want = reference(x, t, up, reduction="none")
    dx = cpu.ce_bwd(x, t, lse, up)
    rows = [0, 1, 2, 3, 4, 5, 7]
    torch.testing.assert_close(dx.double()[rows], want[1][rows], atol=ATOL, rtol=RTOL)


def test_a_nan_row_does_not_hide_a_far_row_in_its_chunk():
    """The chunk's test of ``|m log2 e| < 2**24`` read a NaN row's NaN as "small", so a row
    at 3e9 beside it took the multiply-add, whose per-row rounding (256 in the exponent)
    overflowed: loss -inf where PyTorch's is log 8 (found in review). Forward, backward
    from the lse (``ce_bwd``, where the rounding does not cancel: a row at 1e8 gave
    p = 177.6) and the vocab-parallel passes."""
    t = torch.tensor([1, 2])
    x = torch.zeros(2, 8)
    x[0, 3] = float("nan")
    x[1] = 3000000512.0
    up = torch.ones(2)
    want = reference(x, t, up, reduction="none")
    got = fused(x, t, up, reduction="none", backend="torch")
    assert got[0][0].isnan() and got[1][0].isnan().all()
    torch.testing.assert_close(got[0][1].double(), want[0][1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[1][1].double(), want[1][1], atol=ATOL, rtol=RTOL)
    x = torch.zeros(2, 8)
    x[0, 3] = float("nan")
    x[1] = 1e8
    x[1, 7] = 1e8 + 1792.0  # p = 1 at 7
    _, lse = cpu.ce_fwd(x, t)
    dx = cpu.ce_bwd(x, t, lse, torch.ones(2))
    expected = torch.zeros(8)
    expected[7], expected[2] = 1.0, -1.0
    torch.testing.assert_close(dx[1], expected, atol=ATOL, rtol=RTOL)
    part = torch.empty(6, dtype=torch.float64)  # [lse_r | xt_r | sm_r], float64 as sent
    cpu.vp_partials(x, t, None, False, part)
    assert part[1].item() == pytest.approx(1e8 + 1792.0, rel=1e-7)
    assert part[3].item() == 1e8  # row 1's target logit


@pytest.mark.slow
def test_without_a_fused_multiply_add_rows_far_from_0_keep_their_precision():
    """Under ``ATEN_CPU_CAPABILITY=default`` PyTorch's CPU kernels have no fused
    multiply-add: ``torch.add(c, x, alpha=a)`` rounds ``a x`` first, an error relative to
    ``x``, not ``x - m`` (1.7e-3 in the gradient at logits near 1e5, found in review).
    ``chunks.fma_fused()`` says so, and the chunks subtract the max first: the gradient of
    rows near 1e5 stays within fp32's precision of float64 PyTorch."""
    code = (
        "import torch, torch.nn.functional as F, fusedce\n"
        "from fusedce.cpu import chunks\n"
        "assert not chunks.fma_fused()\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(16, 1000) * 3 + 1e5\n"
        "t = torch.randint(0, 1000, (16,))\n"
        "x64 = x.double().requires_grad_()\n"
        "F.cross_entropy(x64, t).backward()\n"
        "xr = x.clone().requires_grad_()\n"
        "fusedce.cross_entropy(xr, t, backend='torch').backward()\n"
        "err = (xr.grad.double() - x64.grad).abs().max().item()\n"
        "assert err < 1e-8, err\n"
        "print('ok', err)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=checkout_env(ATEN_CPU_CAPABILITY="default"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("ok"), run.stdout
