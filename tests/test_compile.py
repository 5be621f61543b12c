"""fusedce under torch.compile. ``torch.compile(..., fullgraph=True)`` (which raises on any
graph break) compiles a training step through the same autograd Function as eager mode, whose
forward and backward run the opaque ``torch.library`` ops ``fusedce::ce_forward`` /
``ce_backward`` while compiling; the loss and gradients equal eager mode's. CPU path (the
registration is the same for CUDA). ``torch.library.opcheck`` checks the ops' registration:
schema, fake (meta) implementations against the real ones.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce import _autograd  # noqa: F401  (the ops are registered on import)

# fusedce's own implementation, small calls included (see conftest.own_path)
pytestmark = pytest.mark.usefixtures("own_path")



@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TinyLM(torch.nn.Module):
    """Embedding -> MLP -> vocabulary head, the shape of a language model's loss."""

    def __init__(self, vocab=37, dim=16):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen) * 0.5)
        self.head = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen) * 0.5)
        self.vocab = vocab

    def forward(self, idx, target, **loss_kwargs):
        h = torch.tanh(self.emb[idx])
        logits = h @ self.head.t()
        return fusedce.cross_entropy(logits.view(-1, self.vocab), target.view(-1),
                                     **loss_kwargs)


def eager_and_compiled(model, args, kwargs, backend):
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, backend=backend)):
        model.zero_grad()
        loss = fn(*args, **kwargs)
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7))
        loss.backward(upstream)
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    return results


@pytest.mark.slow
def test_training_step_inductor_fullgraph():
    """The real compiler (inductor, C++ on the CPU), a full graph, same loss and grads."""
    model = TinyLM()
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 37, (3, 8), generator=gen)
    target = torch.randint(0, 37, (3, 8), generator=gen)
    target[0, :2] = -100
    (loss_e, grads_e), (loss_c, grads_c) = eager_and_compiled(
        model, (idx, target), {"label_smoothing": 0.1}, "inductor")
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [
    pytest.param({"reduction": "none"}, id="none"),
    pytest.param({"reduction": "sum", "weight": torch.rand(37) + 0.1}, id="sum-weight"),
    pytest.param({"inplace_backward": True}, id="inplace-is-functional-under-compile"),
    pytest.param({"size_average": False}, id="legacy-size-average"),
])
def test_training_step_options(kwargs):
    """aot_eager traces forward and backward through the fake implementations."""
    model = TinyLM()
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 37, (2, 5), generator=gen)
    target = torch.randint(0, 37, (2, 5), generator=gen)
    with pytest.warns(UserWarning) if "size_average" in kwargs else _no_warning():
        (loss_e, grads_e), (loss_c, grads_c) = eager_and_compiled(model, (idx, target), kwargs,
                                                                  "aot_eager")
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


