"""The loss extras of ``fusedce.cross_entropy``: ``logit_scale``, ``softcap``,
``lse_square_scale`` (z-loss) and ``return_aux``, on both backends (the Triton kernels under
the interpreter), against a float64 reference written from their definitions.

The reference transforms the logits in float64 (``z = s tanh(a x / s)``), takes PyTorch's
float64 cross-entropy of ``z`` with every option, and adds the z-loss as the definition
reads; its gradients come from float64 autograd, with a random upstream gradient.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import combine

import fusedce

pytestmark = pytest.mark.usefixtures("own_path")

BACKENDS = ["torch", "triton"]

# each extra alone, then all together (with a scale that pushes logits past the cap)
OPTIONS = {
    "scale": dict(logit_scale=0.37),
    "softcap": dict(softcap=7.0),
    "zloss": dict(lse_square_scale=1e-3),
    "aux": dict(return_aux=True),
    "all": dict(logit_scale=2.5, softcap=15.0, lse_square_scale=1e-3, return_aux=True),
}
# (weight, smoothing, ignored rows): plain, and every existing option at once
VARIANTS = {"plain": (False, 0.0, False), "weighted": (True, 0.1, True)}


def reference(x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              logit_scale=1.0, softcap=None, lse_square_scale=0.0):
    """``(loss, z_loss, lse, accuracy, entropy)`` in float64, from the definitions, for
    class indices ``t`` (N,) or class probabilities (N, C): these ignore no row, and a row
    is accurate where the first argmax of ``z`` is the first argmax of its probabilities."""
    z = x.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    w = None if weight is None else weight.double()
    soft = t.is_floating_point()
    ce = F.cross_entropy(z, t.double() if soft else t, w, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, 1)
    kept = torch.ones(lse.shape, dtype=torch.bool) if soft else t != ignore_index
    per_token = torch.where(kept, lse_square_scale * lse ** 2, 0.0)
    z_loss = {"none": per_token, "sum": per_token.sum(),
              "mean": per_token.sum() / kept.sum().double()}[reduction]
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(1)
    wanted = t.argmax(1) if soft else t
    accuracy = ((z.argmax(1) == wanted) & kept).double().sum() / kept.sum().double()
    return ce + z_loss, z_loss, lse, accuracy, entropy


def _inputs(n, c, dtype, seed, spread=6.0, variant="plain"):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=gen) * spread).to(dtype)
    t = torch.randint(0, c, (n,), generator=gen)
    has_weight, eps, ignored = VARIANTS[variant]
    if ignored:
        t[1::3] = -100
    w = torch.rand(c, generator=gen) + 0.5 if has_weight else None
    return x, t, w, eps


def _rows(a):
    """(N, C, d...) logits or probabilities as (N * d..., C) rows; (N, C) unchanged."""
    return a.movedim(1, -1).reshape(-1, a.shape[1]) if a.dim() > 2 else a


def _check(x, t, w, eps, reduction, backend, options, inplace=False, seed=0):
    """Runs fusedce and the reference on ``x`` (N, C) or (N, C, d...) against class indices
    or class probabilities ``t``; compares the loss, the aux outputs and the gradients of
    the loss (random upstream gradient) with tolerances for the input dtype."""
    fp32 = x.dtype == torch.float32
    soft = t.is_floating_point()
    xf = x.clone().requires_grad_()
    tf = t.clone().requires_grad_() if soft else t
    # in place writes the gradient over its input: give it a copy made in the graph
    out = fusedce.cross_entropy(xf * 1 if inplace else xf, tf, w, reduction=reduction,
                                label_smoothing=eps, backend=backend, inplace_backward=inplace,
                                **options)
    aux = options.get("return_aux", False)
    loss = out.loss if aux else out
    assert loss.dtype == x.dtype
    gen = torch.Generator().manual_seed(seed + 100)
    upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    (loss.double() * upstream).sum().backward()

    xr = x.double().requires_grad_()
    tr = t.double().requires_grad_() if soft else t
    kw = {k: v for k, v in options.items() if k != "return_aux"}
    ref = reference(_rows(xr), _rows(tr) if soft else t.reshape(-1), w, reduction=reduction,
                    label_smoothing=eps, **kw)
    (ref[0] * upstream.reshape(-1)).sum().backward()

    rtol = 2e-5 if fp32 else 1e-2
    torch.testing.assert_close(loss.double().reshape(-1), ref[0].detach().reshape(-1),
                               rtol=rtol, atol=rtol)
    for got, want in ((xf, xr), (tf, tr)) if soft else ((xf, xr),):
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=rtol * scale)
    if aux:
        assert set(out._fields) == {"loss", "z_loss", "lse", "accuracy", "entropy"}
        for name in ("z_loss", "lse", "accuracy", "entropy"):
            assert not getattr(out, name).requires_grad, name
        torch.testing.assert_close(out.z_loss.double().reshape(-1), ref[1].reshape(-1),
                                   rtol=rtol, atol=1e-6)
        # lse and entropy are fp32 whatever the input dtype: of the same rounded logits
        torch.testing.assert_close(out.lse.double().reshape(-1),
                                   ref[2].detach(), rtol=2e-6, atol=2e-5)
        torch.testing.assert_close(out.entropy.double().reshape(-1),
                                   ref[4].detach(), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(out.accuracy.double(), ref[3], rtol=0, atol=1e-7)
        unreduced = (x.shape[0],) + tuple(x.shape[2:])
        assert out.lse.shape == out.entropy.shape == unreduced
        assert out.accuracy.shape == ()


@pytest.mark.parametrize("backend,dtype,options,variant,reduction", combine(
    BACKENDS, [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")],
    list(OPTIONS), list(VARIANTS), ["mean", "sum", "none"]))
def test_each_option_and_all(backend, dtype, options, variant, reduction):
    """Each extra alone and all together, with and without weights, smoothing and ignored
    rows, every reduction; C = 1,000 (blocks with a masked tail)."""
    x, t, w, eps = _inputs(6, 1000, dtype, seed=len(options) + len(reduction), variant=variant)
    _check(x, t, w, eps, reduction, backend, OPTIONS[options])


@pytest.mark.parametrize("backend,dtype,reduction", combine(
    BACKENDS, [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")],
    ["mean", "none"]))
def test_inplace_backward(backend, dtype, reduction):
    """The gradient written in the forward (over the logits) with every extra."""
    x, t, w, eps = _inputs(5, 333, dtype, seed=3, variant="weighted")
    _check(x, t, w, eps, reduction, backend, OPTIONS["all"], inplace=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_cols", [1000, pytest.param(50257, id="gpt2")])
@pytest.mark.parametrize("layout", ["rows", "strided"])
def test_softcap_padded_lanes(backend, n_cols, layout):
    """Every real logit far below ``-softcap``: each caps to -30, so the row's softmax is
    uniform over its C classes and the loss is log C. A padded lane of a block capped to
    -30 instead of left out would add probability (and lower the accuracy of a tie). Rows
    of (rows, C), and the same rows as a view with strided classes (the strided kernels'
    tiles are padded along the classes too)."""
    x = torch.full((3, n_cols), -1e4)
    x[1, 7] = 0.0  # one real class above the rest
    t = torch.tensor([0, 7, 5])
    xin = x if layout == "rows" else x[:, :, None].expand(3, n_cols, 2).contiguous()[:, :, 1]
    out = fusedce.cross_entropy(xin, t, reduction="none", backend=backend, softcap=30.0,
                                return_aux=True)
    ref = reference(x, t, reduction="none", softcap=30.0)
    torch.testing.assert_close(out.loss.double(), ref[0], rtol=1e-6, atol=1e-6)
    assert out.loss[0].item() == pytest.approx(math.log(n_cols), rel=1e-6)
    torch.testing.assert_close(out.entropy.double(), ref[4], rtol=1e-5, atol=1e-5)
    # ties: row 0 and row 2 are all -30 (argmax: column 0), row 1 has its max at 7
    assert out.accuracy.item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("options", ["all", "zloss"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_float64(backend, options):
    """(N, C, d) logits (classes not contiguous: the strided launchers) and float64
    (computed in float64, on the PyTorch implementation), with every extra, and with the
    z-loss alone."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 50, 4, generator=gen) * 5
    t = torch.randint(0, 50, (3, 4), generator=gen)
    t[0, 1] = -100
    for dtype in (torch.float32, torch.float64):
        xf = x.to(dtype).clone().requires_grad_()
        out = fusedce.cross_entropy(xf, t, reduction="none", backend=backend,
                                    **dict(OPTIONS[options], return_aux=True))
        upstream = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        (out.loss.double() * upstream).sum().backward()
        xr = x.double().requires_grad_()
        rows = xr.transpose(1, 2).reshape(-1, 50)
        kw = {k: v for k, v in OPTIONS[options].items() if k != "return_aux"}
        ref = reference(rows, t.reshape(-1), reduction="none", **kw)
        (ref[0] * upstream.reshape(-1)).sum().backward()
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert out.loss.shape == out.lse.shape == out.entropy.shape == (3, 4)
        torch.testing.assert_close(out.loss.double().reshape(-1), ref[0].detach(), rtol=tol,
                                   atol=tol)
        torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(out.entropy.double().reshape(-1), ref[4].detach(),
                                   rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_lse_of_a_row_of_minus_inf(backend):
    """A row of only -inf (a fully masked row): its aux ``lse`` is -inf, as
    ``torch.logsumexp`` has it, in fp32 and float64, rows and (N, C, d) layouts (the
    float64 path gave NaN, found in review); its loss is PyTorch's NaN, and a row holding
    +inf gives NaN for both, as PyTorch's ``log_softmax`` (x - max) does."""
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float64):
        for shape in ((3, 6), (3, 6, 2)):
            x = torch.randn(*shape, generator=gen, dtype=dtype)
            x[1] = float("-inf")
            x[2, 1] = float("inf")
            t = torch.tensor([0, 1, 2]).reshape((3,) + (1,) * (len(shape) - 2))
            t = t.expand((3,) + shape[2:])
            out = fusedce.cross_entropy(x, t, reduction="none", backend=backend,
                                        return_aux=True)
            want = F.cross_entropy(x.double(), t, reduction="none")
            lse = torch.logsumexp(x.double(), 1)
            torch.testing.assert_close(out.loss.double(), want, equal_nan=True)
            torch.testing.assert_close(out.lse[:2].double(), lse[:2])
            assert out.lse[2].isnan().all(), (dtype, shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_z_loss_is_zero_without_a_z_loss(backend):
    """Without a z-loss the aux ``z_loss`` is 0 even where ``lse**2`` overflows fp32 (a
    logit scale of 1e20: it was 0 * inf, NaN; found in review), for both losses; the loss
    stays finite, PyTorch's on the scaled float64 logits."""
    gen = torch.Generator().manual_seed(3)
    x, h, w = (torch.randn(*s, generator=gen) for s in ((4, 5), (4, 3), (5, 3)))
    t = torch.tensor([0, 1, 2, 3])
    for reduction in ("mean", "none"):
        out = fusedce.cross_entropy(x, t, logit_scale=1e20, return_aux=True,
                                    reduction=reduction, backend=backend)
        lin = fusedce.linear_cross_entropy(h, w, t, logit_scale=1e20, return_aux=True,
                                           reduction=reduction, backend=backend)
        for got, z in ((out, x), (lin, h.double() @ w.double().t())):
            assert torch.equal(got.z_loss, torch.zeros_like(got.z_loss)), got.z_loss
            want = F.cross_entropy(z.double() * 1e20, t, reduction=reduction)
            torch.testing.assert_close(got.loss.double(), want, rtol=1e-5, atol=0)


LAYOUTS = {
    # (N, C, d): classes d apart
    "nc_d": lambda x: x,
    # a 2-d view whose classes are strided: x[:, :, k] of an (N, C, K) tensor
    "strided_classes": lambda x: x[:, :, 1],
    # classes last, then moved to dim 1 (a view: classes contiguous, rows not one apart)
    "classes_last": lambda x: x.movedim(1, -1).contiguous().movedim(-1, 1)[:, :, :2],
}


@pytest.mark.parametrize("backend,layout,options", combine(
    BACKENDS, list(LAYOUTS), ["all", "zloss", "softcap"]))
def test_strided_layouts_read_in_place(monkeypatch, backend, layout, options):
    """Logits whose classes are not one row of a (rows, C) view take the strided launchers
    with the extras on the caller's own memory (no copy: the launchers get the input's
    storage), forward and backward, and match the reference."""
    from fusedce import _args

    impl = _args.implementation(backend, torch.empty(0))
    seen = []
    for name in ("ce_strided_fwd", "ce_strided_bwd"):
        real = getattr(impl, name)

        def spy(x, *args, _real=real, _name=name, **kwargs):
            seen.append((_name, x.untyped_storage().data_ptr()))
            return _real(x, *args, **kwargs)

        monkeypatch.setattr(impl, name, spy)
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(4, 70, 3, generator=gen) * 5
    x = LAYOUTS[layout](base)
    t = torch.randint(0, 70, (4,) + tuple(x.shape[2:]), generator=gen)
    t.view(-1)[1] = -100
    w = torch.rand(70, generator=gen) + 0.5
    xf = x.detach().requires_grad_()
    ptr = xf.untyped_storage().data_ptr()
    opts = dict(OPTIONS[options], return_aux=True)
    out = fusedce.cross_entropy(xf, t, w, label_smoothing=0.1, reduction="none",
                                backend=backend, **opts)
    upstream = torch.randn(out.loss.shape, generator=gen, dtype=torch.float64)
    (out.loss.double() * upstream).sum().backward()
    assert [name for name, _ in seen] == ["ce_strided_fwd", "ce_strided_bwd"]
    assert all(p == ptr for _, p in seen)
    xr = x.double().requires_grad_()
    kw = {k: v for k, v in OPTIONS[options].items() if k != "return_aux"}
    ref = reference(_rows(xr), t.reshape(-1), w, reduction="none", label_smoothing=0.1, **kw)
    (ref[0] * upstream.reshape(-1)).sum().backward()
    torch.testing.assert_close(out.loss.double().reshape(-1), ref[0].detach(), rtol=2e-5,
                               atol=2e-5)
    torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.entropy.double().reshape(-1), ref[4].detach(), rtol=2e-5,
                               atol=2e-5)
    torch.testing.assert_close(out.accuracy.double(), ref[3], rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    """'mean' over no token: the loss, the z-loss and the accuracy are NaN (0 / 0), as
    PyTorch's mean; the gradient is 0."""
    x = torch.randn(4, 30, requires_grad=True)
    t = torch.full((4,), -100)
    out = fusedce.cross_entropy(x, t, backend=backend, **OPTIONS["all"])
    assert out.loss.isnan() and out.z_loss.isnan() and out.accuracy.isnan()
    assert torch.isfinite(out.lse).all() and torch.isfinite(out.entropy).all()
    out.loss.backward()
    assert (x.grad == 0).all()


def test_no_grad_and_eval_results_match():
    """Under no_grad (no autograd state) the results are those of the graph-building call."""
    x, t, w, eps = _inputs(6, 200, torch.float32, seed=9, variant="weighted")
    kw = dict(weight=w, label_smoothing=eps, **OPTIONS["all"])
    with torch.no_grad():
        a = fusedce.cross_entropy(x, t, **kw)
    b = fusedce.cross_entropy(x.clone().requires_grad_(), t, **kw)
    for name in a._fields:
        torch.testing.assert_close(getattr(a, name), getattr(b, name).detach())


def test_module_takes_the_extras():
    x, t, _, _ = _inputs(6, 200, torch.float32, seed=2)
    loss = fusedce.CrossEntropyLoss(softcap=5.0, lse_square_scale=1e-3, logit_scale=0.5)
    ref = reference(x, t, softcap=5.0, lse_square_scale=1e-3, logit_scale=0.5)[0]
    torch.testing.assert_close(loss(x, t).double(), ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,error", [
    (dict(softcap=0.0), ValueError),
    (dict(softcap=-3.0), ValueError),
    (dict(softcap=float("inf")), ValueError),
    (dict(logit_scale=float("nan")), ValueError),
    (dict(lse_square_scale=float("inf")), ValueError),
    (dict(lse_square_scale=-1e-4), ValueError),
    (dict(logit_scale=torch.tensor(2.0)), TypeError),
    (dict(softcap="30"), TypeError),
    (dict(return_aux=1), TypeError),
])
def test_bad_extras_raise(kwargs, error):
    x, t, _, _ = _inputs(4, 20, torch.float32, seed=0)
    with pytest.raises(error):
        fusedce.cross_entropy(x, t, **kwargs)


