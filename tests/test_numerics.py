"""Targeted numerical cases against F.cross_entropy on float64 copies: logits shifted far
from 0, uniform and confident rows, masked (-inf), NaN and +inf logits, targets at both ends
of the vocabulary, ignored rows, and bitwise determinism.

Both implementations run each case: the Triton kernels (under TRITON_INTERPRET=1 on a
machine without a GPU) and the PyTorch implementation; fresh buffers start as NaN, so a
missed store shows. The exceptions are the rows the CPU implementation takes an unshifted
exp(x) for and must redo with the max shift when that fails (overflow, underflow, scales
outside fp32's normal range, flushed denormals): those run on the CPU path, the default for
CPU tensors. The drop-in contract over every option, dtype and shape is in test_dropin.py.
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ATOL,
    BACKENDS,
    DTYPES,
    RTOL,
    assert_close,
    fused,
    logits,
    logits_and_targets,
    make_inputs,
    probabilities,
    reference,
    run_both,
)

import fusedce
from fusedce.cpu import chunks, pool

# a missed store shows as NaN; fusedce's own implementation for small calls too (conftest)
pytestmark = pytest.mark.usefixtures("nan_filled_outputs", "own_path")


# ------------------------------------------------------------------------- shifted logits

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_translation_invariance(backend, dtype, atol, rtol):
    """Logits shifted by +1000 give the same loss: exp() must never see unshifted values."""
    x, target, _ = make_inputs(3, 50_257, torch.float32, seed=6)
    x = x.to(dtype)
    shifted = (x.double() + 1000).to(dtype)
    ref_loss, ref_grad, upstream = reference(shifted, target)
    loss, grad = fused(shifted, target, upstream, backend=backend)
    assert torch.isfinite(loss).all()
    # at 1000 a bf16 logit is quantised to steps of 4: compare against the rounded input
    assert_close(loss, ref_loss, atol, rtol, "loss")
    assert_close(grad, ref_grad, atol, rtol, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_probability_targets_shifted_logits(backend):
    """Logits shifted by +1000: the sums are kept relative to the running max, so there
    is no cancellation (translation invariance)."""
    x = logits((3, 300))
    y = probabilities((3, 300))
    base = fusedce.cross_entropy(x, y, reduction="none", backend=backend)
    shifted = fusedce.cross_entropy(x + 1000, y, reduction="none", backend=backend)
    torch.testing.assert_close(shifted, base, atol=2e-3, rtol=0)  # lse's own ulp at 1000


# ------------------------------------------------------------- uniform and confident rows

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [7, 50_257])
def test_all_equal_logits(backend, c):
    """Uniform logits: the loss is log C exactly, whatever the target."""
    x = torch.full((3, c), 2.5)
    target = torch.tensor([0, c // 2, c - 1])
    loss = fusedce.cross_entropy(x, target, backend=backend, reduction="none")
    torch.testing.assert_close(loss, torch.full((3,), math.log(c)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_bf16_prediction_keeps_gradient_precision(backend):
    """softmax 0.999 at the target in bf16: the target's gradient p - 1 = -0.001 must keep
    bf16's relative precision (it would be lost by rounding p to bf16 before subtracting)."""
    c = 50_257
    x = torch.zeros(2, c)
    x[:, 7] = math.log(0.999 * (c - 1) / 0.001)  # softmax(x)[7] = 0.999
    x = x.to(torch.bfloat16)
    target = torch.tensor([7, 7])
    upstream = torch.tensor(1.0).double()
    ref_loss, ref_grad, _ = reference(x, target, upstream=upstream, reduction="sum")
    loss, grad = fused(x, target, upstream, backend=backend, reduction="sum")
    g_t, r_t = grad[:, 7].double(), ref_grad[:, 7]
    assert (r_t.abs() > 5e-4).all() and (r_t.abs() < 2e-3).all()  # p(target) ~ 0.999
    torch.testing.assert_close(g_t, r_t, rtol=2**-7, atol=0)


# ------------------------------------------------------------------------- special values