@pytest.mark.slow
def test_legacy_arguments_warn_in_eager_mode_only():
    """README: PyTorch's deprecation warning for ``size_average``/``reduce``, none inside
    torch.compile (where PyTorch's own loss warns while it is traced), with the same loss."""
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0, 3, 6, 1])

    def step(x, t):
        return fusedce.cross_entropy(x * 2.0, t, size_average=False)

    results = {}
    for name, fn in (("eager", step),
                     ("compiled", torch.compile(step, fullgraph=True, backend="aot_eager"))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[name] = fn(x, t)
        said = [w for w in caught if "size_average and reduce args" in str(w.message)]
        assert len(said) == (1 if name == "eager" else 0), (name, said)
    torch.testing.assert_close(results["compiled"], results["eager"])
    torch.testing.assert_close(results["eager"], F.cross_entropy(x * 2.0, t, reduction="sum"))


@pytest.mark.slow
def test_inplace_backward_has_no_effect_under_compile():
    """README: under torch.compile ``inplace_backward`` is accepted and changes nothing: the
    logits a compiled step returns are intact (in eager mode the gradient overwrites them),
    and the gradient is eager mode's."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 7, generator=gen)
    t = torch.tensor([0, 3, 6, 1])

    def step(x, t):
        logits = x * 2.0
        return fusedce.cross_entropy(logits, t, inplace_backward=True), logits

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        xr = x.clone().requires_grad_()
        loss, logits = fn(xr, t)
        assert torch.equal(logits.detach(), x * 2.0) == (name == "compiled"), name
        (grads[name],) = torch.autograd.grad(loss, xr)
    torch.testing.assert_close(grads["compiled"], grads["eager"])


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.slow
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_kdim_and_probability_targets_compile(soft):
    """(N, C, H, W) logits, class indices or probabilities (whose gradient is also taken,
    and the class weight's, as PyTorch's: a differentiable weight of probabilities)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 4, generator=gen)
    target = (torch.softmax(torch.randn(2, 5, 3, 4, generator=gen), 1) if soft
              else torch.randint(0, 5, (2, 3, 4), generator=gen))
    weight = torch.rand(5, generator=gen) + 0.5

    def step(x, target, weight):
        return fusedce.cross_entropy(x * 2.0, target, weight, label_smoothing=0.05)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager"),
               lambda x, t, w: F.cross_entropy(x * 2.0, t, w, label_smoothing=0.05)):
        xr = x.clone().requires_grad_()
        tr = target.clone().requires_grad_() if soft else target
        wr = weight.clone().requires_grad_(soft)
        loss = fn(xr, tr, wr)
        grads = torch.autograd.grad(loss, [xr, tr, wr] if soft else [xr])
        results.append((loss, grads))
    (loss_e, grads_e), (loss_c, grads_c), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(loss_e, loss_r)
    for gc, ge, gr in zip(grads_c, grads_e, grads_r):
        torch.testing.assert_close(gc, ge)
        torch.testing.assert_close(ge, gr)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_extras_compile_fullgraph(backend):
    """Every loss extra, the aux outputs included, in one graph: same results as eager."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 37, generator=gen) * 4
    target = torch.randint(0, 37, (6,), generator=gen)
    target[2] = -100
    kw = dict(logit_scale=1.5, softcap=5.0, lse_square_scale=1e-3, return_aux=True,
              label_smoothing=0.1)

    def step(x, target):
        out = fusedce.cross_entropy(x, target, **kw)
        return out.loss * 2.0, out.z_loss, out.lse, out.accuracy, out.entropy

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=backend)):
        xr = x.clone().requires_grad_()
        out = fn(xr, target)
        grad, = torch.autograd.grad(out[0], xr)
        results.append((out, grad))
    (out_e, grad_e), (out_c, grad_c) = results
    for c, e in zip(out_c, out_e):
        torch.testing.assert_close(c, e)
    torch.testing.assert_close(grad_c, grad_e)


@pytest.mark.slow
def test_autocast_under_compile():
    """The loss dtype under autocast is fp32 in the compiled graph too."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 9, generator=gen).bfloat16()
    target = torch.randint(0, 9, (4,), generator=gen)

    def step(x, target):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fusedce.cross_entropy(x, target)

    eager = step(x, target)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, target)
    assert eager.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager)


def _op_samples():
    gen = torch.Generator().manual_seed(5)
    x2 = torch.randn(4, 7, generator=gen, requires_grad=True)
    t2 = torch.randint(0, 7, (4, 1), generator=gen)
    x3 = torch.randn(2, 6, 5, generator=gen, requires_grad=True)
    t3 = torch.randint(0, 6, (2, 5), generator=gen)
    y3 = torch.softmax(torch.randn(2, 6, 5, generator=gen), 1).requires_grad_()
    w = torch.rand(6, generator=gen)
    plain = (1.0, None, 0.0, False)  # logit_scale, softcap, lse_square_scale, aux
    extras = (2.0, 5.0, 1e-3, True)
    return [
        pytest.param((x2.unsqueeze(-1), t2, None, -100, 0.0, "mean", "torch", True, *plain),
                     id="rows-mean"),
        pytest.param((x3, t3, w, -100, 0.1, "none", "torch", True, *plain),
                     id="strided-none-weight"),
        pytest.param((x3, y3, w, -100, 0.2, "sum", "torch", False, *plain),
                     id="probabilities-sum"),
        pytest.param((x3.double(), t3, None, 0, 0.0, "mean", "torch", True, *plain), id="fp64"),
        pytest.param((x2.unsqueeze(-1), t2, None, -100, 0.1, "mean", "torch", True, *extras),
                     id="rows-extras"),
        pytest.param((x3, t3, w, 2, 0.0, "none", "torch", True, *extras),
                     id="strided-extras-none"),
        pytest.param((x3, y3, w, -100, 0.1, "mean", "torch", False, *extras),
                     id="probabilities-extras-mean"),
    ]


