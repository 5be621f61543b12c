"""fusedce.cross_entropy as a drop-in for torch.nn.functional.cross_entropy: the same
values and gradients for every argument PyTorch takes, on every input form ((N, C) rows,
(C,), (N, C, d1..dK) with any layout, class-probability targets), every dtype, reduction
and shape; legacy arguments, autocast, the nn.Module; and PyTorch's errors for bad input.

Values are compared with F.cross_entropy on float64 copies, gradients through
``torch.autograd.grad`` with a random upstream gradient; both the Triton kernels (under
TRITON_INTERPRET=1 without a GPU) and the PyTorch implementation run every value case.
Targeted numerical cases (extreme logits, shifts, ignored rows) are in test_numerics.py.
"""

import itertools
import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    DTYPES,
    assert_close,
    combine,
    fused,
    gpt2_under_interpreter,
    indices,
    logits,
    make_inputs,
    option_kwargs,
    probabilities,
    reference,
    run_both,
)

import fusedce
from fusedce import _loss, cpu

# numpy, under Triton's interpreter, warns about the masked-off lanes of a tile (log(0),
# inf - inf): those lanes are never stored.
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
    pytest.mark.usefixtures("nan_filled_outputs"),  # a missed store shows as NaN
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


# ----------------------------------------------------------------- (N, C) and (C,) logits

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


# --------------------------------------------------------------------------- K-dim inputs

# (dtype, atol, rtol) against a float64 reference; bf16 results are computed in fp32 and
# rounded to nearest at most twice (helpers.DTYPES), hence 2**-7.
KDIM_DTYPES = [
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-6, 2**-7 + 1e-5, id="bf16"),
    pytest.param(torch.float64, 1e-10, 1e-10, id="fp64"),  # computed in fp64, as PyTorch
]


KDIM_SHAPES = [
    pytest.param((2, 5, 7), id="N2-C5-L7"),  # sequence layout (N, C, L), odd sizes
    pytest.param((3, 4, 3, 2), id="N3-C4-3x2"),  # segmentation layout (N, C, H, W)
    pytest.param((1, 17, 2, 2, 3), id="N1-C17-K3"),  # K = 3, single batch element
    pytest.param((2, 50_257, 3), id="N2-gpt2-L3"),  # the real vocabulary, strided classes
]


@pytest.mark.parametrize("shape,backend",
                         combine(KDIM_SHAPES, BACKENDS, slow=gpt2_under_interpreter))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_kdim_class_indices(shape, reduction, backend):
    x = logits(shape)
    target = indices((shape[0],) + shape[2:], shape[1])
    target.view(-1)[0] = -100  # one ignored position
    weight = torch.rand(shape[1], generator=torch.Generator().manual_seed(3))
    run_both(x, target, reduction=reduction, weight=weight, label_smoothing=0.1,
             backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", KDIM_DTYPES)
def test_kdim_dtypes(dtype, atol, rtol, backend):
    x = logits((2, 6, 5), dtype)
    run_both(x, indices((2, 5), 6), atol=atol, rtol=rtol, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "every-other", "cropped",
                                    "transposed"])
