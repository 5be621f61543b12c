"""``inplace_backward=True``: the gradient is written over the logits (both implementations).

What must hold: the same loss and gradient as PyTorch, with the gradient in the logits'
storage; no effect where the mode does not apply (strided classes, class probabilities).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    assert_close,
    indices,
    logits,
    make_inputs,
    probabilities,
    reference,
    run_both,
)

import fusedce

pytestmark = pytest.mark.usefixtures("nan_filled_outputs")  # a missed store shows as NaN


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["default", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inplace_backward(backend, inplace, reduction):
    """In-place mode gives the same loss and gradient, and the gradient lands in the logits'
    storage; reduction='none' with a per-row upstream gradient stays correct."""
    x, target, gen = make_inputs(5, 50_257, torch.float32, seed=1)
    target[2] = -100
    w = torch.rand(50_257, generator=gen) + 0.5
    ref_loss, ref_grad, upstream = reference(x, target, reduction=reduction, weight=w,
                                             label_smoothing=0.05)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as a model's head produces
    loss = fusedce.cross_entropy(logits, target, weight=w, reduction=reduction,
                                 label_smoothing=0.05, backend=backend,
                                 inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, leaf, upstream.float())
    assert_close(loss, ref_loss, 2e-5, 2e-5, "loss")
    assert_close(grad, ref_grad, 2e-5, 2e-5, "grad")
    if inplace:
        assert_close(logits.detach(), ref_grad, 2e-5, 2e-5, "logits overwritten by the gradient")
    else:
        assert torch.equal(logits.detach(), x), "default mode must not modify the logits"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_upstream_one_leaves_gradient_as_written(backend):
    """With an upstream gradient of exactly 1 the in-place backward has nothing to do."""
    x, target, _ = make_inputs(4, 300, torch.float32, seed=2)
    ref_loss, ref_grad, _ = reference(x, target, upstream=torch.tensor(1.0, dtype=torch.float64))
    logits = x.clone().requires_grad_()
    fusedce.cross_entropy(logits, target, backend=backend, inplace_backward=True).backward()
    assert_close(logits.grad, ref_grad, 2e-6, 2e-5, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_kdim_and_probabilities_still_correct(backend):
    """inplace_backward has no effect where it does not apply (strided classes,
    probabilities), and the results are unchanged; on (N, C) it overwrites the logits."""
    run_both(logits((2, 5, 3)), indices((2, 3), 5), inplace_backward=True, backend=backend)
    run_both(logits((3, 5)), probabilities((3, 5)), inplace_backward=True, backend=backend)
    x = logits((3, 7))
    xr = x.clone().requires_grad_()
    xv = xr * 1.0  # a non-leaf the loss may destroy
    loss = fusedce.cross_entropy(xv, indices((3,), 7), inplace_backward=True, backend=backend)
    loss.backward()
    assert not torch.equal(xv.detach(), x)  # the logits were overwritten by the gradient
    ref = x.clone().requires_grad_()
    F.cross_entropy(ref, indices((3,), 7)).backward()
    torch.testing.assert_close(xr.grad, ref.grad)
