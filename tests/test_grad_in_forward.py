"""The CPU's default mode: the gradient is computed in the forward, into a reused buffer.

``fusedce.cross_entropy`` on CPU logits that require a gradient computes loss and gradient
in one pass (``cpu.ce_fwd(..., grad_out=...)``) into a buffer of the gradient cache
(``buffers.GradCache``); the backward only rescales it. What must hold:

- the values are those of float64 PyTorch, also for rows where the unshifted exp fails
  (overflow, underflow) and is redone, and for a second backward through a retained graph;
- the logits are never written;
- a buffer is handed out again only when nothing refers to it: not while a graph that will
  still hand it over is alive, nor while the caller keeps a gradient, a view of it or its
  storage; in a training loop's steady state the same buffer is reused (no fresh
  logits-sized allocation per step).

Correctness of every option on both paths is in ``test_cross_entropy.py``; this file is
about what the gradient-in-forward and the cache add.
"""

import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce import _loss, cpu
from fusedce.cpu import buffers, chunks, pool
from fusedce.cpu import rows as cpu_rows

ATOL, RTOL = 2e-5, 2e-5  # fp32 against float64, as in test_cross_entropy.py


@pytest.fixture
def cache(monkeypatch):
    """A fresh, empty gradient cache that takes buffers of any size (small test shapes)."""
    fresh = buffers.GradCache()
    monkeypatch.setattr(buffers, "_GRADS", fresh)
    monkeypatch.setattr(buffers, "GRAD_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(buffers, "GRAD_CACHE", True)
    return fresh


def reference(x, target, upstream, **kwargs):
    x64 = x.detach().double().requires_grad_()
    loss = F.cross_entropy(x64, target, **kwargs)
    (grad,) = torch.autograd.grad(loss, x64, upstream.double())
    return loss.detach(), grad


def logits(n, c, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=gen) * scale, torch.randint(0, c, (n,), generator=gen)


def test_default_cpu_path_computes_the_gradient_in_the_forward(cache, monkeypatch):
    """The path taken: the gradient is in the buffer after the forward, before backward."""
    seen = []
    ce_fwd = cpu.ce_fwd
    monkeypatch.setattr(cpu, "ce_fwd",
                        lambda *a, **k: seen.append(k.get("grad_out")) or ce_fwd(*a, **k))
    x, t = logits(4, 300)
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t)
    assert len(seen) == 1 and seen[0] is not None
    _, ref_grad = reference(x, t, torch.tensor(1.0))
    torch.testing.assert_close(seen[0].double(), ref_grad, atol=ATOL, rtol=RTOL)
    loss.backward()
    assert xr.grad.data_ptr() == seen[0].data_ptr()  # handed over, not copied
    assert torch.equal(xr.detach(), x)  # the logits were not written


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_gradient_no_buffer(cache, reduction):
    """Under no_grad, or for logits that need no gradient, only the loss is computed."""
    x, t = logits(4, 300)
    with torch.no_grad():
        fusedce.cross_entropy(x.clone().requires_grad_(), t, reduction=reduction)
    fusedce.cross_entropy(x, t, reduction=reduction)
    assert cache.entries == []


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_backward_through_a_retained_graph(cache, reduction):
    """The first backward hands the buffer over; a second recomputes from the saved logits."""
    x, t = logits(5, 300, seed=1)
    shape = F.cross_entropy(x, t, reduction=reduction).shape
    gen = torch.Generator().manual_seed(2)
    ups = [torch.randn(shape, generator=gen) for _ in range(2)]
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, reduction=reduction)
    first = torch.autograd.grad(loss, xr, ups[0], retain_graph=True)[0]
    first_copy = first.clone()
    second = torch.autograd.grad(loss, xr, ups[1])[0]
    for got, up in ((first, ups[0]), (second, ups[1])):
        _, ref_grad = reference(x, t, up, reduction=reduction)
        torch.testing.assert_close(got.double(), ref_grad, atol=ATOL, rtol=RTOL)
    assert torch.equal(first, first_copy)  # the second backward did not write the first's
    assert first.data_ptr() != second.data_ptr()