def test_kdim_layouts_reach_the_op_without_a_copy(layout, backend, monkeypatch):
    """The (N, C, L) tensor the op gets is a view of the caller's logits (same storage), for
    the usual layouts; the gradient comes back in the caller's strides."""
    n, c, h, w = 2, 6, 3, 4
    if layout == "contiguous":
        x = logits((n, c, h, w))
    elif layout == "channels_last":  # classes contiguous: the row-wise kernels apply
        x = logits((n, c, h, w)).contiguous(memory_format=torch.channels_last)
    elif layout == "every-other":  # every other column of a wider map: still one stride
        x = logits((n, c, h, 2 * w))[..., ::2]
    elif layout == "cropped":  # a crop of a larger map: rows and columns do not merge
        x = logits((n, c, h + 1, w + 1))[:, :, :h, :w]
    else:  # (N, L, C) storage seen as (N, C, L)
        x = logits((n, h * w, c)).transpose(1, 2).reshape(n, c, h, w)
    seen = []  # the logits each path's forward gets: (N, C, L), or rows (N * L, C) where
    # the CPU computes the gradient in the forward
    def spying(forward):
        def spy(x3, *args, **kwargs):
            seen.append(x3)
            return forward(x3, *args, **kwargs)
        return spy

    for module, name in ((_loss, "forward"), (cpu, "ce_fwd")):
        monkeypatch.setattr(module, name, spying(getattr(module, name)))
    target = indices((n, h, w), c)
    run_both(x, target, reduction="sum", backend=backend)
    same_storage = seen[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    # cropped: d1, d2 cannot be merged into one stride, the documented case of a copy
    assert same_storage == (layout != "cropped")
    xf = x.detach().requires_grad_()
    fusedce.cross_entropy(xf, target, backend=backend).backward()
    if layout not in ("cropped", "every-other"):  # (non-dense x: a dense gradient)
        assert xf.grad.stride() == x.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_2d_and_1d(backend):
    """Rows and classes with strides (a slice of a wider tensor, a transposed matrix)."""
    wide = logits((5, 40))
    run_both(wide[:, 3:30], indices((5,), 27), backend=backend)
    run_both(logits((9, 4)).t(), indices((4,), 9), reduction="none", backend=backend)
    run_both(wide[2, ::3], torch.tensor(4), backend=backend)  # (C,) with stride 3


# -------------------------------------------------------------- class-probability targets

@pytest.mark.parametrize("shape,backend", combine([
    pytest.param((7,), id="C7"),
    pytest.param((4, 9), id="N4-C9"),
    pytest.param((2, 5, 3, 2), id="N2-C5-3x2"),
    pytest.param((2, 50_257), id="N2-gpt2"),
], BACKENDS, slow=gpt2_under_interpreter))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("options", [
    pytest.param({}, id="plain"),
    pytest.param({"weight": True, "label_smoothing": 0.2}, id="weight-smoothing"),
])
def test_probability_targets(shape, reduction, options, backend):
    """Includes the target's own gradient; 'mean' divides by N, not by the weights."""
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    kw = dict(options)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(n_classes, generator=torch.Generator().manual_seed(5)) + 0.5
    x = logits(shape)
    target = probabilities(shape if len(shape) > 1 else (1,) + shape)
    target = target.reshape(shape)
    run_both(x, target, reduction=reduction, check_target_grad=True, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_probability_targets_mixed_dtypes(backend):
    """bf16 logits with fp32 probabilities give an fp32 loss (type promotion, as PyTorch);
    the gradients keep each input's dtype."""
    x = logits((3, 11), torch.bfloat16).requires_grad_()
    y = probabilities((3, 11)).requires_grad_()
    loss = fusedce.cross_entropy(x, y, backend=backend)
    ref = F.cross_entropy(x, y)
    assert loss.dtype == ref.dtype == torch.float32
    gx, gy = torch.autograd.grad(loss, [x, y])
    assert gx.dtype == torch.bfloat16 and gy.dtype == torch.float32
    run_both(x.detach(), y.detach(), atol=2e-3, rtol=1e-2, backend=backend)


# ----------------------------------------------------------------------- legacy arguments

@pytest.mark.parametrize("size_average, reduce", [
    (None, False), (True, None), (False, None), (False, True), (True, False), (None, True),
])
def test_legacy_size_average_reduce(size_average, reduce, either_route):
    x, target = logits((4, 6)), indices((4,), 6)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        ref = F.cross_entropy(x, target, size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        loss = fusedce.cross_entropy(x, target, size_average=size_average, reduce=reduce)
    torch.testing.assert_close(loss, ref)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        module = fusedce.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    torch.testing.assert_close(module(x, target), ref)


def test_elementwise_mean_is_mean_with_a_warning(either_route):
    x, target = logits((4, 6)), indices((4,), 6)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        loss = fusedce.cross_entropy(x, target, reduction="elementwise_mean")
    torch.testing.assert_close(loss, F.cross_entropy(x, target))


# ------------------------------------------------------------------------------- autocast

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_autocast_dtypes(dtype, soft, backend):
    """Under torch.autocast the loss is fp32 as PyTorch's (cross_entropy is an fp32 op),
    the gradient keeps the logits' dtype, and the values agree."""
    x = logits((4, 10, 3), dtype)
    target = probabilities((4, 10, 3), dtype) if soft else indices((4, 3), 10)
    w = torch.rand(10, generator=torch.Generator().manual_seed(4)).to(dtype)
    results = []
    for fn in (F.cross_entropy, lambda *a, **k: fusedce.cross_entropy(*a, backend=backend, **k)):
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(xr, target, weight=w, reduction="none")
        (grad,) = torch.autograd.grad(loss, xr, torch.ones_like(loss))
        results.append((loss, grad))
    (ref, ref_grad), (loss, grad) = results
    assert loss.dtype == ref.dtype == torch.float32
    assert grad.dtype == ref_grad.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=tol, rtol=tol)


# --------------------------------------------------------------------------- empty inputs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_empty_inputs(soft, backend):
    """No rows: 'mean' is NaN (0 / 0), 'sum' is 0, 'none' is empty, as PyTorch."""
    for shape in [(0, 5), (0, 5, 3), (2, 5, 0)]:
        x = torch.randn(shape, requires_grad=True)
        target = torch.rand(shape) if soft else torch.zeros((shape[0],) + shape[2:],
                                                            dtype=torch.long)
        for reduction in ["none", "mean", "sum"]:
            ref = F.cross_entropy(x, target, reduction=reduction)
            loss = fusedce.cross_entropy(x, target, reduction=reduction, backend=backend)
            assert loss.shape == ref.shape
            torch.testing.assert_close(loss, ref, equal_nan=True)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            assert grad.shape == x.shape


# ------------------------------------------------------------------- out-of-range targets

def test_out_of_range_target_cpu_raises_like_pytorch(either_route):
    x = logits((2, 5, 3))
    target = torch.tensor([[0, 1, 7], [0, -3, 0]])
    with pytest.raises(IndexError) as ref:
        F.cross_entropy(x, target)
    with pytest.raises(IndexError) as ours:
        fusedce.cross_entropy(x, target)
    assert str(ours.value) == str(ref.value) == "Target 7 is out of bounds."


@pytest.mark.parametrize("soft_smoothing", [0.0, 0.1])
def test_out_of_range_target_kernel_path_is_nan_or_raises(soft_smoothing):
    """The kernel path (no host sync) gives NaN loss and gradient rows, the others exact;
    validate=True raises PyTorch's error there too; validate=False gives NaN on the CPU."""
    x = logits((4, 6))
    target = torch.tensor([1, 6, 2, -1])  # rows 1 and 3 out of range
    weight = torch.rand(6)
    for backend, validate in [("triton", None), ("torch", False)]:
        xr = x.clone().requires_grad_()
        loss = fusedce.cross_entropy(xr, target, weight=weight, reduction="none",
                                     label_smoothing=soft_smoothing, backend=backend,
                                     validate=validate)
        (grad,) = torch.autograd.grad(loss, xr, torch.ones_like(loss))
        assert torch.isnan(loss[[1, 3]]).all() and torch.isnan(grad[[1, 3]]).all()
        ok = torch.tensor([0, 2])
        ref = F.cross_entropy(x[ok], target[ok], weight=weight, reduction="none",
                              label_smoothing=soft_smoothing)
        torch.testing.assert_close(loss[ok], ref)
        assert torch.isfinite(grad[ok]).all()
        mean = fusedce.cross_entropy(x, target, backend=backend, validate=validate)
        assert torch.isnan(mean)  # no silent finite value
    with pytest.raises(IndexError, match="Target 6 is out of bounds."):
        fusedce.cross_entropy(x, target, backend="triton", validate=True)


def test_uint8_target_out_of_range_raises_like_pytorch(either_route):
    x = torch.randn(3, 100)
    t = torch.tensor([156, 1, 2], dtype=torch.uint8)
    with pytest.raises(IndexError, match="156"):
        F.cross_entropy(x, t)  # PyTorch accepts uint8 targets and raises here
    with pytest.raises(IndexError, match="156"):
        fusedce.cross_entropy(x, t)


def test_default_validation_only_for_cpu_tensors():
    from types import SimpleNamespace

    from fusedce._args import implementation
    from fusedce.functional import _validates_by_default

    def validates(x, backend):
        return _validates_by_default(x, implementation(backend, x))

    # a stand-in for a CUDA tensor (no GPU here): only device and is_cuda are read
    cuda = SimpleNamespace(device=torch.device("cuda"), is_cuda=True)
    assert not validates(cuda, "torch")
    assert not validates(cuda, "auto")
    cpu = torch.empty(0)
    assert validates(cpu, "torch") and validates(cpu, "auto")
    assert not validates(cpu, "triton")  # the GPU path's behaviour, emulated


# --------------------------------------- bad input, the signature, documented differences

def _error(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return exc
    return None


X, T = logits((4, 5)), torch.tensor([0, 1, 2, 3])


BAD_INPUT = [
    pytest.param(lambda f: f(X, T.bool()), id="bool-target"),
    pytest.param(lambda f: f(X, T.float()), id="float-target-index-shape"),
    pytest.param(lambda f: f(X, torch.tensor([0, 1, 2])), id="target-batch-mismatch"),
    pytest.param(lambda f: f(X, torch.zeros(4, 1).long()), id="target-2d-for-2d-input"),
    pytest.param(lambda f: f(X, torch.tensor(1)), id="target-0d-for-2d-input"),
    pytest.param(lambda f: f(logits((2, 5, 3)), torch.zeros(2, 4).long()), id="kdim-target"),
    pytest.param(lambda f: f(logits((2, 5, 3)), torch.zeros(2).long()), id="kdim-target-dim"),
    pytest.param(lambda f: f(logits((2, 5, 3)), torch.zeros(3, 3).long()), id="kdim-batch"),
    pytest.param(lambda f: f(logits((5,)), torch.tensor([2, 1])), id="1d-input-2-targets"),
    pytest.param(lambda f: f(logits((5,)), torch.zeros(1, 1).long()), id="1d-input-2d-target"),
    pytest.param(lambda f: f(torch.tensor(1.0), torch.tensor(0)), id="0d-input"),
    pytest.param(lambda f: f(torch.tensor(1.0), torch.tensor([0])), id="0d-input-1d-target"),
    pytest.param(lambda f: f(X.long(), T), id="integer-logits"),
    pytest.param(lambda f: f(X, T, weight=torch.ones(4)), id="weight-size"),
    pytest.param(lambda f: f(X, T, weight=torch.ones(1, 5)), id="weight-2d"),
    pytest.param(lambda f: f(X, T, weight=torch.ones(5).long()), id="weight-integer"),
    pytest.param(lambda f: f(X, T, weight=torch.ones(5, requires_grad=True)),
                 id="weight-requires-grad"),
    pytest.param(lambda f: f(X, T, weight=[1.0] * 5), id="weight-list"),
    pytest.param(lambda f: f(X, T, reduction="avg"), id="reduction-unknown"),
    pytest.param(lambda f: f(X, T, reduction=None), id="reduction-none-object"),
    pytest.param(lambda f: f(X, T, label_smoothing=1.1), id="smoothing-above-1"),
    pytest.param(lambda f: f(X, torch.zeros(4, 5).long()), id="probabilities-integer"),
    pytest.param(lambda f: f(X, torch.rand(4, 5), ignore_index=1), id="probabilities-ignore"),
    pytest.param(lambda f: f(X, torch.rand(4, 6)), id="probabilities-shape"),
    pytest.param(lambda f: f(X, torch.rand(4, 5), weight=torch.ones(4)),
                 id="probabilities-weight-size"),
    pytest.param(lambda f: f(X, torch.rand(4, 5), label_smoothing=1.5),
                 id="probabilities-smoothing"),
    pytest.param(lambda f: f(X, [0, 1, 2, 3]), id="target-list"),
    pytest.param(lambda f: f(X, T, ignore_index=1.5), id="ignore-index-float"),
    pytest.param(lambda f: f(X, T, ignore_index=True), id="ignore-index-bool"),
    pytest.param(lambda f: f(X, T, ignore_index=None), id="ignore-index-none"),
    pytest.param(lambda f: f(X, T, label_smoothing="0.1"), id="smoothing-str"),
    pytest.param(lambda f: f(X, T, label_smoothing=None), id="smoothing-none"),
    pytest.param(lambda f: f(X, T, label_smoothing=math.inf), id="smoothing-inf"),
    pytest.param(lambda f: f(X, T.to(torch.int16)), id="int16-target"),
    pytest.param(lambda f: f(X, T.to(torch.int8)), id="int8-target"),
    pytest.param(lambda f: f(X, T.to("meta")), id="target-other-device"),
    pytest.param(lambda f: f(X, torch.tensor([0, 1, 2, 5])), id="target-out-of-range"),
    pytest.param(lambda f: f(logits((3, 0)), torch.zeros(3).long()), id="no-classes"),
    # PyTorch's (N, 0, d) loss raises where its (N, 0, d1, d2) one does not
    pytest.param(lambda f: f(logits((3, 0, 2)), torch.full((3, 2), -100)),
                 id="no-classes-one-extra-dim"),
    # found in review: PyTorch checks the batch before the target's dtype, a probability
    # target's dtype before the logits', and an int64 ignore_index's range
    pytest.param(lambda f: f(logits((2, 5, 3)), torch.rand(3, 5, 3)),
                 id="probabilities-batch-mismatch"),
    pytest.param(lambda f: f(logits((2, 5, 3)), torch.zeros(3, 3, dtype=torch.int16)),
                 id="int16-target-batch-mismatch"),
    pytest.param(lambda f: f(X.to(torch.complex64), X.to(torch.complex64)),
                 id="complex-probabilities"),
    pytest.param(lambda f: f(X, T, ignore_index=2 ** 63), id="ignore-index-past-int64"),
    pytest.param(lambda f: f(X, T, ignore_index=-2 ** 70), id="ignore-index-far-past-int64"),
]


@pytest.mark.parametrize("call", BAD_INPUT)
def test_bad_input_raises_what_pytorch_raises(call, either_route):
    ref = _error(lambda: call(F.cross_entropy))
    ours = _error(lambda: call(fusedce.cross_entropy))
    assert ref is not None, "PyTorch accepts this input: not a bad-input case"
    assert isinstance(ours, type(ref)), f"PyTorch: {ref!r}; fusedce: {ours!r}"
    assert str(ours)  # a message


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_probabilities_over_no_class(backend):
    """(N, 0, ...) logits with probability targets: each row's loss is an empty sum, 0
    ('mean': PyTorch's 0 / 0), and both gradients empty; the launchers (a max over no
    class) are not run (fusedce raised IndexError, the kernels gave NaN: found in review)."""
    gen = torch.Generator().manual_seed(6)
    for shape in ((4, 0), (0,), (2, 0, 3)):
        for reduction in ("none", "sum", "mean"):
            for dtype in (torch.float32, torch.float64):
                x = torch.randn(shape, generator=gen).requires_grad_()
                y = torch.rand(shape, generator=gen, dtype=dtype).requires_grad_()
                want = F.cross_entropy(x, y, reduction=reduction, label_smoothing=0.2)
                got = fusedce.cross_entropy(x, y, reduction=reduction, label_smoothing=0.2,
                                            backend=backend)
                assert got.dtype == want.dtype and got.shape == want.shape
                torch.testing.assert_close(got, want, equal_nan=True)
                gx, gy = torch.autograd.grad(got.sum(), (x, y))
                assert gx.shape == x.shape and gy.shape == y.shape
    # class indices over no class, every one ignored: 0 a row, 'mean' NaN (the CPU path
    # read each row's target logit, out of bounds); with label smoothing NaN everywhere
    # (eps / C times an empty sum; it raised ZeroDivisionError, or gave 0: found in
    # review); (N, 0, d1, d2) logits alike, the fused linear loss of a (0, H) head too
    for shape in ((4, 0), (4, 0, 2, 3)):
        x = torch.randn(shape, requires_grad=True)
        t = torch.full(shape[:1] + shape[2:], -100)
        for reduction, eps, grad in itertools.product(("none", "sum", "mean"), (0.0, 0.3),
                                                      (True, False)):
            with torch.set_grad_enabled(grad):
                want = F.cross_entropy(x, t, reduction=reduction, label_smoothing=eps)
                got = fusedce.cross_entropy(x, t, reduction=reduction, backend=backend,
                                            label_smoothing=eps)
            torch.testing.assert_close(got, want, equal_nan=True)
            if grad:
                assert torch.autograd.grad(got.sum(), x)[0].shape == x.shape
    if backend == "auto":
        backend = "torch"  # (the fused linear loss has no hand-off)
    h, w = torch.randn(4, 3, requires_grad=True), torch.randn(0, 3, requires_grad=True)
    t = torch.full((4,), -100)
    for reduction, eps in itertools.product(("none", "sum", "mean"), (0.0, 0.3)):
        want = F.linear_cross_entropy(h, w, t, reduction=reduction, label_smoothing=eps)
        got = fusedce.linear_cross_entropy(h, w, t, reduction=reduction, backend=backend,
                                           label_smoothing=eps)
        torch.testing.assert_close(got, want, equal_nan=True)
        upstream = torch.randn(got.shape)
        for g, r in zip(torch.autograd.grad(got, (h, w), upstream),
                        torch.autograd.grad(want, (h, w), upstream)):
            torch.testing.assert_close(g, r, equal_nan=True)


def test_uint8_class_indices_with_kdim_logits_on_every_route(either_route):
    """uint8 class indices with (N, C, d...) logits, which PyTorch's spatial loss refuses
    (int64 only): fusedce takes them on every route, as it takes them with (N, C) logits
    and as the int64 indices of the same values (the CPU hand-off gave PyTorch's error,
    the explicit backends a loss: found in review)."""
    gen = torch.Generator().manual_seed(4)
    for shape in ((4, 5, 3), (2, 5, 3, 2)):
        x = torch.randn(shape, generator=gen)
        t = torch.randint(0, 5, (shape[0],) + shape[2:], generator=gen)
        want = F.cross_entropy(x.double(), t, reduction="none")
        got = fusedce.cross_entropy(x, t.to(torch.uint8), reduction="none")
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_meta_tensors(soft):
    """Logits on the meta device (shape inference, deferred initialisation) give a meta
    loss and gradient of PyTorch's shapes; autocast's query raised for the meta device."""
    x = torch.randn(4, 5, device="meta", requires_grad=True)
    t = (torch.rand(4, 5, device="meta") if soft
         else torch.zeros(4, dtype=torch.long, device="meta"))
    for reduction in ("mean", "none"):
        loss = fusedce.cross_entropy(x, t, reduction=reduction, backend="torch")
        want = F.cross_entropy(x, t, reduction=reduction)
        assert loss.device.type == "meta" and loss.shape == want.shape
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert grad.device.type == "meta" and grad.shape == x.shape


@pytest.mark.parametrize("weight_dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32),
                                    (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float64)],
                         ids=["fp32", "bf16", "bf16-fp32-target", "fp64-target"])
def test_integer_class_weights_with_probabilities(weight_dtype, dtypes, either_route):
    """Probability targets take integer and bool class weights, promoted as PyTorch
    promotes them (the result's dtype too); class indices refuse them (BAD_INPUT)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 5, generator=gen).to(dtypes[0])
    y = torch.softmax(torch.randn(6, 5, generator=gen), 1).to(dtypes[1])
    w = torch.tensor([1, 0, 2, 3, 1]).to(weight_dtype)
    for reduction in ("mean", "none"):
        want = F.cross_entropy(x, y, weight=w, reduction=reduction)
        got = fusedce.cross_entropy(x, y, weight=w, reduction=reduction)
        assert got.dtype == want.dtype
        # PyTorch's log_softmax of bf16 logits is rounded to bf16 before the product
        tol = 2e-2 if torch.bfloat16 in dtypes else 2e-5
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("call, expected", [
    pytest.param(lambda: fusedce.cross_entropy(X, T.to("meta")),
                 r"same device.*input on cpu and target on meta", id="devices-named"),
    pytest.param(lambda: fusedce.cross_entropy(X, T.float()),
                 r"got torch.float32; class-probability targets must have the input's shape "
                 r"\(4, 5\)", id="float-target-says-probabilities"),
])
def test_more_specific_messages_the_readme_promises(call, expected, own_path):
    """README, Drop-in: where fusedce's own path words an error itself, the message says
    more than PyTorch's ('Tensor on device cpu is not on the expected device meta!';
    'expected target dtype to be Long or Byte, but got Float')."""
    with pytest.raises(RuntimeError, match=expected):
        call()


@pytest.mark.parametrize("kwargs", [
    {"reduction": "avg"},
    {"label_smoothing": 1.5},
], ids=repr)
def test_bad_arguments_raise_like_pytorch(kwargs, either_route):
    """The exception type is whatever PyTorch raises for the same call."""
    x, target, _ = make_inputs(2, 5, torch.float32)
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(x, target, **kwargs)
    with pytest.raises(theirs.type):
        fusedce.cross_entropy(x, target, **kwargs)


@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
def test_triton_on_cpu_tensors_without_the_interpreter_says_how(loss, monkeypatch):
    """Without TRITON_INTERPRET=1 Triton itself raised "0 active drivers ([]). There should
    only be one.", which tells a user nothing about what to do."""
    monkeypatch.delenv("TRITON_INTERPRET")
    x, target, _ = make_inputs(4, 10, torch.float32)
    args = (x, target) if loss == "cross_entropy" else (x, torch.randn(10, 10), target)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before triton is "
                                           "imported, or use backend='auto'"):
        getattr(fusedce, loss)(*args, backend="triton")


