"""fusedce.linear_cross_entropy against the unfused F.cross_entropy(F.linear(...)) in float64.

Losses and the gradients of ``input``, ``linear_weight`` and ``linear_bias`` (through
``torch.autograd.grad`` with a random upstream gradient) are compared with the reference on
float64 copies of the same (already rounded) inputs. The PyTorch implementation runs the
random shapes; the Triton kernels (under TRITON_INTERPRET=1 without a GPU) run a few small
cases and one with GPT-2's 50,257 classes. PyTorch's own ``F.linear_cross_entropy`` is a
second reference, and a dispatch-mode hook checks that no (tokens x vocab) tensor is ever
allocated.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS
from torch.utils._python_dispatch import TorchDispatchMode

import fusedce
from fusedce.linear import MAX_CHUNK_BYTES, GradAccumulator, chunk_rows

pytestmark = pytest.mark.usefixtures("nan_filled_outputs")  # a missed store shows as NaN

# (dtype, atol, rtol) against float64 on the same rounded inputs. fp32: accumulation order
# only (the hidden dimension is summed in a different order by the chunked products). bf16:
# the logits are rounded to bf16 (8 bits) before the loss, and so is the logit gradient
# before the two products, so about 2**-8 relative on each, times a few for the sums.
DTYPES = [
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2e-2, 3e-2, id="bf16"),
]

# (tokens, hidden, vocab, chunk): each shape on purpose
SHAPES = [
    pytest.param(1, 1, 2, None, id="tiny-1x1x2"),
    pytest.param(37, 19, 53, 8, id="odd-37x19x53-ragged-last-chunk"),
    pytest.param(64, 32, 128, 16, id="pow2-64x32x128-even-chunks"),
    pytest.param(50, 13, 301, None, id="default-chunk-vocab-gt-hidden"),
    pytest.param(9, 40, 11, 1, id="one-row-chunks-hidden-gt-vocab"),
]

OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"bias": True}, id="bias"),
    pytest.param({"weight": True}, id="weight"),
    pytest.param({"label_smoothing": 0.2}, id="smoothing"),
    pytest.param({"ignore_index": 3}, id="ignore"),
    pytest.param({"bias": True, "weight": True, "label_smoothing": 0.1, "ignore_index": 1},
                 id="all"),
]


def make_problem(n, h, v, dtype, seed=0, bias=False, weight=False, ignore_index=None,
                 label_smoothing=0.0):
    """Inputs rounded to ``dtype`` and the keyword arguments of the call.

    Scales give logits of standard deviation ~3 (a peaked softmax, like a trained head).
    With ``ignore_index``, that class is the target of about a quarter of the rows.
    """
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=gen) * 1.7).to(dtype)
    w = (torch.randn(v, h, generator=gen) * (1.7 / math.sqrt(h))).to(dtype)
    target = torch.randint(0, v, (n,), generator=gen)
    kwargs = {"label_smoothing": label_smoothing}
    if bias:
        kwargs["linear_bias"] = torch.randn(v, generator=gen).to(dtype)
    if weight:
        kwargs["weight"] = (torch.rand(v, generator=gen) + 0.5).to(dtype)
    if ignore_index is not None:
        kwargs["ignore_index"] = ignore_index
        target = torch.where(torch.rand(n, generator=gen) < 0.25, ignore_index, target)
    return x, w, target, kwargs, gen


def run(fn, x, w, target, kwargs, reduction, upstream):
    """Loss and gradients (input, linear_weight[, linear_bias]) of ``fn``."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    kw = dict(kwargs)
    leaves = [x, w]
    if kw.get("linear_bias") is not None:
        kw["linear_bias"] = kw["linear_bias"].detach().clone().requires_grad_()
        leaves.append(kw["linear_bias"])
    loss = fn(x, w, target, reduction=reduction, **kw)
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
    return loss, grads


def reference(x, w, target, kwargs, reduction, upstream):
    """The unfused loss F.cross_entropy(F.linear(...)) on float64 copies."""
    kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kwargs.items()}

    def unfused(x, w, target, reduction, linear_bias=None, **ce_kwargs):
        return F.cross_entropy(F.linear(x, w, linear_bias), target, reduction=reduction,
                               **ce_kwargs)

    return run(unfused, x.double(), w.double(), target, kw, reduction, upstream.double())


def random_upstream(n, reduction, gen):
    """A random upstream gradient: a scalar away from 1, or one value per token."""
    if reduction == "none":
        return torch.randn(n, generator=gen)
    return torch.rand((), generator=gen) + 0.5