def _probabilities(shape, dtype, seed, sharp=3.0):
    """Logits (spread 6) and class probabilities of ``shape`` (N, C, d...): softmax of
    the logits plus noise, so that some rows' argmaxes agree and others not; row 0 one-hot
    at the logits' argmax (accurate whatever the noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 6.0).to(dtype)
    y = torch.softmax((x.float() + torch.randn(shape, generator=gen) * 2.0) * sharp, 1)
    y[0] = torch.nn.functional.one_hot(x[0].float().argmax(0), shape[1]).movedim(-1, 0)
    return x, y.to(dtype)


PROBABILITY_SHAPES = {"rows": (6, 1000), "nc_d": (3, 300, 2)}


@pytest.mark.parametrize("backend,dtype,options,reduction,shape", combine(
    BACKENDS, [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")],
    list(OPTIONS), ["mean", "sum", "none"], list(PROBABILITY_SHAPES)))
def test_probability_targets(backend, dtype, options, reduction, shape):
    """Class-probability targets with each extra and all together, with class weights and
    smoothing, on (N, C) rows and (N, C, d) logits (classes strided): the loss, the aux
    outputs, and the gradients of the logits and of the probabilities."""
    x, y = _probabilities(PROBABILITY_SHAPES[shape], dtype, seed=len(options) + len(reduction))
    w = (torch.rand(x.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    _check(x, y, w, 0.1, reduction, backend, OPTIONS[options])
    if options == "all":  # accuracy is of z: argmaxes of the logits, as the scale and cap
        rows = _rows(x.double())  # keep the order; neither all nor none agree
        assert 0 < (rows.argmax(1) == _rows(y.double()).argmax(1)).double().mean() < 1


def test_defaults_change_nothing():
    """The default extras are the plain loss: a call spelling them out equals one without."""
    x, t, w, eps = _inputs(6, 500, torch.float32, seed=4, variant="weighted")
    kw = dict(weight=w, label_smoothing=eps)
    a = fusedce.cross_entropy(x, t, **kw)
    b = fusedce.cross_entropy(x, t, logit_scale=1.0, softcap=None, lse_square_scale=0.0,
                              return_aux=False, **kw)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# linear_cross_entropy


@pytest.mark.parametrize("backend,dtype,options,reduction", combine(
    BACKENDS, [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")],
    ["softcap", "zloss", "all"], ["mean", "sum", "none"]))
def test_linear_cross_entropy(backend, dtype, options, reduction):
    """The extras on each chunk's logits (chunks of 4 rows over 10 tokens, the last one
    short), with weights, smoothing, ignored rows and a bias: the loss, the aux outputs and
    the gradients of input, weight and bias against float64 autograd of the reference."""
    gen = torch.Generator().manual_seed(11)
    n, h, c = 10, 16, 300
    x = (torch.randn(n, h, generator=gen)).to(dtype)
    lw = (torch.randn(c, h, generator=gen) * 0.8).to(dtype)
    lb = (torch.randn(c, generator=gen)).to(dtype)
    t = torch.randint(0, c, (n,), generator=gen)
    t[::4] = -100
    w = torch.rand(c, generator=gen) + 0.5
    kw = OPTIONS[options]
    leaves = [v.clone().requires_grad_() for v in (x, lw, lb)]
    out = fusedce.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2],
                                       weight=w, reduction=reduction, label_smoothing=0.1,
                                       backend=backend, chunk_size=4, **kw)
    aux = kw.get("return_aux", False)
    loss = out.loss if aux else out
    upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    (loss.double() * upstream).sum().backward()
    refs = [v.double().requires_grad_() for v in (x, lw, lb)]
    ref = reference(refs[0] @ refs[1].t() + refs[2], t, w, reduction=reduction,
                    label_smoothing=0.1, **{k: v for k, v in kw.items() if k != "return_aux"})
    (ref[0] * upstream).sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), ref[0].detach(), rtol=tol, atol=tol)
    for got, want in zip(leaves, refs):
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=tol * scale)
    if aux:
        torch.testing.assert_close(out.z_loss.double(), ref[1].detach(), rtol=tol, atol=1e-6)
        torch.testing.assert_close(out.lse.double(), ref[2].detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(out.entropy.double(), ref[4].detach(), rtol=tol, atol=tol)
        if dtype == torch.float32:  # bf16 logits round differently from the reference's
            torch.testing.assert_close(out.accuracy.double(), ref[3], rtol=0, atol=1e-7)


LINEAR_CASES = {
    # (target kind, dtype, weight's extra dims): probabilities; a K-dimensional weight
    # (classes of 3 positions each); float64 (computed in float64 on fusedce.cpu)
    "probabilities": ("soft", torch.float32, ()),
    "probabilities-bf16": ("soft", torch.bfloat16, ()),
    "k_dim": ("index", torch.float32, (3,)),
    "fp64": ("index", torch.float64, ()),
    "fp64-probabilities": ("soft", torch.float64, ()),
}


@pytest.mark.parametrize("backend,case,options,reduction", combine(
    BACKENDS, list(LINEAR_CASES), ["zloss", "all"], ["mean", "none"]))
def test_linear_cross_entropy_other_chunks(backend, case, options, reduction):
    """The extras on the chunks that are not float32 rows of class indices (probability
    targets, K-dimensional weights, float64): loss, aux outputs and the gradients of the
    input, the weight, the bias and the probabilities, in chunks of 4 rows over 10. The
    z-loss is counted once (float64 added it twice: 12.89 for 9.03)."""
    kind, dtype, extra_dims = LINEAR_CASES[case]
    gen = torch.Generator().manual_seed(13)
    n, h, c = 10, 16, 40
    x = torch.randn(n, h, generator=gen).to(dtype)
    lw = (torch.randn((c,) + extra_dims + (h,), generator=gen) * 0.8).to(dtype)
    lb = torch.randn((c,) + extra_dims, generator=gen).to(dtype)
    if kind == "soft":
        t = torch.softmax(torch.randn((n, c) + extra_dims, generator=gen) * 3, 1).to(dtype)
    else:
        t = torch.randint(0, c, (n,) + extra_dims, generator=gen)
        t.view(-1)[::4] = -100
    leaves = [v.clone().requires_grad_() for v in (x, lw, lb)]
    tf = t.clone().requires_grad_() if kind == "soft" else t
    out = fusedce.linear_cross_entropy(leaves[0], leaves[1], tf, linear_bias=leaves[2],
                                       reduction=reduction, label_smoothing=0.1,
                                       backend=backend, chunk_size=4, **OPTIONS[options])
    aux = OPTIONS[options].get("return_aux", False)
    loss = out.loss if aux else out
    upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    (loss.double() * upstream).sum().backward()
    refs = [v.double().requires_grad_() for v in (x, lw, lb)]
    tr = t.double().requires_grad_() if kind == "soft" else t
    logits = torch.einsum("nh,c...h->nc...", refs[0], refs[1]) + refs[2]
    ref = reference(_rows(logits), _rows(tr) if kind == "soft" else t.reshape(-1),
                    reduction=reduction, label_smoothing=0.1,
                    **{k: v for k, v in OPTIONS[options].items() if k != "return_aux"})
    (ref[0] * upstream.reshape(-1)).sum().backward()
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(loss.double().reshape(-1), ref[0].detach().reshape(-1),
                               rtol=tol, atol=tol)
    pairs = list(zip(leaves, refs)) + ([(tf, tr)] if kind == "soft" else [])
    for got, want in pairs:
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=tol * scale)
    if aux:
        torch.testing.assert_close(out.z_loss.double().reshape(-1), ref[1].reshape(-1),
                                   rtol=tol, atol=tol)
        torch.testing.assert_close(out.lse.double().reshape(-1), ref[2].detach(), rtol=tol,
                                   atol=tol)
        torch.testing.assert_close(out.entropy.double().reshape(-1), ref[4].detach(),
                                   rtol=tol, atol=tol)
        if dtype != torch.bfloat16:  # bf16 logits round differently from the reference's
            torch.testing.assert_close(out.accuracy.double(), ref[3], rtol=0, atol=1e-7)


def test_linear_cross_entropy_1d_and_no_grad():
    """A 1-d input (one token): per-token aux outputs are 0-d; under no_grad the same
    numbers as with a graph."""
    gen = torch.Generator().manual_seed(12)
    x, lw = torch.randn(8, generator=gen), torch.randn(50, 8, generator=gen)
    t = torch.tensor(7)
    kw = dict(reduction="none", **OPTIONS["all"])
    out = fusedce.linear_cross_entropy(x, lw, t, **kw)
    assert out.loss.shape == out.lse.shape == out.entropy.shape == out.z_loss.shape == ()
    ref = reference((x @ lw.t())[None].double(), t[None], reduction="none",
                    **{k: v for k, v in OPTIONS["all"].items() if k != "return_aux"})
    torch.testing.assert_close(out.loss.double(), ref[0][0], rtol=2e-5, atol=2e-5)
    with torch.no_grad():
        again = fusedce.linear_cross_entropy(x.requires_grad_(), lw, t, **kw)
    for name in out._fields:
        torch.testing.assert_close(getattr(again, name), getattr(out, name))


# ------------------------------------------------------------------------------------------
# Few long rows: each row split over several programs (fusedce/kernels/split_rows.py)


@pytest.mark.parametrize("options", ["softcap", "zloss", "all"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_split_rows(monkeypatch, options, inplace, reduction):
    """The split-row kernels (3 splits per row of 1,000 columns: uneven widths) with the
    extras: the splits' partial entropies and argmaxes merged, gz in the split gradient."""
    from fusedce.kernels import split_rows

    monkeypatch.setattr(split_rows, "FORCE_SPLITS", 3)
    x, t, w, eps = _inputs(4, 1000, torch.float32, seed=13, variant="weighted")
    x[0, 990] = x[0].max() + 5  # a max in the last split
    x[1, 3] = x[1, 700] = x[1].max() + 5  # tied in the first and the last split
    t[0], t[1] = 990, 700  # row 1's first max is column 3: wrong
    opts = dict(OPTIONS[options])
    opts["return_aux"] = True
    _check(x, t, w, eps, reduction, "triton", opts, inplace=inplace)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [30.0, 1e3, 1e5])