@pytest.mark.parametrize("args", _op_samples())
def test_opcheck(args):
    """Schema, fake tensors vs the real ops, AOT dispatch, for the forward op and for the
    backward op fed with the forward's outputs. The ops are opaque compute: the autograd
    formula is the Function's (its gradients are checked against eager mode above)."""
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.fusedce.ce_forward.default, args)
    x, target, weight, ignore_index, smoothing, reduction, backend, validate = args[:8]
    loss, lse, s, denom, _ = torch.ops.fusedce.ce_forward(*args)
    grad = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3),
                       dtype=loss.dtype)
    soft = target.is_floating_point()
    bwd_args = (grad, x, target, weight, lse, s, denom, ignore_index, smoothing, reduction,
                backend, True, soft, *args[8:11])
    torch.library.opcheck(torch.ops.fusedce.ce_backward.default, bwd_args)


def test_double_backward_raises_under_compile():
    """What torch.compile runs raises too (AOTAutograd refuses double backward), never a
    wrong second-order result."""
    x = torch.randn(2, 5, 3, requires_grad=True)
    t = torch.randint(0, 5, (2, 3))
    loss = torch.compile(fusedce.cross_entropy, backend="aot_eager", fullgraph=True)(x, t)
    g, = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((g * g).sum(), x)


