"""fusedce.reference, the plain math of the loss, is the spec: it equals float64
``F.cross_entropy`` and its autograd gradient, and both implementations (PyTorch, Triton under
the interpreter) equal it, with weights, label smoothing, ignored rows and random upstream
gradients."""

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce import reference

OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"weight": True}, id="weight"),
        pytest.param({"label_smoothing": 0.125}, id="smoothing"),
    pytest.param({"weight": True, "label_smoothing": 0.375, "ignore": True}, id="all"),
]
REDUCTIONS = ["none", "mean", "sum"]


def make(n, c, opts, soft=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen, dtype=torch.float64) * 3
    if soft:
        target = torch.softmax(torch.randn(n, c, generator=gen, dtype=torch.float64), 1)
    else:
        target = torch.randint(0, c, (n,), generator=gen)
        target[0], target[-1] = 0, c - 1  # both ends of the class range
        if opts.get("ignore"):  # (probability targets have no ignore_index)
            target[1::3] = -100
    kwargs = {"label_smoothing": opts.get("label_smoothing", 0.0)}
    if opts.get("weight"):
        kwargs["weight"] = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    return x, target, kwargs


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTIONS)
def test_reference_is_pytorchs_loss_and_gradient(opts, reduction, soft):
    # 16 classes: PyTorch rounds eps / C to float32, exact for these eps and C
    x, target, kwargs = make(7, 16, opts, soft)
    xr = x.clone().requires_grad_()
    want = F.cross_entropy(xr, target, reduction=reduction, **kwargs)
    grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (want_dx,) = torch.autograd.grad(want, xr, grad)
    got = reference.cross_entropy(x, target, reduction=reduction, **kwargs)
    got_dx = reference.cross_entropy_grad(x, target, grad, reduction=reduction, **kwargs)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-12, atol=1e-12)


def test_reference_uint8_class_156_is_a_class():
    """-100 compared with a uint8 target wraps to 156: the reference must compare in int64,
    as PyTorch does, or class 156's rows would be taken for ignored ones."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 200, dtype=torch.float64, generator=gen)
    target = torch.tensor([156, 3, 156, 199], dtype=torch.uint8)
    xr = x.clone().requires_grad_()
    want = F.cross_entropy(xr, target, reduction="none")
    grad = torch.randn(4, dtype=torch.float64, generator=gen)
    (want_dx,) = torch.autograd.grad(want, xr, grad)
    torch.testing.assert_close(reference.cross_entropy(x, target, reduction="none"),
                               want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.cross_entropy_grad(x, target, grad, reduction="none"),
                               want_dx, rtol=1e-12, atol=1e-12)


# (rows, classes): odd and tiny; a row longer than one Triton block (8,192); GPT-2's vocab
SHAPES = [pytest.param(5, 13, id="5x13"), pytest.param(3, 8195, id="3x8195"),
          pytest.param(2, 50257, id="2x50257")]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n, c", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTIONS)
def test_backends_follow_the_reference(opts, reduction, n, c, backend):
    x, target, kwargs = make(n, c, opts, seed=n + c)
    grad_shape = (n,) if reduction == "none" else ()
    grad = torch.randn(grad_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = reference.cross_entropy(x, target, reduction=reduction, **kwargs)
    want_dx = reference.cross_entropy_grad(x, target, grad, reduction=reduction, **kwargs)
    xr = x.float().requires_grad_()
    w = kwargs.pop("weight", None)
    got = fusedce.cross_entropy(xr, target, weight=None if w is None else w.float(),
                                reduction=reduction, backend=backend, **kwargs)
    (got_dx,) = torch.autograd.grad(got, xr, grad.float())
    # fp32 against the float64 spec
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_dx.double(), want_dx, rtol=1e-4, atol=1e-7)