def test_softcap_keeps_fp32_precision_for_any_cap(backend, softcap):
    """``s tanh(x / s)`` for logits far below the cap: tanh's argument is small, where a
    ``1 - exp(-2y)`` form loses tanh's relative precision (a cap of 1e5 was 1e-2 off)."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(16, 1000, generator=gen) * 2
    t = torch.randint(0, 1000, (16,), generator=gen)
    xf = x.clone().requires_grad_()
    out = fusedce.cross_entropy(xf, t, reduction="none", backend=backend, softcap=softcap)
    upstream = torch.randn(16, generator=gen, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    xr = x.double().requires_grad_()
    ref = reference(xr, t, reduction="none", softcap=softcap)[0]
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=0, atol=1e-6)


def test_split_rows_with_a_split_of_minus_inf(monkeypatch):
    """A split whose logits are all -inf (a padded vocabulary) adds +inf to the smoothing
    term, as the unsplit kernel and PyTorch have it (its own partial sum is NaN)."""
    from fusedce.kernels import split_rows

    monkeypatch.setattr(split_rows, "FORCE_SPLITS", 3)
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(5, 37, generator=gen) * 3
    x[2] = float("-inf")
    x[2, 30] = 1.0
    x[3, :13] = float("-inf")
    t = torch.tensor([1, -100, 30, 7, 0])
    got = fusedce.cross_entropy(x, t, reduction="none", label_smoothing=0.1, backend="triton",
                                return_aux=True)
    want = F.cross_entropy(x.double(), t, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(got.loss.double(), want)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
def test_positive_scale_alone_runs_the_row_loops(monkeypatch, dtype, inplace):
    """A positive ``logit_scale`` without a softcap or aux outputs is folded into the CPU
    row path's multiply-add (``exp2(x fp32(a log2 e) + n)``), z-loss, weights, smoothing and
    ignored rows included; ``extras.py`` serves a scale that is negative or too far from 1
    for that, with the same results. 256 x 4,099 logits: two workers, the loops scripted."""
    from fusedce.cpu import extras as cpu_extras

    served = []
    ce_fwd = cpu_extras.ce_fwd
    monkeypatch.setattr(cpu_extras, "ce_fwd",
                        lambda *a, **k: served.append(1) or ce_fwd(*a, **k))
    x, t, w, eps = _inputs(256, 4099, dtype, seed=41, spread=4.0, variant="weighted")
    for scale, plain in ((0.37, True), (3.0, True), (2.0 ** -60, True), (-0.5, False),
                         (2.0 ** 70, False)):
        served.clear()
        # an absurd scale's logits are all far apart: keep them finite in the reference
        xs = x if abs(scale) < 2.0 ** 60 else (x * 2.0 ** -66).to(dtype)
        _check(xs, t, w, eps, "mean", "torch",
               dict(logit_scale=scale, lse_square_scale=1e-3), inplace=inplace)
        assert bool(served) != plain, scale


# ------------------------------------------------------------------------------------------
# NaN logits: the accuracy's argmax is torch.argmax's, for which NaN is the largest value


def _nan_rows(n_cols):
    """Rows of ``n_cols`` logits holding NaN where a kernel meets them in different blocks
    (the head, the body, the tail that the edge block reads first), and their targets:
    correct where the target is the row's first NaN (or its max, in the row without NaN)."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(7, n_cols, generator=gen)
    nan, last = float("nan"), n_cols - 1
    x[0, 1] = nan                       # in the head (rows start one element past alignment)
    x[1, 100] = x[1, last] = nan        # the body's, though the tail's is met first
    x[2, 0], x[2, last] = float("inf"), nan  # NaN above +inf
    x[4, 5] = x[4, 6] = nan             # the first of two
    x[5, 150] = nan
    x[6, 2] = x[6, 200] = nan
    t = torch.tensor([1, 100, last, int(x[3].argmax()), 6, 3, 200])
    return x, t