@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary(backend):
    """-inf logits (a masked vocabulary, here a whole first block) give finite results."""
    x, target, _ = make_inputs(2, 9000, torch.float32, seed=7)
    x[:, :8192] = float("-inf")
    target[:] = torch.tensor([8500, 8999])
    ref_loss, ref_grad, upstream = reference(x, target)
    loss, grad = fused(x, target, upstream, backend=backend)
    assert torch.isfinite(loss).all()
    assert_close(loss, ref_loss, 2e-5, 2e-5, "loss")
    assert_close(grad, ref_grad, 2e-5, 2e-5, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fill", ["finfo.min", -1e30], ids=["finfo-min", "-1e30"])
@pytest.mark.parametrize("n_cols", [300, 50_257])
def test_masked_padding_row_ignored(backend, dtype, fill, n_cols):
    """A padding row masked whole (every logit finfo.min, as ``masked_fill`` with
    ``torch.finfo(dtype).min`` makes) and ignored: loss and gradient 0 as PyTorch's, the
    others unchanged. The kernels' forward took x * log2(e) - m * log2(e), both -inf beyond
    |x| = 2.4e38: NaN, and 0 * NaN in the ignored row's gradient, which an optimizer step
    spreads to every parameter."""
    x, target, _ = make_inputs(3, n_cols, dtype, seed=11)
    x[1] = torch.finfo(dtype).min if fill == "finfo.min" else fill
    target[1] = -100
    for reduction in ("none", "mean"):
        ref_loss, ref_grad, upstream = reference(x, target, reduction=reduction)
        loss, grad = fused(x, target, upstream, reduction=reduction, backend=backend)
        atol, rtol = (2e-5, 2e-5) if dtype == torch.float32 else (1e-6, 2**-7 + 1e-5)
        assert_close(loss, ref_loss, atol, rtol, "loss")
        assert_close(grad, ref_grad, atol, rtol, "grad")
        assert not grad[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(backend):
    """A NaN or +inf logit makes that row's loss NaN, as PyTorch's does; others stay finite."""
    x, target, _ = make_inputs(3, 100, torch.float32, seed=8)
    x[0, 5] = float("nan")
    x[1, 9] = float("inf")
    ref = F.cross_entropy(x.double(), target, reduction="none")
    loss = fusedce.cross_entropy(x, target, reduction="none", backend=backend)
    assert torch.isnan(ref[:2]).all() and torch.isnan(loss[:2]).all()
    assert_close(loss[2], ref[2], 2e-5, 2e-5, "finite row")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf_propagate_kdim_and_soft(backend):
    """NaN / +inf logits give NaN rows exactly where PyTorch's are NaN; -inf logits at
    non-target classes are harmless, as in PyTorch."""
    x = logits((2, 4, 3))
    x[0, 1, 0] = float("nan")
    x[1, 2, 1] = float("inf")
    x[1, 0, 2] = float("-inf")
    target = torch.tensor([[0, 1, 2], [3, 2, 1]])
    ref = F.cross_entropy(x.double(), target, reduction="none")
    loss = fusedce.cross_entropy(x, target, reduction="none", backend=backend)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref))
    torch.testing.assert_close(loss.double(), ref, equal_nan=True, atol=2e-5, rtol=2e-5)
    y = probabilities((2, 4, 3))
    ref = F.cross_entropy(x.double(), y.double(), reduction="none")
    loss = fusedce.cross_entropy(x, y, reduction="none", backend=backend)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref))
    torch.testing.assert_close(loss.double(), ref, equal_nan=True, atol=2e-5, rtol=2e-5)


# -------------------------------------------- targets: both ends of the row, ignored rows

