"""Property tests: fusedce.cross_entropy against F.cross_entropy in float64 over generated
cases: input forms (C,), (N, C), (N, C, d1..dK) with K up to 3; memory layouts (contiguous,
classes last, strided classes); vocabulary sizes odd, powers of two and GPT-2's 50,257;
dtypes fp32/bf16/fp16/fp64; every reduction; class weights; ignore_index (the default with
ignored rows, or a real class); label smoothing; class-index and class-probability targets
(with the target's gradient). Loss and gradients (random upstream gradient) must agree.

Both implementations: the PyTorch path (TORCH_EXAMPLES cases) and the Triton kernels under the
interpreter (KERNEL_EXAMPLES cases, smaller shapes). Hypothesis runs derandomized and without
an example database, so CI sees the same cases every run.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedce

# numpy, under Triton's interpreter, warns about the masked-off lanes of a tile (log(0),
# inf - inf): those lanes are never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


TORCH_EXAMPLES = 400
KERNEL_EXAMPLES = 160

VOCABS = [1, 2, 3, 7, 16, 33, 64, 100, 128, 257, 1000, 1024, 8193, 50_257]

# (atol, rtol) against float64; low-precision results are computed in fp32 and rounded once
# (the interpreter truncates fp32 -> bf16: up to 2**-7 relative).
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (5e-5, 5e-5),
    torch.bfloat16: (2e-3, 1.6e-2),
    torch.float16: (5e-4, 2e-3),
}

COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def cases(draw, max_logits):
    """One call's arguments, as a dict of plain values (tensors are built from the seed)."""
    n_classes = draw(st.sampled_from(VOCABS))
    form = draw(st.sampled_from(["C", "NC", "NCd"]))
    rows_cap = max(1, min(12, max_logits // n_classes))
    if form == "C":
        shape = (n_classes,)
    elif form == "NC":
        shape = (draw(st.integers(0, rows_cap)), n_classes)
    else:
        dims = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
        positions = 1
        for d in dims:
            positions *= d
        batch = draw(st.integers(1, 3))
        while batch * positions > rows_cap and (batch > 1 or max(dims) > 1):
            if batch > 1:
                batch -= 1
            else:
                dims = [max(1, d - 1) for d in dims]
                positions = 1
                for d in dims:
                    positions *= d
        shape = (batch, n_classes, *dims)
    soft = draw(st.booleans())
    ignore = "none" if soft else draw(st.sampled_from(["none", "default", "class"]))
    return dict(
        shape=shape,
        soft=soft,
        dtype=draw(st.sampled_from(list(TOLERANCES))),
        layout=draw(st.sampled_from(["contiguous", "classes_last", "strided"])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        weighted=draw(st.booleans()),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])
                             | st.floats(0.0, 1.0, allow_nan=False)),
        ignore=ignore,
        ignore_class=draw(st.integers(0, n_classes - 1)),
        target_grad=soft and draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _laid_out(values, layout):
    """``values`` (class dim 1, or 0 for (C,)) stored in the given layout, same values."""
    class_dim = 0 if values.dim() == 1 else 1
    if layout == "classes_last":
        return values.movedim(class_dim, -1).contiguous().movedim(-1, class_dim)
    if layout == "strided":  # every other element of a tensor twice as wide in the last dim
        wide = torch.zeros(values.shape[:-1] + (2 * values.shape[-1],), dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    return values.contiguous()


def _build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape, dtype, soft = case["shape"], case["dtype"], case["soft"]
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    kwargs = {"reduction": case["reduction"], "label_smoothing": case["label_smoothing"]}
    if soft:
        class_dim = 0 if len(shape) == 1 else 1
        target = torch.softmax(torch.randn(shape, generator=gen) * 2, class_dim).to(dtype)
        target = _laid_out(target, case["layout"])
    else:
        t_shape = () if len(shape) == 1 else (shape[0],) + shape[2:]
        target = torch.randint(0, n_classes, t_shape, generator=gen)
        drop = torch.rand(t_shape, generator=gen) < 0.3
        if case["ignore"] == "default":
            target = torch.where(drop, -100, target)
        elif case["ignore"] == "class":
            kwargs["ignore_index"] = case["ignore_class"]
            target = torch.where(drop, case["ignore_class"], target)
    if case["weighted"]:
        kwargs["weight"] = (torch.rand(n_classes, generator=gen) + 0.05).to(dtype)
    upstream_shape = () if case["reduction"] != "none" else (
        () if len(shape) == 1 else (shape[0],) + shape[2:])
    upstream = torch.randn(upstream_shape, generator=gen, dtype=torch.float64)
    return _laid_out(x, case["layout"]), target, kwargs, upstream


def check(case, backend):
    x, target, kwargs, upstream = _build(case)
    soft, want_t = case["soft"], case["target_grad"]
    ref_kwargs = dict(kwargs)
    if "weight" in ref_kwargs:
        ref_kwargs["weight"] = ref_kwargs["weight"].double()
    x64 = x.detach().double().requires_grad_()
    t64 = target.detach().double().requires_grad_(want_t) if soft else target
    ref = F.cross_entropy(x64, t64, **ref_kwargs)
    ref_grads = torch.autograd.grad(ref, [x64] + ([t64] if want_t else []), upstream)

    xf = x.detach().requires_grad_()
    tf = target.detach().requires_grad_(want_t) if soft else target
    loss = fusedce.cross_entropy(xf, tf, backend=backend, **kwargs)
    assert loss.shape == ref.shape
    assert loss.dtype == case["dtype"]
    grads = torch.autograd.grad(loss, [xf] + ([tf] if want_t else []), upstream.to(loss.dtype))
    atol, rtol = TOLERANCES[case["dtype"]]
    # the loss is rounded to the output dtype once; sums of many rows scale with the total
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol, equal_nan=True)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and got.dtype == case["dtype"]
        scale = want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got.double(), want, atol=atol * max(1.0, scale), rtol=rtol,
                                   equal_nan=True)


@settings(max_examples=TORCH_EXAMPLES, **COMMON)
@given(case=cases(max_logits=1 << 17))
def test_torch_path_matches_pytorch(case):
    check(case, "torch")


@pytest.mark.slow
@settings(max_examples=KERNEL_EXAMPLES, **COMMON)
@given(case=cases(max_logits=1 << 16))
def test_kernel_path_matches_pytorch(case):
    check(case, "triton")


def test_enough_generated_cases():
    """The issue asks for at least 500 generated cases in the default run."""
    assert TORCH_EXAMPLES + KERNEL_EXAMPLES >= 500


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strategy_reaches_every_form(backend):
    """A fixed case per input form, so a broken form fails here with a readable name."""
    for shape in [(7,), (3, 50_257), (2, 5, 2, 3)]:
        for soft in (False, True):
            check(dict(shape=shape, soft=soft, dtype=torch.float32, layout="contiguous",
                       reduction="mean", weighted=True, label_smoothing=0.1, ignore="default",
                       ignore_class=0, target_grad=soft, seed=0), backend)
