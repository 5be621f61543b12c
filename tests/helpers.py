"""Helpers shared by the test files (imported as ``helpers``: pytest puts tests/ on sys.path)."""

import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fusedce

REPO_ROOT = Path(__file__).resolve().parents[1]

# the two implementations every value case runs: the Triton kernels (under Triton's
# interpreter on a machine without a GPU) and the PyTorch implementation
BACKENDS = ["triton", "torch"]

# (dtype, atol, rtol): fp32 is exact up to accumulation order; bf16/fp16 results are
# computed in fp32 and rounded to nearest (conftest makes Triton's interpreter round as a
# GPU does) at most twice (the CPU path stores the gradient in the forward and scales it by
# the upstream gradient in the backward): two half-ulps, 2**-7 relative in bf16 and 2**-10
# in fp16, and an atol for results below the format's normal range.
DTYPES = [
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-6, 2**-7 + 1e-5, id="bf16"),
    pytest.param(torch.float16, 1e-7, 2**-10 + 1e-5, id="fp16"),
]

ATOL, RTOL = 2e-5, 2e-5  # fp32 results against float64 ones: accumulation order only

_PARAM = type(pytest.param())  # what pytest.param returns


def kernel_share(i, backend, every=8, rest=(pytest.mark.slow,)):
    """The marks of the ``i``-th of PyTorch's own samples on ``backend``: under Triton's
    interpreter (a second or more per sample) every ``every``-th sample is in the quick
    spec (``-m "not slow"``) and the others get ``rest``: by default only ``slow`` (the
    full run has them); on the PyTorch path every sample is in both."""
    return list(rest) if backend == "triton" and i % every else []


def combine(*lists, slow=None):
    """The cross product of parameter lists, as one list for one ``parametrize``.

    Gives what stacking one ``parametrize`` per list would (values in order, ids joined by
    '-', first list first), so node ids do not change, but each combination can be marked
    ``slow`` on its own: ``slow(ids)`` gets the tuple of ids, one per list. Plain values
    (not ``pytest.param``) take ``str(value)`` as their id.
    """
    params = [[p if isinstance(p, _PARAM) else pytest.param(p, id=str(p)) for p in lst]
              for lst in lists]
    out = []
    for combo in itertools.product(*params):
        ids = tuple(p.id for p in combo)
        marks = [m for p in combo for m in p.marks]
        if slow is not None and slow(ids):
            marks.append(pytest.mark.slow)
        out.append(pytest.param(*(v for p in combo for v in p.values), id="-".join(ids),
                                marks=marks))
    return out


def gpt2_under_interpreter(ids):
    """For ``combine(..., slow=...)``: the combinations that run the GPT-2 vocabulary (an id
    naming 'gpt2') through the Triton kernels, which the interpreter runs in Python."""
    return "triton" in ids and any("gpt2" in i for i in ids)


def checkout_env(**changes):
    """``os.environ`` with the checkout first on PYTHONPATH, for a subprocess that imports
    ``bench`` and this checkout's fusedce; ``changes`` set more variables."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **changes)


# ------------------------------------------------------------------------------------------
# Inputs, and F.cross_entropy on float64 copies as the reference


def make_inputs(n, c, dtype, seed=0, scale=3.0):
    """(n, c) logits of standard deviation ``scale`` in ``dtype``, class-index targets, and
    the generator (seeded) for whatever else the case draws."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=gen) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=gen)
    return x, target, gen


def logits_and_targets(n, c, seed=0, scale=3.0):
    """``make_inputs`` in fp32, without the generator."""
    return make_inputs(n, c, torch.float32, seed, scale)[:2]


def reference(x, target, upstream=None, **kwargs):
    """Loss and gradient of F.cross_entropy on a float64 copy of ``x``, and the upstream
    gradient taken.

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
    (grad,) = torch.autograd.grad(loss, x64, upstream.double())
    return loss.detach(), grad, upstream


def fused(x, target, upstream, **kwargs):
    """Loss and gradient of fusedce.cross_entropy on a copy of ``x``."""
    x = x.detach().clone().requires_grad_()
    loss = fusedce.cross_entropy(x, target, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype))
    return loss.detach(), grad


def assert_close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def option_kwargs(options, c, gen):
    """The call's keyword arguments from an options dict (``weight: True`` draws one)."""
    kw = dict(options)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(c, generator=gen) + 0.5
    return kw


def run_both(x, target, upstream=None, atol=2e-5, rtol=2e-5, check_target_grad=False,
             **kwargs):
    """Loss and gradients of fusedce and of F.cross_entropy (float64) on the same values;
    asserts they agree and returns fusedce's loss."""
    soft = target.is_floating_point()
    fkw = {k: v for k, v in kwargs.items() if k not in ("backend", "inplace_backward")}
    if fkw.get("weight") is not None:
        fkw["weight"] = fkw["weight"].double()
    x64 = x.detach().double().requires_grad_()
    t64 = target.detach().double().requires_grad_(check_target_grad) if soft else target
    ref = F.cross_entropy(x64, t64, **fkw)
    if upstream is None:
        gen = torch.Generator().manual_seed(1234)
        upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    inputs64 = [x64] + ([t64] if check_target_grad else [])
    ref_grads = torch.autograd.grad(ref, inputs64, upstream)

    xf = x.detach().requires_grad_()  # keeps x's strides
    tf = target.detach().requires_grad_(check_target_grad) if soft else target
    loss = fusedce.cross_entropy(xf, tf, **kwargs)
    assert loss.shape == ref.shape
    inputs = [xf] + ([tf] if check_target_grad else [])
    grads = torch.autograd.grad(loss, inputs, upstream.to(loss.dtype))
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol, equal_nan=True)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        torch.testing.assert_close(g.double(), r, atol=atol, rtol=rtol, equal_nan=True)
    return loss


def logits(shape, dtype=torch.float32, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def indices(shape, n_classes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_classes, shape, generator=gen)


def probabilities(shape, dtype=torch.float32, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=gen) * 2, dim=1).to(dtype)


def leave_rank():
    """Ends a gloo rank of a test once its process group is destroyed and its results are
    written, without interpreter finalization: FSDP2 and DTensor keep the group's threads
    alive into it, where one may abort the process after the work is done
    (examples/fsdp_vocab_parallel.py, ``leave_without_finalizing``, says how)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
