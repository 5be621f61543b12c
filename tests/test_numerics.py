"""Targeted numerical cases against F.cross_entropy on float64 copies: logits shifted far
from 0, uniform and confident rows, masked (-inf), NaN and +inf logits, targets at both ends
of the vocabulary, ignored rows, and bitwise determinism.

Both implementations run each case: the Triton kernels (under TRITON_INTERPRET=1 on a
machine without a GPU) and the PyTorch implementation; fresh buffers start as NaN, so a
missed store shows. The drop-in contract over every option, dtype and shape is in
test_dropin.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    DTYPES,
    assert_close,
    fused,
    logits,
    make_inputs,
    probabilities,
    reference,
)

import fusedce

pytestmark = pytest.mark.usefixtures("nan_filled_outputs")  # a missed store shows as NaN


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
