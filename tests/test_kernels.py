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


def test_launch_config_allocates_nothing(monkeypatch):
    from fusedce.kernels import cross_entropy as ce

    def no_alloc(*args, **kwargs):
        raise AssertionError("launch_config allocated a tensor")

    monkeypatch.setattr(ce.torch, "empty", no_alloc)
    assert ce.launch_config(torch.bfloat16, 50_257) == (8192, 8, 8)
    assert ce.launch_config(torch.float32, 50_257) == (8192, 16, 4)


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    """'auto' never touches the kernels for CPU tensors (no Triton needed on the CPU)."""
    from fusedce import _args

    monkeypatch.setattr(_args, "_kernels", lambda: pytest.fail("kernels used on CPU"))
    x, target, _ = make_inputs(2, 10, torch.float32)
    fusedce.cross_entropy(x, target)


def test_fresh_buffers_start_as_nan():
    """The module's NaN fill is in force, so the comparisons above would catch a missed store."""
    assert torch.empty(4).isnan().all() and torch.empty_like(torch.zeros(2, 3)).isnan().all()