def test_buffer_of_a_pending_graph_is_not_reused(cache):
    """A loss whose backward has not run yet holds its gradient: another step in between
    must not take that buffer."""
    (x1, t1), (x2, t2) = logits(4, 300, seed=3), logits(4, 300, seed=4)
    a = x1.clone().requires_grad_()
    pending = fusedce.cross_entropy(a, t1)
    for _ in range(3):  # other steps, each freeing its gradient
        b = x2.clone().requires_grad_()
        fusedce.cross_entropy(b, t2).backward()
        del b
    pending.backward()
    _, ref_grad = reference(x1, t1, torch.tensor(1.0))
    torch.testing.assert_close(a.grad.double(), ref_grad, atol=ATOL, rtol=RTOL)


def _step(x, t):
    xr = x.clone().requires_grad_()
    fusedce.cross_entropy(xr, t).backward()
    return xr.grad


@pytest.mark.parametrize("holder", ["gradient", "view", "storage", "numpy"])
def test_referenced_gradient_is_not_overwritten(cache, holder):
    """Whatever the caller keeps of a gradient keeps its buffer out of the cache's reach."""
    (x1, t1), (x2, t2) = logits(4, 300, seed=5), logits(4, 300, seed=6)
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
    x, t = logits(4, 300, seed=7)
    ptrs = set()
    for _ in range(4):
        g = _step(x, t)
        ptrs.add(g.data_ptr())
        del g
    assert len(ptrs) == 1
    assert len(cache.entries) == 1


def test_at_most_two_buffers_and_empty_cache(cache):
    x, t = logits(4, 300, seed=8)
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
    (x, t), (y, u), (z, v) = logits(8, 300), logits(7, 300), logits(20, 300)
    _step(x, t)  # its gradient dropped at once
    assert [e[0].numel() for e in cache.entries] == [8 * 300 * 4]
    g = _step(y, u)  # 7 rows: fits the 8-row buffer (< 1.25x)
    assert g.untyped_storage().nbytes() == 8 * 300 * 4
    _, ref_grad = reference(y, u, torch.tensor(1.0))
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
    x, t = logits(4, 300, seed=9)
    _step(x, t)
    assert cache.entries == []


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1},
                                     {"weight": True, "ignore_index": 3}])
def test_rows_where_the_unshifted_exp_fails_are_redone(options):
    """Rows whose sum(exp(x)) overflows (logits near +200) or underflows (all logits below
    -150) beside ordinary rows, in both worker threads' ranges (24 x 50,257 logits run on
    two workers): each is redone with the max shift and matches float64."""
    n, c = 24, 50_257
    x, t = logits(n, c, seed=10)
    x[2] += 200.0
    x[5] -= 250.0
    x[17, 100] = 120.0  # a single overflowing logit
    x[20] -= 150.0
    t[3] = 3
    kwargs = dict(options)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(c, generator=torch.Generator().manual_seed(11)) + 0.5
    up = torch.tensor(0.7)
    ref_loss, ref_grad = reference(x, t, up, **{k: (v.double() if torch.is_tensor(v) else v)
                                               for k, v in kwargs.items()})
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, **kwargs)
    (grad,) = torch.autograd.grad(loss, xr, up)
    torch.testing.assert_close(loss.double(), ref_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(grad.double(), ref_grad, atol=ATOL, rtol=RTOL)
    assert torch.equal(xr.detach(), x)


def test_bf16_gradient_in_forward_with_upstream():
    """bf16 logits: the gradient is rounded once in the forward (1/denominator folded in)
    and the upstream factor, when not 1, once more in the backward."""
    x, t = logits(6, 5000, seed=12)
    xb = x.to(torch.bfloat16)
    up = torch.tensor(1.7)
    ref_loss, ref_grad = reference(xb.float(), t, up)
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


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_rows_beside_ordinary_ones(dtype, inplace):
    """Overflowing, underflowing, NaN and +inf rows among ordinary ones in the same chunks,
    in both modes and dtypes (bf16 in place takes the unshifted exp through its fp32
    scratch, checked chunk by chunk before the chunk is written back): the ordinary rows
    match float64, the others give what PyTorch gives (NaN for NaN and +inf)."""
    n, c = 24, 50_257
    x, t = logits(n, c, seed=13)
    x[1] += 200.0
    x[2] -= 250.0
    x[3, 7] = float("nan")
    x[4, 9] = float("inf")
    x[13] += 150.0
    x = x.to(dtype)
    up = torch.full((n,), 0.9).to(dtype)  # what the loss (in the logits' dtype) receives
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref, x64, up.double())
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, reduction="none", inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, xr, up)
    atol, rtol = (ATOL, RTOL) if dtype == torch.float32 else (1e-6, 2 * 2**-8)
    # the loss is returned in the logits' dtype: one bf16 rounding
    torch.testing.assert_close(loss.double(), ref.detach(), atol=ATOL, equal_nan=True,
                               rtol=RTOL if dtype == torch.float32 else 2**-8)
    torch.testing.assert_close(grad.double(), ref_grad, atol=atol, rtol=rtol, equal_nan=True)