def test_unknown_backend():
    x, target, _ = make_inputs(2, 5, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        fusedce.cross_entropy(x, target, backend="cuda")


@pytest.mark.parametrize("ignore_index", [np.int64(1), np.int32(1), torch.tensor(1)],
                         ids=["np.int64", "np.int32", "0-d-tensor"])
def test_ignore_index_integer_types(ignore_index, own_path):
    x = torch.randn(3, 5)
    t = torch.tensor([0, 1, 2])
    ref = F.cross_entropy(x.double(), t, ignore_index=ignore_index)
    out = fusedce.cross_entropy(x, t, ignore_index=ignore_index)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ignore_index", [1.0, True, torch.tensor(1.0)],
                         ids=["float", "bool", "float-tensor"])
def test_ignore_index_non_integer_raises_type_error(ignore_index, either_route):
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="ignore_index"):
        F.cross_entropy(x, t, ignore_index=ignore_index)
    with pytest.raises(TypeError, match="ignore_index"):
        fusedce.cross_entropy(x, t, ignore_index=ignore_index)


def test_signature_matches_pytorch():
    import inspect

    ours = list(inspect.signature(fusedce.cross_entropy).parameters.values())
    theirs = list(inspect.signature(F.cross_entropy).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(theirs)]] == \
        [(p.name, p.default) for p in theirs]
    assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(theirs):])


