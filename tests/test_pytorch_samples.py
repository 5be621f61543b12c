"""PyTorch's own test samples drive the drop-in contract: every OpInfo sample of
``nn.functional.cross_entropy`` and of the three variants of
``nn.functional.linear_cross_entropy`` (reference, chunked, chunked_none), and every
ModuleInfo input of ``nn.CrossEntropyLoss`` (``torch.testing._internal``), on both backends,
give PyTorch's loss (value, dtype, shape) and gradients (with a random upstream gradient,
every differentiable argument: logits or input, linear weight and bias, probability
targets), and every error input raises PyTorch's exception type with PyTorch's message. What
PyTorch accepts is taken from PyTorch, not guessed."""

import pytest
import torch
import torch.nn.functional as F
from helpers import combine, kernel_share

# (these need expecttest, a test dependency in .[dev])
from torch.testing._internal import common_methods_invocations as common  # noqa: E402
from torch.testing._internal import common_modules  # noqa: E402

import fusedce

OP = next(op for op in common.op_db if op.name == "nn.functional.cross_entropy")
LINEAR_OPS = [op for op in common.op_db if op.name == "nn.functional.linear_cross_entropy"]
MODULE = next(m for m in common_modules.module_db if m.module_cls is torch.nn.CrossEntropyLoss)
BACKENDS = ["torch", "triton"]
# float64: PyTorch's reference is exact; float32: what training runs in
DTYPES = {torch.float64: (1e-7, 1e-7), torch.float32: (2e-5, 2e-5)}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _clone(value):
    """The same arguments with fresh leaves, so both calls get their own gradients."""
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        return out.requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _compare(fn_ours, fn_theirs, args, dtype, kwargs=None):
    """Both functions on their own copies of ``args`` and ``kwargs``: the same result, and
    the same gradients for every tensor among them that requires one."""
    atol, rtol = DTYPES[dtype]
    ours_args, theirs_args = _clone((args, kwargs or {})), _clone((args, kwargs or {}))
    want = fn_theirs(*theirs_args[0], **theirs_args[1])
    got = fn_ours(*ours_args[0], **ours_args[1])
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True)
    leaves = [t for t in _tensors(theirs_args) if t.requires_grad]
    if not leaves:
        return
    upstream = torch.randn(want.shape, dtype=want.dtype,
                           generator=torch.Generator().manual_seed(0))
    want_grads = torch.autograd.grad(want, leaves, upstream, allow_unused=True)
    got_grads = torch.autograd.grad(got, [t for t in _tensors(ours_args) if t.requires_grad],
                                    upstream, allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, equal_nan=True)


def _per_dtype_and_backend(inputs_for):
    """One parameter per input of ``inputs_for(dtype)``, dtype and backend (an eighth of
    the kernels' in the quick spec: ``helpers.kernel_share``)."""
    return [pytest.param(item, dtype, backend, id=f"{str(dtype)[6:]}-{i}-{backend}",
                         marks=kernel_share(i, backend))
            for dtype in DTYPES for i, item in enumerate(inputs_for(dtype))
            for backend in BACKENDS]


def _op_samples():
    return _per_dtype_and_backend(
        lambda dtype: OP.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("sample, dtype, backend", _op_samples())
def test_opinfo_samples(sample, dtype, backend):
    args = (sample.input, *sample.args)
    kwargs = dict(sample.kwargs)
    _compare(lambda *a: fusedce.cross_entropy(*a, **kwargs, backend=backend),
             lambda *a: F.cross_entropy(*a, **kwargs), args, dtype)


def _linear_samples():
    return [pytest.param(sample, dtype, backend,
                         id=f"{op.variant_test_name or 'reference'}-{str(dtype)[6:]}-{i}-"
                            f"{backend}", marks=kernel_share(i, backend))
            for op in LINEAR_OPS for dtype in DTYPES
            for i, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True))
            for backend in BACKENDS]


@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ..options.. ignored")
@pytest.mark.parametrize("sample, dtype, backend", _linear_samples())
def test_linear_opinfo_samples(sample, dtype, backend):
    """Probability targets, K-dimensional weights, 1-d inputs, class weights, biases, every
    reduction; ``options`` (LinearCrossEntropyOptions) passed to both."""
    _compare(lambda *a, **kw: fusedce.linear_cross_entropy(*a, **kw, backend=backend),
             F.linear_cross_entropy, (sample.input, *sample.args), dtype, sample.kwargs)


def _linear_low_precision_samples():
    return [pytest.param(sample, dtype, backend,
                         id=f"{op.variant_test_name or 'reference'}-{str(dtype)[6:]}-{i}-"
                            f"{backend}",
                         marks=[pytest.mark.slow] if backend == "triton" else [])
            for op in LINEAR_OPS for dtype in (torch.float16, torch.bfloat16)
            for i, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True))
            for backend in BACKENDS]