def assert_close(actual, expected, atol, rtol, what):
    """``atol`` is relative to the largest magnitude in ``expected`` (when above 1): the
    'sum' reduction's gradients grow with the tokens, and so do their rounding errors."""
    magnitude = expected.detach().double().abs().nan_to_num(0.0)
    scale = max(1.0, magnitude.max().item()) if expected.numel() else 1.0
    # NaN only where the reference has NaN (a 'mean' over rows that are all ignored)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale,
                               rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check(n, h, v, dtype, atol, rtol, reduction, options, backend="torch", chunk=None,
          seed=0):
    x, w, target, kwargs, gen = make_problem(n, h, v, dtype, seed=seed, **options)
    upstream = random_upstream(n, reduction, gen)
    ref_loss, ref_grads = reference(x, w, target, kwargs, reduction, upstream)

    def fused(*args, **kw):
        return fusedce.linear_cross_entropy(*args, backend=backend, chunk_size=chunk, **kw)

    loss, grads = run(fused, x, w, target, kwargs, reduction, upstream)
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, atol, rtol, "loss")
    for name, g, ref_g in zip(["input", "linear_weight", "linear_bias"], grads, ref_grads):
        assert g.dtype == dtype, name
        assert_close(g, ref_g, atol, rtol, f"grad {name}")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("n,h,v,chunk", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS)
def test_matches_unfused_float64(dtype, atol, rtol, n, h, v, chunk, reduction, options):
    check(n, h, v, dtype, atol, rtol, reduction, options, chunk=chunk)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed):
    """Shapes drawn at random (seeded): odd hidden sizes and vocabularies, any chunk."""
    gen = torch.Generator().manual_seed(1000 + seed)
    n, h, v = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in
               [(1, 80), (1, 70), (2, 400)])
    chunk = int(torch.randint(1, n + 1, (), generator=gen))
    reduction = ["mean", "sum", "none"][seed % 3]
    options = {"bias": seed % 2 == 0, "weight": seed % 3 == 1,
               "label_smoothing": [0.0, 0.05, 0.3][seed % 3],
               "ignore_index": [None, 0, -100][seed % 3]}
    check(n, h, v, torch.float32, 2e-5, 2e-5, reduction, options, chunk=chunk, seed=seed)


# Under the interpreter every program is run in Python: few rows, small vocabularies.
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [
    pytest.param({}, id="plain"),
    pytest.param({"bias": True, "weight": True, "label_smoothing": 0.1, "ignore_index": 1},
                 id="all"),
])
def test_triton_backend(reduction, options):
    check(10, 12, 37, torch.float32, 2e-5, 2e-5, reduction, options, backend="triton",
          chunk=4)


def test_triton_backend_bf16():
    check(6, 16, 33, torch.bfloat16, 2e-2, 3e-2, "mean", {"bias": True}, backend="triton",
          chunk=4)


def test_triton_backend_gpt2_vocab():
    """The real 50,257 classes (7 kernel blocks per row), few tokens, two chunks."""
    check(3, 8, 50_257, torch.float32, 2e-5, 2e-5, "mean",
          {"ignore_index": 5, "label_smoothing": 0.1}, backend="triton", chunk=2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunked", [False, True], ids=["torch-reference", "torch-chunked"])
def test_matches_torch_linear_cross_entropy(reduction, chunked):
    """PyTorch's own F.linear_cross_entropy (default ignore_index=None) as a second reference,
    both its reference path and its chunked path (options=...)."""
    x, w, target, kwargs, gen = make_problem(45, 24, 97, torch.float32, bias=True,
                                             weight=True, ignore_index=-100)
    del kwargs["ignore_index"], kwargs["label_smoothing"]  # both left at their defaults
    upstream = random_upstream(45, reduction, gen)
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=16) if chunked else None

    def torch_lce(*args, **kw):
        return F.linear_cross_entropy(*args, options=options, **kw)

    ref_loss, ref_grads = run(torch_lce, x, w, target, kwargs, reduction, upstream)
    loss, grads = run(fusedce.linear_cross_entropy, x, w, target, kwargs, reduction, upstream)
    assert_close(loss, ref_loss, 2e-5, 2e-5, "loss")
    for g, ref_g in zip(grads, ref_grads):
        assert_close(g, ref_g, 2e-5, 2e-5, "grad")