def test_documented_differences_from_pytorch():
    """Where fusedce deliberately differs (README, Drop-in): int32 class indices and a
    weight of another float dtype are accepted; a negative or NaN label_smoothing (PyTorch
    silently treats it as 0) raises."""
    torch.testing.assert_close(fusedce.cross_entropy(X, T.int()), F.cross_entropy(X, T))
    torch.testing.assert_close(
        fusedce.cross_entropy(X.bfloat16(), T, weight=torch.ones(5)).float(),
        F.cross_entropy(X.bfloat16(), T).float())
    for smoothing in (-0.1, math.nan):
        F.cross_entropy(X, T, label_smoothing=smoothing)  # PyTorch takes it
        with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0"):
            fusedce.cross_entropy(X, T, label_smoothing=smoothing)
    # what PyTorch's parser takes for a float, fusedce takes too
    for smoothing in (True, np.float32(0.25), torch.tensor(0.25), 1):
        torch.testing.assert_close(fusedce.cross_entropy(X, T, label_smoothing=smoothing),
                                   F.cross_entropy(X, T, label_smoothing=smoothing))


# -------------------------------- autograd: create_graph, double backward, inference mode

DOUBLE_BACKWARD_CASES = [
    pytest.param((2, 5, 3), torch.float32, id="strided-NCL"),  # the strided path
    pytest.param((4, 5), torch.float64, id="strided-fp64"),  # float64 goes strided
    pytest.param((4, 5), torch.float32, id="rows"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype", DOUBLE_BACKWARD_CASES)
def test_double_backward_matches_pytorch(shape, dtype, backend):
    """A gradient penalty: the gradient of |dL/dx|^2, against F.cross_entropy's."""
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    t = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    got = []
    for fn in (lambda a: fusedce.cross_entropy(a, t, backend=backend), partial(F.cross_entropy,
                                                                               target=t)):
        g, = torch.autograd.grad(fn(x * 1), x, create_graph=True)
        got.append(torch.autograd.grad((g * g).sum(), x)[0])
    torch.testing.assert_close(got[0], got[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_of_inplace_raises(backend):
    """inplace_backward=True overwrote the logits a second order needs: a clear error."""
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.randint(0, 5, (4,))
    loss = fusedce.cross_entropy(x * 1, t, backend=backend, inplace_backward=True)
    g, = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((g * g).sum(), x)


def test_first_backward_unchanged_under_create_graph(own_path):
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (2, 3))
    g, = torch.autograd.grad(fusedce.cross_entropy(x, t), x, create_graph=True)
    torch.testing.assert_close(g.detach(), reference(x, t, torch.tensor(1.0))[1])


@pytest.mark.parametrize("inplace", [False, True])
def test_inference_mode_with_grad_enabled(inplace, own_path):
    """``torch.enable_grad()`` inside ``torch.inference_mode()``: PyTorch records no graph;
    fusedce raised ("Inference tensors cannot be saved for backward") or returned a loss
    with a graph, and the fused linear loss returned one too."""
    x = torch.randn(4, 7, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    h = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(7, 5, requires_grad=True)
    before = x.detach().clone()
    with torch.inference_mode(), torch.enable_grad():
        loss = fusedce.cross_entropy(x, t, inplace_backward=inplace)
        lin = fusedce.linear_cross_entropy(h, w, t)
        ref = F.cross_entropy(x, t)
        lin_ref = F.cross_entropy(F.linear(h, w), t)
    assert not loss.requires_grad and not lin.requires_grad and not ref.requires_grad
    assert torch.equal(x.detach(), before)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lin, lin_ref, atol=1e-6, rtol=1e-6)


def test_autocast_makes_no_cast_copy(own_path):
    """README: under torch.autocast the bf16 logits are read as they are, where PyTorch's
    loss (an fp32 op under autocast) first copies them to fp32. The largest new storage of
    forward and backward stays below an fp32 copy of the logits (the bf16 gradient and an
    fp32 chunk are smaller); the same detector sees PyTorch's copy. Inline-sized (the worker
    threads' ops would not pass through this thread's dispatch mode)."""
    from test_linear import LargestAllocation

    x = logits((200, 4096), torch.bfloat16)
    t = indices((200,), 4096)
    fp32_copy = x.numel() * 4
    for fn, copies in ((F.cross_entropy, True), (fusedce.cross_entropy, False)):
        xr = x.clone().requires_grad_()
        with LargestAllocation() as mode, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(xr, t)
            loss.backward()
        assert loss.dtype == torch.float32 and xr.grad.dtype == torch.bfloat16
        assert (mode.largest >= fp32_copy) == copies, (fn, mode.largest, fp32_copy)


# ----------------------------------------------------------------------------- the module

def test_module_matches_functional(either_route):
    x, target, gen = make_inputs(5, 40, torch.float32, seed=12)
    w = torch.rand(40, generator=gen)
    module = fusedce.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum",
                                      label_smoothing=0.1)
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum",
                                    label_smoothing=0.1)
    assert isinstance(module, torch.nn.CrossEntropyLoss)
    torch.testing.assert_close(module(x, target), ref(x, target))
    assert module.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_kdim_soft_and_weight_buffer(backend):
    weight = torch.rand(5) + 0.1
    module = fusedce.CrossEntropyLoss(weight=weight, label_smoothing=0.05, backend=backend)
    reference = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.05)
    x = logits((2, 5, 4))
    for target in (indices((2, 4), 5), probabilities((2, 5, 4))):
        torch.testing.assert_close(module(x, target), reference(x, target))
    assert "weight" in module.state_dict()


