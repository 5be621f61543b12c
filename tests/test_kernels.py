"""The Triton kernels and their launchers against the PyTorch implementation, and which of
the two a call runs.

Without a GPU the kernels run under Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1). Fresh buffers start as NaN here (tests/nan_fill.py), so an element a
kernel forgot to write shows up as NaN instead of as whatever the memory held. How many bytes
the kernels move is in test_traffic.py; their compiles for real GPUs in test_gpu_compile.py.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, fused, make_inputs

import fusedce

pytestmark = pytest.mark.usefixtures("nan_filled_outputs")  # a missed store shows as NaN


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


def test_kernel_launchers_strided_target_and_weight():
    from fusedce import kernels

    x = torch.randn(6, 11)
    t = torch.randint(0, 11, (12,))[::2]
    w = (torch.rand(22) + 0.1)[::2]
    ref = F.cross_entropy(x.double(), t, weight=w.double(), reduction="none")
    loss, lse = kernels.ce_fwd(x, t, weight=w)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t, weight=w.double(), reduction="sum").backward()
    dx = kernels.ce_bwd(x, t, lse, torch.ones(6), weight=w)
    torch.testing.assert_close(dx.double(), x64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_16_bit_logits_with_float64_weights(dtype, soft):
    """16-bit logits with float64 class weights are computed in float64 (the strided
    kernels' IS_FP64), the gradients narrowed into the logits' and targets' dtypes through
    fp32. Triton's interpreter casts float64 straight to bfloat16 as if to an integer: the
    kernels' gradient was all denormals (found in review). Both backends, against float64
    PyTorch with a random upstream gradient, within 16-bit rounding."""
    x, t, gen = make_inputs(5, 37, dtype, seed=3)
    w = torch.rand(37, generator=gen, dtype=torch.float64) + 0.5
    target = torch.softmax(torch.randn(5, 37, generator=gen), 1).to(dtype) if soft else t
    upstream = torch.randn(5, generator=gen, dtype=torch.float64)
    opts = dict(weight=w, label_smoothing=0.1, reduction="none")
    leaves64 = [x.double().requires_grad_()] + ([target.double().requires_grad_()]
                                                 if soft else [])
    ref = F.cross_entropy(leaves64[0], leaves64[1] if soft else t, **opts)
    want = torch.autograd.grad(ref, leaves64, upstream)
    for backend in ("triton", "torch"):
        leaves = [x.clone().requires_grad_()] + ([target.clone().requires_grad_()]
                                                 if soft else [])
        loss = fusedce.cross_entropy(leaves[0], leaves[1] if soft else t, backend=backend,
                                     **opts)
        got = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
        assert_close(loss, ref, 1e-2, 1e-2, f"{backend} loss")
        for g, r, what in zip(got, want, ("logits", "target")):
            assert g.dtype == dtype, (backend, what)
            assert_close(g, r, 1e-2 * float(r.abs().max()), 1e-2, f"{backend} {what} grad")


def test_launch_config_allocates_nothing(monkeypatch):
    from fusedce.kernels import cross_entropy as ce

    def no_alloc(*args, **kwargs):
        raise AssertionError("launch_config allocated a tensor")

    monkeypatch.setattr(ce.torch, "empty", no_alloc)
    assert ce.launch_config(torch.bfloat16, 50_257) == (8192, 8, 8)
    assert ce.launch_config(torch.float32, 50_257) == (8192, 16, 4)


def test_auto_backend_on_cpu_is_torch(monkeypatch, own_path):
    """'auto' never touches the kernels for CPU tensors (no Triton needed on the CPU); on
    fusedce's own path, where a call this small is not handed to PyTorch."""
    from fusedce import _args

    monkeypatch.setattr(_args, "_kernels", lambda: pytest.fail("kernels used on CPU"))
    x, target, _ = make_inputs(2, 10, torch.float32)
    fusedce.cross_entropy(x, target)


def test_fresh_buffers_start_as_nan():
    """The module's NaN fill is in force, so the comparisons above would catch a missed store."""
    assert torch.empty(4).isnan().all() and torch.empty_like(torch.zeros(2, 3)).isnan().all()


# ------------------------------------------------- few long rows: several programs per row

SPLIT_CASES = [
    pytest.param(torch.float32, 50_257, 5, {}, id="fp32-gpt2-5splits"),
    pytest.param(torch.bfloat16, 50_257, 7, dict(label_smoothing=0.2), id="bf16-smoothing"),
    pytest.param(torch.float32, 128_256, 3, dict(weight=True, label_smoothing=0.1),
                 id="llama3-weight-smoothing"),
    pytest.param(torch.float16, 1_001, 4, dict(ignore_index=3), id="fp16-odd-ignore"),
    pytest.param(torch.float32, 9, 9, {}, id="one-column-per-split"),
]


@pytest.mark.parametrize("inplace", [False, True], ids=["grad-buffer", "inplace"])
@pytest.mark.parametrize("dtype,n_cols,splits,options", SPLIT_CASES)
def test_split_rows_match_pytorch(monkeypatch, dtype, n_cols, splits, options, inplace):
    """Rows split over several programs (what a GPU does with fewer rows than SMs), forced
    here, against float64 PyTorch: loss and gradient with a random upstream gradient, an
    ignored row, a target in the last column, and in place (each split reads its columns
    before it overwrites them)."""
    from fusedce.kernels import split_rows

    monkeypatch.setattr(split_rows, "FORCE_SPLITS", splits)
    gen = torch.Generator().manual_seed(n_cols)
    x = (torch.randn(3, n_cols, generator=gen) * 3).to(dtype)
    target = torch.tensor([n_cols - 1, 3, n_cols // 2])
    kwargs = dict(options)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(n_cols, generator=gen) + 0.5
    upstream = torch.rand(3, generator=gen)
    leaf = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(leaf * 1, target, reduction="none", backend="triton",
                                 inplace_backward=inplace, **kwargs)
    grad, = torch.autograd.grad(loss, leaf, upstream.to(dtype))
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, target, reduction="none",
                          **{k: v.double() if torch.is_tensor(v) else v
                             for k, v in kwargs.items()})
    ref_grad, = torch.autograd.grad(ref, x64, upstream.double())
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(loss.double(), ref.to(dtype).double(), atol=tol * 8,
                               rtol=tol)
    torch.testing.assert_close(grad.double(), ref_grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("shift", [1e4, -1e8])
def test_split_rows_far_from_zero(monkeypatch, shift):
    """Split rows far from 0: each split's partial keeps its max and log-sum apart (their
    fp32 sum, at 1e4, lost log-sum to 5e-4 and at 1e8 entirely), merged into the row's
    loss, float64 lse, gradient and aux outputs; weights and smoothing ride on the same
    sums. Splits of 4, 4 and 3 columns (one holding the max, the target elsewhere)."""
    from fusedce.kernels import split_rows

    monkeypatch.setattr(split_rows, "FORCE_SPLITS", 3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, generator=gen) * 6 + shift
    x[0] = shift  # every class equal
    target = torch.tensor([0, 10, 4])
    weight = torch.rand(11, generator=gen) + 0.5
    upstream = torch.rand(3, generator=gen, dtype=torch.float64)
    for kwargs in ({}, dict(weight=weight, label_smoothing=0.2)):
        leaf = x.clone().requires_grad_()
        out = fusedce.cross_entropy(leaf, target, reduction="none", backend="triton",
                                    return_aux=True, **kwargs)
        grad, = torch.autograd.grad(out.loss, leaf, upstream.float())
        x64 = x.double().requires_grad_()
        ref = F.cross_entropy(x64, target, reduction="none",
                              **{k: v.double() if torch.is_tensor(v) else v
                                 for k, v in kwargs.items()})
        ref_grad, = torch.autograd.grad(ref, x64, upstream)
        assert_close(out.loss, ref.detach(), 2e-5, 2e-5, "loss")
        assert_close(out.lse, torch.logsumexp(x64, 1).detach(), 2e-5, 2e-5, "lse")
        p = torch.softmax(x64.detach(), 1)
        entropy = -(p * torch.log_softmax(x64.detach(), 1)).sum(1)
        assert_close(out.entropy, entropy, 2e-5, 2e-5, "entropy")
        assert_close(grad, ref_grad, 2e-5, 2e-5, "gradient")


def test_split_rows_sum_and_mean_equal_the_row_kernels(monkeypatch):
    """Split or not, the same reduced loss and gradient (up to the order of fp32 sums)."""
    from fusedce.kernels import split_rows

    x, target, _ = make_inputs(4, 50_257, torch.float32, seed=5)
    results = []
    for splits in (None, 6):
        monkeypatch.setattr(split_rows, "FORCE_SPLITS", splits)
        leaf = x.clone().requires_grad_()
        loss = fusedce.cross_entropy(leaf, target, backend="triton", label_smoothing=0.1)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-8, rtol=1e-5)


def test_split_count_follows_the_device(monkeypatch):
    """Rows are split only with fewer rows than SMs, into splits of at least
    MIN_SPLIT_COLS columns, about two programs per SM; never off a GPU unless forced."""
    from fusedce.kernels import split_rows

    monkeypatch.setattr(split_rows, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert split_rows.split_count(132, 50_257, cuda) == 1  # a program per row fills it
    assert split_rows.split_count(1, 50_257, cuda) == 50_257 // split_rows.MIN_SPLIT_COLS
    assert split_rows.split_count(8, 256_000, cuda) == 33  # 264 programs for 132 SMs
    assert split_rows.split_count(1, 1_000, cuda) == 1  # too narrow to split
    assert split_rows.split_count(2, 10**7, cuda) == split_rows.MAX_SPLITS
    assert split_rows.split_count(1, 50_257, torch.device("cpu")) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's conversion; "
                    "a GPU rounds by itself")
def test_interpreter_rounds_bfloat16_like_the_gpu():
    """tests/conftest.py makes Triton's interpreter round float32 to bfloat16 to nearest
    even, as the GPU and PyTorch do (it truncated): ties both ways, a carry into the
    exponent, overflow to inf, inf, NaN, -0, subnormals."""
    import triton
    import triton.language as tl

    @triton.jit
    def store(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs))

    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 1.9999, -1.8084, 0.0835,
                      3.4e38, float("inf"), float("-inf"), float("nan"), -0.0, 1e-40,
                      -3e-39, 65504.0, 2**-133, 1.0])
    y = torch.empty(16, dtype=torch.bfloat16)
    store[(1,)](x, y, N=16)
    assert torch.equal(y.view(torch.int16), x.bfloat16().view(torch.int16))


def test_launchers_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every launcher sets it to the first
    argument's device where that is another one (no GPU here: a stand-in tensor that says
    it is on cuda:1 while cuda:0 is current, and a recording torch.cuda.device)."""
    import contextlib
    from types import SimpleNamespace

    import fusedce.kernels as kernels

    entered, current = [], {"index": 0}

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        saved, current["index"] = current["index"], d.index
        try:
            yield
        finally:
            current["index"] = saved

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    launch = kernels._on_the_tensors_device(lambda x, *a, **k: seen.append(current["index"]))
    on_1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    on_0 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    launch(on_1, 2, k=3)
    launch(on_0)
    launch(torch.zeros(1))
    assert seen == [1, 0, 0] and entered == [torch.device("cuda", 1)]
    wrapped = ["ce_fwd", "ce_bwd", "ce_scale_", "ce_strided_fwd", "ce_strided_bwd",
               "vp_partials", "vp_grad"]
    assert all(getattr(kernels, name).__wrapped__ is not None for name in wrapped)