def _as(value, dtype):
    """``value``'s tensors as ``dtype`` (floating ones only), fresh leaves."""
    value = _clone(value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(dtype).requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(_as(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _as(v, dtype) for k, v in value.items()}
    return value


@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ..options.. ignored")
@pytest.mark.parametrize("sample, dtype, backend", _linear_low_precision_samples())
def test_linear_opinfo_low_precision(sample, dtype, backend):
    """fp16 / bf16 samples: PyTorch's result dtype and shape, and a loss and gradients no
    further from the float64 result than PyTorch's own (within 2x, plus 1e-3 of their
    size): both round differently, so neither is the other's reference. PyTorch's own is
    its reference path (``options=None``), which like fusedce makes the logits in the
    input's dtype; its chunked path keeps them in float32 and is more accurate in 16 bits
    (a documented difference)."""
    args, kwargs = (sample.input, *sample.args), sample.kwargs
    results = []
    for fn, cast in ((lambda *a, **kw: fusedce.linear_cross_entropy(*a, **kw, backend=backend),
                      None), (F.linear_cross_entropy, None), (F.linear_cross_entropy,
                                                              torch.float64)):
        a, kw = _clone((args, kwargs)) if cast is None else _as((args, kwargs), cast)
        if fn is F.linear_cross_entropy:
            kw.pop("options", None)  # PyTorch's reference path
        out = fn(*a, **kw)
        leaves = [t for t in _tensors((a, kw)) if t.requires_grad]
        # 'none': a random upstream per row; a scalar loss: a power of two, as a loss scale
        # (the gradients computed in the forward take any other factor with one more
        # rounding to 16 bits, half an ulp)
        up = (torch.randn(out.shape, generator=torch.Generator().manual_seed(0)) if out.dim()
              else torch.tensor(4.0)).to(out.dtype)
        results.append([out, *torch.autograd.grad(out, leaves, up)])
    ours, theirs, exact = results
    assert ours[0].dtype == theirs[0].dtype and ours[0].shape == theirs[0].shape
    for o, t, e in zip(ours, theirs, exact):
        err, torch_err = (o.double() - e).norm(), (t.double() - e).norm()
        assert err <= 2 * torch_err + 1e-3 * e.norm(), (err, torch_err)


@pytest.mark.parametrize("error", list(LINEAR_OPS[0].error_inputs("cpu")),
                         ids=lambda e: e.error_regex[:40])
def test_linear_opinfo_error_inputs(error):
    sample = error.sample_input
    args = (sample.input, *sample.args)
    with pytest.raises(error.error_type, match=error.error_regex):
        F.linear_cross_entropy(*args, **sample.kwargs)
    with pytest.raises(error.error_type, match=error.error_regex):
        fusedce.linear_cross_entropy(*args, **sample.kwargs)


def _module_errors():
    errors = MODULE.module_error_inputs_func(MODULE, device="cpu", dtype=torch.float32,
                                             requires_grad=False, training=True)
    return combine([pytest.param(e, id=str(i)) for i, e in enumerate(errors)], BACKENDS)


@pytest.mark.parametrize("error, backend", _module_errors())
def test_moduleinfo_error_inputs(error, backend):
    """PyTorch's exception type and message, from the module and the function alike."""
    ctor = error.module_error_input.constructor_input
    fwd = error.module_error_input.forward_input
    with pytest.raises(error.error_type, match=error.error_regex):
        fusedce.CrossEntropyLoss(*ctor.args, **ctor.kwargs, backend=backend)(*fwd.args)
    with pytest.raises(error.error_type, match=error.error_regex):
        fusedce.cross_entropy(*fwd.args, **ctor.kwargs, backend=backend)


def _module_inputs():
    return _per_dtype_and_backend(
        lambda dtype: MODULE.module_inputs_func(MODULE, device="cpu", dtype=dtype,
                                                requires_grad=True, training=True))


@pytest.mark.parametrize("module_input, dtype, backend", _module_inputs())
def test_moduleinfo_inputs(module_input, dtype, backend):
    ctor = module_input.constructor_input
    fwd = module_input.forward_input
    theirs = torch.nn.CrossEntropyLoss(*ctor.args, **ctor.kwargs)
    ours = fusedce.CrossEntropyLoss(*ctor.args, **ctor.kwargs, backend=backend)
    _compare(lambda *a: ours(*a, **fwd.kwargs), lambda *a: theirs(*a, **fwd.kwargs),
             tuple(fwd.args), dtype)
