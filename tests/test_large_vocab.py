"""The vocabularies of current LLMs (Llama 3's 128,256 classes, Gemma's 256,000) on both
backends, with and without the loss extras, and offsets past 2**31 elements.

A (8,192 x 262,144) logits tensor holds 2**31 elements: a row offset or element index kept in
32 bits wraps there. The offset tests lay rows 2**31 - 1 elements apart (a strided view of a
large, mostly untouched allocation: pages never written cost no memory). The stride still
fits in 32 bits, so Triton passes it as an int32, and the third row's offset, 2**32 - 2,
wraps unless the kernel widens the row index to 64 bits before multiplying (checked: with
``tl.program_id(0)`` left in int32 these tests fail).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import combine
from test_extras import reference

import fusedce

pytestmark = pytest.mark.usefixtures("own_path")

VOCABS = [pytest.param(128256, id="llama3"), pytest.param(256000, id="gemma")]
EXTRAS = dict(logit_scale=0.8, softcap=30.0, lse_square_scale=1e-4)
# one unit in the last place of bf16, relative: results computed in fp32 and rounded once
BF16_ULP = 2.0 ** -7


@pytest.mark.parametrize("backend,n_cols,extras", combine(
    ["torch", "triton"], VOCABS, [pytest.param(False, id="plain"),
                                  pytest.param(True, id="extras")]))
def test_large_vocabulary(backend, n_cols, extras, nan_filled_outputs):
    """Loss and gradient of three bf16 rows (one ignored) with weights and smoothing, each
    entry within one bf16 ulp (2**-7, relative) of float64 PyTorch: the smallest gradient
    entries included (a missed store shows as NaN)."""
    gen = torch.Generator().manual_seed(n_cols % 97)
    x = (torch.randn(3, n_cols, generator=gen) * 4).bfloat16()
    t = torch.tensor([n_cols - 1, -100, 12345])
    w = torch.rand(n_cols, generator=gen) + 0.5
    kw = EXTRAS if extras else {}
    xf = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(xf, t, w, reduction="none", label_smoothing=0.1,
                                 backend=backend, **kw)
    upstream = torch.randn(3, generator=gen, dtype=torch.float64)
    (loss.double() * upstream).sum().backward()
    xr = x.double().requires_grad_()
    ref = reference(xr, t, w, reduction="none", label_smoothing=0.1, **kw)[0]
    (ref * upstream).sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=BF16_ULP, atol=1e-6)
    scale = xr.grad.abs().max().item()
    torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=BF16_ULP, atol=1e-6 * scale)


ROW_STRIDE = 2 ** 31 - 1


def _far_rows(n_cols, class_stride=1):
    """Three bf16 rows of ``n_cols`` classes ``class_stride`` apart, each row starting
    ``ROW_STRIDE`` elements after the one before, over memory never otherwise touched."""
    base = torch.empty(2 * ROW_STRIDE + class_stride * n_cols, dtype=torch.bfloat16)
    x = base.as_strided((3, n_cols), (ROW_STRIDE, class_stride))
    x.copy_(torch.randn(3, n_cols, generator=torch.Generator().manual_seed(0)) * 3)
    return x


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["rows", "strided"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
def test_offsets_past_2_31(backend, layout, inplace):
    """The third row lies 2**32 - 2 elements in: loss, gradient (into a new tensor or over
    the logits) and the extras' path all read and write it there."""
    n_cols = 1000
    x = _far_rows(n_cols, 1 if layout == "rows" else 2)
    t = torch.tensor([3, 777, 999])
    expected = x.double()  # before an in-place gradient overwrites x
    for kw in ({}, EXTRAS):
        xf = x.requires_grad_()
        loss = fusedce.cross_entropy(xf, t, reduction="sum", backend=backend,
                                     inplace_backward=inplace, **kw)
        xr = expected.clone().requires_grad_()
        ref = reference(xr, t, reduction="sum", **kw)[0]
        ref.backward()
        grad, = torch.autograd.grad(loss, xf)
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=BF16_ULP, atol=1e-6)
        torch.testing.assert_close(grad.double(), xr.grad, rtol=BF16_ULP, atol=1e-9)
        x = x.detach()
        x.copy_(expected)  # the logits again, after an in-place gradient
        assert F.cross_entropy(x.double(), t, reduction="sum").item() == pytest.approx(
            F.cross_entropy(expected, t, reduction="sum").item())