# (backend, layout): the split rows are a Triton launch only
NAN_LAYOUTS = [(b, lay) for b in BACKENDS for lay in ("rows", "split", "nc_d", "strided")
               if (b, lay) != ("torch", "split")]


@pytest.mark.parametrize("backend,layout", NAN_LAYOUTS)
def test_accuracy_of_rows_holding_nan(monkeypatch, backend, layout):
    """A row holding NaN is accurate where its first NaN is the target, as ``z.argmax(1)``
    has it; the kernels' max skipped NaN, so every such row counted as wrong. Row by row,
    each layout's kernel: rows one element past alignment (a head block), split rows, (N,
    C, d), and classes strided (``x[:, :, 1]``)."""
    if layout == "split":
        from fusedce.kernels import split_rows

        monkeypatch.setattr(split_rows, "FORCE_SPLITS", 3)
    n_cols = 300
    x, t = _nan_rows(n_cols)
    for r in range(7):
        if layout in ("rows", "split"):
            xr, tr = torch.cat([torch.zeros(1, 1), x[r:r + 1]], 1)[:, 1:], t[r:r + 1]
        elif layout == "nc_d":
            xr, tr = x[r:r + 1, :, None].expand(1, n_cols, 2).contiguous(), t[r:r + 1, None]
            tr = tr.expand(1, 2)
        else:
            xr, tr = torch.stack([x[r:r + 1], x[r:r + 1]], 2)[:, :, 1], t[r:r + 1]
        out = fusedce.cross_entropy(xr, tr, backend=backend, return_aux=True)
        assert out.accuracy.item() == float(x[r].argmax() == t[r]), (r, layout)
        assert out.loss.isnan() == x[r].isnan().any(), (r, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_with_probability_targets_holding_nan(backend):
    """With class probabilities the wanted class is the target's first argmax, a NaN
    first as well: rows whose logits, target, or both hold NaN, against ``argmax(1)``."""
    n_cols = 300
    x, t = _nan_rows(n_cols)
    y = F.one_hot(t, n_cols).double() * 0.6 + 0.4 / n_cols
    y[3, 40] = float("nan")      # a row of finite logits, its target's argmax a NaN
    y[4, 5] = float("nan")       # the logits' first NaN too
    y[6, 250] = float("nan")     # after the logits' first NaN, its target at 200
    for r in range(7):
        for xr, yr in ((x[r:r + 1], y[r:r + 1]),  # rows: the (N, C, d) kernel as (N, C)
                       (x[r:r + 1, :, None].expand(1, n_cols, 2), y[r:r + 1, :, None])):
            yr = yr.expand(xr.shape).float()
            out = fusedce.cross_entropy(xr, yr, backend=backend, return_aux=True)
            want = float(x[r].argmax() == y[r].argmax())
            assert out.accuracy.item() == want, (r, xr.dim())


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_accuracy_of_rows_holding_nan(backend):
    """The vocab-parallel merge takes each slice's max and first argmax: a slice holding
    NaN sends a NaN max and its first NaN's column, and the merged argmax is the first NaN
    of the row, as ``argmax`` of the full row (three slices of 100, merged in one process
    as the all-gather would hand them to every rank)."""
    from fusedce import _args, distributed

    n_cols, n_rows = 300, 7
    x, t = _nan_rows(n_cols)
    impl = _args.implementation(backend, x)
    extras = _args.extras(return_aux=True)
    sends = []
    for start in (0, 100, 200):
        t_local = torch.where((t >= start) & (t < start + 100), t - start, -1)
        send = torch.empty(6 * n_rows + 3, dtype=torch.float64)
        impl.vp_partials(x[:, start:start + 100].contiguous(), t_local, None, False, send,
                         extras)
        send[5 * n_rows:6 * n_rows] += start
        send[-3:] = torch.tensor([100.0, 100.0, start])
        sends.append(send)
    *_, (_, first) = distributed._merge(torch.cat(sends), n_rows, 6, False, True)
    assert first.tolist() == x.argmax(1).double().tolist()
