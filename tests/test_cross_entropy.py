"""fusedce.cross_entropy against torch.nn.functional.cross_entropy on a float64 copy.

Every case runs both implementations: the Triton kernels (under TRITON_INTERPRET=1 on a
machine without a GPU) and the PyTorch implementation; losses and gradients (through
``torch.autograd.grad`` with a random upstream gradient) are compared with the reference.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import combine, gpt2_under_interpreter

import fusedce

pytestmark = pytest.mark.usefixtures("nan_filled_outputs")  # a missed store shows as NaN

BACKENDS = ["triton", "torch"]

# (dtype, atol, rtol): fp32 is exact up to accumulation order; bf16/fp16 results are
# computed in fp32 and rounded once when stored, so the tolerance is one unit in the last
# place of the output dtype (2**-7 for bf16, whose fp32 -> bf16 conversion Triton's
# interpreter truncates where a GPU rounds to nearest; 2**-10 for fp16) plus a small
# absolute slack.
DTYPES = [
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-3, 1e-2, id="bf16"),
    pytest.param(torch.float16, 2e-4, 1e-3, id="fp16"),
]

SHAPES = [
    pytest.param(1, 1, id="tiny-1x1"),
    pytest.param(3, 7, id="odd-3x7"),
    pytest.param(4, 64, id="pow2-4x64"),
    pytest.param(3, 8193, id="longer-than-a-block-3x8193"),  # the largest block is 8192
    pytest.param(3, 50_257, id="gpt2-3x50257"),
]

OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"weight": True}, id="weight"),
    pytest.param({"label_smoothing": 0.1}, id="smoothing"),
    pytest.param({"weight": True, "label_smoothing": 0.3, "ignore_index": 1}, id="all"),
]




def make_inputs(n, c, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=gen) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=gen)
    return x, target, gen


def reference(x, target, upstream=None, **kwargs):
    """Loss and gradient of F.cross_entropy on a float64 copy of ``x``.

    Without ``upstream`` a random upstream gradient is drawn (seeded), already rounded to
    ``x``'s dtype, since that is what the loss under test will receive.
    """
    kw = dict(kwargs)
    if kw.get("weight") is not None:
        kw["weight"] = kw["weight"].double()
    x64 = x.detach().double().requires_grad_()
    loss = F.cross_entropy(x64, target, **kw)
    if upstream is None:
        gen = torch.Generator().manual_seed(1234)
        upstream = torch.randn(loss.shape, generator=gen).to(x.dtype).double()
    (grad,) = torch.autograd.grad(loss, x64, upstream)
    return loss.detach(), grad, upstream


def fused(x, target, upstream, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = fusedce.cross_entropy(x, target, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype))
    return loss.detach(), grad


def assert_close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def option_kwargs(options, c, gen):
    kw = dict(options)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(c, generator=gen) + 0.5
    return kw


@pytest.mark.parametrize("n,c,dtype,atol,rtol,backend",
                         combine(SHAPES, DTYPES, BACKENDS, slow=gpt2_under_interpreter))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS)
def test_matches_pytorch(backend, dtype, atol, rtol, n, c, reduction, options):
    x, target, gen = make_inputs(n, c, dtype)
    kw = option_kwargs(options, c, gen)
    if "ignore_index" in kw and n > 1:
        target[0] = kw["ignore_index"]  # one row ignored, the others not
    ref_loss, ref_grad, upstream = reference(x, target, reduction=reduction, **kw)
    loss, grad = fused(x, target, upstream, reduction=reduction, backend=backend, **kw)
    assert loss.dtype == dtype and grad.dtype == dtype  # PyTorch returns the input's dtype
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, atol, rtol, "loss")
    assert_close(grad, ref_grad, atol, rtol, "grad")


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
def test_none_reduction_with_stride0_upstream(backend):
    """An expanded (stride-0) upstream gradient is read with its stride, not as a vector."""
    x, target, _ = make_inputs(6, 129, torch.float32, seed=3)
    upstream = torch.tensor(0.37, dtype=torch.float64).expand(6)
    ref_loss, ref_grad, _ = reference(x, target, upstream=upstream, reduction="none")
    loss, grad = fused(x, target, upstream, reduction="none", backend=backend)
    assert_close(grad, ref_grad, 2e-6, 2e-5, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_and_int32_targets(backend):
    """Rows that are a slice of a wider buffer (row stride != C) and int32 targets."""
    wide, target, _ = make_inputs(4, 1030, torch.float32, seed=4)
    x = wide[:, 3:1003]  # row stride 1030, 1000 classes
    target = (target % 1000).to(torch.int32)
    ref_loss, ref_grad, upstream = reference(x, target.long())
    loss, grad = fused(x, target, upstream, backend=backend)
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
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, reduction):
    x = torch.randn(0, 11, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    ref = F.cross_entropy(x, target, reduction=reduction)
    loss = fusedce.cross_entropy(x, target, reduction=reduction, backend=backend)
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, equal_nan=True)  # mean of nothing: NaN
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert grad.shape == (0, 11)


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
def test_one_dimensional_input(backend):
    """(C,) logits with a scalar target, as F.cross_entropy accepts."""
    x, _, _ = make_inputs(1, 33, torch.float32, seed=9)
    x, target = x[0], torch.tensor(4)
    for reduction in ["mean", "sum", "none"]:
        ref_loss, ref_grad, upstream = reference(x, target, reduction=reduction)
        loss, grad = fused(x, target, upstream, reduction=reduction, backend=backend)
        assert loss.shape == ref_loss.shape == ()
        assert_close(loss, ref_loss, 2e-5, 2e-5, "loss")
        assert_close(grad, ref_grad, 2e-5, 2e-5, "grad")


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


def test_backends_agree_with_each_other():
    """The kernels and the PyTorch implementation, compared directly on the real vocab."""
    x, target, gen = make_inputs(4, 50_257, torch.float32, seed=11)
    w = torch.rand(50_257, generator=gen)
    upstream = torch.randn(4, dtype=torch.float64)
    kw = dict(weight=w, label_smoothing=0.2, reduction="none")
    a_loss, a_grad = fused(x, target, upstream, backend="triton", **kw)
    b_loss, b_grad = fused(x, target, upstream, backend="torch", **kw)
    assert_close(a_loss, b_loss, 1e-5, 1e-6, "loss")
    assert_close(a_grad, b_grad, 1e-7, 1e-5, "grad")


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    """'auto' never touches the kernels for CPU tensors (no Triton needed on the CPU)."""
    from fusedce import _function

    monkeypatch.setattr(_function, "_kernels", lambda: pytest.fail("kernels used on CPU"))
    x, target, _ = make_inputs(2, 10, torch.float32)
    fusedce.cross_entropy(x, target)


def test_module_matches_functional():
    x, target, gen = make_inputs(5, 40, torch.float32, seed=12)
    w = torch.rand(40, generator=gen)
    module = fusedce.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum",
                                      label_smoothing=0.1)
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum",
                                    label_smoothing=0.1)
    assert isinstance(module, torch.nn.CrossEntropyLoss)
    torch.testing.assert_close(module(x, target), ref(x, target))
    assert module.state_dict().keys() == ref.state_dict().keys()


def test_signature_matches_pytorch():
    import inspect

    ours = list(inspect.signature(fusedce.cross_entropy).parameters.values())
    theirs = list(inspect.signature(F.cross_entropy).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(theirs)]] == \
        [(p.name, p.default) for p in theirs]
    assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(theirs):])


@pytest.mark.parametrize("kwargs", [
    {"reduction": "avg"},
    {"label_smoothing": 1.5},
], ids=repr)
def test_bad_arguments_raise_like_pytorch(kwargs):
    """The exception type is whatever PyTorch raises for the same call."""
    x, target, _ = make_inputs(2, 5, torch.float32)
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(x, target, **kwargs)
    with pytest.raises(theirs.type):
        fusedce.cross_entropy(x, target, **kwargs)


def test_unknown_backend():
    x, target, _ = make_inputs(2, 5, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        fusedce.cross_entropy(x, target, backend="cuda")


def test_fresh_buffers_start_as_nan():
    """The module's NaN fill is in force, so the comparisons above would catch a missed store."""
    assert torch.empty(4).isnan().all() and torch.empty_like(torch.zeros(2, 3)).isnan().all()
