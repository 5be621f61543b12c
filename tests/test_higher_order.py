"""Higher-order autodiff, as PyTorch's own OpInfo tests check it for ``F.cross_entropy``:
over every float64 OpInfo sample of ``nn.functional.cross_entropy`` and of the three
``nn.functional.linear_cross_entropy`` variants, on both backends (on the kernels an
eighth of them by default, all under ``-m extended``), ``gradcheck`` with
forward-mode AD (against finite differences of fusedce's own fused forward),
``gradgradcheck`` (double backward: the gradient of the fused backward under
``create_graph=True``), and forward-over-reverse. Then the ``torch.func`` transforms against
PyTorch's own loss, and second-order results at GPT-2's vocabulary on a few rows.

The fused first-order path is the one the finite differences run: these checks tie the
differentiable formulation (``fusedce._higher``) to it.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import kernel_share
from torch.autograd import forward_ad as fwAD
from torch.autograd import gradcheck, gradgradcheck

# (these need expecttest, a test dependency in .[dev])
from torch.testing._internal import common_methods_invocations as common  # noqa: E402

import fusedce

BACKENDS = ["torch", "triton"]
CE = next(op for op in common.op_db if op.name == "nn.functional.cross_entropy")
LINEAR = [op for op in common.op_db if op.name == "nn.functional.linear_cross_entropy"]


def _differentiable(sample):
    """``(fn, inputs)``: the sample's tensors that require a gradient as the inputs of a
    function of them alone (the rest, targets and class weights, held fixed)."""
    args = [sample.input, *sample.args]
    kwargs = dict(sample.kwargs)
    slots = [("arg", i) for i, a in enumerate(args)
             if isinstance(a, torch.Tensor) and a.requires_grad]
    slots += [("kw", k) for k, v in kwargs.items()
              if isinstance(v, torch.Tensor) and v.requires_grad]

    def call(fused, *tensors, **extra):
        a, kw = list(args), dict(kwargs)
        for (kind, key), t in zip(slots, tensors):
            if kind == "arg":
                a[key] = t
            else:
                kw[key] = t
        return fused(*a, **kw, **extra)

    inputs = [args[k] if kind == "arg" else kwargs[k] for kind, k in slots]
    return call, [t.detach().clone().requires_grad_() for t in inputs]


# On the kernels, an eighth of the samples run by default, the rest under ``-m extended``.
# The differentiable formulation (fusedce/_higher.py) is the same code on both backends;
# what the kernels add to these checks is their first-order loss and gradient, which
# tests/test_pytorch_samples.py compares with PyTorch's on every sample.
PAST_AN_EIGHTH = (pytest.mark.slow, pytest.mark.extended)


def _samples(ops):
    """Every float64 sample on the PyTorch backend, an eighth of them on the kernels
    (``PAST_AN_EIGHTH``); the chunked variants of linear_cross_entropy (the same shapes as the
    reference variant, with other options) in the slow run, on the PyTorch backend (the
    kernels see the same chunks as in the reference variant)."""
    return [pytest.param(op, s, backend, id=f"{op.variant_test_name or 'reference'}-{i}-{backend}",
                         marks=[pytest.mark.slow] if op.variant_test_name
                         else kernel_share(i, backend, rest=PAST_AN_EIGHTH))
            for op in ops for i, s in enumerate(op.sample_inputs("cpu", torch.float64,
                                                                  requires_grad=True))
            for backend in (BACKENDS if not op.variant_test_name else ["torch"])]


def _check(fn, inputs, op=None):
    """PyTorch's fast mode (a random projection of the Jacobians, as its OpInfo tests
    run by default): the same checks at a few evaluations each, batched gradients (a vmap
    over the backward) where the OpInfo ``op`` asks for them (its ModuleInfo tests take
    gradcheck's defaults, without)."""
    assert gradcheck(fn, inputs, check_forward_ad=True, check_backward_ad=True,
                     check_batched_grad=op is not None and op.check_batched_grad,
                     fast_mode=True)
    assert gradgradcheck(fn, inputs, check_fwd_over_rev=True,
                         check_batched_grad=op is not None and op.check_batched_gradgrad,
                         fast_mode=True)


@pytest.mark.parametrize("op, sample, backend", _samples([CE]))
def test_cross_entropy_opinfo_higher_order(op, sample, backend):
    call, inputs = _differentiable(sample)
    _check(lambda *t: call(fusedce.cross_entropy, *t, backend=backend), inputs, op)


@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ..options.. ignored")
@pytest.mark.parametrize("op, sample, backend", _samples(LINEAR))
def test_linear_opinfo_higher_order(op, sample, backend):
    call, inputs = _differentiable(sample)
    _check(lambda *t: call(fusedce.linear_cross_entropy, *t, backend=backend), inputs, op)


# ------------------------------------------------------------------ torch.func transforms


def _extras_loss(x, t, scale=0.5, cap=2.0, z=1e-2):
    """logit_scale, softcap and z-loss written out with PyTorch's ops ('mean')."""
    zl = torch.tanh(x * scale / cap) * cap
    kept = t != -100
    lse = torch.logsumexp(zl, -1)
    return F.cross_entropy(zl, t) + (z * lse.square() * kept).sum() / kept.sum()


CE_CASES = {
    "plain": (lambda x, t, b: fusedce.cross_entropy(x, t, backend=b), F.cross_entropy),
    "smoothing-sum": (
        lambda x, t, b: fusedce.cross_entropy(x, t, backend=b, label_smoothing=0.2,
                                              reduction="sum"),
        lambda x, t: F.cross_entropy(x, t, label_smoothing=0.2, reduction="sum")),
    "extras": (lambda x, t, b: fusedce.cross_entropy(x, t, backend=b, logit_scale=0.5,
                                                     softcap=2.0, lse_square_scale=1e-2),
               _extras_loss),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CE_CASES))