# ------------------------------------------------------------------------------------------
# Found in review: each test failed before its fix


def test_create_graph_on_a_second_backward_raises(cache):
    """A second backward (retain_graph) with create_graph=True would return a gradient
    without the cross-entropy's Hessian: it must raise, as the first does."""
    x, t = logits(4, 300, seed=14)
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, reduction="sum")
    torch.autograd.grad(loss, xr, retain_graph=True)
    (g,) = torch.autograd.grad(loss, xr, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((g ** 2).sum(), xr)


@pytest.mark.parametrize("inplace", [False, True])
def test_ignored_rows_take_no_infinite_upstream(cache, inplace):
    """sqrt of a per-row loss has an infinite derivative at an ignored row's loss 0; its
    gradient is still 0 there, as in PyTorch (0 * inf would be NaN)."""
    x, _ = logits(4, 1000, seed=15)
    t = torch.tensor([1, -100, 2, 3])
    xr = x.clone().requires_grad_()
    fusedce.cross_entropy(xr, t, reduction="none", inplace_backward=inplace).sqrt().sum().backward()
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t, reduction="none").sqrt().sum().backward()
    assert torch.equal(xr.grad[1], torch.zeros(1000))
    torch.testing.assert_close(xr.grad.double(), x64.grad, atol=ATOL, rtol=RTOL)


def test_shared_memory_buffer_is_never_reused(cache):
    """A gradient moved to shared memory (as torch.multiprocessing does to send it) may be
    mapped by another process, which no reference count here shows: never reused."""
    (x1, t1), (x2, t2) = logits(4, 300, seed=16), logits(4, 300, seed=17)
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
    x, t = logits(8, 1000, seed=18)
    xr = x.clone().requires_grad_()
    fusedce.cross_entropy(xr, t).backward()
    xr.grad.untyped_storage().resize_(0)
    xr.grad = None
    gc.collect()
    g = _step(x, t)  # raised "out of bounds for storage of size 0" before
    _, ref_grad = reference(x, t, torch.tensor(1.0))
    torch.testing.assert_close(g.double(), ref_grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("big", [85.0, 88.7])
def test_large_logit_keeps_gradient_precision(big):
    """A row whose sum of exp(x) is huge (a logit near 88) under a small gradient scale
    (mean over 2**18 rows): gA / sum would fall below fp32's normal range and round the
    gradient; such rows are redone with the max shift."""
    n, c = 1 << 18, 8
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(n, c, generator=gen)
    x[0, 5] = big
    t = torch.randint(0, c, (n,), generator=gen)
    t[0] = 7
    xr = x.clone().requires_grad_()
    fusedce.cross_entropy(xr, t).backward()
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t).backward()
    # (entries below fp32's normal range, 1.2e-38, have no relative precision to keep)
    torch.testing.assert_close(xr.grad[0].double(), x64.grad[0], atol=1.2e-38, rtol=RTOL)


@pytest.mark.parametrize("dtype, inplace", [(torch.float32, False), (torch.float32, True),
                                           (torch.bfloat16, False), (torch.bfloat16, True)])