@pytest.mark.parametrize("backend", BACKENDS)
def test_first_and_last_class_targets(backend):
    """Targets 0 and C-1: the gather must reach both ends of the row (and the last block)."""
    x, _, _ = make_inputs(4, 50_257, torch.float32, seed=5)
    target = torch.tensor([0, 50_256, 0, 50_256])
    ref_loss, ref_grad, upstream = reference(x, target, reduction="none")
    loss, grad = fused(x, target, upstream, reduction="none", backend=backend)
    assert_close(loss, ref_loss, 2e-5, 2e-5, "loss")
    assert_close(grad, ref_grad, 2e-5, 2e-5, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(backend, reduction):
    """All targets ignored: the mean is 0/0 = NaN as in PyTorch, sum 0, gradient 0."""
    x, target, _ = make_inputs(3, 50, torch.float32)
    target[:] = -100
    ref_loss, ref_grad, upstream = reference(x, target, reduction=reduction)
    loss, grad = fused(x, target, upstream, reduction=reduction, backend=backend)
    if reduction == "mean":
        assert torch.isnan(ref_loss) and torch.isnan(loss)
    assert_close(loss, ref_loss, 0, 0, "loss")
    assert_close(grad, ref_grad, 0, 0, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weight"])
def test_uint8_target_156_is_not_ignored(backend, weighted):
    # -100 wraps to 156 in uint8: class 156 of 200 must still count in the mean
    x = torch.randn(3, 200)
    t = torch.tensor([156, 1, 2], dtype=torch.uint8)
    w = torch.rand(200) + 0.5 if weighted else None
    out = fusedce.cross_entropy(x, t, weight=w, backend=backend)
    ref = F.cross_entropy(x.double(), t, weight=None if w is None else w.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# ----------------------- extreme rows beside ordinary ones (the CPU path's unshifted exp)

@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1},
                                     {"weight": True, "ignore_index": 3}])