def test_logits_changed_in_place_after_the_loss(own_path):
    """PyTorch's loss saves its log-softmax, so the logits may change in place between the
    loss and its backward (a temperature divided in, a buffer reused). On the CPU, fusedce's
    default mode has the gradient from the forward and reads nothing else: the same
    gradient, no error. A changed target still raises, as PyTorch's saved target does."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(6, 33, generator=gen, requires_grad=True)
    t = torch.randint(0, 33, (6,), generator=gen)
    t[1] = -100
    upstream = torch.randn(6, generator=gen)
    grads = []
    for fn in (F.cross_entropy, fusedce.cross_entropy):
        z = x * 2
        loss = fn(z, t, reduction="none", label_smoothing=0.1)
        z.mul_(0.5)
        grads.append(torch.autograd.grad(loss, x, upstream)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    for fn in (F.cross_entropy, fusedce.cross_entropy):
        t2 = t.clone()
        loss = fn(x * 2, t2)
        t2[0] = -100
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_penalty_backpropagates_through_the_loss_again(reduction, own_path):
    """A gradient penalty: g = dL/dx with create_graph=True, then (L + |g|^2).backward()
    goes through the loss's backward a second time. The CPU path's forward-computed
    gradient was dropped by the first and the second took it for still there (an
    AttributeError on None); PyTorch's gradient, float64."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(6, 37, generator=gen)
    t = torch.randint(0, 37, (6,), generator=gen)
    t[2] = -100
    grads = []
    for fn, dtype in ((F.cross_entropy, torch.float64), (fusedce.cross_entropy, torch.float32)):
        xr = x.to(dtype).requires_grad_()
        loss = fn(xr * 1.5, t, reduction=reduction, label_smoothing=0.1).sum()
        g, = torch.autograd.grad(loss, xr, create_graph=True)
        (loss + g.square().sum()).backward()
        grads.append(xr.grad)
    torch.testing.assert_close(grads[1].double(), grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_weight_gradient_with_probabilities(backend, loss, reduction):
    """With class probabilities PyTorch differentiates the class weight (its soft loss is
    made of differentiable ops); fusedce raised for a weight requiring a gradient. The loss
    and the gradients of every input that requires one (logits or hidden states and head,
    targets, weight) against float64 PyTorch, with label smoothing, a random upstream."""
    gen = torch.Generator().manual_seed(5)
    h, head = torch.randn(6, 4, generator=gen), torch.randn(11, 4, generator=gen)
    p = torch.softmax(torch.randn(6, 11, generator=gen), 1)
    w = torch.rand(11, generator=gen) + 0.5
    upstream = torch.randn(6 if reduction == "none" else (), generator=gen, dtype=torch.float64)

    def run(dtype, fn):
        leaves = [v.to(dtype).requires_grad_() for v in (h, head, p, w)]
        hl, headl, pl, wl = leaves
        kw = dict(weight=wl, reduction=reduction, label_smoothing=0.1)
        out = (fn(hl, headl, pl, **kw) if loss == "linear_cross_entropy"
               else fn(hl @ headl.t(), pl, **kw))
        return out, torch.autograd.grad(out, leaves, upstream.to(dtype))

    fused_fn = getattr(fusedce, loss)
    got, got_grads = run(torch.float32, lambda *a, **k: fused_fn(*a, backend=backend, **k))
    want, want_grads = run(torch.float64, getattr(F, loss))
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
    for name, g, r in zip(("hidden", "head", "target", "weight"), got_grads, want_grads):
        torch.testing.assert_close(g.double(), r, rtol=2e-5, atol=2e-6, msg=name)