@pytest.mark.slow
def test_dynamic_shapes_fullgraph():
    """torch.compile(dynamic=True) traces the argument checks with symbolic sizes and
    floats: no graph break (math.isfinite broke it), and one graph serves two batch sizes
    and two vocabularies with F.cross_entropy's results and gradients (float64 reference),
    the extras included; fusedce.linear_cross_entropy too."""
    kw = dict(label_smoothing=0.1, logit_scale=0.5, softcap=8.0, ignore_index=1)
    compiled = torch.compile(lambda x, t: fusedce.cross_entropy(x, t, **kw), fullgraph=True,
                             dynamic=True, backend="aot_eager")
    linear = torch.compile(lambda h, w, t: fusedce.linear_cross_entropy(h, w, t),
                           fullgraph=True, dynamic=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(8)
    for rows, classes in [(5, 11), (9, 23)]:
        x = torch.randn(rows, classes, generator=gen, requires_grad=True)
        h = torch.randn(rows, 4, generator=gen, requires_grad=True)
        w = torch.randn(classes, 4, generator=gen, requires_grad=True)
        target = torch.randint(0, classes, (rows,), generator=gen)
        target[0] = 1  # ignored by the first loss
        losses = compiled(x, target), linear(h, w, target)
        grads = torch.autograd.grad(losses[0] + losses[1], (x, h, w))
        x64, h64, w64 = (t.detach().double().requires_grad_() for t in (x, h, w))
        z = kw["softcap"] * torch.tanh(kw["logit_scale"] * x64 / kw["softcap"])
        refs = (F.cross_entropy(z, target, label_smoothing=0.1, ignore_index=1),
                F.cross_entropy(h64 @ w64.t(), target))
        ref_grads = torch.autograd.grad(refs[0] + refs[1], (x64, h64, w64))
        for got, want in zip(losses + grads, refs + ref_grads):
            torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("hand_off", [True, False], ids=["hand-off", "own-path"])
def test_export_with_a_dynamic_batch(hand_off):
    """``torch.export`` with a dynamic batch dimension: the hand-off's size test was a guard
    that export refused (``n < 8388608/7``), and ``Dim.AUTO`` kept it as a run-time check
    that failed past the hand-off size. The exported loss (function and module) equals
    PyTorch's on both sides of that size."""
    from fusedce import _route

    _route.set_hand_off(hand_off)  # (the own_path fixture restores the default)

    class Loss(torch.nn.Module):
        def forward(self, x, t):
            return fusedce.cross_entropy(x, t, label_smoothing=0.1)

    gen = torch.Generator().manual_seed(12)
    x, t = torch.randn(4, 7, generator=gen), torch.randint(0, 7, (4,), generator=gen)
    for module, dim in ((Loss(), torch.export.Dim("n")),
                        (fusedce.CrossEntropyLoss(), torch.export.Dim.AUTO)):
        program = torch.export.export(module, (x, t),
                                      dynamic_shapes=({0: dim}, {0: dim}))
        smoothing = 0.1 if isinstance(module, Loss) else 0.0
        for rows in (3, 1_300_000):  # 9.1M logits: past the hand-off size
            xr = torch.randn(rows, 7, generator=gen)
            tr = torch.randint(0, 7, (rows,), generator=gen)
            want = F.cross_entropy(xr.double(), tr, label_smoothing=smoothing)
            torch.testing.assert_close(program.module()(xr, tr).double(), want,
                                       rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------
# fusedce.linear_cross_entropy: the ops fusedce::linear_ce / linear_ce_grad (_linear_compile)

def _linear_case(name):
    """``(input, linear_weight, linear_bias, target, kwargs)`` of a named case."""
    gen = torch.Generator().manual_seed(9)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    t = torch.randint(0, 40, (12,), generator=gen)
    t[::4] = 3  # ignored where ignore_index=3
    cases = {
        "plain": (r(12, 16), r(40, 16) * 0.3, None, t, {}),
        "options": (r(12, 16), r(40, 16) * 0.3, r(40), t,
                    dict(weight=torch.rand(40, generator=gen) + 0.5, label_smoothing=0.1,
                         ignore_index=3, softcap=5.0, lse_square_scale=1e-3, chunk_size=5)),
        "k-dim": (r(4, 8), r(7, 3, 8), r(7, 3), torch.randint(0, 7, (4, 3), generator=gen), {}),
        "unbatched": (r(8), r(7, 8), None, torch.tensor(2), {}),
    }
    return cases[name]


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["plain", "options", "k-dim", "unbatched"])
def test_linear_cross_entropy_compiles_fullgraph(case, reduction):
    """One graph (fullgraph=True, inductor): the loss and the gradients of the input, the
    weight and the bias equal eager mode's and float64 PyTorch's, with a random upstream."""
    x, w, b, t, kw = _linear_case(case)
    leaves = [v.clone().requires_grad_() for v in (x, w) + ((b,) if b is not None else ())]

    def step(x, w, b):
        return fusedce.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, **kw)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    results = []
    for fn in (step, compiled):
        loss = fn(leaves[0], leaves[1], leaves[2] if b is not None else None)
        if not results:
            upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(4))
        results.append((loss, torch.autograd.grad(loss, leaves, upstream)))
    (eager, eager_grads), (got, grads) = results
    torch.testing.assert_close(got, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
    with torch.no_grad():  # evaluation: the loss alone, one graph too
        torch.testing.assert_close(compiled(*leaves[:2], leaves[2] if b is not None else None),
                                   eager.detach())
    # and PyTorch's loss on the float64 logits
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    z = F.linear(x64, w64.flatten(0, -2), None if b64 is None else b64.flatten())
    z = z.view(*x.shape[:-1], *w.shape[:-1])  # (N, C, d1...) for a K-dimensional weight
    if kw.get("softcap"):
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    ref_kw = {k: kw[k] for k in ("label_smoothing", "ignore_index") if k in kw}
    if "weight" in kw:
        ref_kw["weight"] = kw["weight"].double()
    ref = F.cross_entropy(z, t, reduction=reduction, **ref_kw)
    if kw.get("lse_square_scale"):
        kept = t != kw.get("ignore_index", -100)
        zl = kw["lse_square_scale"] * torch.logsumexp(z, -1).square() * kept
        ref = ref + (zl.sum() / kept.sum() if reduction == "mean" else
                     zl.sum() if reduction == "sum" else zl)
    ref_grads = torch.autograd.grad(ref, [v for v in (x64, w64, b64) if v is not None],
                                    upstream.double())
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_linear_transposed_operands_and_eager_fallbacks_compile():
    """A head stored (H, V) and passed transposed (a tied embedding) and a transposed
    input: the op's fake gradients are contiguous, as its real ones (inductor asserted the
    leaves' strides). Then calls no op serves (fp16, then ``return_aux``) break the graph
    and run eagerly, one after the other (traced, the second crashed Dynamo). Found in
    review; against float64 PyTorch with a random upstream gradient. Last, an
    out-of-range target raises IndexError through the compiled op."""
    gen = torch.Generator().manual_seed(12)
    emb = torch.randn(8, 13, generator=gen, requires_grad=True)
    xt = torch.randn(8, 7, generator=gen, requires_grad=True)
    t = torch.randint(0, 13, (7,), generator=gen)
    step = torch.compile(lambda x, w, r, t=t: fusedce.linear_cross_entropy(
        x, w, t, chunk_size=3, reduction=r))
    for reduction in ("mean", "none"):
        loss = step(xt.t(), emb.t(), reduction)
        upstream = torch.randn(loss.shape, generator=gen)
        got = torch.autograd.grad(loss, (xt, emb), upstream)
        x64, e64 = xt.detach().double().requires_grad_(), emb.detach().double().requires_grad_()
        ref = F.cross_entropy(x64.t() @ e64, t, reduction=reduction)
        want = torch.autograd.grad(ref, (x64, e64), upstream.double())
        torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)

    fallback = torch.compile(lambda x, w, **kw: fusedce.linear_cross_entropy(
        x, w, t, chunk_size=4, **kw))
    for dtype, kw in ((torch.float16, {}), (torch.float32, dict(return_aux=True))):
        x = torch.randn(7, 8, generator=gen).to(dtype).requires_grad_()
        w = torch.randn(13, 8, generator=gen).to(dtype).requires_grad_()
        out = fallback(x, w, **kw)
        loss = out.loss if kw else out
        loss.backward()
        ref = F.cross_entropy(x.detach().double() @ w.detach().double().t(), t)
        torch.testing.assert_close(loss.double(), ref, atol=2e-3, rtol=2e-3)
        assert x.grad is not None and w.grad is not None
    # compiled too, a CPU target out of range raises PyTorch's IndexError, not a NaN loss
    with pytest.raises(IndexError, match="Target 13 is out of bounds."):
        step(xt.t(), emb.t(), "mean", t=torch.tensor([0, 1, 13, 2, 3, 4, 5]))