def test_rows_where_the_unshifted_exp_fails_are_redone(options):
    """Rows whose sum(exp(x)) overflows (logits near +200) or underflows (all logits below
    -150) beside ordinary rows, in both worker threads' ranges (24 x 50,257 logits run on
    two workers): each is redone with the max shift and matches float64."""
    n, c = 24, 50_257
    x, t = logits_and_targets(n, c, seed=10)
    x[2] += 200.0
    x[5] -= 250.0
    x[17, 100] = 120.0  # a single overflowing logit
    x[20] -= 150.0
    t[3] = 3
    kwargs = dict(options)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(c, generator=torch.Generator().manual_seed(11)) + 0.5
    up = torch.tensor(0.7)
    ref_loss, ref_grad, _ = reference(x, t, up, **{k: (v.double() if torch.is_tensor(v) else v)
                                                  for k, v in kwargs.items()})
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, **kwargs)
    (grad,) = torch.autograd.grad(loss, xr, up)
    torch.testing.assert_close(loss.double(), ref_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(grad.double(), ref_grad, atol=ATOL, rtol=RTOL)
    assert torch.equal(xr.detach(), x)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_rows_beside_ordinary_ones(dtype, inplace):
    """Overflowing, underflowing, NaN and +inf rows among ordinary ones in the same chunks,
    in both modes and dtypes (bf16 in place takes the unshifted exp through its fp32
    scratch, checked chunk by chunk before the chunk is written back): the ordinary rows
    match float64, the others give what PyTorch gives (NaN for NaN and +inf)."""
    n, c = 24, 50_257
    x, t = logits_and_targets(n, c, seed=13)
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
    x, t = logits_and_targets(4, 50, seed=23)
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


# ---------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """Bitwise-identical loss and gradient on every run (no float atomics anywhere)."""
    x, target, gen = make_inputs(8, 2000, torch.bfloat16, seed=10)
    w = torch.rand(2000, generator=gen)
    runs = []
    for _ in range(3):
        xx = x.clone().requires_grad_()
        loss = fusedce.cross_entropy(xx, target, weight=w, label_smoothing=0.1, backend=backend)
        loss.backward()
        runs.append((loss.detach(), xx.grad))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


# ------------------------------------------------------------- whole rows far from zero
# Logits are translation-invariant, and a confident model or a logit scale puts whole rows
# below -88, where fp32's exp underflows. The strided kernels' online max started its
# reference at 0 and rescaled by exp(0 - max): inf for a row below -88, and 0 * inf = NaN.


def _far_rows(layout, shift, dtype):
    gen = torch.Generator().manual_seed(7)
    if layout == "strided-view":  # classes strided: x[:, :, k] of an (N, C, L) tensor
        x = (torch.randn(4, 7, 3, generator=gen) * 2 + shift).to(dtype)[:, :, 2]
        return x, torch.randint(0, 7, (4,), generator=gen)
    if layout == "NCd":
        x = (torch.randn(2, 5, 4, generator=gen) * 2 + shift).to(dtype)
        return x, torch.randint(0, 5, (2, 4), generator=gen)
    x = (torch.randn(3, 7, generator=gen) * 2 + shift).to(dtype)
    if layout == "probabilities":
        return x, torch.softmax(torch.randn(3, 7, generator=gen), 1).to(dtype)
    return x, torch.randint(0, 7, (3,), generator=gen)  # contiguous rows: the control


@pytest.mark.parametrize("shift", [-200.0, -92.0, 200.0])
@pytest.mark.parametrize("layout", ["strided-view", "NCd", "probabilities", "rows"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_rows_far_from_zero(dtype, atol, rtol, backend, layout, shift):
    x, target = _far_rows(layout, shift, dtype)
    for reduction in ("none", "mean"):
        run_both(x, target, atol=atol, rtol=rtol, backend=backend, reduction=reduction,
                 check_target_grad=target.is_floating_point())


# Further out, the lse itself is the trouble: at |x| ~ 1e4 an fp32 lse keeps log-sum to 5e-4,
# at 1e8 not at all (ulp 8), and every gradient rebuilt from it (p = exp(x - lse): the
# kernels' backward, the CPU path under saved-tensor hooks or on a second backward, the
# strided and probability-target paths) was off, all of it at 1e8 (a row of equal logits
# got p = 1 for every class). The lse is saved in float64 now, and the losses are taken as
# (max - x_t) + log-sum; fp32 holds such rows exactly only at the spacing of its values
# there (8 at 1e8), which is what the float64 reference sees too.
_FAR = [1e4, -3e6, 1e8]


def _very_far(layout, shift, dtype):
    gen = torch.Generator().manual_seed(11)
    if layout == "NCd":
        x = torch.randn(2, 6, 3, generator=gen) * 6 + shift
        return x.to(dtype), torch.randint(0, 6, (2, 3), generator=gen)
    x = torch.randn(4, 9, generator=gen) * 6 + shift
    x[0] = shift  # every class equal: p = 1/9 each
    if layout == "probabilities":
        return x.to(dtype), torch.softmax(torch.randn(4, 9, generator=gen), 1).to(dtype)
    return x.to(dtype), torch.randint(0, 9, (4,), generator=gen)


@pytest.mark.parametrize("shift", _FAR)
@pytest.mark.parametrize("route", ["default", "saved-tensor-hooks"])
@pytest.mark.parametrize("layout", ["rows", "NCd", "probabilities"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_very_far_from_zero_every_route(backend, layout, route, shift):
    """Loss and gradient against float64 on every route a gradient takes: on the CPU path
    the default one computes it in the forward, under saved-tensor hooks it is rebuilt from
    the saved lse in the backward (as the kernels always do); with label smoothing and
    class weights, whose sums ride on log-sum too."""
    x, target = _very_far(layout, shift, torch.float32)
    weight = torch.linspace(0.5, 2.0, x.shape[1])
    hooks = (torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
             if route == "saved-tensor-hooks" else contextlib.nullcontext())
    with hooks:
        for options in ({}, dict(label_smoothing=0.2, weight=weight)):
            run_both(x, target, backend=backend, reduction="none",
                     check_target_grad=target.is_floating_point(), **options)


@pytest.mark.parametrize("shift", _FAR)
def test_rows_very_far_from_zero_second_backward_and_aux(shift):
    """The CPU path's default route, backward a second time through a retained graph (the
    gradient rebuilt from the saved lse), and the lse and z-loss it returns."""
    x, target = _very_far("rows", shift, torch.float32)
    x64 = x.double().requires_grad_()
    want_lse = torch.logsumexp(x64, 1)
    want = F.cross_entropy(x64, target, reduction="sum") + 1e-3 * (want_lse ** 2).sum()
    (want_grad,) = torch.autograd.grad(want, x64)
    xf = x.clone().requires_grad_()
    out = fusedce.cross_entropy(xf, target, reduction="sum", backend="torch",
                                lse_square_scale=1e-3, return_aux=True)
    first = torch.autograd.grad(out.loss, xf, retain_graph=True)[0]
    second = torch.autograd.grad(out.loss, xf)[0]
    assert_close(out.lse, want_lse.detach(), ATOL, RTOL, "lse")
    assert_close(out.loss, want.detach(), ATOL, RTOL, "loss with its z-loss")
    for grad in (first, second):
        torch.testing.assert_close(grad.double(), want_grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smoothing_gradient_of_a_row_without_a_target_term(backend):
    """Class weights summing to 0 and a target of weight 0: the row's ``g A`` is 0 but its
    smoothing term ``g eps / C w`` is not (the CPU backward zeroed such a row whole)."""
    weight = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.0])
    x = logits((3, 5), seed=4)
    target = torch.tensor([4, 0, 2])
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        run_both(x, target, backend=backend, reduction="none", weight=weight,
                 label_smoothing=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", [[-92.0, -98.5, -99.0], [-200.0, -201.0, -202.0]],
                         ids=["below-88", "near-200"])
def test_strided_row_below_exp_underflow_is_finite(backend, row):
    """The reported cases: a strided row (x[:, :, 2] of a (1, 3, 3) tensor), target 2, gave
    NaN on the kernels; PyTorch's number on both backends."""
    x3 = torch.zeros(1, 3, 3)
    x3[0, :, 2] = torch.tensor(row)
    x = x3[:, :, 2]
    got = fusedce.cross_entropy(x, torch.tensor([2]), reduction="none", backend=backend)
    want = F.cross_entropy(x.double(), torch.tensor([2]), reduction="none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spread", [1.0, 4.0, 10.0, 30.0])
def test_cpu_fp32_at_least_as_precise_as_pytorch(monkeypatch, spread):
    """On GPT-2's vocabulary the CPU path's fp32 loss and gradient are as close to float64
    as F.cross_entropy's own on the same logits, within two fp32 ulps (relative errors;
    the worker loops, scripted). A cheaper first pass must not go below this."""
    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    gen = torch.Generator().manual_seed(int(spread))
    n, c = 24, 50_257
    x = torch.randn(n, c, generator=gen) * spread
    t = torch.randint(0, c, (n,), generator=gen)
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, reduction="none")
    ref.sum().backward()
    ref = ref.detach()
    big = x64.grad.abs() > 1e-6  # relative errors where the gradient is not negligible

    def errors(fn):
        xr = x.clone().requires_grad_()
        loss = fn(xr, t, reduction="none")
        loss.sum().backward()
        rel = ((xr.grad.double() - x64.grad) / x64.grad)[big].abs().max()
        return ((loss.double() - ref) / ref).abs().max().item(), rel.item()

    ours = errors(fusedce.cross_entropy)
    theirs = errors(F.cross_entropy)
    ulp2 = 2 * 2.0 ** -23
    assert ours[0] <= 1.5 * theirs[0] + ulp2, (ours, theirs)
    assert ours[1] <= 1.5 * theirs[1] + ulp2, (ours, theirs)


@pytest.mark.parametrize("spread", [0.0, 0.01, 0.3, 1.0, 2.0])
def test_cpu_fp32_confident_rows_keep_loss_precision(monkeypatch, spread):
    """Confident rows: the target 10, 17.75 and 20 above the max of 50,256 others ~ N(0,
    spread) (p_t up to 1 - 1e-7): the thousands of terms of 2e-8 beside the max's 1 must
    all count in the sum. An fp32 sum that adds them one lane at a time onto the 1 drops
    them (PyTorch's CPU log_softmax and softmax do: their loss for every other logit
    equal and p_t = 0.99902 is 0.000921 for 0.000982, 6% off, which is why the CPU path
    does not take PyTorch's softmax as its first pass, docs/benchmarks.md). The loss and
    the target's gradient ``p_t - 1`` stay within 8 ulps of 1 (9.5e-7) absolute, the
    rounding of a cascaded fp32 sum near 1; PyTorch's own misses it by up to 65x."""
    monkeypatch.setattr(pool, "PARALLEL_MIN_ELEMENTS", 1)
    torch.manual_seed(0)
    c = 50_257
    x = torch.randn(3, c) * spread
    x[:, 7] = x.amax(1) + torch.tensor([10.0, 17.75, 20.0])
    t = torch.full((3,), 7)
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, reduction="none")
    ref.sum().backward()
    xr = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xr, t, reduction="none", backend="torch")
    loss.sum().backward()
    ulps8 = 8 * 2.0 ** -23
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=0, atol=ulps8)
    torch.testing.assert_close(xr.grad.double(), x64.grad, rtol=1e-5, atol=ulps8)