def test_options_only_batch_chunk_size_is_used():
    """README: of ``options=`` only ``batch_chunk_size`` is used, as ``chunk_size``: it bounds
    the chunk's logits (the largest new storage), and the other fields change nothing (the
    results equal those of ``chunk_size=`` bit for bit)."""
    gen = torch.Generator().manual_seed(11)
    n, h, v = 64, 2, 1000
    x, w = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    t = torch.randint(0, v, (n,), generator=gen)
    for k in (4, 16):
        results = []
        for kw in (dict(options=torch.nn.LinearCrossEntropyOptions(
                        batch_chunk_size=k, allow_retain_graph=True, acc_dtype=torch.float64)),
                   dict(chunk_size=k)):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            with LargestAllocation() as mode:
                loss = fusedce.linear_cross_entropy(xr, wr, t, reduction="sum", **kw)
                loss.backward()
            assert k * v * 4 <= mode.largest <= 2 * k * v * 4, (k, kw, mode.largest)
            results.append((loss, xr.grad, wr.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tied_embedding(reduction):
    """GPT-2 ties the head to the token embedding: the weight gradient is the sum of the
    embedding's and the head's, and the module takes the head weight at call time."""
    n, h, v = 29, 17, 61
    gen = torch.Generator().manual_seed(7)
    table = torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.5
    ids = torch.randint(0, v, (n,), generator=gen)
    target = torch.randint(0, v, (n,), generator=gen)
    upstream = random_upstream(n, reduction, gen)

    def model(table, loss_fn):
        hidden = torch.tanh(F.embedding(ids, table) * 1.3)
        return loss_fn(hidden, table, target)

    ref_table = table.clone().requires_grad_()
    ref = model(ref_table, lambda hid, w, t: F.cross_entropy(hid @ w.t(), t,
                                                             reduction=reduction))
    (ref_grad,) = torch.autograd.grad(ref, [ref_table], upstream.double())

    table32 = table.float().requires_grad_()
    loss_fn = fusedce.LinearCrossEntropyLoss(reduction=reduction, chunk_size=8)
    assert list(loss_fn.parameters()) == []
    loss = model(table32, loss_fn)
    (grad,) = torch.autograd.grad(loss, [table32], upstream)
    assert_close(loss, ref, 2e-5, 2e-5, "loss")
    assert_close(grad, ref_grad, 2e-5, 2e-5, "grad")


def test_module_matches_functional():
    x, w, target, kwargs, _ = make_problem(20, 9, 31, torch.float32, bias=True, weight=True,
                                           ignore_index=2, label_smoothing=0.1)
    bias = kwargs.pop("linear_bias")
    loss_fn = fusedce.LinearCrossEntropyLoss(**kwargs)
    assert set(loss_fn.state_dict()) == {"weight"}  # a buffer, as in nn.CrossEntropyLoss
    expected = fusedce.linear_cross_entropy(x, w, target, linear_bias=bias, **kwargs)
    torch.testing.assert_close(loss_fn(x, w, target, bias), expected, rtol=0, atol=0)


class LargestAllocation(TorchDispatchMode):
    """Records the largest new storage (in bytes) any aten op returns, backward included.

    Outputs that share storage with an argument (views such as ``W.t()``, ``out=`` results)
    are not new allocations and are not counted.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_args = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in flat_args if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_memory_detector_sees_unfused_logits():
    """The detector itself: the unfused path allocates the full logits and is caught."""
    n, h, v = 256, 16, 1024
    x = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    target = torch.randint(0, v, (n,))
    with LargestAllocation() as mode:
        F.cross_entropy(F.linear(x, w), target).backward()
    assert mode.largest >= n * v * 4


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_never_allocates_full_logits(reduction, bias):
    """Forward and backward allocate nothing as large as (tokens x vocab) logits, with the
    default chunk size (which must split this shape)."""
    n, h, v = 512, 16, 1024  # the default picks 128-row chunks: 1/4 of the logits
    x = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True) * 0.3
    b = torch.randn(v, requires_grad=True) if bias else None
    target = torch.randint(0, v, (n,))
    with LargestAllocation() as mode:
        loss = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction)
        loss.backward(torch.ones_like(loss))
    assert mode.largest < n * v * 4, mode.largest
    assert mode.largest <= chunk_rows(n, h, v, 4) * v * 4 + 4096


@pytest.mark.parametrize("case", ["probabilities", "k-dim", "k-dim-probabilities", "float64"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_general_path_allocates_one_chunk(case, reduction, backend):
    """The cases the row-wise launchers do not serve (probability targets, a K-dimensional
    weight, float64) are chunked too: no allocation beyond two chunks of logits (the chunk
    and its gradient), while the unreduced loss matches the unfused one in float64.
    Probability targets do not require a gradient here: theirs is target-sized."""
    n, h, c, k = 64, 8, 96, (4 if case.startswith("k-dim") else 1)
    dtype = torch.float64 if case == "float64" else torch.float32
    x = torch.randn(n, h, dtype=dtype, requires_grad=True)
    w = torch.randn(c, *([k] if k > 1 else []), h, dtype=dtype, requires_grad=True)
    shape = (n, c, k) if k > 1 else (n, c)
    if "probabilities" in case:
        target = torch.softmax(torch.randn(shape, dtype=dtype), 1)
    else:
        target = torch.randint(0, c, (n, k) if k > 1 else (n,))
    chunk = 16
    with LargestAllocation() as mode:
        loss = fusedce.linear_cross_entropy(x, w, target, reduction=reduction,
                                            chunk_size=chunk, backend=backend)
        loss.backward(torch.randn_like(loss))
    assert mode.largest <= 2 * chunk * c * k * x.element_size(), mode.largest
    xd, wd = x.detach().double(), w.detach().double()
    want = F.cross_entropy((xd @ wd.flatten(0, -2).t()).view(shape),
                           target.double() if target.is_floating_point() else target,
                           reduction=reduction)
    torch.testing.assert_close(loss.detach().double(), want,
                               **({} if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)))


def test_no_grad_computes_only_the_loss():
    """Under no_grad neither the logit gradient nor the (V, H) fp32 accumulator exists."""
    n, h, v = 64, 48, 512
    x = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    target = torch.randint(0, v, (n,))
    with torch.no_grad(), LargestAllocation() as mode:
        loss = fusedce.linear_cross_entropy(x, w, target, chunk_size=8)
    assert not loss.requires_grad
    assert mode.largest < v * h * 4  # the weight-gradient accumulator would be this size
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.t(), target).detach())


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_chunk_rows_heuristic(device_type):
    # GPT-2 small, 8,192 tokens: a power of two, at most 1/8 of the tokens, under the cap
    for itemsize in (4, 2):
        rows = chunk_rows(8192, 768, 50_257, itemsize, device_type)
        assert rows & (rows - 1) == 0 and 8192 // rows >= 8
        assert rows * 50_257 * itemsize <= MAX_CHUNK_BYTES[device_type]
    assert chunk_rows(65536, 768, 50_257, 4, device_type) * 50_257 * 4 \
        <= MAX_CHUNK_BYTES[device_type]  # many tokens: the byte cap decides
    assert chunk_rows(5, 768, 50_257, 4, device_type) == 5  # never more rows than tokens
    assert chunk_rows(10**6, 16, 10**8, 4, device_type) == 1  # a row above the byte cap
    assert chunk_rows(0, 8, 8, 4, device_type) == 1
    # README: at least 128 rows (1/8 of 512 tokens is 64), a power of two
    assert chunk_rows(512, 768, 1000, 4, device_type) == 128
    assert chunk_rows(1000, 768, 1000, 4, device_type) == 128
    assert chunk_rows(4096, 768, 1000, 4, device_type) == 512


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_deterministic(reduction):
    x, w, target, kwargs, gen = make_problem(40, 20, 70, torch.float32, bias=True)
    upstream = random_upstream(40, reduction, gen)

    def fused(*args, **kw):
        return fusedce.linear_cross_entropy(*args, chunk_size=7, **kw)

    first = run(fused, x, w, target, kwargs, reduction, upstream)
    second = run(fused, x, w, target, kwargs, reduction, upstream)
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("need", ["input", "linear_weight"])
def test_gradient_of_one_input_only(need):
    x, w, target, _, _ = make_problem(30, 11, 41, torch.float64)
    x32, w32 = x.float(), w.float()
    leaf = (x32 if need == "input" else w32).requires_grad_()
    up = torch.tensor(-1.7)  # not 1: the upstream gradient must reach the one gradient
    (grad,) = torch.autograd.grad(fusedce.linear_cross_entropy(x32, w32, target, chunk_size=8),
                                  [leaf], up)
    ref_leaf = (x if need == "input" else w).requires_grad_()
    (ref,) = torch.autograd.grad(F.cross_entropy(F.linear(x, w), target), [ref_leaf],
                                 up.double())
    assert_close(grad, ref, 2e-5, 2e-5, need)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_and_empty_batch(reduction):
    for n in (5, 0):
        x, w, target, kwargs, _ = make_problem(n, 6, 9, torch.float32)
        target = torch.full_like(target, -100)
        upstream = torch.ones(n) if reduction == "none" else torch.tensor(1.0)
        ref_loss, ref_grads = reference(x, w, target, kwargs, reduction, upstream)
        loss, grads = run(fusedce.linear_cross_entropy, x, w, target, kwargs, reduction,
                          upstream)
        torch.testing.assert_close(loss.double(), ref_loss, equal_nan=True)
        for g, ref_g in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), ref_g, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [math.inf, math.nan], ids=["inf", "nan"])
def test_non_finite_upstream_leaves_ignored_rows_zero(backend, dtype, reduction, upstream):
    """Hugging Face's loss is ``linear CE 'sum' / num_items_in_batch``: a batch whose labels
    are all -100 divides by 0, so the upstream gradient is inf (NaN through a NaN mean).
    PyTorch never multiplies it into an ignored row, so its gradients are then all 0 (one
    NaN would spread to every parameter by the optimizer step); with some rows counted,
    the ignored rows' input gradient is 0 and the others' not finite, as PyTorch's."""
    x, w, target, kwargs, _ = make_problem(6, 5, 11, dtype, bias=True, seed=3)
    kwargs.pop("ignore_index", None)
    for ignored in (slice(None), slice(0, 6, 2)):
        t = target.clone()
        t[ignored] = -100
        grads = {}
        for name, fn, kw in [("pytorch", F.linear_cross_entropy, {}),
                             ("fusedce", fusedce.linear_cross_entropy, {"backend": backend})]:
            xs = [a.detach().clone().requires_grad_() for a in (x, w, kwargs["linear_bias"])]
            loss = fn(xs[0], xs[1], t, linear_bias=xs[2], reduction=reduction,
                      ignore_index=-100, **kw)
            grads[name] = torch.autograd.grad(loss * upstream, xs)
        if ignored == slice(None):
            for got, want in zip(grads["fusedce"], grads["pytorch"]):
                assert not want.any() and not got.any(), got
        else:
            rows = torch.zeros(6, dtype=torch.bool)
            rows[ignored] = True
            assert not grads["pytorch"][0][rows].any()
            assert not grads["fusedce"][0][rows].any(), grads["fusedce"][0]
            assert not grads["fusedce"][0][~rows].isfinite().any()


def test_unbatched_input():
    x, w, target, kwargs, _ = make_problem(1, 7, 13, torch.float32, bias=True)
    for reduction in ["mean", "none"]:
        upstream = torch.tensor(0.7)
        ref_loss, ref_grads = reference(x[0], w, target[0], kwargs, reduction, upstream)
        loss, grads = run(fusedce.linear_cross_entropy, x[0], w, target[0], kwargs,
                          reduction, upstream)
        assert loss.shape == ()
        assert_close(loss, ref_loss, 2e-5, 2e-5, "loss")
        for g, ref_g in zip(grads, ref_grads):
            assert_close(g, ref_g, 2e-5, 2e-5, "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_backward_recomputes(reduction):
    """retain_graph=True: the 'mean'/'sum' gradients computed in the forward are handed to
    the first backward, a second recomputes them (as 'none' always does), with another
    upstream gradient."""
    x, w, target, _, _ = make_problem(8, 5, 7, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    loss = fusedce.linear_cross_entropy(x, w, target, reduction=reduction, chunk_size=3)
    gen = torch.Generator().manual_seed(5)
    ref = F.cross_entropy(F.linear(x.double(), w.double()), target, reduction=reduction)
    for retain in (True, False):  # the first backward, then the recomputing second
        up = torch.randn(loss.shape, generator=gen)
        got = torch.autograd.grad(loss, [x, w], up, retain_graph=retain)
        want = torch.autograd.grad(ref, [x, w], up.double(), retain_graph=True)
        for g, r, what in zip(got, want, ("input", "weight")):
            assert_close(g, r, 2e-5, 2e-5, f"{what}, retain_graph={retain}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_far_from_zero(backend, reduction):
    """A bias of 2**20 puts every logit far from 0: 'mean' takes its gradient in the
    forward, 'none' and a second backward rebuild it from the saved lse (float64: fp32 kept
    log-sum only to 0.03 there), against float64 PyTorch with random upstream gradients.
    Small integer inputs and weights and a bias in eighths make every logit exact in fp32
    (its spacing there), so the reference sees the same logits."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(-2, 3, (6, 5), generator=gen).float()
    w = torch.randint(-2, 3, (9, 5), generator=gen).float()
    target = torch.randint(0, 9, (6,), generator=gen)
    b = 2.0 ** 20 + torch.randint(-16, 17, (9,), generator=gen).float() / 8
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = fusedce.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2],
                                        reduction=reduction, chunk_size=4, backend=backend)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref = F.cross_entropy(F.linear(ref_leaves[0], ref_leaves[1], ref_leaves[2]), target,
                          reduction=reduction)
    assert_close(loss, ref, 2e-5, 2e-5, "loss")
    for retain in (True, False):
        up = torch.randn(loss.shape, generator=gen)
        got = torch.autograd.grad(loss, leaves, up, retain_graph=retain)
        want = torch.autograd.grad(ref, ref_leaves, up.double(), retain_graph=True)
        for g, r, what in zip(got, want, ("input", "weight", "bias")):
            assert_close(g, r, 2e-5, 2e-5, f"{what}, retain_graph={retain}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_sizes(backend):
    """A hidden size of 0 (logits all 0: the loss log C) and a head of no class with every
    target ignored (PyTorch's 0, 0 and NaN): PyTorch's loss and gradient shapes (both
    raised: reshape(-1, 0), and the CPU path's read of x_t; found in review)."""
    gen = torch.Generator().manual_seed(3)
    cases = [((4, 0), (6, 0), torch.randint(0, 6, (4,), generator=gen)),
             ((0,), (6, 0), torch.tensor(2)),
             ((4, 3), (0, 3), torch.full((4,), -100))]
    for x_shape, w_shape, target in cases:
        for reduction in ("mean", "sum", "none"):
            x = torch.randn(x_shape, generator=gen, requires_grad=True)
            w = torch.randn(w_shape, generator=gen, requires_grad=True)
            want = F.linear_cross_entropy(x, w, target, reduction=reduction)
            got = fusedce.linear_cross_entropy(x, w, target, reduction=reduction,
                                               backend=backend)
            torch.testing.assert_close(got, want, equal_nan=True)
            got_grads = torch.autograd.grad(got.sum(), (x, w))
            want_grads = torch.autograd.grad(want.sum(), (x, w))
            for g, r in zip(got_grads, want_grads):
                torch.testing.assert_close(g, r, equal_nan=True)


def test_autocast_matches_pytorch():
    """Under CPU autocast F.linear runs in bf16 and the loss comes out in fp32."""
    x, w, target, _, _ = make_problem(16, 32, 50, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear_cross_entropy(x, w, target)
        loss = fusedce.linear_cross_entropy(x, w, target)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    # computed in fp32 from the bf16 logits and never rounded to bf16 on the way out: within
    # fp32 rounding of the float64 loss of those logits (a bf16 result is 4e-3 off)
    logits = (x.bfloat16() @ w.bfloat16().t()).double()
    exact = F.cross_entropy(logits, target)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16],
                         ids=["fp64-left-alone", "fp16-cast-to-bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_autocast_casts_what_pytorch_casts(dtype, bias):
    """Autocast casts float32 / float16 / bfloat16 operands of F.linear to its dtype, and
    leaves float64 ones alone: float64 inputs keep their float64 loss and gradients."""
    x, w, target, kwargs, gen = make_problem(12, 16, 50, dtype, bias=bias)
    x = x * 2  # logits of std ~6: a bf16 rounding of them moves the loss by ~1e-2
    upstream = torch.rand((), generator=gen) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = run(F.linear_cross_entropy, x, w, target, kwargs, "mean",
                                  upstream)
        loss, grads = run(fusedce.linear_cross_entropy, x, w, target, kwargs, "mean",
                          upstream)
    assert loss.dtype == ref_loss.dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(loss, ref_loss, tol, tol, "loss")
    for g, ref_g in zip(grads, ref_grads):
        assert g.dtype == ref_g.dtype
        assert_close(g, ref_g, tol if dtype == torch.float64 else 2e-2, tol, "grad")


@pytest.mark.parametrize("options", [{"batch_chunk_size": 2}, {"batch_chunk_size": -3},
                                     "chunk 2"], ids=["dict", "dict-negative", "str"])
def test_options_must_be_linear_cross_entropy_options(options):
    """Anything but a LinearCrossEntropyOptions as ``options`` is PyTorch's AttributeError,
    not silently ignored."""
    x, w, t = _linear_args()
    with pytest.raises(AttributeError):
        F.linear_cross_entropy(x, w, t, options=options)
    with pytest.raises(AttributeError, match="LinearCrossEntropyOptions"):
        fusedce.linear_cross_entropy(x, w, t, options=options)


@pytest.mark.parametrize("value,error", [
    (2.9, TypeError), (2.0, TypeError), ("4", TypeError), (True, TypeError),
    (0, ValueError), (-3, ValueError)])
def test_chunk_size_must_be_a_positive_int(value, error):
    """A float chunk size is not truncated nor a str parsed; LinearCrossEntropyOptions
    refuses the same values of ``batch_chunk_size`` (its ValueError for all)."""
    x, w, t = _linear_args()
    with pytest.raises(error, match="chunk_size"):
        fusedce.linear_cross_entropy(x, w, t, chunk_size=value)
    if value is not True:  # (LinearCrossEntropyOptions takes True, an int, as 1)
        with pytest.raises(ValueError, match="batch_chunk_size"):
            torch.nn.LinearCrossEntropyOptions(batch_chunk_size=value)


def test_chunk_size_takes_numpy_integers():
    np = pytest.importorskip("numpy")
    x, w, t = _linear_args()
    torch.testing.assert_close(fusedce.linear_cross_entropy(x, w, t, chunk_size=np.int64(3)),
                               F.linear_cross_entropy(x, w, t), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("args,error", [
    (dict(x=(2, 3, 4)), "dimensionality 1 or 2"),
    (dict(w=(3,)), "at least 2"),
    (dict(w=(5, 4)), "in_features"),
    (dict(b=(4,)), "linear_bias shape"),
    (dict(t_dtype=torch.int32), "Long or Byte, but got Int$"),
])
def test_errors_match_pytorch(args, error):
    """The same exception type and message as F.linear_cross_entropy (int32: PyTorch's
    name of the dtype, Int)."""
    x = torch.randn(*args.get("x", (2, 3)))
    w = torch.randn(*args.get("w", (5, 3)))
    b = torch.randn(*args["b"]) if "b" in args else None
    t = torch.zeros(x.shape[:-1], dtype=args.get("t_dtype", torch.int64))
    with pytest.raises(RuntimeError, match=error):
        F.linear_cross_entropy(x, w, t, linear_bias=b)
    with pytest.raises(RuntimeError, match=error):
        fusedce.linear_cross_entropy(x, w, t, linear_bias=b)


def test_bad_reduction_raises():
    """A bad reduction is PyTorch's ValueError."""
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="reduction"):
        fusedce.linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long), reduction="avg")


def _linear_args():
    return torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])


def test_linear_weight_requiring_grad_raises():
    x, W, t = _linear_args()
    w = torch.rand(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        F.linear_cross_entropy(x, W, t, weight=w).backward()
    with pytest.raises(RuntimeError, match="not differentiable"):
        fusedce.linear_cross_entropy(x, W, t, weight=w).backward()
    assert w.grad is None


@pytest.mark.parametrize("smoothing", [1.5, -0.1], ids=["above-1", "negative"])
def test_linear_label_smoothing_out_of_range_raises_runtime_error(smoothing):
    x, W, t = _linear_args()
    if smoothing > 1:
        with pytest.raises(RuntimeError, match="label_smoothing"):
            F.linear_cross_entropy(x, W, t, label_smoothing=smoothing)
    # negative: PyTorch accepts it, fusedce raises (deliberate, as fusedce.cross_entropy)
    with pytest.raises(RuntimeError, match="label_smoothing"):  # fusedce's own check
        fusedce.cross_entropy(x @ W.t(), t, label_smoothing=smoothing, backend="torch")
    with pytest.raises(RuntimeError, match="label_smoothing"):
        fusedce.linear_cross_entropy(x, W, t, label_smoothing=smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("grad", [True, False])
def test_out_of_range_target_raises_on_cpu(backend, reduction, grad):
    """On the CPU an out-of-range class index raises PyTorch's IndexError with its message,
    a negative one other than ``ignore_index`` too, K-dimensional weights too, with and
    without a gradient (on a GPU it gives NaN rows: no host sync); ``ignore_index`` itself
    is no error."""
    gen = torch.Generator().manual_seed(8)
    h, w = torch.randn(5, 8, generator=gen), torch.randn(10, 8, generator=gen)
    h = h.requires_grad_(grad)
    w3 = torch.randn(10, 3, 8, generator=gen)
    cases = [(w, torch.tensor([1, 10, 2, 3, 9])), (w, torch.tensor([1, 4, 2, -3, 9])),
             (w3, torch.tensor([[1, 2, 3]] * 4 + [[0, 12, -100]]))]
    for weight, t in cases:
        with pytest.raises(IndexError) as theirs:
            F.linear_cross_entropy(h, weight, t, reduction=reduction)
        with pytest.raises(IndexError) as ours:
            fusedce.linear_cross_entropy(h, weight, t, reduction=reduction, backend=backend)
        assert str(ours.value) == str(theirs.value)
    t = torch.tensor([1, -100, 2, 0, 9])
    torch.testing.assert_close(
        fusedce.linear_cross_entropy(h, w, t, reduction=reduction, backend=backend),
        F.linear_cross_entropy(h, w, t, reduction=reduction), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_uint8_target_156_linear(backend, reduction):
    """A uint8 class index 156 is a class, not ignore_index -100 wrapped to uint8, in the
    loss and in the gradients (with an upstream gradient other than 1, which the backward
    multiplies in per row)."""
    gen = torch.Generator().manual_seed(13)
    h, W = torch.randn(4, 8, generator=gen), torch.randn(200, 8, generator=gen)
    t = torch.tensor([156, 1, 156, 2], dtype=torch.uint8)
    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    ref = F.cross_entropy(h64 @ W64.t(), t.long(), reduction=reduction)
    ref_grads = torch.autograd.grad(ref * 2.5, (h64, W64))
    hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = fusedce.linear_cross_entropy(hf, Wf, t, reduction=reduction, backend=backend)
    grads = torch.autograd.grad(out * 2.5, (hf, Wf))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_strided_target_and_weight(backend, reduction):
    n, h, v = 16, 8, 19
    x, W = torch.randn(n, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64)
    t = torch.randint(0, v, (2 * n,))[::2]  # stride 2
    w = (torch.rand(2 * v, dtype=torch.float64) + 0.1)[::2]  # stride 2
    ref = F.cross_entropy(x @ W.t(), t, weight=w, reduction=reduction)
    out = fusedce.linear_cross_entropy(x.float(), W.float(), t, weight=w.float(),
                                       reduction=reduction, backend=backend)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("upcast", [True, False], ids=["cpu-fp32-product", "gpu-scratch"])
def test_bf16_weight_gradient_accumulators(upcast):
    """Both ways of summing bf16 chunk products into the fp32 weight gradient (the GPU's
    bf16 scratch runs here on CPU tensors) against the float64 sum over the chunks."""
    gen = torch.Generator().manual_seed(3)
    n, h, v, rows = 40, 12, 30, 16
    x = torch.randn(n, h, generator=gen).bfloat16()
    w = torch.randn(v, h, generator=gen).bfloat16()
    dlogits = torch.randn(n, v, generator=gen).bfloat16()
    acc = GradAccumulator(x, w, True, True, True, upcast=upcast)
    for s in range(0, n, rows):
        acc.add(dlogits[s:s + rows], x[s:s + rows], s, min(s + rows, n))
    assert acc.grad_weight.dtype == acc.grad_bias.dtype == torch.float32
    want = dlogits.double().t() @ x.double()
    if upcast:  # bf16 x bf16 products are exact in fp32: fp32 sums only
        assert_close(acc.grad_weight, want, 1e-6, 1e-5, "weight")
    else:  # each chunk's product stored in bf16, then summed in fp32: an ulp (2**-8
        # relative) of the terms' magnitudes (a CPU bf16 product may round partial sums too)
        bound = (dlogits.double().abs().t() @ x.double().abs()) * 2.0 ** -8 + 1e-6
        err = (acc.grad_weight.double() - want).abs()
        assert (err <= bound).all(), (err - bound).max()
        assert err.max() > 0  # the scratch's rounding is there: the other way is tested
    assert_close(acc.grad_bias, dlogits.double().sum(0), 1e-6, 1e-5, "bias")
    # the input's gradient is bf16: one rounding of an fp32-accumulated product
    assert_close(acc.grad_input, dlogits.double() @ w.double(), 1e-6, 2.0 ** -8, "input")


@pytest.mark.parametrize("targets", ["indices", "probabilities"])
def test_fp16_with_a_loss_scale_matches_unfused_fp16(targets):
    """fp16 under a GradScaler-style loss scale (x 1024), 'mean' over 256 tokens of 32,000
    classes: the gradients of the input and the weight are as accurate against float64 as
    PyTorch's unfused fp16 loss under the same scale (relative error ~3e-4; fusedce stored
    each chunk's gradient before the scale arrived and kept 1e-3), and no more entries are
    flushed to zero. The mean's gradients are stored as the sum's would be."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=gen)
    w = torch.randn(32_000, 64, generator=gen) * 0.05
    t = torch.randint(0, 32_000, (256,), generator=gen)
    if targets == "probabilities":
        t = torch.softmax(torch.randn(256, 32_000, generator=gen) * 3, 1)

    def grads(dtype, fn, scale):
        xx, ww = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        tt = t.to(dtype) if t.is_floating_point() else t
        (fn(xx, ww, tt) * scale).backward()
        return xx.grad.double() / scale, ww.grad.double() / scale

    unfused = lambda a, b, c: F.cross_entropy(F.linear(a, b), c)  # noqa: E731
    ref = grads(torch.float64, unfused, 1.0)
    ours = grads(torch.float16, lambda a, b, c: fusedce.linear_cross_entropy(
        a, b, c, chunk_size=64), 1024.0)
    theirs = grads(torch.float16, unfused, 1024.0)
    for r, g, p in zip(ref, ours, theirs):
        flushed = lambda v: ((v == 0) & (r != 0)).double().mean()  # noqa: E731,B023
        assert flushed(g) <= flushed(p)
        err, torch_err = ((g - r).norm() / r.norm()).item(), ((p - r).norm() / r.norm()).item()
        assert err <= 1.05 * torch_err, (err, torch_err)