@pytest.mark.slow
@pytest.mark.parametrize("upstream", [math.inf, math.nan], ids=["inf", "nan"])
def test_linear_compiled_non_finite_upstream_leaves_ignored_rows_zero(upstream):
    """As in eager mode (tests/test_linear.py): a sum over no item divided by 0 gives an inf
    upstream, which PyTorch never multiplies into an ignored row; bf16, one graph."""
    x, w, b, t, _ = _linear_case("plain")
    t = t.clone()
    t[: t.shape[0] // 2] = -100
    def step(a, c, d, target):
        return fusedce.linear_cross_entropy(a, c, target, linear_bias=d, reduction="sum")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for ignored in (slice(None), slice(0, t.shape[0] // 2)):
        tt = t.clone()
        tt[ignored] = -100
        leaves = [v.bfloat16().requires_grad_() for v in (x, w, torch.randn(40))]
        gx, gw, gb = torch.autograd.grad(compiled(*leaves, tt) * upstream, leaves)
        rows = tt == -100
        assert not gx[rows].any()
        if rows.all():
            assert not gw.any() and not gb.any()
        else:
            assert not gx[~rows].isfinite().any()


def _linear_op_args():
    from fusedce import _args

    x, w, b, t, _ = _linear_case("options")
    t, loss_shape, _, _ = _args.linear_inputs(x, w, b, t, 3)  # the targets as checked
    weight = torch.rand(40, generator=torch.Generator().manual_seed(2)) + 0.5
    common = (40, 3, 0.1)  # n_classes, ignore_index, label_smoothing
    extras = ("torch", 5, 1.0, 5.0, 1e-3)  # backend, chunk_size, scale, softcap, z-loss
    shape = list(loss_shape)
    return [
        pytest.param((x, w, b, t, weight, *common, "mean", *extras, shape, True, True, True),
                     id="mean-all-grads"),
        pytest.param((x, w, None, t, None, *common, "sum", *extras, shape, False, True, False),
                     id="sum-weight-grad-only"),
        pytest.param((x, w, b, t, weight, *common, "none", *extras, shape, True, True, True),
                     id="none"),
    ]


@pytest.mark.parametrize("args", _linear_op_args())
def test_linear_opcheck(args):
    """Schema, fake tensors against the real ops, AOT dispatch: fusedce::linear_ce, and for
    'none' fusedce::linear_ce_grad fed with a random upstream."""
    torch.library.opcheck(torch.ops.fusedce.linear_ce.default, args)
    if args[8] == "none":
        loss = torch.ops.fusedce.linear_ce(*args)[0]
        dloss = torch.randn(loss.shape, generator=torch.Generator().manual_seed(6))
        grad_args = (dloss, *args[:8], *args[9:])
        torch.library.opcheck(torch.ops.fusedce.linear_ce_grad.default, grad_args)
