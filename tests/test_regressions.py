"""Regression tests for the review findings: each fails before its fix and passes after.

The kernel cases run the Triton launchers under TRITON_INTERPRET=1 (see conftest.py), so the
shapes are tiny; references are PyTorch's loss on a float64 copy.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fusedce

BACKENDS = ["triton", "torch"]


def _ref(x, t, **kw):
    """PyTorch's loss and gradient on a float64 copy of ``x``."""
    x64 = x.detach().double().requires_grad_()
    loss = F.cross_entropy(x64, t, **kw)
    loss.backward()
    return loss.detach(), x64.grad


# --- 1: double backward raises instead of returning a wrong Hessian-vector product --------

DOUBLE_BACKWARD_CASES = [
    pytest.param((2, 5, 3), torch.float32, False, id="strided-NCL"),  # the strided path
    pytest.param((4, 5), torch.float64, False, id="strided-fp64"),  # float64 goes strided
    pytest.param((4, 5), torch.float32, False, id="rows"),
    pytest.param((4, 5), torch.float32, True, id="rows-inplace"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype,inplace", DOUBLE_BACKWARD_CASES)
def test_double_backward_raises(shape, dtype, inplace, backend):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    t = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    loss = fusedce.cross_entropy(x * 1, t, backend=backend, inplace_backward=inplace)
    g, = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((g * g).sum(), x)


def test_double_backward_raises_under_compile():
    """What torch.compile runs raises too (AOTAutograd refuses double backward), never a
    wrong second-order result."""
    x = torch.randn(2, 5, 3, requires_grad=True)
    t = torch.randint(0, 5, (2, 3))
    loss = torch.compile(fusedce.cross_entropy, backend="aot_eager", fullgraph=True)(x, t)
    g, = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((g * g).sum(), x)


def test_first_backward_unchanged_under_create_graph():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (2, 3))
    g, = torch.autograd.grad(fusedce.cross_entropy(x, t), x, create_graph=True)
    torch.testing.assert_close(g.detach(), _ref(x, t)[1])


# --- 2: uint8 targets are compared with ignore_index in int64 -------------------------------


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


def test_uint8_target_156_linear():
    h, W = torch.randn(3, 8), torch.randn(200, 8)
    t = torch.tensor([156, 1, 2], dtype=torch.uint8)
    ref = F.cross_entropy((h @ W.t()).double(), t)
    out = fusedce.linear_cross_entropy(h, W, t)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_uint8_target_out_of_range_raises_like_pytorch():
    x = torch.randn(3, 100)
    t = torch.tensor([156, 1, 2], dtype=torch.uint8)
    with pytest.raises(IndexError, match="156"):
        F.cross_entropy(x, t)  # PyTorch accepts uint8 targets and raises here
    with pytest.raises(IndexError, match="156"):
        fusedce.cross_entropy(x, t)


# --- 3: the in-place mode bumps the logits' version and refuses overlapping rows ------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_logits_saved_by_another_node_raise(backend):
    # tanh saves its output: reading the overwritten logits would give a wrong gradient
    z = torch.randn(4, 7, requires_grad=True)
    t = torch.randint(0, 7, (4,))
    loss = fusedce.cross_entropy(torch.tanh(z), t, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_expanded_logits_fall_back(backend):
    # expanded rows share memory: writing one row's gradient would corrupt the others
    base = torch.randn(1, 7, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    ref_loss, _ = _ref(base.expand(4, 7), t)
    b64 = base.detach().double().requires_grad_()
    F.cross_entropy(b64.expand(4, 7), t).backward()
    loss = fusedce.cross_entropy(base.expand(4, 7), t, backend=backend, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(base.grad.double(), b64.grad, atol=1e-6, rtol=1e-6)


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


# --- 4: fp16 logits do not take the in-place route (a later loss scale would come too late) -


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


# --- 5: non-contiguous targets and class weights on the kernel path -------------------------


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


# --- 6: linear_cross_entropy raises what PyTorch raises -------------------------------------


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
    with pytest.raises(RuntimeError, match="label_smoothing"):
        fusedce.cross_entropy(x @ W.t(), t, label_smoothing=smoothing)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        fusedce.linear_cross_entropy(x, W, t, label_smoothing=smoothing)


# --- 7: inplace_backward leaves the logits intact when no gradient will be taken ------------


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
    torch.testing.assert_close(loss.double(), _ref(before, t)[0], atol=1e-6, rtol=1e-6)


# --- 7b: inference mode with grad mode on records no graph, as PyTorch's ops -------------


@pytest.mark.parametrize("inplace", [False, True])
def test_inference_mode_with_grad_enabled(inplace):
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


# --- 8: validate=None checks CPU tensors only (no host sync for CUDA with backend='torch') --


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


# --- 9: ignore_index takes any Python integer, as PyTorch does -------------------------------


@pytest.mark.parametrize("ignore_index", [np.int64(1), np.int32(1), torch.tensor(1)],
                         ids=["np.int64", "np.int32", "0-d-tensor"])
def test_ignore_index_integer_types(ignore_index):
    x = torch.randn(3, 5)
    t = torch.tensor([0, 1, 2])
    ref = F.cross_entropy(x.double(), t, ignore_index=ignore_index)
    out = fusedce.cross_entropy(x, t, ignore_index=ignore_index)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ignore_index", [1.0, True, torch.tensor(1.0)],
                         ids=["float", "bool", "float-tensor"])
def test_ignore_index_non_integer_raises_type_error(ignore_index):
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="ignore_index"):
        F.cross_entropy(x, t, ignore_index=ignore_index)
    with pytest.raises(TypeError, match="ignore_index"):
        fusedce.cross_entropy(x, t, ignore_index=ignore_index)


# --- 11: the in-place Function keeps only the logits; launch_config allocates nothing ------


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
    torch.testing.assert_close(x.grad.double(), 2 * _ref(2 * x, t)[1], atol=1e-6, rtol=1e-6)


def test_launch_config_allocates_nothing(monkeypatch):
    from fusedce.kernels import cross_entropy as ce

    def no_alloc(*args, **kwargs):
        raise AssertionError("launch_config allocated a tensor")

    monkeypatch.setattr(ce.torch, "empty", no_alloc)
    assert ce.launch_config(torch.bfloat16, 50_257) == (8192, 8, 8)
    assert ce.launch_config(torch.float32, 50_257) == (8192, 16, 4)