def test_tiny_negative_scale_under_a_large_sum_is_redone(dtype, inplace):
    """A row whose sum of exp(x) is large but finite (a logit of 66: 4.6e28, inside the
    unshifted pass's (1e-30, 1e30)) and whose target's class weight is -1e-16: the scale
    gA / sum, -2e-45, is subnormal with two significant bits, so the row is redone with
    the shift, also for a negative scale (missed before: the check compared the scale
    against (0, 1.2e-38)) and in bf16 in place (checked per chunk, before the write-back)."""
    x, t = logits(4, 50, seed=23)
    x[0, 5] = 66.0
    t[:] = torch.tensor([7, 1, 2, 3])
    weight = torch.ones(50)
    weight[7] = -1e-16
    x = x.to(dtype)
    up = torch.tensor(0.7).to(dtype)
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, weight=weight.double(), reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, x64, up.double())
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, weight=weight, reduction="sum",
                                 inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, xr, up)
    rtol = RTOL if dtype == torch.float32 else 2 * 2**-8
    # (entries whose true value is below fp32's normal range have no precision to keep)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1.2e-38, rtol=rtol)


@pytest.fixture(params=[1, 2], ids=["inline", "2workers"])
def workers(request, monkeypatch):
    """Inline (the loops as Python), or 2 workers on 2-row chunks (the scripted loops)."""
    if request.param > 1:
        monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
        monkeypatch.setattr(pool, "max_workers", lambda: request.param)
        monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 16)  # 2 rows of 8
    return request.param


@pytest.mark.parametrize("dtype, inplace", [(torch.float32, False), (torch.float32, True),
                                           (torch.bfloat16, False), (torch.bfloat16, True)])
def test_rows_of_very_negative_logits_keep_gradient_precision(dtype, inplace, workers):
    """All logits far below 0 (max -60): sum(exp(x)) = 8.8e-27 is inside the unshifted
    pass's range, but exp(x) of the logits below -87.3 is subnormal or 0 while their
    gradient, gA exp(x) / sum, is a normal number. Such a chunk fails the scale check
    (|gA| / sum > 1) and is redone, and the chunks after it take the target logit as their
    shift (found in review: bf16 in place gave 0 for the -106 and -110 entries, 1e-20 and
    2e-22 in float64; the default mode gave the same before). One row has its target at
    the max, one far below it (loss 35), one is ordinary; each pattern 3 times."""
    x = torch.tensor([[-60.0, -95.0, -100.0, -103.0, -106.0, -110.0, -80.0, -70.0],
                      [-60.0, -95.0, -100.0, -103.0, -106.0, -110.0, -80.0, -70.0],
                      [1.0, 2.0, 0.5, -1.0, 0.0, 3.0, -2.0, 1.5]] * 3).to(dtype)
    t = torch.tensor([0, 1, 5] * 3)
    x64 = x.double().requires_grad_()
    (ref,) = torch.autograd.grad(F.cross_entropy(x64, t, reduction="sum"), x64)
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, reduction="sum", inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, xr)
    rtol = RTOL if dtype == torch.float32 else 2 * 2**-8
    other = torch.ones_like(ref, dtype=torch.bool)
    other[torch.arange(len(t)), t] = False
    # off the target each entry to its relative precision; at the target p_t - 1 cancels
    # (p_t = 1 - 4.5e-5 at logits near -60, where fp32's spacing is 4e-6): absolute
    torch.testing.assert_close(grad.double()[other], ref[other], atol=1.2e-38, rtol=rtol)
    torch.testing.assert_close(grad.double()[~other], ref[~other], atol=ATOL, rtol=rtol)