def test_func_transforms_match_pytorch(case, backend):
    """grad, vmap of grad, jvp, jacfwd and hessian of fusedce.cross_entropy are those of
    the same loss in PyTorch's ops."""
    ours, theirs = CE_CASES[case]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, dtype=torch.float64, generator=g) * 2
    t = torch.tensor([0, 8, -100, 3])
    v = torch.randn(x.shape, dtype=torch.float64, generator=g)
    fo = lambda a: ours(a, t, backend)  # noqa: E731
    ft = lambda a: theirs(a, t)  # noqa: E731
    close = torch.testing.assert_close
    close(torch.func.grad(fo)(x), torch.func.grad(ft)(x))
    close(torch.func.jvp(fo, (x,), (v,)), torch.func.jvp(ft, (x,), (v,)))
    close(torch.func.jacfwd(fo)(x), torch.func.jacfwd(ft)(x))
    close(torch.func.hessian(fo)(x), torch.func.hessian(ft)(x))
    xs = torch.stack([x, x.flip(0)])
    close(torch.func.vmap(torch.func.grad(fo))(xs), torch.func.vmap(torch.func.grad(ft))(xs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_transforms_with_probabilities_and_extras(backend):
    """grad, jvp and hessian with class-probability targets and every loss extra, against
    the same loss in PyTorch's ops (the z-loss of every row: none is ignored)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, dtype=torch.float64, generator=g) * 2
    y = torch.softmax(torch.randn(3, 7, dtype=torch.float64, generator=g), 1)
    v = torch.randn(x.shape, dtype=torch.float64, generator=g)

    def ours(a):
        return fusedce.cross_entropy(a, y, backend=backend, label_smoothing=0.1,
                                     logit_scale=0.5, softcap=2.0, lse_square_scale=1e-2)

    def theirs(a):
        z = torch.tanh(a * 0.5 / 2.0) * 2.0
        return (F.cross_entropy(z, y, label_smoothing=0.1)
                + 1e-2 * torch.logsumexp(z, 1).square().mean())

    close = torch.testing.assert_close
    close(torch.func.grad(ours)(x), torch.func.grad(theirs)(x))
    close(torch.func.jvp(ours, (x,), (v,)), torch.func.jvp(theirs, (x,), (v,)))
    close(torch.func.hessian(ours)(x), torch.func.hessian(theirs)(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_func_transforms_match_pytorch(backend):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 10, -100, 3, 3, 7])

    def ours(w_):
        return fusedce.linear_cross_entropy(x, w_, t, backend=backend, chunk_size=4)

    def theirs(w_):
        return F.linear_cross_entropy(x, w_, t)

    v = torch.randn(w.shape, dtype=torch.float64, generator=g)
    torch.testing.assert_close(torch.func.grad(ours)(w), torch.func.grad(theirs)(w))
    torch.testing.assert_close(torch.func.jvp(ours, (w,), (v,)),
                               torch.func.jvp(theirs, (w,), (v,)))
    torch.testing.assert_close(torch.func.hessian(ours)(w), torch.func.hessian(theirs)(w))


# ------------------------------------------------- second order at GPT-2's vocabulary


@pytest.mark.parametrize("backend", BACKENDS)
def test_hessian_vector_product_gpt2_vocab(backend):
    """H v by double backward and by forward-over-reverse on 3 rows of 50,257 fp32 logits
    (the fused first-order backward, the differentiable second order), against PyTorch's
    float64 loss; one row ignored."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 50257, generator=g) * 3
    t = torch.tensor([7, -100, 50256])
    v = torch.randn(x.shape, generator=g)
    up = torch.tensor([0.7, -1.3, 2.0])
    xd = x.double().requires_grad_()
    gd, = torch.autograd.grad(F.cross_entropy(xd, t, reduction="none"), xd, up.double(),
                              create_graph=True)
    want, = torch.autograd.grad(gd, xd, v.double())
    xr = x.clone().requires_grad_()
    gr, = torch.autograd.grad(fusedce.cross_entropy(xr, t, reduction="none", backend=backend),
                              xr, up, create_graph=True)
    got, = torch.autograd.grad(gr, xr, v)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)
    with fwAD.dual_level():  # forward-over-reverse: the tangent of the gradient
        dual = fwAD.make_dual(x, v).requires_grad_()
        gf, = torch.autograd.grad(
            fusedce.cross_entropy(dual, t, reduction="none", backend=backend), dual, up)
        torch.testing.assert_close(fwAD.unpack_dual(gf).tangent.double(), want, atol=1e-6,
                                   rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gradient_penalty_gpt2_vocab(backend):
    """The gradient of |dL/dh|^2 with respect to the head's weight, GPT-2's vocabulary."""
    g = torch.Generator().manual_seed(6)
    h = torch.randn(4, 16, generator=g)
    w = torch.randn(50257, 16, generator=g) * 0.2
    t = torch.tensor([0, 50256, -100, 1234])
    grads = []
    for dtype, fn in ((torch.float64, F.linear_cross_entropy),
                      (torch.float32, lambda *a: fusedce.linear_cross_entropy(
                          *a, backend=backend, chunk_size=2))):
        hh = h.to(dtype).requires_grad_()
        ww = w.to(dtype).requires_grad_()
        gh, = torch.autograd.grad(fn(hh, ww, t), hh, create_graph=True)
        grads.append(torch.autograd.grad(gh.square().sum(), ww)[0])
    torch.testing.assert_close(grads[1].double(), grads[0], atol=1e-7, rtol=1e-4)


# --------------------------------------------- the first-order path stays the fused one


def test_first_order_never_takes_the_differentiable_formulation(monkeypatch):
    """Without create_graph, a tangent or a transform, neither loss calls fusedce._higher."""
    from fusedce import _higher

    def refuse(*_, **__):
        raise AssertionError("the differentiable formulation was taken")

    monkeypatch.setattr(_higher, "cross_entropy", refuse)
    monkeypatch.setattr(_higher, "linear_cross_entropy", refuse)
    x = torch.randn(64, 3000, requires_grad=True)
    t = torch.randint(0, 3000, (64,))
    for backend in BACKENDS:
        fusedce.cross_entropy(x, t, backend=backend).backward()
    h = torch.randn(8, 4, requires_grad=True)
    fusedce.linear_cross_entropy(h, torch.randn(10, 4, requires_grad=True),
                                 torch.randint(0, 10, (8,))).backward()
    with pytest.raises(AssertionError, match="differentiable"):
        torch.autograd.grad(fusedce.cross_entropy(x, t, backend="torch"), x,
                            create_graph=True)


# ------------------------------------------------ ModuleInfo inputs of nn.CrossEntropyLoss


def _module_inputs():
    from torch.testing._internal import common_modules

    info = next(m for m in common_modules.module_db
                if m.module_cls is torch.nn.CrossEntropyLoss)
    inputs = info.module_inputs_func(info, device="cpu", dtype=torch.float64,
                                     requires_grad=True, training=True)
    return [pytest.param(m, backend, id=f"{i}-{backend}",
                         marks=kernel_share(i, backend, rest=PAST_AN_EIGHTH))
            for i, m in enumerate(inputs) for backend in BACKENDS]


@pytest.mark.parametrize("module_input, backend", _module_inputs())
def test_moduleinfo_higher_order(module_input, backend):
    ctor, fwd = module_input.constructor_input, module_input.forward_input
    module = fusedce.CrossEntropyLoss(*ctor.args, **ctor.kwargs, backend=backend)
    args = list(fwd.args)
    slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*tensors):
        a = list(args)
        for i, t in zip(slots, tensors):
            a[i] = t
        return module(*a, **fwd.kwargs)

    _check(fn, [args[i].detach().clone().requires_grad_() for i in slots])


# ------------------------------------------------------- a vmap over the backward (batched)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["default", "inplace", "kdim"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_upstream_gradients(own_path, backend, mode, reduction):
    """``torch.autograd.grad(..., is_grads_batched=True)`` on float32 logits, where the
    gradient is computed in the forward (into a buffer, or over the logits in place) or, for
    (N, C, d) logits, in the backward: three upstream gradients at once, each the gradient
    PyTorch gives (float64); an ignored row stays 0. The fused passes read the upstream
    gradient's data, which a batched tensor has not (they raised)."""
    gen = torch.Generator().manual_seed(17)
    shape = (2, 7, 3) if mode == "kdim" else (5, 7)
    x = torch.randn(shape, generator=gen)
    t = torch.randint(0, 7, (shape[0],) + shape[2:], generator=gen)
    t.view(-1)[1] = -100
    leaf = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(leaf * 1, t, reduction=reduction, label_smoothing=0.1,
                                 backend=backend, inplace_backward=mode == "inplace")
    v = torch.randn((3,) + loss.shape, generator=gen)
    (got,) = torch.autograd.grad(loss, leaf, v, is_grads_batched=True)
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, reduction=reduction, label_smoothing=0.1)
    (want,) = torch.autograd.grad(ref, x64, v.double(), is_grads_batched=True,
                                  create_graph=True)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    # with create_graph=True the batched gradient is differentiable again (it was the one
    # computed in the forward, detached; in place it was differentiated as the overwritten
    # logits): PyTorch's second derivative, or in place the double-backward error
    loss = fusedce.cross_entropy(leaf * 1, t, reduction=reduction, label_smoothing=0.1,
                                 backend=backend, inplace_backward=mode == "inplace")
    if mode == "inplace":  # (the graph of a batched gradient cannot carry the raising node)
        with pytest.raises(RuntimeError, match="does not support double backward"):
            torch.autograd.grad(loss, leaf, v, is_grads_batched=True, create_graph=True)
        return
    (g,) = torch.autograd.grad(loss, leaf, v, is_grads_batched=True, create_graph=True)
    (second,) = torch.autograd.grad((g * g).sum(), leaf)
    (want2,) = torch.autograd.grad((want * want).sum(), x64)
    torch.testing.assert_close(second.double(), want2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vectorized_jacobian_and_hessian(backend, reduction):
    """``torch.autograd.functional``'s ``jacobian`` and ``hessian`` with ``vectorize=True``
    (a vmap over the backward) of both losses, those of PyTorch's own."""
    gen = torch.Generator().manual_seed(18)
    h, w = torch.randn(3, 4, generator=gen), torch.randn(5, 4, generator=gen)
    t = torch.tensor([0, 4, -100])
    kw = dict(reduction=reduction)

    def jac(fn, *operands):
        return torch.autograd.functional.jacobian(fn, operands, vectorize=True)

    close = torch.testing.assert_close
    close(jac(lambda a, b: fusedce.linear_cross_entropy(a, b, t, backend=backend, **kw), h, w),
          jac(lambda a, b: F.linear_cross_entropy(a, b, t, **kw), h, w))
    x = h @ w.t()
    close(jac(lambda a: fusedce.cross_entropy(a, t, backend=backend, **kw), x),
          jac(lambda a: F.cross_entropy(a, t, **kw), x))
    hess = torch.autograd.functional.hessian
    close(hess(lambda a: fusedce.cross_entropy(a, t, softcap=3.0, backend=backend), x,
               vectorize=True),
          hess(lambda a: F.cross_entropy(3.0 * torch.tanh(a / 3.0), t), x, vectorize=True))
