"""``inplace_backward=True``: the gradient is written over the logits (both implementations).

What must hold: the same loss and gradient as PyTorch, with the gradient in the logits' own
storage (handed to autograd without a copy, nothing else saved); no effect where the mode
does not apply (strided classes, class probabilities, expanded rows that share memory, fp16
logits whose loss scale comes later, no gradient to take); an error, not a wrong gradient,
where the overwritten logits are needed again (saved by another node, a second backward).
"""

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, assert_close, indices, logits, probabilities, reference

import fusedce

# a missed store shows as NaN; fusedce's own implementation for small calls too (conftest)
pytestmark = pytest.mark.usefixtures("nan_filled_outputs", "own_path")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["default", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inplace_backward(backend, inplace, reduction):
    """In-place mode gives the same loss and gradient, and the gradient lands in the logits'
    storage; reduction='none' with a per-row upstream gradient stays correct."""
    x, target, gen = helpers.make_inputs(5, 50_257, torch.float32, seed=1)
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
    x, target, _ = helpers.make_inputs(4, 300, torch.float32, seed=2)
    ref_loss, ref_grad, _ = reference(x, target, upstream=torch.tensor(1.0, dtype=torch.float64))
    logits = x.clone().requires_grad_()
    fusedce.cross_entropy(logits, target, backend=backend, inplace_backward=True).backward()
    assert_close(logits.grad, ref_grad, 2e-6, 2e-5, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_kdim_and_probabilities_still_correct(backend):
    """inplace_backward has no effect where it does not apply (strided classes,
    probabilities), and the results are unchanged; on (N, C) it overwrites the logits."""
    for x, t in [(logits((2, 5, 3)), indices((2, 3), 5)), (logits((3, 5)), probabilities((3, 5)))]:
        before = x.clone()  # run_both's loss reads x's own storage: nothing may overwrite it
        helpers.run_both(x, t, inplace_backward=True, backend=backend)
        assert torch.equal(x, before)
    x = logits((3, 7))
    xr = x.clone().requires_grad_()
    xv = xr * 1.0  # a non-leaf the loss may destroy
    loss = fusedce.cross_entropy(xv, indices((3,), 7), inplace_backward=True, backend=backend)
    loss.backward()
    assert not torch.equal(xv.detach(), x)  # the logits were overwritten by the gradient
    ref = x.clone().requires_grad_()
    F.cross_entropy(ref, indices((3,), 7)).backward()
    torch.testing.assert_close(xr.grad, ref.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_requires_grad"])
def test_inplace_without_grad_keeps_logits(backend, mode):
    x = torch.randn(4, 7, requires_grad=mode != "no_requires_grad")
    logits = x * 1
    before = logits.detach().clone()
    t = torch.tensor([0, 1, 2, 3])
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(
        mode, torch.enable_grad)
    with ctx():
        if mode == "inference_mode":
            logits = logits.detach().clone()
        loss = fusedce.cross_entropy(logits, t, backend=backend, inplace_backward=True)
    assert torch.equal(logits.detach(), before)
    torch.testing.assert_close(loss.double(), reference(before, t, torch.tensor(1.0))[0],
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_expanded_logits_fall_back(backend):
    # expanded rows share memory: writing one row's gradient would corrupt the others
    base = torch.randn(1, 7, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    ref_loss, _, _ = reference(base.expand(4, 7), t, torch.tensor(1.0))
    b64 = base.detach().double().requires_grad_()
    F.cross_entropy(b64.expand(4, 7), t).backward()
    loss = fusedce.cross_entropy(base.expand(4, 7), t, backend=backend, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(base.grad.double(), b64.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_logits_saved_by_another_node_raise(backend):
    # tanh saves its output: reading the overwritten logits would give a wrong gradient
    z = torch.randn(4, 7, requires_grad=True)
    t = torch.randint(0, 7, (4,))
    loss = fusedce.cross_entropy(torch.tanh(z), t, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_second_backward_raises(backend, reduction):
    z = torch.randn(4, 7, requires_grad=True)
    t = torch.randint(0, 7, (4,))
    loss = fusedce.cross_entropy(z * 1, t, backend=backend, inplace_backward=True,
                                 reduction=reduction).sum() * 2  # upstream 2: rescaled twice
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    assert torch.equal(z.grad, first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_fp16_loss_scaling_keeps_small_gradients(backend):
    # p of classes 2..7 is e^-17 ~ 4e-8 (class 0 dominates, the target is 1); p / 4 rows
    # stored in fp16 before the 65,536 loss scale arrives underflows to 0; scaled first it
    # is about 7e-4
    x = torch.zeros(4, 8)
    x[:, 0] = 17.0
    t = torch.ones(4, dtype=torch.long)
    x64 = x.double().requires_grad_()
    (F.cross_entropy(x64, t) * 65536).backward()
    b = x.half().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = fusedce.cross_entropy(b * 1, t, backend=backend, inplace_backward=True)
    (loss * 65536).backward()
    assert (b.grad != 0).all()
    torch.testing.assert_close(b.grad.double(), x64.grad, atol=0, rtol=2e-3)


def test_inplace_function_saves_only_the_logits():
    x = torch.randn(4, 7, requires_grad=True)
    t = torch.randint(0, 7, (4,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        logits = x * 2.0  # saves nothing (a Python scalar factor)
        loss = fusedce.cross_entropy(logits, t, backend="torch", inplace_backward=True)
    # the logits (holding the gradient by the backward) and the per-row targets, no more
    big = [v for v in saved if v.numel() == logits.numel()]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()
    assert [v.shape for v in saved if v is not big[0]] == [t.shape]
    loss.backward()
    torch.testing.assert_close(x.grad.double(), 2 * reference(2 * x, t, torch.tensor(1.0))[1],
                               atol=1e-6, rtol=1e-6)


def test_inplace_gradient_is_the_logits_storage():
    x = torch.randn(6, 1000, requires_grad=True)
    target = torch.randint(0, 1000, (6,))
    expected = torch.softmax(x.detach().double(), 1)
    expected[torch.arange(6), target] -= 1
    expected /= 6
    fusedce.cross_entropy(x, target, inplace_backward=True).backward()
    assert x.grad.data_ptr() == x.data_ptr(), "autograd copied the in-place gradient"
    torch.testing.assert_close(x.grad.double(), expected, atol=2e-6, rtol=2e-5)