def test_loss_alone_with_denormals_flushed():
    """The loss alone takes sum(exp(x)) unshifted. With denormals flushed
    (``torch.set_flush_denormal``), every exp(x) below x = -87.3 is 0: a sum just above
    1e-30 missed 50,256 terms of 1e-38 each, and the loss came out 51% low (found in
    review). Sums below V 2**-102 (1e-26 at V = 50,257) are redone with the max."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        x = torch.full((2, 50_257), -87.5)
        x[:, 0] = -69.0
        t = torch.tensor([0, 0])
        with torch.no_grad():
            loss = fusedce.cross_entropy(x, t, reduction="none")
    finally:
        torch.set_flush_denormal(False)
    ref = F.cross_entropy(x.double(), t, reduction="none")  # 4.64e-4
    # a few units in the last place of lse, -69 (7.6e-6 each), as PyTorch's fp32 loss
    torch.testing.assert_close(loss.double(), ref, atol=3e-5, rtol=0)


def test_backward_unshifted_variant_keeps_precision(monkeypatch):
    """``UNSHIFTED_EXP_BWD`` (off by default) computes gA exp(-lse) exp(x) for rows with
    -15 < lse < 80; with lse = -14 and gA = 1 the scale is 1.2e6, and exp(x) below -87.3,
    subnormal, lost the precision of a normal gradient (found in review). Rows whose scale
    exceeds 1 take the shifted form."""
    monkeypatch.setattr(cpu_rows, "UNSHIFTED_EXP_BWD", True)
    x = torch.tensor([[-14.0, -95.0, -98.0, -101.0, -30.0, -20.0, -16.0, -50.0],
                      [1.0, 2.0, 0.5, -1.0, 0.0, 3.0, -2.0, 1.5]])
    t = torch.tensor([0, 5])
    up = torch.tensor([1.0, 0.5])
    _, lse = cpu.ce_fwd(x, t)
    dx = cpu.ce_bwd(x, t, lse, up)
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t, reduction="none").mul(up.double()).sum().backward()
    other = torch.ones_like(x, dtype=torch.bool)
    other[torch.arange(2), t] = False
    # the entries at -95..-101 are 6e-36..1.4e-38, all normal: each to fp32's precision
    torch.testing.assert_close(dx.double()[other], x64.grad[other], atol=1e-44, rtol=RTOL)
    torch.testing.assert_close(dx.double()[~other], x64.grad[~other], atol=ATOL, rtol=RTOL)


def test_backward_unshifted_variant_keeps_a_tiny_scale_normal(monkeypatch):
    """The same variant with lse = 79.2 and an upstream gradient of 1e-8: the scale
    |gA| exp(-lse) = 4e-43 is subnormal and rounds every entry (3e-3 relative, found in the
    third review); such rows take the shifted form."""
    monkeypatch.setattr(cpu_rows, "UNSHIFTED_EXP_BWD", True)
    x = torch.tensor([[78.0, 77.5, 76.0, 69.0, 59.0, 74.0, 78.5, 49.0]])
    t = torch.tensor([2])
    up = torch.tensor([1e-8])
    _, lse = cpu.ce_fwd(x, t)
    assert -15 < lse.item() < 80
    dx = cpu.ce_bwd(x, t, lse, up)
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t, reduction="none").mul(up.double()).sum().backward()
    torch.testing.assert_close(dx.double(), x64.grad, atol=1e-44, rtol=RTOL)


def test_checkpointed_loss_keeps_no_gradient_buffer(cache):
    """Under non-reentrant checkpointing (saved-tensor hooks) the gradient is not computed
    in the forward: it would be kept outside the hooks and computed twice."""
    from torch.utils.checkpoint import checkpoint

    x, t = logits(6, 300, seed=20)
    xr = x.clone().requires_grad_()
    loss = checkpoint(lambda z: fusedce.cross_entropy(z * 1.0, t), xr, use_reentrant=False)
    assert cache.entries == []
    loss.backward()
    _, ref_grad = reference(x, t, torch.tensor(1.0))
    torch.testing.assert_close(xr.grad.double(), ref_grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("inplace", [False, True])
def test_uint8_target_156_is_not_ignored(cache, inplace):
    """uint8 targets compared with ignore_index=-100 in their own dtype would match class
    156 (-100 wraps to 156): that row must get its upstream gradient, not be skipped."""
    x, _ = logits(4, 300, seed=21)
    t = torch.tensor([156, 3, 156, 7], dtype=torch.uint8)
    up = torch.tensor([0.5, 2.0, -1.5, 3.0])
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, reduction="none", inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, xr, up)
    _, ref_grad = reference(x, t.long(), up, reduction="none")
    torch.testing.assert_close(grad.double(), ref_grad, atol=ATOL, rtol=RTOL)


def test_only_a_fresh_buffer_is_faulted_in(cache, monkeypatch):
    """MADV_POPULATE_WRITE is for a buffer new from the allocator: on a reused one it only
    walks resident pages (5-18 ms at 2,048 x 50,257), so it is not called."""
    calls = []
    monkeypatch.setattr(buffers, "PAGE_ADVICE", "populate")
    monkeypatch.setattr(buffers, "populate_rows", lambda *a: calls.append(a[1:]))
    x, t = logits(4, 300, seed=22)
    _step(x, t)
    assert calls == [(0, 4)]  # fresh: faulted in (here by the one inline worker)
    _step(x, t)
    assert calls == [(0, 4)]  # reused: not again
